"""Packaging: a failed build of attnfree_ext._C is never silent (the compiler's lines on stderr and in
attnfree_ext/_build_error.txt), ATTNFREE_REQUIRE_EXT=1 turns it into a failed build, and attnfree_ext._build_info
tells a torch mismatch. setup.py runs on a copy of the sources in which every C++ file stops at an #error (fast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("torch.utils.cpp_extension")
MARK = "attnfree-packaging-test-stop"


def _broken_copy(tmp_path):
    dst = tmp_path / "src"
    dst.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), dst / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), dst / "csrc", ignore=shutil.ignore_patterns("*.o"))
    for d, _, names in os.walk(dst / "csrc"):
        for n in names:
            if n.endswith(".cpp"):
                p = os.path.join(d, n)
                with open(p) as f:
                    body = f.read()
                with open(p, "w") as f:
                    f.write(f"#error {MARK}\n" + body)
    (dst / "attnfree_ext").mkdir()
    (dst / "attnfree_ext" / "__init__.py").write_text("")
    return dst


def _build(dst, **env):
    e = {k: v for k, v in os.environ.items() if k != "ATTNFREE_REQUIRE_EXT"}
    e.update(dict(ATTNFREE_BUILD_CUDA="0", MAX_JOBS="1"), **env)
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=dst,
        env=e,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_failed_build_reports_the_compiler_error(tmp_path):
    dst = _broken_copy(tmp_path)
    stale = dst / "attnfree_ext" / "_C.cpython-311-x86_64-linux-gnu.so"
    stale.write_text("an older build")  # a failed in-place build must not leave it behind
    r = _build(dst)
    assert r.returncode == 0, r.stderr[-3000:]
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING: attnfree_ext:")]
    assert len(warn) == 1 and "not built" in warn[0] and MARK in warn[0], r.stderr[-3000:]
    assert MARK in r.stderr.split(warn[0], 1)[1]  # the compiler's own line follows the warning
    err = (dst / "attnfree_ext" / "_build_error.txt").read_text()
    first = err.splitlines()[0]
    assert first.startswith("attnfree_ext._C was not built: ") and MARK in first
    assert "--- build output" in err
    info = json.loads((dst / "attnfree_ext" / "_build_info.json").read_text())
    assert info["extension"] == "failed" and info["format"] == 1
    import torch

    assert info["torch"] == torch.__version__
    assert not stale.exists()


def test_require_ext_fails_the_build(tmp_path):
    dst = _broken_copy(tmp_path)
    r = _build(dst, ATTNFREE_REQUIRE_EXT="1")
    assert r.returncode != 0
    assert "ATTNFREE_REQUIRE_EXT=1" in r.stderr and MARK in r.stderr
    assert (dst / "attnfree_ext" / "_build_error.txt").exists()


def test_require_ext_contradicts_no_ext(tmp_path):
    dst = _broken_copy(tmp_path)
    r = _build(dst, ATTNFREE_REQUIRE_EXT="1", ATTNFREE_NO_EXT="1")
    assert r.returncode != 0 and "contradict" in r.stderr


@pytest.fixture
def build_info_module(tmp_path, monkeypatch):
    sys.path.insert(0, ROOT)
    try:
        from attnfree_ext import _build_info
    finally:
        sys.path.remove(ROOT)
    monkeypatch.setattr(_build_info, "INFO_FILE", str(tmp_path / "_build_info.json"))
    monkeypatch.setattr(_build_info, "ERROR_FILE", str(tmp_path / "_build_error.txt"))
    return _build_info, tmp_path


def test_build_info_tells_a_torch_mismatch(build_info_module):
    import torch

    bi, d = build_info_module
    assert bi.build_info() is None and bi.torch_mismatch() is None and bi.build_error() is None
    release = torch.__version__.split("+")[0]
    same = {"format": 1, "extension": "built", "torch": release + "+other", "torch_cuda": None, "cuda_kernels": False}
    assert bi.torch_mismatch(same) is None  # the same release with another local label loads
    msg = bi.torch_mismatch(dict(same, torch="2.4.0"))
    assert msg and "2.4.0" in msg and torch.__version__ in msg
    if torch.version.cuda is None:
        assert "no CUDA" in bi.torch_mismatch(dict(same, cuda_kernels=True, torch_cuda="12.4"))
    assert bi.torch_mismatch(dict(same, torch="2.4.0", extension="failed")) is None
    (d / "_build_info.json").write_text(json.dumps(dict(same, torch="2.4.0")))
    assert "2.4.0" in bi.missing_reason(ImportError("undefined symbol: _ZN3c10"))


def test_build_info_reports_the_build_error(build_info_module):
    bi, d = build_info_module
    (d / "_build_error.txt").write_text("attnfree_ext._C was not built: x.cpp:1: error: boom\nmore\n")
    assert bi.build_error_summary() == "attnfree_ext._C was not built: x.cpp:1: error: boom"
    assert "boom" in bi.missing_reason(ModuleNotFoundError("No module named 'attnfree_ext._C'"))


def _cuda_copy(tmp_path):
    """setup.py and pyproject.toml with a one-line C++ file and a one-line CUDA file: the CUDA part of a build in
    seconds."""
    dst = tmp_path / "cuda-src"
    (dst / "csrc" / "common").mkdir(parents=True)
    (dst / "csrc" / "tiny").mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), dst / name)
    (dst / "csrc" / "common" / "tiny.cpp").write_text("int attnfree_tiny_cpp() { return 0; }\n")
    (dst / "csrc" / "tiny" / "tiny.cu").write_text("__global__ void attnfree_tiny_kernel() {}\n")
    (dst / "attnfree_ext").mkdir()
    (dst / "attnfree_ext" / "__init__.py").write_text("")
    return dst


# Makes the CPU torch of the test environment look like a CUDA build to setup.py (torch.utils.cpp_extension reads
# both at import), so that the build reaches nvcc; loaded through PYTHONPATH for the setup.py process only.
_AS_IF_CUDA_TORCH = """
import torch, torch.version
torch.version.cuda = "{cuda}"
torch.cuda._is_compiled = lambda: True
torch.cuda.is_available = lambda: False  # a CUDA build on a machine without a GPU
torch.cuda.device_count = lambda: 0
"""

_FAKE_NVCC = """#!/bin/sh
for a in "$@"; do
    if [ "$a" = "--version" ] || [ "$a" = "-V" ]; then
        echo "Cuda compilation tools, release {cuda}, V{cuda}.0"; exit 0
    fi
