"""Build script for attnfree_ext.

Builds the compiled extension ``attnfree_ext._C`` (TORCH_LIBRARY ops ``torch.ops.attnfree.*``):

* CppExtension  (csrc/common/*.cpp + csrc/*/*_cpu.cpp + csrc/*/*_ops.cpp)   when torch has no CUDA or nvcc is missing,
* CUDAExtension (the above + csrc/*/*.cu + csrc/*/*_cuda.cpp)                otherwise.

Environment switches:
  ATTNFREE_NO_EXT=1        skip the extension (pure-PyTorch package)
  ATTNFREE_BUILD_CUDA=0|1  skip / require the CUDA part (default: auto); with 1 a failed build fails the install
  TORCH_CUDA_ARCH_LIST     CUDA architectures (read by torch.utils.cpp_extension)
  MAX_JOBS                 parallel compile jobs (read by torch.utils.cpp_extension / ninja)
  ATTNFREE_REQUIRE_EXT=1   a failed build of attnfree_ext._C fails the install (CI sets it)

If the extension cannot be compiled (no compiler, no torch, a compile error) the install still succeeds as the
pure-PyTorch package (unless ATTNFREE_REQUIRE_EXT=1, or ATTNFREE_BUILD_CUDA=1: CUDA kernels that were asked for and
not built are an error, with the compiler's lines) and prints one warning line followed by the compiler's first
error and last lines. pip shows a build's output only when it fails (or with -v), so the same text is also written
to attnfree_ext/_build_error.txt, where the package reports it at run time. Every build of the extension writes
attnfree_ext/_build_info.json (torch and CUDA versions, commit) so that a wheel loaded with another torch can say so.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import subprocess
import sys
import sysconfig
import threading

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


BUILD_ERROR_FILE = "_build_error.txt"  # in the package directory; read by the package at run time
BUILD_INFO_FILE = "_build_info.json"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _require_ext() -> bool:
    return _env_flag("ATTNFREE_REQUIRE_EXT")


def _cuda_requested() -> bool:
    return _env_flag("ATTNFREE_BUILD_CUDA")


def _warn(msg: str, details: str = "") -> None:
    """One WARNING line (then the details, indented); with ATTNFREE_REQUIRE_EXT=1 or ATTNFREE_BUILD_CUDA=1 the
    build fails instead, with the same lines."""
    if _require_ext() or _cuda_requested():
        why = "ATTNFREE_REQUIRE_EXT=1" if _require_ext() else "ATTNFREE_BUILD_CUDA=1 asked for the CUDA kernels"
        sys.stderr.write(f"ERROR: attnfree_ext: {msg}\n{details}")
        raise SystemExit(f"error: attnfree_ext._C was not built and {why} (see the lines above)")
    sys.stderr.write(f"WARNING: attnfree_ext: {msg}; installing the pure-PyTorch package only\n{details}")


class _CaptureOutput:
    """Passes through everything written to file descriptors 1 and 2 -- by this process and by the compilers it
    starts -- and keeps a copy, so that a failed build can quote the compiler's own lines."""

    def __enter__(self):
        self._chunks, self._lock, self._threads, self._saved = [], threading.Lock(), [], []
        self._buffering = []
        try:
            for stream in (sys.stdout, sys.stderr):  # keep Python's own lines in order with the compilers'
                stream.flush()
                if hasattr(stream, "reconfigure") and not stream.line_buffering:
                    stream.reconfigure(line_buffering=True)
                    self._buffering.append(stream)
            for fd in (1, 2):
                saved = os.dup(fd)
                r, w = os.pipe()
                os.dup2(w, fd)
                os.close(w)
                self._saved.append((fd, saved))
                t = threading.Thread(target=self._pump, args=(r, saved), daemon=True)
                t.start()
                self._threads.append(t)
        except OSError:  # no usable descriptors: build without a copy
            self._restore()
        return self

    def _pump(self, r, out):
        while True:
            data = os.read(r, 65536)
            if not data:
                break
            with self._lock:
                self._chunks.append(data)
            try:
                os.write(out, data)
            except OSError:
                pass
        os.close(r)

    def _restore(self):
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        for fd, saved in self._saved:
            os.dup2(saved, fd)  # closes the pipe's last write end held by this process
        for t in self._threads:
            t.join(timeout=10)
        for _, saved in self._saved:
            os.close(saved)
        for stream in self._buffering:
            stream.reconfigure(line_buffering=False)
        self._saved, self._threads, self._buffering = [], [], []

    def __exit__(self, *exc):
        self._restore()
        return False

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", errors="replace")


