"""What the compiled extension attnfree_ext._C was built against, and why it is missing when it is.

setup.py writes two files next to this module whenever it builds (or fails to build) the extension:

* ``_build_info.json`` -- every build: ``{"format": 1, "attnfree_ext": "0.1.0", "extension": "built"|"failed",
  "torch": "2.13.0+cpu", "torch_cuda": null|"12.8", "cuda_kernels": bool, "cuda_arch_list": null|"8.0;9.0",
  "cxx11_abi": bool, "python": "3.11.7", "platform": "linux-x86_64", "commit": "<git hash>[+dirty]"|null,
  "built_at": "2026-01-01T00:00:00Z"}``. Wheels carry it, so a wheel installed next to another torch can say so
  instead of failing with an undefined symbol.
* ``_build_error.txt`` -- only after a failed build: the first line is ``attnfree_ext._C was not built: <reason>``,
  the next lines name torch / CUDA / platform, then the compiler's first error and last lines. A successful build
  removes it.

Nothing here imports torch at module level or raises; every function returns None when there is nothing to say.
"""

from __future__ import annotations

import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
INFO_FILE = os.path.join(_HERE, "_build_info.json")
ERROR_FILE = os.path.join(_HERE, "_build_error.txt")


def build_info() -> dict | None:
    """The record setup.py wrote at build time, or None (no build ran here, e.g. ATTNFREE_NO_EXT=1)."""
    try:
        with open(INFO_FILE) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def build_error() -> str | None:
    """The whole text of _build_error.txt (why the last build of _C failed), or None."""
    try:
        with open(ERROR_FILE) as f:
            return f.read()
    except OSError:
        return None


def build_error_summary() -> str | None:
    """Its first line: ``attnfree_ext._C was not built: <reason>``, or None."""
    text = build_error()
    if not text or not text.strip():
        return None
    return text.strip().splitlines()[0]


def _release(version: str) -> str:
    return version.split("+", 1)[0]


def torch_mismatch(info: dict | None = None) -> str | None:
    """A sentence when the running torch is not the one _C was built against (so loading _C would fail with an
    undefined symbol, or worse), else None. Compares the release (2.13.0 of 2.13.0+cpu) and, when CUDA kernels
    were compiled, the CUDA major version."""
    info = build_info() if info is None else info
    if not info or info.get("extension") != "built" or not info.get("torch"):
        return None
    import torch

    built, now = info["torch"], torch.__version__
    problems = []
    if _release(built) != _release(now):
        problems.append(f"torch {built} but torch {now} is installed")
    if info.get("cuda_kernels"):
        bc, nc = info.get("torch_cuda"), torch.version.cuda
        if nc is None:
            problems.append(f"CUDA {bc} but the installed torch has no CUDA")
        elif bc and bc.split(".")[0] != nc.split(".")[0]:
            problems.append(f"CUDA {bc} but the installed torch uses CUDA {nc}")
    if not problems:
        return None
    return (
        "attnfree_ext._C was built against " + "; and ".join(problems) + ": the compiled path is disabled. "
        "Install the attnfree_ext wheel built for this torch, or rebuild: "
        "pip install --no-build-isolation --force-reinstall --no-deps ."
    )


def missing_reason(exc: BaseException | None = None) -> str:
    """Why _C is not usable, for backend_info / show_config: the torch mismatch, the recorded build failure, or
    the import error itself."""
    mismatch = torch_mismatch()
    if mismatch:
        return mismatch
    summary = build_error_summary()
    if summary:
        return f"{summary} (details: {ERROR_FILE})"
    info = build_info()
    if exc is not None:
        return f"attnfree_ext._C could not be imported ({type(exc).__name__}: {exc})"
    if info is None:
        return "attnfree_ext._C was not built (installed without a build of the extension, e.g. ATTNFREE_NO_EXT=1)"
    return "attnfree_ext._C is not present"
