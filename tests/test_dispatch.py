"""Dispatch between the paths (attnfree_ext.ops.common.dispatch; docs/design.md §6): the capability records, select,
force_backend / ATTNFREE_BACKEND, backend_info, and how a missing or broken attnfree_ext._C is reported."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import attnfree_ext
from attnfree_ext.ops.common import dispatch
from attnfree_ext.ops.common.capabilities import Capability
from common.inputs import qkvw
from common.metrics import maxabs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, D, H, W = 2, 7, 4, 2, 3
needs_c = pytest.mark.skipif(not dispatch.compiled_available(), reason="attnfree_ext._C not built")


def _qkvw(dtype=torch.float64, rg=False):
    q, k, v, w = qkvw(B, T, D, H, dtype)
    if rg:
        q, k, v, w = (x.requires_grad_() for x in (q, k, v, w))
    return q, k, v, w


# ------------------------------------------------------------------ the records
def test_one_list_of_ops_built_from_the_records():
    assert set(dispatch.ops()) == {
        "aft_full",
        "aft_full_lowrank",
        "aft_local",
        "aft_simple",
        "ea_double_norm",
        "aft_conv2d",
        "talking_heads_attention",
    }
    for name in dispatch.ops():
        cap = dispatch.capability(name)
        assert isinstance(cap, Capability) and cap.name == name
        assert cap.python_only == (cap.fwd is None)
    assert dispatch.capability("aft_conv2d").python_only
    assert dispatch.capability("talking_heads_attention").python_only
    assert dispatch.capability("aft_full_lowrank").devices == ("cuda",)


def test_capability_records_are_frozen_and_validated():
    cap = dispatch.capability("aft_full")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cap.name = "x"
    with pytest.raises(ValueError):
        Capability(name="bad", python_only=True, fwd="bad_fwd")
    with pytest.raises(ValueError):
        Capability(name="bad", fwd="bad_fwd", devices=("tpu",))
    with pytest.raises(ValueError, match="registered twice"):
        dispatch.register(cap)


@needs_c
def test_every_schema_registered():
    for op in dispatch.ops():
        cap = dispatch.capability(op)
        if cap.python_only:
            continue
        for name in (cap.fwd, cap.bwd):
            assert dispatch.has_op(name), name
    # CUDA-only op: schema present, no CPU kernel
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("attnfree::aft_full_lowrank_fwd", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("attnfree::aft_full_fwd", "CPU")
    assert "cpu" not in dispatch.kernel_devices("aft_full_lowrank")
    assert "cpu" in dispatch.kernel_devices("aft_full")


# ------------------------------------------------------------------ backend_info / select
def test_backend_info_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        attnfree_ext.backend_info("nope")
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.select("aft_fulll", *_qkvw())
    with attnfree_ext.force_backend("python"), pytest.raises(ValueError, match="unknown op"):
        dispatch.select("nope")


def test_backend_info_python_only_ops():
    q = torch.randn(1, 4, 3, 3)
    info = attnfree_ext.backend_info("aft_conv2d", q)
    assert info["selected"] == "python"
    assert "python only" in info["reasons"]["compiled"][0]
    info = attnfree_ext.backend_info("talking_heads_attention", q)
    assert info["selected"] == "python" and "python only" in info["summary"]


def test_backend_info_reports_the_aft_full_kernel_switch(monkeypatch):
    q, k, v, w = _qkvw(torch.float32)
    monkeypatch.delenv("ATTNFREE_AFT_FULL_KERNEL", raising=False)
    monkeypatch.delenv("ATTNFREE_CLUSTERS", raising=False)
    info = attnfree_ext.backend_info("aft_full", q, k, v, w)
    assert info["switches"] == {"ATTNFREE_AFT_FULL_KERNEL": "auto", "ATTNFREE_CLUSTERS": "0"}
    assert "ATTNFREE_AFT_FULL_KERNEL=auto" in info["summary"]
    monkeypatch.setenv("ATTNFREE_AFT_FULL_KERNEL", "exact")
    assert attnfree_ext.backend_info("aft_full", q, k, v, w)["switches"]["ATTNFREE_AFT_FULL_KERNEL"] == "exact"
    assert attnfree_ext.backend_info("aft_simple", q, k, v)["switches"] == {}


def test_backend_info_reports_the_cluster_switch(monkeypatch):
    """The ops with sm_90 cluster kernels name their opt-in switch and its value."""
    logits = torch.randn(2, 5, 3)
    monkeypatch.delenv("ATTNFREE_CLUSTERS", raising=False)
    assert attnfree_ext.backend_info("ea_double_norm", logits)["switches"] == {"ATTNFREE_CLUSTERS": "0"}
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "1")
    info = attnfree_ext.backend_info("ea_double_norm", logits)
    assert info["switches"] == {"ATTNFREE_CLUSTERS": "1"} and "ATTNFREE_CLUSTERS=1" in info["summary"]
    assert attnfree_ext.backend_info("aft_full", *_qkvw(torch.float32))["switches"]["ATTNFREE_CLUSTERS"] == "1"


def test_reasons_are_generic():
    """The reasons come from the records: devices, dtypes, ranks, non-tensors."""
    q, k, v, w = _qkvw(torch.float32)
    if not dispatch.compiled_available():
        assert dispatch.reasons("aft_full", q, k, v, w) == [
            f"attnfree_ext._C is not available ({dispatch.load_error()})"
        ]
        return
    assert dispatch.reasons("aft_full", q, k, v, w) == []
    assert any("unsupported dtype" in r for r in dispatch.reasons("aft_simple", q.int(), k, v))
    assert any("q must be (B, T, D)" in r for r in dispatch.reasons("aft_simple", q[0], k, v))
    assert any("logits must be (..., N, S)" in r for r in dispatch.reasons("ea_double_norm", q[0, 0]))
    assert "an input is not a torch.Tensor" in dispatch.reasons("aft_simple", q, k, [1.0])
    assert any("device type 'cpu'" in r for r in dispatch.reasons("aft_full_lowrank", q, k, v, w[0], w[0]))


@needs_c
def test_backend_select_and_force():
    q, k, v, w = _qkvw(torch.float32)
    assert dispatch.compiled_available()
    assert dispatch.select("aft_full", q, k, v, w) in ("compiled", "python")
    with attnfree_ext.force_backend("python"):
        assert dispatch.select("aft_full", q, k, v, w) == "python"
        info = attnfree_ext.backend_info("aft_full", q, k, v, w)
        assert info["selected"] == "python" and "forced" in info["reasons"]["compiled"][0]
    with attnfree_ext.force_backend("compiled"):
        assert dispatch.select("aft_full", q, k, v, w) == "compiled"
        # CUDA-only op has no CPU kernel: forcing compiled raises and lists the reason
        with pytest.raises(RuntimeError, match="no compiled kernel for attnfree::aft_full_lowrank_fwd"):
            dispatch.select("aft_full_lowrank", q, k, v, w[0], w[0])
        with pytest.raises(RuntimeError, match="unsupported dtype"):
            dispatch.select("aft_simple", q.int(), k, v)
    info = attnfree_ext.backend_info("aft_full_lowrank", q, k, v, w[0], w[0])
    assert info["selected"] == "python" and info["reasons"]["compiled"]
    assert "compiled skipped" in info["summary"]
    info = attnfree_ext.backend_info("aft_local", q, k, v, w)
    assert info["selected"] == "compiled" and info["reasons"]["compiled"] == []


@needs_c
def test_backend_env_var(monkeypatch):
    q, k, v, w = _qkvw(torch.float32)
    monkeypatch.setenv("ATTNFREE_BACKEND", "python")
    assert dispatch.select("aft_simple", q, k, v) == "python"
    monkeypatch.setenv("ATTNFREE_BACKEND", "compiled")
    assert dispatch.select("aft_simple", q, k, v) == "compiled"
    monkeypatch.setenv("ATTNFREE_BACKEND", "bogus")
    with pytest.raises(ValueError):
        dispatch.select("aft_simple", q, k, v)


def test_force_backend_rejects_unknown_names():
    with pytest.raises(ValueError):
        with attnfree_ext.force_backend("fast"):
            pass


@needs_c
def test_public_functions_use_compiled_path():
    """The public functions' compiled branch matches their python branch."""
    from attnfree_ext.ops.aft_local import aft_local
    from attnfree_ext.ops.aft_simple import aft_simple

    q, k, v, w = _qkvw(torch.float32, rg=True)
    with attnfree_ext.force_backend("compiled"):
        yc = aft_local(q, k, v, w, W, True) + aft_simple(q, k, v, False)
        gc = torch.autograd.grad(yc.sum(), (q, w))
    with attnfree_ext.force_backend("python"):
        yp = aft_local(q, k, v, w, W, True) + aft_simple(q, k, v, False)
        gp = torch.autograd.grad(yp.sum(), (q, w))
    assert maxabs(yc, yp) < 1e-5
    for a, b in zip(gc, gp):
        assert maxabs(a, b) < 1e-4


