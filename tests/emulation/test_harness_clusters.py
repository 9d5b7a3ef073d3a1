"""Self-tests of the harness's thread-block clusters (csrc/common/emulation, CLUSTER_API: ATTNFREE_LAUNCH_CLUSTER,
attnfree::cluster_ctarank / cluster_num_ctas / cluster_sync / cluster_map_shared) with the kernels of
tests/emulation/kernels/cluster.cu: distributed shared memory, per-CTA state, cluster barriers, faults, refusals."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.emulation

THREADS = 128


@pytest.fixture(scope="module")
def clus(emu):
    return emu.build("cluster", ["tests/emulation/kernels/cluster.cu"], include_dirs=["csrc"], rewrite=False)


def cluster_sum(emu, lib, x, gx, gy, cx, cy, flags=3, seed=None):
    n = x.shape[-1]
    kw = {} if seed is None else {"seed": seed}
    return lib.call(
        "emu_cluster_sum",
        emu.In("x", x),
        emu.Out("out", torch.empty(gx * gy)),
        emu.Out("info", torch.empty(2 * gx * gy, dtype=torch.int32)),
        n,
        gx,
        gy,
        cx,
        cy,
        flags,
        **kw,
    )


def expected(x, gx, gy, cx, cy):
    """float64 oracle: per CTA (row-major over (y, x)) the sum over its cluster, its rank and the cluster size."""
    s = x.double().sum(-1).view(gy, gx)
    cs = s.view(gy // cy, cy, gx // cx, cx).sum((1, 3), keepdim=True).expand(-1, cy, -1, cx).reshape(gy, gx)
    by, bx = torch.meshgrid(torch.arange(gy), torch.arange(gx), indexing="ij")
    rank = (bx % cx) + (by % cy) * cx
    return cs.reshape(-1), rank.reshape(-1).int(), cx * cy


@pytest.mark.parametrize("gx,gy,cx,cy", [(8, 1, 2, 1), (8, 3, 4, 1), (4, 4, 2, 2), (8, 1, 8, 1), (3, 2, 1, 1)])
def test_cluster_partial_sums_through_distributed_shared_memory(emu, clus, gx, gy, cx, cy):
    x = torch.randn(gx * gy, 300)
    ref, rank, num = expected(x, gx, gy, cx, cy)
    for seed in range(3):
        r = cluster_sum(emu, clus, x, gx, gy, cx, cy, seed=seed).check()
        torch.testing.assert_close(r.outputs["out"].double(), ref, rtol=1e-5, atol=1e-4)
        info = r.outputs["info"].view(-1, 2)
        assert torch.equal(info[:, 0], rank) and (info[:, 1] == num).all()
    c = r.counters
    assert c["blocks"] == gx * gy and c["threads"] == gx * gy * THREADS
    assert c["cluster_barriers"] == 2 * (gx * gy) // (cx * cy)  # two per cluster
    assert c["barriers"] == gx * gy * 8  # 1 + log2(128) __syncthreads per CTA
    assert c["bytes_read"] == x.numel() * 4  # distributed shared memory is not global memory
    assert r.launches[0]["cluster"] == (cx, cy, 1)


def test_plain_launch_is_a_cluster_of_one(emu, clus):
    x = torch.randn(6, 200)
    r = cluster_sum(emu, clus, x, 6, 1, 0, 0).check()
    torch.testing.assert_close(r.outputs["out"].double(), x.double().sum(-1), rtol=1e-5, atol=1e-4)
    info = r.outputs["info"].view(-1, 2)
    assert (info[:, 0] == 0).all() and (info[:, 1] == 1).all()
    assert r.counters["cluster_barriers"] == 2 * 6
    assert r.launches[0]["cluster"] == (1, 1, 1)


def test_missing_cluster_sync_before_remote_reads_shows(emu, clus):
    """Without the first cluster_sync a CTA reads partial sums the others have not written yet (poisoned: NaN)."""
    x = torch.randn(8, 300)
    ref, _, _ = expected(x, 8, 1, 4, 1)
    wrong = 0
    for seed in range(4):
        r = cluster_sum(emu, clus, x, 8, 1, 4, 1, flags=2, seed=seed)
        assert r.ok
        out = r.outputs["out"].double()
        wrong += not (torch.isfinite(out).all() and torch.allclose(out, ref, rtol=1e-5, atol=1e-4))
    assert wrong >= 1
