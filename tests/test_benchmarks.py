"""benchmarks/: the --quick run completes, writes JSON + PNG, prints the table; failures become rows."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import providers, report, run, shapes  # noqa: E402


def test_quick_run_writes_json_png_and_table(tmp_path):
    # every op and module at tiny shapes; torch.compile is left to the in-process test below (compile time)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--quick",
        "--out",
        str(tmp_path),
        "--no-progress",
        "--providers",
        "python,compiled,ea-pytorch,timm,aft-pytorch,sdpa,plain",
        "--min-run-time",
        "0.005",
        "--no-memory",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "min ms" in p.stdout and "spread" in p.stdout and "provider" in p.stdout  # the table header
    assert max(len(ln) for ln in p.stdout.splitlines() if not ln.startswith("wrote ")) <= 120
    js = glob.glob(str(tmp_path / "bench_cpu-*.json"))
    pngs = glob.glob(str(tmp_path / "bench_cpu-*.png"))
    assert len(js) == 1 and len(pngs) == 1 and os.path.getsize(pngs[0]) > 1000
    data = json.load(open(js[0]))
    assert data["meta"]["preset"] == "quick" and data["meta"]["copy_rate_GBps"] > 0
    rows = data["results"]
    assert {r["case"] for r in rows} == set(shapes.ALL)
    assert {r["mode"] for r in rows} == {"fwd", "fwdbwd"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, "no provider ran"
    assert data["meta"]["repeats"] == 5 and data["meta"]["spread_flag"] == 0.2
    for r in ok:
        assert r["time_s"] > 0 and len(r["time_repeats_s"]) == 5
        assert r["time_s"] == min(r["time_repeats_s"]) <= r["time_median_s"]
        spread = (max(r["time_repeats_s"]) - r["time_s"]) / r["time_s"]
        assert abs(r["spread"] - spread) < 1e-9 and r["noisy"] == (spread > 0.2)
    # the public-code baselines need nothing but torch, so they must have run
    assert any(r["provider"] == "sdpa" and r["status"] == "ok" for r in rows)
    assert any(r["provider"] == "ea-pytorch" and r["status"] == "ok" for r in rows)
    # compiled rows are either measured or say why not
    for r in rows:
        if r["provider"] == "compiled" and r["status"] != "ok":
            assert r["status"].startswith(("unavailable", "error", "oom")), r["status"]


def test_failing_provider_is_reported_not_raised(tmp_path, monkeypatch, capsys):
    real_build = providers.build

    def build(case, provider, device, dtype):
        if provider == "sdpa":
            raise RuntimeError("injected failure")
        r = real_build(case, provider, device, dtype)
        if provider == "python":  # fails at call time, not build time

            def boom():
                raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")

            return providers.Runnable(boom, r.grad_targets)
        return r

    monkeypatch.setattr(providers, "build", build)
    meta, results, jpath, ppath = run.main(
        [
            "--quick",
            "--ops",
            "aft_simple",
            "--providers",
            "python,compiled,sdpa,torch.compile(python)",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--mode",
            "fwd",
        ]
    )
    status = {r["provider"]: r["status"] for r in results}
    assert status["sdpa"].startswith("error: RuntimeError: injected failure")
    assert status["python"] == "oom"
    assert "compiled" in status
    out = capsys.readouterr().out
    assert "injected failure" in out and "oom" in out
    assert os.path.exists(jpath)


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        run.parse_args(["--ops", "not_an_op"])
    with pytest.raises(SystemExit):
        run.parse_args(["--providers", "nope"])


def test_presets_cover_every_op_and_the_cpu_ops_table():
    assert {c.name for c in shapes.preset_cpu_default()} == set(shapes.ALL)
    assert {c.name for c in shapes.preset_gpu_paper()} == set(shapes.ALL)
    ops = shapes.preset_cpu_ops()
    assert {c.name for c in ops} == {"aft_full", "aft_local", "aft_simple", "ea_double_norm"}
    for c in ops:
        p = c.p
        assert p["B"] == 4 and c.x == 2048
        assert p.get("D", p.get("S")) == 256
        if c.name == "aft_local":
            assert p["window"] == 64


def test_work_counts():
    c = shapes.case("aft_full", B=2, T=8, D=4, causal=False)
    assert report.work(c, "fwd", 4) == ("flops", 4.0 * 2 * 64 * 4)
    assert report.work(shapes.case("aft_full", B=2, T=8, D=4, causal=True), "fwd", 4)[1] == 2.0 * 2 * 64 * 4
    assert report.work(c, "fwdbwd", 4)[1] == 3 * 4.0 * 2 * 64 * 4
    s = shapes.case("aft_simple", B=2, T=8, D=4, causal=True)
    assert report.work(s, "fwd", 4) == ("bytes", 4.0 * 2 * 8 * 4 * 4)
    assert report.work(shapes.case("mod_aft_full", B=1, T=4, dim=4, hidden_dim=4), "fwd", 4) is None


def test_external_recreations_match_the_formula():
    """The re-created public code computes the same AFT / EA as the float64 oracle (so timings compare like work)."""
    from common import oracles

    q, k, v = (torch.randn(2, 6, 4, dtype=torch.float64) for _ in range(3))
    w = 0.1 * torch.randn(6, 6, dtype=torch.float64)
    torch.testing.assert_close(providers.ea_pytorch_aft_core(q, k, v, w), oracles.aft(q, k, v, w))
    lg = torch.randn(2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(providers.ea_pytorch_double_norm(lg), oracles.ea_double_norm(lg, eps=0.0))
    qh, kh, vh = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    pw, ow, pb, ob = (
        torch.randn(3, 3, dtype=torch.float64),
        torch.randn(3, 3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    )
    torch.testing.assert_close(
        providers.timm_talking_heads_core(qh, kh, vh, pw, ow, pb, ob),
        oracles.talking_heads_attention(qh, kh, vh, pw, ow, pb, ob),
    )
