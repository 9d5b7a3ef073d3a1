"""AFT-full (attnfree_ext.ops.aft_full) on every path (python, compiled CPU, CUDA) against the float64 oracles.

Sections: the public function (forward + gradients), the fwd/bwd contract (``aft_full_fwd_ref`` / ``_bwd_ref``
on the python path, ``torch.ops.attnfree.aft_full_fwd`` / ``_bwd`` on the compiled ones), the compiled kernels'
algorithm switch (ATTNFREE_AFT_FULL_KERNEL=auto|tiled|exact), the factorised bias (``aft_full_lowrank``),
registration (opcheck, torch.compile) and input checks.

Error metrics (tests/common/metrics.py; docs/design.md §5): ``err`` = max-abs error divided by
max(max |reference|, 1), so gradients that are ~0 in truth (e.g. dk, dw at T = 1) are compared absolutely; the
fp16/bf16 tests use the 2x rule against eager PyTorch in the same dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfree_ext.ops.aft_full import aft_full, aft_full_lowrank
from attnfree_ext.ops.aft_full.reference import AFTFullFunction
from attnfree_ext.ops.common import tiles
from common import aft as contract
from common import oracles
from common.inputs import qkvw, rand
from common.metrics import err, maxabs
from common.paths import ContractFunction

OP = "aft_full"
OPS = torch.ops.attnfree
COMPILED = pytest.mark.paths("compiled-cpu", "cuda")
LOWRANK = pytest.mark.paths(op="aft_full_lowrank")


def run_oracle(q, k, v, w, causal, dy):
    xs = [x.detach().double().requires_grad_() for x in (q, k, v, w)]
    y = oracles.aft(*xs, causal=causal)
    grads = torch.autograd.grad(y, xs, dy.double())
    return y, grads


def run(path, q, k, v, w, causal, dy):
    return path.grads(aft_full, (q, k, v, w), dy, causal=causal)


# ================================================================ the public function
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
def test_matches_oracle(path, B, T, D, heads, causal, dtype):
    q, k, v, w = qkvw(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=torch.float64)
    y, g = run(path, q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert y.dtype == dtype and y.shape == (B, T, D)
    assert err(y, yo) < TOL[dtype]
    for name, a, b in zip("qkvw", g, go):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert err(a, b) < TOL[dtype], name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_gradcheck(path, causal, heads):
    q, k, v, w = (path.leaf(x) for x in qkvw(2, 5, 4, heads, torch.float64))

    def f(*a):
        with path.force():
            return aft_full(*a, causal)

    assert torch.autograd.gradcheck(f, (q, k, v, w))


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(path, causal):
    B, T, D, heads = 2, 67, 6, 3
    base = torch.randn(B, D, T, dtype=torch.float64)
    q = base.transpose(1, 2)  # (B, T, D) transposed view
    k = torch.randn(B, T, 2 * D, dtype=torch.float64)[:, :, ::2]  # strided slice
    v = torch.randn(T, B, D, dtype=torch.float64).transpose(0, 1)
    w = torch.randn(heads, T, T, dtype=torch.float64).transpose(1, 2)
    assert not any(x.is_contiguous() for x in (q, k, v, w))
    dy = torch.randn(B, T, D, dtype=torch.float64)
    y, g = run(path, q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert err(y, yo) < 1e-10
    for a, b in zip(g, go):
        assert err(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,T,D,heads", [(2, 37, 8, None), (1, 67, 4, 2)])
def test_low_precision_2x_rule(path, B, T, D, heads, causal, dtype):
    """Error vs the float64 oracle <= 2x that of eager PyTorch in the same low dtype (+ 1e-3 scaled floor)."""
    q, k, v, w = qkvw(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=torch.float64)
    y, g = run(path, q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    ye = oracles.aft_eager(*xs, causal)
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
    q, k, v, w = qkvw(2, T, 3, heads, torch.float64, k_scale, w_scale)
    if spike:
        k[:, -3, :] += 3000.0  # one late key larger than every earlier key by >> 88
    return [x.to(dtype) for x in (q, k, v, w)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k_scale,w_scale,spike", ADVERSARIAL)
def test_adversarial_float64(path, k_scale, w_scale, spike, causal):
    q, k, v, w = _adversarial_inputs(k_scale, w_scale, spike, torch.float64)
    dy = torch.randn(q.shape, dtype=torch.float64)
    y, g = run(path, q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert torch.isfinite(y).all()
    assert err(y, yo) < 1e-9
    for name, a, b in zip("qkvw", g, go):
        assert torch.isfinite(a).all(), name
        assert err(a, b) < 1e-9, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("k_scale,w_scale,spike", ADVERSARIAL)
def test_adversarial_float32(path, k_scale, w_scale, spike, causal):
    """fp32: finite; error bounded by the rounding of logits of that size (lse is stored in float32, so P carries
    a relative error ~ eps32 * |lse|; tolerance 8 * eps32 * max|logit|, at least 1e-5)."""
    q, k, v, w = _adversarial_inputs(k_scale, w_scale, spike, torch.float32, heads=3)
    dy = torch.randn(q.shape, dtype=torch.float64)
    y, g = run(path, q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    big = k.double().abs().max().item() + w.double().abs().max().item()
    tol = max(1e-5, 8 * torch.finfo(torch.float32).eps * big)
    assert torch.isfinite(y).all()
    assert err(y, yo) < tol
    for name, a, b in zip("qkvw", g, go):
        assert torch.isfinite(a).all(), name
        assert err(a, b) < tol, name


def test_late_spike_split_max_would_fail(path):
    """Sanity check of the adversarial case: the global split max (public code's trick) gives NaN here."""
    q, k, v, w = _adversarial_inputs(1.0, 1.0, True, torch.float32)
    ek = torch.exp(k - k.amax(dim=1, keepdim=True))
    ew = torch.exp(w - w.amax(dim=1, keepdim=True)).tril()
    naive = (ew @ (ek * v)) / (ew @ ek)
    assert not torch.isfinite(naive).all()
    with path.force():
        assert torch.isfinite(aft_full(*path.put((q, k, v, w)), causal=True)).all()


@pytest.mark.parametrize("causal", [False, True])
def test_tile_boundaries_exact_fallback(path, causal):
    """Rows where a factorised tile underflows (|w| ~ |k| ~ 1e3 in the same tile) go through the exact block."""
    T = tiles.TAU * 2 + 3
    q, k, v, w = qkvw(1, T, 2, None, torch.float64)
    w[:, 5] += 800.0  # row max of every row at key 5 ...
    k[:, 9] += 800.0  # ... column max at key 9: the split max of tile 0 misses by ~800 > 708
    dy = torch.randn(1, T, 2, dtype=torch.float64)
    y, g = run(path, q, k, v, w, causal, dy)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert err(y, yo) < 1e-10
    for a, b in zip(g, go):
        assert err(a, b) < 1e-10


@pytest.mark.paths("python")
def test_public_dispatch_python_matches_function(path):
    q, k, v, w = qkvw(2, 13, 4, 2, torch.float32)
    with path.force():
        y = aft_full(q, k, v, w)
    assert torch.equal(y, AFTFullFunction.apply(q, k, v, w, False))


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
    q, k, v, w = qkvw(2, 7, 6, None, torch.float64)
    with pytest.raises(exc, match=match):
        aft_full(*mutate(q, k, v, w))


@pytest.mark.parametrize("causal", ["no", 1, None, torch.tensor(True)])
def test_causal_must_be_a_bool(causal):
    q, k, v, w = qkvw(1, 5, 2, None, torch.float64)
    with pytest.raises(TypeError, match="causal must be a bool"):
        aft_full(q, k, v, w, causal)
    u = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="causal must be a bool"):
        aft_full_lowrank(q, k, v, u, u, causal)


