"""AFT-full's tensor-core forward on 2 x 2 thread-block clusters (fwd_tc_cluster_kernel, csrc/aft_full/aft_full.cu;
ATTNFREE_CLUSTERS=1, the modelled device is an sm_90) under the emulation harness: several clusters both ways, odd
counts of row and column blocks (the launcher pads the grid with CTAs that only share their halves of the tiles),
partial tiles, column blocks spanning batch entries, heads, the synchronous operand loads of odd column counts,
every input dtype, |k|, |w| = 1e4, a causal late spike, a NaN value, against the float64 oracle and bitwise against
the non-cluster kernel (same operands, same MMA order), and the counted reads of w and of the Ek / Ekv tiles
(docs/design.md §5.3): each read once per cluster, half as often as by the 192 x 96 CTAs alone."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))
sys.path.insert(0, os.path.dirname(__file__))

from test_aft_full_tc import _adversarial_inputs, _assert_2x_rule, _fwd, _inputs, _oracle, _rel, _rounded  # noqa: E402

pytestmark = pytest.mark.emulation
F64 = torch.float64
# (B, T, D, heads). T = 400: three row blocks of 192 (the last one 16 rows), padded to four; B dh = 200: three column
# blocks of 96 (the last 8 columns), blocks 1 and 2 spanning both batch entries, padded to four: 2 x 2 clusters.
# heads 2: dh = 60, 120 columns and 230 rows per head, two blocks each way (one cluster per head). 101 columns: not
# a multiple of 16 bytes of operands (element-wise tile loads), two column blocks and three row blocks.
SHAPES = [(2, 400, 100, 1), (2, 230, 120, 2), (1, 400, 101, 1)]
IDS = ["heads1", "heads2", "odd_columns"]


@pytest.fixture
def clusters(monkeypatch):
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "1")


def _main(res):
    """The tensor-core launch (the only one with MMAs)."""
    (ln,) = [ln for ln in res.launches if ln["counters"]["mma_ops"]]
    return ln


def _cluster_launch(res, B, D, T, heads):
    """The main launch is a 2 x 2 cluster launch of the padded grid and ran its cluster barriers."""
    ln = _main(res)
    assert "fwd_tc_cluster_kernel" in ln["kernel"], ln["kernel"]
    assert tuple(ln["cluster"]) == (2, 2, 1), ln["cluster"]
    cols, rows = -(-B * D // heads // 96), -(-T // 192)
    assert tuple(ln["grid"]) == (cols + cols % 2, rows + rows % 2, heads), ln["grid"]
    assert ln["counters"]["cluster_barriers"] > 0
    return ln


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_float32_several_clusters(emu, clusters, shape, causal):
    q, k, v, w = _inputs(*shape, 1)
    y, lse, res = _fwd(q, k, v, w, causal, torch.float32)
    _cluster_launch(res, shape[0], shape[2], shape[1], shape[3])
    yr, lr = _oracle(*_rounded(torch.float32, q, k, v, w), causal)
    assert _rel(y, yr) < 2e-6
    assert (lse - lr).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=IDS[:2])
def test_low_precision_2x_rule(emu, clusters, shape, causal, dtype):
    """error(kernel) <= 2 x error(eager PyTorch in dtype) + 1e-3, both against the float64 oracle."""
    q, k, v, w = _rounded(dtype, *_inputs(*shape, 2))
    y, lse, res = _fwd(q, k, v, w, causal, dtype)
    _cluster_launch(res, shape[0], shape[2], shape[1], shape[3])
    assert y.dtype == dtype
    _assert_2x_rule(q, k, v, w, causal, dtype, y, lse)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_bitwise_equal_to_non_cluster_kernel(emu, monkeypatch, shape, causal):
    """bf16: the cluster kernel forms the same Ew, Ek, Ekv operands and multiplies them in the same order as
    fwd_tc_kernel, so y and lse agree bit for bit (a tile half lost, stale or shared with the wrong CTA would not)."""
    q, k, v, w = _inputs(*shape, 8)
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "0")
    y0, l0, r0 = _fwd(q, k, v, w, causal, torch.bfloat16)
    assert "fwd_tc_cluster_kernel" not in _main(r0)["kernel"]
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "1")
    y1, l1, r1 = _fwd(q, k, v, w, causal, torch.bfloat16)
    _cluster_launch(r1, shape[0], shape[2], shape[1], shape[3])
    assert torch.equal(y0, y1) and torch.equal(l0, l1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("what", ["k1e4", "w1e4", "late_spike"])
def test_adversarial_finite_and_accurate(emu, clusters, what, causal, dtype):
    """|k| or |w| ~ 1e4 (row and column maxima far apart: the lost-tile guard recomputes those (t, c) exactly) and
    a late key larger than every earlier one by 3000 (causally, m comes from a key most rows do not see)."""
    B, T, D, heads = 2, 400, 100, 1
    q, k, v, w = _rounded(dtype, *_adversarial_inputs(what, B, T, D, heads))
    y, lse, res = _fwd(q, k, v, w, causal, dtype)
    _cluster_launch(res, B, D, T, heads)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    yr, lr = _oracle(q, k, v, w, causal)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, lr, rtol=1e-6, atol=1e-3 if dtype == torch.float32 else 1e-2)


def test_nan_value_reaches_its_column_only(emu, clusters):
    """Causal: a NaN in v at key 300 (second row block, third column block) makes y NaN in every row that sees it
    and nowhere outside its column or its own and later row blocks: the tiles shared with the other CTAs of its
    cluster (row block 3 is padding, column block 3 too) carry it nowhere else."""
    B, T, D, heads = 2, 400, 100, 1
    q, k, v, w = _inputs(B, T, D, heads, 4)
    v[1, 300, 7] = float("nan")
    y, lse, res = _fwd(q, k, v, w, True, torch.bfloat16)
    _cluster_launch(res, B, D, T, heads)
    assert torch.isnan(y[1, 300:, 7]).all()
    assert torch.isfinite(y[1, :192, 7]).all()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, :, 7] = False
    assert torch.isfinite(y[mask]).all() and torch.isfinite(lse).all()


def _main_reads(monkeypatch, on, w_dtype, causal, B, T, D):
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "1" if on else "0")
    import emu_ops

    bf = torch.bfloat16
    q, k, v, w = _inputs(B, T, D, 1, 7)
    emu_ops.aft_full_fwd(q.to(bf), k.to(bf), v.to(bf), w[0].to(bf).to(w_dtype), causal)
    ln = _main(emu_ops.last_result())
    assert ("fwd_tc_cluster_kernel" in ln["kernel"]) == on, ln["kernel"]
    assert (tuple(ln["cluster"]) == (2, 2, 1)) == on, ln["cluster"]
    return ln["counters"]["bytes_read"], ln["counters"]["sfu_total"]


@pytest.mark.parametrize("causal", [False, True])
def test_counted_reads_halved(emu, monkeypatch, causal):
    """bf16, T = 384, B D = 384: whole tiles, 2 row x 4 column blocks, two clusters. The main kernel's reads of w
    (counted as the bytes a float32 w adds over a bfloat16 one: 2 B per element read) and of the Ek, Ekv tiles (the
    rest, less q and the references) are half of the non-cluster kernel's, and so are its exponentials of w.
    Causal: w exactly half (both CTAs of a cluster row skip the same tiles); Ek, Ekv 6 key tiles per column block
    once per cluster column (the upper row block's; the lower CTAs load their half of the 3 they do not need) instead
    of 3 + 6 by the two row blocks alone."""
    B, T, D = 1, 384, 384
    n = B * T * D
    # bf16 causal: the rows that see fewer than 16 keys are summed exactly (both kernels), reading w, k, v per key
    fb = sum(t + 1 for t in range(15)) * B * D if causal else 0
    got = {}
    for on in (False, True):
        rb, sfu = _main_reads(monkeypatch, on, torch.bfloat16, causal, B, T, D)
        rf, _ = _main_reads(monkeypatch, on, torch.float32, causal, B, T, D)
        w_reads = (rf - rb) / 2  # w elements read
        ctas = 4 * 2
        other = n * 2 + ctas * (192 + 96) * 4 + fb * 2 * 2  # q (epilogue), r and m once per CTA, fallback k, v
        ek_bytes = rb - 2 * w_reads - other
        got[on] = (w_reads - fb, ek_bytes, sfu)
    (w0, e0, s0), (w1, e1, s1) = got[False], got[True]
    # non-cluster: w read once per column block (4 x the visible T x T), Ek, Ekv once per row block
    vis = T * (T + 1) // 2 if causal else T * T
    assert w0 == 4 * vis
    assert w1 == w0 / 2
    tiles0 = (3 + 6) if causal else (6 + 6)  # 64-key tiles of Ek, Ekv read per column block by its two row blocks
    assert e0 == tiles0 * 64 * 384 * 2 * 2
    assert e1 == 6 * 64 * 384 * 2 * 2  # once per cluster column: the upper row block's 6 tiles
    # exponentials of w: one per visible element per column block, half of them saved (the epilogue's sigmoid, log
    # and exact fallbacks are the same in both)
    assert s0 - s1 == w1
