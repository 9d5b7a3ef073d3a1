"""AFT-full's three-GEMM tensor-core backward (csrc/aft_full/aft_full_bwd.cuh) under the emulation harness, at
shapes the op tests do not reach: several 128-key tiles (dk, dv) and 256-row x 128-key tiles (dw), T not a multiple
of any tile, column blocks spanning batch entries (dh < 128) and more than one column block, heads, fp32 / fp16 /
bf16, the exact elements (|k|, |w| ~ 1e4, a causal late spike, NaN), the factorised bias (its dk / dv through the
same kernel where the factor rows fit in shared memory), and the counted cost per element (docs/design.md §3, §5.3).
The backward runs from the float64 oracle's y and lse, so it is tested on its own."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))

from common import oracles  # noqa: E402

pytestmark = pytest.mark.emulation
F64 = torch.float64
NAMES = ("dq", "dk", "dv", "dw")


def _inputs(B, T, D, heads, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(B, T, D, generator=g, dtype=F64) for _ in range(4))
    w = torch.randn(heads, T, T, generator=g, dtype=F64) * scale
    return q, k * scale, v, w, dy


def _oracle(q, k, v, w, causal, dy):
    xs = [x.clone().requires_grad_() for x in (q, k, v, w)]
    y = oracles.aft(*xs, causal=causal)
    grads = torch.autograd.grad(y, xs, dy)
    lse = oracles.aft_lse(k, oracles.bias_per_channel(w, q.shape[2]), causal)
    return y.detach(), lse, grads


def _bwd(dy, q, k, v, w, y, lse, causal, dtype):
    import emu_ops

    args = [x.to(dtype) for x in (dy, q, k, v, w, y)]
    grads = emu_ops.aft_full_bwd(*args[:5], args[5], lse.float(), causal)
    res = emu_ops.last_result()
    return [g.double() for g in grads], res, {ln["kernel"] for ln in res.launches}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item()


def _assert_nan_pattern(names, got, exp):
    """NaN exactly where the float64 oracle has it, float32 accuracy elsewhere."""
    assert any(torch.isnan(e).any() for e in exp)
    for name, g, e in zip(names, got, exp):
        assert torch.equal(torch.isnan(g), torch.isnan(e)), name
        ok = ~torch.isnan(e)
        if ok.any():
            assert _rel(g[ok], e[ok]) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_core_backward_is_the_default(emu, dtype):
    q, k, v, w, dy = _inputs(1, 20, 4, 1, 0)
    y, lse, _ = _oracle(q, k, v, w, False, dy)
    *_, names = _bwd(dy, q, k, v, w, y, lse, False, dtype)
    assert any("bwd_kv_kernel" in n for n in names) and any("bwd_w_kernel" in n for n in names), names
    *_, names = _bwd(dy, q, k, v, w, y, lse, False, F64)
    assert not any("bwd_kv_kernel" in n or "bwd_w_kernel" in n for n in names), names


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 300, 4, 1), (3, 262, 6, 2), (1, 150, 130, 1)], ids=["T300", "dh3-heads2", "cols130"]
)
def test_float32_matches_oracle(emu, shape, causal):
    B, T, D, H = shape
    q, k, v, w, dy = _inputs(B, T, D, H, 1)
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    got, _, _ = _bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
    for name, g, e in zip(NAMES, got, exp):
        assert _rel(g, e) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_2x_rule(emu, dtype, causal):
    """Against eager PyTorch in the same dtype (its error doubled, plus 1e-3 of the gradient's size)."""
    B, T, D, H = 2, 300, 8, 2
    q, k, v, w, dy = _inputs(B, T, D, H, 2, scale=0.5)
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, w)]
    low = torch.autograd.grad(oracles.aft_eager(*leaves, causal), leaves, dy.to(dtype))
    got, _, _ = _bwd(dy, q, k, v, w, y, lse, causal, dtype)
    for name, g, gl, e in zip(NAMES, got, low, exp):
        assert torch.isfinite(g).all(), name
        bound = 2 * (gl.double() - e).abs().max().item() + 1e-3 * max(1.0, e.abs().max().item())
        assert (g - e).abs().max().item() <= bound, name


