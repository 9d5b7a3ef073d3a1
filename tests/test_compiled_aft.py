"""Compiled AFT ops (torch.ops.attnfree.aft_{full,local,simple}_{fwd,bwd}) vs the float64 oracles.

Errors are max-abs, relative to max(1, max|reference|). The module is skipped only when attnfree_ext._C is absent.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from test_compiled_common import (  # noqa: F401  (skips the module without attnfree_ext._C)
    OPS,
    call_bwd,
    call_fwd,
    eager_lowp,
    lse_oracle,
    maxabs,
    oracle,
    oracle_grads,
    oracle_wfull,
    rand,
)

AFT_OPS = ["aft_full", "aft_local", "aft_simple"]
# (B, T, D, heads, window)
SHAPES = [
    (2, 13, 6, 1, 3),
    (1, 1, 1, 1, 1),
    (1, 7, 1, 1, 2),
    (2, 37, 8, 2, 5),
    (1, 131, 4, 4, 9),  # prime T > 64
    (2, 9, 4, 1, 20),  # window > T
]


def _inputs(B, T, D, H, dtype, scale=1.0, wscale=1.0):
    q, k, v = (rand(B, T, D, dtype=dtype, scale=scale) for _ in range(3))
    w = rand(T, T, dtype=dtype, scale=wscale) if H == 1 else rand(H, T, T, dtype=dtype, scale=wscale)
    return q, k, v, w


def _check_all(op, q, k, v, w, window, causal, tol_y, tol_g, tol_lse=None):
    B, T, D = q.shape
    dy = rand(B, T, D, dtype=q.dtype)
    y, lse = call_fwd(op, q, k, v, w, window, causal)
    assert y.dtype == q.dtype and y.shape == q.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    yr, grads_r = oracle_grads(op, q, k, v, w, window, causal, dy)
    lr = lse_oracle(k, oracle_wfull(op, w, window, T, D), causal)
    grads = call_bwd(op, dy, q, k, v, w, y, lse, window, causal)
    assert len(grads) == len(grads_r)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    errs = {"y": maxabs(y, yr) / max(1.0, yr.abs().max().item())}
    errs["lse"] = maxabs(lse, lr) / max(1.0, lr.abs().max().item())
    for name, g, gr in zip(("dq", "dk", "dv", "dw"), grads, grads_r):
        assert g.dtype == gr.dtype if q.dtype == torch.float64 else True
        assert g.shape == gr.shape
        assert torch.isfinite(g).all(), name
        errs[name] = maxabs(g, gr) / max(1.0, gr.abs().max().item())
    assert errs["y"] <= tol_y, errs
    assert errs["lse"] <= (tol_lse if tol_lse is not None else tol_y), errs
    for name in ("dq", "dk", "dv", "dw"):
        if name in errs:
            assert errs[name] <= tol_g, (name, errs)
    return errs


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_float64_vs_oracle(op, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = _inputs(B, T, D, H, torch.float64)
    _check_all(op, q, k, v, w, window, causal, 1e-10, 1e-10)


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 13, 6, 1, 3), (1, 131, 4, 2, 9)])
def test_float32_vs_oracle(op, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = _inputs(B, T, D, H, torch.float32)
    _check_all(op, q, k, v, w, window, causal, 1e-5, 1e-5)


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_2x_rule(op, causal, dtype):
    """error(compiled, low dtype) <= 2 * error(eager PyTorch in that dtype) + 1e-3, both vs the float64 oracle."""
    B, T, D, H, window = 2, 29, 8, 2, 4
    q, k, v, w = _inputs(B, T, D, H, dtype)
    dy = rand(B, T, D, dtype=dtype)
    y, lse = call_fwd(op, q, k, v, w, window, causal)
    assert y.dtype == dtype and lse.dtype == torch.float32
    yr, grads_r = oracle_grads(op, q, k, v, w, window, causal, dy)
    ins = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    ye = eager_lowp(op, *ins, window, causal)
    ge = torch.autograd.grad(ye, ins if op != "aft_simple" else ins[:3], dy)
    assert maxabs(y, yr) <= 2 * maxabs(ye, yr) + 1e-3
    grads = call_bwd(op, dy, q, k, v, w, y, lse, window, causal)
    for name, g, gr, gre in zip(("dq", "dk", "dv", "dw"), grads, grads_r, ge):
        assert g.dtype == dtype
        assert maxabs(g, gr) <= 2 * maxabs(gre, gr) + 1e-3, name


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adversarial_magnitudes(op, causal, dtype):
    """|k|, |w| up to 1e4: finite everywhere and close to the oracle."""
    B, T, D, H, window = 2, 17, 4, 2, 3
    q, k, v, w = _inputs(B, T, D, H, dtype)
    k = (torch.rand(B, T, D, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    w = (torch.rand(*w.shape, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    _check_all(op, q, k, v, w, window, causal, tol, tol, tol_lse=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_late_spike(op, dtype):
    """One late key larger than every earlier key by >> 88: a split max gives 0/0; here all finite + exact."""
    B, T, D, H, window = 2, 70, 5, 1, 6
    q, k, v, w = _inputs(B, T, D, H, dtype)
    k = k.clone()
    k[:, T - 3, :] = 300.0
    k[1, T - 10, 2] = -300.0
    y, lse = call_fwd(op, q, k, v, w, window, True)
    dy = rand(B, T, D, dtype=dtype)
    grads = call_bwd(op, dy, q, k, v, w, y, lse, window, True)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads)
    yr, grads_r = oracle_grads(op, q, k, v, w, window, True, dy)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert maxabs(y, yr) <= tol
    for g, gr in zip(grads, grads_r):
        assert maxabs(g, gr) / max(1.0, gr.abs().max().item()) <= tol


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(op, causal):
    B, T, D, H, window = 2, 11, 6, 3, 3
    q, k, v = (rand(B, D, T).transpose(1, 2) for _ in range(3))
    w = rand(H, T, T).transpose(1, 2)
    assert not q.is_contiguous() and not w.is_contiguous()
    _check_all(op, q, k, v, w, window, causal, 1e-10, 1e-10)


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(op, causal):
    B, T, D, H, window = 2, 6, 4, 2, 2
    q, k, v, w = (x.requires_grad_() for x in _inputs(B, T, D, H, torch.float64))
    if op == "aft_simple":
        assert torch.autograd.gradcheck(lambda a, b, c: OPS.aft_simple_fwd(a, b, c, causal)[0], (q, k, v))
    elif op == "aft_local":
        assert torch.autograd.gradcheck(lambda a, b, c, d: OPS.aft_local_fwd(a, b, c, d, window, causal)[0],
                                        (q, k, v, w))
    else:
        assert torch.autograd.gradcheck(lambda a, b, c, d: OPS.aft_full_fwd(a, b, c, d, causal)[0], (q, k, v, w))


def test_local_window_limits_match_full_and_simple():
    """window >= T is aft_full; window == 1 with a zero diagonal is aft_simple."""
    B, T, D = 2, 12, 3
    q, k, v, w = _inputs(B, T, D, 1, torch.float64)
    for causal in (False, True):
        yl, ll = OPS.aft_local_fwd(q, k, v, w, T + 3, causal)
        yf, lf = OPS.aft_full_fwd(q, k, v, w, causal)
        assert maxabs(yl, yf) < 1e-14 and maxabs(ll, lf) < 1e-12
        w0 = w - torch.diag(torch.diagonal(w))
        yl1, _ = OPS.aft_local_fwd(q, k, v, w0, 1, causal)
        ys, _ = OPS.aft_simple_fwd(q, k, v, causal)
        assert maxabs(yl1, ys) < 1e-14


@pytest.mark.parametrize("op", AFT_OPS)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_python_ref(op, causal):
    """Same contract as the python path's <op>_fwd_ref / <op>_bwd_ref."""
    mod = importlib.import_module(f"attnfree_ext.ops.{op}")
    fwd_ref, bwd_ref = getattr(mod, f"{op}_fwd_ref"), getattr(mod, f"{op}_bwd_ref")
    B, T, D, H, window = 2, 19, 6, 2, 4
    q, k, v, w = _inputs(B, T, D, H, torch.float32)
    dy = rand(B, T, D, dtype=torch.float32)
    y, lse = call_fwd(op, q, k, v, w, window, causal)
    if op == "aft_simple":
        yr, lr = fwd_ref(q, k, v, causal)
        gr = bwd_ref(dy, q, k, v, yr, lr, causal)
    elif op == "aft_local":
        yr, lr = fwd_ref(q, k, v, w, window, causal)
        gr = bwd_ref(dy, q, k, v, w, yr, lr, window, causal)
    else:
        yr, lr = fwd_ref(q, k, v, w, causal)
        gr = bwd_ref(dy, q, k, v, w, yr, lr, causal)
    assert y.dtype == yr.dtype and lse.dtype == lr.dtype and lse.shape == lr.shape
    assert maxabs(y, yr) < 1e-5 and maxabs(lse, lr) < 1e-4
    g = call_bwd(op, dy, q, k, v, w, y, lse, window, causal)
    for a, b in zip(g, gr):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert maxabs(a, b) / max(1.0, b.abs().max().item()) < 1e-5


