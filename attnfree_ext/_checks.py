"""Input validation shared by every public function (one message per mistake, naming the argument)."""
from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int | None = None) -> None:
    """Raise TypeError unless ``x`` is a floating-point tensor (fp16/bf16/fp32/fp64) of ``ndim`` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_same_device(**tensors) -> None:
    """Raise ValueError if the named tensors do not all live on one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )


def check_same_shape(**tensors) -> None:
    """Raise ValueError if the named tensors do not all have one shape."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(t.shape)}"
            )


def check_qkv(q, k, v) -> None:
    """q, k, v: (B, T, D) floating tensors of one shape, dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    check_same_device(q=q, k=k, v=v)
    check_same_shape(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def check_bias(w, T: int, D: int, name: str = "w") -> int:
    """w: (T, T) or (heads, T, T) with D % heads == 0. Returns heads (1 for a 2-D w)."""
    check_tensor(name, w)
    if w.dim() == 2 and tuple(w.shape) == (T, T):
        return 1
    if w.dim() == 3 and tuple(w.shape[1:]) == (T, T):
        heads = w.shape[0]
        if heads < 1 or D % heads != 0:
            raise ValueError(
                f"{name} has {heads} heads but D={D} is not divisible by it (D % heads must be 0)"
            )
        return heads
    raise ValueError(f"{name} must have shape (T, T) or (heads, T, T) with T={T}, got {tuple(w.shape)}")


def check_window(window) -> int:
    """window: an int >= 1 (keys with |t - t'| < window get the bias)."""
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return window