@pytest.mark.paths("python")
def test_torch_compile_python_path(path):
    """torch.compile (not fullgraph: the tile loops are graph breaks) gives the eager result and gradients."""
    q, k, v, w = qkvw(2, 70, 4, 2, torch.float32)
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    fn = torch.compile(lambda *a: aft_full(*a, causal=True), backend="aot_eager")
    with path.force():
        y = fn(*xs)
        ye = aft_full(*xs, causal=True)
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, xs, dy)
    ge = torch.autograd.grad(ye, xs, dy)
    assert torch.allclose(y, ye)
    for a, b in zip(g, ge):
        assert torch.allclose(a, b)


# ================================================================ the fwd / bwd contract
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_contract_lse_and_grads(path, causal, heads):
    """y, lse and the gradients of the contract functions (float64)."""
    B, T, D = 2, 67, 4
    q, k, v, w = qkvw(B, T, D, heads, torch.float64)
    y, lse = path.fwd(OP, q, k, v, w, causal)
    assert lse.dtype == torch.float64 and lse.shape == (B, T, D)
    assert err(lse, oracles.aft_lse(k, oracles.bias_per_channel(w, D), causal)) < 1e-12
    dy = torch.randn(B, T, D, dtype=torch.float64)
    yo, go = run_oracle(q, k, v, w, causal, dy)
    assert err(y, yo) < 1e-12
    grads = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    for name, a, b in zip("qkvw", grads, go):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert err(a, b) < 1e-10, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_contract_lse_dtype(path, dtype):
    q, k, v, w = qkvw(1, 5, 2, None, dtype)
    y, lse = path.fwd(OP, q, k, v, w, False)
    assert y.dtype == dtype and lse.dtype == torch.float32
    dq, dk, dv, dw = path.bwd(OP, torch.ones_like(y), q, k, v, w, y, lse, False)
    assert dq.dtype == dk.dtype == dv.dtype == dw.dtype == dtype


CONTRACT_SHAPES = [  # (B, T, D, heads, window); heads 1 -> (T, T) bias
    (2, 13, 6, 1, 3),
    (1, 1, 1, 1, 1),
    (1, 7, 1, 1, 2),
    (2, 37, 8, 2, 5),
    (1, 131, 4, 4, 9),  # prime T > 64
    (2, 9, 4, 1, 20),  # window > T
]


