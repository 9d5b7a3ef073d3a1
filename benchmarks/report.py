"""Work counts (bytes or FLOPs per case), the printed table, and the JSON + PNG written under --out.

Achieved rate = the case's work / measured time, with one work count per case (so every provider's rate is
the *effective* rate of the same job and rates compare like times):
  memory-bound (aft_local, aft_simple, aft_conv2d, ea_double_norm): bytes of the inputs read once + outputs
    written once; fwd+bwd adds dy read and the input gradients written once. For aft_local only the band of w
    that is used counts (T * min(T, 2*window - 1), causal T * window).
  compute-bound (aft_full: 4*B*T^2*D forward, half when causal; talking heads: 4*B*h*N^2*dh + 4*B*h^2*N^2):
    FLOPs, fwd+bwd = 3x forward (backward = 2x forward, docs/design.md §3).
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


TABLE_WIDTH = 120
MODE_TITLES = {"fwd": "forward", "fwdbwd": "forward + backward"}
MEM_FLOOR_MIB = 0.01  # the plot's lowest memory value (log axis; the CPU estimate is often 0)


def fmt_bytes(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f}"


def fmt_ms(t):
    ms = t * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def provider_label(r) -> str:
    """The provider's name, marked when what ran is a re-creation of the public code rather than the code itself."""
    return r["provider"] + (" (re-created)" if str(r.get("impl", "")).startswith("re-created") else "")


def comparable(r) -> bool:
    """Speed-ups and fractions of floor only for providers that compute the case's own function."""
    from .providers import OTHER_FUNCTION

    return r["provider"] not in OTHER_FUNCTION


