"""The AFT contract (``<op>_fwd`` -> (y, lse), ``<op>_bwd`` -> grads) of aft_full, aft_local and aft_simple, called
the same way for every op and path, and checked against the float64 oracles (written once for the three op test
files)."""

from __future__ import annotations

import torch

from . import oracles
from .inputs import rand
from .metrics import maxabs

__all__ = ["fwd", "bwd", "oracle", "oracle_wfull", "oracle_grads", "eager_lowp", "check_all"]


def fwd(path, op, q, k, v, w, window, causal):
    if op == "aft_full":
        return path.fwd(op, q, k, v, w, causal)
    if op == "aft_local":
        return path.fwd(op, q, k, v, w, window, causal)
    return path.fwd(op, q, k, v, causal)


def bwd(path, op, dy, q, k, v, w, y, lse, window, causal):
    if op == "aft_full":
        return path.bwd(op, dy, q, k, v, w, y, lse, causal)
    if op == "aft_local":
        return path.bwd(op, dy, q, k, v, w, y, lse, window, causal)
    return path.bwd(op, dy, q, k, v, y, lse, causal)


def oracle(op, q, k, v, w, window, causal):
    if op == "aft_full":
        return oracles.aft(q, k, v, w, causal)
    if op == "aft_local":
        return oracles.aft_local(q, k, v, w, window, causal)
    return oracles.aft_simple(q, k, v, causal)


def oracle_wfull(op, w, window, T, D):
    """The per-channel (T, T, D) float64 bias the op applies."""
    if op == "aft_full":
        return oracles.bias_per_channel(w.double(), D)
    if op == "aft_local":
        return oracles.bias_per_channel(oracles.local_bias(w.double(), window), D)
    return torch.zeros(T, T, D, dtype=torch.float64)


def oracle_grads(op, q, k, v, w, window, causal, dy):
    """float64 y and gradients (dq, dk, dv[, dw]) of the oracle for upstream dy."""
    ins = [x.detach().double().requires_grad_() for x in (q, k, v)]
    if op != "aft_simple":
        ins.append(w.detach().double().requires_grad_())
        y = oracle(op, *ins[:3], ins[3], window, causal)
    else:
        y = oracle(op, *ins, None, window, causal)
    return y.detach(), torch.autograd.grad(y, ins, dy.double())


def eager_lowp(op, q, k, v, w, window, causal):
    """Plain-PyTorch eager AFT in the inputs' own (low) dtype: the baseline of the 2x rule."""
    if op == "aft_simple":
        return oracles.aft_eager(q, k, v, None, causal)
    wl = oracles.local_bias(w, window) if op == "aft_local" else w
    return oracles.aft_eager(q, k, v, wl, causal)


def check_all(path, op, q, k, v, w, window, causal, tol_y, tol_g, tol_lse=None):
    """fwd + bwd on ``path`` against the oracles: y, lse and every gradient finite, of the right dtype and shape,
    with errors (max-abs relative to max(1, max|reference|)) within the tolerances. Returns the errors."""
    B, T, D = q.shape
    dy = rand(B, T, D, dtype=q.dtype)
    path.poison()
    y, lse = fwd(path, op, q, k, v, w, window, causal)
    assert y.dtype == q.dtype and y.shape == q.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    yr, grads_r = oracle_grads(op, q, k, v, w, window, causal, dy)
    lr = oracles.aft_lse(k, oracle_wfull(op, w, window, T, D), causal)
    path.poison()
    grads = bwd(path, op, dy, q, k, v, w, y, lse, window, causal)
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
