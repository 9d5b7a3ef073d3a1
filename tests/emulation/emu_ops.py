"""The CUDA launchers of every op (csrc/<op>/<op>.h) run on the CPU by the emulation harness, behind the same
calling convention as ``torch.ops.attnfree.<op>_fwd`` / ``_bwd`` (the torch bindings csrc/<op>/<op>_cuda.cpp, minus
their input checks): CPU tensors in, CPU tensors out. Used by the ``emulation`` path of tests/common/paths.py and by
benchmarks/cost_model.py.

The library is built from the kernel files as they are (``rewrite=False``: they use ATTNFREE_LAUNCH /
ATTNFREE_DYNAMIC_SHARED / ATTNFREE_STATIC_SHARED and attnfree::gptr, csrc/common/emulation/device_compat.cuh) plus
tests/emulation/shims/ops_shim.cpp. Every call checks the harness result (faults, stray writes, modified inputs) and
raises EmuError on any; ``last_result()`` is the last call's Result (counters, per-launch records).
"""

from __future__ import annotations

import os
import threading

import emu_runner as emu
import torch

SOURCES = [
    "csrc/aft_simple/aft_simple.cu",
    "csrc/aft_local/aft_local.cu",
    "csrc/aft_full/aft_full.cu",
    "csrc/ea_double_norm/ea_double_norm.cu",
    "tests/emulation/shims/ops_shim.cpp",
]

# attnfree::DType (csrc/common/dtype.h)
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_lib = None
_lock = threading.Lock()
_last = threading.local()


def library():
    global _lib
    with _lock:
        if _lib is None:
            _lib = emu.build("attnfree_ops", SOURCES, include_dirs=["csrc"], rewrite=False)
    return _lib


def last_result():
    return getattr(_last, "result", None)


def _acc(dt):
    return torch.float64 if dt == torch.float64 else torch.float32


def _c(t):
    return t.detach().contiguous()


def _call(fn, *args):
    r = library().call(fn, *args)
    _last.result = r
    r.check()
    return r


def _exact() -> bool:
    return os.environ.get("ATTNFREE_AFT_FULL_KERNEL", "").lower() == "exact"


def _tf32x3() -> bool:
    """What the torch binding passes: 3xTF32 for float32 unless the matmul precision allows TF32."""
    return torch.get_float32_matmul_precision() == "highest"


# ------------------------------------------------------------------------------------------------ aft_simple
def aft_simple_fwd(q, k, v, causal):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    dt = DTYPE[q.dtype]
    ws = library().raw("emu_aft_simple_fwd_ws", dt, B, T, D, bool(causal))
    r = _call(
        "emu_aft_simple_fwd",
        dt,
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.Out("y", torch.empty_like(q)),
        emu.Out("lse", torch.empty(q.shape, dtype=_acc(q.dtype))),
        B,
        T,
        D,
        bool(causal),
        emu.Scratch("workspace", ws),
    )
    return r.outputs["y"], r.outputs["lse"]


def aft_simple_bwd(dy, q, k, v, y, lse, causal):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    dt = DTYPE[q.dtype]
    ws = library().raw("emu_aft_simple_bwd_ws", dt, B, T, D, bool(causal))
    outs = [emu.Out(n, torch.empty_like(q)) for n in ("dq", "dk", "dv")]
    r = _call(
        "emu_aft_simple_bwd",
        dt,
        emu.In("dy", _c(dy.to(q.dtype))),
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.In("y", _c(y.to(q.dtype))),
        emu.In("lse", _c(lse.to(_acc(q.dtype)))),
        *outs,
        B,
        T,
        D,
        bool(causal),
        emu.Scratch("workspace", ws),
    )
    return tuple(r.outputs[n] for n in ("dq", "dk", "dv"))


# aft_simple with a recurrent state (csrc/aft_simple/aft_simple_state.h; the binding aft_simple_cuda.cpp): causal
# calls run the state launchers, the per-(b, c) pieces the binding does with ATen are done here with torch.
def _state_safe(m):
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _empty_state(B, D, dt):
    s = torch.zeros(B, 3, D, dtype=dt)
    s[:, 0] = float("-inf")
    return s


