"""pytest support for the CPU emulation harness (csrc/common/emulation): marker, import path, fixtures."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # emu_runner importable from tests in this directory

import emu_runner  # noqa: E402


def pytest_configure(config):
    # registered here so that this directory does not depend on pyproject.toml; the lead may add the same line to
    # [tool.pytest.ini_options] markers:  "emulation: CUDA kernels run on the CPU by the emulation harness"
    config.addinivalue_line("markers", "emulation: CUDA kernels run on the CPU by the emulation harness")


@pytest.fixture(scope="session")
def emu():
    ok, why = emu_runner.available()
    if not ok:
        pytest.skip(f"emulation harness unavailable: {why}")
    return emu_runner