def _magnitude_inputs(B, T, D, H):
    """q, v, dy as usual; k, w uniform in [-1e4, 1e4] (float32 values): their maxima fall far apart."""
    q, _, v, _, dy = _inputs(B, T, D, H, 3)
    g = torch.Generator().manual_seed(4)
    k = (torch.rand(B, T, D, generator=g, dtype=F64) * 2e4 - 1e4).float().double()
    w = (torch.rand(H, T, T, generator=g, dtype=F64) * 2e4 - 1e4).float().double()
    return q, k, v, w, dy


@pytest.mark.parametrize("causal", [False, True])
def test_adversarial_magnitudes_exact_elements(emu, causal):
    """|k|, |w| up to 1e4 with misaligned maxima: Sc = exp(r + m - lse) is huge for most elements, which are then
    summed exactly; the result is exact to the rounding of logits ~1e4 in float32."""
    B, T, D, H = 1, 260, 4, 1
    q, k, v, w, dy = _magnitude_inputs(B, T, D, H)
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    got, _, _ = _bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
    for name, gg, e in zip(NAMES, got, exp):
        assert torch.isfinite(gg).all(), name
        assert _rel(gg, e) < 5e-3, name  # float32 lse ~1e4 carries ~5e-4 absolute into every P


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_late_spike(emu, dtype):
    """A key 120 above every earlier one: m (its column's max) exceeds what the rows before it see by ~120, so their
    elements have Sc ~ e^120 and are summed exactly; the rows after it take the tensor cores."""
    B, T, D, H = 1, 300, 5, 1
    q, k, v, w, dy = _inputs(B, T, D, H, 5)
    k[:, 250, :] += 120.0
    q, k, v, w, dy = (x.to(dtype).double() for x in (q, k, v, w, dy))  # the oracle sees the kernel's inputs
    y, lse, exp = _oracle(q, k, v, w, True, dy)
    got, _, _ = _bwd(dy, q, k, v, w, y, lse, True, dtype)
    for name, g, e in zip(NAMES, got, exp):
        assert torch.isfinite(g).all(), name
        assert _rel(g, e) < (2e-5 if dtype == torch.float32 else 3e-2), name


@pytest.mark.parametrize("causal", [False, True])
def test_nan_reaches_the_gradients_the_oracle_says(emu, causal):
    """A NaN in v at key 200 of one channel: NaN in the gradients exactly where the float64 oracle has it."""
    B, T, D, H = 1, 300, 4, 1
    q, k, v, w, dy = _inputs(B, T, D, H, 6)
    v[0, 200, 1] = float("nan")
    y, lse, exp = _oracle(q, k, v, w, causal, dy)
    got, _, _ = _bwd(dy, q, k, v, w, y, lse, causal, torch.float32)
    _assert_nan_pattern(NAMES, got, exp)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("rank", [37, 160, 300])
def test_lowrank_float32_matches_oracle(emu, rank, causal):
    """w = u vb^T: rank 37 keeps the factor rows in shared memory (bwd_kv_kernel, bwd_uv_kernel); rank 160 fits
    bwd_kv_kernel's but not bwd_uv_kernel's (both tiles' rows) and rank 300 neither: both take the per-tile-pair
    kernels throughout; dq, dk, dv, du, dvb against the float64 oracle."""
    import emu_ops

    B, T, D, H = 1, 300, 4, 2
    q, k, v, _, dy = _inputs(B, T, D, H, 7)
    g = torch.Generator().manual_seed(8)
    u, vb = (torch.randn(H, T, rank, generator=g, dtype=F64) * (2 / rank) ** 0.5 for _ in range(2))
    xs = [x.clone().requires_grad_() for x in (q, k, v, u, vb)]
    y = oracles.aft(*xs[:3], xs[3] @ xs[4].transpose(-1, -2), causal=causal)
    exp = torch.autograd.grad(y, xs, dy)
    lse = oracles.aft_lse(k, oracles.bias_per_channel(u @ vb.transpose(-1, -2), D), causal)
    f = [x.float() for x in (dy, q, k, v, u, vb, y.detach())]
    got = emu_ops.aft_full_lowrank_bwd(*f, lse.float(), causal)
    names = {ln["kernel"] for ln in emu_ops.last_result().launches}
    assert any("bwd_kv_kernel" in n for n in names) == (rank == 37), names
    assert any("bwd_uv_kernel" in n for n in names) == (rank == 37), names
    assert any("bwd_w_tc_kernel" in n for n in names) == (rank != 37), names
    for name, gg, e in zip(("dq", "dk", "dv", "du", "dvb"), got, exp):
        assert _rel(gg.double(), e) < 2e-5, name


