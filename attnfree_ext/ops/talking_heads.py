"""Talking-heads attention (Shazeer et al. 2020, "Talking-Heads Attention", arXiv 2003.02436, Algorithm 2; the CaiT
layer of Touvron et al. 2021, timm's ``TalkingHeadAttn``) without an N x N tensor.

The pre-softmax head mix is a dot product over all channels (NOTES §4): for mixed head j,

    sum_h Wpre[j, h] * scale * (q_h . k_h) = q'_j . K,   q'_j = concat_h(Wpre[j, h] * scale * q_h),  K = concat_h k_h

and the pre-mix bias is constant over the keys, so it cancels in the softmax. Hence each mixed head j is plain
attention of width C = h * d over the full K and V: ``O_j = softmax(q'_j K^T) V`` -- one
``F.scaled_dot_product_attention`` call (scale 1, h heads, K and V expanded, not copied) -- and the post-softmax mix
is applied to the outputs:

    out_i = sum_j Wpost[i, j] * O_j[..., head i's slice of V] + bpost[i] * sum_n v_i[n]

Exact (same math, h times the FLOPs of plain attention), memory O(B * h * N * C) forward and backward whenever
SDPA picks a fused (flash / memory-efficient) kernel, which it does for these dense, mask-free inputs.
Attention dropout after the post mix has no such form: with ``dropout_p > 0`` the eager N x N form runs.
"""
from __future__ import annotations

import numbers
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .._checks import check_same_device, check_tensor

__all__ = ["talking_heads_attention", "talking_heads_attention_eager"]


def _check(q, k, v, pre_weight, post_weight, pre_bias, post_bias, scale, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, h, N, d = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k, v must share the batch size, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] != h or v.shape[1] != h:
        raise ValueError(
            f"q, k, v must have the same number of heads h, got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}"
        )
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
    check_same_device(q=q, k=k, v=v, pre_weight=pre_weight, post_weight=post_weight,
                      pre_bias=pre_bias, post_bias=post_bias)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")


_FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
#: scores per (batch, head) materialised at once by the chunked fallback
_CHUNK_SCORES = 1 << 22


