"""The project's CUDA kernel files (csrc/cuda/*.cu), compiled UNCHANGED by the emulation harness and run on the CPU
through their launchers (C ABI shims in tests/emulation/shims), against a float64 formula:

    y[b, t, c] = sigmoid(q[b, t, c]) * sum_t' softmax_t'(k[b, t', c] + w[h(c), t, t']) v[b, t', c]
    lse[b, t, c] = logsumexp_t' (k[b, t', c] + w[h(c), t, t'])         (causal: t' <= t)

These kernels still take raw pointers (no gptr yet), so accesses are not bounds-checked; the runner's guard zones
and input comparison still catch stray writes. Error rule for fp16/bf16 (as tests/test_cuda_aft_full.py): max-abs
error vs float64 <= 2x the error of plain PyTorch in the same dtype + a small floor.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.emulation

# attnfree_cuda::DType (csrc/cuda/launchers.h) and attnfree::cuda::AftDType (csrc/cuda/aft_full.h)
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
AFT_DTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
ACC = {torch.float32: torch.float32, torch.float16: torch.float32, torch.bfloat16: torch.float32,
       torch.float64: torch.float64}


def _build(emu, op):
    return emu.build(op, [f"csrc/cuda/{op}.cu", f"tests/emulation/shims/{op}_shim.cpp"], include_dirs=["csrc/cuda"])


@pytest.fixture(scope="module")
def aft_simple_lib(emu):
    return _build(emu, "aft_simple")


@pytest.fixture(scope="module")
def aft_full_lib(emu):
    return _build(emu, "aft_full")


def formula(q, k, v, w, causal, heads):
    """float64: y and lse of AFT-full; w (heads, T, T)."""
    q, k, v, w = (x.double() for x in (q, k, v, w))
    B, T, D = q.shape
    wc = w.repeat_interleave(D // heads, dim=0).permute(1, 2, 0)  # (T, T', D)
    logits = wc[None] + k[:, None, :, :]  # (B, T, T', D)
    if causal:
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1)[None, :, :, None], float("-inf"))
    lse = torch.logsumexp(logits, dim=2)
    y = torch.sigmoid(q) * (torch.softmax(logits, dim=2) * v[:, None]).sum(2)
    return y, lse


def eager_low(q, k, v, w, causal, heads):
    """The same formula in the inputs' own dtype (the baseline of the 2x rule)."""
    B, T, D = q.shape
    wc = w.repeat_interleave(D // heads, dim=0).permute(1, 2, 0)
    logits = wc[None] + k[:, None, :, :]
    if causal:
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1)[None, :, :, None], float("-inf"))
    return torch.sigmoid(q) * (torch.softmax(logits, dim=2) * v[:, None]).sum(2)


def check(got, ref, low=None, dtype=torch.float32, floor=1e-3):
    got = got.double()
    if dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    elif dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=5e-5, atol=5e-5)
    else:
        err = (got - ref).abs().max().item()
        base = (low.double() - ref).abs().max().item()
        assert err <= 2 * base + floor, (err, base)


def _inputs(B, T, D, heads, dtype, full=True):
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(heads, T, T, generator=g, dtype=torch.float64) * 0.5 if full else torch.zeros(1, T, T)
    return tuple(x.to(dtype) for x in (q, k, v, w))


