"""EA double normalisation's vectorised forward (csrc/ea_double_norm/ea_double_norm.cu) under the emulation harness:
the counted cost per element (docs/design.md §5.3) and the column statistics kept relative to power-of-four offsets
(common/pow4_offsets.cuh): maxima on both sides of a multiple of 2 ln 2, row blocks whose maxima lie 100..1e4 apart
(merge factors down to the subnormal range and to 0), logits past the power-of-four range up to the largest
float, NaN and -inf. The float64 oracle is tests/common/oracles.py."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))

from common import oracles  # noqa: E402

pytestmark = pytest.mark.emulation
F64, F32 = torch.float64, torch.float32
U = 2 * math.log(2)


def _logits(M, N, S, seed, dtype=F32, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, N, S, generator=g, dtype=F64) * scale).to(dtype)


@pytest.mark.parametrize("N", [100, 1000])
def test_counted_cost_per_element(emu, N):
    """bf16, S = 64: one exponential per logit in each pass (the column statistics rescaled and merged with powers
    of two; the rows past N in the last row block no longer send their warp through the log-space branch), and the
    logits read twice: out, rowsum and the block statistics on top (the former kernels counted 2.9 exponentials per
    logit at N = 100)."""
    import emu_ops

    M, S = 4, 64
    x = _logits(M, N, S, 1, torch.bfloat16)
    emu_ops.ea_double_norm_fwd(x, 1e-6)
    c = emu_ops.last_result().counters
    n = M * N * S
    assert c["sfu_total"] <= 2 * n + 2 * M * S, c["sfu_total"] / n
    stats = 32 * M * S * math.ceil(N / 256)  # per row block: its (max, sum) written and read, lse read
    assert c["bytes_read"] + c["bytes_written"] <= 6 * n + 4 * M * N + stats, (c["bytes_read"] + c["bytes_written"]) / n


def _check(x, eps, tol):
    """out and rowsum to tol + 8 eps L and lse relatively to tol, L the largest |logit| spread a column's lse carries
    (lse is stored in float32, so exp(l - lse) is only as exact as lse)."""
    import emu_ops

    out, lse, rowsum = emu_ops.ea_double_norm_fwd(x, eps)
    xd = x.double()
    ref = oracles.ea_double_norm(xd, eps)
    lo = torch.logsumexp(xd, dim=-2, keepdim=True)
    assert (out.double() - ref).abs().max() <= tol
    assert ((lse.double() - lo).abs() / lo.abs().clamp_min(1)).max() <= tol
    rs = torch.softmax(xd, -2).sum(-1, keepdim=True) + eps
    assert (rowsum.double() - rs).abs().max() <= tol * x.shape[-1]


@pytest.mark.parametrize("dtype", [F32, F64])
def test_maxima_at_step_boundaries(emu, dtype):
    """Column maxima just below, at and above multiples of 2 ln 2, changing from row to row, so the running sums
    rescale by 4^{+-1} and the lane and block merges see every offset relation."""
    M, N, S = 2, 1500, 8 if dtype == F64 else 16
    x = _logits(M, N, S, 2, dtype, scale=0.01)
    step = (torch.arange(N, dtype=F64) % 7 - 3) * U
    jitter = torch.linspace(-0.5, 0.5, S, dtype=F64)
    x = (x.double() + step[:, None] + jitter).to(dtype)
    _check(x, 1e-9, 1e-5 if dtype == F32 else 1e-12)


@pytest.mark.parametrize("gap", [100.0, 130.0, 250.0, 3000.0])
def test_far_apart_block_maxima(emu, gap):
    """float32, N past several row blocks: alternate blocks and rows sit `gap` apart, so the merge factors are
    normal, subnormal or 0."""
    M, N, S = 2, 2100, 16
    x = _logits(M, N, S, 3)
    n = torch.arange(N)
    x[:, ((n // 512) % 2 == 1) | (n % 5 == 0), : S // 2] += gap
    x[:, (n // 64) % 3 == 0, S // 2 :] -= gap
    _check(x, 1e-9, 1e-5 + 8 * 1.2e-7 * (gap + 3))


def test_huge_logits(emu):
    """float32 columns past 2^23 (plain offsets, and merges across the limit) up to 3.3e38, each with one logit 50
    above all others (a float32 lse cannot carry log N next to |lse| = 1e7, so ties would not be exact), next to
    ordinary columns."""
    M, N, S = 1, 1200, 16
    x = _logits(M, N, S, 4)
    n = torch.arange(N, dtype=F64)
    x[0, :, 0] = (1e7 - 200 * (n % 7)).float()
    x[0, 777, 0] = 1e7 + 50
    x[0, :, 1] = torch.linspace(-1e7, 2.0**23 + 64, N).float()  # the max rises through the limit
    x[0, :, 2] = (-3e38 + 1e32 * n).float()
    x[0, 100, 3] = 3.3e38
    _check(x, 1e-9, 1e-5)


def test_nan_and_masked_columns(emu):
    """A NaN logit poisons its matrix (every row sum sees its column); an all -inf column has lse = -inf and out = 0;
    the other matrix is untouched."""
    import emu_ops

    M, N, S = 2, 700, 16
    x = _logits(M, N, S, 5)
    x[0, 333, 2] = float("nan")
    x[1, :, 5] = float("-inf")
    out, lse, _ = emu_ops.ea_double_norm_fwd(x, 1e-9)
    assert torch.isnan(out[0]).all()
    assert lse[1, 0, 5] == float("-inf") and (out[1, :, 5] == 0).all()
    ref, _ = oracles.ea_double_norm_masked(x[1:], 1e-9)
    assert (out[1:].double() - ref).abs().max() <= 1e-5
