"""The paths an op runs on, and the one parametrisation every op test uses (docs/design.md §6).

* ``python``: the pure-PyTorch reference path, on the CPU (``force_backend("python")``);
* ``compiled-cpu``: the compiled CPU kernels of attnfree_ext._C (when it is built);
* ``cuda``: the compiled CUDA kernels (when a GPU is there and _C was built with them);
* ``emulation``: the same CUDA kernels (csrc/<op>/*.cu, their launchers) compiled with g++ and run on the CPU by
  the emulation harness (csrc/common/emulation, tests/emulation/emu_ops.py): fault finding on (bounds-checked
  global memory, NaN-poisoned outputs and shared memory, shuffled thread order). Marked ``emulation``
  (``python -m pytest -m emulation`` runs only these); it needs g++ and the CUDA toolkit headers, not a GPU.
  ``path.fwd`` / ``path.bwd`` call the launchers directly; ``path.force()`` routes ``torch.ops.attnfree.*`` to
  them (a TorchDispatchMode) under ``force_backend("compiled")``. The bindings' input checks are not emulated.

A test takes a ``path`` argument; tests/conftest.py parametrises it over the three, skipping the ones the op has
no kernel for. The op is the test module's ``OP`` (or ``@pytest.mark.paths(op=...)``); ``@pytest.mark.paths(
"compiled-cpu", "cuda")`` restricts a test to some paths. Test bodies build their inputs on the CPU (so every
path sees the same values), move them with ``path.put`` (keeping strides), and compare on the CPU.

``path.fwd(op, ...)`` / ``path.bwd(op, ...)`` call the op's contract functions: ``<op>_fwd_ref`` /
``<op>_bwd_ref`` on the python path, ``torch.ops.attnfree.<op>_fwd`` / ``_bwd`` on the others; ``path.force()``
runs the public functions on the path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnfree_ext
from attnfree_ext.ops.common import dispatch

__all__ = ["Path", "PATHS", "path_params", "ContractFunction"]

# where the python contract functions of each compiled op live
_REFS = {
    "aft_full": "attnfree_ext.ops.aft_full.reference",
    "aft_full_lowrank": "attnfree_ext.ops.aft_full.reference",
    "aft_local": "attnfree_ext.ops.aft_local.reference",
    "aft_simple": "attnfree_ext.ops.aft_simple.reference",
    "ea_double_norm": "attnfree_ext.ops.ea_double_norm.reference",
}


def _tree(fn, x):
    if isinstance(x, (tuple, list)):
        return type(x)(_tree(fn, t) for t in x)
    return fn(x) if isinstance(x, torch.Tensor) else x


@dataclasses.dataclass(frozen=True)
class Path:
    name: str
    backend: str  # "python" | "compiled"
    device: str  # "cpu" | "cuda"
    emulated: bool = False  # the CUDA kernels under the CPU emulation harness (device "cpu")

    @property
    def compiled(self) -> bool:
        return self.backend == "compiled"

    def __str__(self) -> str:
        return self.name

    def force(self):
        """Context manager: run the public functions on this path."""
        if self.emulated:
            return _emulation_context()
        return attnfree_ext.force_backend(self.backend)

    def put(self, x):
        """x (or a tuple/list of tensors; other values pass through) on this path's device, strides kept."""

        def one(t):
            if t.device.type == self.device:
                return t
            out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=self.device)
            return out.copy_(t)

        return _tree(one, x)

    def leaf(self, x):
        """A fresh leaf copy of x on this path's device, requiring grad (None passes through)."""
        if x is None:
            return None
        t = x.detach().clone() if x.device.type == self.device else self.put(x.detach())
        return t.requires_grad_(True)

    def fwd(self, op, *args):
        """The forward contract of ``op`` on this path; outputs on the CPU."""
        return _tree(torch.Tensor.cpu, self._call(op, "fwd", args))

    def bwd(self, op, *args):
        """The backward contract of ``op`` on this path; outputs on the CPU."""
        return _tree(torch.Tensor.cpu, self._call(op, "bwd", args))

    def _call(self, op, which, args):
        if self.emulated:
            return _emu_ops().OPS[f"{op}_{which}"](*args)
        if self.compiled:
            return getattr(torch.ops.attnfree, f"{op}_{which}")(*self.put(args))
        return getattr(importlib.import_module(_REFS[op]), f"{op}_{which}_ref")(*args)

    def grads(self, fn, inputs, dy, *args, **kwargs):
        """y = fn(*inputs, *args, **kwargs) on this path (inputs made leaves on its device) and the gradients
        of <y, dy> w.r.t. the tensor inputs; all returned on the CPU."""
        leaves = [self.leaf(x) if isinstance(x, torch.Tensor) else x for x in inputs]
        with self.force():
            y = fn(*leaves, *args, **kwargs)
        present = [t for t in leaves if isinstance(t, torch.Tensor)]
        # emulation: the backward op must run under the dispatch mode too (else the CPU kernel would answer)
        with self.force() if self.emulated else contextlib.nullcontext():
            g = torch.autograd.grad(y, present, self.put(dy.to(y.dtype)))
        return y.detach().cpu(), [t.cpu() for t in g]

    def poison(self) -> None:
        """Fill the CUDA caching allocator's free blocks with NaN so that outputs a kernel forgets to write show
        up (a no-op on the CPU)."""
        if self.device != "cuda":
            return
        free = torch.cuda.mem_get_info()[0]
        n = int(min(free // 4, 2**30) // 4)  # float32 elements: <= 1 GiB, at most a quarter of free memory
        x = torch.empty(n, dtype=torch.float32, device="cuda")
        x.fill_(float("nan"))
        del x
        for sz in (1 << 10, 1 << 16, 1 << 20):  # small pools too
            xs = [torch.full((sz,), float("nan"), device="cuda") for _ in range(8)]
            del xs


PATHS = (
    Path("python", "python", "cpu"),
    Path("compiled-cpu", "compiled", "cpu"),
    Path("cuda", "compiled", "cuda"),
    Path("emulation", "compiled", "cpu", emulated=True),
)

_EMU_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "emulation")


def _emu_ops():
    if _EMU_DIR not in sys.path:
        sys.path.insert(0, _EMU_DIR)
    return importlib.import_module("emu_ops")


def _emu_unavailable() -> str | None:
    if _EMU_DIR not in sys.path:
        sys.path.insert(0, _EMU_DIR)
    ok, why = importlib.import_module("emu_runner").available()
    return None if ok else f"emulation harness unavailable: {why}"


class _EmulationMode(TorchDispatchMode):
    """torch.ops.attnfree.<op>_fwd / _bwd -> the emulated CUDA launchers (below autograd: the ops' registered
    autograd formulas still run, and call the emulated backward)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("attnfree::"):
            fn = _emu_ops().OPS.get(name.split("::", 1)[1])
            if fn is not None:
                return fn(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _emulation_context():
    if not dispatch.compiled_available():
        pytest.skip(f"the public functions on the emulation path need attnfree_ext._C ({dispatch.load_error()})")
    saved, saved_caps = dict(dispatch._KERNELS), dict(dispatch._REGISTRY)
    try:  # the compiled path is selectable for CPU tensors for every op with CUDA kernels
        for name in dispatch.ops():
            cap = dispatch.capability(name)
            if "cuda" in cap.devices:
                dispatch._KERNELS[name] = frozenset(saved[name] | {"cpu"})
                if "cpu" not in cap.devices:
                    dispatch._REGISTRY[name] = dataclasses.replace(cap, devices=(*cap.devices, "cpu"))
        with attnfree_ext.force_backend("compiled"), _EmulationMode():
            yield
    finally:
        dispatch._KERNELS.clear()
        dispatch._KERNELS.update(saved)
        dispatch._REGISTRY.clear()
        dispatch._REGISTRY.update(saved_caps)


def _skip_reason(path: Path, op: str | None) -> str | None:
    if path.emulated:
        cap = dispatch.capability(op) if op is not None else None
        if cap is not None and "cuda" not in cap.devices:
            return f"no CUDA kernel for {op}"
        return _emu_unavailable()
    if path.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    if not path.compiled:
        return None
    cap = dispatch.capability(op) if op is not None else None
    if cap is not None and cap.python_only:  # the op runs its python code on this device
        return "python-only op: the compiled-cpu path is the python path" if path.device == "cpu" else None
    if not dispatch.compiled_available():
        return f"attnfree_ext._C not available ({dispatch.load_error()})"
    if cap is None:
        return None
    if path.device not in dispatch.kernel_devices(op):
        return f"no compiled {path.device} kernel for {op}"
    return None


def path_params(op: str | None, names=None):
    """pytest params of the paths ``names`` (default: all) for ``op``, skipped where ``op`` cannot run."""
    out = []
    for p in PATHS:
        if names is not None and p.name not in names:
            continue
        reason = _skip_reason(p, op)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if p.emulated:
            marks.append(pytest.mark.emulation)
        out.append(pytest.param(p, id=p.name, marks=marks))
    return out


def ContractFunction(path: Path, op: str, n_nondiff: int):
    """An autograd Function over ``path.fwd`` / ``path.bwd`` of ``op`` (the contract functions called directly,
    without the library's autograd glue): the last ``n_nondiff`` arguments are not differentiable. Tensors stay
    on the path's device (for gradcheck)."""

    def call(which, args):
        return path._call(op, which, args)

    class _F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            y, lse = call("fwd", args)
            tensors = args[: len(args) - n_nondiff]
            ctx.extra = args[len(args) - n_nondiff :]
            ctx.save_for_backward(*tensors, y, lse)
            return y

        @staticmethod
        def backward(ctx, dy):
            *tensors, y, lse = ctx.saved_tensors
            grads = call("bwd", (dy.contiguous(), *tensors, y, lse, *ctx.extra))
            return (*grads, *([None] * n_nondiff))

    return _F
