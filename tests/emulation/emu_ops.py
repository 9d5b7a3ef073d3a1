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
    "csrc/aft_local/aft_local_tc.cu",
    "csrc/aft_local/aft_local_tc_bwd.cu",
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
# Packed sequences (cu_seqlens, csrc/aft_simple/aft_simple.h): the launchers get (N, a bound on the longest
# sequence) and the int64 offsets, as the binding aft_simple_cuda.cpp passes them.
def _grid(q, cu_seqlens, max_seqlen):
    """(B, T, offsets In or None) for the launchers."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[1], None
    cu = cu_seqlens.to(torch.int64).contiguous()
    T = q.shape[1] if max_seqlen is None else int(max_seqlen)
    return cu.numel() - 1, T, emu.In("cu_seqlens", cu)


def _spans(cu_seqlens):
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))


def aft_simple_fwd(q, k, v, causal, cu_seqlens=None, max_seqlen=None):
    q, k, v = _c(q), _c(k), _c(v)
    _, _, D = q.shape
    B, T, cu = _grid(q, cu_seqlens, max_seqlen)
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
        cu,
    )
    return r.outputs["y"], r.outputs["lse"]


def aft_simple_bwd(dy, q, k, v, y, lse, causal, cu_seqlens=None, max_seqlen=None):
    q, k, v = _c(q), _c(k), _c(v)
    _, _, D = q.shape
    B, T, cu = _grid(q, cu_seqlens, max_seqlen)
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
        cu,
    )
    return tuple(r.outputs[n] for n in ("dq", "dk", "dv"))


# aft_simple with a recurrent state (csrc/aft_simple/aft_simple_state.h; the binding aft_simple_cuda.cpp): causal
# calls run the state launchers, the per-(b, c) pieces the binding does with ATen are done here with torch (per
# sequence when packed).
def _state_safe(m):
    return torch.where(torch.isneginf(m), torch.zeros_like(m), m)


def _empty_state(B, D, dt):
    s = torch.zeros(B, 3, D, dtype=dt)
    s[:, 0] = float("-inf")
    return s


def _global_state(k, v, acc):
    ka, va = k.to(acc), v.to(acc)
    if ka.shape[1] == 0:
        return _empty_state(ka.shape[0], ka.shape[2], acc)
    m = ka.max(1).values
    e = torch.exp(ka - _state_safe(m)[:, None])
    return torch.stack([m, (e * va).sum(1), e.sum(1)], 1)


def aft_simple_state_fwd(q, k, v, causal, initial_state, cu_seqlens=None, max_seqlen=None):
    B, T, D = q.shape
    acc = _acc(q.dtype)
    if not causal:
        y, lse = aft_simple_fwd(q, k, v, False, cu_seqlens, max_seqlen)
        if cu_seqlens is None:
            return y, lse, _global_state(k, v, acc)
        return y, lse, torch.cat([_global_state(k[:, a:b], v[:, a:b], acc) for a, b in _spans(cu_seqlens)])
    ns, Tg, cu = _grid(q, cu_seqlens, max_seqlen)
    s0 = None if initial_state is None else _c(initial_state)
    if T == 0 or Tg == 0 or ns * D == 0:
        sF = s0.clone() if s0 is not None else _empty_state(ns, D, acc)
        return torch.empty_like(q), torch.empty(q.shape, dtype=acc), sF
    q, k, v = _c(q), _c(k), _c(v)
    dt = DTYPE[q.dtype]
    ws = library().raw("emu_aft_simple_state_fwd_ws", dt, ns, Tg, D)
    r = _call(
        "emu_aft_simple_state_fwd",
        dt,
        emu.In("q", q),
        emu.In("k", k),
        emu.In("v", v),
        None if s0 is None else emu.In("initial_state", s0),
        emu.Out("y", torch.empty_like(q)),
        emu.Out("lse", torch.empty(q.shape, dtype=acc)),
        emu.Out("final_state", torch.empty(ns, 3, D, dtype=acc)),
        ns,
        Tg,
        D,
        emu.Scratch("workspace", ws),
        cu,
    )
    return r.outputs["y"], r.outputs["lse"], r.outputs["final_state"]


def _route_max_residual(dk, k, sF, gF, s0, g0, acc):
    """The max's own gradient to its first argmax (aft_simple_state.h); k, dk (B, T, D), states (B, 3, D)."""
    mF = sF[:, 0]
    res = gF[:, 0] - sF[:, 1] * gF[:, 1] - sF[:, 2] * gF[:, 2]
    live = torch.isfinite(mF)
    to_state = live & (s0[:, 0] == mF) if s0 is not None else torch.zeros_like(live)
    if s0 is not None:
        g0[:, 0] += torch.where(to_state, res, torch.zeros_like(res))
    if k.shape[1] == 0:
        return dk
    idx = (k.to(acc) == mF[:, None]).to(torch.uint8).argmax(1, keepdim=True)
    dka = dk.to(acc).clone()
    dka.scatter_add_(1, idx, torch.where(live & ~to_state, res, torch.zeros_like(res))[:, None])
    return dka.to(dk.dtype)