def _w_heads(H):
    return None if H == 1 else H


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CONTRACT_SHAPES)
def test_contract_float64_vs_oracle(path, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = qkvw(B, T, D, _w_heads(H), torch.float64)
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-10, 1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 13, 6, 1, 3), (1, 131, 4, 2, 9)])
def test_contract_float32_vs_oracle(path, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = qkvw(B, T, D, _w_heads(H), torch.float32)
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-5, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contract_low_precision_2x_rule(path, causal, dtype):
    """error(contract, low dtype) <= 2 * error(eager PyTorch in that dtype) + 1e-3, both vs the float64 oracle."""
    B, T, D, H, window = 2, 29, 8, 2, 4
    q, k, v, w = qkvw(B, T, D, H, dtype)
    dy = rand(B, T, D, dtype=dtype)
    y, lse = path.fwd(OP, q, k, v, w, causal)
    assert y.dtype == dtype and lse.dtype == torch.float32
    yr, grads_r = contract.oracle_grads(OP, q, k, v, w, window, causal, dy)
    ins = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    ye = contract.eager_lowp(OP, *ins, window, causal)
    ge = torch.autograd.grad(ye, ins, dy)
    assert maxabs(y, yr) <= 2 * maxabs(ye, yr) + 1e-3
    grads = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    for name, g, gr, gre in zip(("dq", "dk", "dv", "dw"), grads, grads_r, ge):
        assert g.dtype == dtype
        assert maxabs(g, gr) <= 2 * maxabs(gre, gr) + 1e-3, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_adversarial_magnitudes(path, causal, dtype):
    """|k|, |w| up to 1e4: finite everywhere and close to the oracle."""
    B, T, D, H, window = 2, 17, 4, 2, 3
    q, k, v, w = qkvw(B, T, D, H, dtype)
    k = (torch.rand(B, T, D, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    w = (torch.rand(*w.shape, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    contract.check_all(
        path, OP, q, k, v, w, window, causal, tol, tol, tol_lse=1e-6 if dtype == torch.float32 else 1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_causal_late_spike(path, dtype):
    """One late key larger than every earlier key by >> 88: a split max gives 0/0; here all finite + exact.
    (|lse| ~ 300: the forward must round lse once, not its stabiliser on the way, or P = exp(k + w - lse) of the
    backward is off by ~3e-5 relative.)"""
    B, T, D, H, window = 2, 70, 5, 1, 6
    q, k, v, w = qkvw(B, T, D, _w_heads(H), dtype)
    k = k.clone()
    k[:, T - 3, :] = 300.0
    k[1, T - 10, 2] = -300.0
    y, lse = path.fwd(OP, q, k, v, w, True)
    dy = rand(B, T, D, dtype=dtype)
    grads = path.bwd(OP, dy, q, k, v, w, y, lse, True)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads)
    yr, grads_r = contract.oracle_grads(OP, q, k, v, w, window, True, dy)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert maxabs(y, yr) <= tol
    # the gradients rebuild P = exp(w + k - lse) from the float32 lse, which at |lse| ~ 300 carries up to
    # ulp(300) / 2 ~ 1.5e-5 absolute, i.e. that relative error in P (the rows that see the spike key)
    gtol = 2e-5 if dtype == torch.float32 else tol
    for g, gr in zip(grads, grads_r):
        assert maxabs(g, gr) / max(1.0, gr.abs().max().item()) <= gtol


@pytest.mark.parametrize("causal", [False, True])
def test_contract_non_contiguous(path, causal):
    B, T, D, H, window = 2, 11, 6, 3, 3
    q, k, v = (rand(B, D, T).transpose(1, 2) for _ in range(3))
    w = rand(H, T, T).transpose(1, 2)
    assert not q.is_contiguous() and not w.is_contiguous()
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-10, 1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(path, causal):
    """Through the public function: the compiled op's registered autograd / the python path's Function."""
    B, T, D, H = 2, 6, 4, 2
    q, k, v, w = (path.leaf(x) for x in qkvw(B, T, D, H, torch.float64))

    def f(a, b, c, d):
        with path.force():
            return aft_full(a, b, c, d, causal)

    assert torch.autograd.gradcheck(f, (q, k, v, w))


SHAPES_BIG = [  # (B, T, D, heads)
    (1, 1, 1, 1),
    (2, 7, 3, 1),
    (1, 13, 8, 2),
    (2, 37, 16, 4),
    (1, 64, 64, 1),
    (2, 131, 24, 3),
    (1, 257, 8, 1),
    (3, 65, 130, 2),  # columns span batch entries, dh not a multiple of the CUDA column tile
]
TOL_CLOSE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=5e-5, atol=5e-5)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES_BIG)
def test_contract_forward_assert_close(path, shape, causal, dtype):
    """Elementwise (assert_close) forward accuracy, 3-D w, shapes that stress the CUDA tiling."""
    B, T, D, heads = shape
    q, k, v, w = qkvw(B, T, D, heads, dtype, w_scale=0.5)
    path.poison()
    y, lse = path.fwd(OP, q, k, v, w, causal)
    assert y.dtype == dtype and y.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == q.shape
    torch.testing.assert_close(y.double(), oracles.aft(q, k, v, w, causal), **TOL_CLOSE[dtype])
    wf = oracles.bias_per_channel(w.double(), D)
    torch.testing.assert_close(lse.double(), oracles.aft_lse(k, wf, causal), **TOL_CLOSE[dtype])


@pytest.mark.parametrize("causal", [False, True])
def test_contract_forward_2d_w_and_noncontiguous(path, causal):
    q, k, v, w = qkvw(2, 45, 20, None, torch.float32, w_scale=0.5, noncontig=True)
    assert not q.is_contiguous()
    y, lse = path.fwd(OP, q, k, v, w, causal)
    torch.testing.assert_close(y.double(), oracles.aft(q, k, v, w, causal), **TOL_CLOSE[torch.float32])
    wf = oracles.bias_per_channel(w.double(), 20)
    torch.testing.assert_close(lse.double(), oracles.aft_lse(k, wf, causal), **TOL_CLOSE[torch.float32])


@pytest.mark.parametrize("causal", [False, True])
def test_contract_w_dtype_must_match_q(path, causal):
    # the same rule and message on every path
    q, k, v, w = qkvw(2, 70, 16, 2, torch.bfloat16)
    with pytest.raises(TypeError, match="w must have the dtype of q"):
        path.fwd(OP, q, k, v, w.float(), causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 13, 8, 2), (2, 67, 12, 3), (1, 131, 4, 1)])
@pytest.mark.parametrize("wdim", [2, 3])
def test_contract_backward_assert_close(path, shape, causal, dtype, wdim):
    B, T, D, heads = shape
    if wdim == 2 and heads != 1:
        pytest.skip("2-D w has one head")
    q, k, v, w = qkvw(B, T, D, None if wdim == 2 else heads, dtype, w_scale=0.5)
    dy = rand(B, T, D, dtype=dtype)
    y, lse = path.fwd(OP, q, k, v, w, causal)
    path.poison()
    dq, dk, dv, dw = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    assert dw.shape == w.shape and dw.dtype == w.dtype
    _, exp = run_oracle(q, k, v, w, causal, dy)
    tol = TOL_CLOSE[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for g, e in zip((dq, dk, dv, dw), exp):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_contract_gradcheck_float64(path, causal, heads):
    """gradcheck of the fwd/bwd contract functions called directly (no library autograd glue)."""
    q, k, v, w = (path.leaf(x) for x in qkvw(2, 9, 4, heads, torch.float64, w_scale=0.5))
    fn = ContractFunction(path, OP, 1)
    assert torch.autograd.gradcheck(lambda *a: fn.apply(*a, causal), (q, k, v, w), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 16, 2), (1, 131, 64, 1), (2, 200, 24, 3)])
