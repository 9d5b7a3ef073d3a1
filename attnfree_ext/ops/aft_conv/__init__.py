"""AFT-conv (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103, §3.2): AFT over the H*W positions
of a feature map with a per-head s x s relative 2-D bias. Python only: ``reference`` builds the dense bias and
runs ``aft_full``, which picks its own path (docs/design.md §1, §6).
"""

from __future__ import annotations

from ..common import dispatch
from ..common.capabilities import Capability
from ..common.checks import check_like, check_tensor
from .reference import aft_conv2d_ref, conv_bias

__all__ = ["aft_conv2d", "conv_bias", "CAPABILITY"]

CAPABILITY = dispatch.register(
    Capability(
        name="aft_conv2d",
        python_only=True,
        note="it builds the (heads, H*W, H*W) bias and calls aft_full, which dispatches on its own",
    )
)


def aft_conv2d(q, k, v, w):
    """AFT-conv (paper §3.2; docs/design.md §1): AFT over all H*W positions with a per-head s x s relative 2-D bias.

    Per head i (h heads, K with one channel per head):

        Y^i = sigma(Q^i) * [conv2d(e^{K^i} * V^i, e^{w^i} - 1) + sum_t' e^{K^i_t'} V^i_t']
                         / [conv2d(e^{K^i}, e^{w^i} - 1) + sum_t' e^{K^i_t'}]

    Args:
        q, v: (B, D, H, W) floating tensors (float16, bfloat16, float32, float64), one dtype and device.
        k: (B, heads, H, W): one key channel per head, shared by the D // heads channels of that head.
        w: (heads, s, s), s odd, same dtype/device as q; D % heads == 0. w[i, s//2 + dy, s//2 + dx] is the bias
           from the query at (y, x) to the key at (y + dy, x + dx) (F.conv2d cross-correlation convention);
           keys outside the s x s neighbourhood get bias 0 (not -inf), as in the paper.

    Returns:
        y: (B, D, H, W) in q's dtype; differentiable w.r.t. q, k, v and w.

    Raises:
        TypeError: non-tensor / non-floating inputs or mixed dtypes.
        ValueError: wrong ranks, even s, non-square kernel, D % heads != 0, mismatched shapes or devices.

    Implementation: builds the (heads, HW, HW) bias with a differentiable gather from w and calls ``aft_full``
    with k expanded to D channels. Memory O(heads * (H*W)^2 + B*D*H*W) — intended for feature maps of modest
    size (e.g. 32 x 32); the per-head kernel parameterisation (gamma, beta re-normalisation) belongs to the module.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_tensor("w", w, ndim=3)
    for name, t in (("k", k), ("v", v), ("w", w)):
        check_like(name, t, "q", q)
    if v.shape != q.shape:
        raise ValueError(f"v must have the shape of q {tuple(q.shape)}, got {tuple(v.shape)}")
    B, D, H, W = q.shape
    heads = k.shape[1]
    if k.shape[0] != B or tuple(k.shape[2:]) != (H, W):
        raise ValueError(f"k must have shape (B, heads, H, W) = ({B}, heads, {H}, {W}), got {tuple(k.shape)}")
    if heads < 1 or D % heads != 0:
        raise ValueError(f"k has {heads} heads but D={D} is not divisible by it (D % heads must be 0)")
    if w.shape[0] != heads:
        raise ValueError(f"w must have {heads} heads (k.shape[1]), got shape {tuple(w.shape)}")
    s = w.shape[1]
    if w.shape[2] != s:
        raise ValueError(f"w must be (heads, s, s) with a square kernel, got {tuple(w.shape)}")
    if s % 2 == 0:
        raise ValueError(f"w's kernel size s must be odd, got {s}")
    return aft_conv2d_ref(q, k, v, w)
