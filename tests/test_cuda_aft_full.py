"""CUDA kernels of AFT-full (csrc/cuda/aft_full.cu): forward/backward, causal and not, both w layouts, low rank.

Skipped unless a GPU is present and the CUDA kernels are registered. The ops are called directly
(torch.ops.attnfree.*), so these tests do not depend on the python dispatch/autograd registration.

Error measures: float64 / float32 use torch.testing.assert_close (max-abs + relative, elementwise);
bf16 / fp16 use max-abs error vs the float64 oracle, which must be <= 2x the max-abs error of plain eager
PyTorch computed in the same low dtype, + a small absolute floor (flash-attention's rule).
"""
from __future__ import annotations

import math

import pytest
import torch

import oracles

try:
    import attnfree_ext  # noqa: F401  (loads attnfree_ext._C when built)
except Exception:  # pragma: no cover
    attnfree_ext = None


def _has_cuda_kernel() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("attnfree::aft_full_fwd", "CUDA")
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _has_cuda_kernel(), reason="needs a GPU and the attnfree CUDA kernels")

DEV = "cuda"
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=5e-5, atol=5e-5)}


# ----------------------------------------------------------------------------------------------- helpers
def _ops():
    return torch.ops.attnfree


def _inputs(B, T, D, heads, dtype, wdim=3, scale=1.0, noncontig=False):
    q = torch.randn(B, T, D, dtype=torch.float64, device=DEV)
    k = torch.randn(B, T, D, dtype=torch.float64, device=DEV) * scale
    v = torch.randn(B, T, D, dtype=torch.float64, device=DEV)
    w = torch.randn(heads, T, T, dtype=torch.float64, device=DEV) * 0.5
    if wdim == 2:
        assert heads == 1
        w = w[0]
    q, k, v, w = (x.to(dtype) for x in (q, k, v, w))
    if noncontig:  # same values, non-contiguous storage
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        w = w.transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not q.is_contiguous()
    return q, k, v, w


def _oracle_lse(k, w, causal):
    k, w = k.double(), w.double()
    B, T, D = k.shape
    logits = oracles._bias_per_channel(w, D)[None] + k[:, None, :, :]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=k.device).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    return torch.logsumexp(logits, dim=2)


def _oracle_grads(q, k, v, w, dy, causal):
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, w)]
    y = oracles.aft(*leaves, causal=causal)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return y.detach(), grads


def _eager_low(q, k, v, w, causal):
    """Plain PyTorch in the inputs' own (low) dtype: the baseline of the 2x rule."""
    B, T, D = q.shape
    logits = oracles._bias_per_channel(w, D)[None].to(q.dtype) + k[:, None, :, :]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    p = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (p * v[:, None, :, :]).sum(dim=2)


