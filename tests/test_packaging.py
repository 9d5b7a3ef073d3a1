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
    e.update(ATTNFREE_BUILD_CUDA="0", MAX_JOBS="1", **env)
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
