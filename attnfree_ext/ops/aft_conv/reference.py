"""AFT-conv, pure-PyTorch path (docs/design.md §1): the (heads, H*W, H*W) bias built from the s x s kernel, then
``aft_full``.

Per head i (h heads, K with one channel per head):

    Y^i = sigma(Q^i) * [conv2d(e^{K^i} * V^i, e^{w^i} - 1) + sum_t' e^{K^i_t'} V^i_t']
                     / [conv2d(e^{K^i}, e^{w^i} - 1) + sum_t' e^{K^i_t'}]

which is AFT (eq. 2) over all H*W keys with the bias w' = w inside the s x s neighbourhood and 0 elsewhere
(F.conv2d cross-correlation convention, zero padding s // 2: w[i, s//2 + dy, s//2 + dx] is the bias from the query at
(y, x) to the key at (y + dy, x + dx)).
"""

from __future__ import annotations

import torch

from ..aft_full import aft_full

__all__ = ["conv_bias", "aft_conv2d_ref"]


def conv_bias(w: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Expand a (heads, s, s) kernel into the (heads, H*W, H*W) AFT bias (differentiable index gather).

    bias[i, (y, x), (y + dy, x + dx)] = w[i, s//2 + dy, s//2 + dx] for |dy|, |dx| <= s//2, else 0.
    """
    heads, s, _ = w.shape
    r = s // 2
    dev = w.device
    ys = torch.arange(height, device=dev).repeat_interleave(width)
    xs = torch.arange(width, device=dev).repeat(height)
    dy = ys[None, :] - ys[:, None]  # key minus query
    dx = xs[None, :] - xs[:, None]
    inside = (dy.abs() <= r) & (dx.abs() <= r)
    flat = (dy + r).clamp(0, s - 1) * s + (dx + r).clamp(0, s - 1)  # (HW, HW) index into w[i].flatten()
    # (heads, HW, HW); index_select's backward accumulates into w (and Inductor lowers it, unlike w[:, flat])
    wb = w.reshape(heads, s * s).index_select(1, flat.flatten()).reshape(heads, *flat.shape)
    return wb.masked_fill(~inside[None], 0.0)


def aft_conv2d_ref(q, k, v, w):
    """AFT-conv of checked inputs (see ``attnfree_ext.ops.aft_conv.aft_conv2d``): builds the (heads, HW, HW) bias
    with a differentiable gather from w and calls ``aft_full`` (which dispatches on its own) with k expanded to
    the D channels of its head."""
    B, D, H, W = q.shape
    heads = k.shape[1]
    bias = conv_bias(w, H, W)
    qt = q.flatten(2).transpose(1, 2)  # (B, T, D)
    vt = v.flatten(2).transpose(1, 2)
    kt = k.flatten(2).transpose(1, 2).repeat_interleave(D // heads, dim=2)  # (B, T, D)
    y = aft_full(qt, kt, vt, bias, False)
    return y.transpose(1, 2).reshape(B, D, H, W)
