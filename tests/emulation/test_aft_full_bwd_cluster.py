"""The cluster variants of AFT-full's dense tensor-core backward (csrc/aft_full/aft_full_bwd.cuh: bwd_kv_kernel and
bwd_w_kernel with CL = kBwdCluster = 4, selected on sm_90 with ATTNFREE_CLUSTERS=1) under the emulation harness:
the four CTAs of a cluster hold adjacent key tiles and share each step's Sc G / Sc H rows through distributed shared
memory. Against the float64 oracle at several clusters, key-tile counts that are not a multiple of 4 (the grid is
padded with load-only CTAs), partial tiles, heads, causal (CTAs with no visible key still load their share), bf16 /
fp16 by the 2x rule, fp32, the exact elements (|k|, |w| ~ 1e4, a late spike, NaN); the counted reads of the shared
operands (a quarter of the per-CTA kernels'), the cluster launches and deterministic gradients across schedules."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))

from test_aft_full_bwd_tc import NAMES, _assert_nan_pattern, _bwd, _inputs, _magnitude_inputs, _oracle, _rel  # noqa: E402

from common import oracles  # noqa: E402

pytestmark = pytest.mark.emulation
F64 = torch.float64
CL = 4  # kBwdCluster
KV, W = "bwd_kv_kernel", "bwd_w_kernel"


@pytest.fixture
def clusters(monkeypatch):
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "1")


def _launch(res, name):
    (ln,) = [ln for ln in res.launches if name in ln["kernel"]]
    return ln


def _cluster_bwd(dy, q, k, v, w, y, lse, causal, dtype):
    """The backward with clusters; asserts that both GEMM kernels ran as 4-CTA clusters along their key tiles."""
    got, res, _ = _bwd(dy, q, k, v, w, y, lse, causal, dtype)
    assert tuple(_launch(res, KV)["cluster"]) == (1, CL, 1)
    assert tuple(_launch(res, W)["cluster"]) == (CL, 1, 1)
    return got, res


@pytest.mark.parametrize("causal", [False, True])
def test_switch_selects_the_cluster_kernels(emu, monkeypatch, causal):
    """ATTNFREE_CLUSTERS=1 (the harness models an sm_90 device with cluster launch): both GEMMs as clusters, the
    grids padded to whole clusters (T = 300: 3 key tiles -> 4); unset or 0: the per-CTA kernels, same gradients
    to fp32 rounding."""
    q, k, v, w, dy = _inputs(1, 300, 4, 1, 0)
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv("ATTNFREE_CLUSTERS", raising=False)
        else:
            monkeypatch.setenv("ATTNFREE_CLUSTERS", value)
        plain, res, _ = _bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
        assert tuple(_launch(res, KV)["cluster"]) == (1, 1, 1) and tuple(_launch(res, W)["cluster"]) == (1, 1, 1)
        assert tuple(_launch(res, KV)["grid"])[1] == 3 and tuple(_launch(res, W)["grid"])[0] == 3
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "1")
    got, res = _cluster_bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
    assert tuple(_launch(res, KV)["grid"])[1] == 4 and tuple(_launch(res, W)["grid"])[0] == 4
    assert _launch(res, KV)["counters"]["cluster_barriers"] > 0 and _launch(res, W)["counters"]["cluster_barriers"] > 0
    for name, g, p, e in zip(NAMES, got, plain, exp):
        assert _rel(g, e) < 2e-5 and _rel(g, p) < 2e-5, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape",
    [(1, 600, 4, 1), (1, 1100, 3, 1), (3, 262, 6, 2), (1, 150, 130, 1)],
    ids=["T600-2clusters", "T1100-3clusters", "dh3-heads2", "cols130"],
)
def test_float32_matches_oracle(emu, clusters, shape, causal):
    """T = 600: 5 key tiles in 2 clusters (3 padding CTAs), the last tile partial; T = 1100: 9 tiles in 3 clusters;
    column blocks spanning batch entries, heads, two column blocks."""
    B, T, D, H = shape
    q, k, v, w, dy = _inputs(B, T, D, H, 1)
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    got, _ = _cluster_bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
    for name, g, e in zip(NAMES, got, exp):
        assert _rel(g, e) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_2x_rule(emu, clusters, dtype, causal):
    """Against eager PyTorch in the same dtype (its error doubled, plus 1e-3 of the gradient's size); 2 clusters."""
    B, T, D, H = 2, 600, 8, 2
    q, k, v, w, dy = _inputs(B, T, D, H, 2, scale=0.5)
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, w)]
    low = torch.autograd.grad(oracles.aft_eager(*leaves, causal), leaves, dy.to(dtype))
    got, _ = _cluster_bwd(dy, q, k, v, w, y, lse, causal, dtype)
    for name, g, gl, e in zip(NAMES, got, low, exp):
        assert torch.isfinite(g).all(), name
        bound = 2 * (gl.double() - e).abs().max().item() + 1e-3 * max(1.0, e.abs().max().item())
        assert (g - e).abs().max().item() <= bound, name


