"""Registration-level tests of the compiled ops: torch.library.opcheck, torch.compile(fullgraph=True),
the C++ input checks (TORCH_CHECKs, same messages as attnfree_ext/_checks.py), and attnfree_ext._backend."""
from __future__ import annotations

import pytest
import torch

from test_compiled_common import OPS, _backend, maxabs, rand  # noqa: F401  (skips without attnfree_ext._C)

B, T, D, H, W = 2, 7, 4, 2, 3


def _qkvw(dtype=torch.float64, rg=False):
    q, k, v = (rand(B, T, D, dtype=dtype) for _ in range(3))
    w = rand(H, T, T, dtype=dtype)
    if rg:
        q, k, v, w = (x.requires_grad_() for x in (q, k, v, w))
    return q, k, v, w


def _opcheck_cases():
    cases = []
    for dtype in (torch.float64, torch.float32):
        for causal in (False, True):
            q, k, v, w = _qkvw(dtype, rg=True)
            y, lse = (t.detach() for t in OPS.aft_full_fwd(q, k, v, w, causal))
            dy = rand(B, T, D, dtype=dtype)
            cases += [
                ("aft_full_fwd", (q, k, v, w, causal)),
                ("aft_full_bwd", (dy, q.detach(), k.detach(), v.detach(), w.detach(), y, lse, causal)),
            ]
            y, lse = (t.detach() for t in OPS.aft_local_fwd(q, k, v, w, W, causal))
            cases += [
                ("aft_local_fwd", (q, k, v, w, W, causal)),
                ("aft_local_bwd", (dy, q.detach(), k.detach(), v.detach(), w.detach(), y, lse, W, causal)),
            ]
            y, lse = (t.detach() for t in OPS.aft_simple_fwd(q, k, v, causal))
            cases += [
                ("aft_simple_fwd", (q, k, v, causal)),
                ("aft_simple_bwd", (dy, q.detach(), k.detach(), v.detach(), y, lse, causal)),
            ]
        x = rand(3, 5, 6, dtype=dtype).requires_grad_()
        out, lse, rs = (t.detach() for t in OPS.ea_double_norm_fwd(x, 1e-9))
        cases += [
            ("ea_double_norm_fwd", (x, 1e-9)),
            ("ea_double_norm_bwd", (rand(3, 5, 6, dtype=dtype), x.detach(), out, lse, rs)),
        ]
    return cases


_CASES = _opcheck_cases()


