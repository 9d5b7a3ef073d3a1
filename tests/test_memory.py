"""Memory: no op may build a (B, T, T, D) tensor, forward or backward (docs/design.md §1, §2).

Each case runs forward + backward of a public function (python path) in a fresh subprocess at a shape where a
(B, T, T, D) float32 tensor would need many GB, and reads the process's peak resident memory afterwards: ``VmHWM``
of /proc/self/status, the high-water mark of the process's own address space (``ru_maxrss`` would not do: Linux
carries the parent's high-water mark across fork and exec). The extra peak over the resident size just before the
call is an upper bound on what the op allocated; it must stay far below the (B, T, T, D) size and within a fixed
budget of O(T^2 + B*T*D) bytes. (CPU tensors are not visible to tracemalloc; peak RSS is.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    torch.manual_seed(0)
    torch.set_num_threads(1)  # measures memory, not speed: one thread is robust on a shared machine
    op, B, T, D, causal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
    from attnfree_ext import force_backend
    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    def peak_rss():
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))
    q, k, v = (torch.randn(B, T, D, requires_grad=True) for _ in range(3))
    if op == "aft_full":
        from attnfree_ext.ops.aft_full import aft_full
        w = (0.1 * torch.randn(T, T)).requires_grad_()
        fn = lambda: aft_full(q, k, v, w, causal=causal)
    elif op == "aft_local":
        from attnfree_ext.ops.aft_local import aft_local
        w = (0.1 * torch.randn(T, T)).requires_grad_()
        fn = lambda: aft_local(q, k, v, w, 32, causal=causal)
    else:
        from attnfree_ext.ops.aft_simple import aft_simple
        fn = lambda: aft_simple(q, k, v, causal=causal)
    before = rss_now()
    t0 = time.time()
    with force_backend("python"):
        y = fn()
        y.backward(torch.ones_like(y))
    peak = peak_rss()
    ok = bool(torch.isfinite(y).all() and torch.isfinite(k.grad).all())
    print(json.dumps({"extra": peak - before, "before": before, "seconds": time.time() - t0, "finite": ok}))
    """
)


def _run(op, B, T, D, causal):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, op, str(B), str(T), str(D), "1" if causal else "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


GB = 1 << 30


@pytest.mark.parametrize(
    "op,B,T,D,causal,budget",
    [
        # (B, T, T, D) fp32 = 17 GB; w is 64 MB, B*T*D fp32 is 4 MB
        ("aft_full", 1, 4096, 256, False, 0.5 * GB),
        # 8.6 GB; w is 64 MB
        ("aft_full", 1, 4096, 128, True, 0.5 * GB),
        # 137 GB (more than this machine's RAM); B*T*D fp32 is 16 MB
        ("aft_simple", 2, 8192, 256, True, 2.0 * GB),
        ("aft_simple", 2, 8192, 256, False, 2.0 * GB),
        # 34 GB; w is 256 MB
        ("aft_local", 1, 8192, 128, True, 2.0 * GB),
    ],
)
def test_no_btt_d_tensor(op, B, T, D, causal, budget):
    res = _run(op, B, T, D, causal)
    full = B * T * T * D * 4
    assert res["finite"]
    assert res["extra"] < budget, f"{op}: extra peak {res['extra'] / GB:.2f} GB, budget {budget / GB:.2f} GB"
    assert res["extra"] < full / 8
