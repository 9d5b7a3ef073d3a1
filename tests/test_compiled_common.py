"""Shared helpers for tests/test_compiled_*.py (compiled C++ ops vs the float64 oracles); holds no tests."""
from __future__ import annotations

import pytest
import torch

import oracles

_C = pytest.importorskip("attnfree_ext._C", reason="compiled extension attnfree_ext._C not built")
from attnfree_ext import _backend  # noqa: E402

OPS = torch.ops.attnfree


def rand(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def bias_per_channel(w, D):
    return oracles._bias_per_channel(w.double(), D)


def lse_oracle(k, wfull, causal):
    """float64 lse[b, t, c] = logsumexp_t' (k[b, t', c] + wfull[t, t', c]) over visible keys."""
    k = k.double()
    B, T, D = k.shape
    logits = wfull[None] + k[:, None]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    return torch.logsumexp(logits, dim=2)


def call_fwd(op, q, k, v, w, window, causal):
    if op == "aft_full":
        return OPS.aft_full_fwd(q, k, v, w, causal)
    if op == "aft_local":
        return OPS.aft_local_fwd(q, k, v, w, window, causal)
    return OPS.aft_simple_fwd(q, k, v, causal)


def call_bwd(op, dy, q, k, v, w, y, lse, window, causal):
    if op == "aft_full":
        return OPS.aft_full_bwd(dy, q, k, v, w, y, lse, causal)
    if op == "aft_local":
        return OPS.aft_local_bwd(dy, q, k, v, w, y, lse, window, causal)
    return OPS.aft_simple_bwd(dy, q, k, v, y, lse, causal)


def oracle(op, q, k, v, w, window, causal):
    if op == "aft_full":
        return oracles.aft(q, k, v, w, causal)
    if op == "aft_local":
        return oracles.aft_local(q, k, v, w, window, causal)
    return oracles.aft_simple(q, k, v, causal)


def oracle_wfull(op, w, window, T, D):
    if op == "aft_full":
        return bias_per_channel(w, D)
    if op == "aft_local":
        return bias_per_channel(oracles.local_bias(w.double(), window), D)
    return torch.zeros(T, T, D, dtype=torch.float64)


def oracle_grads(op, q, k, v, w, window, causal, dy):
    """float64 gradients (dq, dk, dv[, dw]) of the oracle for upstream dy."""
    ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
    if op != "aft_simple":
        ins.append(w.detach().double().requires_grad_())
        y = oracle(op, *ins[:3], ins[3], window, causal)
    else:
        y = oracle(op, *ins, None, window, causal)
    return y.detach(), torch.autograd.grad(y, ins, dy.double())


def eager_lowp(op, q, k, v, w, window, causal):
    """Plain-PyTorch eager AFT in the inputs' own (low) dtype: the reference error for the 2x rule."""
    B, T, D = q.shape
    dt = q.dtype
    if op == "aft_simple":
        wf = torch.zeros(T, T, D, dtype=dt)
    else:
        wl = oracles.local_bias(w, window) if op == "aft_local" else w
        wf = oracles._bias_per_channel(wl, D)
    logits = wf[None] + k[:, None]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    p = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (p * v[:, None]).sum(dim=2)


def maxabs(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