@pytest.mark.parametrize("idx", range(len(_CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(_CASES)])
def test_opcheck(idx):
    name, args = _CASES[idx]
    torch.library.opcheck(getattr(OPS, name).default, args)


def test_every_schema_registered():
    for op in ("aft_full", "aft_local", "aft_simple", "ea_double_norm", "aft_full_lowrank"):
        for suffix in ("_fwd", "_bwd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"attnfree::{op}{suffix}", "Meta") or hasattr(
                OPS, op + suffix
            )
    # CUDA-only op: schema present, no CPU kernel
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("attnfree::aft_full_lowrank_fwd", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("attnfree::aft_full_fwd", "CPU")


def _f_full(q, k, v, w):
    return OPS.aft_full_fwd(q, k, v, w, True)[0].sum()


def _f_local(q, k, v, w):
    return OPS.aft_local_fwd(q, k, v, w, W, False)[0].sum()


def _f_simple(q, k, v, w):
    return OPS.aft_simple_fwd(q, k, v, True)[0].sum()


def _f_ea(q, k, v, w):
    return OPS.ea_double_norm_fwd(q * 2, 1e-9)[0].square().sum()


@pytest.mark.parametrize("fn", [_f_full, _f_local, _f_simple, _f_ea], ids=["full", "local", "simple", "ea"])
def test_torch_compile_fullgraph(fn):
    torch._dynamo.reset()
    q, k, v, w = _qkvw(torch.float32, rg=True)
    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = cfn(q, k, v, w)
    g = torch.autograd.grad(out, (q,))[0]
    out_e = fn(q, k, v, w)
    g_e = torch.autograd.grad(out_e, (q,))[0]
    assert maxabs(out, out_e) < 1e-5 and maxabs(g, g_e) < 1e-5


# ------------------------------------------------------------------ bad inputs reach the C++ checks
def _bad_cases():
    q, k, v, w = _qkvw(torch.float32)
    qi = q.to(torch.int64)
    return [
        (lambda: OPS.aft_full_fwd(qi, k, v, w, False), TypeError, "q must be float16, bfloat16, float32 or float64, got torch.int64"),
        (lambda: OPS.aft_simple_fwd(q[0], k, v, False), ValueError, "q must have 3 dimensions, got shape (7, 4)"),
        (lambda: OPS.aft_simple_fwd(q, k[:, :5], v, False), ValueError, "k must have the shape of q (2, 7, 4), got (2, 5, 4)"),
        (lambda: OPS.aft_simple_fwd(q, k.double(), v, False), TypeError, "q, k and v must share one dtype, got torch.float32, torch.float64, torch.float32"),
        (lambda: OPS.aft_full_fwd(q, k, v, w[:, :5, :5], False), ValueError, "w must have shape (T, T) or (heads, T, T) with T=7, got (2, 5, 5)"),
        (lambda: OPS.aft_full_fwd(q, k, v, rand(3, T, T, dtype=torch.float32), False), ValueError, "w has 3 heads but D=4 is not divisible by it (D % heads must be 0)"),
        (lambda: OPS.aft_full_fwd(q, k, v, w.double(), False), TypeError, "w must have the dtype of q (torch.float32), got torch.float64"),
        (lambda: OPS.aft_local_fwd(q, k, v, w, 0, False), ValueError, "window must be >= 1, got 0"),
        (lambda: OPS.aft_local_fwd(q, k, v, w.double(), 2, False), TypeError, "w must have q's dtype torch.float32, got torch.float64"),
        (lambda: OPS.aft_local_bwd(q[:, :3], q, k, v, w, q, q, 2, False), ValueError, "dy must have the shape of q (2, 7, 4), got (2, 3, 4)"),
        (lambda: OPS.aft_simple_bwd(q, q, k, v, q, q[..., :2], False), ValueError, "lse must have the shape of q (2, 7, 4), got (2, 7, 2)"),
        (lambda: OPS.ea_double_norm_fwd(q[0, 0], 1e-9), ValueError, "logits must have at least 2 dimensions (..., N, S), got shape (4,)"),
        (lambda: OPS.ea_double_norm_fwd(q, -1.0), ValueError, "eps must be a finite float >= 0, got -1"),
        (lambda: OPS.ea_double_norm_fwd(qi, 1e-9), TypeError, "logits must be float16, bfloat16, float32 or float64, got torch.int64"),
        (lambda: OPS.ea_double_norm_bwd(q[:1], q, q, q[:, :1], q[..., :1]), ValueError, "dout must have the shape of logits (2, 7, 4), got (1, 7, 4)"),
    ]


_BAD = _bad_cases()


@pytest.mark.parametrize("idx", range(len(_BAD)))
def test_bad_inputs_reach_cpp_checks(idx):
    fn, exc, msg = _BAD[idx]
    with pytest.raises(exc) as info:
        fn()
    assert msg in str(info.value)


# ------------------------------------------------------------------ backend selection
def test_backend_select_and_force():
    q, k, v, w = _qkvw(torch.float32)
    assert _backend.compiled_available()
    assert _backend.select("aft_full", q, k, v, w) in ("compiled", "python")
    with _backend.force_backend("python"):
        assert _backend.select("aft_full", q, k, v, w) == "python"
        info = _backend.backend_info("aft_full", q, k, v, w)
        assert info["selected"] == "python" and "forced" in info["reasons"]["compiled"][0]
    with _backend.force_backend("compiled"):
        assert _backend.select("aft_full", q, k, v, w) == "compiled"
        # CUDA-only op has no CPU kernel: forcing compiled raises and lists the reason
        with pytest.raises(RuntimeError, match="no compiled kernel for attnfree::aft_full_lowrank_fwd"):
            _backend.select("aft_full_lowrank", q, k, v, w[0], w[0])
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            _backend.select("aft_simple", q.int(), k, v)
    info = _backend.backend_info("aft_full_lowrank", q, k, v, w[0], w[0])
    assert info["selected"] == "python" and info["reasons"]["compiled"]
    assert "compiled skipped" in info["summary"]
    info = _backend.backend_info("aft_local", q, k, v, w)
    assert info["selected"] == "compiled" and info["reasons"]["compiled"] == []


def test_backend_env_var(monkeypatch):
    q, k, v, w = _qkvw(torch.float32)
    monkeypatch.setenv("ATTNFREE_BACKEND", "python")
    assert _backend.select("aft_simple", q, k, v) == "python"
    monkeypatch.setenv("ATTNFREE_BACKEND", "compiled")
    assert _backend.select("aft_simple", q, k, v) == "compiled"
    monkeypatch.setenv("ATTNFREE_BACKEND", "bogus")
    with pytest.raises(ValueError):
        _backend.select("aft_simple", q, k, v)


def test_public_functions_use_compiled_path():
    """The public functions' compiled branch matches their python branch."""
    from attnfree_ext.ops.aft_local import aft_local
    from attnfree_ext.ops.aft_simple import aft_simple

    q, k, v, w = _qkvw(torch.float32, rg=True)
    with _backend.force_backend("compiled"):
        yc = aft_local(q, k, v, w, W, True) + aft_simple(q, k, v, False)
        gc = torch.autograd.grad(yc.sum(), (q, w))
    with _backend.force_backend("python"):
        yp = aft_local(q, k, v, w, W, True) + aft_simple(q, k, v, False)
        gp = torch.autograd.grad(yp.sum(), (q, w))
    assert maxabs(yc, yp) < 1e-5
    for a, b in zip(gc, gp):
        assert maxabs(a, b) < 1e-4


def test_public_function_torch_compile_fullgraph():
    """select() is traceable: a public function's compiled branch works under torch.compile(fullgraph=True)."""
    from attnfree_ext.ops.aft_simple import aft_simple

    torch._dynamo.reset()
    q, k, v, w = _qkvw(torch.float32, rg=True)
    f = torch.compile(lambda a, b, c: aft_simple(a, b, c, True), fullgraph=True, backend="aot_eager")
    with _backend.force_backend("compiled"):
        y = f(q, k, v)
        g = torch.autograd.grad(y.sum(), (k,))[0]
    y2 = OPS.aft_simple_fwd(q, k, v, True)[0]
    g2 = torch.autograd.grad(y2.sum(), (k,))[0]
    assert maxabs(y, y2) < 1e-6 and maxabs(g, g2) < 1e-6
