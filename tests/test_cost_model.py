"""benchmarks/cost_model.py: one tiny op through the cost model (CUDA launcher under the emulation harness)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "emulation"))

import emu_runner  # noqa: E402

pytestmark = pytest.mark.emulation

FIELDS = (
    "op",
    "direction",
    "dtype",
    "causal",
    "bytes_counted",
    "bytes_floor",
    "special_ops",
    "mma_flops",
    "flops_floor",
    "predicted_fraction",
)


@pytest.fixture(scope="module", autouse=True)
def _harness():
    ok, why = emu_runner.available()
    if not ok:
        pytest.skip(f"emulation harness unavailable: {why}")


@pytest.mark.parametrize("op,direction,causal", [("ea_double_norm", "fwd", None), ("aft_full", "fwd", True)])
def test_cost_model_record(op, direction, causal, tmp_path):
    from benchmarks import cost_model as cm

    paper = cm.PAPER["ea" if op == "ea_double_norm" else "aft"]
    r = cm.model_case(op, direction, "fp32", causal, cm.QUICK[op], paper)
    for f in FIELDS:
        assert f in r, f
    assert r["bytes_floor"] > 0
    assert r["bytes_counted"] >= 0.5 * r["bytes_floor"]  # below: most traffic would be uncounted
    assert 0 < r["predicted_fraction"] <= 1 + 1e-9
    if op == "aft_full":
        assert r["flops_floor"] == 2 * paper["B"] * paper["T"] ** 2 * paper["D"]  # causal: half of 4*B*T^2*D
        assert r["mma_flops"] >= r["flops_floor"]
    else:
        assert r["flops_floor"] == 0 and r["mma_flops"] == 0


def test_cost_model_cli_json(tmp_path):
    import json

    from benchmarks import cost_model as cm

    p = tmp_path / "cm.json"
    recs = cm.main(["--ops", "aft_simple", "--dtypes", "bf16", "--quick", "--json", str(p)])
    d = json.loads(p.read_text())
    assert d["commit"] and len(d["records"]) == len(recs) == 4  # fwd/bwd x causal F/T
    assert {(r["direction"], r["causal"]) for r in d["records"]} == {
        (a, c) for a in ("fwd", "bwd") for c in (False, True)
    }


@pytest.mark.parametrize("op", ["aft_simple", "aft_full", "aft_full_lowrank"])
def test_fit_recovers_each_term(op):
    """A count made of the model's terms is recovered exactly at the paper shape; for AFT-full a per-(query, key)
    term (T^2, shared by every column) stays T^2 there instead of growing with B*D as a two-size fit makes it, and
    for the low-rank bias a per-row term stays T."""
    from benchmarks import cost_model as cm

    pts = cm._points(op, cm.SMALL[op])
    feats = [cm._features(op, *p) for p in pts]
    paper = cm._features(op, 8, 4096, 1024)
    coef = (3.0, 17.0, 5.0, 11.0)[: len(feats[0])]
    counts = [sum(c * f for c, f in zip(coef, fe)) for fe in feats]
    want = sum(c * f for c, f in zip(coef, paper))
    assert cm._fit(feats, counts, paper) == pytest.approx(want, rel=1e-9)
    if op != "aft_simple":
        t2 = [p[1] ** 2 for p in pts]  # a pure T^2 count (one read of w per pass)
        assert cm._fit(feats, t2, paper) == pytest.approx(4096**2, rel=1e-9)
    if op == "aft_full_lowrank":  # a pure per-row count (the factor rows of a tile) stays T
        assert cm._fit(feats, [p[1] for p in pts], paper) == pytest.approx(4096, rel=1e-9)


def test_cluster_switch_rows(monkeypatch):
    """--clusters both: an op with a cluster kernel gives a row with the switch off and one with it on (the cluster
    kernel counted: EA's forward reads the logits once, fewer bytes); one without gives a single row; the caller's
    ATTNFREE_CLUSTERS is left as it was."""
    from benchmarks import cost_model as cm

    monkeypatch.setenv("ATTNFREE_CLUSTERS", "0")
    paper = cm.PAPER["ea"]
    off, on = cm.model_switch_cases("ea_double_norm", "fwd", "bf16", None, cm.QUICK["ea_double_norm"], paper)
    assert (off["clusters"], off["cluster_kernels"], on["clusters"], on["cluster_kernels"]) == (
        False,
        False,
        True,
        True,
    )
    assert on["bytes_counted"] < off["bytes_counted"]
    assert os.environ["ATTNFREE_CLUSTERS"] == "0"
    (only,) = cm.model_switch_cases("ea_double_norm", "bwd", "bf16", None, cm.QUICK["ea_double_norm"], paper)
    assert only["clusters"] and not only["cluster_kernels"]
    txt = cm.table([off, on, only], "x", 0.0)
    cols = [ln.split()[4] for ln in txt.splitlines() if ln.startswith("ea_double_norm")]
    assert cols == ["0", "1", "-"]
