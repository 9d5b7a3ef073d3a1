import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/common importable as `common`

from common.paths import path_params  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "paths(*names, op=None): run a test taking `path` on these paths only (python, compiled-cpu, cuda, "
        "emulation), for the availability of op (default: the test module's OP)",
    )
    config.addinivalue_line("markers", "emulation: CUDA kernels run on the CPU by the emulation harness")


def pytest_generate_tests(metafunc):
    """Parametrise every test that takes ``path`` over the paths its op runs on (tests/common/paths.py)."""
    if "path" not in metafunc.fixturenames:
        return
    names = op = None
    for marker in metafunc.definition.iter_markers("paths"):  # the closest marker first
        if names is None and marker.args:
            names = marker.args
        if op is None and "op" in marker.kwargs:
            op = marker.kwargs["op"]
    if op is None:
        op = getattr(metafunc.module, "OP", None)
    metafunc.parametrize("path", path_params(op, names))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
