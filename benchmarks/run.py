"""Benchmark every attnfree_ext op and module against the implementations people use today.

    python -m benchmarks.run                      # best device present: cpu-default on CPU, gpu-paper on CUDA
    python -m benchmarks.run --preset cpu-ops     # compiled vs python, fp32 B=4 T=2048 D=256 window 64, 2 threads
    python -m benchmarks.run --ops aft_full,aft_local --providers python,compiled --mode fwd
    python -m benchmarks.run --quick --out /tmp/bench   # tiny shapes (tests)

Prints a table at the end and writes bench_<device>_<date>.json / .png under --out (default benchmarks/results).
A provider that is unavailable, fails or runs out of memory is reported in its row; the run goes on.
Needs tqdm (progress bar; or --no-progress) and matplotlib (plot; or --no-plot): the [bench] extra,
pip install -e ".[bench]" or ./dev bench. Both are checked at start-up.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import platform
import subprocess
import sys
import time

import torch

from . import measure, providers, report, shapes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    ap.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: float32 (cpu presets), bfloat16 (gpu-paper)"
    )
    ap.add_argument(
        "--preset", default=None, choices=sorted(shapes.PRESETS), help="default: cpu-default on CPU, gpu-paper on CUDA"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes and short timing (same as --preset quick)")
    ap.add_argument(
        "--ops", default=None, help=f"comma-separated subset of: {','.join(shapes.ALL)} (default: all in the preset)"
    )
    ap.add_argument(
        "--providers",
        default=None,
        help=f"comma-separated subset of: {','.join(providers.PROVIDERS)} (default: all that apply; "
        "cpu-default runs torch.compile(python) and plain+compile on a few cases only, cpu-ops runs "
        "python,compiled,plain,plain+compile)",
    )
    ap.add_argument("--mode", default="both", choices=("fwd", "fwdbwd", "both"))
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: 2 for cpu-ops, else torch's default)"
    )
    ap.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        help="seconds of timed calls per measurement, split into --repeats blocks; default 0.1, quick 0.02",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed blocks per measurement, the providers of a case taking turns (default 5); the table shows "
        "their minimum and spread",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--no-plot", action="store_true", help="no PNG (table and JSON only)")
    args = ap.parse_args(argv)
    for name, valid in ((args.ops, shapes.ALL), (args.providers, providers.PROVIDERS)):
        if name:
            bad = [x for x in name.split(",") if x not in valid]
            if bad:
                ap.error(f"unknown name(s) {bad}; choose from {', '.join(valid)}")
    return args


def check_optional_packages(args) -> None:
    """Fail at start-up, not after the run, when a package the options need is missing."""
    need = []
    if not args.no_progress:
        need.append(("tqdm", "the progress bar", "--no-progress"))
    if not args.no_plot:
        need.append(("matplotlib", "the plot", "--no-plot"))
    missing = []
    for mod, what, flag in need:
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(f"{mod} (for {what}; or pass {flag})")
    if missing:
        raise SystemExit(
            "python -m benchmarks.run: missing " + ", ".join(missing) + ". Install the [bench] extra: "
            'pip install --no-build-isolation -e ".[bench]"  (or run ./dev bench, which sets it all up)'
        )


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def busy_warning(dev: torch.device, own: float) -> str | None:
    """On CPU, other processes on the cores make every timing unreliable (a descheduled OpenMP thread stalls each
    parallel region): say so. ``own``: this run's share of the load average (its threads, at the end)."""
    load, cores = _load_average(), os.cpu_count() or 1
    if dev.type != "cpu" or load is None or load - own <= 0.5 * cores:
        return None
    return (
        f"the machine is busy (1-minute load average {load:.1f} on {cores} cores): other processes compete for "
        "the cores and the CPU timings below are unreliable; rerun on an idle machine"
    )


def say(text: str) -> None:
    """A "# " comment line of the output, wrapped to the table's width."""
    import textwrap

    w = report.TABLE_WIDTH
    print("\n".join(textwrap.wrap(text, w, initial_indent="# ", subsequent_indent="#   ", break_long_words=False)))
    sys.stdout.flush()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def _error_status(e: BaseException, limit: int = 300) -> str:
    return "oom" if measure.is_oom(e) else f"error: {type(e).__name__}: {e}".replace("\n", " ")[:limit]


def _add_rate(row, case, mode, es):
    w = report.work(case, mode, es)
    if w is None:
        return
    kind, amount = w
    t = row["time_s"]
    if kind == "bytes":
        row.update(rate=amount / t / 1e9, rate_unit="GB/s", floor_fraction=amount / t / timing_floor["bytes"])
    else:
        row.update(rate=amount / t / 1e12, rate_unit="TFLOP/s", floor_fraction=amount / t / timing_floor["flops"])
    row["work"] = {kind: amount}