def test_contract_low_precision_2x_rule_larger(path, shape, causal, dtype):
    B, T, D, heads = shape
    q, k, v, w = qkvw(B, T, D, heads, dtype, w_scale=0.5)
    dy = rand(B, T, D, dtype=dtype)
    y_ref, g_ref = run_oracle(q, k, v, w, causal, dy)
    floor = 1e-3
    y, lse = path.fwd(OP, q, k, v, w, causal)
    assert y.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, w)]
    y_low = oracles.aft_eager(*leaves, causal)
    assert maxabs(y, y_ref) <= 2 * maxabs(y_low, y_ref) + floor
    wf = oracles.bias_per_channel(w.double(), D)
    torch.testing.assert_close(lse.double(), oracles.aft_lse(k, wf, causal), rtol=1e-2, atol=1e-2)
    g_low = torch.autograd.grad(y_low, leaves, dy)
    got = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    for name, g, gl, ge in zip("q k v w".split(), got, g_low, g_ref):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        assert maxabs(g, ge) <= 2 * maxabs(gl, ge) + floor * max(1.0, ge.abs().max().item()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("what", ["k1e4", "w1e4", "late_spike"])
@pytest.mark.parametrize("T", [131, 257])
def test_contract_adversarial_finite_and_accurate(path, what, causal, dtype, T):
    B, D, heads = 2, 8, 2
    q, k, v, w = qkvw(B, T, D, heads, torch.float64, w_scale=0.5)
    if what == "k1e4":
        k = k * 1e4
    elif what == "w1e4":
        w = w * 2e4  # |w| up to ~1e4 and beyond; row and column maxima rarely coincide
    else:
        k[:, -3, :] += 3000.0
    q, k, v, w = (x.to(dtype) for x in (q, k, v, w))
    dy = rand(B, T, D, dtype=dtype)
    path.poison()
    y, lse = path.fwd(OP, q, k, v, w, causal)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    y_ref, g_ref = run_oracle(q, k, v, w, causal, dy)
    lse_ref = oracles.aft_lse(k, oracles.bias_per_channel(w.double(), D), causal)
    if dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-9)
    elif dtype == torch.float32:
        tol = dict(rtol=2e-3, atol=2e-3)  # inputs ~1e4 are themselves quantised at ~1e-3 in float32
    else:
        tol = dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    lse_atol = {torch.float64: 1e-9, torch.float32: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-6, atol=lse_atol)
    grads = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    for g in grads:
        assert torch.isfinite(g).all()
    if dtype == torch.float64:
        for g, e in zip(grads, g_ref):
            torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-8)


def test_contract_bad_inputs_raise(path):
    q, k, v, w = qkvw(1, 8, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="w"):
        path.fwd(OP, q, k, v, w[:, :4, :4], False)
    with pytest.raises(ValueError, match="heads"):
        path.fwd(OP, q, k, v, torch.randn(3, 8, 8), False)
    with pytest.raises(TypeError):
        path.fwd(OP, q, k.double(), v, w, False)


def test_contract_empty_batch_and_many_columns(path):
    q, k, v, w = qkvw(0, 16, 8, 2, torch.float32)
    y, lse = path.fwd(OP, q, k, v, w, True)
    assert y.shape == q.shape
    dy = torch.randn_like(q)
    dq, dk, dv, dw = path.bwd(OP, dy, q, k, v, w, y, lse, True)
    assert (dw == 0).all()
    q, k, v, w = qkvw(4, 33, 300, 1, torch.bfloat16, w_scale=0.5)
    y, _ = path.fwd(OP, q, k, v, w, False)
    assert torch.isfinite(y).all()
    assert math.isfinite(maxabs(y, oracles.aft(q, k, v, w)))


@COMPILED
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_matches_python_ref(path, causal):
    """The compiled contract equals the python path's aft_full_fwd_ref / aft_full_bwd_ref."""
    from attnfree_ext.ops.aft_full.reference import aft_full_bwd_ref, aft_full_fwd_ref

    B, T, D, H = 2, 19, 6, 2
    q, k, v, w = qkvw(B, T, D, H, torch.float32)
    dy = rand(B, T, D, dtype=torch.float32)
    y, lse = path.fwd(OP, q, k, v, w, causal)
    yr, lr = aft_full_fwd_ref(q, k, v, w, causal)
    gr = aft_full_bwd_ref(dy, q, k, v, w, yr, lr, causal)
    assert y.dtype == yr.dtype and lse.dtype == lr.dtype and lse.shape == lr.shape
    assert maxabs(y, yr) < 1e-5 and maxabs(lse, lr) < 1e-4
    g = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    for a, b in zip(g, gr):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert maxabs(a, b) / max(1.0, b.abs().max().item()) < 1e-5


