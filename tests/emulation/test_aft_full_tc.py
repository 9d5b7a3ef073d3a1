"""AFT-full's tensor-core forward (fwd_tc_kernel, csrc/aft_full/aft_full.cu) under the emulation harness, at shapes the
op tests do not reach: several CTAs of the 192-row x 96-column dense tiling (and of the low-rank bias's 128 x 128)
in both directions, T not a multiple of the row tile, B * dh not a multiple of the column tile, column blocks
spanning batch entries, heads, every input dtype, |k|, |w| = 1e4, a causal late spike, a NaN value, the operand
tiles double-buffered (cp.async) and loaded synchronously, and the counted cost per element (docs/design.md §2.3,
§5.3). The float64 oracle is tests/common/oracles.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))

from common import oracles  # noqa: E402

pytestmark = pytest.mark.emulation
F64 = torch.float64
# T = 400: three row tiles of 192 (the last one 16 rows); B dh = 2 x 100 = 200 columns per head with heads = 1:
# three column blocks of 96 (the last one 8 columns), blocks 1 and 2 spanning both batch entries.
# heads 2: dh = 60, 120 columns per head -> 2 column blocks. Both copy the operand tiles with cp.async (columns per
# head a multiple of 16 bytes of operands); 101 columns take the synchronous loads.
SHAPES = [(2, 400, 100, 1), (2, 230, 120, 2), (1, 400, 101, 1)]
IDS = ["heads1", "heads2", "odd_columns"]


def _inputs(B, T, D, heads, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, D, generator=g, dtype=F64) * scale for _ in range(3))
    w = torch.randn(heads, T, T, generator=g, dtype=F64) * scale
    return q, k, v, w


def _fwd(q, k, v, w, causal, dtype):
    import emu_ops

    wl = w[0] if w.shape[0] == 1 else w
    y, lse = emu_ops.aft_full_fwd(q.to(dtype), k.to(dtype), v.to(dtype), wl.to(dtype), causal)
    return y, lse.double(), emu_ops.last_result()


def _oracle(q, k, v, w, causal):
    """float64 y, lse (callers pass the inputs rounded to the kernel's dtype: what it sees)."""
    wo = w[0] if w.shape[0] == 1 else w
    y = oracles.aft(q, k, v, wo, causal)
    lse = oracles.aft_lse(k, oracles.bias_per_channel(wo, k.shape[2]), causal)
    return y, lse


def _rounded(dtype, *xs):
    return [x.to(dtype).to(F64) for x in xs]


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _main(res):
    """The tensor-core launch (the only one with MMAs)."""
    (ln,) = [ln for ln in res.launches if ln["counters"]["mma_ops"]]
    return ln


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_float32_several_tiles(emu, shape, causal):
    q, k, v, w = _inputs(*shape, 1)
    y, lse, res = _fwd(q, k, v, w, causal, torch.float32)
    B, T, D, heads = shape
    grid = _main(res)["grid"]
    assert tuple(grid)[:3] == (-(-B * D // heads // 96), -(-T // 192), heads), grid  # several CTAs both ways
    yr, lr = _oracle(*_rounded(torch.float32, q, k, v, w), causal)
    assert _rel(y, yr) < 2e-6
    assert (lse - lr).abs().max().item() < 1e-5


def _assert_2x_rule(q, k, v, w, causal, dtype, y, lse):
    """error(y) <= 2 x error(eager PyTorch in dtype) + 1e-3 against the float64 oracle; lse within 1e-2."""
    yr, lr = _oracle(q, k, v, w, causal)
    wl = w[0] if w.shape[0] == 1 else w
    ye = oracles.aft_eager(q.to(dtype), k.to(dtype), v.to(dtype), wl.to(dtype), causal)
    assert (y.double() - yr).abs().max() <= 2 * (ye.double() - yr).abs().max() + 1e-3
    assert (lse - lr).abs().max().item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_low_precision_2x_rule(emu, shape, causal, dtype):
    """error(kernel) <= 2 x error(eager PyTorch in dtype) + 1e-3, both against the float64 oracle."""
    q, k, v, w = _rounded(dtype, *_inputs(*shape, 2))
    y, lse, _ = _fwd(q, k, v, w, causal, dtype)
    assert y.dtype == dtype
    _assert_2x_rule(q, k, v, w, causal, dtype, y, lse)


def _adversarial_inputs(what, B, T, D, heads):
    """k1e4 / w1e4: |k| or |w| ~ 1e4; late_spike: a key 3000 above every earlier one, three steps before the end."""
    q, k, v, w = _inputs(B, T, D, heads, 3)
    if what == "k1e4":
        k = k * 2e4
    elif what == "w1e4":
        w = w * 2e4
    else:
        k[:, T - 3, :] += 3000.0
    return q, k, v, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("what", ["k1e4", "w1e4", "late_spike"])
def test_adversarial_finite_and_accurate(emu, what, causal, dtype):
    """|k| or |w| ~ 1e4 (row and column maxima far apart: the lost-tile guard recomputes those (t, c) exactly) and
    a late key larger than every earlier one by 3000 (causally, m comes from a key most rows do not see)."""
    B, T, D, heads = 2, 400, 100, 1
    q, k, v, w = _rounded(dtype, *_adversarial_inputs(what, B, T, D, heads))
    y, lse, _ = _fwd(q, k, v, w, causal, dtype)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    yr, lr = _oracle(q, k, v, w, causal)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), yr, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, lr, rtol=1e-6, atol=1e-3 if dtype == torch.float32 else 1e-2)


def test_nan_value_reaches_its_column_only(emu):
    """Causal: a NaN in v at key 300 (second row tile, third column block) makes y NaN in every row that sees it and
    nowhere outside its column or its own and later row tiles (within the key's row tile the MMA forms 0 * NaN for
    the rows before it: docs/design.md §7 claims "no other" only for the CPU paths)."""
    B, T, D, heads = 2, 400, 100, 1
    q, k, v, w = _inputs(B, T, D, heads, 4)
    v[1, 300, 7] = float("nan")
    y, lse, _ = _fwd(q, k, v, w, True, torch.bfloat16)
    assert torch.isnan(y[1, 300:, 7]).all()
    assert torch.isfinite(y[1, :192, 7]).all()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, :, 7] = False
    assert torch.isfinite(y[mask]).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_several_tiles(emu, causal, dtype):
    """Low-rank bias (128 x 128 tiles): T = 300 -> three row tiles, 2 x 70 columns -> two column blocks."""
    import emu_ops

    B, T, D, heads, rank = 2, 300, 70, 1, 16
    q, k, v, _ = _inputs(B, T, D, heads, 5)
    g = torch.Generator().manual_seed(6)
    u, vb = (torch.randn(T, rank, generator=g, dtype=F64) * 0.3 for _ in range(2))
    q, k, v, u, vb = _rounded(dtype, q, k, v, u, vb)
    y, lse = emu_ops.aft_full_lowrank_fwd(q.to(dtype), k.to(dtype), v.to(dtype), u.to(dtype), vb.to(dtype), causal)
    w = (u @ vb.T)[None]
    yr, lr = _oracle(q, k, v, w, causal)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert _rel(y, yr) < tol
    assert (lse.double() - lr).abs().max().item() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_counted_cost_per_element(emu):
    """bf16, T = 384, B D = 384 (whole tiles of both the 192 x 96 and the former 128 x 128 tiling). The main kernel
    reads per output element and key 2 B / 96 of w plus 2 x 2 B / 192 of [Ek v | Ek]: 16 B at T = 384 plus q and
    the references (128 x 128 tiles: 18 B); the Ek / Ekv prepass reads m once per strip of time steps (8.25 B per
    element, not 12). Special functions: T / 96 exps of w per element plus ~3 (exp of k, sigmoid, log)."""
    B, T, D = 1, 384, 384
    q, k, v, w = _inputs(B, T, D, 1, 7)
    _, _, res = _fwd(q, k, v, w, False, torch.bfloat16)
    n = B * T * D
    main = _main(res)["counters"]
    expkv = [ln["counters"] for ln in res.launches if "fwd_expkv_kernel" in ln["kernel"]]
    assert len(expkv) == 1, [ln["kernel"] for ln in res.launches]
    assert main["bytes_read"] / n < 16 + 2.5
    assert (expkv[0]["bytes_read"] + expkv[0]["bytes_written"]) / n < 9
    c = res.counters
    assert (c["bytes_read"] + c["bytes_written"]) / n < 40
    assert c["sfu_total"] / n < T / 96 + 3.5
