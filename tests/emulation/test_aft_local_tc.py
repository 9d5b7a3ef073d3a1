"""AFT-local's tensor-core forward (csrc/aft_local/aft_local_tc.cu) under the emulation harness, at shapes the op tests
do not reach: several 128-row query tiles (interior tiles with both a prefix and a suffix outside their key tiles),
column blocks spanning batch entries (dh < 128), windows from 1 to past T, both w layouts, the lost-sum guard under
|k|, |w| = 1e4 and a causal late spike, a NaN key hidden from earlier causal rows, and the counted cost per element
(docs/design.md §2.6, §5.3). The float64 oracle is tests/common/oracles.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))

from attnfree_ext.ops.aft_local.layout import full_to_band  # noqa: E402
from common import oracles  # noqa: E402

pytestmark = pytest.mark.emulation
F64 = torch.float64


def _inputs(B, T, D, heads, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, D, generator=g, dtype=F64) * scale for _ in range(3))
    w = torch.randn(heads, T, T, generator=g, dtype=F64) * scale
    return q, k, v, w


def _fwd(q, k, v, w, window, causal, dtype, banded=False):
    import emu_ops

    wl = full_to_band(w, window) if banded else w
    wl = wl[0] if w.shape[0] == 1 else wl
    y, lse = emu_ops.aft_local_fwd(q.to(dtype), k.to(dtype), v.to(dtype), wl.to(dtype), window, causal, banded)
    names = {ln["kernel"] for ln in emu_ops.last_result().launches}
    return y.double(), lse.double(), emu_ops.last_result(), names


def _oracle(q, k, v, w, window, causal):
    wo = w[0] if w.shape[0] == 1 else w
    y = oracles.aft_local(q, k, v, wo, window, causal)
    lse = oracles.aft_lse(k, oracles.bias_per_channel(oracles.local_bias(wo, window), k.shape[2]), causal)
    return y, lse


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_core_kernel_is_the_default(emu, dtype):
    q, k, v, w = _inputs(1, 20, 4, 1, 0)
    *_, names = _fwd(q, k, v, w, 3, False, dtype)
    assert any("local_fwd_tc_kernel" in n for n in names), names
    *_, names = _fwd(q, k, v, w, 3, False, F64)
    assert not any("local_fwd_tc_kernel" in n for n in names), names


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape",
    [(1, 300, 4, 1, 40, False), (3, 262, 6, 2, 1, True), (1, 390, 130, 1, 100, False), (2, 150, 4, 2, 500, True)],
    ids=["T300-s40", "dh3-s1-band", "cols130-s100", "s>T-band"],
)
def test_float32_matches_oracle(emu, shape, causal):
    B, T, D, H, window, banded = shape
    q, k, v, w = _inputs(B, T, D, H, 1)
    y, lse, _, names = _fwd(q, k, v, w, window, causal, torch.float32, banded)
    assert any("local_fwd_tc_kernel" in n for n in names)
    yo, lo = _oracle(q, k, v, w, window, causal)
    assert _rel(y, yo) < 2e-5
    assert (lse - lo).abs().max().item() < 2e-5 * lo.abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_adversarial_magnitudes_stay_finite_and_exact(emu, causal):
    B, T, D, H, window = 1, 260, 4, 1, 20
    q, k, v, w = _inputs(B, T, D, H, 2)
    g = torch.Generator().manual_seed(3)
    k = (torch.rand(B, T, D, generator=g, dtype=F64) * 2e4 - 1e4).float().double()
    w = (torch.rand(H, T, T, generator=g, dtype=F64) * 2e4 - 1e4).float().double()
    y, lse, _, _ = _fwd(q, k, v, w, window, causal, torch.float32)
    yo, lo = _oracle(q, k, v, w, window, causal)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    assert _rel(y, yo) < 1e-4  # the rounding of logits ~2e4 in float32: ~eps |logit| (docs/design.md §2.4)
    assert ((lse - lo).abs() / lo.abs().clamp_min(1.0)).max().item() < 1e-6


def test_causal_late_spike(emu):
    """A key 120 above every earlier one, late in a query tile: the rows before it lose their whole union sum to
    underflow against m (the tile's column max) and are recomputed per element."""
    B, T, D, H, window = 1, 300, 5, 1, 30
    q, k, v, w = _inputs(B, T, D, H, 4)
    k[:, 250, :] += 120.0
    y, lse, _, _ = _fwd(q, k, v, w, window, True, torch.float32)
    yo, lo = _oracle(q, k, v, w, window, True)
    assert torch.isfinite(y).all() and _rel(y, yo) < 2e-5
    assert ((lse - lo).abs() / lo.abs().clamp_min(1.0)).max().item() < 1e-6


def test_nan_key_reaches_only_the_rows_that_see_it(emu):
    """Causal: a NaN in v at key 200 sits in the key tiles of rows 128..199, which do not see it (§7 rule 2)."""
    B, T, D, H, window = 1, 300, 4, 1, 16
    q, k, v, w = _inputs(B, T, D, H, 5)
    v[0, 200, 1] = float("nan")
    y, lse, _, _ = _fwd(q, k, v, w, window, True, torch.bfloat16)
    assert torch.isnan(y[0, 200:, 1]).all()
    assert torch.isfinite(y[0, :200]).all() and torch.isfinite(y[0, :, [0, 2, 3]]).all()
    assert torch.isfinite(lse).all()


def test_counted_cost_per_element(emu):
    """bf16, window 64: about 2x the byte floor and under 10 special-function ops per output element (the per-element
    band kernels counted ~800 bytes and ~130 ops)."""
    B, T, D = 2, 256, 256
    q, k, v, w = _inputs(B, T, D, 1, 6, scale=0.5)
    _, _, res, _ = _fwd(q, k, v, w, 64, False, torch.bfloat16)
    n = B * T * D
    c = res.counters
    assert (c["bytes_read"] + c["bytes_written"]) / n < 30
    assert c["sfu_total"] / n < 10
