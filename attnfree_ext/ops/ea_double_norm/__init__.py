"""External attention's double normalisation (Guo et al. 2021, "Beyond Self-attention: External Attention using
Two Linear Layers for Visual Tasks", arXiv 2105.02358, eq. 5 and the official code's eps = 1e-9).

For logits ``l`` of shape (..., N, S) (N tokens, S memory units):

    p[n, s]   = softmax over n of l[:, s]           (per memory unit, over the tokens)
    out[n, s] = p[n, s] / (sum_s' p[n, s'] + eps)   (L1 over the memory units)

``reference`` holds the pure-PyTorch path, ``compiled`` the capability record and the registrations of the
compiled ops (docs/design.md §1, §6).
"""

from __future__ import annotations

import math

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.checks import check_tensor
from .compiled import CAPABILITY
from .reference import EADoubleNormFunction

__all__ = ["ea_double_norm", "CAPABILITY"]


def ea_double_norm(logits: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """External attention's double normalisation: softmax over tokens, then L1 over memory units.

    ``out = p / (sum_S p + eps)`` with ``p = softmax(logits, dim=-2)`` (Guo et al. 2021, arXiv 2105.02358, eq. 5;
    eps = 1e-9 as in the official EANet code; eps = 0 reproduces External-Attention-pytorch exactly;
    docs/design.md §1).

    Args:
        logits: (..., N, S) tensor, N tokens (dim -2), S memory units (dim -1); float16, bfloat16, float32 or
            float64, any strides (non-contiguous inputs are read as they are).
        eps: added to the per-token sum over S; a float >= 0.

    Returns:
        (..., N, S) tensor in logits' dtype, differentiable w.r.t. logits. fp16/bf16 are computed in float32.

    Raises:
        TypeError: logits is not a floating tensor, or eps is not a real number.
        ValueError: logits has fewer than 2 dimensions, or eps is negative / not finite.

    Numerics: computed in log space, finite for any finite logits (tested to |logits| = 1e4; docs/design.md §7);
    memory O(numel).
    """
    check_tensor("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must have at least 2 dimensions (..., N, S), got shape {tuple(logits.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not 0 <= eps < math.inf:  # comparisons (not math.isfinite): traceable with a symbolic eps (dynamic=True)
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    if _composite.transform_active(logits):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return _composite.ea_double_norm(logits, eps)
    if dispatch.select("ea_double_norm", logits) == "compiled":
        return torch.ops.attnfree.ea_double_norm_fwd(logits, eps)[0]
    return EADoubleNormFunction.apply(logits, eps)
