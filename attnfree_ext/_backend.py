"""Which implementation runs each op: the compiled extension (attnfree_ext._C) or the pure-PyTorch path.

Skeleton: the compiled-extension work fills in loading, per-op support rules and backend_info.
"""
from __future__ import annotations

import contextlib
import os

_VALID = ("auto", "python", "compiled")
_forced: list[str] = []


def _requested() -> str:
    if _forced:
        return _forced[-1]
    choice = os.environ.get("ATTNFREE_BACKEND", "auto").lower()
    if choice not in _VALID:
        raise ValueError(f"ATTNFREE_BACKEND must be one of {_VALID}, got {choice!r}")
    return choice


@contextlib.contextmanager
def force_backend(name: str):
    """Run the enclosed calls on one path: "python", "compiled" or "auto"."""
    if name not in _VALID:
        raise ValueError(f"backend must be one of {_VALID}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def select(op: str, *tensors) -> str:
    """Return "compiled" or "python" for this op and these inputs."""
    return "python"