# ------------------------------------------------------------------ loading attnfree_ext._C
def _python(code: str):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def test_missing_extension_means_python_with_the_loaders_message():
    """An _C that fails to load (ImportError; here ModuleNotFoundError) leaves the python path, and backend_info
    carries the loader's message."""
    r = _python(
        """
        import sys
        sys.modules["attnfree_ext._C"] = None  # makes `import attnfree_ext._C` raise ImportError
        import torch, attnfree_ext
        from attnfree_ext.ops.common import dispatch
        assert not dispatch.compiled_available()
        q = torch.randn(2, 5, 3)
        info = attnfree_ext.backend_info("aft_simple", q, q, q)
        assert info["selected"] == "python", info
        why = info["reasons"]["compiled"][0]
        assert why.startswith("attnfree_ext._C is not available (ModuleNotFoundError: import of attnfree_ext._C"), why
        assert attnfree_ext.aft_simple(q, q, q).shape == q.shape
        print("ok")
        """
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


@needs_c
def test_a_bug_in_registration_code_raises():
    """Only a failure to load _C means "compiled unavailable": an error in the registrations propagates."""
    r = _python(
        """
        import torch
        def broken(*args, **kwargs):
            raise RuntimeError("registration bug")
        torch.library.register_fake = broken
        import attnfree_ext
        """
    )
    assert r.returncode != 0 and "registration bug" in r.stderr, r.stderr[-3000:]


def test_show_config_names_why_the_extension_is_missing(tmp_path):
    """A failed build recorded by setup.py (attnfree_ext/_build_error.txt) reaches backend_info and show_config."""
    err = tmp_path / "_build_error.txt"
    err.write_text("attnfree_ext._C was not built: csrc/common/module.cpp:1: error: no compiler today\\nmore\\n")
    r = _python(
        f"""
        import sys, io
        sys.modules["attnfree_ext._C"] = None
        import importlib.util
        # the package reads the build record while it is imported: put a redirected copy of that module first
        spec = importlib.util.spec_from_file_location("attnfree_ext._build_info", "attnfree_ext/_build_info.py")
        bi = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bi)
        bi.ERROR_FILE = {str(err)!r}
        sys.modules["attnfree_ext._build_info"] = bi
        import torch, attnfree_ext
        q = torch.randn(2, 5, 3)
        why = attnfree_ext.backend_info("aft_simple", q, q, q)["reasons"]["compiled"][0]
        assert "no compiler today" in why, why
        text = attnfree_ext.show_config(file=io.StringIO())
        assert "attnfree_ext._C: NOT loaded" in text and "no compiler today" in text, text
        assert "aft_simple" in text and "talking_heads_attention" in text, text
        print("ok")
        """
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_show_config_when_loaded():
    import io

    text = attnfree_ext.show_config(file=io.StringIO())
    loaded = dispatch.compiled_available()
    assert ("attnfree_ext._C: loaded" in text) == loaded
    for op in dispatch.ops():
        assert op in text
