"""AFT-local, pure-PyTorch path (attnfree_ext/ops/aft_local.py) against tests/oracles.py.

Error measure: max-abs error divided by a scale: the oracle's max-abs value; for dk also max|v| * max|dv| (the
terms that cancel in dk = v dv - sum P H); for dw also B * D/heads * max|dy| * max|v| (the size of the summed
terms P (G v - H)). float64 tolerance 1e-10, float32 1e-5, both plus 8 * eps * L with L the largest |logit|
(|k| + |w|): log-domain scans and the stored lse round to ~eps * |value|.
fp16/bf16: flash-attention's rule -- max-abs error vs the float64 oracle <= 2x that of the plain-PyTorch eager
formula in the same low dtype, plus a tiny absolute floor.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oracles
from attnfree_ext import force_backend
from attnfree_ext.ops import aft_local as aft_local_mod
from attnfree_ext.ops.aft_local import aft_local, aft_local_bwd_ref, aft_local_fwd_ref

F64, F32 = torch.float64, torch.float32
BASE_TOL = {F64: 1e-10, F32: 1e-5}


def _inputs(B, T, D, heads, dtype, k_scale=1.0, w_scale=1.0):
    q, k, v = (torch.randn(B, T, D, dtype=F64) for _ in range(3))
    w = torch.randn(T, T, dtype=F64) if heads == 0 else torch.randn(heads, T, T, dtype=F64)
    return q.to(dtype), (k * k_scale).to(dtype), v.to(dtype), (w * w_scale).to(dtype)


def _tol(dtype, k, w):
    eps = torch.finfo(dtype).eps
    return BASE_TOL[dtype] + 8 * eps * (k.abs().max().item() + w.abs().max().item())


def _err(a, b, scale=None):
    assert torch.isfinite(a).all(), "non-finite values"
    s = b.abs().max().item() if scale is None else scale
    return (a.double() - b.double()).abs().max().item() / max(s, 1e-30)


def _oracle(q, k, v, w, window, dy, causal):
    qd, kd, vd, wd = (x.detach().double().requires_grad_() for x in (q, k, v, w))
    y = oracles.aft_local(qd, kd, vd, wd, window, causal)
    return y.detach(), torch.autograd.grad(y, (qd, kd, vd, wd), dy.double())


def _oracle_lse(k, w, window, causal):
    B, T, D = k.shape
    wb = oracles._bias_per_channel(oracles.local_bias(w.double(), window), D)
    logits = wb[None] + k.double()[:, None]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    return torch.logsumexp(logits, dim=2)


def _check_all(y, grads, yo, go, v, w, dy, tol):
    dq, dk, dv, dw = grads
    oq, ok, ov, ow = go
    B, T, D = v.shape
    dh = D // (w.shape[0] if w.dim() == 3 else 1)
    assert _err(y, yo) < tol, ("y", _err(y, yo))
    assert _err(dq, oq) < tol, ("dq", _err(dq, oq))
    assert _err(dv, ov) < tol, ("dv", _err(dv, ov))
    vmax = v.double().abs().max().item()
    dk_scale = max(ok.abs().max().item(), vmax * ov.abs().max().item())
    assert _err(dk, ok, dk_scale) < tol, ("dk", _err(dk, ok, dk_scale))
    dw_scale = max(ow.abs().max().item(), B * dh * dy.double().abs().max().item() * vmax)
    assert _err(dw, ow, dw_scale) < tol, ("dw", _err(dw, ow, dw_scale))


def _run_public(q, k, v, w, window, dy, causal):
    q, k, v, w = (x.detach().clone().requires_grad_() for x in (q, k, v, w))
    with force_backend("python"):
        y = aft_local(q, k, v, w, window, causal=causal)
    return y.detach(), torch.autograd.grad(y, (q, k, v, w), dy)


def _band(T, window, causal=False):
    idx = torch.arange(T)
    rel = idx[:, None] - idx[None, :]
    band = rel.abs() < window
    return band & (rel >= 0) if causal else band


# ---------------------------------------------------------------- accuracy against the oracle

CASES = [  # (B, T, D, heads) ; heads == 0 means a 2-D (T, T) w
    (2, 13, 6, 0),
    (2, 13, 6, 3),
    (1, 37, 4, 2),
    (1, 1, 1, 0),
    (3, 7, 5, 5),
    (1, 2, 1, 1),
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 7, 40])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_oracle(case, window, causal, dtype):
    B, T, D, heads = case
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=dtype)
    y, grads = _run_public(q, k, v, w, window, dy, causal)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert grads[3].shape == w.shape
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, _tol(dtype, k, w))


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 11])
def test_refs_directly(window, causal, dtype):
    """The *_fwd_ref / *_bwd_ref contract shared with the compiled path: (y, lse) and (dq, dk, dv, dw)."""
    B, T, D, heads = 2, 11, 4, 2
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=dtype)
    y, lse = aft_local_fwd_ref(q, k, v, w, window, causal)
    ct = F64 if dtype == F64 else F32
    assert y.dtype == dtype and y.shape == (B, T, D)
    assert lse.dtype == ct and lse.shape == (B, T, D)
    dq, dk, dv, dw = aft_local_bwd_ref(dy, q, k, v, w, y, lse, window, causal)
    assert dq.dtype == dk.dtype == dv.dtype == dw.dtype == dtype and dw.shape == w.shape
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    tol = _tol(ct, k, w) if dtype != torch.bfloat16 else 3e-2
    assert _err(lse, _oracle_lse(k, w, window, causal)) < tol
    _check_all(y, (dq, dk, dv, dw), yo, go, v, w, dy, tol)


@pytest.mark.parametrize("causal", [False, True])
def test_window_limits(causal):
    """window >= T is aft_full with w everywhere; window == 1 keeps only w's diagonal."""
    B, T, D = 2, 9, 4
    q, k, v, w = _inputs(B, T, D, 2, F64)
    with force_backend("python"):
        full = aft_local(q, k, v, w, T, causal=causal)
        huge = aft_local(q, k, v, w, 10 * T, causal=causal)
        diag = aft_local(q, k, v, w, 1, causal=causal)
    torch.testing.assert_close(full, oracles.aft(q, k, v, w, causal), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(huge, full, rtol=1e-12, atol=1e-12)
    wdiag = torch.diag_embed(torch.diagonal(w, dim1=-2, dim2=-1))
    torch.testing.assert_close(diag, oracles.aft(q, k, v, wdiag, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [2, 5])
def test_reads_only_the_band(window, causal):
    """w outside the band is never used (NaN there changes nothing) and gets a zero gradient."""
    B, T, D = 2, 10, 3
    q, k, v, w = _inputs(B, T, D, 0, F64)
    dy = torch.randn(B, T, D, dtype=F64)
    band = _band(T, window)
    w_nan = w.masked_fill(~band, float("nan"))
    y1, g1 = _run_public(q, k, v, w, window, dy, causal)
    y2, g2 = _run_public(q, k, v, w_nan, window, dy, causal)
    assert torch.isfinite(y2).all() and all(torch.isfinite(g).all() for g in g2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    visible = _band(T, window, causal)
    assert (g1[3][~visible] == 0).all()


@pytest.mark.parametrize("factor", [1, 2, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_chunk_size_does_not_matter(factor, causal, monkeypatch):
    B, T, D = 2, 23, 4
    q, k, v, w = _inputs(B, T, D, 2, F64)
    dy = torch.randn(B, T, D, dtype=F64)
    ref = _run_public(q, k, v, w, 4, dy, causal)
    monkeypatch.setattr(aft_local_mod, "_BLOCK_FACTOR", factor)
    got = _run_public(q, k, v, w, 4, dy, causal)
    for a, b in zip((ref[0], *ref[1]), (got[0], *got[1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [0, 2])
def test_non_contiguous(heads, causal):
    B, T, D = 2, 13, 4
    q, k, v = (torch.randn(B, D, T, dtype=F64).transpose(1, 2) for _ in range(3))
    w = torch.randn(T, T, dtype=F64).t() if heads == 0 else torch.randn(T, T, heads, dtype=F64).permute(2, 0, 1)
    dy = torch.randn(B, D, T, dtype=F64).transpose(1, 2)
    assert not (q.is_contiguous() or w.is_contiguous())
    y, grads = _run_public(q, k, v, w, 3, dy, causal)
    yo, go = _oracle(q, k, v, w, 3, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, 1e-10)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 13])
@pytest.mark.parametrize("case", ["k_1e4", "w_1e4", "late_spike", "early_spike"])
def test_adversarial(case, window, causal, dtype):
    """|k|, |w| ~ 1e4 and causal late/early spikes of 3000: finite and matching the oracle."""
    B, T, D = 2, 13, 6
    q, k, v, w = _inputs(B, T, D, 3, F64, k_scale=1e4 if case == "k_1e4" else 1.0,
                         w_scale=1e4 if case == "w_1e4" else 1.0)
    if case == "late_spike":
        k[:, -3, :] += 3000
    elif case == "early_spike":
        k[:, 1, :] += 3000
    q, k, v, w = (x.to(dtype) for x in (q, k, v, w))
    dy = torch.randn(B, T, D, dtype=dtype)
    y, grads = _run_public(q, k, v, w, window, dy, causal)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, _tol(dtype, k, w))


def _eager_low(q, k, v, w, window, causal):
    """Plain-PyTorch AFT-local in the inputs' own (low) dtype: the baseline of the 2x rule."""
    T, D = q.shape[1], q.shape[2]
    wb = oracles._bias_per_channel(oracles.local_bias(w, window), D)  # stays in w's dtype
    logits = wb[None] + k[:, None]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    p = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (p * v[:, None]).sum(dim=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 37])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_precision_2x_rule(seed, window, causal, dtype):
    torch.manual_seed(seed)
    B, T, D = 2, 37, 4
    q, k, v, w = _inputs(B, T, D, 2, dtype)
    dy = torch.randn(B, T, D, dtype=dtype)
    y, grads = _run_public(q, k, v, w, window, dy, causal)
    assert y.dtype == dtype and grads[3].dtype == dtype
    qe, ke, ve, we = (x.detach().clone().requires_grad_() for x in (q, k, v, w))
    ye = _eager_low(qe, ke, ve, we, window, causal)
    ge = torch.autograd.grad(ye, (qe, ke, ve, we), dy)
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    for name, ours, eager, ref in zip("y q k v w".split(), (y, *grads), (ye, *ge), (yo, *go)):
        e_ours = (ours.double() - ref).abs().max().item()
        e_eager = (eager.double() - ref).abs().max().item()
        assert torch.isfinite(ours).all()
        assert e_ours <= 2 * e_eager + 1e-4 * ref.abs().max().item(), (name, e_ours, e_eager)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [0, 2])
@pytest.mark.parametrize("window", [1, 2, 5])
def test_gradcheck(window, heads, causal):
    T = 5
    q, k, v = (torch.randn(2, T, 2, dtype=F64, requires_grad=True) for _ in range(3))
    w = torch.randn(*(() if heads == 0 else (heads,)), T, T, dtype=F64, requires_grad=True)

    def f(q, k, v, w):
        with force_backend("python"):
            return aft_local(q, k, v, w, window, causal=causal)

    assert torch.autograd.gradcheck(f, (q, k, v, w))


def test_input_validation():
    B, T, D = 2, 5, 4
    q = torch.randn(B, T, D)
    w = torch.randn(T, T)
    with pytest.raises(ValueError):
        aft_local(q, q, q, torch.randn(T, T + 1), 2)
    with pytest.raises(ValueError):
        aft_local(q, q, q, torch.randn(3, T, T), 2)  # D % heads != 0
    with pytest.raises(ValueError):
        aft_local(q, q, q, w, 0)
    with pytest.raises(TypeError):
        aft_local(q, q, q, w, 2.0)
    with pytest.raises(TypeError):
        aft_local(q, q, q, w.double(), 2)
    with pytest.raises(TypeError):
        aft_local(q, q.half(), q, w, 2)
    with pytest.raises(ValueError):
        aft_local(q, q, q[:, :3], w, 2)
    with pytest.raises(ValueError):
        aft_local(q, q, q, w.to("meta"), 2)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 8, 64])
def test_memory_bound(window, causal):
    """No op produces more than O(B*T*D + T*window) elements: the band block is <= ~4*B*T*D, dw is (T, T)."""
    B, T, D = 2, 64, 4
    q, k, v = (torch.randn(B, T, D, requires_grad=True) for _ in range(3))
    w = torch.randn(T, T, requires_grad=True)
    with _MaxNumel() as mode, force_backend("python"):
        y = aft_local(q, k, v, w, window, causal=causal)
        y.sum().backward()
    assert mode.max_numel <= max(4 * B * T * D + B * T * D, T * T), mode.max_numel