@COMPILED
def test_compiled_matches_python_ref_assert_close(path):
    from attnfree_ext.ops.aft_full.reference import aft_full_bwd_ref, aft_full_fwd_ref

    for causal in (False, True):
        q, k, v, w = qkvw(2, 100, 12, 3, torch.float32, w_scale=0.5)
        y, lse = path.fwd(OP, q, k, v, w, causal)
        yr, lser = aft_full_fwd_ref(q, k, v, w, causal)
        torch.testing.assert_close(y, yr, rtol=5e-5, atol=5e-5)
        torch.testing.assert_close(lse, lser.to(lse.dtype), rtol=5e-5, atol=5e-5)
        dy = torch.randn_like(y)
        got = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
        exp = aft_full_bwd_ref(dy, q, k, v, w, yr, lser, causal)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g, e.to(g.dtype), rtol=1e-4, atol=1e-4)


# ================================================================ the algorithm switch ATTNFREE_AFT_FULL_KERNEL
@pytest.fixture
def tiled_kernel(monkeypatch):
    """Force aft_full's factorised kernels (CPU: tile GEMMs; CUDA: tensor cores) even for narrow test shapes."""
    monkeypatch.setenv("ATTNFREE_AFT_FULL_KERNEL", "tiled")


@COMPILED
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("T", [65, 131, 192])
def test_tiled_vs_oracle(path, causal, dtype, tol, T):
    q, k, v, w = qkvw(2, T, 4, 2, dtype)
    contract.check_all(path, OP, q, k, v, w, T, causal, tol, tol)


@COMPILED
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_adversarial(path, causal, dtype):
    """|k|, |w| up to 1e4 on the factorised path: lost tiles must be caught by the exactness guard."""
    B, T, D = 2, 150, 3
    q = rand(B, T, D, dtype=dtype)
    v = rand(B, T, D, dtype=dtype)
    k = (torch.rand(B, T, D, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    w = (torch.rand(T, T, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    contract.check_all(path, OP, q, k, v, w, T, causal, tol, tol, tol_lse=1e-6 if dtype == torch.float32 else 1e-12)


@COMPILED
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_split_max_trap(path, causal):
    """Row max of w and column max of k at different keys of one tile, 100 apart (docs/design.md §2)."""
    B, T, D = 1, 128, 2
    q, v = rand(B, T, D, dtype=torch.float32), rand(B, T, D, dtype=torch.float32)
    k = rand(B, T, D, dtype=torch.float32)
    w = rand(T, T, dtype=torch.float32)
    k[0, 70, :] = 100.0  # column max of k in tile 1 at key 70 ...
    w[:, 100] = 100.0  # ... row max of w in tile 1 at key 100: w[:, 70] + k[70] vs w[:, 100] + k[100]
    w[:, 70] = -60.0
    k[0, 100, :] = -60.0
    k[0, 90, :] = 30.0
    w[:, 90] = 30.0  # true dominant key 90 (logit 60) has Ew * X = exp(-70) * exp(-70): lost in float32
    contract.check_all(path, OP, q, k, v, w, T, causal, 1e-5, 1e-5)


@COMPILED
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_equals_exact(path, causal, monkeypatch):
    q, k, v, w = qkvw(4, 100, 48, 3, torch.float64)  # N = 4 * 16 = 64 columns per head: auto picks tiled
    dy = rand(*q.shape)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_KERNEL", "tiled")
    y1, l1 = path.fwd(OP, q, k, v, w, causal)
    g1 = path.bwd(OP, dy, q, k, v, w, y1, l1, causal)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_KERNEL", "exact")
    y2, l2 = path.fwd(OP, q, k, v, w, causal)
    g2 = path.bwd(OP, dy, q, k, v, w, y2, l2, causal)
    assert maxabs(y1, y2) < 1e-13 and maxabs(l1, l2) < 1e-12
    for a, b in zip(g1, g2):
        assert maxabs(a, b) < 1e-12 * max(1.0, b.abs().max().item())


@COMPILED
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_gradcheck(path, causal):
    q, k, v, w = (path.leaf(x) for x in qkvw(1, 70, 2, 2, torch.float64))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: OPS.aft_full_fwd(a, b, c, d, causal)[0], (q, k, v, w), fast_mode=True
    )


@COMPILED
@pytest.mark.parametrize("causal", [False, True])
def test_exact_matches_auto_forward(path, causal, monkeypatch):
    q, k, v, w = qkvw(2, 131, 40, 2, torch.float32, w_scale=0.5)
    y, lse = path.fwd(OP, q, k, v, w, causal)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_KERNEL", "exact")
    ye, lsee = path.fwd(OP, q, k, v, w, causal)
    torch.testing.assert_close(y, ye, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, lsee, rtol=2e-5, atol=2e-5)


@COMPILED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_matches_auto_backward(path, causal, dtype, monkeypatch):
    q, k, v, w = qkvw(2, 131, 40, 2, dtype, w_scale=0.5)
    dy = torch.randn_like(q)
    y, lse = path.fwd(OP, q, k, v, w, causal)
    got = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    monkeypatch.setenv("ATTNFREE_AFT_FULL_KERNEL", "exact")
    exp = path.bwd(OP, dy, q, k, v, w, y, lse, causal)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for g, e in zip(got, exp):
        torch.testing.assert_close(g.float(), e.float(), **tol)


# ================================================================ factorised bias: aft_full_lowrank
@LOWRANK
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_lowrank_public_matches_oracle(path, causal, heads):
    B, T, D, rank = 2, 67, 4, 5
    shape = (T, rank) if heads is None else (heads, T, rank)
    q, k, v = (torch.randn(B, T, D, dtype=torch.float64) for _ in range(3))
    u = torch.randn(shape, dtype=torch.float64) * 0.5
    vb = torch.randn(shape, dtype=torch.float64) * 0.5
    dy = torch.randn(B, T, D, dtype=torch.float64)
    y, g = path.grads(aft_full_lowrank, (q, k, v, u, vb), dy, causal=causal)
    xs = [x.detach().requires_grad_() for x in (q, k, v, u, vb)]
    yo = oracles.aft(*xs[:3], xs[3] @ xs[4].transpose(-1, -2), causal)
    go = torch.autograd.grad(yo, xs, dy)
    assert err(y, yo) < 1e-10
    for a, b in zip(g, go):
        assert err(a, b) < 1e-10


def test_lowrank_errors():
    q, k, v, _ = qkvw(1, 7, 6, None, torch.float64)
    u = torch.randn(7, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="vb"):
        aft_full_lowrank(q, k, v, u, torch.randn(7, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="u"):
        aft_full_lowrank(q, k, v, torch.randn(8, 3, dtype=torch.float64), u)
    with pytest.raises(TypeError, match="u"):
        aft_full_lowrank(q, k, v, u.float(), u)
    with pytest.raises(ValueError, match="heads"):
        aft_full_lowrank(q, k, v, torch.randn(4, 7, 3, dtype=torch.float64), torch.randn(4, 7, 3, dtype=torch.float64))


def _factors(T, heads, rank, dtype, wdim=3):
    u = torch.randn(heads, T, rank, dtype=torch.float64) * 0.3
    vb = torch.randn(heads, T, rank, dtype=torch.float64) * 0.3
    if wdim == 2:
        u, vb = u[0], vb[0]
    return u.to(dtype), vb.to(dtype)


@LOWRANK
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "cfg",
    [(2, 37, 8, 1, 5, 2), (1, 131, 12, 3, 16, 3), (2, 70, 16, 2, 64, 3), (1, 20, 4, 1, 0, 2), (2, 67, 5, 1, 37, 3)],
)
# CUDA: w = u vb^T is never materialised; every kernel builds its w tiles from u, vb (ranks in chunks of 32: 37 and
# 5 leave a partial chunk) and the backward reduces its dw tiles into du, dvb at once.
def test_lowrank_contract_matches_oracle(path, cfg, causal, dtype):
    B, T, D, heads, rank, wdim = cfg
    q, k, v, _ = qkvw(B, T, D, None, dtype, w_scale=0.5)
    u, vb = _factors(T, heads, rank, dtype, wdim)
    w = u.double() @ vb.double().transpose(-1, -2)
    dy = rand(B, T, D, dtype=dtype)
    path.poison()
    y, lse = path.fwd("aft_full_lowrank", q, k, v, u, vb, causal)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, u, vb)]
    y_ref = oracles.aft(*leaves[:3], leaves[3] @ leaves[4].transpose(-1, -2), causal=causal)
    g_ref = torch.autograd.grad(y_ref, leaves, dy.double())
    got = path.bwd("aft_full_lowrank", dy, q, k, v, u, vb, y, lse, causal)
    assert got[3].shape == u.shape and got[4].shape == vb.shape and got[3].dtype == dtype
    if dtype in (torch.bfloat16, torch.float16):
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in got)
        tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
        for g, e in zip(got, g_ref):
            scale = max(1.0, e.abs().amax().item()) if e.numel() else 1.0
            torch.testing.assert_close(g.double(), e, rtol=tol["rtol"], atol=tol["atol"] * scale)
        return
    tol = TOL_CLOSE[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), y_ref.detach(), **tol)
    torch.testing.assert_close(lse.double(), oracles.aft_lse(k, oracles.bias_per_channel(w, D), causal), **tol)
    for g, e in zip(got, g_ref):
        torch.testing.assert_close(g.double(), e, **tol)


