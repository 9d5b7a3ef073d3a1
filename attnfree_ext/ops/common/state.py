"""The recurrent state of a causal softmax over keys with bias 0, and the helpers that carry it (docs/design.md §9).

THE STATE FORMAT (shared by every path and by the modules of attnfree_ext.nn): one tensor of shape (B, 3, D) in the
compute dtype (float32 for float16/bfloat16/float32 inputs, float64 for float64 inputs):

* ``state[:, 0] = m``: the running max of the keys seen so far (-inf when none was seen);
* ``state[:, 1] = num = sum exp(k - m) * v``;
* ``state[:, 2] = den = sum exp(k - m)``.

(m, num, den) stands for the pair (num * e^m, den * e^m), so m is a free shift: any m gives the same outputs, and
the empty state (-inf, 0, 0) equals no state at all. Every helper here is written in differentiable torch ops, so
gradients reach all three rows (m included: d/dm of num * e^m is num * e^m) and through them earlier chunks
(truncated BPTT, state tuning).

A state enters a computation as one extra *pseudo-key* visible to every query with bias 0:
``k0 = m + log den``, ``v0 = num / den`` (``state_as_key``): a softmax over {pseudo-key} U keys equals the softmax
over every key the state summarises plus the new ones (docs/design.md §2.7, the state combine).
"""

from __future__ import annotations

import torch

from .dtypes import compute_dtype

__all__ = ["state_dtype", "empty_state", "check_state", "state_as_key", "merge_keys"]

_NEG_INF = float("-inf")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a state for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return compute_dtype(dtype)


def empty_state(B: int, D: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The empty state (-inf, 0, 0) of shape (B, 3, D) for inputs of ``dtype``."""
    s = torch.zeros(B, 3, D, dtype=state_dtype(dtype), device=device)
    s[:, 0] = _NEG_INF
    return s


def check_state(name: str, state, q: torch.Tensor) -> None:
    """``state``: a (B, 3, D) tensor in the state dtype of q's dtype, on q's device (q: (B, T, D), checked)."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, 3, D), got {type(state).__name__}")
    B, D = q.shape[0], q.shape[2]
    if tuple(state.shape) != (B, 3, D):
        raise ValueError(
            f"{name} must have shape (B, 3, D) = ({B}, 3, {D}) (rows: running max m, sum exp(k - m) v, "
            f"sum exp(k - m)), got {tuple(state.shape)}"
        )
    want = state_dtype(q.dtype)
    if state.dtype != want:
        raise TypeError(f"{name} must be {want} for {q.dtype} inputs (the state's dtype), got {state.dtype}")
    if state.device != q.device:
        raise ValueError(f"{name} is on {state.device} but q is on {q.device}; all inputs must be on the same device")


def _safe(m: torch.Tensor) -> torch.Tensor:
    # a shift of 0 where nothing was seen (m = -inf): exp(-inf - 0) = 0 instead of exp(NaN)
    return torch.where(m == _NEG_INF, torch.zeros_like(m), m)


def state_as_key(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The state as one pseudo-key: (k0, v0), each (B, 1, D), ``k0 = m + log den``, ``v0 = num / den``.

    An empty state (den = 0) gives k0 = -inf (a masked key, docs/design.md §7) and v0 = 0, with zero gradients
    (no NaN from log 0 or 0 / 0).
    """
    m, num, den = state[:, 0:1], state[:, 1:2], state[:, 2:3]
    empty = den == 0
    one = torch.ones_like(den)
    d = torch.where(empty, one, den)
    k0 = torch.where(empty, torch.full_like(m, _NEG_INF), _safe(m) + torch.log(d))
    v0 = torch.where(empty, torch.zeros_like(num), num / d)
    return k0, v0


def merge_keys(state: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The state after the keys k, v (B, L, D) follow ``state`` (None: empty). Returns (B, 3, D) in the compute
    dtype of k, differentiable w.r.t. state, k and v.

    New m = max(m, max_t k); every term is exp(x - m) <= 1, so nothing overflows for any finite input. A key with
    k = -inf (masked) contributes nothing, whatever its v (docs/design.md §7).
    """
    ct = compute_dtype(k.dtype)
    kc, vc = k.to(ct), v.to(ct)
    B, L, D = kc.shape
    if L == 0:  # no key: the state unchanged (no zero-size reductions, which torch.compile handles badly)
        return empty_state(B, D, k.dtype, kc.device) if state is None else state
    if state is None:
        m0 = torch.full((B, D), _NEG_INF, dtype=ct, device=kc.device)
        num0 = torch.zeros((B, D), dtype=ct, device=kc.device)
        den0 = torch.zeros_like(num0)
    else:
        m0, num0, den0 = state[:, 0], state[:, 1], state[:, 2]
    m = torch.maximum(m0, kc.amax(dim=1))
    s = _safe(m)
    e0 = torch.exp(_safe(m0) - s)
    e0 = torch.where(m0 == _NEG_INF, torch.zeros_like(e0), e0)
    e = torch.exp(kc - s[:, None])
    ev = torch.where(e == 0, torch.zeros_like(e), e * vc)
    num = num0 * e0 + ev.sum(dim=1)
    den = den0 * e0 + e.sum(dim=1)
    return torch.stack([m, num, den], dim=1)