LR_NAMES = ("dq", "dk", "dv", "du", "dvb")


def _lowrank_inputs(B, T, D, heads, rank, seed, scale=1.0):
    q, k, v, _, dy = _inputs(B, T, D, heads, seed)
    g = torch.Generator().manual_seed(seed + 100)
    u, vb = (torch.randn(heads, T, rank, generator=g, dtype=F64) * (scale * (2 / rank) ** 0.5) for _ in range(2))
    return q, k, v, u, vb, dy


def _lowrank_oracle(q, k, v, u, vb, causal, dy):
    xs = [x.clone().requires_grad_() for x in (q, k, v, u, vb)]
    y = oracles.aft(*xs[:3], xs[3] @ xs[4].transpose(-1, -2), causal=causal)
    grads = torch.autograd.grad(y, xs, dy)
    lse = oracles.aft_lse(k, oracles.bias_per_channel(u @ vb.transpose(-1, -2), q.shape[2]), causal)
    return y.detach(), lse, grads


def _lowrank_bwd(dy, q, k, v, u, vb, y, lse, causal, dtype):
    """The low-rank backward under the harness; asserts that du, dvb took bwd_uv_kernel (factor rows resident)."""
    import emu_ops

    args = [x.to(dtype) for x in (dy, q, k, v, u, vb, y)]
    grads = emu_ops.aft_full_lowrank_bwd(*args, lse.float(), causal)
    names = {ln["kernel"] for ln in emu_ops.last_result().launches}
    assert any("bwd_uv_kernel" in n for n in names) and not any("bwd_w_tc_kernel" in n for n in names), names
    return [g.double() for g in grads]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "shape", [(1, 300, 4, 2, 37), (2, 262, 6, 2, 16), (1, 150, 130, 1, 64)], ids=["T300-heads2", "dh3", "cols130"]
)
def test_lowrank_uv_float32_matches_oracle(emu, shape, causal):
    """du, dvb through bwd_uv_kernel: several 128-row / 128-key tiles, T not a multiple of them, column blocks
    spanning batch entries and more than one column step, heads."""
    B, T, D, H, R = shape
    q, k, v, u, vb, dy = _lowrank_inputs(B, T, D, H, R, 11)
    y, lse, exp = _lowrank_oracle(q, k, v, u, vb, causal, dy)
    got = _lowrank_bwd(dy, q, k, v, u, vb, y, lse, causal, torch.float32)
    for name, g, e in zip(LR_NAMES, got, exp):
        assert _rel(g, e) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_uv_low_precision_2x_rule(emu, dtype, causal):
    """Against eager PyTorch in the same dtype (w = u vb^T formed there; its error doubled, plus 1e-3 of the
    gradient's size)."""
    B, T, D, H, R = 2, 300, 8, 2, 24
    q, k, v, u, vb, dy = _lowrank_inputs(B, T, D, H, R, 12)
    k = k * 0.5
    y, lse, exp = _lowrank_oracle(q, k, v, u, vb, causal, dy)
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, u, vb)]
    yl = oracles.aft_eager(*leaves[:3], leaves[3] @ leaves[4].transpose(-1, -2), causal)
    low = torch.autograd.grad(yl, leaves, dy.to(dtype))
    got = _lowrank_bwd(dy, q, k, v, u, vb, y, lse, causal, dtype)
    for name, g, gl, e in zip(LR_NAMES, got, low, exp):
        assert torch.isfinite(g).all(), name
        bound = 2 * (gl.double() - e).abs().max().item() + 1e-3 * max(1.0, e.abs().max().item())
        assert (g - e).abs().max().item() <= bound, name


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_uv_adversarial_magnitudes(emu, causal):
    """|k| up to 1e4 and w = u vb^T of magnitude ~1e4 with misaligned maxima: most elements are summed exactly
    (the flagged rows of bwd_uv_kernel); exact to the rounding of logits ~1e4 in float32."""
    B, T, D, H, R = 1, 260, 4, 1, 16
    q, _, v, _, _, dy = _lowrank_inputs(B, T, D, H, R, 13)
    g = torch.Generator().manual_seed(14)
    k = (torch.rand(B, T, D, generator=g, dtype=F64) * 2e4 - 1e4).float().double()
    u, vb = ((torch.rand(H, T, R, generator=g, dtype=F64) * 2 - 1) * (3e4 / R) ** 0.5 for _ in range(2))
    u, vb = u.float().double(), vb.float().double()
    assert (u @ vb.transpose(-1, -2)).abs().max() > 3e3
    y, lse, exp = _lowrank_oracle(q, k, v, u, vb, causal, dy)
    got = _lowrank_bwd(dy, q, k, v, u, vb, y, lse, causal, torch.float32)
    for name, gg, e in zip(LR_NAMES, got, exp):
        assert torch.isfinite(gg).all(), name
        assert _rel(gg, e) < 5e-3, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowrank_uv_causal_late_spike(emu, dtype):
    """A key 120 above every earlier one (see test_causal_late_spike), with the factorised bias."""
    B, T, D, H, R = 1, 300, 5, 1, 20
    q, k, v, u, vb, dy = _lowrank_inputs(B, T, D, H, R, 15)
    k[:, 250, :] += 120.0
    q, k, v, u, vb, dy = (x.to(dtype).double() for x in (q, k, v, u, vb, dy))
    y, lse, exp = _lowrank_oracle(q, k, v, u, vb, True, dy)
    got = _lowrank_bwd(dy, q, k, v, u, vb, y, lse, True, dtype)
    for name, g, e in zip(LR_NAMES, got, exp):
        assert torch.isfinite(g).all(), name
        assert _rel(g, e) < (2e-5 if dtype == torch.float32 else 3e-2), name


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_uv_nan_reaches_the_gradients_the_oracle_says(emu, causal):
    """A NaN in v at key 200 of one channel: NaN in dq, dk, dv, du, dvb exactly where the float64 oracle has it."""
    B, T, D, H, R = 1, 300, 4, 1, 12
    q, k, v, u, vb, dy = _lowrank_inputs(B, T, D, H, R, 16)
    v[0, 200, 1] = float("nan")
    y, lse, exp = _lowrank_oracle(q, k, v, u, vb, causal, dy)
    got = _lowrank_bwd(dy, q, k, v, u, vb, y, lse, causal, torch.float32)
    _assert_nan_pattern(LR_NAMES, got, exp)