def _failure_excerpt(log: str, exc: BaseException) -> tuple[str, list[str]]:
    """(one-line summary, the lines worth showing): the first compiler error with a few lines after it, then the
    last lines of the build output. Long command echoes of ninja ("[3/9] c++ ...") are shortened."""
    lines = []
    for ln in log.splitlines():
        ln = ln.rstrip()
        if not ln.strip() or re.match(r"^\[\d+/\d+\] ", ln):  # blank, or ninja echoing a command it starts
            continue
        if len(ln) > 300:  # a command line
            ln = ln[:160] + " ..."
        lines.append(ln)
    err = next(
        (
            i
            for i, ln in enumerate(lines)
            if re.search(r"(\berror\b|\bError\b|not found|No such file)", ln) and not ln.startswith(("[", "FAILED"))
        ),
        None,
    )
    keep = set(range(err, min(err + 12, len(lines)))) if err is not None else set()
    keep = sorted(keep | set(range(max(0, len(lines) - 15), len(lines))))
    shown = []
    for j, i in enumerate(keep):
        if j and i != keep[j - 1] + 1:
            shown.append("...")
        shown.append(lines[i])
    text = str(exc).strip()
    first = text.splitlines()[0] if text else exc.__class__.__name__
    summary = lines[err].strip() if err is not None else first
    return summary[:300], shown


def _shown(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), HERE)
    return path if rel.startswith("..") else rel


