"""AFT-simple (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103, eq. 2 with w = 0).

    y[t, c] = sigmoid(q[t, c]) * sum_t' softmax_t'(k[., c])[t'] * v[t', c]

over all keys t' (non-causal) or t' <= t (causal: the RWKV-4 "WKV" recurrence without decay). ``reference`` holds
the pure-PyTorch path, ``compiled`` the capability record and the registrations of the compiled ops
(docs/design.md §1, §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.checks import check_causal, check_qkv
from .compiled import CAPABILITY
from .reference import AFTSimpleFunction

__all__ = ["aft_simple", "CAPABILITY"]


def aft_simple(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """AFT-simple: ``y = sigmoid(q) * sum_t' softmax_t'(k) * v`` per channel (AFT eq. 2 with w = 0;
    docs/design.md §1).

    Args:
        q, k, v: (B, T, D) tensors of one dtype (float16, bfloat16, float32 or float64) and one device.
            Non-contiguous inputs are made contiguous once.
        causal: a bool; if True, row t uses keys t' <= t only (the RWKV-4 WKV recurrence without decay).

    Returns:
        y: (B, T, D) in q's dtype. Differentiable w.r.t. q, k and v. fp16/bf16 inputs are computed in float32.

    Raises:
        TypeError: a non-tensor or non-floating input, mixed dtypes, or a causal that is not a bool.
        ValueError: inputs that are not 3-D, differ in shape, or live on different devices.

    Numerics: exact softmax normalisation in log space (no split max), finite for any finite input; memory
    O(B*T*D) forward and backward (never a (B, T, T, D) tensor). See docs/design.md §1-§3.
    """
    check_qkv(q, k, v)
    check_causal(causal)
    if _composite.transform_active(q, k, v):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return _composite.aft_simple(q, k, v, causal)
    if dispatch.select("aft_simple", q, k, v) == "compiled":
        return torch.ops.attnfree.aft_simple_fwd(q, k, v, causal)[0]
    return AFTSimpleFunction.apply(q, k, v, causal)
