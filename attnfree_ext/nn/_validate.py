"""Argument checks shared by the layers of attnfree_ext.nn and attnfree_ext.compat (one wording each)."""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["positive_int", "finite_real", "dropout_p", "check_tokens", "check_image", "as_dtype_of"]


def positive_int(name: str, value) -> int:
    """An int >= 1 (TypeError for a non-int or a bool, ValueError below 1). Returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def finite_real(name: str, value) -> float:
    """A finite real number (TypeError for a non-number, a bool or a string; ValueError for NaN / inf). Returns it
    as given (an int stays an int)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def dropout_p(name: str, value) -> float:
    """A dropout probability in [0, 1]. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_tokens(x, dim: int, max_seqlen: int | None = None, *, name: str = "x", axes=("B", "T", "dim")) -> None:
    """``x``: a (B, T, dim) tensor with T >= 1 (and T <= max_seqlen when given). ``name`` and ``axes`` are the
    argument's and the axes' names in the messages (e.g. ``"input"``, ``("bs", "n", "d_model")``)."""
    batch, tokens, width = axes
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape ({batch}, {tokens}, {width}={dim}), got {tuple(x.shape)}")
    T = x.shape[1]
    if T < 1:
        raise ValueError(f"{name} must have at least one token ({tokens} >= 1)")
    if max_seqlen is not None and T > max_seqlen:
        raise ValueError(
            f"sequence length T={T} exceeds max_seqlen={max_seqlen} this layer was built for; "
            f"build it with max_seqlen >= {T}"
        )


def check_image(x, dim: int) -> None:
    """``x``: a (B, dim, H, W) tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != dim:
        raise ValueError(f"x must have shape (B, dim={dim}, H, W), got {tuple(x.shape)}")


def as_dtype_of(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The ops want the bias in q's dtype; under autocast q is float16/bfloat16 while the parameter stays float32."""
    return w if w.dtype == q.dtype else w.to(q.dtype)
