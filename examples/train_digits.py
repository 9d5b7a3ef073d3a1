"""AFT-conv image classifier on scikit-learn's 8x8 handwritten digits (sklearn.datasets.load_digits).

Model: 1x1-conv stem to ``--dim`` channels, ``--layers`` pre-norm residual blocks of GroupNorm +
attnfree_ext.nn.AFTConv2d
(``--heads`` heads, ``--kernel-size`` s x s relative position kernel, paper §3.2) + GroupNorm + a 1x1-conv MLP, global
average pooling and a linear classifier. A fixed stratified split (``--test-size``, seed 0) gives the test set.

    python examples/train_digits.py                    # CPU, a few minutes
    torchrun --nproc_per_node=2 --standalone examples/train_digits.py --quick   # DDP (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist  # noqa: E402

_dist.import_attnfree()
import attnfree_ext  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64, help="images per step per process")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--test-size", type=float, default=0.25)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics-out", default=None, help="write the final metrics and loss history as JSON")
    ap.add_argument("--quick", action="store_true", help="small model, 30 steps (tests, smoke runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.dim, args.layers, args.batch_size, args.log_every = min(args.steps, 30), 16, 1, 32, 10
    return args


def load_data(test_size: float):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (n, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=test_size, random_state=0, stratify=d.target)
    x = (x - x[tr].mean()) / x[tr].std()
    return (x[tr], y[tr]), (x[te], y[te])


class Block(nn.Module):
    def __init__(self, dim, heads, s):
        super().__init__()
        self.n1, self.n2 = nn.GroupNorm(1, dim), nn.GroupNorm(1, dim)
        self.aft = attnfree_ext.nn.AFTConv2d(dim, heads, s)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))

    def forward(self, x):
        x = x + self.aft(self.n1(x))
        return x + self.mlp(self.n2(x))


class AFTConvNet(nn.Module):
    def __init__(self, dim=64, heads=4, s=3, layers=2, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, dim, 3, padding=1)
        self.blocks = nn.Sequential(*[Block(dim, heads, s) for _ in range(layers)])
        self.norm = nn.GroupNorm(1, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


@torch.no_grad()
def accuracy(model, x, y, device, batch=512):
    model.eval()
    correct = sum(
        (model(xb.to(device)).argmax(-1).cpu() == yb).sum().item() for xb, yb in zip(x.split(batch), y.split(batch))
    )
    model.train()
    return correct / len(y)


def main(argv=None):
    args = parse_args(argv)
    device, rank, world = _dist.setup(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    (xtr, ytr), (xte, yte) = load_data(args.test_size)
    log(f"data: load_digits, {len(ytr)} train / {len(yte)} test images of 8x8, 10 classes")

    model = AFTConvNet(args.dim, args.heads, args.kernel_size, args.layers).to(device)
    log(
        f"model: {args.layers} AFTConv2d blocks, dim {args.dim}, {args.heads} heads, kernel {args.kernel_size}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e3:.1f} k params, device {device}, world size {world}"
    )
    ddp_model = _dist.wrap(model, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)

    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    ds = TensorDataset(xtr, ytr)
    sampler = (
        DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
        if world > 1
        else None
    )
    g = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        ds, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True, generator=g
    )
    history, step, epoch, t0, seen = [], 0, 0, time.perf_counter(), 0
    while step < args.steps:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            # light augmentation: random shifts by up to one pixel
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(ddp_model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(yb) * world
            lv = loss.item()
            if not math.isfinite(lv):
                raise SystemExit(f"non-finite loss {lv} at step {step}")
            history.append(lv)
            if step % args.log_every == 0 or step == 1 or step == args.steps:
                log(
                    f"step {step:4d}  train loss {lv:.4f}  {seen / (time.perf_counter() - t0):,.0f} images/s",
                    flush=True,
                )
            if step >= args.steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - t0
    acc = accuracy(model, xte, yte, device)
    train_acc = accuracy(model, xtr, ytr, device)
    tail = history[-min(20, len(history)) :]
    metrics = dict(
        steps=args.steps,
        world_size=world,
        device=str(device),
        train_loss=sum(tail) / len(tail),
        train_accuracy=train_acc,
        test_accuracy=acc,
        images_per_s=seen / elapsed,
        elapsed_s=elapsed,
        history=history,
    )
    log(
        f"final: train loss {metrics['train_loss']:.4f}, train accuracy {train_acc:.4f}, test accuracy {acc:.4f} "
        f"({len(yte)} images); {metrics['images_per_s']:,.0f} images/s over {elapsed:.1f} s"
    )
    if rank == 0 and args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, indent=1)
    _dist.cleanup()
    return metrics


if __name__ == "__main__":
    main()
