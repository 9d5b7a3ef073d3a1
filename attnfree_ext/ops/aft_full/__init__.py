"""AFT-full (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103, eq. 2).

    y[b, t, c] = sigmoid(q[b, t, c]) * sum_t' exp(k[b, t', c] + w[t, t']) v[b, t', c]
                                     / sum_t' exp(k[b, t', c] + w[t, t'])

(causal: sums over t' <= t), and the same operator with a factorised bias w = u @ vb^T (``aft_full_lowrank``).
``reference`` holds the pure-PyTorch path, ``compiled`` the capability records and the registrations of the
compiled ops (docs/design.md §1, §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.checks import check_bias, check_causal, check_factors, check_qkv
from .compiled import CAPABILITY, LOWRANK_CAPABILITY
from .reference import AFTFullFunction, aft_full_fwd_traceable

__all__ = ["aft_full", "aft_full_lowrank", "CAPABILITY", "LOWRANK_CAPABILITY"]


def aft_full(q, k, v, w, causal: bool = False):
    """AFT-full (Zhai et al. 2021, arXiv 2105.14103, eq. 2; docs/design.md §1).

        y[b, t, c] = sigmoid(q[b, t, c]) * sum_t' softmax_t'(k[b, t', c] + w[t, t']) v[b, t', c]

    Args:
        q, k, v: (B, T, D) tensors of one floating dtype (float16, bfloat16, float32, float64) on one device.
        w: pairwise position bias, (T, T) or (heads, T, T) with D % heads == 0 (channel c uses head
            c // (D // heads)); same dtype and device as q.
        causal: a bool; if True, query t only sees keys t' <= t (autoregressive AFT, paper §4.1).

    Returns:
        y: (B, T, D) in q's dtype. Differentiable w.r.t. q, k, v and w.

    Raises:
        TypeError: a non-tensor or non-floating input, mixed dtypes of q/k/v, w's dtype differing from q's, or a
            causal that is not a bool.
        ValueError: wrong ranks/shapes, D % heads != 0, or inputs on different devices.

    Numerics: math in float32 (float64 for float64 inputs), a numerically stable tile-wise algorithm
    (docs/design.md §2) that stays finite and accurate for |k|, |w| up to 1e4 and for a causal "late spike" key;
    memory O(T^2 + B*T*D), never a (B, T, T, D) tensor. Dispatches to the compiled extension when it can run the
    inputs (docs/design.md §6; ``ATTNFREE_AFT_FULL_KERNEL=auto|tiled|exact`` picks its algorithm).
    """
    check_qkv(q, k, v)
    check_bias(w, q)
    check_causal(causal)
    if _composite.transform_active(q, k, v, w):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return _composite.aft_full(q, k, v, w, causal)
    if dispatch.select("aft_full", q, k, v, w) == "compiled":
        return torch.ops.attnfree.aft_full_fwd(q, k, v, w, causal)[0]
    if torch.compiler.is_compiling():  # the data-dependent tile loop as one opaque op (fullgraph, export)
        return aft_full_fwd_traceable(q, k, v, w, causal)[0].to(q.dtype)
    return AFTFullFunction.apply(q, k, v, w, causal)


def aft_full_lowrank(q, k, v, u, vb, causal: bool = False):
    """AFT-full with a factorised bias w = u @ vb^T (paper §3.1, "factorized" position bias; docs/design.md §1).
    Private API (used by ``attnfree_ext.nn.AFTFull(bias_rank=...)``).

    Args:
        q, k, v: (B, T, D) as in ``aft_full``.
        u, vb: (T, rank) or (heads, T, rank) each (same shape), D % heads == 0; dtype/device of q.
        causal: a bool, as in ``aft_full``.

    Returns: y (B, T, D) in q's dtype, differentiable w.r.t. q, k, v, u, vb.

    Raises: TypeError / ValueError as ``aft_full`` (naming ``u`` / ``vb``).

    The compiled (CUDA) path never builds w; the python path forms w = u @ vb^T (O(T^2) memory) and calls
    ``aft_full``.
    """
    check_qkv(q, k, v)
    check_factors(u, vb, q)
    check_causal(causal)
    if _composite.transform_active(q, k, v, u, vb):
        return _composite.aft_full(q, k, v, u @ vb.transpose(-1, -2), causal)
    if dispatch.select("aft_full_lowrank", q, k, v, u, vb) == "compiled":
        return torch.ops.attnfree.aft_full_lowrank_fwd(q, k, v, u, vb, causal)[0]
    w = u @ vb.transpose(-1, -2)
    return aft_full(q, k, v, w, causal)
