"""AFT-simple, pure-PyTorch path (attnfree_ext/ops/aft_simple.py, ops/_scan.py) against tests/oracles.py.

Error measure: max-abs error divided by a scale (the oracle's max-abs value; for dk also max|v| * max|dv|, the
size of the two terms that cancel in dk = v dv - sum P H). float64 tolerance 1e-10, float32 1e-5, both plus
8 * eps * L where L is the largest |logit|: log-domain scans round to ~eps * |value|, and lse is stored in the
compute dtype, so large logits (|k| ~ 1e4, late spikes of 3000) cost a relative error ~eps * L.
fp16/bf16: flash-attention's rule -- max-abs error vs the float64 oracle <= 2x that of the plain-PyTorch eager
formula run in the same low dtype, plus a tiny absolute floor.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import oracles
from attnfree_ext import force_backend
from attnfree_ext.ops import _scan
from attnfree_ext.ops.aft_simple import aft_simple, aft_simple_bwd_ref, aft_simple_fwd_ref

F64, F32 = torch.float64, torch.float32
BASE_TOL = {F64: 1e-10, F32: 1e-5}
SHAPES = [(2, 13, 6), (1, 1, 1), (1, 37, 1), (3, 7, 5), (2, 1, 4), (1, 2, 3)]


def _inputs(shape, dtype, k_scale=1.0):
    q, k, v = (torch.randn(*shape, dtype=F64) for _ in range(3))
    return q.to(dtype), (k * k_scale).to(dtype), v.to(dtype)


def _tol(dtype, logit_max):
    eps = torch.finfo(dtype).eps
    return BASE_TOL[dtype] + 8 * eps * float(logit_max)


def _err(a, b, scale=None):
    """max|a - b| / scale, scale = max|b| unless given (and at least 1e-30)."""
    assert torch.isfinite(a).all(), "non-finite values"
    s = b.abs().max().item() if scale is None else scale
    return (a.double() - b.double()).abs().max().item() / max(s, 1e-30)


def _oracle(q, k, v, dy, causal):
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    y = oracles.aft_simple(qd, kd, vd, causal)
    grads = torch.autograd.grad(y, (qd, kd, vd), dy.double())
    return y.detach(), grads


def _oracle_lse(k, causal):
    kd = k.double()
    if causal:
        return torch.logcumsumexp(kd, dim=1)
    return torch.logsumexp(kd, dim=1, keepdim=True).expand_as(kd)


def _check_all(y, grads, yo, go, v, tol):
    dq, dk, dv = grads
    oq, ok, ov = go
    assert _err(y, yo) < tol, _err(y, yo)
    assert _err(dq, oq) < tol, _err(dq, oq)
    assert _err(dv, ov) < tol, _err(dv, ov)
    dk_scale = max(ok.abs().max().item(), v.double().abs().max().item() * ov.abs().max().item())
    assert _err(dk, ok, dk_scale) < tol, _err(dk, ok, dk_scale)


def _run_public(q, k, v, dy, causal):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    with force_backend("python"):
        y = aft_simple(q, k, v, causal=causal)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    return y.detach(), grads


# ---------------------------------------------------------------- scan helpers


@pytest.mark.parametrize("dtype", [F32, F64])
def test_logcumsumexp_neg_inf_prefix(dtype):
    inf = float("inf")
    x = torch.full((2, 6, 3), -inf, dtype=dtype)
    x[:, 3, 1] = 2.0
    x[:, 0, 2] = -1.0
    out = _scan.lcse(x)
    assert not out.isnan().any()
    assert torch.isneginf(out[:, :, 0]).all()  # all -inf column stays -inf
    assert torch.isneginf(out[:, :3, 1]).all() and (out[:, 3:, 1] == 2.0).all()
    assert (out[:, :, 2] == -1.0).all()
    assert (torch.exp(out[:, :3, 1]) == 0).all()
    rev = _scan.rlcse(x)
    assert not rev.isnan().any()
    assert (rev[:, :4, 1] == 2.0).all() and torch.isneginf(rev[:, 4:, 1]).all()
    # log(0) inputs from the signed split (v == 0 everywhere): means are exactly 0, not NaN
    k = torch.randn(2, 6, 3, dtype=dtype)
    lse, mean = _scan.prefix_summary(k, torch.zeros_like(k))
    assert torch.isfinite(lse).all() and (mean == 0).all()
    assert (_scan.rows_after(k, -lse, torch.zeros_like(k)) == 0).all()


@pytest.mark.parametrize("s", [0, 1, 3, 6, 9])
def test_scan_helpers_match_naive(s):
    B, T, D = 2, 7, 3
    k, v, a, g = (torch.randn(B, T, D, dtype=F64) for _ in range(4))
    lse, mean = _scan.prefix_summary(k, v)
    slse, smean = _scan.suffix_summary(k, v)
    after = _scan.rows_after(k, a, g, s)
    before = _scan.rows_before(k, a, g, s)
    for t in range(T):
        p = torch.softmax(k[:, : t + 1], dim=1)
        torch.testing.assert_close(lse[:, t], torch.logsumexp(k[:, : t + 1], dim=1))
        torch.testing.assert_close(mean[:, t], (p * v[:, : t + 1]).sum(1))
        ps = torch.softmax(k[:, t:], dim=1)
        torch.testing.assert_close(slse[:, t], torch.logsumexp(k[:, t:], dim=1))
        torch.testing.assert_close(smean[:, t], (ps * v[:, t:]).sum(1))
        ref_after = (torch.exp(k[:, t : t + 1] + a[:, t + s :]) * g[:, t + s :]).sum(1)
        ref_before = (torch.exp(k[:, t : t + 1] + a[:, : max(t - s + 1, 0)]) * g[:, : max(t - s + 1, 0)]).sum(1)
        torch.testing.assert_close(after[:, t], ref_after)
        torch.testing.assert_close(before[:, t], ref_before)
    x = torch.arange(5.0)[None, :, None]
    assert _scan.shift(x, 2, -1.0).flatten().tolist() == [-1, -1, 0, 1, 2]
    assert _scan.shift(x, -2, -1.0).flatten().tolist() == [2, 3, 4, -1, -1]
    assert _scan.shift(x, 7, -1.0).flatten().tolist() == [-1] * 5


# ---------------------------------------------------------------- accuracy against the oracle


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle(shape, causal, dtype):
    q, k, v = _inputs(shape, dtype)
    dy = torch.randn(*shape, dtype=dtype)
    y, grads = _run_public(q, k, v, dy, causal)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    yo, go = _oracle(q, k, v, dy, causal)
    _check_all(y, grads, yo, go, v, _tol(dtype, k.abs().max()))


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_refs_directly(causal, dtype):
    """The *_fwd_ref / *_bwd_ref contract shared with the compiled path: (y, lse) and (dq, dk, dv)."""
    shape = (2, 11, 4)
    q, k, v = _inputs(shape, dtype)
    dy = torch.randn(*shape, dtype=dtype)
    y, lse = aft_simple_fwd_ref(q, k, v, causal)
    ct = F64 if dtype == F64 else F32
    assert y.dtype == dtype and y.shape == shape
    assert lse.dtype == ct and lse.shape == shape and lse.is_contiguous()
    dq, dk, dv = aft_simple_bwd_ref(dy, q, k, v, y, lse, causal)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    yo, go = _oracle(q, k, v, dy, causal)
    tol = _tol(ct, 10) if dtype != torch.bfloat16 else 2e-2
    assert _err(lse, _oracle_lse(k, causal)) < tol
    _check_all(y, (dq, dk, dv), yo, go, v, tol)


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(causal):
    B, T, D = 2, 13, 5
    q, k, v = (torch.randn(B, D, T, dtype=F64).transpose(1, 2) for _ in range(3))
    dy = torch.randn(B, D, T, dtype=F64).transpose(1, 2)
    assert not q.is_contiguous()
    y, grads = _run_public(q, k, v, dy, causal)
    yo, go = _oracle(q, k, v, dy, causal)
    _check_all(y, grads, yo, go, v, 1e-10)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["k_1e4", "late_spike", "early_spike", "spike_every_channel"])
def test_adversarial(case, causal, dtype):
    """|k| ~ 1e4 and the causal late spike (a key > every earlier key by 3000): finite and matching."""
    shape = (2, 13, 6)
    q, k, v = _inputs(shape, F64)
    if case == "k_1e4":
        k = k * 1e4
    elif case == "late_spike":
        k[:, -3, :] += 3000
    elif case == "early_spike":
        k[:, 1, :] += 3000
    else:
        k[:, torch.arange(6) % 13 + 4, torch.arange(6)] += 3000.0
    q, k, v = (x.to(dtype) for x in (q, k, v))
    dy = torch.randn(*shape, dtype=dtype)
    y, grads = _run_public(q, k, v, dy, causal)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    yo, go = _oracle(q, k, v, dy, causal)
    _check_all(y, grads, yo, go, v, _tol(dtype, k.abs().max()))


def _eager_low(q, k, v, causal):
    """Plain-PyTorch AFT-simple in the inputs' own (low) dtype: the baseline of the 2x rule."""
    T = q.shape[1]
    logits = k[:, None, :, :].expand(-1, T, -1, -1)
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    p = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (p * v[:, None]).sum(dim=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_precision_2x_rule(seed, causal, dtype):
    torch.manual_seed(seed)
    shape = (2, 37, 8)
    q, k, v = _inputs(shape, dtype)
    dy = torch.randn(*shape, dtype=dtype)
    y, grads = _run_public(q, k, v, dy, causal)
    assert y.dtype == dtype
    qe, ke, ve = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ye = _eager_low(qe, ke, ve, causal)
    ge = torch.autograd.grad(ye, (qe, ke, ve), dy)
    yo, go = _oracle(q, k, v, dy, causal)
    floor = 1e-4
    for ours, eager, ref in zip((y, *grads), (ye, *ge), (yo, *go)):
        e_ours = (ours.double() - ref).abs().max().item()
        e_eager = (eager.double() - ref).abs().max().item()
        assert torch.isfinite(ours).all()
        assert e_ours <= 2 * e_eager + floor * ref.abs().max().item(), (e_ours, e_eager)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = (torch.randn(2, 5, 3, dtype=F64, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        with force_backend("python"):
            return aft_simple(q, k, v, causal=causal)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_input_validation():
    q = torch.randn(2, 5, 3)
    with pytest.raises(ValueError):
        aft_simple(q, q, q[:, :4])
    with pytest.raises(ValueError):
        aft_simple(q[0], q[0], q[0])
    with pytest.raises(TypeError):
        aft_simple(q, q.double(), q)
    with pytest.raises(TypeError):
        aft_simple(q.long(), q.long(), q.long())
    with pytest.raises(TypeError):
        aft_simple(q, q, q.numpy())


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
def test_memory_no_btt_tensor(causal):
    """No op of the python path (forward or backward) produces a tensor larger than B*T*D elements."""
    B, T, D = 2, 64, 4
    q, k, v = (torch.randn(B, T, D, requires_grad=True) for _ in range(3))
    with _MaxNumel() as mode, force_backend("python"):
        y = aft_simple(q, k, v, causal=causal)
        y.sum().backward()
    assert mode.max_numel <= B * T * D, mode.max_numel
