"""Timing, peak memory and the machine's own limits, measured in the same run.

Timing (:func:`time_interleaved`): the providers of one case take turns, A B C A B C ..., for ``repeats`` rounds;
in each turn a provider runs a block of calls sized from one calibration call (about ``block_s`` seconds, at least
one call; on CUDA synchronised before and after the block), and the block's time per call is one repeat. A
measurement reports the minimum of its repeats (the run least disturbed by other work on the machine), their median,
and their spread (max - min) / min. Interleaving makes a slow phase of the machine hit every provider alike instead
of one provider's whole measurement.
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
import time

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


SPREAD_FLAG = 0.20  # a measurement whose repeats spread more than this, (max - min) / min, is flagged noisy
MAX_CALLS_PER_BLOCK = 10000


def _block(step, n: int, device: torch.device) -> float:
    """Seconds per call of ``n`` back-to-back calls (synchronised on CUDA)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - t0) / n


def time_interleaved(steps: dict, device: torch.device, repeats: int, block_s: float, slow: frozenset = frozenset()):
    """Time every step of ``steps`` (name -> callable, already warmed up), taking turns in the order given.

    A calibration call sizes each block, except for the names in ``slow`` (known to take ``block_s`` or more per
    call): one call per block. Returns name -> (list of ``repeats`` seconds per call, calls per block), or name ->
    the exception it raised (it then leaves the rotation; the others go on)."""
    out, calls = {}, {}
    for name, step in steps.items():
        if name in slow:
            calls[name], out[name] = 1, []
            continue
        try:
            t1 = _block(step, 1, device)
        except Exception as e:  # noqa: BLE001 - reported in the provider's row
            out[name] = e
            continue
        calls[name] = max(1, min(MAX_CALLS_PER_BLOCK, int(block_s / max(t1, 1e-9))))
        out[name] = []
    for _ in range(repeats):
        for name, step in steps.items():
            if not isinstance(out[name], list):
                continue
            try:
                out[name].append(_block(step, calls[name], device))
            except Exception as e:  # noqa: BLE001
                out[name] = e
    return {n: (r, calls[n]) if isinstance(r, list) else r for n, r in out.items()}


def summary(times: list[float]) -> dict:
    """min, median and spread (max - min) / min of the repeats, and whether the spread passes SPREAD_FLAG."""
    lo, hi = min(times), max(times)
    spread = (hi - lo) / lo if lo > 0 else float("inf")
    return dict(
        time_s=lo,
        time_median_s=statistics.median(times),
        time_repeats_s=list(times),
        spread=spread,
        noisy=spread > SPREAD_FLAG,
    )


def time_min(step, device: torch.device, repeats: int = 5, block_s: float = 0.06) -> float:
    """Minimum over ``repeats`` blocks of one step's seconds per call (the machine's floors)."""
    r = time_interleaved({"x": step}, device, repeats, block_s)["x"]
    if isinstance(r, Exception):
        raise r
    return min(r[0])


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


def copy_rate(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + bytes written), the memory-bound floor of this machine.

    The destination is allocated once: a fresh ``clone`` per call would time page faults on the CPU (freed memory
    goes back to the OS, see release_freed_memory_to_os), not the memory bus."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    out = torch.empty_like(x)
    step = lambda: out.copy_(x)  # noqa: E731
    step()
    return 2 * x.numel() * 4 / time_min(step, device)


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of a square matmul in ``dtype``, the compute floor of this machine."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    step = lambda: a @ b  # noqa: E731
    step()
    return 2 * n**3 / time_min(step, device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()