def aft_simple_state_fwd(q, k, v, causal, initial_state):
    B, T, D = q.shape
    acc = _acc(q.dtype)
    if not causal:
        y, lse = aft_simple_fwd(q, k, v, False)
        if T == 0:
            return y, lse, _empty_state(B, D, acc)
        ka, va = k.to(acc), v.to(acc)
        m = ka.max(1).values
        e = torch.exp(ka - _state_safe(m)[:, None])
        return y, lse, torch.stack([m, (e * va).sum(1), e.sum(1)], 1)
    s0 = None if initial_state is None else _c(initial_state)
    if T == 0 or B * D == 0:
        sF = s0.clone() if s0 is not None else _empty_state(B, D, acc)
        return torch.empty_like(q), torch.empty(q.shape, dtype=acc), sF
    q, k, v = _c(q), _c(k), _c(v)
    dt = DTYPE[q.dtype]
    ws = library().raw("emu_aft_simple_state_fwd_ws", dt, B, T, D)
    r = _call(
        "emu_aft_simple_state_fwd",
        dt,
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        None if s0 is None else emu.In("initial_state", s0),
        emu.Out("y", torch.empty_like(q)),
        emu.Out("lse", torch.empty(q.shape, dtype=acc)),
        emu.Out("final_state", torch.empty(B, 3, D, dtype=acc)),
        B,
        T,
        D,
        emu.Scratch("workspace", ws),
    )
    return r.outputs["y"], r.outputs["lse"], r.outputs["final_state"]


def aft_simple_state_bwd(dy, dfinal_state, q, k, v, initial_state, y, lse, final_state, causal):
    B, T, D = q.shape
    acc = _acc(q.dtype)
    sF = final_state.to(acc)
    gF = None if dfinal_state is None else _c(dfinal_state.to(acc))
    s0 = None if initial_state is None else _c(initial_state.to(acc))
    g0 = torch.zeros(B, 3, D, dtype=acc)
    if not causal:
        dq, dk, dv = aft_simple_bwd(dy, q, k, v, y, lse, False)
        if gF is not None and T > 0:
            ka, va = k.to(acc), v.to(acc)
            P = torch.exp(ka - _state_safe(sF[:, 0])[:, None])
            gn, gd = gF[:, 1:2], gF[:, 2:3]
            dk = (dk.to(acc) + P * (va * gn + gd)).to(q.dtype)
            dv = (dv.to(acc) + P * gn).to(q.dtype)
    elif T == 0 or B * D == 0:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if s0 is not None and gF is not None:
            g0 = gF.clone()
    else:
        q, k, v = _c(q), _c(k), _c(v)
        dt = DTYPE[q.dtype]
        ps = None if gF is None else torch.stack([sF[:, 0], gF[:, 1], -gF[:, 2]], 1).contiguous()
        ws = library().raw("emu_aft_simple_state_bwd_ws", dt, B, T, D)
        outs = [emu.Out(n, torch.empty_like(q)) for n in ("dq", "dk", "dv")]
        r = _call(
            "emu_aft_simple_state_bwd",
            dt,
            emu.In("dy", _c(dy.to(q.dtype))),
            emu.In("q", q),
            emu.In("k", k),
            emu.In("v", v),
            emu.In("y", _c(y.to(q.dtype))),
            emu.In("lse", _c(lse.to(acc))),
            None if ps is None else emu.In("final_query", ps),
            None if s0 is None else emu.In("initial_state", s0),
            *outs,
            emu.Out("key_sums", torch.zeros(B, 2, D, dtype=acc)),
            B,
            T,
            D,
            emu.Scratch("workspace", ws),
        )
        dq, dk, dv = (r.outputs[n] for n in ("dq", "dk", "dv"))
        if s0 is not None:
            gn, gd = r.outputs["key_sums"][:, 0], -r.outputs["key_sums"][:, 1]
            g0 = torch.stack([s0[:, 1] * gn + s0[:, 2] * gd, gn, gd], 1)
    if gF is not None and T > 0:  # the max's own gradient to its first argmax (aft_simple_state.h)
        mF = sF[:, 0]
        res = gF[:, 0] - sF[:, 1] * gF[:, 1] - sF[:, 2] * gF[:, 2]
        live = torch.isfinite(mF)
        to_state = live & (s0[:, 0] == mF) if s0 is not None else torch.zeros_like(live)
        if s0 is not None:
            g0[:, 0] += torch.where(to_state, res, torch.zeros_like(res))
        idx = (k.to(acc) == mF[:, None]).to(torch.uint8).argmax(1, keepdim=True)
        dka = dk.to(acc).clone()
        dka.scatter_add_(1, idx, torch.where(live & ~to_state, res, torch.zeros_like(res))[:, None])
        dk = dka.to(q.dtype)
    return dq, dk, dv, g0


# ------------------------------------------------------------------------------------------------ aft_local
def _local_w(w, q):
    """w as the launcher reads it: (heads, T, T) or banded (heads, T, 2W-1), contiguous, in q's dtype."""
    heads = 1 if w.dim() == 2 else w.shape[0]
    return _c(w.to(q.dtype)).reshape(heads, q.shape[1], w.shape[-1]), heads


