"""AFT-local's tensor-core backward (csrc/aft_local/aft_local_tc_bwd.cu) under the emulation harness: dq, dk, dv, dw
against the float64 oracle's autograd (tests/common/oracles.py) at shapes with several 128-key tiles and 64-row query
chunks, T not a multiple of either, column blocks spanning batch entries (dh < 32), heads 1 and 2, both w layouts,
windows 1 to 64 and past T, the per-element fallback under |k|, |w| = 1e4 and a causal late spike, NaN propagation,
and the counted cost per element (docs/design.md §2.6, §5.3)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__))))

from attnfree_ext.ops.aft_local.layout import band_to_full, full_to_band  # noqa: E402
from common import oracles  # noqa: E402

pytestmark = pytest.mark.emulation
F64 = torch.float64


def _inputs(B, T, D, heads, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dy = (torch.randn(B, T, D, generator=g, dtype=F64) * scale for _ in range(4))
    w = torch.randn(heads, T, T, generator=g, dtype=F64) * scale
    return q, k, v, w, dy


def _bwd(q, k, v, w, dy, window, causal, dtype, banded=False):
    """(y, dq, dk, dv, dw as (heads, T, T), launched kernel names) through the emulated forward and backward."""
    import emu_ops

    wl = full_to_band(w, window) if banded else w
    wl = wl[0] if w.shape[0] == 1 else wl
    args = [x.to(dtype) for x in (q, k, v)]
    y, lse = emu_ops.aft_local_fwd(*args, wl.to(dtype), window, causal, banded)
    dq, dk, dv, dw = emu_ops.aft_local_bwd(dy.to(dtype), *args, wl.to(dtype), y, lse, window, causal, banded)
    names = {ln["kernel"] for ln in emu_ops.last_result().launches}
    dw = dw.double().reshape(w.shape[0], w.shape[1], -1)
    if banded:
        dw = band_to_full(dw, window)
    return (y.double(), dq.double(), dk.double(), dv.double(), dw), emu_ops.last_result(), names


def _oracle(q, k, v, w, dy, window, causal):
    qd, kd, vd, wd = (x.detach().double().requires_grad_() for x in (q, k, v, w))
    wo = wd[0] if w.shape[0] == 1 else wd
    y = oracles.aft_local(qd, kd, vd, wo, window, causal)
    return (y.detach(), *torch.autograd.grad(y, (qd, kd, vd, wd), dy))


def _errors(ours, ref, v, dy, heads):
    """Max-abs errors over a scale (as tests/ops/test_aft_local.py): dk also over max|v| max|dv| (the terms that
    cancel), dw also over B dh max|dy| max|v| (the size of the summed terms)."""
    y, dq, dk, dv, dw = ours
    yo, oq, ok, ov, ow = ref
    B, T, D = v.shape
    vmax = v.abs().max().item()

    def rel(a, b, s=None):
        s = b.abs().max().item() if s is None else s
        return (a - b).abs().max().item() / max(s, 1e-300)

    return {
        "dq": rel(dq, oq),
        "dv": rel(dv, ov),
        "dk": rel(dk, ok, max(ok.abs().max().item(), vmax * ov.abs().max().item())),
        "dw": rel(dw, ow, max(ow.abs().max().item(), B * (D // heads) * dy.abs().max().item() * vmax)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_core_backward_is_the_default(emu, dtype):
    q, k, v, w, dy = _inputs(1, 20, 4, 1, 0)
    *_, names = _bwd(q, k, v, w, dy, 3, False, dtype)
    assert any("local_bwd_tc_kernel" in n for n in names), names
    assert not any("local_band_bwd" in n for n in names), names
    *_, names = _bwd(q, k, v, w, dy, 3, False, F64)
    assert not any("local_bwd_tc_kernel" in n for n in names), names
    q, k, v, w, dy = _inputs(1, 100, 4, 1, 0)
    *_, names = _bwd(q, k, v, w, dy, 65, False, dtype)  # W > 64: the per-element kernels
    assert not any("local_bwd_tc_kernel" in n for n in names), names


CASES = [  # (B, T, D, heads, window, banded)
    (1, 300, 4, 1, 40, False),  # several key tiles and query chunks, T not a multiple of either
    (3, 262, 6, 2, 1, True),  # dh = 3: a column block spans batch entries; window 1; banded
    (2, 200, 40, 1, 64, False),  # 80 columns: several column blocks, the widest window
    (2, 50, 4, 2, 500, True),  # window past T
    (1, 150, 5, 1, 7, False),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=["T300-s40", "dh3-s1-band", "cols80-s64", "s>T-band", "D5-s7"])
def test_float32_matches_oracle(emu, case, causal):
    B, T, D, H, window, banded = case
    q, k, v, w, dy = _inputs(B, T, D, H, 1)
    ours, _, names = _bwd(q, k, v, w, dy, window, causal, torch.float32, banded)
    assert any("local_bwd_tc_kernel" in n for n in names)
    err = _errors(ours, _oracle(q, k, v, w, dy, window, causal), v, dy, H)
    assert max(err.values()) < 2e-5, err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_2x_of_eager(emu, dtype, causal):
    """dk, dv, dw (the tensor-core kernel's outputs): error at most 2x that of plain PyTorch autograd in the same
    dtype. (dq = dy y (1 - sigmoid(q)) comes from the saved y, the same formula as the per-element path.)"""
    B, T, D, H, window = 2, 200, 8, 2, 30
    q, k, v, w, dy = _inputs(B, T, D, H, 2, scale=0.5)
    r = lambda x: x.to(dtype).double()  # noqa: E731
    q, k, v, w, dy = map(r, (q, k, v, w, dy))
    ours, _, _ = _bwd(q, k, v, w, dy, window, causal, dtype)
    ref = _oracle(q, k, v, w, dy, window, causal)
    xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, w)]
    ye = oracles.aft_local(*xs, window, causal)
    eager = (ye.detach().double(), *(g.double() for g in torch.autograd.grad(ye, xs, dy.to(dtype))))
    ours_e, eager_e = _errors(ours, ref, v, dy, H), _errors(eager, ref, v, dy, H)
    for name in ("dk", "dv", "dw"):
        assert ours_e[name] <= 2 * eager_e[name] + 1e-6, (name, ours_e, eager_e)


@pytest.mark.parametrize("causal", [False, True])
def test_adversarial_magnitudes_fall_back_exactly(emu, causal):
    B, T, D, H, window = 1, 260, 4, 1, 20
    q, k, v, w, dy = _inputs(B, T, D, H, 3)
    g = torch.Generator().manual_seed(4)
    k = (torch.rand(B, T, D, generator=g, dtype=F64) * 2e4 - 1e4).float().double()
    w = (torch.rand(H, T, T, generator=g, dtype=F64) * 2e4 - 1e4).float().double()
    ours, _, _ = _bwd(q, k, v, w, dy, window, causal, torch.float32)
    assert all(torch.isfinite(x).all() for x in ours)
    err = _errors(ours, _oracle(q, k, v, w, dy, window, causal), v, dy, H)
    assert max(err.values()) < 1e-3, err  # logits ~2e4 rounded in float32: ~eps |logit| (docs/design.md §2.4)


def test_causal_late_spike(emu):
    B, T, D, H, window = 1, 300, 5, 1, 30
    q, k, v, w, dy = _inputs(B, T, D, H, 5)
    k[:, 250, :] += 120.0
    ours, _, _ = _bwd(q, k, v, w, dy, window, True, torch.float32)
    err = _errors(ours, _oracle(q, k, v, w, dy, window, True), v, dy, H)
    assert max(err.values()) < 2e-5, err


@pytest.mark.parametrize("what", ["v", "q", "k"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_reaches_what_the_band_kernels_give(emu, causal, what):
    """A NaN in one input element: dq, dk, dv, dw are NaN exactly where the float64 per-element band kernels put
    NaN (docs/design.md §7: it reaches what sees it; causally not the earlier rows)."""
    B, T, D, H, window = 1, 300, 4, 1, 16
    x = list(_inputs(B, T, D, H, 6))
    x["qkv".index(what)][0, 200, 1] = float("nan")
    q, k, v, w, dy = x
    ours, _, names = _bwd(q, k, v, w, dy, window, causal, torch.bfloat16)
    assert any("local_bwd_tc_kernel" in n for n in names)
    ref, _, _ = _bwd(q, k, v, w, dy, window, causal, F64)
    for name, a, b in zip(("y", "dq", "dk", "dv", "dw"), ours, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
    assert torch.isnan(ours[2]).any() and not torch.isnan(ours[2]).all()


def test_counted_cost_per_element(emu):
    """bf16, window 64: under 2.5x the byte floor (~20 B/el) and under 20 special-function ops per element (the
    per-element band kernels counted ~3900 bytes and ~260 ops)."""
    B, T, D = 2, 256, 128
    q, k, v, w, dy = _inputs(B, T, D, 1, 7, scale=0.5)
    _, res, names = _bwd(q, k, v, w, dy, 64, False, torch.bfloat16)
    assert any("local_bwd_tc_kernel" in n for n in names)
    n = B * T * D
    c = res.counters
    assert (c["bytes_read"] + c["bytes_written"]) / n < 60
    assert c["sfu_total"] / n < 20


def test_lse_spread_in_a_chunk_falls_back_exactly(emu):
    """Causal, T = 234: key 170 is seen by rows 170..233 only, all in its band. Row 175 puts bias 103 on key 120
    (the previous key tile), so its lse is ~100 above the min lse of its 64-row chunk and its u = dy exp(rho - lse)
    would be subnormal; its bias 38 on key 170 stays under the gap guard of key 170's tile, and every other row has
    bias -200 there, so dv[170] = P[175, 170] G[175] ~ e^-65 G alone. The prep marks row 175 and the per-element
    kernels give dv[170] to float32 rounding (from the subnormal u it would carry ~4 significant bits)."""
    B, T, D, H, window = 1, 234, 4, 1, 64
    q, k, v, w, dy = _inputs(B, T, D, H, 8)
    w[:, 170:234, 170] = -200.0
    w[:, 175, 170], w[:, 175, 120] = 38.0, 103.0
    ours, _, _ = _bwd(q, k, v, w, dy, window, True, torch.float32)
    ref = _oracle(q, k, v, w, dy, window, True)
    err = _errors(ours, ref, v, dy, H)
    assert max(err.values()) < 2e-5, err
    dv, dv_ref = ours[3][0, 170], ref[3][0, 170]
    assert (dv_ref.abs() > 1e-35).all() and (dv_ref.abs() < 1e-20).all(), dv_ref  # a normal, tiny value
    rel = ((dv - dv_ref).abs() / dv_ref.abs()).max().item()
    assert rel < 1e-4, (rel, dv, dv_ref)


@pytest.mark.parametrize("causal", [False, True])
def test_counted_query_traffic(emu, causal):
    """bf16, window 64, B*D = 512 columns, 4 key tiles: bytes per output element of the whole backward and of the
    main tile kernel. The CTAs read u (3 bytes) with q and y per visit of a query row instead of dy, q, y and the
    fp32 lse (10 bytes): counted 37.0 B/el in all (causal 33.6), 21.5 in the tile kernel (causal 18.3), where the
    kernel that read dy, q, y, lse counted 40.1 (35.5) and 27.1 (22.5)."""
    B, T, D = 2, 512, 256
    q, k, v, w, dy = _inputs(B, T, D, 1, 7, scale=0.5)
    _, res, _ = _bwd(q, k, v, w, dy, 64, causal, torch.bfloat16)
    n = B * T * D
    c = res.counters
    main = [ln["counters"] for ln in res.launches if "local_bwd_tc_kernel" in ln["kernel"]]
    assert len(main) == 1
    total, tile = (c["bytes_read"] + c["bytes_written"]) / n, (main[0]["bytes_read"] + main[0]["bytes_written"]) / n
    assert total < (34.5 if causal else 38.5), total
    assert tile < (20.0 if causal else 23.5), tile