def aft_simple_state_bwd(
    dy, dfinal_state, q, k, v, initial_state, y, lse, final_state, causal, cu_seqlens=None, max_seqlen=None
):
    B, T, D = q.shape
    acc = _acc(q.dtype)
    ns, Tg, cu = _grid(q, cu_seqlens, max_seqlen)
    sF = final_state.to(acc)
    gF = None if dfinal_state is None else _c(dfinal_state.to(acc))
    s0 = None if initial_state is None else _c(initial_state.to(acc))
    g0 = torch.zeros(ns, 3, D, dtype=acc)
    if not causal:
        dq, dk, dv = aft_simple_bwd(dy, q, k, v, y, lse, False, cu_seqlens, max_seqlen)
        if gF is not None and T > 0:
            spans = [(0, T)] if cu_seqlens is None else _spans(cu_seqlens)
            dk, dv = dk.to(acc).clone(), dv.to(acc).clone()
            for n, (a, b) in enumerate(spans):
                sl = slice(n, n + 1) if cu_seqlens is not None else slice(None)
                ka, va = k[:, a:b].to(acc), v[:, a:b].to(acc)
                P = torch.exp(ka - _state_safe(sF[sl, 0])[:, None])
                gn, gd = gF[sl, 1:2], gF[sl, 2:3]
                dk[:, a:b] += P * (va * gn + gd)
                dv[:, a:b] += P * gn
            dk, dv = dk.to(q.dtype), dv.to(q.dtype)
    elif T == 0 or Tg == 0 or ns * D == 0:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if s0 is not None and gF is not None:
            g0 = gF.clone()
    else:
        q, k, v = _c(q), _c(k), _c(v)
        dt = DTYPE[q.dtype]
        ps = None if gF is None else torch.stack([sF[:, 0], gF[:, 1], -gF[:, 2]], 1).contiguous()
        ws = library().raw("emu_aft_simple_state_bwd_ws", dt, ns, Tg, D)
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
            emu.Out("key_sums", torch.zeros(ns, 2, D, dtype=acc)),
            ns,
            Tg,
            D,
            emu.Scratch("workspace", ws),
            cu,
        )
        dq, dk, dv = (r.outputs[n] for n in ("dq", "dk", "dv"))
        if s0 is not None:
            gn, gd = r.outputs["key_sums"][:, 0], -r.outputs["key_sums"][:, 1]
            g0 = torch.stack([s0[:, 1] * gn + s0[:, 2] * gd, gn, gd], 1)
    if gF is not None and T > 0:
        if cu_seqlens is None:
            dk = _route_max_residual(dk, k, sF, gF, s0, g0, acc)
        else:
            dk = dk.clone()
            for n, (a, b) in enumerate(_spans(cu_seqlens)):
                sl = slice(n, n + 1)
                g0n = g0[sl].clone()
                dk[:, a:b] = _route_max_residual(
                    dk[:, a:b], k[:, a:b], sF[sl], gF[sl], None if s0 is None else s0[sl], g0n, acc
                )
                g0[sl] = g0n
    if cu_seqlens is not None and s0 is not None and T > 0:  # an empty sequence passes its state through
        for n, (a, b) in enumerate(_spans(cu_seqlens)):
            if a == b:
                g0[n] = gF[n] if gF is not None else 0
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