# ----------------------------------------------------------------------------------------------- AFT-simple
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_aft_simple_fwd(emu, aft_simple_lib, dtype, causal):
    B, T, D = 2, 37, 12
    q, k, v, _ = _inputs(B, T, D, 1, dtype, full=False)
    w0 = torch.zeros(1, T, T, dtype=dtype)
    lib = aft_simple_lib
    ws = lib.raw("emu_aft_simple_fwd_ws", DTYPE[dtype], B, T, D, int(causal))
    r = lib.call("emu_aft_simple_fwd", DTYPE[dtype], emu.In("q", q), emu.In("k", k), emu.In("v", v),
                 emu.Out("y", torch.empty(B, T, D, dtype=dtype)), emu.Out("lse", torch.empty(B, T, D, dtype=ACC[dtype])),
                 B, T, D, int(causal), emu.Scratch("workspace", ws)).check()
    y_ref, lse_ref = formula(q, k, v, w0, causal, 1)
    check(r.outputs["y"], y_ref, eager_low(q, k, v, w0, causal, 1), dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(r.outputs["lse"].double(), lse_ref, **tol)
    assert [l["kernel"].split("<")[0] for l in r.launches] == ["chunk_state_kernel", "chunk_scan_kernel",
                                                                "chunk_apply_kernel"]
    c = r.counters
    assert c["launches"] == 3 and c["bytes_read"] == 0  # raw pointers: global traffic is not counted yet
    assert c["sfu_exp"] > 0 and c["sfu_log"] >= B * T * D


# ----------------------------------------------------------------------------------------------- AFT-full
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_aft_full_fwd_tensor_cores(emu, aft_full_lib, dtype, causal):
    B, T, D, heads = 2, 70, 12, 2  # 2 key tiles (the second partial), 2 heads, B*dh = 12 columns
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    r = aft_full_lib.call("emu_aft_full_fwd", AFT_DTYPE[dtype], AFT_DTYPE[dtype], emu.In("q", q), emu.In("k", k),
                          emu.In("v", v), emu.In("w", w), emu.Out("y", torch.empty(B, T, D, dtype=dtype)),
                          emu.Out("lse", torch.empty(B, T, D)), B, T, D, heads, int(causal), 0).check()
    y_ref, lse_ref = formula(q, k, v, w, causal, heads)
    check(r.outputs["y"], y_ref, eager_low(q, k, v, w, causal, heads), dtype)
    lse_tol = dict(rtol=5e-5, atol=5e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(r.outputs["lse"].double(), lse_ref, **lse_tol)
    (launch,) = r.launches
    assert launch["kernel"] == "kern" and launch["block"] == (256, 1, 1) and launch["grid"] == (1, 2, heads)
    ntiles = 2 * 2 * heads if not causal else (1 + 2) * heads  # (query tiles x key tiles) per head
    per_tile = 8 * 2 * 2 * (64 // 16) if dtype == torch.bfloat16 else 8 * 2 * 2 * 3 * (64 // 8)
    assert r.counters["mma_ops"] == ntiles * per_tile
    assert r.counters["mma_flops"] == 2 * 64 * 64 * 64 * 2 * ntiles * (3 if dtype == torch.float32 else 1)
    assert r.counters["barriers"] > 0 and r.counters["warp_collectives"] > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_aft_full_fwd_exact(emu, aft_full_lib, dtype):
    B, T, D, heads = 2, 21, 8, 2
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    r = aft_full_lib.call("emu_aft_full_fwd", AFT_DTYPE[dtype], AFT_DTYPE[dtype], emu.In("q", q), emu.In("k", k),
                          emu.In("v", v), emu.In("w", w), emu.Out("y", torch.empty(B, T, D, dtype=dtype)),
                          emu.Out("lse", torch.empty(B, T, D, dtype=ACC[dtype])), B, T, D, heads, 1, 1).check()
    y_ref, lse_ref = formula(q, k, v, w, True, heads)
    check(r.outputs["y"], y_ref, dtype=dtype)
    assert [l["kernel"] for l in r.launches] == ["fwd_exact_kernel<E, WE>"]


# ----------------------------------------------------------------------------------------------- more of the files
def _grads(q, k, v, w, dy, causal, heads):
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, w)]
    y, _ = formula(*leaves, causal, heads)
    return torch.autograd.grad(y, leaves, dy.double())


@pytest.mark.parametrize("dtype,exact", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float64, 1)])
def test_aft_full_bwd(emu, aft_full_lib, dtype, exact):
    B, T, D, heads, causal = 2, 70, 12, 2, True
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=torch.float64).to(dtype)
    y, lse = formula(q, k, v, w, causal, heads)
    r = aft_full_lib.call("emu_aft_full_bwd", AFT_DTYPE[dtype], AFT_DTYPE[dtype], emu.In("dy", dy), emu.In("q", q),
                          emu.In("k", k), emu.In("v", v), emu.In("w", w), emu.In("y", y.to(dtype)),
                          emu.In("lse", lse.to(ACC[dtype])), emu.Out("dq", torch.empty(B, T, D, dtype=dtype)),
                          emu.Out("dk", torch.empty(B, T, D, dtype=dtype)), emu.Out("dv", torch.empty(B, T, D, dtype=dtype)),
                          emu.Out("dw", torch.empty(heads, T, T, dtype=dtype)), B, T, D, heads, int(causal), exact).check()
    refs = _grads(q, k, v, w, dy, causal, heads)
    for name, ref in zip(("dq", "dk", "dv", "dw"), refs):
        got = r.outputs[name].double()
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=name)
        elif dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=name)
        else:  # bf16 operands in the tensor-core products: a loose absolute bound relative to the gradient scale
            assert (got - ref).abs().max() <= 3e-2 * ref.abs().max() + 1e-2, name
    if not exact:
        assert {l["kernel"] for l in r.launches} == {"bwd_dq_kernel<E>", "kv", "kw"}
        assert r.counters["mma_ops"] > 0