def _chunk_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def _attention_chunked(q, k, v, chunk=None):
    """softmax(q k^T) v with scale 1 over query chunks, each chunk recomputed in the backward (checkpoint), so at
    most B * h * chunk * M scores exist at once, forward or backward."""
    N, M = q.shape[2], k.shape[2]
    chunk = max(1, _CHUNK_SCORES // max(M, 1)) if chunk is None else chunk
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for i in range(0, N, chunk):
        qi = q[:, :, i:i + chunk]
        if grad:
            outs.append(checkpoint(_chunk_attention, qi, k, v, use_reentrant=False))
        else:
            outs.append(_chunk_attention(qi, k, v))
    return torch.cat(outs, dim=2)


def _attention_without_nxm(q, k, v):
    """``softmax(q k^T) v`` (scale 1) through a fused SDPA kernel (flash / memory-efficient / cuDNN: no N x M
    tensor, forward or backward). SDPA would otherwise fall back silently to its math kernel, which builds the
    N x M scores; where no fused kernel takes these inputs we chunk the queries instead."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA's "kernel X not used because ..." notes
            with sdpa_kernel(_FUSED):
                return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    except RuntimeError:
        return _attention_chunked(q, k, v)


def talking_heads_attention_eager(q, k, v, pre_weight, post_weight, pre_bias=None, post_bias=None, scale=None,
                                  dropout_p=0.0):
    """The eager O(B * h * N * N) form (timm's ``TalkingHeadAttn`` math). Used when ``dropout_p > 0``; no checks."""
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    dt = q.dtype
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, h, N, M)
    attn = torch.einsum("bhnm,gh->bgnm", attn, pre_weight.to(dt))
    if pre_bias is not None:
        attn = attn + pre_bias.to(dt)[None, :, None, None]
    attn = attn.softmax(dim=-1)
    attn = torch.einsum("bhnm,gh->bgnm", attn, post_weight.to(dt))
    if post_bias is not None:
        attn = attn + post_bias.to(dt)[None, :, None, None]
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return attn @ v


def talking_heads_attention(q, k, v, pre_weight, post_weight, pre_bias=None, post_bias=None, scale=None,
                            dropout_p=0.0):
    """Talking-heads attention: scaled logits -> mix heads -> softmax over keys -> mix heads -> dropout -> @ v.

    ``logits[h] = scale * q_h @ k_h^T``; ``L[g] = sum_h pre_weight[g, h] * logits[h] + pre_bias[g]`` (CaiT's
    ``proj_l``, a Linear over the head dimension); ``A = softmax(L, dim=-1)``;
    ``A'[i] = sum_j post_weight[i, j] * A[j] + post_bias[i]`` (``proj_w``); ``out[i] = dropout(A'[i]) @ v_i``.
    Shazeer et al. 2020 (arXiv 2003.02436) Alg. 2; Touvron et al. 2021 (CaiT, arXiv 2103.17239).

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

    Memory: with ``dropout_p == 0`` no N x M tensor is built (NOTES §4): one ``scaled_dot_product_attention`` call
    over h heads of width h * d with the mixed queries ``q'_j = concat_h pre_weight[j, h] * scale * q_h`` and the
    full K and V (expanded, not copied), then the post mix on the outputs, memory O(B * h * N * h * (d + dv)).
    ``pre_bias`` cancels in the softmax (its gradient is exactly 0; it is kept in the graph so it receives a zero
    gradient, as in the eager form). With ``dropout_p > 0`` this falls back to the eager O(B * h * N * M) form,
    because dropout on the mixed weights cannot be moved past the softmax.

    Raises:
        TypeError: non-floating tensors, mixed q/k/v dtypes, a non-numeric scale or dropout_p.
        ValueError: wrong ranks, inconsistent B / h / d / M, weights not (h, h), biases not (h,), tensors on
            different devices, dropout_p outside [0, 1].
    """
    _check(q, k, v, pre_weight, post_weight, pre_bias, post_bias, scale, dropout_p)
    dropout_p = float(dropout_p)
    if dropout_p > 0:
        return talking_heads_attention_eager(q, k, v, pre_weight, post_weight, pre_bias, post_bias, scale,
                                             dropout_p)
    B, h, N, d = q.shape
    M, dv = v.shape[2], v.shape[3]
    scale = d ** -0.5 if scale is None else float(scale)
    dt = q.dtype
    # all math in float32 for float16/bfloat16 (float64 for float64), one rounding at the end (BRIEF numerics)
    ct = torch.float64 if dt == torch.float64 else torch.float32
    wpre = pre_weight.to(ct) * scale
    qm = torch.einsum("jh,bhnd->bjnhd", wpre, q.to(ct)).reshape(B, h, N, h * d)  # q'_j
    kf = k.to(ct).permute(0, 2, 1, 3).reshape(B, 1, M, h * d)  # K, shared by every mixed head
    vf = v.to(ct).permute(0, 2, 1, 3).reshape(B, 1, M, h * dv)
    # fused SDPA kernels want one head width for q, k and v (CUDA: a multiple of 8); zero columns change nothing
    width = max(h * d, h * dv)
    if q.is_cuda:
        width = -(-width // 8) * 8
    if width != h * d:
        qm = F.pad(qm, (0, width - h * d))
        kf = F.pad(kf, (0, width - h * d))
    if width != h * dv:
        vf = F.pad(vf, (0, width - h * dv))
    # fused kernels need unit stride on the last dim (a reshape of a permuted k with d = 1 is a strided view)
    qm, kf, vf = qm.contiguous(), kf.contiguous(), vf.contiguous()
    kf = kf.expand(B, h, M, width)  # expanded, not copied
    vf = vf.expand(B, h, M, width)
    o = _attention_without_nxm(qm, kf, vf)[..., : h * dv]  # (B, h_j, N, h_i * dv)
    out = torch.einsum("ij,bjnid->bind", post_weight.to(ct), o.reshape(B, h, N, h, dv))
    if post_bias is not None:
        out = out + post_bias.to(ct)[None, :, None, None] * v.to(ct).sum(dim=2, keepdim=True)
    if pre_bias is not None and pre_bias.requires_grad:
        out = out + 0.0 * pre_bias.to(ct).sum()  # cancels in the softmax: zero gradient, like the eager form
    return out.to(dt)
