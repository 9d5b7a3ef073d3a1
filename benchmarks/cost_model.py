"""Counted upper bounds on the fraction of the floor each CUDA kernel can reach on an H200 (docs/design.md §5.3).

The op launchers (csrc/<op>/<op>.cu) run on the CPU under the emulation harness (csrc/common/emulation,
tests/emulation/emu_ops.py), which counts per launch the global-memory bytes read and written through gptr<T>
(every access, not distinct bytes: a re-read that would hit L1/L2 on the GPU is counted again), the
special-function calls (sfu_total: exp, log, rcp, rsqrt, sqrt, trig, whatever the spelling; divisions are not
counted) and the MMA FLOPs (2*M*N*K per warp-level mma_sync). Each case runs at scaled-down sizes (T and 2T, and
for the dense AFT-full also 2D; T and D at least two tiles of every kernel's tiling, and multiples of them where
partial tiles would bend the fit: the dense AFT-full forward at T = 768, 1536 and B*D = 384, 768, whole tiles of
its 192 x 96 forward (and 2 x 2 clusters of them), its backward at T = 1024, 2048: whole 256 x 128 dw tiles and
clusters of four 128-key tiles; AFT-local 32-column x 8-row tiles,
scan chunks of 64 steps, B*D >= 2048 columns so the scan chunk length is the paper shapes' 64). Every count is fitted
as  count = a*X + b*Y (+ c*Z (+ d*T))  through the points (one per term) and evaluated at the paper shape:
    memory-bound ops:  X = B*T*D (elements), Y = B*D   (per-column overheads, clipped window edges)
    AFT-full (dense and low-rank):  X = B*T^2*D,  Y = B*T*D,  Z = T^2   (per-(query, key) work shared by every
        column: the row maximum of w, the w tiles of the backward, dw; with two sizes of the same B*D it was
        fitted into X and multiplied by B*D at the paper shape); low-rank also  + d*T  from a fourth size
        (B, 2T, 2D): per-row work shared by every column (factor rows, du / dvb accumulator rows), which the
        three-term fit of the small sizes had spread over X and Y
(EA: B -> M batch rows, T -> N, D -> S). ``scale`` in the output is the per-X ratio of the first two sizes (1.0 =
scales exactly as the model says; the fit absorbs the rest).

Paper shapes: AFT B=8, T=4096, D=1024 (aft_local window 64, aft_full_lowrank rank 128, one head); EA B=64, N=4096,
S=64.

Floors (docs/design.md §5.1): bytes_floor = every input read once + every output written once (lse / rowsum /
saved statistics included) at their dtypes; aft_local counts the w band (T*(2s-1), causal T*s) as read and, in the
backward, dw as written over the band only (the launcher's output; the binding zero-fills the rest).
flops_floor = 4*B*T^2*D AFT-full forward, 8*B*T^2*D backward (half of each when causal), 0 for memory-bound ops.
    t_floor  = max(bytes_floor / COPY, flops_floor / MMA[operand format])
    t_count  = max(bytes_counted / COPY, special_ops / SFU, sum over launches of mma_flops / MMA[format])
    predicted_fraction = t_floor / t_count        (bound = the resource that gives t_count)
The operand format of each launch is read off the harness: mma_flops / mma_ops = 8192 (16x16x16: fp16/bf16
operands), 4096 (16x16x8: tf32), 512 (8x8x4: fp64). The floor uses the best format of the dtype: bf16 and fp16
at the 16-bit rate (fp16 AFT-full kernels with tf32 operands therefore show <= 1/2), fp32 at the tf32 rate.
fp32 through 3xTF32 issues three tf32 mma_sync per product and the harness counts all three (mma_flops is 3x the
product's FLOPs), at the tf32 rate; its floor is at the tf32 rate too, so 3xTF32 shows as <= 1/3.

H200 rates (used as peaks):
    COPY  4.3e12 B/s    device-to-device copy, bytes read + written, measured in this workplace (design.md §5.2)
    MMA   bf16 / fp16 7.9e14 FLOP/s dense, measured in this workplace (design.md §5.2)
          tf32 3.95e14 FLOP/s: half of bf16 (the dense-spec ratio of H100/H200 datasheets, 494.7 vs 989.4)
          fp64 6.7e13 FLOP/s: H100/H200 SXM datasheet FP64 tensor core (not measured)
    SFU   16 ops/clk/SM x 132 SMs x 1.98 GHz = 4.18e12 op/s: per-SM throughput of the MUFU functions for
          compute capability 9.0, NVIDIA CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table;
          FlashAttention-3 (Shah et al. 2024, arXiv 2407.08608) quotes 3.9 T op/s for the H100 SXM.
The sm_90 thread-block cluster kernels (operand tiles or statistics shared between the CTAs of a cluster through
distributed shared memory; csrc/common/cluster.h) are opt-in through ATTNFREE_CLUSTERS=1 until a GPU run has
verified them. The modelled device is an H200, so the switch alone picks them: ``--clusters both`` (default)
counts every case with it on and, where that ran a cluster kernel, also with it off (the default path, and the
path of GPUs without clusters); table column ``cl``: 1 / 0 / - (no cluster kernel in the case).

These are upper bounds on the achievable fraction, not predictions of a measurement: the harness does not model
latency, occupancy, bank conflicts, caches (counted bytes include L1/L2 hits, which makes the memory term
pessimistic for kernels that re-read, e.g. AFT-local's band) or instruction issue limits other than the three above.

    python -m benchmarks.cost_model [--ops aft_simple,aft_full] [--dtypes bf16,fp32] [--clusters both|on|off]
                                    [--json PATH] [--out PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "emulation"))

COPY = 4.3e12
MMA = {"bf16": 7.9e14, "fp16": 7.9e14, "tf32": 3.95e14, "fp64": 6.7e13}
SFU = 16 * 132 * 1.98e9
FORMAT_BY_FLOPS_PER_MMA = {8192: "bf16", 4096: "tf32", 512: "fp64"}  # 16x16x16 (fp16 same rate), 16x16x8, 8x8x4

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
OPS = ("aft_simple", "aft_local", "aft_full", "aft_full_lowrank", "ea_double_norm")
WINDOW, RANK = 64, 128
PAPER = {"aft": dict(B=8, T=4096, D=1024), "ea": dict(B=64, T=4096, D=64)}
# scaled-down sizes: (B, T1, D); the second size is (B, 2*T1, D)
SMALL = {
    "aft_simple": (2, 128, 1024),
    "aft_local": (2, 256, 1024),
    "aft_full": (1, 768, 384),
    "aft_full_lowrank": (1, 256, 256),
    # N = 2048, 4096: the sm_90 cluster forward spreads each matrix over 2 and 4 CTAs (bf16), as at the paper shape
    "ea_double_norm": (2, 2048, 64),
}
# the backward's own sizes where its tiling differs: AFT-full's cluster backward shares operand rows between 4
# adjacent 128-key tiles, so T is a multiple of 512 (whole clusters; at T = 768 padding CTAs share less and the fit
# extrapolated 5.5 % fewer bytes than whole clusters count)
SMALL_BWD = {"aft_full": (1, 1024, 384)}
QUICK = {
    "aft_simple": (1, 32, 64),
    "aft_local": (1, 32, 64),
    "aft_full": (1, 128, 128),
    "aft_full_lowrank": (1, 128, 128),
    "ea_double_norm": (2, 32, 16),
}
COUNTS = ("bytes_read", "bytes_written", "sfu_total", "barriers", "launches")
CLUSTER_SWITCH = "ATTNFREE_CLUSTERS"  # opt-in for the sm_90 thread-block cluster kernels until a GPU verified them


def small_sizes(op, direction, quick=False):
    """The scaled-down (B, T1, D) a case is fitted from."""
    if quick:
        return QUICK[op]
    return SMALL_BWD.get(op, SMALL[op]) if direction == "bwd" else SMALL[op]


def _es(dt):
    return torch.tensor([], dtype=dt).element_size()


def _acc_es(dt):
    return 8 if dt == torch.float64 else 4


def _dense(op):
    return op in ("aft_full", "aft_full_lowrank")


def _features(op, B, T, D):
    if op == "aft_full_lowrank":
        return (B * T * T * D, B * T * D, T * T, T)
    return (B * T * T * D, B * T * D, T * T) if _dense(op) else (B * T * D, B * D)


def _points(op, sizes):
    """The scaled-down sizes a case runs at: (B, T, D) and (B, 2T, D); AFT-full also (B, T, 2D), so that its
    per-(query, key) work that no column shares (the row maximum of w, dw) is fitted apart from B*T^2*D; the
    low-rank bias also (B, 2T, 2D), for its per-row work that no column shares (the factor conversions, the
    resident factor rows and fp32 du / dvb rows of the backward's tiles, its causal diagonal tile pairs)."""
    B, T1, D = sizes
    pts = [(B, T1, D), (B, 2 * T1, D)]
    if op == "aft_full_lowrank":
        return pts + [(B, T1, 2 * D), (B, 2 * T1, 2 * D)]
    return pts + [(B, T1, 2 * D)] if _dense(op) else pts


def _fit(feats, counts, at):
    """count = sum_i a_i * feature_i through the points (as many points as features), evaluated at ``at``;
    clipped at 0 (a count that the fit extrapolates below zero is a noise term of the small sizes)."""
    a = torch.linalg.solve(
        torch.tensor(feats, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64).unsqueeze(1)
    )
    return max(0.0, float(torch.tensor(at, dtype=torch.float64) @ a.squeeze(1)))


def _inputs(op, B, T, D, dt, g):
    r = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(dt)  # noqa: E731
    if op == "ea_double_norm":
        return {"logits": r(B, T, D)}
    x = {"q": r(B, T, D), "k": r(B, T, D), "v": r(B, T, D)}
    if op in ("aft_local", "aft_full"):
        x["w"] = r(T, T)
    if op == "aft_full_lowrank":
        x["u"], x["vb"] = r(T, RANK) * 0.3, r(T, RANK) * 0.3
    return x


def _run(op, direction, B, T, D, dt, causal, clusters=False, seed=0):
    """One launcher call under the harness; returns its counters (dict). ``clusters``: the value of the
    launchers' opt-in switch for thread-block cluster kernels (ATTNFREE_CLUSTERS, csrc/common/cluster.h) during
    the call; the modelled device is an H200 (sm_90), so the switch alone decides."""
    import emu_ops

    # the CPU op that checks the inputs first would only add time here; restored for whoever runs next (a test
    # session that calls the model must keep the checks of the tests after it), as is the switch
    validate, emu_ops.VALIDATE = emu_ops.VALIDATE, False
    switch = os.environ.get(CLUSTER_SWITCH)
    os.environ[CLUSTER_SWITCH] = "1" if clusters else "0"
    try:
        return _counted(emu_ops, op, direction, B, T, D, dt, causal, seed)
    finally:
        emu_ops.VALIDATE = validate
        if switch is None:
            del os.environ[CLUSTER_SWITCH]
        else:
            os.environ[CLUSTER_SWITCH] = switch


def _counted(emu_ops, op, direction, B, T, D, dt, causal, seed):
    g = torch.Generator().manual_seed(seed)
    x = _inputs(op, B, T, D, dt, g)
    O = emu_ops.OPS
    if op == "ea_double_norm":
        fwd = lambda: O["ea_double_norm_fwd"](x["logits"], 1e-6)  # noqa: E731
    elif op == "aft_simple":
        fwd = lambda: O["aft_simple_fwd"](x["q"], x["k"], x["v"], causal)  # noqa: E731
    elif op == "aft_local":
        fwd = lambda: O["aft_local_fwd"](x["q"], x["k"], x["v"], x["w"], WINDOW, causal)  # noqa: E731
    elif op == "aft_full":
        fwd = lambda: O["aft_full_fwd"](x["q"], x["k"], x["v"], x["w"], causal)  # noqa: E731
    else:
        fwd = lambda: O["aft_full_lowrank_fwd"](x["q"], x["k"], x["v"], x["u"], x["vb"], causal)  # noqa: E731
    res = fwd()
    if direction == "bwd":
        dy = torch.randn(res[0].shape, generator=g).to(dt)
        if op == "ea_double_norm":
            O["ea_double_norm_bwd"](dy, x["logits"], *res)
        elif op == "aft_simple":
            O["aft_simple_bwd"](dy, x["q"], x["k"], x["v"], res[0], res[1], causal)
        elif op == "aft_local":
            O["aft_local_bwd"](dy, x["q"], x["k"], x["v"], x["w"], res[0], res[1], WINDOW, causal)
        elif op == "aft_full":
            O["aft_full_bwd"](dy, x["q"], x["k"], x["v"], x["w"], res[0], res[1], causal)
        else:
            O["aft_full_lowrank_bwd"](dy, x["q"], x["k"], x["v"], x["u"], x["vb"], res[0], res[1], causal)
    r = emu_ops.last_result()
    c = {k: r.counters[k] for k in COUNTS}
    c["cluster_barriers"] = r.counters.get("cluster_barriers", 0)  # > 0: a cluster kernel ran
    mma = {f: 0 for f in MMA}
    for ln in r.launches:
        lc = ln["counters"]
        if lc["mma_ops"]:
            fmt = FORMAT_BY_FLOPS_PER_MMA[lc["mma_flops"] // lc["mma_ops"]]
            mma[fmt] += lc["mma_flops"]
    c.update({f"mma_flops_{f}": v for f, v in mma.items()})
    return c


def bytes_floor(op, direction, B, T, D, dt, causal):
    """(bytes read, bytes written) of the floor: inputs read once, outputs written once, at their dtypes."""
    es, acc = _es(dt), _acc_es(dt)
    n = B * T * D
    if op == "ea_double_norm":
        stats = B * D * acc + B * T * acc  # lse (M, 1, S) + rowsum (M, N, 1)
        # fwd: logits -> out, lse, rowsum; bwd: dout, logits, out, lse, rowsum -> dlogits
        return (n * es, n * es + stats) if direction == "fwd" else (3 * n * es + stats, n * es)
    extra_in = extra_out = 0
    if op == "aft_local":
        band = T * WINDOW if causal else T * (2 * WINDOW - 1)
        extra_in = band * es
        extra_out = band * es if direction == "bwd" else 0
    elif op == "aft_full":
        extra_in = T * T * es
        extra_out = T * T * es if direction == "bwd" else 0
    elif op == "aft_full_lowrank":
        extra_in = 2 * T * RANK * es
        extra_out = 2 * T * RANK * es if direction == "bwd" else 0
    if direction == "fwd":  # q, k, v (+ w) read; y, lse written
        return 3 * n * es + extra_in, n * es + n * acc + extra_out
    # dy, q, k, v, y, lse (+ w) read; dq, dk, dv (+ dw) written
    return 5 * n * es + n * acc + extra_in, 3 * n * es + extra_out


def flops_floor(op, direction, B, T, D, causal):
    if not _dense(op):
        return 0
    f = (4 if direction == "fwd" else 8) * B * T * T * D
    return f // 2 if causal else f


def floor_format(dt):
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "tf32", "fp64": "fp64"}[dt]


def model_case(op, direction, dtname, causal, sizes, paper, clusters=False):
    dt = DTYPES[dtname]
    pts = _points(op, sizes)
    runs = [_run(op, direction, b, t, d, dt, causal, clusters) for b, t, d in pts]
    feats = [_features(op, *p) for p in pts]
    Bp, Tp, Dp = paper["B"], paper["T"], paper["D"]
    fp = _features(op, Bp, Tp, Dp)
    ext, scale = {}, {}
    for k in runs[0]:
        cs = [r[k] for r in runs]
        if k in ("launches", "cluster_barriers"):
            ext[k] = cs[1]
            continue
        ext[k] = _fit(feats, cs, fp)
        x1, x2 = feats[0][0], feats[1][0]
        scale[k] = (cs[1] / x2) / (cs[0] / x1) if cs[0] else None
    bc = ext["bytes_read"] + ext["bytes_written"]
    mma_total = sum(ext[f"mma_flops_{f}"] for f in MMA)
    bfl_r, bfl_w = bytes_floor(op, direction, Bp, Tp, Dp, dt, causal)
    bfl = bfl_r + bfl_w
    # a kernel touching global memory through raw pointers is not counted (emulation README): counted bytes
    # below the floor's reads or writes mean part of the traffic is missing and the bound is too optimistic
    undercount = [
        k for k, c, f in (("read", ext["bytes_read"], bfl_r), ("written", ext["bytes_written"], bfl_w)) if c < f
    ]
    b_eff = max(ext["bytes_read"], bfl_r) + max(ext["bytes_written"], bfl_w)
    t_mem = b_eff / COPY
    t_sfu = ext["sfu_total"] / SFU
    t_mma = sum(ext[f"mma_flops_{f}"] / MMA[f] for f in MMA)
    ffl = flops_floor(op, direction, Bp, Tp, Dp, causal)
    fmt = floor_format(dtname)
    t_floor = max(bfl / COPY, ffl / MMA[fmt])
    times = {"memory": t_mem, "sfu": t_sfu, "mma": t_mma}
    bound = max(times, key=times.get)
    t_count = times[bound]
    nout = Bp * Tp * Dp
    return {
        "op": op,
        "direction": direction,
        "dtype": dtname,
        "causal": causal,
        "clusters": clusters,
        # the switch on and a cluster kernel among the launches at every measured size
        "cluster_kernels": all(r["cluster_barriers"] > 0 for r in runs),
        "bytes_counted": int(round(bc)),
        "bytes_floor": int(bfl),
        "special_ops": int(round(ext["sfu_total"])),
        "mma_flops": int(round(mma_total)),
        "flops_floor": int(ffl),
        "predicted_fraction": (t_floor / t_count) if t_count > 0 else None,
        "bound": bound,
        "undercount": undercount,
        "bytes_read": int(round(ext["bytes_read"])),
        "bytes_written": int(round(ext["bytes_written"])),
        "bytes_floor_read": int(bfl_r),
        "bytes_for_bound": int(round(b_eff)),
        "bytes_floor_written": int(bfl_w),
        "floor_bound": "mma" if ffl / MMA[fmt] > bfl / COPY else "memory",
        "mma_flops_by_format": {f: int(round(ext[f"mma_flops_{f}"])) for f in MMA if ext[f"mma_flops_{f}"]},
        "floor_format": fmt if ffl else None,
        "t_floor_us": t_floor * 1e6,
        "t_memory_us": t_mem * 1e6,
        "t_sfu_us": t_sfu * 1e6,
        "t_mma_us": t_mma * 1e6,
        "bytes_per_elem": bc / nout,
        "bytes_floor_per_elem": bfl / nout,
        "special_per_elem": ext["sfu_total"] / nout,
        "mma_flops_per_elem": mma_total / nout,
        "barriers": int(round(ext["barriers"])),
        "launches": int(ext["launches"]),
        "shape": {"B": Bp, "T": Tp, "D": Dp} if op != "ea_double_norm" else {"B": Bp, "N": Tp, "S": Dp},
        "measured_at": [dict(zip(("B", "T", "D"), p)) for p in pts],
        "scale_check": {
            k: (round(v, 4) if v else v)
            for k, v in scale.items()
            if k in ("bytes_read", "bytes_written", "sfu_total", "mma_flops_bf16", "mma_flops_tf32")
        },
        "raw_counts": runs,
    }


def model_switch_cases(op, direction, dtname, causal, sizes, paper, clusters="both"):
    """The records of one case for the cluster switch: "off" / "on" one record with the switch so; "both" the
    switch on, and where that ran a cluster kernel also the switch off before it (the default path, and the one
    of GPUs without clusters); a case without cluster kernels gives one record either way."""
    if clusters == "off":
        return [model_case(op, direction, dtname, causal, sizes, paper, False)]
    on = model_case(op, direction, dtname, causal, sizes, paper, True)
    if clusters == "on" or not on["cluster_kernels"]:
        return [on]
    return [model_case(op, direction, dtname, causal, sizes, paper, False), on]


def cases(ops, dtypes):
    for op in ops:
        for direction in ("fwd", "bwd"):
            for dt in dtypes:
                for causal in (None,) if op == "ea_double_norm" else (False, True):
                    yield op, direction, dt, causal


def _fmt_si(x, unit=""):
    for s, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= f:
            return f"{x / f:.3g}{s}{unit}"
    return f"{x:.3g}{unit}"


def table(recs, sha, wall):
    head = (
        f"{'op':<17}{'dir':<4}{'dtype':<5}{'c':>2}{'cl':>3} {'GB cnt':>6}{'GB fl':>6}{'B/el':>7}{'Bfl/el':>7}"
        f"{'sfu/el':>7}{'TF mma':>7}{'TF fl':>6}"
        f"{'t_fl us':>8}{'t_mem':>7}{'t_sfu':>7}{'t_mma':>7}{'bound':>7}{'frac':>7}"
    )
    lines = [
        f"attnfree_ext counted upper bounds (python -m benchmarks.cost_model), commit {sha}",
        f"AFT B=8 T=4096 D=1024 (aft_local s={WINDOW}, aft_full_lowrank r={RANK}, 1 head); EA B=64 N=4096 S=64",
        head,
        "-" * len(head),
    ]
    case = lambda r: (r["op"], r["direction"], r["dtype"], r["causal"])  # noqa: E731
    with_clusters = {case(r) for r in recs if r["cluster_kernels"]}
    for r in recs:
        c = "-" if r["causal"] is None else ("T" if r["causal"] else "F")
        cl = "1" if r["cluster_kernels"] else ("0" if case(r) in with_clusters else "-")
        frac = r["predicted_fraction"]
        lines.append(
            f"{r['op']:<17}{r['direction']:<4}{r['dtype']:<5}{c:>2}{cl:>3} {r['bytes_counted'] / 1e9:>6.2f}"
            f"{r['bytes_floor'] / 1e9:>6.2f}{r['bytes_per_elem']:>7.1f}{r['bytes_floor_per_elem']:>7.1f}"
            f"{r['special_per_elem']:>7.2f}{r['mma_flops'] / 1e12:>7.2f}{r['flops_floor'] / 1e12:>6.2f}"
            f"{r['t_floor_us']:>8.1f}{r['t_memory_us']:>7.0f}{r['t_sfu_us']:>7.0f}{r['t_mma_us']:>7.0f}"
            f"{r['bound']:>7}{(f'{frac:.3f}' if frac is not None else '-'):>6}{'*' if r['undercount'] else ' '}"
        )
    lines += [
        "-" * len(head),
        "cl: 1 the sm_90 cluster kernels (ATTNFREE_CLUSTERS=1, opt-in until a GPU run verified them), 0 the same",
        "case with the switch off (the default path, and GPUs without clusters), - no cluster kernel in the case.",
        "c: causal. GB cnt / GB fl: bytes counted (read + written, every gptr access) / bytes_floor; B/el, Bfl/el,",
        "sfu/el: the same and special-function ops per output element (B*T*D); TF mma: counted MMA TFLOP (3xTF32",
        "counted as 3 MMAs); TF fl: flops_floor. t_fl = max(bytes_floor/COPY, flops_floor/MMA); t_mem = bytes/COPY,",
        "t_sfu = sfu/SFU, t_mma = sum mma/MMA[operand format] (us); frac = t_fl / max(t_mem, t_sfu, t_mma).",
        "* counted bytes read or written below the floor's: the kernel moves data through raw pointers, which the",
        "  harness does not count; t_mem then uses the floor's bytes for the missing side (JSON: undercount).",
        "Rates (H200): COPY 4.3 TB/s read+written (measured here); MMA bf16 = fp16 790 TFLOP/s (measured here), tf32",
        "395 (half of bf16, dense spec ratio), fp64 67 (datasheet); SFU 16 op/clk/SM x 132 SM x 1.98 GHz = 4.18 T op/s",
        "(CUDA C++ Programming Guide arithmetic-instruction throughput, cc 9.0; FlashAttention-3: 3.9 T/s, H100 SXM).",
        "Upper bounds, not predictions: no latency, occupancy, bank conflicts; counted bytes include L1/L2 hits (tiled",
        "re-reads), so t_mem is pessimistic for tiled kernels. Counts fitted at 2 sizes per case (AFT-full 3, low",
        f"rank 4: T^2 and T terms apart); wall {wall:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ",".join(OPS))
    ap.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16,fp16,fp32,fp64")
    ap.add_argument("--json", default=None, help="write one record per (op, direction, dtype, causal) here")
    ap.add_argument(
        "--clusters",
        choices=("both", "on", "off"),
        default="both",
        help="the sm_90 cluster kernels' switch (ATTNFREE_CLUSTERS): both = a row with it on, and one with it off "
        "where the op has cluster kernels (default)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests; counts less representative)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    a = ap.parse_args(argv)
    ops = [o for o in a.ops.split(",") if o]
    dtypes = [d for d in a.dtypes.split(",") if d]
    for o in ops:
        if o not in OPS:
            ap.error(f"unknown op {o}")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d}")
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    t0 = time.time()
    recs = []
    for op, direction, dt, causal in cases(ops, dtypes):
        sizes = small_sizes(op, direction, a.quick)
        paper = PAPER["ea" if op == "ea_double_norm" else "aft"]
        recs += model_switch_cases(op, direction, dt, causal, sizes, paper, a.clusters)
    wall = time.time() - t0
    txt = table(recs, sha, wall)
    print(txt)
    if a.out:
        with open(a.out, "w") as f:
            f.write(txt + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "commit": sha,
                    "wall_s": wall,
                    "rates": {"copy_Bps": COPY, "mma_flops": MMA, "sfu_ops": SFU},
                    "records": recs,
                },
                f,
                indent=1,
            )
    return recs


if __name__ == "__main__":
    main()