def run_case(case, provs, modes, dev, dtype, args, timing, results, bar):
    """Measure every provider of one case in each mode, the providers interleaved (measure.time_interleaved);
    every failure becomes a row, never an exception. Rows are appended per provider, then per mode."""
    es = torch.empty((), dtype=dtype).element_size()
    base = {p: dict(case=case.name, shape=case.label, params=case.p, x=case.x, provider=p) for p in provs}
    rows = {p: {} for p in provs}  # provider -> mode -> row
    runs = {}
    for prov in provs:
        try:
            torch.manual_seed(0)
            run = providers.build(case, prov, dev, dtype)
            if run.impl:
                base[prov]["impl"] = run.impl
            runs[prov] = run
        except providers.Unavailable as e:
            msg = str(e)
            status = (
                msg if msg.split(":")[0] in ("unavailable", "skip", "n/a", "oom (predicted)") else f"unavailable: {msg}"
            )
            rows[prov] = {m: dict(base[prov], mode=m, status=status) for m in modes}
        except Exception as e:  # noqa: BLE001 - a provider's failure is a result, not a crash
            status = _error_status(e, limit=10**6)
            rows[prov] = {m: dict(base[prov], mode=m, status=status) for m in modes}
    block_s = timing / args.repeats
    for mode in modes:
        steps, slow = {}, set()
        for prov, run in runs.items():
            row = rows[prov][mode] = dict(base[prov], mode=mode)
            try:
                step = measure.make_step(run, mode)
                t0 = time.perf_counter()
                step()  # warm-up (and torch.compile's compile)
                measure.sync(dev)
                row["first_call_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                row["peak_bytes"] = None if args.no_memory else measure.peak_memory(step, dev)  # before the timing
                if min(row["first_call_s"], time.perf_counter() - t0) >= block_s:
                    slow.add(prov)  # one call per block: no calibration call needed
                steps[prov] = step
            except Exception as e:  # noqa: BLE001
                row["status"] = _error_status(e)
        timed = measure.time_interleaved(steps, dev, args.repeats, block_s, frozenset(slow)) if steps else {}
        for prov, r in timed.items():
            row = rows[prov][mode]
            if isinstance(r, Exception):
                row["status"] = _error_status(r)
                continue
            times, calls = r
            row.update(status="ok", **measure.summary(times), calls_per_repeat=calls)
            _add_rate(row, case, mode, es)
        steps = timed = None
        gc.collect()
        gc.freeze()  # what survived (e.g. torch.compile's caches) is not scanned again
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        bar.update(len(provs))
    for prov in provs:
        results += [rows[prov][m] for m in modes]


timing_floor = {"bytes": float("nan"), "flops": float("nan")}


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def source_commit() -> str | None:
    """The commit measured: $ATTNFREE_COMMIT when set (a copy without .git, e.g. on a lent GPU machine), else
    ``git rev-parse HEAD`` of this checkout (suffixed "+dirty" when it has uncommitted changes)."""
    if os.environ.get("ATTNFREE_COMMIT"):
        return os.environ["ATTNFREE_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv=None):
    args = parse_args(argv)
    check_optional_packages(args)
    dev = pick_device(args.device)
    if dev.type == "cpu":
        measure.release_freed_memory_to_os()
    preset = "quick" if args.quick else (args.preset or ("gpu-paper" if dev.type == "cuda" else "cpu-default"))
    dtype = DTYPES[args.dtype or ("bfloat16" if preset == "gpu-paper" else "float32")]
    threads = args.threads or (2 if preset == "cpu-ops" else None)
    if threads:
        torch.set_num_threads(threads)
    quick = preset == "quick"
    timing = args.min_run_time or (0.02 if quick else 0.1)
    if args.repeats < 2:
        raise SystemExit("--repeats must be at least 2 (a spread needs two repeats)")

    # torch.compile keeps at most recompile_limit graphs per function (then runs it eagerly, which would time the
    # eager code under a compiled provider's name); a run compiles one function at many shapes, modes and flags
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))

    cases = shapes.PRESETS[preset]()
    extra = {}  # case -> providers added to the preset's defaults for that case
    if not args.providers and preset == "cpu-default":
        extra = {c: ("torch.compile(python)",) for c in shapes.CPU_DEFAULT_COMPILE_CASES}
        for c in shapes.CPU_DEFAULT_PLAIN_COMPILE_CASES:
            extra[c] = extra.get(c, ()) + ("plain+compile",)
    if not args.providers and shapes.DEFAULT_PROVIDERS[preset]:
        args.providers = ",".join(shapes.DEFAULT_PROVIDERS[preset])
    if args.ops:
        cases = [c for c in cases if c.name in args.ops.split(",")]
    wanted = args.providers.split(",") if args.providers else None
    modes = ["fwd", "fwdbwd"] if args.mode == "both" else [args.mode]

    # the machine's own limits, measured in this run
    nbytes = (1 << 30) if dev.type == "cuda" else ((16 << 20) if quick else (256 << 20))
    n = 8192 if dev.type == "cuda" else (256 if quick else 2048)
    timing_floor["bytes"] = measure.copy_rate(dev, nbytes)
    try:
        timing_floor["flops"] = measure.gemm_rate(dev, dtype, n)
    except Exception:  # noqa: BLE001 - e.g. a dtype without a matmul kernel on this device
        timing_floor["flops"] = measure.gemm_rate(dev, torch.float32, n)

    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(
        preset=preset,
        device=str(dev),
        device_name=device_name(dev),
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        commit=source_commit(),
        python=sys.version.split()[0],
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        argv=sys.argv[1:] if argv is None else list(argv),
        repeats=args.repeats,
        seconds_per_measurement=timing,
        spread="(max - min) / min of the repeats; rows above spread_flag are marked noisy",
        spread_flag=measure.SPREAD_FLAG,
        copy_rate_GBps=timing_floor["bytes"] / 1e9,
        gemm_rate_TFLOPs=timing_floor["flops"] / 1e12,
        reference_h100=dict(copy_TBps=3.0, bf16_gemm_TFLOPs=800),
        load_average_start=_load_average(),
        cpu_count=os.cpu_count(),
        compiled_available={
            op: providers.compiled_status(op, dev) or "yes" for op in sorted(set(providers.COMPILED_OP.values()))
        },
    )
    say(
        f"{meta['device_name']}, {meta['dtype']}, preset {preset}, torch {torch.__version__}, "
        f"CUDA {meta['cuda']}, commit {meta['commit']}"
    )
    say(
        f"measured floors: copy {meta['copy_rate_GBps']:.1f} GB/s (read+write), "
        f"matmul {meta['gemm_rate_TFLOPs']:.3f} TFLOP/s ({meta['dtype']})"
    )
    busy = busy_warning(dev, own=0.5)
    if busy:
        say(f"WARNING: {busy}")
        meta["busy_warning"] = busy

    # a full gc.collect() scans every object torch and the libraries keep (~0.2 s each, twice per measurement):
    # import what the providers use, then freeze those objects out of the collector's scans
    for mod in ("attnfree_ext", "attnfree_ext.compat", "aft_pytorch"):
        try:
            importlib.import_module(mod)
        except Exception:  # noqa: BLE001 - a missing peer is reported in its rows
            pass
    gc.collect()
    gc.freeze()

    tasks = [
        (c, providers.providers_for(c, None if wanted is None else wanted + list(extra.get(c, ())))) for c in cases
    ]
    tasks = [(c, ps) for c, ps in tasks if ps]
    total = sum(len(ps) for _, ps in tasks) * len(modes)
    if args.no_progress:
        bar = _NoBar()
    else:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="benchmark", unit="meas", file=sys.stderr, dynamic_ncols=True)
    results: list[dict] = []
    t_start = time.perf_counter()
    for case, provs in tasks:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{case.name} {case.label}"[:60])
        run_case(case, provs, modes, dev, dtype, args, timing, results, bar)
    bar.close()
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_average_end"] = _load_average()
    busy_end = busy_warning(dev, own=torch.get_num_threads())
    if busy_end:
        say(f"WARNING (end of run): {busy_end}")
        meta["busy_warning_end"] = busy_end

    print()
    print(report.table(results))
    os.makedirs(args.out, exist_ok=True)
    dslug = report.slug(torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{torch.get_num_threads()}t")
    jpath, ppath = report.result_paths(args.out, dslug, now.strftime("%Y%m%d-%H%M%S"))
    report.write_json(jpath, meta, results)
    wrote_png = False if args.no_plot else report.write_png(ppath, meta, results)
    print(
        f"\nwrote {jpath}"
        + (f"\nwrote {ppath}" if wrote_png else " (--no-plot)" if args.no_plot else " (no successful rows: no plot)")
    )
    say(f"{len(results)} measurements in {meta['wall_s']:.1f} s")
    return meta, results, jpath, (ppath if wrote_png else None)


if __name__ == "__main__":
    main()
