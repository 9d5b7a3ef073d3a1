"""Plain PyTorch formulations of the ops: what people write (numerically fragile: a split max over the whole
sequence, docs/design.md §2.2), the baseline the compiled CPU kernels are held against.

Provider names: ``plain`` (eager) and ``plain+compile`` (torch.compile of the same function). Every function takes
the op's positional inputs and keywords (``make_inputs`` of providers.py) and returns y.

``python -m benchmarks.plain`` prints the compiled-op / plain ratios at the sizes of the cpu-ops preset (fp32, B=4,
T=2048, D=256, window 64, 2 threads): per candidate the minimum of --reps repeats and their spread (max - min) / min,
marked * above 20 %, candidates interleaved in one process.
"""

from __future__ import annotations

import torch

PLAIN_PROVIDERS = ("plain", "plain+compile")
PLAIN_APPLIES = ("aft_full", "aft_local", "aft_simple", "ea_double_norm")


def _split_max_gemm(q, k, v, wb):
    """sigmoid(q) * (E @ (ek * v)) / (E @ ek), E = exp(wb - rowmax), ek = exp(k - colmax)."""
    E = torch.exp(wb - wb.amax(1, keepdim=True))
    ek = torch.exp(k - k.amax(1, keepdim=True))
    return torch.sigmoid(q) * (E @ (ek * v)) / (E @ ek)


def plain_aft_full(q, k, v, w, causal=False):
    if causal:
        T = q.shape[1]
        w = w.masked_fill(torch.ones(T, T, dtype=torch.bool, device=w.device).triu(1), float("-inf"))
    return _split_max_gemm(q, k, v, w)


def plain_aft_local(q, k, v, w, window, causal=False):
    T = q.shape[1]
    idx = torch.arange(T, device=w.device)
    d = idx[:, None] - idx[None, :]
    wb = torch.where(d.abs() < window, w, torch.zeros((), dtype=w.dtype, device=w.device))
    if causal:
        wb = wb.masked_fill(d < 0, float("-inf"))
    return _split_max_gemm(q, k, v, wb)


def plain_aft_simple(q, k, v, causal=False):
    if causal:
        ek = torch.exp(k - k.amax(1, keepdim=True))
        return torch.sigmoid(q) * torch.cumsum(ek * v, 1) / torch.cumsum(ek, 1)
    return torch.sigmoid(q) * (torch.softmax(k, 1) * v).sum(1, keepdim=True)


def plain_ea_double_norm(logits, eps=1e-9):
    p = torch.softmax(logits, 1)
    return p / (p.sum(-1, keepdim=True) + eps)


PLAIN = {
    "aft_full": plain_aft_full,
    "aft_local": plain_aft_local,
    "aft_simple": plain_aft_simple,
    "ea_double_norm": plain_ea_double_norm,
}


def plain_fn(op: str, compiled: bool = False):
    f = PLAIN[op]
    return torch.compile(f) if compiled else f


# ----------------------------------------------------------------------------------------------- quick ratios
def _main():  # pragma: no cover - a measuring script
    import argparse
    import time

    import attnfree_ext
    from attnfree_ext.ops.aft_full import aft_full
    from attnfree_ext.ops.aft_local import aft_local
    from attnfree_ext.ops.aft_simple import aft_simple
    from attnfree_ext.ops.ea_double_norm import ea_double_norm

    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B, T, D = a.B, a.T, a.D

    def inputs(op):
        r = lambda *s, sc=1.0: (torch.randn(*s) * sc).requires_grad_()  # noqa: E731
        if op == "ea":
            return [r(B, T, 64)]
        qkv = [r(B, T, D) for _ in range(3)]
        return qkv + ([r(T, T, sc=0.1)] if op in ("local", "full", "full_c") else [])

    def ours(op):
        with attnfree_ext.force_backend("compiled"):
            pass
        fns = {
            "local": lambda q, k, v, w: aft_local(q, k, v, w, a.window),
            "simple_c": lambda q, k, v: aft_simple(q, k, v, causal=True),
            "simple": lambda q, k, v: aft_simple(q, k, v),
            "full": lambda q, k, v, w: aft_full(q, k, v, w),
            "full_c": lambda q, k, v, w: aft_full(q, k, v, w, causal=True),
            "ea": lambda x: ea_double_norm(x),
        }
        f = fns[op]

        def g(*xs):
            with attnfree_ext.force_backend("compiled"):
                return f(*xs)

        return g

    base = {
        "local": ("plain", lambda q, k, v, w: plain_aft_local(q, k, v, w, a.window)),
        "simple_c": ("plain", lambda q, k, v: plain_aft_simple(q, k, v, True)),
        "simple": ("plain+compile", torch.compile(plain_aft_simple)),
        "full": ("plain", plain_aft_full),
        "full_c": ("plain", lambda q, k, v, w: plain_aft_full(q, k, v, w, True)),
        "ea": ("plain+compile", torch.compile(plain_ea_double_norm)),
    }
    ops = a.only.split(",") if a.only else list(base)
    print(
        f"# {a.reps} repeats per candidate, interleaved; min = the fastest, spread = (max - min) / min, * above 20 %",
        flush=True,
    )
    for op in ops:
        xs = inputs(op)
        cands = {"ours": ours(op), base[op][0]: base[op][1]}
        for mode in ("fwd", "fwd+bwd"):
            times = {n: [] for n in cands}
            for rep in range(a.reps + 1):  # the first round warms up (torch.compile) and is not kept
                for n, f in cands.items():
                    t0 = time.perf_counter()
                    if mode == "fwd":
                        with torch.no_grad():
                            f(*xs)
                    else:
                        y = f(*xs)
                        torch.autograd.grad(y, xs, torch.ones_like(y))
                    if rep > 0:
                        times[n].append(time.perf_counter() - t0)
            best = {n: min(t) for n, t in times.items()}
            spread = {n: (max(t) - min(t)) / min(t) for n, t in times.items()}

            def cell(n, best=best, spread=spread):
                flag = "*" if spread[n] > 0.20 else " "
                return f"{best[n] * 1e3:8.1f} ms (spread {100 * spread[n]:3.0f}%{flag})"

            names = list(cands)
            print(
                f"{op:9s} {mode:8s} ours {cell('ours')}  {names[1]} {cell(names[1])}"
                f"  speed-up {best[names[1]] / best['ours']:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    _main()
