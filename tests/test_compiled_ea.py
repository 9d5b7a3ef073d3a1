"""Compiled ea_double_norm_fwd/_bwd vs the float64 oracle (errors: max-abs)."""
from __future__ import annotations

import pytest
import torch

import oracles
from test_compiled_common import OPS, maxabs, rand  # noqa: F401  (skips without attnfree_ext._C)

SHAPES = [(2, 3, 7, 5), (1, 1), (4, 1), (1, 6), (5, 131, 8), (2, 64, 16)]


def _oracle(logits, eps, dout):
    x = logits.detach().double().requires_grad_()
    out = oracles.ea_double_norm(x, eps)
    (g,) = torch.autograd.grad(out, x, dout.double())
    return out.detach(), g


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-9, 0.0, 0.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_vs_oracle(shape, eps, dtype, tol):
    x = rand(*shape, dtype=dtype, scale=3.0)
    out, lse, rowsum = OPS.ea_double_norm_fwd(x, eps)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.shape == x.shape
    assert lse.dtype == sd and lse.shape == shape[:-2] + (1, shape[-1])
    assert rowsum.dtype == sd and rowsum.shape == shape[:-1] + (1,)
    dout = rand(*shape, dtype=dtype)
    ref, gref = _oracle(x, eps, dout)
    assert maxabs(out, ref) <= tol
    assert maxabs(lse, torch.logsumexp(x.double(), dim=-2, keepdim=True)) <= tol * 10
    p = torch.softmax(x.double(), dim=-2)
    assert maxabs(rowsum, p.sum(-1, keepdim=True) + eps) <= tol * 10
    g = OPS.ea_double_norm_bwd(dout, x, out, lse, rowsum)
    assert g.dtype == dtype and g.shape == x.shape
    assert maxabs(g, gref) / max(1.0, gref.abs().max().item()) <= tol * 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_2x_rule(dtype):
    x = rand(3, 40, 16, dtype=dtype, scale=3.0)
    dout = rand(3, 40, 16, dtype=dtype)
    ref, gref = _oracle(x, 1e-9, dout)
    xe = x.detach().clone().requires_grad_()
    pe = torch.softmax(xe, dim=-2)
    oe = pe / (pe.sum(-1, keepdim=True) + 1e-9)
    (ge,) = torch.autograd.grad(oe, xe, dout)
    out, lse, rowsum = OPS.ea_double_norm_fwd(x, 1e-9)
    assert lse.dtype == torch.float32
    g = OPS.ea_double_norm_bwd(dout, x, out, lse, rowsum)
    assert maxabs(out, ref) <= 2 * maxabs(oe, ref) + 1e-4
    assert maxabs(g, gref) <= 2 * maxabs(ge, gref) + 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_adversarial(dtype, eps):
    """Logits up to 1e4 (whole rows of p underflow): finite, and equal to the oracle."""
    x = (torch.rand(2, 33, 7, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    out, lse, rowsum = OPS.ea_double_norm_fwd(x, eps)
    dout = rand(2, 33, 7, dtype=dtype)
    g = OPS.ea_double_norm_bwd(dout, x, out, lse, rowsum)
    assert torch.isfinite(out).all() and torch.isfinite(g).all() and torch.isfinite(lse).all()
    ref, gref = _oracle(x, eps, dout)
    if eps == 0.0:  # oracle itself gives 0/0 on rows whose p all underflow in float64; compare the rest
        ok = torch.isfinite(ref)
        assert maxabs(out[ok], ref[ok]) <= 1e-5
    else:
        assert maxabs(out, ref) <= 1e-5


def test_non_contiguous_and_gradcheck():
    x = rand(2, 6, 5).transpose(-1, -2)  # (2, 5, 6) non-contiguous
    out, _, _ = OPS.ea_double_norm_fwd(x, 1e-9)
    assert maxabs(out, oracles.ea_double_norm(x, 1e-9)) < 1e-14
    xg = rand(2, 5, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: OPS.ea_double_norm_fwd(a, 1e-3)[0], (xg,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_python_ref(dtype):
    from attnfree_ext.ops import ea as mod

    x = rand(3, 17, 8, dtype=dtype, scale=2.0)
    dout = rand(3, 17, 8, dtype=dtype)
    o, l, r = OPS.ea_double_norm_fwd(x, 1e-9)
    o2, l2, r2 = mod.ea_double_norm_fwd_ref(x, 1e-9)
    for a, b in ((o, o2), (l, l2), (r, r2)):
        assert a.dtype == b.dtype and a.shape == b.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert maxabs(o, o2) <= tol and maxabs(l, l2) <= 1e-5 and maxabs(r, r2) <= 1e-5
    g = OPS.ea_double_norm_bwd(dout, x, o, l, r)
    g2 = mod.ea_double_norm_bwd_ref(dout, x, o2, l2, r2)
    assert g.dtype == g2.dtype and maxabs(g, g2) <= tol
