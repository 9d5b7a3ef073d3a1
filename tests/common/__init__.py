"""Helpers shared by the tests (no tests here): float64 oracles and eager baselines (``oracles``), error metrics
and the low-precision 2x rule (``metrics``), the paths every op test runs over (``paths``), and the re-created
public implementations the compat tests compare against (``peers``)."""
