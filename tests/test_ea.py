"""ea_double_norm (external attention's double normalisation) against the float64 oracle.

Errors are max-abs unless stated. Low precision: error vs the float64 oracle <= 2x the error of the plain-PyTorch
eager formula run in that same dtype, plus a tiny absolute floor (flash-attention's rule, BRIEF "Numerics").
"""
import math

import pytest
import torch

import oracles
from attnfree_ext import force_backend
from attnfree_ext.ops.ea import ea_double_norm, ea_double_norm_bwd_ref, ea_double_norm_fwd_ref

SHAPES = [(1, 1), (1, 5), (7, 1), (13, 3), (2, 7, 5), (2, 3, 37, 4), (1, 2, 1, 1)]
LOW = [torch.bfloat16, torch.float16]


def _oracle_grad(x, dout, eps):
    xd = x.detach().double().requires_grad_(True)
    out = oracles.ea_double_norm(xd, eps)
    (g,) = torch.autograd.grad(out, xd, dout.double())
    return out.detach(), g


def _ours(x, dout, eps, fn=ea_double_norm):
    xx = x.detach().clone().requires_grad_(True)
    out = fn(xx, eps)
    (g,) = torch.autograd.grad(out, xx, dout)
    return out.detach(), g


def _eager(x, eps):
    """Plain PyTorch in x's dtype (the External-Attention / EANet formula)."""
    p = x.softmax(dim=-2)
    return p / (p.sum(dim=-1, keepdim=True) + eps)


def _maxabs(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-9, 0.0, 0.5])
def test_float64_forward_backward(shape, eps):
    x = torch.randn(shape, dtype=torch.float64) * 3
    dout = torch.randn(shape, dtype=torch.float64)
    ref, gref = _oracle_grad(x, dout, eps)
    with force_backend("python"):
        out, g = _ours(x, dout, eps)
    assert out.dtype == torch.float64 and g.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_forward_backward(shape):
    x = torch.randn(shape) * 3
    dout = torch.randn(shape)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    with force_backend("python"):
        out, g = _ours(x, dout, 1e-9)
    assert out.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), gref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(2, 13, 5), (3, 37, 16), (1, 1, 4)])
