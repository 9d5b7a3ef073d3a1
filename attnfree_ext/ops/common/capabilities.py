"""What each op's compiled kernels support, as data (docs/design.md §6).

Every op package declares one :class:`Capability` record next to its kernels' registrations (``compiled.py``; the
Python-only ops in their ``__init__.py``) and registers it with :mod:`.dispatch`. The record lists the compiled
forward/backward op names, the device types the kernels are written for, their dtypes, the ranks of the tensor
inputs the public function passes to ``select``, and the algorithm switches (environment variables) the kernels
read. One generic function, :func:`not_supported_reasons`, turns a record and the inputs into the reasons the
compiled path cannot run them; the dispatcher has no per-op branches.
"""

from __future__ import annotations

import dataclasses

import torch

from .dtypes import FLOAT_DTYPES

__all__ = ["Input", "Switch", "CLUSTER_SWITCH", "Capability", "not_supported_reasons"]

#: device type -> dispatch key of its compiled kernels
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


@dataclasses.dataclass(frozen=True)
class Input:
    """One tensor argument of the public function, in the order it is passed to ``select``."""

    name: str
    layout: str  # how the shape is written in messages, e.g. "(B, T, D)"
    min_rank: int
    max_rank: int | None = None  # None: any rank >= min_rank

    def rank_ok(self, rank: int) -> bool:
        return rank >= self.min_rank and (self.max_rank is None or rank <= self.max_rank)


@dataclasses.dataclass(frozen=True)
class Switch:
    """An environment variable the compiled kernels read to pick an algorithm (both choices are exact)."""

    name: str
    choices: tuple[str, ...]
    default: str
    doc: str = ""


#: The sm_90 thread-block cluster kernels (operand tiles or statistics shared between the CTAs of a cluster through
#: distributed shared memory; csrc/common/cluster.h): opt-in until a GPU run has verified them. Read by the CUDA
#: launchers at every call; only GPUs of compute capability >= 9.0 take them.
CLUSTER_SWITCH = Switch(
    "ATTNFREE_CLUSTERS",
    ("0", "1"),
    "0",
    "1: the sm_90 thread-block cluster kernels (opt-in until verified on a GPU); 0: the kernels of every GPU",
)


@dataclasses.dataclass(frozen=True)
class Capability:
    """What the compiled kernels of one op support.

    Attributes:
        name: the op's public name (the first argument of ``backend_info`` / ``select``).
        fwd, bwd: the compiled ops ``torch.ops.attnfree.<fwd>`` / ``<bwd>`` (None for Python-only ops).
        devices: device types the compiled kernels exist for (when the build includes them).
        dtypes: input dtypes the kernels take.
        inputs: the tensor arguments passed to ``select``, with their allowed ranks.
        switches: environment variables read by the kernels (reported by ``backend_info``).
        python_only: True when the op has no compiled kernel at all; ``note`` says how it runs.
    """

    name: str
    fwd: str | None = None
    bwd: str | None = None
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    inputs: tuple[Input, ...] = ()
    switches: tuple[Switch, ...] = ()
    python_only: bool = False
    note: str = ""

    def __post_init__(self):
        if self.python_only != (self.fwd is None):
            raise ValueError(f"{self.name}: a Python-only capability has no fwd op, and a compiled one needs one")
        unknown = set(self.devices) - set(DISPATCH_KEYS)
        if unknown:
            raise ValueError(f"{self.name}: unknown device types {sorted(unknown)}")


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def not_supported_reasons(cap: Capability, tensors, *, load_error: str | None, kernel_devices) -> list[str]:
    """Why the compiled path cannot run ``cap``'s op on ``tensors`` (an empty list: it can).

    ``load_error`` is the loader's message when attnfree_ext._C failed to load (None when it loaded);
    ``kernel_devices`` the device types for which ``cap.fwd`` has a registered kernel in this build.
    """
    if cap.python_only:
        return [f"{cap.name} has no compiled kernel (python only: {cap.note})"]
    if load_error is not None:
        return [f"attnfree_ext._C is not available ({load_error})"]
    reasons: list[str] = []
    given = [t for t in tensors if t is not None]
    ts = [t for t in given if isinstance(t, torch.Tensor)]
    if len(ts) != len(given):
        reasons.append("an input is not a torch.Tensor")
    if not ts:
        reasons.append("no tensor inputs")
        return reasons
    dev = ts[0].device.type
    if any(t.device != ts[0].device for t in ts[1:]):
        reasons.append("inputs are on several devices")
    if dev not in cap.devices:
        reasons.append(
            f"no compiled kernel for attnfree::{cap.fwd} on device type {dev!r} "
            f"(its kernels are for {', '.join(map(repr, cap.devices))})"
        )
    elif dev not in kernel_devices:
        reasons.append(
            f"no compiled kernel for attnfree::{cap.fwd} on device type {dev!r} (attnfree_ext._C was built without it)"
        )
    bad = [str(t.dtype) for t in ts if t.dtype not in cap.dtypes]
    if bad:
        reasons.append(f"unsupported dtype(s) {bad} ({_dtype_names(cap.dtypes)} only)")
    for spec, t in zip(cap.inputs, tensors):
        if isinstance(t, torch.Tensor) and not spec.rank_ok(t.dim()):
            reasons.append(f"{spec.name} must be {spec.layout}, got shape {tuple(t.shape)}")
    return reasons
