"""Benchmarks for attnfree_ext: ``python -m benchmarks.run --help``.

Modules, one purpose each:
  shapes.py     presets: which ops/modules run at which shapes
  providers.py  the implementations compared (ours on each path, torch.compile, public code, SDPA)
  measure.py    timing (torch.utils.benchmark on CPU, triton do_bench / CUDA events on GPU), peak memory,
                the machine's copy and GEMM rates ("floors")
  report.py     work counts (bytes / FLOPs), table, JSON and PNG
  run.py        command line
"""
