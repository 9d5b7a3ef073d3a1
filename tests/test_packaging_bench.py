"""The benchmark's packaging side: optional packages checked at start-up, a table that fits 120 columns with its
statuses as footnotes, the CPU default preset's lengths, and the wiring of the real peers (timm's TalkingHeadAttn,
fla's RWKV-4 kernel as causal AFT-simple) checked against references here."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import providers, report, run, shapes  # noqa: E402


def test_missing_optional_package_fails_at_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as e:
        run.main(["--quick", "--no-progress", "--out", "/nonexistent"])
    assert "matplotlib" in str(e.value) and "[bench]" in str(e.value) and "--no-plot" in str(e.value)


def _row(case, shape, provider, mode, status="ok", t=1e-3, **kw):
    return dict(case=case, shape=shape, params={}, x=1, provider=provider, mode=mode, status=status, time_s=t, **kw)


def test_table_fits_120_columns_with_footnotes():
    long = "unavailable: " + "a very long reason that used to spill across every column of the table " * 3
    rows = []
    for mode in ("fwd", "fwdbwd"):
        rows += [
            _row("talking_heads_attention", "B=2 N=576 dh=32 h=4", "python", mode, t=2e-3, floor_fraction=0.01),
            _row("talking_heads_attention", "B=2 N=576 dh=32 h=4", "compiled", mode, status=long),
            _row(
                "talking_heads_attention",
                "B=2 N=576 dh=32 h=4",
                "torch.compile(python)",
                mode,
                t=1e-3,
                floor_fraction=0.02,
            ),
            _row(
                "talking_heads_attention",
                "B=2 N=576 dh=32 h=4",
                "timm",
                mode,
                t=4e-3,
                floor_fraction=0.005,
                impl="re-created: timm not installed",
            ),
            _row("talking_heads_attention", "B=2 N=576 dh=32 h=4", "sdpa", mode, t=5e-4, floor_fraction=0.04),
            _row("aft_simple", "B=2 D=128 T=512 causal=T", "fla", mode, status=long),
        ]
    text = report.table(rows)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= 120, max(lines, key=len)
    assert "min ms" in lines[1] and "spread" in lines[1] and "provider" in lines[1]
    assert sum(ln.startswith("[1] ") for ln in lines) == 1  # one footnote for the same message
    assert "timm (re-created)" in text and "timm not installed" in text
    by = {ln.split()[0]: ln for ln in lines if ln.startswith("  ")}
    assert "2.00x" in by["torch.compile(python)"]  # python 2 ms / 1 ms
    assert "x" not in by["sdpa"].replace("sdpa", "") and "%" not in by["sdpa"]  # another function: no ratios
    assert "x" not in by["python"].replace("python", "")


def test_table_flags_rows_whose_repeats_spread_more_than_20_percent():
    from benchmarks import measure

    calm, noisy = measure.summary([1.0e-3, 1.1e-3, 1.05e-3]), measure.summary([1.0e-3, 1.5e-3, 1.2e-3])
    assert calm["time_s"] == 1.0e-3 and calm["time_median_s"] == 1.05e-3 and not calm["noisy"]
    assert abs(noisy["spread"] - 0.5) < 1e-12 and noisy["noisy"]
    rows = [
        dict(_row("aft_simple", "B=2 D=128 T=512 causal=T", "python", "fwd"), **calm),
        dict(_row("aft_simple", "B=2 D=128 T=512 causal=T", "compiled", "fwd"), **noisy),
    ]
    lines = report.table(rows).splitlines()
    by = {ln.split()[0]: ln for ln in lines if ln.startswith("  ")}
    assert "10%" in by["python"] and "*" not in by["python"]
    assert "50%*" in by["compiled"]
    legend = " ".join(lines)
    assert "(max - min) / min" in legend and "* = above 20 %" in legend and "1 noisy measurement" in legend
    assert max(len(ln) for ln in lines) <= 120
    # a huge spread or speed-up stays inside its column: every row as wide as the header
    wild = measure.summary([1.0e-3, 0.5])
    rows = [
        dict(_row("aft_simple", "B=2 D=128 T=512 causal=T", "python", "fwd"), **wild),
        dict(_row("aft_simple", "B=2 D=128 T=512 causal=T", "compiled", "fwd"), **calm, floor_fraction=1.5),
    ]
    rows[1]["time_s"] = rows[0]["time_s"] / 863.8
    lines = report.table(rows).splitlines()
    body = [ln for ln in lines if ln.startswith(("  python", "  compiled"))]
    assert ">999%*" in body[0] and "864x" in body[1]
    assert all(len(ln) <= len(lines[1]) for ln in body), "\n".join(lines[:4])


def test_interleaved_timing_takes_turns():
    from benchmarks import measure

    log = []

    def step(name):
        return lambda: log.append(name)

    steps = {"A": step("A"), "B": step("B"), "C": step("C")}
    out = measure.time_interleaved(steps, torch.device("cpu"), repeats=3, block_s=0.0)  # one call per block
    assert log == ["A", "B", "C"] + ["A", "B", "C"] * 3  # calibration, then the turns
    for name in steps:
        times, calls = out[name]
        assert len(times) == 3 and calls == 1 and all(t > 0 for t in times)


def test_interleaved_timing_drops_a_failing_provider_and_goes_on():
    from benchmarks import measure

    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("second repeat fails")

    out = measure.time_interleaved({"bad": flaky, "good": lambda: None}, torch.device("cpu"), 4, 0.0)
    assert isinstance(out["bad"], RuntimeError) and len(out["good"][0]) == 4


def test_plain_formulations_run_by_default_where_they_apply():
    from benchmarks.plain import PLAIN_APPLIES, PLAIN_PROVIDERS

    assert set(PLAIN_PROVIDERS) <= set(shapes.DEFAULT_PROVIDERS["cpu-ops"])
    for c in shapes.preset_cpu_ops():
        assert set(PLAIN_PROVIDERS) <= set(providers.providers_for(c, shapes.DEFAULT_PROVIDERS["cpu-ops"])), c
    # the CPU default: plain on every case it applies to, plain+compile (compiles per shape) at one length of each
    compiled = {}
    for c in shapes.preset_cpu_default():
        applies = set(providers.providers_for(c, shapes.DEFAULT_PROVIDERS["cpu-default"]))
        assert ("plain" in applies) == (c.name in PLAIN_APPLIES), c
        if c in shapes.CPU_DEFAULT_PLAIN_COMPILE_CASES:
            assert "plain+compile" in providers.providers_for(c)
            compiled.setdefault(c.name, set()).add(c.label)
    assert set(compiled) == set(PLAIN_APPLIES)
    assert shapes.DEFAULT_PROVIDERS["gpu-paper"] is None  # every provider that applies


def test_cpu_default_has_three_lengths_per_configuration():
    groups = {}
    for c in shapes.preset_cpu_default():
        key = (c.name, tuple((k, v) for k, v in c.params if k not in ("T", "N", "H", "W")))
        groups.setdefault(key, set()).add(c.x)
    assert {name for name, _ in groups} == set(shapes.ALL)
    for key, xs in groups.items():
        assert len(xs) >= 3, (key, xs)


def _rwkv4_reference(w, u, k, v, state):
    """flash-linear-attention's fused_recurrent_rwkv4 forward (fla/ops/rwkv4), step by step in PyTorch:
    w is the log of the decay's exponent (the kernel uses -exp(w)), u the bonus of the current token."""
    w = -torch.exp(w.float())
    alpha, beta, eps = (state[:, i, 0].to(torch.float64) for i in range(3))
    out = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t].double(), v[:, t].double()
        ukt = u.double() + kt
        tau = torch.maximum(ukt, eps)
        e1, e2 = torch.exp(eps - tau), torch.exp(ukt - tau)
        out.append((e1 * alpha + e2 * vt) / (e1 * beta + e2))
        w_eps = w.double() + eps
        eps = torch.maximum(w_eps, kt)
        e1, e2 = torch.exp(w_eps - eps), torch.exp(kt - eps)
        alpha, beta = e1 * alpha + e2 * vt, e1 * beta + e2
    return torch.stack(out, 1).to(k.dtype), None


