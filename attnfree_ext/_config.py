"""``attnfree_ext.show_config()``: one report of what this installation can run, for bug reports and for checking
that a wheel or a build picked up the compiled extension."""

from __future__ import annotations

import platform

import torch

from . import _build_info
from .ops.common import dispatch

__all__ = ["show_config"]


def show_config(file=None) -> str:
    """Print (to ``file``, default stdout) and return a report: versions, whether ``attnfree_ext._C`` loaded and,
    if not, why (the build failure recorded by setup.py, a torch mismatch, or the import error), what it was built
    against, the requested backend, and for every op its compiled kernels' device types or the reason it has none.

    Never raises because _C is missing: that is what it reports.
    """
    from . import __version__

    info = _build_info.build_info() or {}
    lines = [
        f"attnfree_ext {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
        f"GPU available: {torch.cuda.is_available()})",
    ]
    if dispatch.compiled_available():
        lines.append(
            "attnfree_ext._C: loaded"
            + (
                f" (built against torch {info.get('torch')}, commit {info.get('commit')}, "
                f"CUDA kernels: {info.get('cuda_kernels')})"
                if info
                else ""
            )
        )
    else:
        lines.append(f"attnfree_ext._C: NOT loaded -- {dispatch.load_error()}")
    mismatch = _build_info.torch_mismatch()
    if mismatch:
        lines.append(f"warning: {mismatch}")
    lines.append(f"backend requested: {dispatch._requested()}")
    for op in dispatch.ops():
        cap = dispatch.capability(op)
        if cap.python_only:
            lines.append(f"  {op:18s} python only ({cap.note})")
        else:
            devs = sorted(dispatch.kernel_devices(op))
            lines.append(f"  {op:18s} compiled kernels: {', '.join(devs) if devs else 'none'}")
    text = "\n".join(lines)
    print(text, file=file)
    return text
