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
    assert c["barriers"] == gx * gy * 4  # __syncthreads per CTA: after the stores, strides 64 and 32, the shuffle
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


def test_shared_memory_of_every_cta_is_poisoned(emu, clus):
    for seed in range(2):  # a second cluster of the launch reuses the memory of the first: poisoned again
        r = fault(emu, clus, 5, blocks=8, cx=4, seed=seed).check()
        assert r.outputs["y"].isnan().all()


def test_shared_memory_of_an_exited_cta_is_poisoned(emu, clus):
    """Without the last cluster_sync a CTA may exit while the others still read its shared memory: its shared
    memory is poisoned at exit, so the late reads give NaN (for most seeds)."""
    x = torch.randn(8, 300)
    ref, _, _ = expected(x, 8, 1, 4, 1)
    nan = 0
    for seed in range(4):
        r = cluster_sum(emu, clus, x, 8, 1, 4, 1, flags=1, seed=seed)
        assert r.ok
        out = r.outputs["out"]
        nan += bool(out.isnan().any())
        fin = out.isfinite()
        torch.testing.assert_close(out.double()[fin], ref[fin], rtol=1e-5, atol=1e-4)
    assert nan >= 1


def test_cluster_shared_memory_poison_off(emu, clus):
    """With poisoning off the same kernel reads stale but finite values: the NaN above comes from the poison."""
    x = torch.randn(8, 300)
    clus.set_poison(False)
    try:
        r = cluster_sum(emu, clus, x, 8, 1, 4, 1, flags=1, seed=0).check()
    finally:
        clus.set_poison(True)
    assert r.outputs["out"].isfinite().all()


@pytest.mark.parametrize(
    "gx,gy,cx,cy,why",
    [
        (6, 1, 4, 1, "not a multiple of the cluster dimensions"),
        (16, 1, 16, 1, "more than 8 CTAs"),
        (8, 2, 8, 2, "more than 8 CTAs"),
        (4, 3, 2, 2, "not a multiple"),
    ],
)
def test_bad_cluster_launch_refused(emu, clus, gx, gy, cx, cy, why):
    r = cluster_sum(emu, clus, torch.randn(gx * gy, 10), gx, gy, cx, cy)
    assert r.rc == 912 and why in r.fault and "cluster_sum_kernel" in r.fault  # cudaErrorInvalidClusterSize
    assert r.counters["launches"] == 0 and r.launches[0]["error"] == 912


def test_largest_portable_cluster_runs(emu, clus):
    x = torch.randn(16, 50)
    ref, rank, _ = expected(x, 8, 2, 4, 2)
    r = cluster_sum(emu, clus, x, 8, 2, 4, 2).check()
    torch.testing.assert_close(r.outputs["out"].double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(r.outputs["info"].view(-1, 2)[:, 0], rank)


def fault(emu, lib, what, blocks=4, cx=2, seed=None):
    kw = {} if seed is None else {"seed": seed}
    return lib.call("emu_cluster_fault", emu.Out("y", torch.empty(blocks * THREADS)), blocks, cx, what, **kw)


def test_divergent_cluster_sync_reported(emu, clus):
    r = fault(emu, clus, 0)
    assert not r.ok and r.rc == 719
    assert "divergent cluster barrier" in r.fault and "cluster.cu:" in r.fault and "cluster_fault_kernel" in r.fault
    assert "rank" in r.fault  # the message names the CTA's place in its cluster


def test_exit_while_cluster_waits_reported(emu, clus):
    clus.set_schedule("inorder")  # rank 0's threads (lower ids) arrive first, then rank 1's exit
    try:
        r = fault(emu, clus, 1)
    finally:
        clus.set_schedule("shuffle")
    assert not r.ok and r.rc == 719 and "thread exited while" in r.fault and "wait at cluster_sync" in r.fault
    for seed in range(3):  # shuffled: the exit may also come first; either way the launch fails
        r = fault(emu, clus, 1, seed=seed)
        assert not r.ok and "cluster_sync" in r.fault and "exit" in r.fault


def test_syncthreads_against_cluster_sync_reported(emu, clus):
    r = fault(emu, clus, 2)
    assert not r.ok and r.rc == 719 and "divergent barrier" in r.fault
    assert "cluster_sync" in r.fault and "__syncthreads" in r.fault


def test_cluster_map_shared_checks(emu, clus):
    r = fault(emu, clus, 3)
    assert not r.ok and r.rc == 700 and "not inside this CTA's dynamic shared memory" in r.fault
    r = fault(emu, clus, 4)
    assert not r.ok and r.rc == 700 and "rank 2, but the cluster has 2 CTA(s)" in r.fault


def test_static_shared_memory_in_a_cluster_faults(emu, clus):
    y = torch.empty(4 * THREADS)
    exp = torch.arange(4).float().repeat_interleave(THREADS)
    for cx in (0, 1):  # plain launch, clusters of one CTA: modelled
        r = clus.call("emu_static_shared", emu.Out("y", y), 4, cx).check()
        assert torch.equal(r.outputs["y"], exp)
    r = clus.call("emu_static_shared", emu.Out("y", y), 4, 2)
    assert not r.ok and r.rc == 719 and "static shared memory 'tile'" in r.fault and "cluster.cu:" in r.fault


def test_device_reports_cluster_launch(emu, clus, monkeypatch):
    assert clus.raw("emu_cluster_device_attribute") == 1
    for value, on in (("1", 1), ("0", 0), ("", 0), ("yes", 0)):
        monkeypatch.setenv("ATTNFREE_CLUSTERS", value)
        assert clus.raw("emu_cluster_kernels_enabled") == on, value
    monkeypatch.delenv("ATTNFREE_CLUSTERS")
    assert clus.raw("emu_cluster_kernels_enabled") == 0
