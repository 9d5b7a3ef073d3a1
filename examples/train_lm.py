"""Character-level (byte-level) AFT language model trained on the Python standard library's own source files.

Data: every ``*.py`` file directly under ``sysconfig.get_paths()["stdlib"]`` (present on every Python install),
sorted by name; every ``--val-every``-th file is held out for validation, so the split is deterministic and the
validation text is code the model never trained on. Bytes are the tokens (vocabulary 256).

Model (AFT paper's enwik8 setting, scaled down): byte embedding + learned position embedding, ``--layers`` pre-norm
blocks of LayerNorm + causal AFT token mixing + LayerNorm + MLP, alternating causal ``attnfree_ext.nn.AFTLocal``
(window ``--window``) and causal ``attnfree_ext.nn.AFTSimple`` (``--mixer local|simple|alternate``), tied output.

Reports train loss (nats/byte), held-out bits per character (= bits per byte), tokens/s, and the unigram entropy of
the training bytes (what a model with no context would reach) for comparison.

Then it samples text token by token (seeded sampling at ``--temperature``; 0 = greedy) twice: carrying the layers'
decoding state (``forward(x, state, return_state=True)``: one new token per step, docs/design.md §9.2) and
re-running the whole prefix at every step, checks that both give the same tokens, and reports decoding tokens/s of
each.

    python examples/train_lm.py                      # CPU: a few minutes
    python examples/train_lm.py --device cuda        # same code, CUDA kernels
    torchrun --nproc_per_node=2 --standalone examples/train_lm.py --quick     # DDP (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import sysconfig
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
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step per process")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--window", type=int, default=32, help="AFT-local band (paper: 32 best on enwik8)")
    ap.add_argument("--mixer", default="alternate", choices=("alternate", "local", "simple"))
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--val-every", type=int, default=10, help="every N-th stdlib file (sorted) is held out")
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N files (sorted)")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="bfloat16: autocast on CUDA")
    ap.add_argument("--keep-denormals", action="store_true", help="do not flush subnormal floats to zero on CPU")
    ap.add_argument("--metrics-out", default=None, help="write the final metrics and loss history as JSON")
    ap.add_argument("--prompt", default="import ", help="text the generated sample starts from")
    ap.add_argument("--gen-tokens", type=int, default=None, help="bytes to generate (default: up to --seq-len)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    ap.add_argument("--quick", action="store_true", help="tiny model and data, 30 steps (tests, smoke runs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.seq_len = min(args.steps, 30), 8, 32
        args.dim, args.layers, args.window = 32, 2, 8
        args.max_files, args.eval_batches, args.log_every = args.max_files or 40, 4, 10
        args.lr = 1e-2
    return args


# ----------------------------------------------------------------------------------------------------- data
def stdlib_files(max_files=None):
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise SystemExit(f"no *.py files under {root}")
    return files[:max_files] if max_files else files


def load_split(val_every: int, max_files=None):
    """(train bytes, val bytes, n_train_files, n_val_files).

    File i (sorted) goes to validation when i % val_every == 0."""
    train, val = [], []
    for i, path in enumerate(stdlib_files(max_files)):
        with open(path, "rb") as f:
            (val if i % val_every == 0 else train).append(f.read())
    to_t = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    return to_t(train), to_t(val), len(train), len(val)


def unigram_entropy_bits(data: torch.Tensor) -> float:
    p = torch.bincount(data, minlength=256).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


def random_windows(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    idx = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
    x = torch.stack([data[i : i + seq_len + 1] for i in idx.tolist()])
    return x[:, :-1], x[:, 1:]


# ----------------------------------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, dim, seq_len, mixer, window):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if mixer == "local":
            self.mix = attnfree_ext.nn.AFTLocal(seq_len, dim, window, causal=True)
        else:
            self.mix = attnfree_ext.nn.AFTSimple(dim, causal=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, state=None, return_state=False):
        if return_state:
            h, state = self.mix(self.ln1(x), state, True)
        else:
            h = self.mix(self.ln1(x))
        x = x + h
        x = x + self.mlp(self.ln2(x))
        return (x, state) if return_state else x


class AFTLanguageModel(nn.Module):
    def __init__(self, dim, layers, seq_len, mixer="alternate", window=32, vocab=256):
        super().__init__()
        kinds = [("local" if i % 2 == 0 else "simple") if mixer == "alternate" else mixer for i in range(layers)]
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.ModuleList(Block(dim, seq_len, k, window) for k in kinds)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx, state=None, return_state=False):
        """logits (B, T, vocab); with ``return_state`` also the decoding state (position, per-block layer states), which
        a later call takes as ``state`` to continue the sequence (positions included)."""
        t0, states = (0, [None] * len(self.blocks)) if state is None else state
        x = self.embed(idx) + self.pos[t0 : t0 + idx.shape[1]]
        if not return_state:
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln(x))
        new = []
        for b, s in zip(self.blocks, states):
            x, s = b(x, s, True)
            new.append(s)
        return self.head(self.ln(x)), (t0 + idx.shape[1], new)


# ----------------------------------------------------------------------------------------------------- sample
def _pick(logits, temperature, gen):
    if temperature == 0:
        return logits.argmax(dim=-1)
    p = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(p.cpu(), 1, generator=gen)[:, 0].to(logits.device)


@torch.no_grad()
def generate(model, prompt, n_new, temperature=0.8, seed=0, use_state=True):
    """``n_new`` tokens after ``prompt`` (1, P), one per step: with the decoding state (each step runs the new token
    only) or re-running the whole prefix each step. Same seed -> same random draws. Returns (tokens (n_new,), s)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    t = time.perf_counter()
    if use_state:
        logits, state = model(prompt, None, True)
        for i in range(n_new):
            nxt = _pick(logits[:, -1], temperature, gen)
            out.append(nxt)
            if i + 1 < n_new:
                logits, state = model(nxt[:, None], state, True)
    else:
        seq = prompt
        for _ in range(n_new):
            nxt = _pick(model(seq)[:, -1], temperature, gen)
            out.append(nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(out), time.perf_counter() - t


def sample_and_time(model, args, device):
    """Generate with the state and by re-running the prefix; both must give the same tokens."""
    model.eval()
    prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=device)
    room = args.seq_len - prompt.shape[1]
    if room < 1:
        raise SystemExit(f"--prompt is {prompt.shape[1]} bytes; it must be shorter than --seq-len={args.seq_len}")
    n = room if args.gen_tokens is None else min(args.gen_tokens, room)
    with_state, t_state = generate(model, prompt, n, args.temperature, args.seed, use_state=True)
    rerun, t_rerun = generate(model, prompt, n, args.temperature, args.seed, use_state=False)
    model.train()
    text = args.prompt + bytes(with_state.tolist()).decode("utf-8", errors="replace")
    return dict(
        sample=text,
        gen_tokens=n,
        gen_same_tokens=bool(torch.equal(with_state, rerun)),
        decode_tokens_per_s_state=n / t_state,
        decode_tokens_per_s_rerun=n / t_rerun,
    )