@pytest.fixture(scope="module")
def aft_local_lib(emu):
    return _build(emu, "aft_local")


@pytest.fixture(scope="module")
def ea_lib(emu):
    return _build(emu, "ea_double_norm")


@pytest.mark.parametrize("causal", [False, True])
def test_aft_local_fwd(emu, aft_local_lib, causal):
    B, T, D, heads, window, dtype = 2, 40, 12, 2, 5, torch.float32
    q, k, v, w = _inputs(B, T, D, heads, dtype)
    ws = aft_local_lib.raw("emu_aft_local_fwd_ws", DTYPE[dtype], B, T, D, window, int(causal))
    r = aft_local_lib.call("emu_aft_local_fwd", DTYPE[dtype], emu.In("q", q), emu.In("k", k), emu.In("v", v),
                           emu.In("w", w), heads, emu.Out("y", torch.empty(B, T, D)), emu.Out("lse", torch.empty(B, T, D)),
                           B, T, D, window, int(causal), emu.Scratch("workspace", ws)).check()
    idx = torch.arange(T)
    band = (idx[:, None] - idx[None, :]).abs() < window
    y_ref, lse_ref = formula(q, k, v, torch.where(band, w, torch.zeros_like(w)), causal, heads)
    check(r.outputs["y"], y_ref, dtype=dtype)
    torch.testing.assert_close(r.outputs["lse"].double(), lse_ref, rtol=5e-5, atol=5e-5)


def test_ea_double_norm_fwd(emu, ea_lib):
    M, N, S, eps, dtype = 3, 40, 20, 1e-9, torch.float32
    logits = torch.randn(M, N, S)
    ws = ea_lib.raw("emu_ea_double_norm_fwd_ws", DTYPE[dtype], M, N, S)
    r = ea_lib.call("emu_ea_double_norm_fwd", DTYPE[dtype], emu.In("logits", logits), emu.Out("out", torch.empty(M, N, S)),
                    emu.Out("lse", torch.empty(M, S)), emu.Out("rowsum", torch.empty(M, N)), eps, M, N, S,
                    emu.Scratch("workspace", ws)).check()
    p = torch.softmax(logits.double(), dim=1)
    ref = p / (p.sum(2, keepdim=True) + eps)
    torch.testing.assert_close(r.outputs["out"].double(), ref, rtol=5e-5, atol=5e-5)
    torch.testing.assert_close(r.outputs["lse"].double(), torch.logsumexp(logits.double(), 1), rtol=5e-5, atol=5e-5)