done
echo "nvcc fatal   : {mark}" >&2
exit 1
"""


@pytest.mark.parametrize("nvcc", ["fake", "real"])
def test_requested_cuda_build_that_fails_fails_with_the_compilers_error(tmp_path, nvcc):
    """ATTNFREE_BUILD_CUDA=1 alone (no ATTNFREE_REQUIRE_EXT): nvcc failing fails the build with nvcc's own line.
    fake: an nvcc that exits 1; real: the installed nvcc given an unknown flag through ATTNFREE_NVCC_FLAGS."""
    import shutil as sh

    import torch

    dst = _cuda_copy(tmp_path)
    env = dict(ATTNFREE_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="8.0")
    mark = MARK + "-nvcc"
    if nvcc == "fake":
        home = tmp_path / "cuda"
        (home / "bin").mkdir(parents=True)
        cuda = torch.version.cuda or "12.4"
        (home / "bin" / "nvcc").write_text(_FAKE_NVCC.format(cuda=cuda, mark=mark))
        (home / "bin" / "nvcc").chmod(0o755)
    else:
        real = sh.which("nvcc")
        if real is None:
            pytest.skip("no nvcc on PATH (the fake-nvcc case covers the logic)")
        home = os.path.dirname(os.path.dirname(os.path.realpath(real)))
        out = subprocess.run([real, "--version"], capture_output=True, text=True).stdout
        cuda = torch.version.cuda or out.split("release ")[1].split(",")[0]
        mark = "--" + MARK
        env["ATTNFREE_NVCC_FLAGS"] = mark
    env["CUDA_HOME"] = str(home)
    if torch.version.cuda is None:
        hook = tmp_path / "as-if-cuda"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(_AS_IF_CUDA_TORCH.format(cuda=cuda))
        env["PYTHONPATH"] = str(hook) + os.pathsep + os.environ.get("PYTHONPATH", "")
    r = _build(dst, **env)
    assert r.returncode != 0, r.stderr[-3000:]
    assert "ATTNFREE_BUILD_CUDA=1" in r.stderr, r.stderr[-3000:]
    assert "ERROR: attnfree_ext:" in r.stderr and "WARNING: attnfree_ext" not in r.stderr
    assert mark in r.stderr.split("ERROR: attnfree_ext:", 1)[1], r.stderr[-3000:]  # nvcc's own line, quoted
    assert not list((dst / "attnfree_ext").glob("_C.*"))


def test_requested_cuda_build_against_a_cpu_torch_fails_at_once(tmp_path):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here (the check is for CPU builds of torch)")
    r = _build(_cuda_copy(tmp_path), ATTNFREE_BUILD_CUDA="1")
    assert r.returncode != 0
    assert "ATTNFREE_BUILD_CUDA=1" in r.stderr and "CPU build" in r.stderr and torch.__version__ in r.stderr
    assert "building" not in r.stdout  # nothing was compiled


def test_without_cuda_requested_a_failed_build_still_installs(tmp_path):
    """The default (ATTNFREE_BUILD_CUDA unset): the same failing C++ file warns and installs the Python package."""
    dst = _cuda_copy(tmp_path)
    (dst / "csrc" / "common" / "tiny.cpp").write_text(f"#error {MARK}\n")
    e = {k: v for k, v in os.environ.items() if k not in ("ATTNFREE_REQUIRE_EXT", "ATTNFREE_BUILD_CUDA")}
    r = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=dst,
        env=dict(e, MAX_JOBS="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "WARNING: attnfree_ext:" in r.stderr and MARK in r.stderr
    assert MARK in (dst / "attnfree_ext" / "_build_error.txt").read_text()
