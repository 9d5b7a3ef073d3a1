"""EA double normalisation's cluster forward (csrc/ea_double_norm/ea_double_norm.cu, ea_fwd_cluster_kernel; sm_90,
ATTNFREE_CLUSTERS=1) under the emulation harness: one matrix spread over the shared memory of a cluster of C CTAs,
the logits read once (docs/design.md §5.3). Against the float64 oracles of tests/common/oracles.py: every cluster size
the selection takes (C = 1, 2, 4, 8 by N), row counts that are not multiples of C or of the rows per pass, every
dtype, |logits| ~ 1e4, an all -inf column, a NaN, the paper shape's matrix; the counted single read and the single
cluster launch; and the two-pass kernels with the switch off or where a matrix does not fit in 8 CTAs."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))

from common import oracles  # noqa: E402
from common.metrics import maxabs  # noqa: E402

pytestmark = pytest.mark.emulation
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
SMEM = 227 * 1024  # the modelled device's opt-in shared memory per block
STAT_ROWS = 35  # the kernel's per-CTA statistics: 3 + 2 x 16 warps rows of S accumulators


@pytest.fixture
def clusters(monkeypatch):
    monkeypatch.setenv("ATTNFREE_CLUSTERS", "1")


def _logits(M, N, S, seed, dtype=F32, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, N, S, generator=g, dtype=F64) * scale).to(dtype)


def _expected_cluster(N, S, dtype):
    """The documented selection: the smallest power of two C <= 8 with ceil(N / C) rows and the statistics in one
    CTA's shared memory, else None."""
    acc = 8 if dtype == F64 else 4
    elt = torch.finfo(dtype).bits // 8
    for C in (1, 2, 4, 8):
        if math.ceil(N / C) * S * elt + STAT_ROWS * S * acc <= SMEM:
            return C
    return None


def _run(x, eps):
    """(out, lse, rowsum, harness result)."""
    import emu_ops

    out, lse, rowsum = emu_ops.ea_double_norm_fwd(x, eps)
    return out, lse, rowsum, emu_ops.last_result()


def _assert_cluster_launch(r, M, C):
    (rec,) = r.launches
    assert "ea_fwd_cluster_kernel" in rec["kernel"]
    assert tuple(rec["cluster"]) == (C, 1, 1)
    assert tuple(rec["grid"]) == (M * C, 1, 1)


def _check_fp(x, eps, tol):
    """float32 / float64 against the float64 oracle: out and rowsum absolutely, lse relatively."""
    out, lse, rowsum, r = _run(x, eps)
    xd = x.double()
    ref = oracles.ea_double_norm(xd, eps)
    lo = torch.logsumexp(xd, dim=-2, keepdim=True)
    rs = torch.softmax(xd, -2).sum(-1, keepdim=True) + eps
    assert maxabs(out, ref) <= tol
    assert ((lse.double() - lo).abs() / lo.abs().clamp_min(1)).max() <= tol
    assert maxabs(rowsum, rs) <= tol * x.shape[-1]
    return r


