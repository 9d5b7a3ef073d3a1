"""Random inputs of the tests, drawn on the CPU in float64 and then cast (so every path and dtype sees the same
values for one seed)."""

from __future__ import annotations

import torch

__all__ = ["rand", "qkv", "qkvw"]


def rand(*shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


def qkv(B, T, D, dtype=torch.float64, k_scale=1.0):
    """q, k, v (B, T, D); k scaled by k_scale."""
    q, k, v = (torch.randn(B, T, D, dtype=torch.float64) for _ in range(3))
    return q.to(dtype), (k * k_scale).to(dtype), v.to(dtype)


def qkvw(B, T, D, heads, dtype=torch.float64, k_scale=1.0, w_scale=1.0, noncontig=False):
    """q, k, v (B, T, D) and a bias w: (T, T) when heads is None or 0, else (heads, T, T). k, w scaled.

    noncontig: same values in non-contiguous storage (transposed copies).
    """
    q, k, v = qkv(B, T, D, torch.float64)
    wshape = (T, T) if not heads else (heads, T, T)
    w = torch.randn(wshape, dtype=torch.float64) * w_scale
    q, k, v, w = (x.to(dtype) for x in (q, k * k_scale, v, w))
    if noncontig:
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
        w = w.transpose(-1, -2).contiguous().transpose(-1, -2)
    return q, k, v, w
