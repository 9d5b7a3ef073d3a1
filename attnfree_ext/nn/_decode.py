"""One decoding step of the causal AFT layers: the chunk's output and the state after it (docs/design.md §9.2).

Functions of tensors only (the projected q, k, v of the chunk, the bias rows of its positions, the state), so that
the layers' parameter layouts stay their own business: each layer picks the rows of its bias and calls these.
"""

from __future__ import annotations

import torch

from ..ops.aft_full import aft_full
from ..ops.aft_local import aft_local
from ..ops.common.dtypes import compute_dtype
from ..ops.common.state import check_state, merge_keys
from .state import AFTFullState, AFTLocalState

__all__ = ["check_local_state", "check_full_state", "local_step", "local_state", "full_step"]


def _check_cache(name, t, B, n, D, ct, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, n, D) or t.dtype != ct or t.device != device:
        got = f"{type(t).__name__}" if not isinstance(t, torch.Tensor) else f"{tuple(t.shape)} {t.dtype} {t.device}"
        raise ValueError(f"state.{name} must be a ({B}, {n}, {D}) {ct} tensor on {device}, got {got}")


def check_local_state(state, q: torch.Tensor, window: int) -> None:
    """``state`` of AFTLocal for the chunk's q (B, L, D): an AFTLocalState with consistent shapes and dtypes."""
    if not isinstance(state, AFTLocalState):
        raise TypeError(
            f"state must be an AFTLocalState (from forward(..., return_state=True)), got {type(state).__name__}"
        )
    off = state.offset
    if isinstance(off, bool) or not isinstance(off, int) or off < 0:
        raise ValueError(f"state.offset must be an int >= 0 (tokens seen so far), got {off!r}")
    check_state("state.prefix", state.prefix, q)
    B, D = q.shape[0], q.shape[2]
    ct = compute_dtype(q.dtype)
    n = min(off, window - 1)
    _check_cache("k", state.k, B, n, D, ct, q.device)
    _check_cache("v", state.v, B, n, D, ct, q.device)


def check_full_state(state, q: torch.Tensor) -> None:
    """``state`` of AFTFull for the chunk's q (B, L, D): an AFTFullState of (B, S, D) caches."""
    if not isinstance(state, AFTFullState):
        raise TypeError(
            f"state must be an AFTFullState (from forward(..., return_state=True)), got {type(state).__name__}"
        )
    B, D = q.shape[0], q.shape[2]
    ct = compute_dtype(q.dtype)
    n = state.k.shape[1] if isinstance(state.k, torch.Tensor) and state.k.dim() == 3 else -1
    _check_cache("k", state.k, B, max(n, 0), D, ct, q.device)
    _check_cache("v", state.v, B, max(n, 0), D, ct, q.device)


def local_state(prefix, k: torch.Tensor, v: torch.Tensor, window: int, offset: int) -> AFTLocalState:
    """The AFTLocal state after ``offset`` tokens, from the state's prefix (None: empty) and the keys/values
    (compute dtype) of the positions offset - k.shape[1] .. offset - 1: the last window - 1 stay as a cache, the
    older ones merge into the prefix."""
    keep = min(window - 1, offset)
    n_out = k.shape[1] - keep
    prefix = merge_keys(prefix, k[:, :n_out], v[:, :n_out])
    return AFTLocalState(prefix, k[:, n_out:], v[:, n_out:], offset)


def local_step(q, k, v, w_rows, window: int, state: AFTLocalState):
    """AFTLocal chunk after ``state``: q, k, v (B, L, D) of the chunk; w_rows (heads?, L, c + L) the bias rows of its
    positions over the cached and the chunk's keys (c = state.k.shape[1]). Returns (y in q's dtype, new state)."""
    ct = compute_dtype(q.dtype)
    kk = torch.cat([state.k, k.to(ct)], dim=1)
    vv = torch.cat([state.v, v.to(ct)], dim=1)
    y = aft_local(q.to(ct), kk, vv, w_rows.to(ct), window, True, initial_state=state.prefix)
    return y.to(q.dtype), local_state(state.prefix, kk, vv, window, state.offset + q.shape[1])


def full_step(q, k, v, w_rows, state: AFTFullState):
    """AFTFull chunk after ``state``: q, k, v (B, L, D); w_rows (heads?, L, S + L) the bias rows of the chunk's
    positions over every key so far (S = state.k.shape[1]). Returns (y in q's dtype, new state)."""
    ct = compute_dtype(q.dtype)
    kk = torch.cat([state.k, k.to(ct)], dim=1)
    vv = torch.cat([state.v, v.to(ct)], dim=1)
    y = aft_full(q.to(ct), kk, vv, w_rows.to(ct), True)
    return y.to(q.dtype), AFTFullState(kk, vv)