# fp32, S = 128: 419 rows of a CTA fit next to the statistics, so C = 1, 2, 4, 8 up to 419, 838, 1676, 3352 rows.
@pytest.mark.parametrize(
    "M,N,C",
    [(3, 419, 1), (2, 421, 2), (2, 1001, 4), (2, 1677, 8)],
    ids=["C1-full", "C2-odd", "C4-odd", "C8-odd"],
)
def test_cluster_sizes_fp32(emu, clusters, M, N, C):
    """Every cluster size, the rows of a CTA (ceil(N / C)) not a multiple of the 16 rows per pass and the last CTA
    shorter; the matrices' column maxima lie in different CTAs' rows so the merge rescales across the cluster."""
    S = 128
    assert _expected_cluster(N, S, F32) == C
    x = _logits(M, N, S, 10 + C)
    n = torch.arange(N)
    x[:, n % 97 == 0, : S // 2] += 30.0  # column maxima spread over the ranks
    x[1, n >= N - N // (2 * C), S // 2 :] += 12.0  # the other half's maxima in the last CTA's rows
    r = _check_fp(x, 1e-9, 2e-6)
    _assert_cluster_launch(r, M, C)


def test_cluster_fp64_and_eps0(emu, clusters):
    """float64 (V = 2, the same 512-byte rows as fp32 S = 128): C = 4, eps = 0."""
    M, N, S = 2, 999, 64
    x = _logits(M, N, S, 20, F64, scale=2.0)
    r = _check_fp(x, 0.0, 1e-12)
    _assert_cluster_launch(r, M, 4)


@pytest.mark.parametrize(
    "dtype,M,N,S,C",
    [(BF16, 2, 1801, 64, 2), (F16, 3, 333, 24, 1), (BF16, 1, 1001, 256, 4)],
    ids=["bf16-C2", "fp16-S24-C1", "bf16-S256-C4"],
)
def test_cluster_low_precision_two_x_rule(emu, clusters, dtype, M, N, S, C):
    """fp16 / bf16 within twice the error of plain PyTorch in the dtype (the rule of tests/ops), S = 24 with three
    vectors per row in a four-thread group, S = 256 with 32."""
    assert _expected_cluster(N, S, dtype) == C
    x = (torch.randn(M, N, S, generator=torch.Generator().manual_seed(30), dtype=F64) * 3).to(dtype)
    out, lse, rowsum, r = _run(x, 1e-9)
    _assert_cluster_launch(r, M, C)
    assert out.dtype == dtype
    ref = oracles.ea_double_norm(x.double(), 1e-9)
    oe = oracles.ea_double_norm_eager(x, 1e-9)
    floor = 1e-3 if dtype == BF16 else 1e-4
    assert maxabs(out, ref) <= 2 * maxabs(oe, ref) + floor
    lo = torch.logsumexp(x.double(), dim=-2, keepdim=True)
    assert (lse.double() - lo).abs().max() <= 1e-5 * lo.abs().max()


def test_paper_matrix_bf16(emu, clusters):
    """The paper shape's matrix (N = 4096, S = 64, bf16: 4 CTAs x 1024 rows x 128 bytes): the cluster kernel is
    selected and meets the two-x rule."""
    M, N, S = 1, 4096, 64
    assert _expected_cluster(N, S, BF16) == 4
    x = _logits(M, N, S, 40, BF16, scale=2.0)
    out, lse, rowsum, r = _run(x, 1e-9)
    _assert_cluster_launch(r, M, 4)
    ref = oracles.ea_double_norm(x.double(), 1e-9)
    oe = oracles.ea_double_norm_eager(x, 1e-9)
    assert maxabs(out, ref) <= 2 * maxabs(oe, ref) + 1e-3
    rs = torch.softmax(x.double(), -2).sum(-1, keepdim=True) + 1e-9
    assert maxabs(rowsum, rs) <= 1e-5


@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_cluster_large_logits(emu, clusters, scale):
    """|logits| ~ 1e4 (fp32, C = 4): the CTAs' column maxima thousands apart (merge factors subnormal or 0), finite
    everywhere, as accurate as the lse a float32 can carry."""
    M, N, S = 2, 1001, 128
    x = _logits(M, N, S, 50, scale=scale)
    out, lse, rowsum, r = _run(x, 1e-9)
    _assert_cluster_launch(r, M, 4)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(rowsum).all()
    ref = oracles.ea_double_norm(x.double(), 1e-9)
    assert maxabs(out, ref) <= 4 * scale * torch.finfo(F32).eps


def test_cluster_nan_and_masked_column(emu, clusters):
    """fp32, C = 8: a NaN logit in the last CTA's rows makes its whole matrix NaN (every row sum sees its column's
    lse, merged from that CTA's partials), as in the oracle; an all -inf column of the other matrix has lse = -inf
    and out = 0, a -inf logit p = 0, the rest matches the masked oracle."""
    M, N, S = 2, 1677, 128
    x = _logits(M, N, S, 60)
    x[0, N - 5, 7] = float("nan")
    x[1, :, 5] = float("-inf")
    x[1, 3, 9] = float("-inf")
    out, lse, rowsum, r = _run(x, 1e-9)
    _assert_cluster_launch(r, M, 8)
    ref0 = oracles.ea_double_norm(x[:1].double(), 1e-9)
    assert torch.equal(torch.isnan(out[:1]), torch.isnan(ref0)) and torch.isnan(out[0]).all()
    assert torch.isnan(lse[0, 0, 7]) and torch.isnan(rowsum[0]).all()
    ref1, lse1 = oracles.ea_double_norm_masked(x[1:], 1e-9)
    assert lse[1, 0, 5] == float("-inf") and (out[1, :, 5] == 0).all() and out[1, 3, 9] == 0
    assert not torch.isnan(out[1]).any()
    assert maxabs(out[1:], ref1) <= 2e-6


def test_cluster_schedule_independent(emu, clusters):
    """fp32, C = 8: bitwise the same out, lse and rowsum under different thread and cluster orders and in order:
    every CTA merges the warps' and the cluster's partials in a fixed order, whoever finishes first."""
    import emu_ops

    lib = emu_ops.library()
    x = _logits(2, 1677, 128, 100, scale=3.0)
    old = lib._lib.attnfree_emu_get_seed()
    runs = []
    try:
        for seed in (11, 12, 13):
            lib.set_seed(seed)
            runs.append(_run(x, 1e-9)[:3])
        lib.set_schedule("inorder")
        runs.append(_run(x, 1e-9)[:3])
    finally:
        lib.set_schedule("shuffle")
        lib.set_seed(old)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("dtype", [BF16, F32])
def test_cluster_reads_logits_once(emu, clusters, dtype):
    """Counted: one cluster launch; the logits read exactly once (nothing else is read from global memory), exactly
    out, lse and rowsum written, two cluster barriers per cluster, one exponential per logit in each phase plus a
    log per column and CTA."""
    M, N, S = 3, 1001, 128 if dtype == F32 else 64
    C = _expected_cluster(N, S, dtype)
    assert C == (4 if dtype == F32 else 1)
    x = _logits(M, N, S, 70, dtype)
    out, lse, rowsum, r = _run(x, 1e-9)
    _assert_cluster_launch(r, M, C)
    c = r.counters
    n = M * N * S
    assert c["bytes_read"] == x.numel() * x.element_size()
    assert c["bytes_written"] == out.numel() * out.element_size() + 4 * (M * S + M * N)
    assert c["cluster_barriers"] == 2 * M
    assert c["sfu_total"] <= 2 * n + 2 * M * C * S, c["sfu_total"] / n
    ref = oracles.ea_double_norm(x.double(), 1e-9)
    oe = oracles.ea_double_norm_eager(x, 1e-9)
    assert maxabs(out, ref) <= 2 * maxabs(oe, ref) + 1e-6


@pytest.mark.parametrize("value", ["0", None])
def test_switch_off_keeps_two_pass_kernels(emu, monkeypatch, value):
    """ATTNFREE_CLUSTERS=0 or unset: the column-statistics, combine and row kernels, the logits read twice."""
    if value is None:
        monkeypatch.delenv("ATTNFREE_CLUSTERS", raising=False)
    else:
        monkeypatch.setenv("ATTNFREE_CLUSTERS", value)
    M, N, S = 2, 1001, 64
    x = _logits(M, N, S, 80, BF16)
    out, lse, rowsum, r = _run(x, 1e-9)
    kernels = [rec["kernel"] for rec in r.launches]
    assert len(kernels) == 3 and not any("cluster" in k for k in kernels), kernels
    assert all(tuple(rec["cluster"]) == (1, 1, 1) for rec in r.launches)
    assert r.counters["bytes_read"] > 2 * x.numel() * x.element_size()
    ref = oracles.ea_double_norm(x.double(), 1e-9)
    assert maxabs(out, ref) <= 2 * maxabs(oracles.ea_double_norm_eager(x, 1e-9), ref) + 1e-3


@pytest.mark.parametrize(
    "dtype,N,S",
    [(F64, 3353, 64), (BF16, 200, 20)],
    ids=["too-large-for-8", "S-not-vector"],
)
def test_cluster_shapes_that_do_not_fit(emu, clusters, dtype, N, S):
    """A matrix whose eighth does not fit in a CTA (fp64, 420 rows of 512 bytes), and S not a multiple of the
    16-byte vector: the two-pass kernels, correct."""
    assert _expected_cluster(N, S, dtype) is None or S % (16 // (torch.finfo(dtype).bits // 8)) != 0
    M = 1
    x = _logits(M, N, S, 90, dtype)
    out, lse, rowsum, r = _run(x, 1e-9)
    assert not any("cluster" in rec["kernel"] for rec in r.launches)
    ref = oracles.ea_double_norm(x.double(), 1e-9)
    tol = 1e-12 if dtype == F64 else 2 * maxabs(oracles.ea_double_norm_eager(x, 1e-9), ref) + 1e-3
    assert maxabs(out, ref) <= tol
