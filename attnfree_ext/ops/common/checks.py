"""Argument checks shared by every public function: one check per mistake, one wording, naming the argument.

The compiled ops repeat these checks in C++ with the same messages (csrc/common/checks.h), so a bad input raises
the same exception whichever path runs (docs/design.md §6).
"""

from __future__ import annotations

import torch

from .dtypes import FLOAT_DTYPES

__all__ = [
    "check_tensor",
    "check_same_device",
    "check_same_shape",
    "check_like",
    "check_qkv",
    "check_bias",
    "check_factors",
    "check_window",
    "check_causal",
]


def check_tensor(name: str, x, ndim: int | None = None) -> None:
    """Raise TypeError unless ``x`` is a floating-point tensor (fp16/bf16/fp32/fp64); ValueError unless it has
    ``ndim`` dimensions (when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_same_device(**tensors) -> None:
    """Raise ValueError if the named tensors (None entries are skipped) do not all live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; all inputs must be on the same device"
            )


def check_same_shape(**tensors) -> None:
    """Raise ValueError if the named tensors do not all have one shape."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(t.shape)}")


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``x`` must have the dtype (TypeError) and the device (ValueError) of ``ref``."""
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
    check_same_device(**{ref_name: ref, name: x})


def check_qkv(q, k, v) -> None:
    """q, k, v: (B, T, D) floating tensors of one shape, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    check_same_device(q=q, k=k, v=v)
    check_same_shape(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _check_heads(name: str, heads: int, D: int) -> None:
    if heads < 1 or D % heads != 0:
        raise ValueError(f"{name} has {heads} heads but D={D} is not divisible by it (D % heads must be 0)")


def check_bias(w, q, name: str = "w") -> int:
    """w: (T, T) or (heads, T, T) with D % heads == 0, q's dtype and device (q: (B, T, D), already checked).

    Returns heads (1 for a 2-D w).
    """
    check_tensor(name, w)
    check_like(name, w, "q", q)
    T, D = q.shape[1], q.shape[2]
    if w.dim() == 2 and tuple(w.shape) == (T, T):
        return 1
    if w.dim() == 3 and tuple(w.shape[1:]) == (T, T):
        _check_heads(name, w.shape[0], D)
        return w.shape[0]
    raise ValueError(f"{name} must have shape (T, T) or (heads, T, T) with T={T}, got {tuple(w.shape)}")


def check_factors(u, vb, q) -> int:
    """Factorised bias w = u @ vb^T: u, vb (T, rank) or (heads, T, rank), one shape, q's dtype and device,
    D % heads == 0. Returns heads (1 for 2-D factors)."""
    T, D = q.shape[1], q.shape[2]
    for name, x in (("u", u), ("vb", vb)):
        check_tensor(name, x)
        check_like(name, x, "q", q)
        if x.dim() not in (2, 3) or x.shape[-2] != T:
            raise ValueError(f"{name} must have shape (T, rank) or (heads, T, rank) with T={T}, got {tuple(x.shape)}")
    check_same_shape(u=u, vb=vb)
    if u.dim() == 3:
        _check_heads("u", u.shape[0], D)
        return u.shape[0]
    return 1


def check_window(window) -> int:
    """window: an int >= 1 (keys with |t - t'| < window get the bias). Returns it."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window


def check_causal(causal) -> bool:
    """causal: a bool (not merely truthy: ``causal="no"`` is a mistake, not a request for a causal op)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return causal