def _git_commit():
    if os.environ.get("ATTNFREE_COMMIT"):
        return os.environ["ATTNFREE_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _sources(*patterns):
    return _rel(p for pat in patterns for p in glob.glob(os.path.join(HERE, "csrc", pat)))


def _nvcc_extra():
    """Extra nvcc flags from ATTNFREE_NVCC_FLAGS (space separated), e.g. "--use_fast_math" is NOT advised."""
    return os.environ.get("ATTNFREE_NVCC_FLAGS", "").split()


def _extensions_and_cmdclass():
    if os.environ.get("ATTNFREE_NO_EXT", "0") == "1":
        if _require_ext():
            raise SystemExit("error: attnfree_ext: ATTNFREE_NO_EXT=1 and ATTNFREE_REQUIRE_EXT=1 contradict each other")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # torch missing or broken: pure-python install
        msg = f"torch not importable at build time ({exc.__class__.__name__}: {exc})"
        try:  # editable / in-tree installs read it from the source package
            with open(os.path.join(HERE, "attnfree_ext", BUILD_ERROR_FILE), "w") as f:
                f.write(
                    f"attnfree_ext._C was not built: {msg}\n"
                    "Install torch first, then: pip install --no-build-isolation -e .\n"
                )
        except OSError:
            pass
        _warn(msg, f"    (also written to attnfree_ext/{BUILD_ERROR_FILE})\n")
        return [], {}

    cuda_env = os.environ.get("ATTNFREE_BUILD_CUDA", "auto").strip().lower()
    cuda_possible = torch.version.cuda is not None and ce.CUDA_HOME is not None
    if cuda_env in ("0", "false", "no", "off"):
        use_cuda = False
    elif _cuda_requested():
        use_cuda = True
        if torch.version.cuda is None:
            raise SystemExit(
                f"error: attnfree_ext: ATTNFREE_BUILD_CUDA=1 but torch {torch.__version__} is a CPU build "
                "(torch.version.cuda is None), so CUDA kernels cannot be built against it: install a CUDA build of "
                "torch, or unset ATTNFREE_BUILD_CUDA (ATTNFREE_BUILD_CUDA=0: C++ CPU kernels only)"
            )
        if ce.CUDA_HOME is None:
            raise SystemExit(
                "error: attnfree_ext: ATTNFREE_BUILD_CUDA=1 but no CUDA toolkit was found (no nvcc on PATH, "
                "CUDA_HOME unset): install the CUDA toolkit matching torch's CUDA "
                f"{torch.version.cuda} or set CUDA_HOME"
            )
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
        """build_ext that degrades to a pure-PyTorch install when compilation fails (a WARNING line, the compiler's
        lines and attnfree_ext/_build_error.txt), or fails the install with ATTNFREE_REQUIRE_EXT=1. Writes
        attnfree_ext/_build_info.json either way."""

        def _package_dirs(self):
            # in-place / editable builds: the source package; wheels: the package under build_lib
            if self._inplace:
                return [self.get_finalized_command("build_py").get_package_dir("attnfree_ext")]
            return [os.path.join(self.build_lib, "attnfree_ext")]

        def _record(self, built: bool, error_text: str | None):
            info = {
                "format": 1,
                "attnfree_ext": self.distribution.get_version(),
                "extension": "built" if built else "failed",
                "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "cuda_kernels": bool(use_cuda and built),
                "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
                "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", False)),
                "python": sys.version.split()[0],
                "platform": sysconfig.get_platform(),
                "commit": _git_commit(),
                "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            for d in self._package_dirs():
                try:
                    os.makedirs(d, exist_ok=True)
                    with open(os.path.join(d, BUILD_INFO_FILE), "w") as f:
                        json.dump(info, f, indent=1)
                        f.write("\n")
                    err_path = os.path.join(d, BUILD_ERROR_FILE)
                    if error_text is None:
                        if os.path.exists(err_path):
                            os.remove(err_path)
                    else:
                        with open(err_path, "w") as f:
                            f.write(error_text)
                        # a failed in-place build must not leave an older _C behind
                        for stale in glob.glob(os.path.join(d, "_C.*")):
                            if stale.endswith((".so", ".pyd", ".dylib")):
                                os.remove(stale)
                except OSError as e:
                    sys.stderr.write(f"attnfree_ext: could not write {d}/{BUILD_INFO_FILE}: {e}\n")

        def run(self):
            self._inplace = self.inplace  # setuptools' run() clears it while building
            capture = _CaptureOutput()
            try:
                with capture:
                    super().run()
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure means "no extension"
                summary, shown = _failure_excerpt(capture.text(), exc)
                kind = "CUDA + C++" if use_cuda else "C++"
                text = (
                    f"attnfree_ext._C was not built: {summary}\n"
                    f"torch {torch.__version__}, CUDA {torch.version.cuda}, {kind} build, python "
                    f"{sys.version.split()[0]}, {sysconfig.get_platform()}, commit {_git_commit()}\n"
                    "The whole build output: pip install -v --no-build-isolation -e .\n"
                    "--- build output: first error and last lines ---\n" + "\n".join(shown) + "\n"
                )
                self._record(False, text)
                where = " and ".join(_shown(os.path.join(d, BUILD_ERROR_FILE)) for d in self._package_dirs())
                details = "".join(f"    | {ln}\n" for ln in shown) + f"    (also written to {where})\n"
                _warn(f"compiled extension attnfree_ext._C not built ({summary[:200]})", details)
            else:
                self._record(True, None)

        def get_outputs(self):  # nothing to install when the build failed
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return [ext], {"build_ext": TolerantBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