# ----------------------------------------------------------------------------------------------------- train
@torch.no_grad()
def evaluate(model, val, args, device, rank, world, amp):
    """Mean held-out loss over fixed windows spread evenly over the validation text (sharded over ranks)."""
    model.eval()
    n_windows = args.eval_batches * args.batch_size
    starts = torch.linspace(0, len(val) - args.seq_len - 2, n_windows).long()
    mine = starts[rank::world]
    total, count = 0.0, 0
    for chunk in mine.split(args.batch_size):
        x = torch.stack([val[i : i + args.seq_len + 1] for i in chunk.tolist()]).to(device)
        with amp():
            logits = model(x[:, :-1])
        total += F.cross_entropy(logits.float().reshape(-1, 256), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    total, count = _dist.all_reduce_sum([total, count], device)
    model.train()
    return total / max(count, 1)


def main(argv=None):
    args = parse_args(argv)
    if not args.keep_denormals:
        torch.set_flush_denormal(True)  # CPU: tiny exp() results as subnormals slow x86 math by 10-100x
    device, rank, world = _dist.setup(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)

    train, val, n_tr, n_va = load_split(args.val_every, args.max_files)
    # rank-sharded data: each process samples its windows from its own contiguous slice of the training text
    shard = len(train) // world
    my_train = train[rank * shard : (rank + 1) * shard] if world > 1 else train
    h_uni = unigram_entropy_bits(train)
    log(
        f"data: {n_tr} train files ({len(train) / 1e6:.2f} MB), {n_va} held-out files ({len(val) / 1e6:.2f} MB) "
        f"from {sysconfig.get_paths()['stdlib']}"
    )
    log(f"unigram entropy of the training bytes: {h_uni:.3f} bits/char ({h_uni * math.log(2):.3f} nats)")

    model = AFTLanguageModel(args.dim, args.layers, args.seq_len, args.mixer, args.window).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {args.layers} blocks ({args.mixer}), dim {args.dim}, seq {args.seq_len}, {n_params / 1e6:.2f} M "
        f"params, device {device}, world size {world}"
    )
    ddp_model = _dist.wrap(model, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    use_amp = args.dtype == "bfloat16" and device.type == "cuda"
    amp = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if use_amp
        else (lambda: torch.autocast("cpu", enabled=False))
    )

    gen = torch.Generator().manual_seed(args.seed + 1000 * rank)
    history, t0, tokens = [], time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        x, y = random_windows(my_train, args.batch_size, args.seq_len, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp():
            logits = ddp_model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tokens += x.numel() * world
        lv = loss.item()
        if not math.isfinite(lv):
            raise SystemExit(f"non-finite loss {lv} at step {step}")
        history.append(lv)
        if rank == 0 and (step % args.log_every == 0 or step == 1 or step == args.steps):
            el = time.perf_counter() - t0
            log(
                f"step {step:5d}  train loss {lv:.4f} nats ({lv / math.log(2):.3f} bits/char)  "
                f"lr {sched.get_last_lr()[0]:.2e}  {tokens / el:,.0f} tokens/s",
                flush=True,
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    val_loss = evaluate(model, val, args, device, rank, world, amp)
    tail = history[-min(len(history), 20) :]
    metrics = dict(
        steps=args.steps,
        world_size=world,
        device=str(device),
        train_loss_nats=sum(tail) / len(tail),
        val_loss_nats=val_loss,
        val_bpc=val_loss / math.log(2),
        unigram_entropy_bits=h_uni,
        tokens_per_s=tokens / elapsed,
        elapsed_s=elapsed,
        params=n_params,
        history=history,
    )
    log(
        f"final: train loss {metrics['train_loss_nats']:.4f} nats ({metrics['train_loss_nats'] / math.log(2):.3f} "
        f"bits/char, mean of last {len(tail)} steps), held-out {metrics['val_bpc']:.3f} bits/char vs unigram "
        f"entropy {h_uni:.3f}; {metrics['tokens_per_s']:,.0f} tokens/s over {elapsed:.1f} s"
    )
    if rank == 0:
        gen = sample_and_time(model, args, device)
        metrics.update(gen)
        log(f"sample (temperature {args.temperature}): {gen['sample']!r}")
        log(
            f"decoding {gen['gen_tokens']} tokens: {gen['decode_tokens_per_s_state']:,.0f} tokens/s with the state vs "
            f"{gen['decode_tokens_per_s_rerun']:,.0f} tokens/s re-running the prefix "
            f"({gen['decode_tokens_per_s_state'] / gen['decode_tokens_per_s_rerun']:.1f}x); same tokens: "
            f"{gen['gen_same_tokens']}"
        )
    if rank == 0 and args.metrics_out:
        with open(args.metrics_out, "w") as f:
            json.dump(metrics, f, indent=1)
    _dist.cleanup()
    return metrics


if __name__ == "__main__":
    main()