@pytest.mark.parametrize("causal", [False, True])
def test_adversarial_magnitudes_exact_elements(emu, clusters, causal):
    """|k|, |w| up to 1e4 with misaligned maxima: most elements are summed exactly (the flagged rows / columns of
    the cluster kernels' epilogues); exact to the rounding of logits ~1e4 in float32."""
    B, T, D, H = 1, 260, 4, 1
    q, k, v, w, dy = _magnitude_inputs(B, T, D, H)
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    got, _ = _cluster_bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
    for name, gg, e in zip(NAMES, got, exp):
        assert torch.isfinite(gg).all(), name
        assert _rel(gg, e) < 5e-3, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_late_spike(emu, clusters, dtype):
    """A key 120 above every earlier one, in the second cluster (key 530 of 600): the rows before it have
    Sc ~ e^120 and are summed exactly; the rows after it take the tensor cores."""
    B, T, D, H = 1, 600, 5, 1
    q, k, v, w, dy = _inputs(B, T, D, H, 5)
    k[:, 530, :] += 120.0
    q, k, v, w, dy = (x.to(dtype).double() for x in (q, k, v, w, dy))
    y, lse, exp = _oracle(q, k, v, w, True, dy)
    got, _ = _cluster_bwd(dy, q, k, v, w, y, lse, True, dtype)
    for name, g, e in zip(NAMES, got, exp):
        assert torch.isfinite(g).all(), name
        assert _rel(g, e) < (2e-5 if dtype == torch.float32 else 3e-2), name


@pytest.mark.parametrize("causal", [False, True])
def test_nan_reaches_the_gradients_the_oracle_says(emu, clusters, causal):
    """A NaN in v at key 200 of one channel (first cluster, second tile): NaN exactly where the oracle has it."""
    B, T, D, H = 1, 600, 4, 1
    q, k, v, w, dy = _inputs(B, T, D, H, 6)
    v[0, 200, 1] = float("nan")
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    got, _ = _cluster_bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
    _assert_nan_pattern(NAMES, got, exp)


def _shared_reads(T, ncols, causal, cluster):
    """Bytes of Sc G, Sc H (bf16) that bwd_kv_kernel and bwd_w_kernel read at T a multiple of 512: every CTA (or
    cluster of 4 key tiles) reads its 64-row steps (bwd_kv: from its first key on when causal) / its 256-row tile
    (bwd_w: unless the tile or, with clusters, the cluster's first tile lies above the diagonal)."""
    span = 128 * (CL if cluster else 1)  # keys per reader
    readers = T // span
    kv_rows = sum(T - i * span if causal else T for i in range(readers))
    w_tiles = sum(sum(1 for i in range(readers) if not causal or i * span <= r + 255) for r in range(0, T, 256))
    return 2 * 2 * ncols * kv_rows, 2 * 2 * ncols * 256 * w_tiles