def test_autograd_through_fwd_op_float32():
    """torch.ops.attnfree.<op>_fwd(...)[0] is differentiable (register_autograd) and matches the oracle."""
    B, T, D, H, window = 2, 10, 4, 2, 3
    q, k, v, w = (x.requires_grad_() for x in _inputs(B, T, D, H, torch.float32))
    y = OPS.aft_local_fwd(q, k, v, w, window, True)[0]
    dy = rand(B, T, D, dtype=torch.float32)
    g = torch.autograd.grad(y, (q, k, v, w), dy)
    _, gr = oracle_grads("aft_local", q, k, v, w, window, True, dy)
    for a, b in zip(g, gr):
        assert maxabs(a, b) < 1e-5


# ------------------------------------------------------------ aft_full's tiled GEMM path (T > 64)
@pytest.fixture
def tiled_path(monkeypatch):
    """Force aft_full's factorised (tiled GEMM) forward even for narrow test shapes."""
    monkeypatch.setenv("ATTNFREE_AFT_FULL_PATH", "tiled")


@pytest.mark.usefixtures("tiled_path")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("T", [65, 131, 192])
def test_full_tiled_vs_oracle(causal, dtype, tol, T):
    q, k, v, w = _inputs(2, T, 4, 2, dtype)
    _check_all("aft_full", q, k, v, w, T, causal, tol, tol)