def _poison(nbytes=256 << 20):
    """Fill a big freed block with NaN so that outputs the kernel forgets to write show up."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV)
    x.fill_(float("nan"))
    del x


class _AftFullOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, causal):
        y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
        ctx.save_for_backward(q, k, v, w, y, lse)
        ctx.causal = causal
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, w, y, lse = ctx.saved_tensors
        dq, dk, dv, dw = _ops().aft_full_bwd(dy.contiguous(), q, k, v, w, y, lse, ctx.causal)
        return dq, dk, dv, dw, None


class _AftLowRankOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, u, vb, causal):
        y, lse = _ops().aft_full_lowrank_fwd(q, k, v, u, vb, causal)
        ctx.save_for_backward(q, k, v, u, vb, y, lse)
        ctx.causal = causal
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, u, vb, y, lse = ctx.saved_tensors
        dq, dk, dv, du, dvb = _ops().aft_full_lowrank_bwd(dy.contiguous(), q, k, v, u, vb, y, lse, ctx.causal)
        return dq, dk, dv, du, dvb, None


SHAPES = [  # (B, T, D, heads)
    (1, 1, 1, 1),
    (2, 7, 3, 1),
    (1, 13, 8, 2),
    (2, 37, 16, 4),
    (1, 64, 64, 1),
    (2, 131, 24, 3),
    (1, 257, 8, 1),
    (3, 65, 130, 2),  # columns span batch entries, dh not a multiple of the column tile
]


# ----------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_oracle(shape, causal, dtype):
    B, T, D, heads = shape
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    _poison()
    y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
    assert y.dtype == dtype and y.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == q.shape
    torch.testing.assert_close(y.double(), oracles.aft(q, k, v, w, causal), **TOL[dtype])
    torch.testing.assert_close(lse.double(), _oracle_lse(k, w, causal), **TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_forward_2d_w_and_noncontiguous(causal):
    q, k, v, w = _inputs(2, 45, 20, 1, torch.float32, wdim=2, noncontig=True)
    y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
    torch.testing.assert_close(y.double(), oracles.aft(q, k, v, w, causal), **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), _oracle_lse(k, w, causal), **TOL[torch.float32])


@pytest.mark.parametrize("causal", [False, True])
def test_w_dtype_must_match_q(causal):
    # the same rule and message as the CPU op and the Python path
    q, k, v, w = _inputs(2, 70, 16, 2, torch.bfloat16)
    with pytest.raises(TypeError, match="w must have the dtype of q"):
        _ops().aft_full_fwd(q, k, v, w.float(), causal)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_env_matches_tensor_core(causal, monkeypatch):
    q, k, v, w = _inputs(2, 131, 40, 2, torch.float32)
    y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_EXACT", "1")
    ye, lsee = _ops().aft_full_fwd(q, k, v, w, causal)
    torch.testing.assert_close(y, ye, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, lsee, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_env_matches_tensor_core_backward(causal, dtype, monkeypatch):
    q, k, v, w = _inputs(2, 131, 40, 2, dtype)
    dy = torch.randn_like(q)
    y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
    got = _ops().aft_full_bwd(dy, q, k, v, w, y, lse, causal)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_EXACT", "1")
    exp = _ops().aft_full_bwd(dy, q, k, v, w, y, lse, causal)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.float(), e.float(), **tol)


def test_forward_matches_python_path_on_gpu():
    from attnfree_ext.ops import aft_full as ref

    for causal in (False, True):
        q, k, v, w = _inputs(2, 100, 12, 3, torch.float32)
        y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
        yr, lser = ref.aft_full_fwd_ref(q, k, v, w, causal)
        torch.testing.assert_close(y, yr, rtol=5e-5, atol=5e-5)
        torch.testing.assert_close(lse, lser.to(lse.dtype), rtol=5e-5, atol=5e-5)
        dy = torch.randn_like(y)
        got = _ops().aft_full_bwd(dy, q, k, v, w, y, lse, causal)
        exp = ref.aft_full_bwd_ref(dy, q, k, v, w, yr, lser, causal)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g, e.to(g.dtype), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 13, 8, 2), (2, 67, 12, 3), (1, 131, 4, 1)])
@pytest.mark.parametrize("wdim", [2, 3])
def test_backward_matches_oracle(shape, causal, dtype, wdim):
    B, T, D, heads = shape
    if wdim == 2 and heads != 1:
        pytest.skip("2-D w has one head")
    q, k, v, w = _inputs(B, T, D, heads, dtype, wdim=wdim)
    dy = torch.randn(B, T, D, dtype=dtype, device=DEV)
    y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
    _poison()
    dq, dk, dv, dw = _ops().aft_full_bwd(dy, q, k, v, w, y, lse, causal)
    assert dw.shape == w.shape and dw.dtype == w.dtype
    _, exp = _oracle_grads(q, k, v, w, dy, causal)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for g, e in zip((dq, dk, dv, dw), exp):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_gradcheck_float64(causal, heads):
    q, k, v, w = _inputs(2, 9, 4, heads, torch.float64)
    args = [x.clone().requires_grad_(True) for x in (q, k, v, w)]
    assert torch.autograd.gradcheck(lambda *a: _AftFullOp.apply(*a, causal), args, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- low precision
def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 16, 2), (1, 131, 64, 1), (2, 200, 24, 3)])
def test_low_precision_two_x_rule(shape, causal, dtype):
    B, T, D, heads = shape
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=dtype, device=DEV)
    y_ref, g_ref = _oracle_grads(q, k, v, w, dy, causal)
    floor = 1e-3
    # forward
    y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
    assert y.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, w)]
    y_low = _eager_low(*leaves, causal)
    assert _max_err(y, y_ref) <= 2 * _max_err(y_low, y_ref) + floor
    torch.testing.assert_close(lse.double(), _oracle_lse(k, w, causal), rtol=1e-2, atol=1e-2)
    # backward
    g_low = torch.autograd.grad(y_low, leaves, dy)
    got = _ops().aft_full_bwd(dy, q, k, v, w, y, lse, causal)
    for name, g, gl, ge in zip("q k v w".split(), got, g_low, g_ref):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert _max_err(g, ge) <= 2 * _max_err(gl, ge) + floor * max(1.0, ge.abs().max().item()), name


# ----------------------------------------------------------------------------------------------- adversarial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("what", ["k1e4", "w1e4", "late_spike"])
@pytest.mark.parametrize("T", [131, 257])
def test_adversarial_finite_and_accurate(what, causal, dtype, T):
    B, D, heads = 2, 8, 2
    q, k, v, w = (x.double() for x in _inputs(B, T, D, heads, torch.float64))
    if what == "k1e4":
        k = k * 1e4
    elif what == "w1e4":
        w = w * 2e4  # |w| up to ~1e4 and beyond; row and column maxima rarely coincide
    else:
        k[:, -3, :] += 3000.0
    q, k, v, w = (x.to(dtype) for x in (q, k, v, w))
    dy = torch.randn(B, T, D, dtype=dtype, device=DEV)
    _poison()
    y, lse = _ops().aft_full_fwd(q, k, v, w, causal)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    y_ref, g_ref = _oracle_grads(q, k, v, w, dy, causal)
    lse_ref = _oracle_lse(k, w, causal)
    if dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-9)
    elif dtype == torch.float32:
        tol = dict(rtol=2e-3, atol=2e-3)  # inputs ~1e4 are themselves quantised at ~1e-3 in float32
    else:
        tol = dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    lse_atol = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=lse_atol)
    grads = _ops().aft_full_bwd(dy, q, k, v, w, y, lse, causal)
    for g in grads:
        assert torch.isfinite(g).all()
    if dtype == torch.float64:
        for g, e in zip(grads, g_ref):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)


# ----------------------------------------------------------------------------------------------- low rank
def _factors(T, heads, rank, dtype, wdim=3):
    u = torch.randn(heads, T, rank, dtype=torch.float64, device=DEV) * 0.3
    vb = torch.randn(heads, T, rank, dtype=torch.float64, device=DEV) * 0.3
    if wdim == 2:
        u, vb = u[0], vb[0]
    return u.to(dtype), vb.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cfg", [(2, 37, 8, 1, 5, 2), (1, 131, 12, 3, 16, 3), (2, 70, 16, 2, 64, 3), (1, 20, 4, 1, 0, 2)])
# ranks <= 16 build w tiles on the fly in the forward, larger ranks materialise w = u vb^T once (fp64: always)
def test_lowrank_matches_oracle(cfg, causal, dtype):
    B, T, D, heads, rank, wdim = cfg
    q, k, v, _ = _inputs(B, T, D, 1, dtype)
    u, vb = _factors(T, heads, rank, dtype, wdim)
    w = u.double() @ vb.double().transpose(-1, -2)
    dy = torch.randn(B, T, D, dtype=dtype, device=DEV)
    _poison()
    y, lse = _ops().aft_full_lowrank_fwd(q, k, v, u, vb, causal)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, u, vb)]
    y_ref = oracles.aft(*leaves[:3], leaves[3] @ leaves[4].transpose(-1, -2), causal=causal)
    g_ref = torch.autograd.grad(y_ref, leaves, dy.double())
    got = _ops().aft_full_lowrank_bwd(dy, q, k, v, u, vb, y, lse, causal)
    assert got[3].shape == u.shape and got[4].shape == vb.shape and got[3].dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
        torch.testing.assert_close(y.double(), y_ref.detach(), rtol=5e-2, atol=5e-2)
        return
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    torch.testing.assert_close(lse.double(), _oracle_lse(k, w, causal), **tol)
    for g, e in zip(got, g_ref):
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_gradcheck_float64(causal):
    q, k, v, _ = _inputs(2, 9, 4, 1, torch.float64)
    u, vb = _factors(9, 2, 3, torch.float64)
    args = [x.clone().requires_grad_(True) for x in (q, k, v, u, vb)]
    assert torch.autograd.gradcheck(lambda *a: _AftLowRankOp.apply(*a, causal), args, atol=1e-7, rtol=1e-6)


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise():
    q, k, v, w = _inputs(1, 8, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="w"):
        _ops().aft_full_fwd(q, k, v, w[:, :4, :4], False)
    with pytest.raises(ValueError, match="heads"):
        _ops().aft_full_fwd(q, k, v, torch.randn(3, 8, 8, device=DEV), False)
    with pytest.raises(TypeError):
        _ops().aft_full_fwd(q, k.double(), v, w, False)
    with pytest.raises(ValueError, match="vb"):
        _ops().aft_full_lowrank_fwd(q, k, v, torch.randn(8, 2, device=DEV), torch.randn(8, 3, device=DEV), False)


def test_large_column_count_and_empty_batch():
    q, k, v, w = _inputs(0, 16, 8, 2, torch.float32)
    y, lse = _ops().aft_full_fwd(q, k, v, w, True)
    assert y.shape == q.shape
    dy = torch.randn_like(q)
    dq, dk, dv, dw = _ops().aft_full_bwd(dy, q, k, v, w, y, lse, True)
    assert (dw == 0).all()
    q, k, v, w = _inputs(4, 33, 300, 1, torch.bfloat16)
    y, _ = _ops().aft_full_fwd(q, k, v, w, False)
    assert torch.isfinite(y).all()
    assert math.isfinite(_max_err(y, oracles.aft(q, k, v, w)))
