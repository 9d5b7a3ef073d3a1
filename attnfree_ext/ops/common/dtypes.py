"""The dtype rules every op shares (docs/design.md §1, §3).

* Inputs are float16, bfloat16, float32 or float64 (``FLOAT_DTYPES``).
* Math runs in the *compute dtype*: float64 for float64 inputs, float32 for everything else; outputs are rounded
  to the input dtype once, at the end. Saved statistics (lse, rowsum) stay in the compute dtype.
* Low-precision backward: the pure-PyTorch autograd Functions save the forward's output (y, out) in the compute
  dtype, unrounded, and hand it to the op's ``*_bwd_ref``; every ``*_bwd_ref`` uses the y / out it is given as it
  is (cast to the compute dtype), so a caller passing the rounded output gets that rounding in the gradient.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT_DTYPES", "LOW_PRECISION_DTYPES", "compute_dtype"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
