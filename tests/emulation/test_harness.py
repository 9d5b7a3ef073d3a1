"""Self-tests of the CPU emulation harness (csrc/common/emulation) with kernels written for the purpose
(tests/emulation/kernels/*.cu): scheduling and barriers, warp collectives, atomics, shared memory, wmma numerics,
fault reports, poisoning and cost counters."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.emulation


@pytest.fixture(scope="module")
def basic(emu):
    return emu.build("basic", ["tests/emulation/kernels/basic.cu"], include_dirs=["csrc"])


@pytest.fixture(scope="module")
def wmma(emu):
    return emu.build("wmma_gemm", ["tests/emulation/kernels/wmma_gemm.cu"], include_dirs=["csrc"])


# ------------------------------------------------------------------------------------------------ barriers
def test_block_reduction_with_barriers(emu, basic):
    x = torch.randn(3000, dtype=torch.float32)
    for seed in range(3):
        r = basic.call("emu_block_sum", emu.In("x", x), emu.Out("out", torch.empty(5)), 3000, 5, 1, seed=seed).check()
        torch.testing.assert_close(r.outputs["out"].double().sum(), x.double().sum(), rtol=1e-5, atol=1e-4)
    assert r.counters["barriers"] == 5 * 9  # 1 + log2(256) barriers per block


def test_block_reduction_without_barriers_fails(emu, basic):
    """The shuffled thread order makes the missing __syncthreads visible (poisoned shared memory / stale sums)."""
    x = torch.randn(3000, dtype=torch.float32)
    ref = x.double().sum()
    wrong = 0
    for seed in range(4):
        r = basic.call("emu_block_sum", emu.In("x", x), emu.Out("out", torch.empty(5)), 3000, 5, 0, seed=seed)
        assert r.ok
        got = r.outputs["out"].double().sum()
        wrong += not (torch.isfinite(got) and abs(got - ref) < 1e-3)
    assert wrong >= 1


def test_inorder_schedule(emu, basic):
    x = torch.randn(3000, dtype=torch.float32)
    basic.set_schedule("inorder")
    try:
        r = basic.call("emu_block_sum", emu.In("x", x), emu.Out("out", torch.empty(5)), 3000, 5, 1).check()
    finally:
        basic.set_schedule("shuffle")
    torch.testing.assert_close(r.outputs["out"].double().sum(), x.double().sum(), rtol=1e-5, atol=1e-4)


def test_divergent_barrier_reported(emu, basic):
    r = basic.call("emu_divergent_barrier", emu.Out("y", torch.empty(64)))
    assert not r.ok and r.rc == 719 and r.fault_code == 719
    assert "divergent_barrier_kernel" in r.fault and "__syncthreads" in r.fault and "blockIdx" in r.fault
    assert "basic.cu:" in r.fault  # the barrier's source line


def test_exit_before_barrier_reported(emu, basic):
    r = basic.call("emu_exit_before_barrier", emu.Out("y", torch.empty(64)), 40)
    assert not r.ok and "exit" in r.fault and "exit_before_barrier_kernel" in r.fault


def test_warp_collective_waiting_for_exited_lane(emu, basic):
    r = basic.call("emu_shfl_exited_lane", emu.Out("y", torch.empty(32)))
    assert not r.ok and "__shfl_sync" in r.fault and "exited" in r.fault


# ------------------------------------------------------------------------------------------------ warp collectives
def test_warp_ops(emu, basic):
    x = torch.randint(-20, 20, (128,)).float()
    r = basic.call("emu_warp_ops", emu.In("x", x), emu.Out("out", torch.empty(128 * 9)), 2, 64).check()
    o = r.outputs["out"].view(128, 9)
    xw = x.view(4, 32)
    lane = torch.arange(32)
    exp = torch.empty(4, 32, 9)
    exp[..., 0] = xw.sum(1, keepdim=True)
    exp[..., 1] = xw[:, 3:4]
    exp[..., 2] = xw.cumsum(1)
    exp[..., 3] = torch.cat([xw[:, 1:], xw[:, 31:]], 1)  # lane 31 keeps its own value
    bal = ((xw > 0).long() << lane).sum(1, keepdim=True).double()
    exp[..., 4] = bal.float()
    exp[..., 5] = (xw > 100).any(1, keepdim=True).float()
    exp[..., 6] = (xw > -1000).all(1, keepdim=True).float()
    exp[..., 7] = float(sum(range(32)))
    m = torch.fmod(xw, 3)
    exp[..., 8] = (m.unsqueeze(2) == m.unsqueeze(1)).sum(2).float()
    torch.testing.assert_close(o.view(4, 32, 9), exp)


def test_half_warp_disjoint_masks(emu, basic):
    x = torch.randn(64)
    r = basic.call("emu_half_warp", emu.In("x", x), emu.Out("y", torch.empty(64))).check()
    xs = x.view(4, 16)
    exp = torch.stack(
        [xs[0].sum().expand(16), xs[1].max().expand(16), xs[2].sum().expand(16), xs[3].max().expand(16)]
    ).reshape(64)
    torch.testing.assert_close(r.outputs["y"], exp, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ atomics, smem
def test_atomics(emu, basic):
    vals = torch.randint(0, 1000, (500,), dtype=torch.int32)
    r = basic.call(
        "emu_atomics",
        emu.In("vals", vals),
        500,
        emu.InOut("hist", torch.zeros(8, dtype=torch.int32)),
        emu.InOut("fsum", torch.zeros(1)),
        emu.InOut("imax", torch.full((1,), -1, dtype=torch.int32)),
        emu.InOut("cas", torch.zeros(1, dtype=torch.int32)),
    ).check()
    assert torch.equal(r.outputs["hist"], torch.bincount(vals & 7, minlength=8).int())
    assert r.outputs["fsum"].item() == float(vals.sum().item())  # integers < 2^24: exact in any order
    assert r.outputs["imax"].item() == vals.max().item()
    assert r.outputs["cas"].item() == 500
    assert r.counters["atomics"] >= 4 * 500


def test_dynamic_shared_memory(emu, basic):
    x = torch.randn(1000)
    r = basic.call("emu_reverse", emu.In("x", x), emu.Out("y", torch.empty(1000)), 1000, 96).check()
    assert torch.equal(r.outputs["y"], x.flip(0))
    assert r.launches[0]["smem"] == 4000


def test_dynamic_shared_memory_limits(emu, basic):
    n = 20000  # 80 000 bytes > 48 KiB: needs the opt-in attribute
    x = torch.randn(n)
    r = basic.call("emu_reverse_big", emu.In("x", x), emu.Out("y", torch.empty(n)), n, 0)
    assert r.rc == 1 and "cudaFuncSetAttribute" in r.fault
    r = basic.call("emu_reverse_big", emu.In("x", x), emu.Out("y", torch.empty(n)), n, 1).check()
    assert torch.equal(r.outputs["y"], x.flip(0))
    n = 60000  # 240 000 bytes > 227 KiB: refused by cudaFuncSetAttribute
    r = basic.call("emu_reverse_big", emu.In("x", torch.randn(n)), emu.Out("y", torch.empty(n)), n, 1)
    assert r.rc == 1 and "227 KiB" in r.fault


def test_shared_memory_and_outputs_are_poisoned(emu, basic):
    r = basic.call("emu_read_unwritten_smem", emu.Out("y", torch.zeros(128))).check()
    assert r.outputs["y"].isnan().all()  # static and dynamic shared memory start as NaN
    r = basic.call("emu_partial_write", emu.Out("y", torch.zeros(100)), 100).check()
    y = r.outputs["y"]
    assert (y[0::2] == 1).all() and y[1::2].isnan().all()  # unwritten outputs stay NaN


# ------------------------------------------------------------------------------------------------ faults
def test_oob_read_reported(emu, basic):
    r = basic.call("emu_oob_read", emu.In("x", torch.randn(100)), emu.Out("y", torch.empty(100)), 100)
    assert not r.ok and r.rc == 700
    assert "oob_read_kernel" in r.fault and "out-of-bounds read" in r.fault
    assert "'x'" in r.fault and "index 100" in r.fault and "100 elements" in r.fault
    assert "blockIdx (1,0,0) threadIdx (35,0,0)" in r.fault
    assert "in int emu_oob_read(" in r.fault  # the launching function


def test_oob_write_reported(emu, basic):
    r = basic.call("emu_oob_write", emu.In("x", torch.randn(100)), emu.Out("y", torch.empty(100)), 100)
    assert not r.ok and r.rc == 700
    assert "oob_write_kernel" in r.fault and "out-of-bounds write" in r.fault and "'y'" in r.fault
    assert "index 100" in r.fault


def test_write_to_input_reported(emu, basic):
    r = basic.call("emu_write_input", emu.In("x", torch.randn(32)))
    assert not r.ok and "read-only" in r.fault and "'x'" in r.fault


def test_raw_pointer_oob_write_caught_by_guard(emu, basic):
    r = basic.call("emu_raw_oob_write", emu.Out("y", torch.empty(100)), 100)
    assert r.rc == 0 and r.fault is None and not r.ok
    assert any("'y'" in p and "guard" in p for p in r.problems)


def test_misaligned_vector_load_reported(emu, basic):
    r = basic.call("emu_misaligned", emu.In("x", torch.randn(32)), emu.Out("y", torch.empty(1)))
    assert r.rc == 716 and "misaligned" in r.fault


def test_vector_loads(emu, basic):
    x = torch.randn(256)
    r = basic.call("emu_vector_load", emu.In("x", x), emu.Out("y", torch.empty(64)), 64).check()
    torch.testing.assert_close(r.outputs["y"], x.view(64, 4).sum(1))
    assert r.counters["bytes_read"] == 256 * 4 and r.counters["bytes_written"] == 64 * 4


def test_async_copy_double_buffered(emu, basic):
    """async_copy16 / async_commit / async_wait: three tiles through two shared buffers, the last one partial
    (chunks past the input zero-filled, not read: only the valid chunks count as bytes read)."""
    n4 = 2 * 256 + 100  # 16-byte chunks: two whole tiles of 256 and 100 of the third
    x = torch.randn(n4 * 4)
    r = basic.call("emu_async_copy", emu.In("x", x), emu.Out("y", torch.empty(3 * 64)), n4, 3).check()
    xp = torch.cat([x, torch.zeros(3 * 1024 - x.numel())]).view(3, 64, 16).sum(2).roll(-1, dims=1)
    torch.testing.assert_close(r.outputs["y"], xp.reshape(-1))
    assert r.counters["bytes_read"] == n4 * 16


def test_gptr_api(emu, basic):
    n = 50
    x = torch.randn(n)
    h = torch.randn(n).half()
    xy = torch.randn(n, 2)
    r = basic.call(
        "emu_gptr_api", emu.In("x", x), emu.In("h", h), emu.In("xy", xy), emu.Out("out", torch.empty(4 * n)), n
    ).check()
    o = r.outputs["out"].view(n, 4)
    torch.testing.assert_close(o[:, 0], 2 * x + h.float())
    torch.testing.assert_close(o[:, 1], xy[:, 0] * xy[:, 1] + xy[0, 0])
    assert (o[:, 2] == 8).all() and (o[:, 3] == 31).all()
    # per thread: 7 stores (3 of them read-modify-writes); reads: x twice, h, xy[i], xy[0], 4 reads of out
    assert r.counters["bytes_written"] == n * 7 * 4
    assert r.counters["bytes_read"] == n * (4 + 4 + 2 + 8 + 8 + 4 * 4)


def test_fault_is_sticky(emu, basic):
    r = basic.call("emu_two_launches_after_fault", emu.In("x", torch.randn(100)), emu.Out("y", torch.empty(100)), 100)
    assert r.rc == 700 and len(r.launches) == 2
    assert r.launches[0]["error"] == 700 and r.launches[1]["error"] == 700
    assert r.launches[1]["counters"]["blocks"] == 0  # the second launch never ran
    # the next call starts clean
    basic.call("emu_partial_write", emu.Out("y", torch.zeros(10)), 10).check()


def test_bad_launch_configuration(emu, basic):
    r = basic.call("emu_bad_config", emu.Out("y", torch.empty(4)))
    assert r.rc == 9 and "block" in r.fault and r.counters["launches"] == 0


def test_raw_segfault_reported(emu, basic):
    r = basic.call("emu_raw_null", None, emu.Out("y", torch.empty(32)))
    assert r.rc == 700 and "segmentation fault" in r.fault and "raw_null_kernel" in r.fault
    basic.call("emu_partial_write", emu.Out("y", torch.zeros(10)), 10).check()  # the library still works


def test_stack_overflow_reported(emu, basic):
    r = basic.call("emu_stack_overflow", emu.Out("y", torch.empty(32)), 100000)
    assert r.rc == 700 and "stack overflow" in r.fault and "ATTNFREE_EMU_STACK_KB" in r.fault
    r = basic.call("emu_stack_overflow", emu.Out("y", torch.empty(32)), 10).check()


def test_device_assert_and_trap(emu, basic):
    r = basic.call("emu_assert", emu.Out("y", torch.empty(32)))
    assert r.rc == 710 and "assert" in r.fault and "threadIdx.x < 16" in r.fault
    r = basic.call("emu_trap", emu.Out("y", torch.empty(32)))
    assert r.rc == 710 and "__trap" in r.fault and "threadIdx (7,0,0)" in r.fault


def test_overlapping_warp_masks_reported(emu, basic):
    r = basic.call("emu_overlapping_masks", emu.Out("y", torch.empty(32)))
    assert r.rc == 719 and "overlaps" in r.fault


def test_grid_cap(emu, basic):
    n = 5000
    x = torch.randn(n)
    basic.set_grid_cap(3)
    try:
        r = basic.call("emu_grid_stride", emu.In("x", x), emu.Out("y", torch.empty(n)), n).check()
    finally:
        basic.set_grid_cap(0)
    assert torch.equal(r.outputs["y"], 2 * x)
    assert r.launches[0]["grid"] == ((n + 63) // 64, 1, 1) and r.launches[0]["grid_run"] == (3, 1, 1)
    assert r.counters["blocks"] == 3


def test_syncthreads_count_and_or(emu, basic):
    x = torch.randn(96)
    r = basic.call("emu_sync_count", emu.In("x", x), emu.Out("out", torch.empty(3, dtype=torch.int32))).check()
    pos = int((x > 0).sum())
    assert r.outputs["out"].tolist() == [pos, int(pos == 96), int(pos > 0)]
    assert r.counters["barriers"] == 3


def test_spin_lock_makes_progress(emu, basic):
    r = basic.call(
        "emu_spin_lock",
        emu.InOut("lock", torch.zeros(1, dtype=torch.int32)),
        emu.InOut("counter", torch.zeros(1, dtype=torch.int32)),
        3,
    ).check()
    assert r.outputs["counter"].item() == 3 * 64 and r.outputs["lock"].item() == 0


# ------------------------------------------------------------------------------------------------ counters
def test_counters_exact(emu, basic):
    n, threads = 1000, 128
    x = torch.rand(n)
    r = basic.call("emu_counters", emu.In("x", x), emu.Out("y", torch.empty(n)), n, threads).check()
    c = r.counters
    blocks = (n + threads - 1) // threads
    assert c["launches"] == 1 and c["blocks"] == blocks and c["threads"] == blocks * threads
    assert c["bytes_read"] == 4 * n and c["bytes_written"] == 4 * n
    assert c["sfu_exp"] == 3 * n and c["sfu_log"] == n and c["sfu_rsqrt"] == n
    assert c["sfu_rcp"] == 0 and c["sfu_sqrt"] == 0 and c["sfu_total"] == 5 * n
    assert c["barriers"] == blocks and c["mma_flops"] == 0
    assert r.launches[0]["counters"] == c
    assert r.launches[0]["kernel"] == "counters_kernel" and r.launches[0]["grid"] == (blocks, 1, 1)
    xd = x.double()
    ref = xd.exp() + (xd + 2).log() + (xd + 2).rsqrt() + xd.exp() + torch.exp2(xd)
    torch.testing.assert_close(r.outputs["y"].double(), ref, rtol=1e-5, atol=1e-5)


def test_wrapped_math_symbols_exist(emu, basic):
    for f in emu.wrapped_functions():
        assert basic.has("__wrap_" + f), f


# ------------------------------------------------------------------------------------------------ wmma
def _gemm_operands(kind, M, N, K, b_col):
    a = torch.randn(M, K)
    b = torch.randn(K, N)
    if kind == 0:
        a, b = a.half(), b.half()
        ra, rb = a.double(), b.double()
    elif kind == 1:
        a, b = a.bfloat16(), b.bfloat16()
        ra, rb = a.double(), b.double()
    else:
        ra, rb = a, b
    return a, b, ra, rb


@pytest.mark.parametrize("kind,name", [(0, "fp16"), (1, "bf16"), (2, "tf32"), (3, "tf32-unconverted")])
@pytest.mark.parametrize("b_col", [0, 1])
def test_wmma_gemm_exact_operand_rounding(emu, wmma, kind, name, b_col):
    M, N, K = 32, 48, 64
    a, b, ra, rb = _gemm_operands(kind, M, N, K, b_col)
    if kind == 2:
        ra, rb = emu.round_tf32(a).double(), emu.round_tf32(b).double()
    elif kind == 3:
        ra, rb = emu.truncate_tf32(a).double(), emu.truncate_tf32(b).double()
    bmem = b.t().contiguous() if b_col else b
    r = wmma.call(
        "emu_wmma_gemm", kind, b_col, emu.In("A", a), emu.In("B", bmem), emu.Out("C", torch.empty(M, N)), M, N, K
    ).check()
    c = r.outputs["C"].double()
    ref = ra @ rb
    tol = emu.fp32_gemm_tolerance(ra, rb, K)
    assert ((c - ref).abs() <= tol).all(), (c - ref).abs().max()
    if kind >= 2:  # the operand rounding matters: the plain fp32 product is measurably different
        exact = a.double() @ b.double()
        assert ((c - exact).abs() > tol).any()
    ks = 16 if kind < 2 else 8
    assert r.counters["mma_ops"] == (M // 16) * (N // 16) * (K // ks)
    assert r.counters["mma_flops"] == 2 * M * N * K
    el = 2 if kind < 2 else 4
    assert r.counters["bytes_read"] == (M * K * (N // 16) + K * N * (M // 16)) * el
    assert r.counters["bytes_written"] == M * N * 4


def test_tf32_rounding_is_rna():
    import emu_runner as emu

    one = 1.0
    ulp = 2.0**-10
    x = torch.tensor([one + ulp / 2, one + 1.5 * ulp, one + ulp / 2 - 2**-23, -(one + ulp / 2), 3.0e38, float("inf")])
    r = emu.round_tf32(x)
    assert r[0].item() == one + ulp  # tie: away from zero
    assert r[1].item() == one + 2 * ulp
    assert r[2].item() == one
    assert r[3].item() == -(one + ulp)
    assert math.isinf(r[5].item())
    t = emu.truncate_tf32(torch.tensor([one + 0.75 * ulp]))
    assert t.item() == one


def test_wmma_bf16_through_shared_memory(emu, wmma):
    M, N, K = 48, 32, 96  # 4 warps per block, 6 tiles: the second block has idle warps that exit after the barrier
    a = torch.randn(M, K).bfloat16()
    b = torch.randn(K, N).bfloat16()
    r = wmma.call(
        "emu_wmma_gemm_smem_bf16", emu.In("A", a), emu.In("B", b), emu.Out("C", torch.empty(M, N)), M, N, K
    ).check()
    ref = a.double() @ b.double()
    assert ((r.outputs["C"].double() - ref).abs() <= emu.fp32_gemm_tolerance(a.double(), b.double(), K)).all()


def test_wmma_f64(emu, wmma):
    M, N, K = 16, 24, 12
    a, b = torch.randn(M, K, dtype=torch.float64), torch.randn(K, N, dtype=torch.float64)
    r = wmma.call(
        "emu_wmma_gemm_f64",
        emu.In("A", a),
        emu.In("B", b),
        emu.Out("C", torch.empty(M, N, dtype=torch.float64)),
        M,
        N,
        K,
    ).check()
    torch.testing.assert_close(r.outputs["C"], a @ b, rtol=1e-13, atol=1e-13)
    assert r.counters["mma_flops"] == 2 * M * N * K


def test_wmma_store_needs_syncwarp(emu, wmma):
    a = torch.randn(16, 16).half()
    b = torch.randn(16, 16).half()
    ref = (a.double() @ b.double()).reshape(-1)
    r = wmma.call(
        "emu_wmma_store_then_read", emu.In("A", a), emu.In("B", b), emu.Out("out", torch.empty(256)), 1
    ).check()
    assert ((r.outputs["out"].double() - ref).abs() < 1e-3).all()
    bad = 0
    for seed in range(3):
        r = wmma.call(
            "emu_wmma_store_then_read", emu.In("A", a), emu.In("B", b), emu.Out("out", torch.empty(256)), 0, seed=seed
        ).check()
        bad += bool(r.outputs["out"].isnan().any())
    assert bad >= 1  # without __syncwarp, lanes read elements other lanes have not stored yet


def test_wmma_misaligned_pointer_reported(emu, wmma):
    r = wmma.call("emu_wmma_misaligned", emu.In("A", torch.randn(256).half()), emu.Out("C", torch.empty(32)))
    assert r.rc == 716 and "load_matrix_sync" in r.fault and "32-byte" in r.fault
