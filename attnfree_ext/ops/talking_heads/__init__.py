"""Talking-heads attention (Shazeer et al. 2020, "Talking-Heads Attention", arXiv 2003.02436, Algorithm 2; the CaiT
layer of Touvron et al. 2021, timm's ``TalkingHeadAttn``) without an N x N tensor. Python only: ``reference`` runs
it on torch's ``scaled_dot_product_attention`` (docs/design.md §4, §6).
"""

from __future__ import annotations

import math
import numbers

from ..common import composite as _composite
from ..common import dispatch
from ..common.capabilities import Capability
from ..common.checks import check_same_device, check_tensor
from .reference import talking_heads_attention_eager, talking_heads_attention_ref

__all__ = ["talking_heads_attention", "talking_heads_attention_eager", "CAPABILITY"]

CAPABILITY = dispatch.register(
    Capability(
        name="talking_heads_attention",
        python_only=True,
        note="it runs on torch's scaled_dot_product_attention with the heads mixed around it",
    )
)


def _check(q, k, v, pre_weight, post_weight, pre_bias, post_bias, scale, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, h, N, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must share the batch size, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] != h or v.shape[1] != h:
        raise ValueError(f"q, k, v must have the same number of heads h, got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    if k.shape[3] != d:
        raise ValueError(f"k must have q's head width d={d}, got shape {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many keys as k ({k.shape[2]}), got shape {tuple(v.shape)}")
    check_tensor("pre_weight", pre_weight, ndim=2)
    check_tensor("post_weight", post_weight, ndim=2)
    for name, w in (("pre_weight", pre_weight), ("post_weight", post_weight)):
        if tuple(w.shape) != (h, h):
            raise ValueError(f"{name} must have shape (h, h) = ({h}, {h}), got {tuple(w.shape)}")
    for name, b in (("pre_bias", pre_bias), ("post_bias", post_bias)):
        if b is not None:
            check_tensor(name, b, ndim=1)
            if b.shape[0] != h:
                raise ValueError(f"{name} must have shape (h,) = ({h},), got {tuple(b.shape)}")
    check_same_device(
        q=q, k=k, v=v, pre_weight=pre_weight, post_weight=post_weight, pre_bias=pre_bias, post_bias=post_bias
    )
    if d < 1:
        raise ValueError(f"q and k must have a head dim d >= 1, got shape {tuple(q.shape)}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not 0 < scale < math.inf:  # rejects NaN too; traceable with a symbolic scale (dynamic=True)
            raise ValueError(f"scale must be a finite float > 0, got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


def talking_heads_attention(q, k, v, pre_weight, post_weight, pre_bias=None, post_bias=None, scale=None, dropout_p=0.0):
    """Talking-heads attention: scaled logits -> mix heads -> softmax over keys -> mix heads -> dropout -> @ v.

    ``logits[h] = scale * q_h @ k_h^T``; ``L[g] = sum_h pre_weight[g, h] * logits[h] + pre_bias[g]`` (CaiT's
    ``proj_l``, a Linear over the head dimension); ``A = softmax(L, dim=-1)``;
    ``A'[i] = sum_j post_weight[i, j] * A[j] + post_bias[i]`` (``proj_w``); ``out[i] = dropout(A'[i]) @ v_i``.
    Shazeer et al. 2020 (arXiv 2003.02436) Alg. 2; Touvron et al. 2021 (CaiT, arXiv 2103.17239); docs/design.md §1.

    Args:
        q: (B, h, N, d); k: (B, h, M, d); v: (B, h, M, dv); one floating dtype and device.
        pre_weight, post_weight: (h, h) mixing matrices (Linear weights: out_head x in_head); any floating dtype
            (e.g. float32 parameters with bfloat16 q, k, v under autocast), cast to the compute dtype.
        pre_bias, post_bias: optional (h,) biases.
        scale: logit scale; default ``d ** -0.5``.
        dropout_p: attention dropout applied after the post mix (always applied when > 0: pass 0 at eval). The
            dropout path is the eager form in q's dtype (timm's arithmetic).

    Returns:
        (B, h, N, dv) in q's dtype, differentiable w.r.t. every tensor argument. float16/bfloat16 inputs are
        computed in float32 (the SDPA call included) and rounded once at the end; float64 stays float64.

    Memory: with ``dropout_p == 0`` no N x M tensor is built (docs/design.md §4): one
    ``scaled_dot_product_attention`` call over h heads of width h * d with the mixed queries
    ``q'_j = concat_h pre_weight[j, h] * scale * q_h`` and the full K and V (expanded, not copied), then the post
    mix on the outputs, memory O(B * h * N * h * (d + dv)).
    ``pre_bias`` cancels in the softmax (its gradient is exactly 0; it is kept in the graph so it receives a zero
    gradient, as in the eager form). With ``dropout_p > 0`` this falls back to the eager O(B * h * N * M) form,
    because dropout on the mixed weights cannot be moved past the softmax.

    Transforms: forward-mode AD (``torch.func.jvp``, dual tensors) runs the eager form. A double backward
    (``create_graph=True``) of the fused form is refused by torch ("derivative for ..._backward is not
    implemented"); call :func:`talking_heads_attention_eager` (O(N x M) memory) where one is needed.

    Raises:
        TypeError: non-floating tensors, mixed q/k/v dtypes, a non-numeric scale or dropout_p.
        ValueError: wrong ranks, inconsistent B / h / d / M, weights not (h, h), biases not (h,), tensors on
            different devices, dropout_p outside [0, 1].
    """
    _check(q, k, v, pre_weight, post_weight, pre_bias, post_bias, scale, dropout_p)
    dispatch.select("talking_heads_attention", q, k, v)  # python only: raises where 'compiled' is forced (§6.2)
    dropout_p = float(dropout_p)
    # forward mode (jvp, dual tensors): torch's fused SDPA kernels have no forward-mode formula; the eager form does
    if dropout_p > 0 or _composite.transform_active(q, k, v, pre_weight, post_weight, pre_bias, post_bias):
        return talking_heads_attention_eager(q, k, v, pre_weight, post_weight, pre_bias, post_bias, scale, dropout_p)
    return talking_heads_attention_ref(q, k, v, pre_weight, post_weight, pre_bias, post_bias, scale)
