"""Process-group helpers shared by the examples: DistributedDataParallel only when launched by torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def import_attnfree():
    """Make ``import attnfree_ext`` work from a source checkout too (the examples live next to the package)."""
    try:
        import attnfree_ext  # noqa: F401
    except ImportError:
        import sys

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup(device_arg: str):
    """Returns (device, rank, world_size). init_process_group only when WORLD_SIZE is set (torchrun):
    nccl on CUDA, gloo on CPU. --device auto picks CUDA when present."""
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = 0, 0
    if "WORLD_SIZE" in os.environ:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # share the CPU cores between the local processes
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return device, rank, world


def wrap(model: torch.nn.Module, device: torch.device, world: int):
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks (identity on a single process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
