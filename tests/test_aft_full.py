"""AFT-full, python path: forward and gradients against the float64 oracle (tests/oracles.py).

Error metric (stated per the brief): max-abs error divided by max(max |reference|, 1) ("scaled max-abs"), so
gradients that are ~0 in truth (e.g. dk, dw at T = 1) are compared absolutely.
"""
from __future__ import annotations

import pytest
import torch

import oracles
from attnfree_ext import _backend
from attnfree_ext.ops import _tiles
from attnfree_ext.ops.aft_full import (
    _AFTFullFunction,
    aft_full,
    aft_full_bwd_ref,
    aft_full_fwd_ref,
    aft_full_lowrank,
)


def err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def make(B, T, D, heads, dtype, k_scale=1.0, w_scale=1.0):
    q = torch.randn(B, T, D, dtype=torch.float64)
    k = torch.randn(B, T, D, dtype=torch.float64) * k_scale
    v = torch.randn(B, T, D, dtype=torch.float64)
    wshape = (T, T) if heads is None else (heads, T, T)
    w = torch.randn(wshape, dtype=torch.float64) * w_scale
    return [x.to(dtype) for x in (q, k, v, w)]


def run_python(q, k, v, w, causal, dy):
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    with _backend.force_backend("python"):
        y = aft_full(*xs, causal=causal)
    grads = torch.autograd.grad(y, xs, dy.to(y.dtype))
    return y, grads


def run_oracle(q, k, v, w, causal, dy):
    xs = [x.detach().double().requires_grad_() for x in (q, k, v, w)]
    y = oracles.aft(*xs, causal=causal)
    grads = torch.autograd.grad(y, xs, dy.double())
    return y, grads


def eager_lowp(q, k, v, w, causal):
    """Plain-PyTorch AFT in the inputs' own (low) dtype: the oracle formula without the float64 upcast."""
    B, T, D = q.shape
    wb = oracles._bias_per_channel(w, D)  # (T, T, D), stays in w's dtype
    logits = wb[None] + k[:, None, :, :]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    p = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (p * v[:, None, :, :]).sum(dim=2)