@pytest.mark.paths("emulation", op="aft_full_lowrank")
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_workspace_linear_in_T(path, dtype, causal, exact):
    """The CUDA launchers of the factorised bias need O(B T D + heads T rank) workspace, never a T x T buffer."""
    from common.paths import _emu_ops

    lib = _emu_ops().library()
    dt = _emu_ops().DTYPE[dtype]
    B, D, heads, rank = 2, 8, 2, 5
    for which in ("fwd", "bwd"):
        ws = [lib.raw(f"emu_aft_full_lowrank_{which}_ws", dt, B, T, D, heads, rank, causal, exact) for T in (512, 1024)]
        assert ws[1] <= 2 * ws[0] + 1024, (which, ws)
        # a few (heads, T, rank) arrays and a few (B, T, D) operand arrays (T x T would be 8 MB here)
        assert ws[1] <= 4 * heads * 1024 * rank * 8 + 4 * B * 1024 * D * 4 + 8192, (which, ws)


@LOWRANK
@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_contract_gradcheck_float64(path, causal):
    q, k, v, _ = qkvw(2, 9, 4, None, torch.float64)
    u, vb = _factors(9, 2, 3, torch.float64)
    args = [path.leaf(x) for x in (q, k, v, u, vb)]
    fn = ContractFunction(path, "aft_full_lowrank", 1)
    assert torch.autograd.gradcheck(lambda *a: fn.apply(*a, causal), args, atol=1e-7, rtol=1e-6)


@LOWRANK
def test_lowrank_contract_bad_inputs_raise(path):
    if path.emulated:
        pytest.skip("the bindings' input checks are not emulated (no CPU kernel of aft_full_lowrank to delegate to)")
    q, k, v, _ = qkvw(1, 8, 4, None, torch.float32)
    with pytest.raises(ValueError, match="vb"):
        path.fwd("aft_full_lowrank", q, k, v, torch.randn(8, 2), torch.randn(8, 3), False)


