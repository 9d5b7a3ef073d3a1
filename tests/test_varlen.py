"""Packed variable-length sequences (cu_seqlens, docs/design.md §9.3) on aft_full, aft_local and aft_simple: equal to
running each sequence alone (float64 oracles), forward and backward, causal and not; bad cu_seqlens refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnfree_ext
from attnfree_ext import aft_full, aft_local, aft_simple
from attnfree_ext.ops.common.features import backend_info
from attnfree_ext.ops.common.state import empty_state
from common import oracles
from common.metrics import err, maxabs

OPS = ("aft_simple", "aft_local", "aft_full")


def _call(op, q, k, v, w, causal, **kw):
    if op == "aft_simple":
        return aft_simple(q, k, v, causal, **kw)
    if op == "aft_local":
        return aft_local(q, k, v, w, 3, causal, **kw)
    return aft_full(q, k, v, w, causal, **kw)


def _oracle(op, q, k, v, w, causal):
    if op == "aft_simple":
        return oracles.aft_simple(q, k, v, causal)
    if op == "aft_local":
        return oracles.aft_local(q, k, v, w, 3, causal)
    return oracles.aft(q, k, v, w, causal)


def _per_sequence(op, q, k, v, w, causal, lengths):
    """Each sequence alone, with w[..., :len, :len] (positions restart at 0)."""
    out, a = [], 0
    for n in lengths:
        b = a + n
        if n:
            out.append(_oracle(op, q[:, a:b], k[:, a:b], v[:, a:b], w[..., :n, :n], causal))
        a = b
    return torch.cat(out, dim=1)


def _packed(lengths, D, heads, dtype=torch.float64, idx_dtype=torch.int32, extra=0):
    total = sum(lengths)
    q, k, v = (torch.randn(1, total, D, dtype=torch.float64).to(dtype) for _ in range(3))
    L = max(lengths) + extra
    w = torch.randn(*(() if heads is None else (heads,)), L, L, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=idx_dtype)
    return q, k, v, w, cu


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_varlen_forward_backward_equal_per_sequence(op, causal, heads):
    lengths = [5, 0, 1, 9, 3]
    q, k, v, w, cu = _packed(lengths, 4, heads, extra=2)  # w larger than the longest sequence: sliced
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    y = _call(op, *xs, causal, cu_seqlens=cu)
    ref = _per_sequence(op, *xs, causal, lengths)
    assert y.shape == q.shape and err(y, ref) <= 1e-12
    g = torch.randn_like(y)
    want = [x for x in xs if op != "aft_simple" or x is not w]
    ga = torch.autograd.grad(y, want, g)
    gb = torch.autograd.grad(ref, want, g, allow_unused=True, materialize_grads=True)
    for a, b in zip(ga, gb):
        assert err(a, b) <= 1e-12


@pytest.mark.parametrize("op", OPS)
def test_varlen_gradcheck(op):
    q, k, v, w, cu = _packed([3, 1, 2], 2, None, idx_dtype=torch.int64)
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    for causal in (False, True):
        if op == "aft_simple":

            def f(q, k, v, causal=causal):
                return aft_simple(q, k, v, causal, cu_seqlens=cu)

            assert torch.autograd.gradcheck(f, tuple(xs[:3]))
        else:

            def g(q, k, v, w, causal=causal):
                return _call(op, q, k, v, w, causal, cu_seqlens=cu)

            assert torch.autograd.gradcheck(g, tuple(xs))


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=5).filter(lambda ls: sum(ls) > 0))
def test_varlen_random_lengths(lengths):
    for op in OPS:
        for causal in (False, True):
            q, k, v, w, cu = _packed(lengths, 3, 3 if op == "aft_full" else None)
            assert (
                err(_call(op, q, k, v, w, causal, cu_seqlens=cu), _per_sequence(op, q, k, v, w, causal, lengths))
                <= 1e-12
            )


@pytest.mark.parametrize("op", OPS)
def test_varlen_bf16_2x_rule(op):
    lengths = [7, 12, 4]
    q, k, v, w, cu = _packed(lengths, 16, None, dtype=torch.bfloat16)
    for causal in (False, True):
        ref = _per_sequence(op, q, k, v, w, causal, lengths)
        y = _call(op, q, k, v, w, causal, cu_seqlens=cu)
        assert y.dtype == torch.bfloat16
        eager, a = [], 0
        for n in lengths:
            ww = None if op == "aft_simple" else (oracles.local_bias(w[:n, :n], 3) if op == "aft_local" else w[:n, :n])
            eager.append(oracles.aft_eager(q[:, a : a + n], k[:, a : a + n], v[:, a : a + n], ww, causal))
            a += n
        assert maxabs(y, ref) <= 2 * maxabs(torch.cat(eager, 1), ref) + 1e-3


def test_varlen_aft_simple_with_state_per_sequence():
    lengths = [4, 6]
    q, k, v, _, cu = _packed(lengths, 3, None)
    s0 = torch.stack([torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3) + 0.5], 1).double()
    y, s = aft_simple(q, k, v, True, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert s.shape == (2, 3, 3)
    for i, (a, b) in enumerate([(0, 4), (4, 10)]):
        yi, si = aft_simple(q[:, a:b], k[:, a:b], v[:, a:b], True, initial_state=s0[i : i + 1], output_final_state=True)
        assert (
            err(y[:, a:b], yi) <= 1e-12
            and err(s[i : i + 1, 1:] * s[i : i + 1, :1].exp(), si[:, 1:] * si[:, :1].exp()) <= 1e-12
        )


def test_varlen_python_path_reported():
    q, k, v, w, cu = _packed([2, 3], 2, None, dtype=torch.float32)
    info = backend_info("aft_full", q, k, v, w, cu_seqlens=cu)
    assert info["selected"] == "python" and "cu_seqlens" in info["summary"]
    with attnfree_ext.force_backend("compiled"), pytest.raises(RuntimeError, match="cu_seqlens"):
        aft_local(q, k, v, w, 2, True, cu_seqlens=cu)


@pytest.mark.parametrize("op", OPS)
def test_varlen_bad_cu_seqlens(op):
    q, k, v, w, cu = _packed([2, 3], 2, None)
    bad = [
        (TypeError, "cu_seqlens must be a torch.Tensor", [0, 2, 5]),
        (TypeError, "cu_seqlens must be int32 or int64", cu.double()),
        (ValueError, r"cu_seqlens must have shape \(N \+ 1,\)", cu[None]),
        (ValueError, r"cu_seqlens must have shape \(N \+ 1,\)", cu[:0]),
        (ValueError, "cu_seqlens must start at 0", torch.tensor([1, 2, 5])),
        (ValueError, "cu_seqlens must be non-decreasing", torch.tensor([0, 3, 2, 5])),
        (ValueError, "cu_seqlens must end at total_T", torch.tensor([0, 2, 4])),
    ]
    for exc, msg, c in bad:
        with pytest.raises(exc, match=msg):
            _call(op, q, k, v, w, False, cu_seqlens=c)
    with pytest.raises(ValueError, match=r"packed as \(1, total_T, D\)"):
        _call(op, q.expand(2, -1, -1), k.expand(2, -1, -1), v.expand(2, -1, -1), w, False, cu_seqlens=cu)
    if op != "aft_simple":
        with pytest.raises(ValueError, match="covering the longest sequence"):
            _call(op, q, k, v, w[:2, :2], False, cu_seqlens=cu)
    else:
        with pytest.raises(ValueError, match=r"initial_state must have shape \(B, 3, D\) = \(2, 3, 2\)"):
            aft_simple(q, k, v, True, initial_state=empty_state(1, 2, torch.float64, "cpu"), cu_seqlens=cu)
