"""Which implementation runs each op: the compiled extension (attnfree_ext._C) or the pure-PyTorch path
(docs/design.md §6).

* ``select(op, *tensors) -> "compiled" | "python"`` is what the public functions call.
* ``force_backend("python" | "compiled" | "auto")`` (context manager) and the environment variable
  ``ATTNFREE_BACKEND`` (same values, read at every call) choose the path; the context manager wins.
* ``backend_info(op, *tensors)`` says which path would be taken and why every other one was skipped
  (xformers' ``not_supported_reasons`` style), and which algorithm switches the compiled kernels will read.
* Forcing "compiled" where it cannot run raises ``RuntimeError`` listing the reasons.

Every op registers one :class:`~.capabilities.Capability` record (``register``); ``ops()`` is the list of op names,
built from those records. Importing attnfree_ext._C registers ``torch.ops.attnfree.*``; each op's ``compiled.py``
then adds the fake (meta) kernels and autograd formulas of its ops. Only a failure to *load* _C (ImportError,
OSError: not built, or built against another torch) makes the compiled path unavailable; ``backend_info`` then
carries the loader's message. Any other exception is a bug and propagates.
"""

from __future__ import annotations

import contextlib
import importlib
import os

import torch

from .capabilities import DISPATCH_KEYS, Capability, not_supported_reasons

__all__ = [
    "force_backend",
    "select",
    "backend_info",
    "reasons",
    "compiled_available",
    "load_error",
    "has_op",
    "register",
    "capability",
    "ops",
]

_VALID = ("auto", "python", "compiled")
_forced: list[str] = []

_C = None
_LOAD_ERROR: str | None = None
try:  # the compiled extension is optional
    _C = importlib.import_module("attnfree_ext._C")  # loads the TORCH_LIBRARY registrations
except (ImportError, OSError) as exc:  # not built, or an ABI mismatch with the installed torch
    from ... import _build_info

    _LOAD_ERROR = f"{exc.__class__.__name__}: {exc}"
    # the build failure recorded by setup.py, or a torch mismatch, says why; the bare import error does not
    _mismatch, _failed = _build_info.torch_mismatch(), _build_info.build_error_summary()
    if _mismatch:
        _LOAD_ERROR += f"; {_mismatch}"
    elif _failed:
        _LOAD_ERROR += f"; {_failed} (details: {_build_info.ERROR_FILE})"

_REGISTRY: dict[str, Capability] = {}
# op name -> device types whose forward kernel is registered; computed once per op at registration (so that
# select() stays traceable by torch.compile, which cannot call into the dispatcher's introspection)
_KERNELS: dict[str, frozenset] = {}


def compiled_available() -> bool:
    """True when attnfree_ext._C was loaded (the ops torch.ops.attnfree.* exist)."""
    return _C is not None


def load_error() -> str | None:
    """The loader's message when attnfree_ext._C could not be loaded, else None."""
    return _LOAD_ERROR


def has_op(name: str) -> bool:
    """True when ``torch.ops.attnfree.<name>`` exists (attnfree_ext._C loaded and defines it)."""
    if _C is None:
        return False
    try:
        getattr(torch.ops.attnfree, name)
    except (AttributeError, RuntimeError):  # how torch.ops reports an undefined op
        return False
    return True


def register(cap: Capability) -> Capability:
    """Add an op's capability record (once per op) and look up which of its declared devices have kernels."""
    if cap.name in _REGISTRY:
        raise ValueError(f"capability of {cap.name!r} registered twice")
    _REGISTRY[cap.name] = cap
    found = set()
    if cap.fwd is not None and has_op(cap.fwd):
        for dev in cap.devices:
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"attnfree::{cap.fwd}", DISPATCH_KEYS[dev]):
                found.add(dev)
    _KERNELS[cap.name] = frozenset(found)
    return cap


def ops() -> tuple[str, ...]:
    """Names of every registered op (the names ``select`` / ``backend_info`` take)."""
    return tuple(_REGISTRY)


def capability(op: str) -> Capability:
    """The capability record of ``op``; ValueError for an unknown name."""
    cap = _REGISTRY.get(op)
    if cap is None:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(_REGISTRY)}")
    return cap


def kernel_devices(op: str) -> frozenset:
    """Device types for which ``op``'s compiled forward kernel is registered in this build."""
    capability(op)
    return _KERNELS[op]


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


def reasons(op: str, *tensors) -> list[str]:
    """Why the compiled path cannot run ``op`` on these inputs (empty list: it can). ValueError for an unknown op."""
    cap = capability(op)
    load = (_LOAD_ERROR or "not built") if _C is None else None
    return not_supported_reasons(cap, tensors, load_error=load, kernel_devices=_KERNELS[op])


def _switches(cap: Capability) -> dict:
    return {s.name: os.environ.get(s.name, s.default) for s in cap.switches}


def backend_info(op: str, *tensors) -> dict:
    """Which path ``op`` takes on these inputs and why the others were skipped.

    Returns a dict: ``{"op", "requested", "selected", "reasons": {"compiled": [...], "python": [...]},
    "switches": {env var: value}, "summary"}``; ``summary`` is a one-line human-readable string and
    ``switches`` holds the algorithm switches the compiled kernels of ``op`` read (e.g.
    ``ATTNFREE_AFT_FULL_KERNEL``: auto | tiled | exact), as set in the environment or their default.
    Raises ValueError for an unknown op name (and for an invalid ``ATTNFREE_BACKEND``), nothing else: forcing
    "compiled" where it cannot run gives ``selected = None``.
    """
    cap = capability(op)
    requested = _requested()
    compiled_reasons = reasons(op, *tensors)
    python_reasons: list[str] = []
    if requested == "python":
        compiled_reasons = ["backend forced to 'python'"] + compiled_reasons
        selected = "python"
    elif requested == "compiled":
        python_reasons = ["backend forced to 'compiled'"]
        selected = None if compiled_reasons else "compiled"
    else:
        selected = "python" if compiled_reasons else "compiled"
    switches = _switches(cap)
    if selected == "compiled":
        summary = f"{op}: compiled (attnfree::{cap.fwd}); python skipped" + (
            f" ({'; '.join(python_reasons)})" if python_reasons else " (compiled preferred)"
        )
    elif selected == "python":
        summary = f"{op}: python; compiled skipped ({'; '.join(compiled_reasons)})"
    else:
        summary = f"{op}: compiled forced but unsupported ({'; '.join(compiled_reasons)})"
    if switches:
        summary += "; " + ", ".join(f"{k}={v}" for k, v in switches.items())
    return {
        "op": op,
        "requested": requested,
        "selected": selected,
        "reasons": {"compiled": compiled_reasons, "python": python_reasons},
        "switches": switches,
        "summary": summary,
    }


def select(op: str, *tensors) -> str:
    """Return "compiled" or "python" for this op and these inputs.

    "python" whenever attnfree_ext._C is absent, ATTNFREE_BACKEND=python, inside force_backend("python"), or
    the compiled path cannot run these inputs. Forcing "compiled" where it cannot run raises RuntimeError.
    """
    requested = _requested()
    if requested == "python":
        capability(op)
        return "python"
    why = reasons(op, *tensors)
    if not why:
        return "compiled"
    if requested == "compiled":
        raise RuntimeError(
            f"attnfree_ext: backend 'compiled' was forced for {op} but it cannot run these inputs:\n  - "
            + "\n  - ".join(why)
        )
    return "python"