# ================================================================ registration of the compiled ops
def _opcheck_cases():
    cases = []
    for dtype in (torch.float64, torch.float32):
        for causal in (False, True):
            cases.append(pytest.param(dtype, causal, "fwd", id=f"fwd-{str(dtype)[6:]}-{causal}"))
            cases.append(pytest.param(dtype, causal, "bwd", id=f"bwd-{str(dtype)[6:]}-{causal}"))
    return cases


@COMPILED
@pytest.mark.parametrize("dtype,causal,which", _opcheck_cases())
def test_opcheck(path, dtype, causal, which):
    B, T, D, H = 2, 7, 4, 2
    q, k, v, w = (path.leaf(x) for x in qkvw(B, T, D, H, dtype))
    if which == "fwd":
        torch.library.opcheck(OPS.aft_full_fwd.default, (q, k, v, w, causal))
    else:
        y, lse = (t.detach() for t in OPS.aft_full_fwd(q, k, v, w, causal))
        dy = path.put(rand(B, T, D, dtype=dtype))
        args = (dy, q.detach(), k.detach(), v.detach(), w.detach(), y, lse, causal)
        torch.library.opcheck(OPS.aft_full_bwd.default, args)


@COMPILED
def test_torch_compile_fullgraph(path):
    torch._dynamo.reset()
    q, k, v, w = (path.leaf(x) for x in qkvw(2, 7, 4, 2, torch.float32))

    def fn(q, k, v, w):
        return OPS.aft_full_fwd(q, k, v, w, True)[0].sum()

    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = cfn(q, k, v, w)
    g = torch.autograd.grad(out, (q,))[0]
    out_e = fn(q, k, v, w)
    g_e = torch.autograd.grad(out_e, (q,))[0]
    assert maxabs(out, out_e) < 1e-5 and maxabs(g, g_e) < 1e-5


_T = 7


def _bad_cases():
    q, k, v, w = qkvw(2, _T, 4, 2, torch.float32)
    qi = q.to(torch.int64)
    return [
        ((qi, k, v, w), TypeError, "q must be float16, bfloat16, float32 or float64, got torch.int64"),
        ((q, k, v, w[:, :5, :5]), ValueError, "w must have shape (T, T) or (heads, T, T) with T=7, got (2, 5, 5)"),
        (
            (q, k, v, rand(3, _T, _T, dtype=torch.float32)),
            ValueError,
            "w has 3 heads but D=4 is not divisible by it (D % heads must be 0)",
        ),
        ((q, k, v, w.double()), TypeError, "w must have the dtype of q (torch.float32), got torch.float64"),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_cases())))
def test_bad_inputs_same_message_on_every_path(path, idx):
    """The contract functions raise the same exception with the same message on every path (the compiled ops'
    C++ checks included)."""
    args, exc, msg = _bad_cases()[idx]
    with pytest.raises(exc) as info:
        path.fwd(OP, *args, False)
    assert msg in str(info.value)


@pytest.mark.paths("python")
def test_public_function_with_empty_batch(path):
    q, k, v, w = qkvw(0, 70, 4, 2, torch.float32)
    with path.force():
        assert aft_full(q, k, v, w).shape == (0, 70, 4)


# ================================================================ wide key tiles (CPU float32 AVX2 forward)
@COMPILED
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["normal", "k_1e4", "w_1e4", "late_spike"])
def test_tiled_wide_key_tiles(path, causal, case):
    """T = 1100: three 512-key tiles, a partial last one and causal diagonals inside a key tile."""
    B, T, D = 1, 1100, 3
    q, k, v, w = qkvw(B, T, D, None, torch.float64)
    if case == "k_1e4":
        k = k * 1e4
    elif case == "w_1e4":
        w = w * 1e4
    elif case == "late_spike":
        k[:, T - 5, :] += 120
    q, k, v, w = (x.to(torch.float32) for x in (q, k, v, w))
    # float32 tolerance of the suite: 1e-5 + 8 eps L with L the largest |logit| (lse rounds to ~eps L; the late
    # spike's dk = v dv - sum P H cancels two terms of size ~|dv|)
    tol = 1e-5 + 8 * torch.finfo(torch.float32).eps * float(k.abs().max() + w.abs().max())
    tol = tol if case in ("normal", "late_spike") else 2e-3
    contract.check_all(path, OP, q, k, v, w, T, causal, tol, tol, tol_lse=1e-6 if case != "normal" else None)


@pytest.mark.paths("compiled-cpu")
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_bit_identical_across_threads(path, causal):
    q, k, v, w = (x.to(torch.float32) for x in qkvw(2, 700, 12, 2, torch.float64))
    dy = torch.randn(2, 700, 12)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, lse = path.fwd(OP, q, k, v, w, causal)
            outs.append((y, lse, *path.bwd(OP, dy, q, k, v, w, y, lse, causal)))
    finally:
        torch.set_num_threads(n0)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


# ======================================================== whole-sequence key tile (CPU float32 AVX2, non-causal)
@COMPILED
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("T", [300, 1100, 2100])  # 2100: the 512-row query tiles of T >= 2048, a short last one
def test_tiled_whole_tile_few_lost_entries(path, T):
    """Non-causal float32 runs the whole sequence as one key tile (the split max with its failure caught). Here two
    rows of channel 0 lose every product of that split max: their row max of w (key 100) and the column max of k
    (key 70) sit where the other factor is ~e^-160, and their dominant key 90 has both factors ~e^-70. Those few
    (t, c) take the per-element fallback of the forward; the backward's global maxima then put a few dv / dw
    entries over the guard (scale exponent > 42), recomputed exactly in place."""
    q, k, v, w = qkvw(1, T, 2, None, torch.float64)
    k[0, 70, 0], k[0, 100, 0], k[0, 90, 0] = 100.0, -60.0, 30.0
    for t in (3, 7):
        w[t, 100], w[t, 70], w[t, 90] = 100.0, -60.0, 30.0
    q, k, v, w = (x.to(torch.float32) for x in (q, k, v, w))
    tol = 1e-5 + 8 * torch.finfo(torch.float32).eps * float(k.abs().max() + w.abs().max())
    contract.check_all(path, OP, q, k, v, w, T, False, tol, tol)