SHAPES = [  # (B, T, D, heads); heads None -> (T, T) bias
    (1, 1, 1, None),
    (2, 7, 5, None),
    (2, 13, 4, 2),
    (1, 37, 6, 3),
    (2, 67, 1, None),
    (1, 131, 6, 2),
    (2, 131, 3, None),
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,T,D,heads", SHAPES)
def test_matches_oracle(B, T, D, heads, causal, dtype):
    q, k, v, w = make(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=torch.float64)
    y, g = run_python(q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert y.dtype == dtype and y.shape == (B, T, D)
    assert err(y, yo) < TOL[dtype]
    for name, a, b in zip("qkvw", g, go):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert err(a, b) < TOL[dtype], name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_ref_functions_contract(causal, heads):
    """aft_full_fwd_ref / aft_full_bwd_ref directly (the contract with the compiled path): y, lse and grads."""
    B, T, D = 2, 67, 4
    q, k, v, w = make(B, T, D, heads, torch.float64)
    y, lse = aft_full_fwd_ref(q, k, v, w, causal)
    assert lse.dtype == torch.float64 and lse.shape == (B, T, D)
    # lse oracle: logsumexp over visible keys of k[t'] + w[t, t']
    logits = oracles._bias_per_channel(w, D)[None] + k[:, None]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    assert err(lse, torch.logsumexp(logits, dim=2)) < 1e-12
    dy = torch.randn(B, T, D, dtype=torch.float64)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert err(y, yo) < 1e-12
    grads = aft_full_bwd_ref(dy, q, k, v, w, y, lse, causal)
    for name, a, b in zip("qkvw", grads, go):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert err(a, b) < 1e-10, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lse_dtype(dtype):
    q, k, v, w = make(1, 5, 2, None, dtype)
    y, lse = aft_full_fwd_ref(q, k, v, w, False)
    assert y.dtype == dtype and lse.dtype == torch.float32
    dq, dk, dv, dw = aft_full_bwd_ref(torch.ones_like(y), q, k, v, w, y, lse, False)
    assert dq.dtype == dk.dtype == dv.dtype == dw.dtype == dtype


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_gradcheck(causal, heads):
    q, k, v, w = make(2, 5, 4, heads, torch.float64)
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    assert torch.autograd.gradcheck(lambda *a: _AFTFullFunction.apply(*a, causal), xs)


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(causal):
    B, T, D, heads = 2, 67, 6, 3
    base = torch.randn(B, D, T, dtype=torch.float64)
    q = base.transpose(1, 2)  # (B, T, D) transposed view
    k = torch.randn(B, T, 2 * D, dtype=torch.float64)[:, :, ::2]  # strided slice
    v = torch.randn(T, B, D, dtype=torch.float64).transpose(0, 1)
    w = torch.randn(heads, T, T, dtype=torch.float64).transpose(1, 2)
    assert not any(x.is_contiguous() for x in (q, k, v, w))
    dy = torch.randn(B, T, D, dtype=torch.float64)
    y, g = run_python(q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert err(y, yo) < 1e-10
    for a, b in zip(g, go):
        assert err(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,T,D,heads", [(2, 37, 8, None), (1, 67, 4, 2)])
def test_low_precision_2x_rule(B, T, D, heads, causal, dtype):
    """Error vs the float64 oracle <= 2x that of eager PyTorch in the same low dtype (+ 1e-3 scaled floor)."""
    q, k, v, w = make(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=torch.float64)
    y, g = run_python(q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    ye = eager_lowp(*xs, causal)
    ge = torch.autograd.grad(ye, xs, dy.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert err(y, yo) <= 2 * err(ye, yo) + 1e-3
    for name, a, b, e in zip("qkvw", g, go, ge):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert err(a, b) <= 2 * err(e, b) + 1e-3, name


ADVERSARIAL = [  # (k_scale, w_scale, late_spike)
    (1e4, 1.0, False),
    (1.0, 1e4, False),
    (1e4, 1e4, False),
    (1.0, 1.0, True),
]


def _adversarial_inputs(k_scale, w_scale, spike, dtype, T=131, heads=None):
    q, k, v, w = make(2, T, 3, heads, torch.float64, k_scale, w_scale)
    if spike:
        k[:, -3, :] += 3000.0  # one late key larger than every earlier key by >> 88
    return [x.to(dtype) for x in (q, k, v, w)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k_scale,w_scale,spike", ADVERSARIAL)
def test_adversarial_float64(k_scale, w_scale, spike, causal):
    q, k, v, w = _adversarial_inputs(k_scale, w_scale, spike, torch.float64)
    dy = torch.randn(q.shape, dtype=torch.float64)
    y, g = run_python(q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert torch.isfinite(y).all()
    assert err(y, yo) < 1e-9
    for name, a, b in zip("qkvw", g, go):
        assert torch.isfinite(a).all(), name
        assert err(a, b) < 1e-9, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k_scale,w_scale,spike", ADVERSARIAL)
def test_adversarial_float32(k_scale, w_scale, spike, causal):
    """fp32: finite; error bounded by the rounding of logits of that size (lse is stored in float32, so P carries
    a relative error ~ eps32 * |lse|; tolerance 8 * eps32 * max|logit|, at least 1e-5)."""
    q, k, v, w = _adversarial_inputs(k_scale, w_scale, spike, torch.float32, heads=3)
    dy = torch.randn(q.shape, dtype=torch.float64)
    y, g = run_python(q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    big = k.double().abs().max().item() + w.double().abs().max().item()
    tol = max(1e-5, 8 * torch.finfo(torch.float32).eps * big)
    assert torch.isfinite(y).all()
    assert err(y, yo) < tol
    for name, a, b in zip("qkvw", g, go):
        assert torch.isfinite(a).all(), name
        assert err(a, b) < tol, name


def test_late_spike_split_max_would_fail():
    """Sanity check of the adversarial case: the global split max (public code's trick) gives NaN here."""
    q, k, v, w = _adversarial_inputs(1.0, 1.0, True, torch.float32)
    ek = torch.exp(k - k.amax(dim=1, keepdim=True))
    ew = torch.exp(w - w.amax(dim=1, keepdim=True)).tril()
    naive = (ew @ (ek * v)) / (ew @ ek)
    assert not torch.isfinite(naive).all()
    with _backend.force_backend("python"):
        assert torch.isfinite(aft_full(q, k, v, w, causal=True)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_tile_boundaries_exact_fallback(causal):
    """Rows where a factorised tile underflows (|w| ~ |k| ~ 1e3 in the same tile) go through the exact block."""
    T = _tiles.TAU * 2 + 3
    q, k, v, w = make(1, T, 2, None, torch.float64)
    w[:, 5] += 800.0  # row max of every row at key 5 ...
    k[:, 9] += 800.0  # ... column max at key 9: the split max of tile 0 misses by ~800 > 708
    dy = torch.randn(1, T, 2, dtype=torch.float64)
    y, g = run_python(q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert err(y, yo) < 1e-10
    for a, b in zip(g, go):
        assert err(a, b) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_lowrank_python_path(causal, heads):
    B, T, D, rank = 2, 67, 4, 5
    shape = (T, rank) if heads is None else (heads, T, rank)
    q, k, v = (torch.randn(B, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    u = (torch.randn(shape, dtype=torch.float64) * 0.5).requires_grad_()
    vb = (torch.randn(shape, dtype=torch.float64) * 0.5).requires_grad_()
    with _backend.force_backend("python"):
        y = aft_full_lowrank(q, k, v, u, vb, causal=causal)
    yo = oracles.aft(q, k, v, u @ vb.transpose(-1, -2), causal)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (q, k, v, u, vb), dy)
    go = torch.autograd.grad(yo, (q, k, v, u, vb), dy)
    assert err(y, yo) < 1e-10
    for a, b in zip(g, go):
        assert err(a, b) < 1e-10


def test_public_dispatch_python_matches_function():
    q, k, v, w = make(2, 13, 4, 2, torch.float32)
    with _backend.force_backend("python"):
        y = aft_full(q, k, v, w)
    assert torch.equal(y, _AFTFullFunction.apply(q, k, v, w, False))


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v, w: (q, k, v, w.float()), TypeError, "w"),
        (lambda q, k, v, w: (q, k, v, w[:-1]), ValueError, "w"),
        (lambda q, k, v, w: (q, k, v, torch.randn(4, 7, 7, dtype=torch.float64)), ValueError, "heads"),
        (lambda q, k, v, w: (q, k, v, w.to("meta")), ValueError, "w"),
        (lambda q, k, v, w: (q[0], k, v, w), ValueError, "q"),
        (lambda q, k, v, w: (q, k[:, :-1], v, w), ValueError, "k"),
        (lambda q, k, v, w: (q, k, v.float(), w), TypeError, "v"),
        (lambda q, k, v, w: (q, k.long(), v, w), TypeError, "k"),
        (lambda q, k, v, w: (q, k, v, w.tolist()), TypeError, "w"),
    ],
)
def test_errors(mutate, exc, match):
    q, k, v, w = make(2, 7, 6, None, torch.float64)
    with pytest.raises(exc, match=match):
        aft_full(*mutate(q, k, v, w))


def test_lowrank_errors():
    q, k, v, _ = make(1, 7, 6, None, torch.float64)
    u = torch.randn(7, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="vb"):
        aft_full_lowrank(q, k, v, u, torch.randn(7, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="u"):
        aft_full_lowrank(q, k, v, torch.randn(8, 3, dtype=torch.float64), u)
    with pytest.raises(TypeError, match="u"):
        aft_full_lowrank(q, k, v, u.float(), u)
    with pytest.raises(ValueError, match="heads"):
        aft_full_lowrank(q, k, v, torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(4, 7, 3, dtype=torch.float64))


def test_torch_compile_python_path():
    """torch.compile (not fullgraph: the tile loops are graph breaks) gives the eager result and gradients."""
    q, k, v, w = make(2, 70, 4, 2, torch.float32)
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    fn = torch.compile(lambda *a: aft_full(*a, causal=True), backend="aot_eager")
    with _backend.force_backend("python"):
        y = fn(*xs)
        ye = aft_full(*xs, causal=True)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, xs, dy)
    ge = torch.autograd.grad(ye, xs, dy)
    assert torch.allclose(y, ye)
    for a, b in zip(g, ge):
        assert torch.allclose(a, b)
