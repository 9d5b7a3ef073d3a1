"""AFT-simple's tiled kernels (csrc/aft_simple/aft_simple.cu, power-of-four offsets of pow4_offsets.cuh) under the
emulation harness: the counted special-function operations per element (docs/design.md §2.7, §5.3) and the
numerics that the power-of-four offsets touch: chunk maxima on both sides of a multiple of 2 ln 2, neighbouring
chunks whose maxima differ by 100..1e4 (merge factors down to the subnormal range and to 0), keys past the
power-of-four range up to the largest float, -inf keys and NaN. The float64 oracles are tests/common/oracles.py."""

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


def _qkv(B, T, D, seed, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return tuple((torch.randn(B, T, D, generator=g, dtype=F64) * 0.5).to(dtype) for _ in range(3))


def _ref(q, k, v, causal):
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    y = oracles.aft_simple(qd, kd, vd, causal)
    lse = torch.logcumsumexp(kd, 1) if causal else torch.logsumexp(kd, 1, keepdim=True).expand_as(kd)
    return y, lse.detach(), (qd, kd, vd)


@pytest.mark.parametrize("causal", [True, False])
def test_special_functions_per_element(emu, causal):
    """bf16, 4 tiles of 512 steps: forward exp(k), sigmoid(q) and (causal) log per element, plus one log per column
    when non-causal; backward sigmoid(q), exp(-lse - M) and exp(k + M) per element. Merging chunk states costs no
    exponential (the former per-chunk merge gave 3 + 1/8 causal, 2 + 1/8 + 64/T non-causal, 3 + 1/8 backward)."""
    import emu_ops

    B, T, D = 1, 2048, 64
    q, k, v = _qkv(B, T, D, 1, torch.bfloat16)
    n, cols = B * T * D, B * D
    y, lse = emu_ops.aft_simple_fwd(q, k, v, causal)
    c = emu_ops.last_result().counters
    assert c["sfu_total"] <= (3 * n if causal else 2 * n + cols), c["sfu_total"] / n
    assert c["bytes_read"] + c["bytes_written"] == n * (3 * 2 + 2 + 4)  # q, k, v read, y, lse written once
    dy = _qkv(B, T, D, 2, torch.bfloat16)[0]
    emu_ops.aft_simple_bwd(dy, q, k, v, y, lse, causal)
    c = emu_ops.last_result().counters
    assert c["sfu_total"] <= 3 * n, c["sfu_total"] / n


def _check(q, k, v, causal, ytol, ltol, grads=True):
    import emu_ops

    yo, lo, leaves = _ref(q, k, v, causal)
    y, lse = emu_ops.aft_simple_fwd(q, k, v, causal)
    fin = torch.isfinite(lo)
    assert torch.equal(torch.isfinite(lse), fin)
    assert ((lse.double() - lo)[fin].abs() / lo[fin].abs().clamp_min(1)).max() <= ltol
    assert (y.double() - yo).abs().max() / yo.abs().max().clamp_min(1e-30) <= ytol
    if not grads:
        return
    dy = _qkv(*q.shape, 9, q.dtype)[0]
    go = torch.autograd.grad(yo, leaves, dy.double())
    gc = emu_ops.aft_simple_bwd(dy, q, k, v, y, lse, causal)
    vmax = v.double().abs().max()
    for name, a, b in zip("q k v".split(), gc, go):
        scale = b.abs().max() + (vmax * go[2].abs().max() if name == "k" else 0)
        assert (a.double() - b).abs().max() / scale.clamp_min(1e-30) <= ytol, name


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_offsets_at_step_boundaries(emu, causal, dtype):
    """Chunk maxima just below, at and just above multiples of 2 ln 2 (the offset steps), in every chunk of 8
    steps: the sums then carry terms up to 1 and down to 1/4, and neighbouring chunks scale by 4^{+-1}."""
    B, T, D = 2, 1100, 8
    q, k, v = _qkv(B, T, D, 3, dtype)
    j = torch.arange(T, dtype=F64)
    step = (j // 8) % 7 - 3  # chunk index -> offset step -3..3
    jitter = torch.tensor([-1e-6, 0.0, 1e-6, -0.3, 0.3, 0.5, -0.5, 0.0], dtype=F64)
    for c in range(D):
        k[:, :, c] = (step * U + jitter[c] + 0.01 * k[:, :, c].double()).to(dtype)
    tol = 1e-5 if dtype == F32 else 1e-12
    _check(q, k, v, causal, tol, tol)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gap", [100.0, 130.0, 250.0, 800.0, 1e4])
def test_far_apart_chunk_maxima(emu, causal, gap):
    """float32: alternate 512-step tiles and 8-step chunks sit `gap` nats apart, so merge factors are normal,
    subnormal (4^d below 2^-126) or 0; the result must still match the oracle (a term below the float range is
    below the rounding of the larger side's sum)."""
    B, T, D = 1, 2048 + 40, 8
    q, k, v = _qkv(B, T, D, 4)
    j = torch.arange(T)
    hi_chunk = ((j // 8) % 2 == 1) | ((j // 512) % 2 == 1)
    k[0, hi_chunk, :4] += gap
    k[0, (j // 8) % 3 == 0, 4:] -= gap  # and the other way round
    L = gap + 3
    _check(q, k, v, causal, 1e-5 + 8 * 1.2e-7 * L, 1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_huge_keys(emu, causal):
    """float32 keys past the power-of-four range (|m| > 2^23: plain offsets there, and merges across the limit),
    up to +-3e38, next to ordinary keys: lse matches the oracle, y is the softmax average."""
    B, T, D = 1, 1200, 5
    q, k, v = _qkv(B, T, D, 5)
    k[0, 300:310, 0] = 3.0e38
    k[0, :, 1] = -3.0e38
    k[0, 100, 2] = 3.3e38
    k[0, :, 3] = 2.0**23 + (k[0, :, 3] * 6).round()  # chunk maxima on both sides of the limit
    k[0, :, 4] = 1e30 * (1 + 1e-6 * k[0, :, 4])
    _check(q, k, v, causal, 1e-5, 1e-6, grads=False)


@pytest.mark.parametrize("causal", [True, False])
def test_neg_inf_and_nan_keys(emu, causal):
    """-inf keys are masked (a column of only -inf keys has lse = -inf, y = 0); a NaN key makes its rows NaN."""
    import emu_ops

    B, T, D = 1, 700, 8
    q, k, v = _qkv(B, T, D, 6)
    k[0, :, 0] = float("-inf")
    k[0, :40, 1] = float("-inf")  # causal: rows 0..39 see no key
    k[0, 333, 2] = float("nan")
    y, lse = emu_ops.aft_simple_fwd(q, k, v, causal)
    assert (lse[0, :, 0] == float("-inf")).all() and (y[0, :, 0] == 0).all()
    if causal:
        assert (lse[0, :40, 1] == float("-inf")).all() and (y[0, :40, 1] == 0).all()
        assert torch.isnan(y[0, 333:, 2]).all() and torch.isfinite(y[0, :333, 2]).all()
    else:
        assert torch.isnan(y[0, :, 2]).all()
    keep = [3, 4, 5, 6, 7]
    yo, lo, _ = _ref(q[..., keep], k[..., keep], v[..., keep], causal)
    assert (y[..., keep].double() - yo.detach()).abs().max() <= 1e-5
    assert (lse[..., keep].double() - lo).abs().max() <= 1e-5