def fmt_spread(r) -> str:
    """The spread of the repeats in percent, marked "*" when it passes measure.SPREAD_FLAG (a noisy row)."""
    sp = r.get("spread")
    if sp is None or not math.isfinite(sp):
        return "-"
    text = f"{100 * sp:.0f}%" if sp < 10 else ">999%"  # fits the column; the JSON has the value
    return text + ("*" if r.get("noisy") else "")


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def table(results: list[dict], width: int = TABLE_WIDTH) -> str:
    """Plain-text table, at most ``width`` columns: one section per case (op or module at one shape), one line per
    provider, one column group per mode. A status (unavailable, skipped, error, oom) is a numbered footnote.
    "min ms" = the fastest of the interleaved repeats; "spread" = (max - min) / min of the repeats, "*" above 20 %;
    "vs py" = the python path's min time / this min time, same run (> 1 is faster); "floor" = achieved bytes/s or
    FLOP/s against the machine's copy / matmul rate. Both only where the provider computes the case's function."""
    import textwrap

    from .measure import SPREAD_FLAG

    modes = [m for m in MODE_TITLES if any(r["mode"] == m for r in results)]
    py = {
        (r["case"], r["shape"], r["mode"]): r["time_s"]
        for r in results
        if r["provider"] == "python" and r["status"] == "ok"
    }
    notes: dict[str, int] = {}

    def note(msg):
        return f"[{notes.setdefault(msg, len(notes) + 1)}]"

    cells_w = (8, 6, 7, 6, 6)  # min ms, spread, peak MiB, of floor, vs python
    cols = ("min ms", "spread", "MiB", "floor", "vs py")
    sections: dict[tuple, dict] = {}  # (case, shape) -> provider label -> mode -> row
    for r in results:
        sections.setdefault((r["case"], r["shape"]), {}).setdefault(provider_label(r), {})[r["mode"]] = r
    pw = max(
        [len("provider")]
        + [len(p) + 7 if "(re-created)" in p else len(p) + 2 for sec in sections.values() for p in sec]
    )

    def cells(r):
        if r is None:
            return [""] * len(cells_w)
        if r["status"] != "ok":
            return [note(f"{provider_label(r)}: {r['status']}")] + [""] * (len(cells_w) - 1)
        base = py.get((r["case"], r["shape"], r["mode"]))
        ok = comparable(r)
        ff = r.get("floor_fraction")
        return [
            fmt_ms(r["time_s"]),
            fmt_spread(r),
            fmt_bytes(r.get("peak_bytes")),
            f"{100 * ff:.1f}%" if ok and ff is not None and math.isfinite(ff) else "-",
            fmt_ratio(base / r["time_s"]) if ok and base is not None and r["provider"] != "python" else "-",
        ]

    group_w = sum(cells_w) + 2 * (len(cells_w) - 1)
    head1 = " " * pw + "".join("   " + f" {MODE_TITLES[m]} ".center(group_w, "-") for m in modes)
    head2 = "provider".ljust(pw) + "".join("   " + "  ".join(c.rjust(w) for c, w in zip(cols, cells_w)) for _ in modes)
    out = [head1, head2]
    kinds = {"aft_full": "FLOPs vs matmul", "talking_heads_attention": "FLOPs vs matmul"}
    n_noisy = 0
    for (case, shape), provs in sections.items():
        kind = kinds.get(case, "bytes vs copy" if case in MEMORY_BOUND else None)
        out.append((f"{case}  {shape}" + (f"   (floor: {kind})" if kind else ""))[:width])
        for label, by_mode in provs.items():
            impl = next((str(r.get("impl")) for r in by_mode.values() if r.get("impl")), "")
            mark = f" {note(f'{label}: {impl}')}" if impl.startswith("re-created") else ""
            line = ("  " + label + mark).ljust(pw)
            for m in modes:
                r = by_mode.get(m)
                n_noisy += bool(r and r.get("status") == "ok" and r.get("noisy"))
                c = cells(r)
                line += "   " + "  ".join(x.rjust(w) for x, w in zip(c, cells_w))
            out.append(line.rstrip())
    repeats = sorted({len(r["time_repeats_s"]) for r in results if r.get("time_repeats_s")})
    legend = (
        f"min ms: the fastest of {'/'.join(map(str, repeats)) or 'the'} repeats per call, the providers of a case "
        "interleaved; spread: (max - min) / min of the repeats, "
        f"* = above {100 * SPREAD_FLAG:.0f} % ({n_noisy} noisy measurement{'s' if n_noisy != 1 else ''}); "
        "MiB: peak memory a call adds; floor: achieved bytes/s or FLOP/s against the copy / matmul rate of this "
        "machine; vs py: python path's min ms / this min ms (> 1 is faster)."
    )
    out.append("")
    out += textwrap.wrap(legend, width=width, break_on_hyphens=False)
    if notes:
        out.append("")
        for msg, n in notes.items():
            out += textwrap.wrap(
                msg, width=width, initial_indent=f"[{n}] ".ljust(5), subsequent_indent=" " * 5, break_on_hyphens=False
            )
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
    """Time and peak memory vs sequence length, one row of two panels per op/module configuration, each panel with
    its own title and legend (colour = provider, line style = mode). False when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [r for r in results if r["status"] == "ok"]
    groups = sorted({_group_key(r) for r in ok})
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 2.9 * len(groups) + 0.6), squeeze=False, layout="constrained")
    styles = {"fwd": "-", "fwdbwd": "--"}
    from .providers import PROVIDERS

    colors = {p: f"C{i}" for i, p in enumerate(PROVIDERS)}
    for row, g in zip(axes, groups):
        rs = [r for r in ok if _group_key(r) == g]
        batch = sorted({r["params"].get("B") for r in rs if r["params"].get("B") is not None})
        labels = sorted({provider_label(r) for r in rs}, key=lambda lab: PROVIDERS.index(lab.split(" (")[0]))
        xs_all = sorted({r["x"] for r in rs})
        for lab in labels:
            for mode in styles:
                pts = sorted(
                    (r["x"], r["time_s"], r.get("peak_bytes"))
                    for r in rs
                    if provider_label(r) == lab and r["mode"] == mode
                )
                if not pts:
                    continue
                color = colors.get(lab.split(" (")[0])
                row[0].plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], styles[mode], marker="o", ms=3, color=color)
                mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
                if mem:
                    row[1].plot(
                        [m[0] for m in mem],
                        [max(m[1], MEM_FLOOR_MIB) for m in mem],
                        styles[mode],
                        marker="o",
                        ms=3,
                        color=color,
                    )
        handles = [Line2D([], [], color=colors.get(lab.split(" (")[0]), marker="o", ms=3, label=lab) for lab in labels]
        handles += [
            Line2D([], [], color="0.3", ls=styles[m], label=MODE_TITLES[m])
            for m in styles
            if any(r["mode"] == m for r in rs)
        ]
        name = g.split(" ", 1)
        desc = name[0] + (f" ({name[1]})" if len(name) > 1 and name[1] else "") + (f", B={batch[0]}" if batch else "")
        if not any(r.get("peak_bytes") is not None for r in rs):
            row[1].text(0.5, 0.5, "peak memory not measured", transform=row[1].transAxes, ha="center", fontsize=8)
        for ax, what, unit in (
            (row[0], "min time", "ms per call (min of the repeats)"),
            (row[1], "peak memory", f"MiB per call (< {MEM_FLOOR_MIB} shown at {MEM_FLOOR_MIB})"),
        ):
            ax.set_title(f"{desc}: {what}", fontsize=8.5, loc="left")
            ax.set_ylabel(unit, fontsize=8)
            ax.set_xlabel("sequence length (tokens: T, N or H*W)", fontsize=7.5)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.legend(
                handles=handles,
                fontsize=6.5,
                loc="upper left",
                bbox_to_anchor=(1.01, 1.0),
                borderaxespad=0.0,
                frameon=False,
            )
    commit = (meta.get("commit") or "?")[:12]
    fig.suptitle(
        f"attnfree_ext benchmark, preset {meta.get('preset')}: {meta['device_name']}, {meta['dtype']}, "
        f"torch {meta.get('torch')}, commit {commit}, {meta['date']}",
        fontsize=9.5,
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def finite(x):
    return x is not None and math.isfinite(x)


def result_paths(out_dir: str, device_slug: str, stamp: str):
    base = os.path.join(out_dir, f"bench_{device_slug}_{stamp}")
    return base + ".json", base + ".png"
