"""Build script for attnfree_ext.

Builds the compiled extension ``attnfree_ext._C`` (TORCH_LIBRARY ops ``torch.ops.attnfree.*``):

* CppExtension  (csrc/common/*.cpp + csrc/*/*_cpu.cpp + csrc/*/*_ops.cpp)   when torch has no CUDA or nvcc is missing,
* CUDAExtension (the above + csrc/*/*.cu + csrc/*/*_cuda.cpp)                otherwise.

Environment switches:
  ATTNFREE_NO_EXT=1        skip the extension (pure-PyTorch package)
  ATTNFREE_BUILD_CUDA=0|1  skip / force the CUDA part (default: auto)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (read by torch.utils.cpp_extension)
  MAX_JOBS                 parallel compile jobs (read by torch.utils.cpp_extension / ninja)

If the extension cannot be compiled (no compiler, no torch, a compile error) the install still succeeds as the
pure-PyTorch package and prints one warning line.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(msg: str) -> None:
    sys.stderr.write(f"WARNING: attnfree_ext: {msg}; installing the pure-PyTorch package only\n")


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _sources(*patterns):
    return _rel(p for pat in patterns for p in glob.glob(os.path.join(HERE, "csrc", pat)))


def _nvcc_extra():
    """Extra nvcc flags from ATTNFREE_NVCC_FLAGS (space separated), e.g. "--use_fast_math" is NOT advised."""
    return os.environ.get("ATTNFREE_NVCC_FLAGS", "").split()


def _extensions_and_cmdclass():
    if os.environ.get("ATTNFREE_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # torch missing or broken: pure-python install
        _warn(f"torch not importable at build time ({exc.__class__.__name__}: {exc})")
        return [], {}

    cuda_env = os.environ.get("ATTNFREE_BUILD_CUDA", "auto").lower()
    cuda_possible = torch.version.cuda is not None and ce.CUDA_HOME is not None
    if cuda_env in ("0", "false", "no"):
        use_cuda = False
    elif cuda_env in ("1", "true", "yes"):
        use_cuda = True
    else:
        use_cuda = cuda_possible

    sources = _sources(os.path.join("common", "*.cpp"), os.path.join("*", "*_cpu.cpp"), os.path.join("*", "*_ops.cpp"))
    cxx = ["-O3", "-g0", "-DATTNFREE_WITH_PYTHON"]  # the C++ standard flag comes from torch
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # torch's ATen parallel backend is OpenMP: at::parallel_for is inlined, so it needs -fopenmp here too
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if sys.platform == "win32":
        cxx = ["/O2", "/std:c++17", "/DATTNFREE_WITH_PYTHON", "/openmp"]
        link = []
    include_dirs = [os.path.join(HERE, "csrc")]

    if use_cuda:
        sources += _sources(os.path.join("*", "*.cu"), os.path.join("*", "*_cuda.cpp"))
        cxx.append("-DATTNFREE_WITH_CUDA" if sys.platform != "win32" else "/DATTNFREE_WITH_CUDA")
        ext = ce.CUDAExtension(
            "attnfree_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-DATTNFREE_WITH_CUDA", "-lineinfo"] + _nvcc_extra()},
            extra_link_args=link,
        )
    else:
        ext = ce.CppExtension(
            "attnfree_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )

    class TolerantBuildExt(ce.BuildExtension):
        """build_ext that degrades to a pure-PyTorch install (one warning line) when compilation fails."""

        def run(self):
            try:
                super().run()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure means "no extension"
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
                _warn(f"compiled extension attnfree_ext._C not built ({first[:200]})")

        def get_outputs(self):  # nothing to install when the build failed
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return [ext], {"build_ext": TolerantBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
