"""Work counts (bytes or FLOPs per case), the printed table, and the JSON + PNG written under --out.

Achieved rate = the case's work / measured time, with one work count per case (so every provider's rate is
the *effective* rate of the same job and rates compare like times):
  memory-bound (aft_local, aft_simple, aft_conv2d, ea_double_norm): bytes of the inputs read once + outputs
    written once; fwd+bwd adds dy read and the input gradients written once. For aft_local only the band of w
    that is used counts (T * min(T, 2*window - 1), causal T * window).
  compute-bound (aft_full: 4*B*T^2*D forward, half when causal; talking heads: 4*B*h*N^2*dh + 4*B*h^2*N^2):
    FLOPs, fwd+bwd = 3x forward (backward = 2x forward, NOTES 3).
Fraction of floor = achieved rate / the machine's rate measured in the same run (copy rate of a large clone for
bytes, square matmul in the benchmark dtype for FLOPs). Modules report time and memory only.
"""
from __future__ import annotations

import json
import math
import os
import re

from .shapes import Case

MEMORY_BOUND = ("aft_local", "aft_simple", "aft_conv2d", "ea_double_norm")
FLOP_BOUND = ("aft_full", "talking_heads_attention")


def work(case: Case, mode: str, es: int):
    """(kind, amount): kind "bytes" or "flops"; None for modules."""
    p = case.p
    fb = mode == "fwdbwd"
    if case.name == "aft_full":
        f = 4.0 * p["B"] * p["T"] ** 2 * p["D"] * (0.5 if p["causal"] else 1.0)
        return "flops", f * (3 if fb else 1)
    if case.name == "talking_heads_attention":
        B, h, N, dh = p["B"], p["h"], p["N"], p["dh"]
        f = 4.0 * B * h * N * N * dh + 4.0 * B * h * h * N * N
        return "flops", f * (3 if fb else 1)
    if case.name in ("aft_simple", "aft_local"):
        btd = p["B"] * p["T"] * p["D"]
        ins, outs = 3 * btd, btd
        if case.name == "aft_local":
            T, s = p["T"], p["window"]
            band = T * min(T, s) if p["causal"] else T * min(T, 2 * s - 1)
            ins += band
            if fb:
                outs += band  # dw
        if fb:
            ins, outs = ins + btd, outs + 3 * btd  # dy; dq, dk, dv
        return "bytes", float(ins + outs) * es
    if case.name == "aft_conv2d":
        hw = p["H"] * p["W"]
        big, kk, ww = p["B"] * p["D"] * hw, p["B"] * p["heads"] * hw, p["heads"] * p["s"] ** 2
        ins, outs = 2 * big + kk + ww, big
        if fb:
            ins, outs = ins + big, outs + 2 * big + kk + ww
        return "bytes", float(ins + outs) * es
    if case.name == "ea_double_norm":
        n = p["B"] * p["N"] * p["S"]
        return "bytes", float(n * (4 if fb else 2)) * es
    return None


def fmt_bytes(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f}"


def _rate_str(r):
    if r.get("rate") is None:
        return "-"
    if r["rate_unit"] == "GB/s":
        return f"{r['rate']:.1f} GB/s"
    return f"{r['rate']:.3f} TFLOP/s"


def table(results: list[dict]) -> str:
    """Plain-text table: one row per (case, mode, provider); speedup = python time / this time (same run)."""
    head = ("op / module", "shape", "mode", "provider", "median ms", "peak MiB", "achieved", "of floor", "vs python")
    rows = []
    py = {(r["case"], r["shape"], r["mode"]): r["time_s"] for r in results
          if r["provider"] == "python" and r["status"] == "ok"}
    for r in results:
        if r["status"] == "ok":
            base = py.get((r["case"], r["shape"], r["mode"]))
            rows.append((
                r["case"], r["shape"], r["mode"], r["provider"],
                f"{r['time_s'] * 1e3:.3f}", fmt_bytes(r.get("peak_bytes")), _rate_str(r),
                "-" if r.get("floor_fraction") is None else f"{100 * r['floor_fraction']:.1f}%",
                "-" if base is None else f"{base / r['time_s']:.2f}x",
            ))
        else:
            rows.append((r["case"], r["shape"], r["mode"], r["provider"], r["status"][:90], "", "", "", ""))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    # let the status text of failed rows spill over instead of widening the time column
    widths[4] = max(len(head[4]), max((len(r[4]) for r in rows if r[5] != ""), default=0))
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_json(path: str, meta: dict, results: list[dict]):
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)


def _group_key(r):
    skip = {"T", "N", "H", "W", "B"}
    return r["case"] + " " + " ".join(f"{k}={v}" for k, v in r["params"].items() if k not in skip)


def write_png(path: str, meta: dict, results: list[dict]) -> bool:
    """Time and peak memory vs sequence length, one row per op/module configuration. False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    groups = sorted({_group_key(r) for r in ok})
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 2.6 * len(groups)), squeeze=False)
    styles = {"fwd": "-", "fwdbwd": "--"}
    from .providers import PROVIDERS

    colors = {p: f"C{i}" for i, p in enumerate(PROVIDERS)}
    for row, g in zip(axes, groups):
        rs = [r for r in ok if _group_key(r) == g]
        lines = sorted({(r["provider"], r["mode"]) for r in rs})
        for prov, mode in lines:
            pts = sorted((r["x"], r["time_s"], r.get("peak_bytes")) for r in rs
                         if r["provider"] == prov and r["mode"] == mode)
            xs = [p[0] for p in pts]
            row[0].plot(xs, [p[1] * 1e3 for p in pts], styles.get(mode, "-"), marker="o", ms=3,
                        color=colors.get(prov), label=f"{prov} {mode}")
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
            if mem:
                row[1].plot([m[0] for m in mem], [max(m[1], 1e-3) for m in mem], styles.get(mode, "-"),
                            marker="o", ms=3, color=colors.get(prov), label=f"{prov} {mode}")
        row[0].set_title(g, fontsize=8)
        row[0].set_ylabel("median ms")
        row[1].set_ylabel("peak MiB")
        for ax in row:
            ax.set_xlabel("tokens (T / N / H*W)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
        row[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"attnfree_ext benchmark - {meta['device_name']} - {meta['dtype']} - {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def finite(x):
    return x is not None and math.isfinite(x)


def result_paths(out_dir: str, device_slug: str, stamp: str):
    base = os.path.join(out_dir, f"bench_{device_slug}_{stamp}")
    return base + ".json", base + ".png"