def aft_local_fwd(q, k, v, w, window, causal, banded=False):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    wc, heads = _local_w(w, q)
    dt = DTYPE[q.dtype]
    ws = library().raw("emu_aft_local_fwd_ws", dt, B, T, D, heads, int(window), bool(causal))
    r = _call(
        "emu_aft_local_fwd",
        dt,
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.In("w", wc),
        emu.Out("y", torch.empty_like(q)),
        emu.Out("lse", torch.empty(q.shape, dtype=_acc(q.dtype))),
        B,
        T,
        D,
        heads,
        int(window),
        bool(causal),
        bool(banded),
        emu.Scratch("workspace", ws),
    )
    return r.outputs["y"], r.outputs["lse"]


def aft_local_bwd(dy, q, k, v, w, y, lse, window, causal, banded=False):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    wc, heads = _local_w(w, q)
    dt = DTYPE[q.dtype]
    ws = library().raw("emu_aft_local_bwd_ws", dt, B, T, D, heads, int(window), bool(causal))
    outs = [emu.Out(n, torch.empty_like(q)) for n in ("dq", "dk", "dv")]
    # dw in w's layout (banded: no T x T buffer anywhere); the launcher writes the band only (aft_local.h), the
    # binding zero-fills it
    outs.append(emu.InOut("dw", torch.zeros_like(wc)))
    r = _call(
        "emu_aft_local_bwd",
        dt,
        emu.In("dy", _c(dy.to(q.dtype))),
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.In("w", wc),
        emu.In("y", _c(y.to(q.dtype))),
        emu.In("lse", _c(lse.to(_acc(q.dtype)))),
        *outs,
        B,
        T,
        D,
        heads,
        int(window),
        bool(causal),
        bool(banded),
        emu.Scratch("workspace", ws),
    )
    return (r.outputs["dq"], r.outputs["dk"], r.outputs["dv"], r.outputs["dw"].view(w.shape).to(w.dtype))


# ------------------------------------------------------------------------------------------------ aft_full
def _bias(w, qdt):
    return _c(w if w.dtype in (qdt, _acc(qdt)) else w.to(_acc(qdt)))


def aft_full_fwd(q, k, v, w, causal):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    wc = _bias(w, q.dtype)
    heads = 1 if wc.dim() == 2 else wc.shape[0]
    dt, ex = DTYPE[q.dtype], _exact()
    ws = library().raw("emu_aft_full_fwd_ws", dt, B, T, D, heads, bool(causal), ex)
    r = _call(
        "emu_aft_full_fwd",
        dt,
        DTYPE[wc.dtype],
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.In("w", wc),
        emu.Out("y", torch.empty_like(q)),
        emu.Out("lse", torch.empty(q.shape, dtype=_acc(q.dtype))),
        B,
        T,
        D,
        heads,
        bool(causal),
        ex,
        _tf32x3(),
        emu.Scratch("workspace", ws),
    )
    return r.outputs["y"], r.outputs["lse"]


def aft_full_bwd(dy, q, k, v, w, y, lse, causal):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    wc = _bias(w, q.dtype)
    heads = 1 if wc.dim() == 2 else wc.shape[0]
    dt, ex = DTYPE[q.dtype], _exact()
    ws = library().raw("emu_aft_full_bwd_ws", dt, B, T, D, heads, bool(causal), ex)
    outs = [emu.Out(n, torch.empty_like(q)) for n in ("dq", "dk", "dv")] + [emu.Out("dw", torch.empty_like(wc))]
    r = _call(
        "emu_aft_full_bwd",
        dt,
        DTYPE[wc.dtype],
        emu.In("dy", _c(dy.to(q.dtype))),
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.In("w", wc),
        emu.In("y", _c(y.to(q.dtype))),
        emu.In("lse", _c(lse.to(_acc(q.dtype)))),
        *outs,
        B,
        T,
        D,
        heads,
        bool(causal),
        ex,
        emu.Scratch("workspace", ws),
    )
    return r.outputs["dq"], r.outputs["dk"], r.outputs["dv"], r.outputs["dw"].to(w.dtype)


def aft_full_lowrank_fwd(q, k, v, u, vb, causal):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    uc, vbc = _bias(u, q.dtype), _bias(vb, q.dtype)
    heads = 1 if uc.dim() == 2 else uc.shape[0]
    rank = uc.shape[-1]
    dt, ex = DTYPE[q.dtype], _exact()
    ws = library().raw("emu_aft_full_lowrank_fwd_ws", dt, B, T, D, heads, rank, bool(causal), ex)
    r = _call(
        "emu_aft_full_lowrank_fwd",
        dt,
        DTYPE[uc.dtype],
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.In("u", uc),
        emu.In("vb", vbc),
        emu.Out("y", torch.empty_like(q)),
        emu.Out("lse", torch.empty(q.shape, dtype=_acc(q.dtype))),
        B,
        T,
        D,
        heads,
        rank,
        bool(causal),
        ex,
        _tf32x3(),
        emu.Scratch("workspace", ws),
    )
    return r.outputs["y"], r.outputs["lse"]


