"""Helpers shared by the tests (no tests here): float64 oracles and eager baselines (``oracles``), error metrics
and the low-precision 2x rule (``metrics``), and the paths every op test runs over (``paths``). The re-created
public implementations the compat tests and the benchmark compare against live in benchmarks/peers.py."""
