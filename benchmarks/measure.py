"""Timing, peak memory and the machine's own limits, measured in the same run.

Timing: torch.utils.benchmark.Timer.blocked_autorange (median) on CPU; on CUDA triton.testing.do_bench
(median, imported lazily) or, without triton, CUDA events around each call (median).
Peak memory: torch.cuda.max_memory_allocated minus the allocation before the call, on CUDA. On CPU (Linux) the
peak resident set over the call: VmHWM is reset through /proc/self/clear_refs ("5") and read back from
/proc/self/status, minus VmRSS before the call; an estimate (the allocator may reuse pages it already holds), and
"n/a" where /proc does not allow it. So that freed tensors go back to the OS (and new ones raise the peak again),
:func:`release_freed_memory_to_os` sets glibc's mmap threshold to 128 KiB at start-up (mallopt), and the memory call
runs before the timed calls.
"""

from __future__ import annotations

import gc
import statistics

import torch


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(run, mode: str):
    """fwd: run.fn(); fwdbwd: forward then torch.autograd.grad of every grad target (no .grad accumulation)."""
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return run.fn()

        return step

    targets = run.grad_targets
    state = {}

    def step():
        out = run.fn()
        if "dy" not in state:
            state["dy"] = torch.randn_like(out)
        return torch.autograd.grad(out, targets, state["dy"], allow_unused=True)

    return step


def time_cpu(step, min_run_time: float, threads: int) -> float:
    from torch.utils import benchmark

    t = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    m = t.blocked_autorange(min_run_time=min_run_time)
    return m.median


def time_cuda(step, rep_ms: float) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return do_bench(step, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    budget, spent = rep_ms / 1e3, 0.0
    while spent < budget or len(times) < 5:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
        spent += times[-1]
        if len(times) >= 1000:
            break
    return statistics.median(times)


def _proc_kb(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_memory(step, device: torch.device):
    """Bytes of peak extra memory of one call, or None ("n/a") where it cannot be measured."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_kb("VmRSS")
        out = step()
        peak = _proc_kb("VmHWM")
        del out
        if base is None or peak is None:
            return None
        return max(0, peak - base) * 1024
    except OSError:
        return None


def release_freed_memory_to_os() -> bool:
    """glibc only: allocations >= 128 KiB use mmap and are unmapped on free (no dynamic threshold), so the peak RSS
    of a call reflects its own allocations rather than pages the allocator kept from earlier calls."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        return ok
    except (OSError, AttributeError):
        return False


def copy_rate(device: torch.device, threads: int, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + bytes written), the memory-bound floor of this machine.

    The destination is allocated once: a fresh ``clone`` per call would time page faults on the CPU (freed memory
    goes back to the OS, see release_freed_memory_to_os), not the memory bus."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    out = torch.empty_like(x)
    step = lambda: out.copy_(x)  # noqa: E731
    step()
    t = time_cuda(step, 100) if device.type == "cuda" else time_cpu(step, 0.3, threads)
    return 2 * x.numel() * 4 / t


def gemm_rate(device: torch.device, dtype: torch.dtype, threads: int, n: int) -> float:
    """FLOP/s of a square matmul in ``dtype``, the compute floor of this machine."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    step = lambda: a @ b  # noqa: E731
    step()
    t = time_cuda(step, 100) if device.type == "cuda" else time_cpu(step, 0.3, threads)
    return 2 * n**3 / t


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()