@COMPILED
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("rows", [slice(None), slice(200, 330)], ids=["all_rows", "rows_200_330"])
def test_tiled_whole_tile_redo_and_decline(path, rows):
    """Many lost (t, c): the forward redoes those query tiles with 512-key merges and the backward declines its
    global-maximum form for the tile-pair one. heads = 2 with |k| and |w| ~ 1e3 only in head 0 (its channels, and
    all or some rows of its w): heads of both kinds in one call, and query tiles of both kinds in one head."""
    B, T, D = 2, 600, 8
    q, k, v, w = qkvw(B, T, D, 2, torch.float64)
    k[:, :, :4] *= 1e3
    w[0, rows] *= 1e3
    q, k, v, w = (x.to(torch.float32) for x in (q, k, v, w))
    contract.check_all(path, OP, q, k, v, w, T, False, 2e-3, 2e-3, tol_lse=1e-6)


@pytest.mark.paths("compiled-cpu")
@pytest.mark.usefixtures("tiled_kernel")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["normal", "w_1e4"])
@pytest.mark.parametrize("T", [300, 1100], ids=lambda t: f"T{t}")  # 1100: several 512-key tiles (causal)
def test_tiled_gemm_without_avx512(path, T, case, causal, monkeypatch):
    """ATTNFREE_CPU_AVX512=0: the float32 forward's GEMMs take at::mm instead of the AVX-512 tile GEMM
    (common/cpu_tile_gemm.h; the path of CPUs without AVX-512); both agree with the oracle, and with each other to
    float32 rounding. Key lengths past 64 (the tile GEMM's slice) and partial slices, whole and merged key tiles."""
    q, k, v, w = qkvw(2, T, 6, 2, torch.float64)
    if case == "w_1e4":
        w = w * 1e4
    q, k, v, w = (x.to(torch.float32) for x in (q, k, v, w))
    # float32: 1e-5 + 8 eps L, L the largest |logit| (P carries the float32 lse's rounding, ~eps L)
    tol = 1e-5 + 8 * torch.finfo(torch.float32).eps * float(k.abs().max() + w.abs().max())
    monkeypatch.setenv("ATTNFREE_CPU_AVX512", "0")
    contract.check_all(path, OP, q, k, v, w, T, causal, tol, tol, tol_lse=1e-6 if case != "normal" else None)
    y0, l0 = path.fwd(OP, q, k, v, w, causal)
    monkeypatch.delenv("ATTNFREE_CPU_AVX512")
    contract.check_all(path, OP, q, k, v, w, T, causal, tol, tol, tol_lse=1e-6 if case != "normal" else None)
    y1, l1 = path.fwd(OP, q, k, v, w, causal)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    # two different GEMMs ran: not bit-identical (the w_1e4 case may end on the per-element paths)
    if case == "normal" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not torch.equal(y0, y1)


@pytest.mark.paths("emulation", "cuda")
@pytest.mark.parametrize("op", [OP, "aft_full_lowrank"])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_follows_matmul_precision(path, op, causal):
    """float32 forward: 3xTF32 under get_float32_matmul_precision() "highest" (~1e-6 relative), plain TF32 under
    "high" (~1e-3): the binding's flag reaches the tensor-core launcher."""
    B, T, D, heads = 2, 70, 16, 2
    q, k, v, w = qkvw(B, T, D, heads, torch.float32, w_scale=0.5)
    if op == OP:
        args = (w,)
        y_ref = oracles.aft(q.double(), k.double(), v.double(), w.double(), causal)
    else:
        u = rand(heads, T, 3, dtype=torch.float32) * 0.5
        vb = rand(heads, T, 3, dtype=torch.float32) * 0.5
        args = (u, vb)
        y_ref = oracles.aft(q.double(), k.double(), v.double(), u.double() @ vb.double().transpose(-1, -2), causal)
    errs = {}
    old = torch.get_float32_matmul_precision()
    try:
        for prec in ("highest", "high"):
            torch.set_float32_matmul_precision(prec)
            y, _ = path.fwd(op, q, k, v, *args, causal)
            errs[prec] = (y.double() - y_ref).abs().max().item() / y_ref.abs().max().item()
    finally:
        torch.set_float32_matmul_precision(old)
    assert errs["highest"] < 2e-6, errs
    assert 1e-5 < errs["high"] < 5e-3, errs


@pytest.mark.paths("emulation", "cuda")
@pytest.mark.parametrize("rank", [37, 300])
@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_forward_factors_resident_or_chunked(path, rank, causal):
    """The tensor-core forward keeps the factors in shared memory when they fit (rank 37) and builds its w tiles
    from 32-rank chunks otherwise (rank 300): both against the float64 oracle."""
    B, T, D, heads = 1, 70, 8, 2
    q, k, v, _ = qkvw(B, T, D, heads, torch.float32)
    u, vb = _factors(T, heads, rank, torch.float32)
    u, vb = u * (4 / rank) ** 0.5, vb * (4 / rank) ** 0.5  # |w| ~ 1 at any rank
    y, lse = path.fwd("aft_full_lowrank", q, k, v, u, vb, causal)
    y_ref = oracles.aft(q, k, v, u.double() @ vb.double().transpose(-1, -2), causal)
    assert err(y, y_ref) < 1e-5
    assert torch.isfinite(lse).all()