@pytest.mark.parametrize("causal", [False, True])
def test_counted_shared_operand_reads(emu, monkeypatch, causal):
    """bf16, T = 1024 (8 key tiles: 2 clusters): the cluster kernels read Sc G, Sc H a quarter as often as the
    per-CTA kernels (causal: a third or less, the clusters start at their first tile), exactly the difference of
    the counted bytes read; every other count is the same: bytes written,
    special-function ops, MMA FLOPs (the inactive CTAs of a causal cluster skip their MMAs)."""
    B, T, D, H = 1, 1024, 64, 1
    q, k, v, w, dy = _inputs(B, T, D, H, 9, scale=0.5)
    y, lse, _ = _oracle(q, k, v, w, causal, dy)
    counts = {}
    for cluster in (False, True):
        monkeypatch.setenv("ATTNFREE_CLUSTERS", "1" if cluster else "0")
        _, res, _ = _bwd(dy, q, k, v, w, y, lse, causal, torch.bfloat16)
        counts[cluster] = {n: _launch(res, n)["counters"] for n in (KV, W)}
        assert tuple(_launch(res, KV)["cluster"]) == ((1, CL, 1) if cluster else (1, 1, 1))
        assert tuple(_launch(res, W)["cluster"]) == ((CL, 1, 1) if cluster else (1, 1, 1))
    per_cta, shared = _shared_reads(T, B * D, causal, False), _shared_reads(T, B * D, causal, True)
    for i, n in enumerate((KV, W)):
        a, b = counts[False][n], counts[True][n]
        assert shared[i] * (4 if not causal else 3) <= per_cta[i], n  # a quarter (causal: at most a third)
        assert a["bytes_read"] - b["bytes_read"] == per_cta[i] - shared[i], n
        for c in ("bytes_written", "sfu_total", "mma_flops"):
            assert a[c] == b[c], (n, c)
        assert b["cluster_barriers"] > 0 and a["cluster_barriers"] == 0, n


def test_deterministic_across_schedules(emu, clusters):
    """Two seeds of the harness's thread schedule (fibers of the 4 CTAs of a cluster interleaved at random) give
    bit-identical dq, dk, dv, dw: no atomics, the cluster barriers order every shared tile."""
    import emu_ops

    B, T, D, H = 1, 600, 4, 1
    q, k, v, w, dy = _inputs(B, T, D, H, 10)
    y, lse, _ = _oracle(q, k, v, w, True, dy)
    lib = emu_ops.library()
    old = lib._lib.attnfree_emu_get_seed()
    runs = []
    try:
        for seed in (1, 2):
            lib.set_seed(seed)
            runs.append(_cluster_bwd(dy, q, k, v, w, y, lse, True, torch.float32)[0])
    finally:
        lib.set_seed(old)
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("causal", [False, True])
def test_counted_cost_per_element(emu, clusters, causal):
    """bf16 at the paper shape (benchmarks/cost_model.py, fitted at whole clusters of key tiles) with clusters:
    ~241 bytes and 36.5 special-function ops per output element, predicted_fraction 0.74 (causal ~148 bytes,
    20.3 ops, 0.60); the per-CTA kernels counted 433 bytes, 0.41 (causal 246, 0.36)."""
    from benchmarks import cost_model as cm

    paper = cm.PAPER["aft"]
    r = cm.model_case("aft_full", "bwd", "bf16", causal, cm.small_sizes("aft_full", "bwd"), paper, clusters=True)
    n = paper["B"] * paper["T"] * paper["D"]
    assert r["cluster_kernels"]
    assert r["bytes_counted"] / n < (260 if not causal else 165)
    assert r["special_ops"] / n < (40 if not causal else 23)
    assert r["predicted_fraction"] > (0.7 if not causal else 0.55)