def test_fla_rwkv4_with_zero_decay_and_bonus_is_causal_aft_simple():
    q, k, v = (torch.randn(2, 9, 5, dtype=torch.float64) for _ in range(3))
    y = providers.fla_rwkv4_as_aft_simple(_rwkv4_reference, q, k, v)
    e = torch.exp(k - k.max())
    ref = torch.sigmoid(q) * torch.cumsum(e * v, 1) / torch.cumsum(e, 1)
    torch.testing.assert_close(y, ref)


def test_fla_is_skipped_with_a_reason_on_cpu():
    c = shapes.case("aft_simple", B=1, T=8, D=4, causal=True)
    with pytest.raises(providers.Unavailable, match="CUDA only"):
        providers.build(c, "fla", torch.device("cpu"), torch.float32)
    with pytest.raises(providers.Unavailable, match="causal only"):
        providers.build(
            shapes.case("aft_simple", B=1, T=8, D=4, causal=False), "fla", torch.device("cpu"), torch.float32
        )


def test_timm_op_wiring_matches_timms_formula():
    """timm_talking_heads_op runs a TalkingHeadAttn-shaped class (here the re-creation, which has timm's
    attributes) between qkv and proj on the benchmark's own q, k, v."""
    B, h, N, dh = 2, 3, 5, 4
    q, k, v = (torch.randn(B, h, N, dh, dtype=torch.float64) for _ in range(3))
    pw, ow = torch.randn(h, h, dtype=torch.float64), torch.randn(h, h, dtype=torch.float64)
    pb, ob = torch.randn(h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    fn, targets = providers.timm_talking_heads_op(q, k, v, pw, ow, pb, ob, providers.TimmTalkingHeadAttn)
    y = fn()
    ref = providers.timm_talking_heads_core(q, k, v, pw, ow, pb, ob)
    torch.testing.assert_close(y, ref.transpose(1, 2).reshape(B, N, h * dh))
    assert all(t.requires_grad for t in targets)
    torch.autograd.grad(y.sum(), targets)


def test_timm_provider_is_labelled():
    c = shapes.case("mod_talking_heads", B=1, N=16, dim=16, num_heads=4)
    r = providers.build(c, "timm", torch.device("cpu"), torch.float32)
    cls, why = providers.timm_talking_head_attn_class()
    if cls is None:
        assert r.impl.startswith("re-created") and why in r.impl
    else:
        assert r.impl == "timm.models.cait.TalkingHeadAttn"
    assert r.fn().shape == (1, 16, 16)
