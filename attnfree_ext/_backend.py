"""Which implementation runs each op: the compiled extension (attnfree_ext._C) or the pure-PyTorch path.

* ``select(op, *tensors) -> "compiled" | "python"`` is what the public functions call.
* ``force_backend("python" | "compiled" | "auto")`` (context manager) and the environment variable
  ``ATTNFREE_BACKEND`` (same values, read at every call) choose the path; the context manager wins.
* ``backend_info(op, *tensors)`` says which path would be taken and why every other one was skipped
  (xformers' ``not_supported_reasons`` style).
* Forcing "compiled" where it cannot run raises ``RuntimeError`` listing the reasons.

The compiled path is attnfree_ext._C (built by setup.py); importing it registers ``torch.ops.attnfree.*``, and
importing attnfree_ext._compiled then adds fake (meta) kernels and autograd formulas.
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = [
    "force_backend",
    "select",
    "backend_info",
    "not_supported_reasons",
    "compiled_available",
    "OPS",
]

_VALID = ("auto", "python", "compiled")
_forced: list[str] = []

# op family -> number of leading tensor arguments its public function passes to select()
OPS = ("aft_full", "aft_local", "aft_simple", "ea_double_norm", "aft_full_lowrank", "aft_conv2d")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# device type -> dispatch key of its kernels
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

_C = None
_LOAD_ERROR: str | None = None
try:  # the compiled extension is optional
    from . import _C  # noqa: F401  (loads the TORCH_LIBRARY registrations)
    from . import _compiled  # noqa: F401  (fake kernels + autograd)
except Exception as exc:  # ImportError, or an ABI mismatch with the installed torch
    _C = None
    _LOAD_ERROR = f"{exc.__class__.__name__}: {exc}"


def compiled_available() -> bool:
    """True when attnfree_ext._C was imported (the ops torch.ops.attnfree.* exist)."""
    return _C is not None


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


def _scan_kernels() -> frozenset:
    """(op, device_type) pairs with a registered forward kernel; computed once at import (so that select()
    stays traceable by torch.compile, which cannot call into the dispatcher's introspection)."""
    found = set()
    if _C is None:
        return frozenset()
    for op in OPS:
        for dev, key in _DISPATCH_KEYS.items():
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"attnfree::{op}_fwd", key):
                    found.add((op, dev))
            except RuntimeError:  # op not registered at all
                pass
    return frozenset(found)


_KERNELS = _scan_kernels()


def _has_kernel(op: str, device_type: str) -> bool:
    return (op, device_type) in _KERNELS


def not_supported_reasons(op: str, *tensors) -> list[str]:
    """Why the compiled path cannot run ``op`` on these inputs (empty list: it can)."""
    reasons: list[str] = []
    if _C is None:
        reasons.append(f"attnfree_ext._C is not available ({_LOAD_ERROR or 'not built'})")
        return reasons
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if len(ts) != len([t for t in tensors if t is not None]):
        reasons.append("an input is not a torch.Tensor")
    if not ts:
        reasons.append("no tensor inputs")
        return reasons
    dev = ts[0].device.type
    if any(t.device != ts[0].device for t in ts[1:]):
        reasons.append("inputs are on several devices")
    if not _has_kernel(op, dev):
        reasons.append(f"no compiled kernel for attnfree::{op}_fwd on device type {dev!r}")
    if any(t.dtype not in _FLOAT_DTYPES for t in ts):
        bad = [str(t.dtype) for t in ts if t.dtype not in _FLOAT_DTYPES]
        reasons.append(f"unsupported dtype(s) {bad} (float16, bfloat16, float32, float64 only)")
    if op in ("aft_full", "aft_local", "aft_simple", "aft_full_lowrank") and ts[0].dim() != 3:
        reasons.append(f"q must be (B, T, D), got {tuple(ts[0].shape)}")
    if op == "ea_double_norm" and ts[0].dim() < 2:
        reasons.append(f"logits must have at least 2 dimensions, got {tuple(ts[0].shape)}")
    return reasons


def backend_info(op: str, *tensors) -> dict:
    """Which path ``op`` takes on these inputs and why the others were skipped.

    Returns a dict: ``{"op", "requested", "selected", "reasons": {"compiled": [...], "python": [...]},
    "summary"}``; ``summary`` is a one-line human-readable string. Raises nothing (also not when
    "compiled" is forced where it cannot run: then ``selected`` is ``None``).
    """
    requested = _requested()
    compiled_reasons = not_supported_reasons(op, *tensors)
    python_reasons: list[str] = []
    if requested == "python":
        compiled_reasons = ["backend forced to 'python'"] + compiled_reasons
        selected = "python"
    elif requested == "compiled":
        python_reasons = ["backend forced to 'compiled'"]
        selected = None if compiled_reasons else "compiled"
    else:
        selected = "python" if compiled_reasons else "compiled"
    if selected == "compiled":
        summary = f"{op}: compiled (attnfree::{op}_fwd); python skipped" + (
            f" ({'; '.join(python_reasons)})" if python_reasons else " (compiled preferred)"
        )
    elif selected == "python":
        summary = f"{op}: python; compiled skipped ({'; '.join(compiled_reasons)})"
    else:
        summary = f"{op}: compiled forced but unsupported ({'; '.join(compiled_reasons)})"
    return {
        "op": op,
        "requested": requested,
        "selected": selected,
        "reasons": {"compiled": compiled_reasons, "python": python_reasons},
        "summary": summary,
    }


def select(op: str, *tensors) -> str:
    """Return "compiled" or "python" for this op and these inputs.

    "python" whenever attnfree_ext._C is absent, ATTNFREE_BACKEND=python, inside force_backend("python"), or
    the compiled path cannot run these inputs. Forcing "compiled" where it cannot run raises RuntimeError.
    """
    requested = _requested()
    if requested == "python":
        return "python"
    reasons = not_supported_reasons(op, *tensors)
    if not reasons:
        return "compiled"
    if requested == "compiled":
        raise RuntimeError(
            f"attnfree_ext: backend 'compiled' was forced for {op} but it cannot run these inputs:\n  - "
            + "\n  - ".join(reasons)
        )
    return "python"