def aft_full_lowrank_bwd(dy, q, k, v, u, vb, y, lse, causal):
    q, k, v = _c(q), _c(k), _c(v)
    B, T, D = q.shape
    uc, vbc = _bias(u, q.dtype), _bias(vb, q.dtype)
    heads = 1 if uc.dim() == 2 else uc.shape[0]
    rank = uc.shape[-1]
    dt, ex = DTYPE[q.dtype], _exact()
    ws = library().raw("emu_aft_full_lowrank_bwd_ws", dt, B, T, D, heads, rank, bool(causal), ex)
    outs = [emu.Out(n, torch.empty_like(q)) for n in ("dq", "dk", "dv")]
    outs += [emu.Out("du", torch.empty_like(uc)), emu.Out("dvb", torch.empty_like(vbc))]
    r = _call(
        "emu_aft_full_lowrank_bwd",
        dt,
        DTYPE[uc.dtype],
        emu.In("dy", _c(dy.to(q.dtype))),
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        emu.In("u", uc),
        emu.In("vb", vbc),
        emu.In("y", _c(y.to(q.dtype))),
        emu.In("lse", _c(lse.to(_acc(q.dtype)))),
        *outs,
        B,
        T,
        D,
        heads,
        rank,
        bool(causal),
        ex,
        emu.Scratch("workspace", ws),
    )
    return (
        r.outputs["dq"],
        r.outputs["dk"],
        r.outputs["dv"],
        r.outputs["du"].to(u.dtype),
        r.outputs["dvb"].to(vb.dtype),
    )


# ------------------------------------------------------------------------------------------------ ea_double_norm
def _mns(lc):
    S, N = lc.shape[-1], lc.shape[-2]
    M = lc.numel() // (N * S) if N * S else 0
    return M, N, S


def ea_double_norm_fwd(logits, eps):
    lc = _c(logits)
    M, N, S = _mns(lc)
    acc = _acc(lc.dtype)
    lse_shape = lc.shape[:-2] + (1, S)
    rs_shape = lc.shape[:-1] + (1,)
    if lc.numel() == 0:
        return torch.empty_like(lc), torch.zeros(lse_shape, dtype=acc), torch.zeros(rs_shape, dtype=acc)
    dt = DTYPE[lc.dtype]
    ws = library().raw("emu_ea_double_norm_fwd_ws", dt, M, N, S)
    r = _call(
        "emu_ea_double_norm_fwd",
        dt,
        emu.In("logits", lc),
        emu.Out("out", torch.empty_like(lc)),
        emu.Out("lse", torch.empty(lse_shape, dtype=acc)),
        emu.Out("rowsum", torch.empty(rs_shape, dtype=acc)),
        M,
        N,
        S,
        float(eps),
        emu.Scratch("workspace", ws),
    )
    return r.outputs["out"], r.outputs["lse"], r.outputs["rowsum"]


def ea_double_norm_bwd(dout, logits, out, lse, rowsum):
    lc = _c(logits)
    M, N, S = _mns(lc)
    acc = _acc(lc.dtype)
    if lc.numel() == 0:
        return torch.empty_like(lc)
    dt = DTYPE[lc.dtype]
    ws = library().raw("emu_ea_double_norm_bwd_ws", dt, M, N, S)
    r = _call(
        "emu_ea_double_norm_bwd",
        dt,
        emu.In("dout", _c(dout.to(lc.dtype))),
        emu.In("logits", lc),
        emu.In("out", _c(out.to(lc.dtype))),
        emu.In("lse", _c(lse.to(acc))),
        emu.In("rowsum", _c(rowsum.to(acc))),
        emu.Out("dlogits", torch.empty_like(lc)),
        M,
        N,
        S,
        emu.Scratch("workspace", ws),
    )
    return r.outputs["dlogits"]


_KERNELS = {name: fn for name, fn in list(globals().items()) if name.endswith(("_fwd", "_bwd")) and callable(fn)}

# The bindings' input checks (common/checks.h, shared by the CPU and CUDA bindings) are not emulated: with
# VALIDATE on (the default) the compiled CPU op runs first on the same inputs, so bad inputs raise the bindings'
# errors; ops without a CPU kernel (aft_full_lowrank) are not checked. benchmarks/cost_model.py turns it off.
VALIDATE = True


def _validated(name, fn):
    def call(*args):
        if VALIDATE:
            try:
                from attnfree_ext.ops.common import dispatch

                has_cpu = dispatch.compiled_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"attnfree::{name}", "CPU"
                )
            except RuntimeError:
                has_cpu = False
            if has_cpu:
                getattr(torch.ops.attnfree, name)(*args)
        return fn(*args)

    call.__name__ = name
    return call


OPS = {name: _validated(name, fn) for name, fn in _KERNELS.items()}
