"""Error metrics and the low-precision 2x rule, written once for every test (docs/design.md §5).

* ``maxabs(a, b)``: max |a - b| (0 for empty tensors).
* ``err(a, b)``: the scaled max-abs error max|a - b| / max(max|b|, 1), so values that are ~0 in truth (e.g.
  dk, dw at T = 1) are compared absolutely.
* ``rel_err(a, b, scale=None)``: max|a - b| / scale (default max|b|, at least 1e-30), asserting a is finite.
* The 2x rule (flash-attention's): in float16/bfloat16 the error of ours against the float64 oracle is at most
  twice the error of the plain-PyTorch eager formula run in that same dtype, plus a small floor
  (``assert_2x``).
"""

from __future__ import annotations

import torch

__all__ = ["maxabs", "err", "rel_err", "assert_2x"]


def maxabs(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def rel_err(a, b, scale=None) -> float:
    assert torch.isfinite(a).all(), "non-finite values"
    s = b.abs().max().item() if scale is None else scale
    return (a.double() - b.double()).abs().max().item() / max(s, 1e-30)


def assert_2x(ours, eager, ref, floor: float, what="") -> None:
    """maxabs(ours, ref) <= 2 * maxabs(eager, ref) + floor, with ours finite."""
    assert torch.isfinite(ours).all(), (what, "non-finite values")
    e_ours, e_eager = maxabs(ours, ref), maxabs(eager, ref)
    assert e_ours <= 2 * e_eager + floor, (what, e_ours, e_eager)