@pytest.mark.parametrize("causal", [False, True])
def test_counted_cost_per_element(emu, causal):
    """bf16 at the paper shape (benchmarks/cost_model.py): the per-tile-pair kernels counted ~2256 bytes, 513
    special-function ops per output element and predicted_fraction 0.08; the three-GEMM backward ~670 bytes, 52
    ops, 0.27 (causal ~380 bytes, 28 ops, 0.23)."""
    from benchmarks import cost_model as cm

    paper = cm.PAPER["aft"]
    r = cm.model_case("aft_full", "bwd", "bf16", causal, cm.small_sizes("aft_full", "bwd"), paper)
    n = paper["B"] * paper["T"] * paper["D"]
    assert r["bytes_counted"] / n < (750 if not causal else 450)
    assert r["special_ops"] / n < (60 if not causal else 34)
    assert r["predicted_fraction"] > (0.25 if not causal else 0.21)


@pytest.mark.parametrize("causal", [False, True])
def test_lowrank_counted_cost_per_element(emu, causal):
    """bf16, rank 128 at the paper shape: du, dvb through bwd_uv_kernel counted ~839 bytes, 37 special-function
    ops per output element and predicted_fraction 0.21 (causal ~455, 20.5, 0.20); the per-tile-pair du / dvb passes
    it replaces ~2659 bytes, 548 ops, 0.067."""
    from benchmarks import cost_model as cm

    paper = cm.PAPER["aft"]
    r = cm.model_case("aft_full_lowrank", "bwd", "bf16", causal, cm.SMALL["aft_full_lowrank"], paper)
    n = paper["B"] * paper["T"] * paper["D"]
    assert r["bytes_counted"] / n < (900 if not causal else 500)
    assert r["special_ops"] / n < (40 if not causal else 23)
    assert r["predicted_fraction"] > (0.2 if not causal else 0.18)