@pytest.mark.usefixtures("tiled_path")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_tiled_adversarial(causal, dtype):
    """|k|, |w| up to 1e4 on the factorised path: lost tiles must be caught by the exactness guard."""
    B, T, D = 2, 150, 3
    q = rand(B, T, D, dtype=dtype)
    v = rand(B, T, D, dtype=dtype)
    k = (torch.rand(B, T, D, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    w = (torch.rand(T, T, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    _check_all("aft_full", q, k, v, w, T, causal, tol, tol, tol_lse=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.usefixtures("tiled_path")
@pytest.mark.parametrize("causal", [False, True])
def test_full_tiled_split_max_trap(causal):
    """Row max of w and column max of k at different keys of one tile, 100 apart (the NOTES §2 failure bound)."""
    B, T, D = 1, 128, 2
    q, v = rand(B, T, D, dtype=torch.float32), rand(B, T, D, dtype=torch.float32)
    k = rand(B, T, D, dtype=torch.float32)
    w = rand(T, T, dtype=torch.float32)
    k[0, 70, :] = 100.0     # column max of k in tile 1 at key 70 ...
    w[:, 100] = 100.0       # ... row max of w in tile 1 at key 100: w[:, 70] + k[70] vs w[:, 100] + k[100]
    w[:, 70] = -60.0
    k[0, 100, :] = -60.0
    k[0, 90, :] = 30.0
    w[:, 90] = 30.0          # true dominant key 90 (logit 60) has Ew * X = exp(-70) * exp(-70): lost in float32
    _check_all("aft_full", q, k, v, w, T, causal, 1e-5, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_full_tiled_equals_exact_path(causal, monkeypatch):
    q, k, v, w = _inputs(4, 100, 48, 3, torch.float64)  # N = 4 * 16 = 64 columns per head: auto picks tiled
    dy = rand(*q.shape)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_PATH", "tiled")
    y1, l1 = OPS.aft_full_fwd(q, k, v, w, causal)
    g1 = OPS.aft_full_bwd(dy, q, k, v, w, y1, l1, causal)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_PATH", "exact")
    y2, l2 = OPS.aft_full_fwd(q, k, v, w, causal)
    g2 = OPS.aft_full_bwd(dy, q, k, v, w, y2, l2, causal)
    assert maxabs(y1, y2) < 1e-13 and maxabs(l1, l2) < 1e-12
    for a, b in zip(g1, g2):
        assert maxabs(a, b) < 1e-12 * max(1.0, b.abs().max().item())


@pytest.mark.usefixtures("tiled_path")
@pytest.mark.parametrize("causal", [False, True])
def test_full_tiled_gradcheck(causal):
    q, k, v, w = (x.requires_grad_() for x in _inputs(1, 70, 2, 2, torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c, d: OPS.aft_full_fwd(a, b, c, d, causal)[0], (q, k, v, w),
                                    fast_mode=True)