def test_low_precision_two_x_rule(dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    dout = torch.randn(shape).to(dtype)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    with force_backend("python"):
        out, g = _ours(x, dout, 1e-9)
    assert out.dtype == dtype and g.dtype == dtype
    xe = x.detach().clone().requires_grad_(True)
    oe = _eager(xe, 1e-9)
    (ge,) = torch.autograd.grad(oe, xe, dout)
    floor = 1e-3 if dtype == torch.bfloat16 else 1e-4
    assert _maxabs(out, ref) <= 2 * _maxabs(oe, ref) + floor
    assert _maxabs(g, gref) <= 2 * _maxabs(ge, gref) + floor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_adversarial_large_logits(dtype, scale):
    """|logits| up to 1e4: finite forward and backward, matching the oracle (fp32: log-space rounding ~ scale*eps)."""
    x = (torch.randn(2, 11, 6, dtype=torch.float64) * scale).to(dtype)
    dout = torch.randn(2, 11, 6, dtype=dtype)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    with force_backend("python"):
        out, g = _ours(x, dout, 1e-9)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    tol = 1e-10 if dtype == torch.float64 else 4 * scale * torch.finfo(torch.float32).eps
    assert _maxabs(out, ref) <= tol
    assert _maxabs(g, gref) <= 10 * tol


def _logspace_oracle(x, eps):
    """float64, in log space: stays exact where p underflows (a token far below every column's maximum)."""
    x = x.double()
    z = x - torch.logsumexp(x, dim=-2, keepdim=True)
    log_s = torch.logsumexp(z, dim=-1, keepdim=True)
    log_r = log_s if eps == 0 else torch.logaddexp(log_s, torch.full_like(log_s, math.log(eps)))
    return torch.exp(z - log_r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_eps0_underflowed_row_is_finite(dtype):
    """eps = 0 (External-Attention-pytorch): a token 1e4 below the others has p = 0 in every column; the naive
    formula gives 0/0 = NaN there, ours the exact value (softmax over S of log p)."""
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    x[:, 3] -= 1e4
    x = x.to(dtype)
    assert torch.isnan(_eager(x.double(), 0.0)).any()  # the naive formula breaks
    dout = torch.randn(2, 7, 5).to(dtype)
    with force_backend("python"):
        out, g = _ours(x, dout, 0.0)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    tol = {torch.float64: 1e-9, torch.float32: 2e-3, torch.bfloat16: 3e-2}[dtype]
    assert _maxabs(out, _logspace_oracle(x, 0.0)) <= tol
    torch.testing.assert_close(out.double().sum(-1), torch.ones(2, 7, dtype=torch.float64), atol=tol, rtol=0)


@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_gradcheck_float64(eps):
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    with force_backend("python"):
        assert torch.autograd.gradcheck(lambda t: ea_double_norm(t, eps), (x,))


def test_non_contiguous():
    base = torch.randn(3, 6, 13, dtype=torch.float64)  # (..., S, N)
    x = base.transpose(-1, -2)  # (3, 13, 6) non-contiguous
    assert not x.is_contiguous()
    dout = torch.randn(3, 6, 13, dtype=torch.float64).transpose(-1, -2)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    with force_backend("python"):
        out, g = _ours(x, dout, 1e-9)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ref_functions_contract(dtype):
    """fwd_ref returns (out, lse (...,1,S), rowsum (...,N,1)) in the compute dtype; bwd_ref matches autograd."""
    x = torch.randn(2, 9, 4).to(dtype)
    out, lse, rowsum = ea_double_norm_fwd_ref(x, 1e-9)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == x.shape and out.dtype == dtype
    assert lse.shape == (2, 1, 4) and lse.dtype == ct
    assert rowsum.shape == (2, 9, 1) and rowsum.dtype == ct
    xd = x.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(xd, dim=-2, keepdim=True), rtol=1e-6, atol=1e-6)
    p = torch.softmax(xd, dim=-2)
    torch.testing.assert_close(rowsum.double(), p.sum(-1, keepdim=True) + 1e-9, rtol=1e-6, atol=1e-6)
    dout = torch.randn(2, 9, 4).to(dtype)
    dl = ea_double_norm_bwd_ref(dout, x, out, lse, rowsum)
    assert dl.dtype == dtype and dl.shape == x.shape
    _, gref = _oracle_grad(x, dout, 1e-9)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert _maxabs(dl, gref) <= tol


def test_public_function_default_backend():
    """Whatever backend is active (compiled when built) matches the oracle in float64 and float32."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = torch.randn(2, 13, 5, dtype=dtype)
        dout = torch.randn(2, 13, 5, dtype=dtype)
        ref, gref = _oracle_grad(x, dout, 1e-9)
        out, g = _ours(x, dout, 1e-9)
        assert _maxabs(out, ref) <= tol and _maxabs(g, gref) <= tol


def test_rows_sum_to_one_and_columns_normalised():
    x = torch.randn(4, 10, 8, dtype=torch.float64)
    out = ea_double_norm(x, 0.0)
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 10, dtype=torch.float64))


def test_errors():
    with pytest.raises(ValueError, match="logits"):
        ea_double_norm(torch.randn(5))
    with pytest.raises(ValueError, match="logits"):
        ea_double_norm(torch.tensor(1.0))
    with pytest.raises(TypeError, match="logits"):
        ea_double_norm(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits"):
        ea_double_norm([[1.0, 2.0]])
    with pytest.raises(ValueError, match="eps"):
        ea_double_norm(torch.randn(3, 4), eps=-1e-9)
    with pytest.raises(ValueError, match="eps"):
        ea_double_norm(torch.randn(3, 4), eps=float("nan"))
    with pytest.raises(TypeError, match="eps"):
        ea_double_norm(torch.randn(3, 4), eps="1e-9")
