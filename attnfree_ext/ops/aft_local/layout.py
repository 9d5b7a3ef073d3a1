"""The two layouts of AFT-local's position bias w (docs/design.md §2.6).

* ``"full"``: (T, T) or (heads, T, T); ``w[h, t, t']`` is the bias between query t and key t'. Only the band
  |t - t'| < window is read.
* ``"band"``: (T, 2W - 1) or (heads, T, 2W - 1) with ``W = min(window, T)``; ``w[h, t, j]`` is the bias between
  query t and key ``t' = t + j - (W - 1)`` (j = W - 1 is the diagonal). Entries whose key falls outside [0, T) (and,
  causal, those with t' > t) are never read. O(T * window) numbers instead of T^2.

The layout is read from the shape: a last dimension of T means ``"full"``, of 2W - 1 means ``"band"``. When both
hold (T == 2W - 1 with T > 1, e.g. T = 5, window = 3) the shape is ambiguous and the caller must say which with
``w_layout``; for T == 1 both layouts are the same single diagonal entry.
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common.checks import _check_heads, check_like, check_tensor

__all__ = ["FULL", "BAND", "band_width", "resolve", "band_to_full", "full_to_band", "composite"]

FULL, BAND = "full", "band"


def band_width(T: int, window: int) -> int:
    """2W - 1 with W = min(window, T) (1 for T = 0): the last dimension of a banded w."""
    return 2 * min(window, max(T, 1)) - 1


def resolve(w, q, window: int, w_layout=None, name: str = "w") -> tuple[int, bool]:
    """Checks w (q: (B, T, D) already checked, window already an int >= 1) and returns (heads, banded).

    Raises:
        ValueError: w_layout not None / "full" / "band"; w of neither shape (or not the one w_layout names);
            an ambiguous shape without w_layout; D % heads != 0.
        TypeError: w not a floating tensor of q's dtype (as check_like).
    """
    if w_layout not in (None, FULL, BAND):
        raise ValueError(f"w_layout must be None, 'full' or 'band', got {w_layout!r}")
    check_tensor(name, w)
    check_like(name, w, "q", q)
    T, D = q.shape[1], q.shape[2]
    L = band_width(T, window)
    shapes = f"(T, T) / (heads, T, T) ('full') or (T, 2W-1) / (heads, T, 2W-1) ('band') with T={T}, 2W-1={L}"
    if w.dim() not in (2, 3) or w.shape[-2] != T:
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(w.shape)}")
    last = w.shape[-1]
    if w_layout is None:
        if last == T and last == L and T > 1:
            raise ValueError(
                f"{name} of shape {tuple(w.shape)} fits both layouts (T == 2*min(window, T) - 1 = {T}): "
                "pass w_layout='full' or w_layout='band'"
            )
        if last not in (T, L):
            raise ValueError(f"{name} must have shape {shapes}, got {tuple(w.shape)}")
        banded = last != T
    else:
        banded = w_layout == BAND
        want = L if banded else T
        if last != want:
            raise ValueError(f"{name} with w_layout={w_layout!r} must have last dimension {want}, got {tuple(w.shape)}")
    heads = w.shape[0] if w.dim() == 3 else 1
    if w.dim() == 3:
        _check_heads(name, heads, D)
    return heads, banded


def _band_index(T: int, W: int, device):
    """(T, T) index j = t' - t + W - 1 into a banded row, clamped, and the band mask |t - t'| < W."""
    idx = torch.arange(T, device=device)
    j = idx[None, :] - idx[:, None] + (W - 1)
    inside = (j >= 0) & (j <= 2 * W - 2)
    return j.clamp(0, 2 * W - 2), inside


def band_to_full(wb: torch.Tensor, window: int) -> torch.Tensor:
    """Banded (..., T, 2W-1) -> full (..., T, T), 0 outside the band (differentiable; O(T^2): tests, composites)."""
    T = wb.shape[-2]
    W = min(window, max(T, 1))
    j, inside = _band_index(T, W, wb.device)
    full = wb.gather(-1, j.expand(*wb.shape[:-1], T))
    return torch.where(inside, full, torch.zeros((), dtype=wb.dtype, device=wb.device))


def full_to_band(w: torch.Tensor, window: int) -> torch.Tensor:
    """Full (..., T, T) -> banded (..., T, 2W-1), 0 where the key t + j - (W - 1) falls outside [0, T)."""
    T = w.shape[-1]
    if T == 0:
        return w.new_zeros(*w.shape[:-1], 1)
    W = min(window, T)
    t = torch.arange(T, device=w.device)[:, None]
    tp = t + torch.arange(2 * W - 1, device=w.device)[None, :] - (W - 1)
    valid = (tp >= 0) & (tp < T)
    band = w.gather(-1, tp.clamp(0, T - 1).expand(*w.shape[:-1], 2 * W - 1))
    return torch.where(valid, band, torch.zeros((), dtype=w.dtype, device=w.device))


def composite(q, k, v, w, window, causal=False, banded=False):
    """The differentiable composite of aft_local for either layout (forward-mode AD, double backward; it forms the
    (B, T, T, D) logits anyway, so the banded w is expanded to full here)."""
    return _composite.aft_local(q, k, v, band_to_full(w, window) if banded else w, window, causal)
