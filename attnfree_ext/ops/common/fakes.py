"""Shapes and dtypes of the compiled ops' outputs, for their ``torch.library.register_fake`` kernels."""

from __future__ import annotations

import torch

from .dtypes import compute_dtype

__all__ = ["like", "aft_fwd_outputs"]


def like(x: torch.Tensor) -> torch.Tensor:
    """An empty contiguous tensor with x's shape, dtype and device (a gradient of x)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def aft_fwd_outputs(q: torch.Tensor):
    """(y, lse) of every AFT forward: y like q (contiguous), lse (B, T, D) in the compute dtype."""
    y = torch.empty_like(q, memory_format=torch.contiguous_format)
    return y, torch.empty(q.shape, dtype=compute_dtype(q.dtype), device=q.device)
