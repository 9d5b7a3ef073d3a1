"""Talking-heads attention without an N x N tensor, pure-PyTorch path (docs/design.md §4).

The pre-softmax head mix is a dot product over all channels: for mixed head j,

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

import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ..common.dtypes import compute_dtype

__all__ = ["talking_heads_attention_ref", "talking_heads_attention_eager"]


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
        qi = q[:, :, i : i + chunk]
        if grad:
            outs.append(checkpoint(_chunk_attention, qi, k, v, use_reentrant=False))
        else:
            outs.append(_chunk_attention(qi, k, v))
    return torch.cat(outs, dim=2)


def _attention_without_nxm(q, k, v):
    """``softmax(q k^T) v`` (scale 1) through a fused SDPA kernel (flash / memory-efficient / cuDNN: no N x M
    tensor, forward or backward). SDPA would otherwise fall back silently to its math kernel, which builds the
    N x M scores; where no fused kernel takes these inputs we chunk the queries instead."""
    if torch.compiler.is_compiling():  # the compiler picks the SDPA kernel (and traces no try / warnings)
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA's "kernel X not used because ..." notes
            with sdpa_kernel(_FUSED):
                return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    except RuntimeError:
        return _attention_chunked(q, k, v)


def talking_heads_attention_eager(
    q, k, v, pre_weight, post_weight, pre_bias=None, post_bias=None, scale=None, dropout_p=0.0
):
    """The eager O(B * h * N * N) form (timm's ``TalkingHeadAttn`` math). Used when ``dropout_p > 0``; no checks."""
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else float(scale)
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


def talking_heads_attention_ref(q, k, v, pre_weight, post_weight, pre_bias=None, post_bias=None, scale=None):
    """The O(N)-memory form of checked inputs without dropout (see
    ``attnfree_ext.ops.talking_heads.talking_heads_attention``): one SDPA call over h heads of width h * d with the
    mixed queries, then the post mix on the outputs (docs/design.md §4)."""
    B, h, N, d = q.shape
    M, dv = v.shape[2], v.shape[3]
    scale = d**-0.5 if scale is None else float(scale)
    dt = q.dtype
    # all math in the compute dtype (float32 for float16/bfloat16), one rounding at the end (docs/design.md §1)
    ct = compute_dtype(dt)
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
    # docs/design.md §7 rule 2: the fused CPU kernels skip a NaN logit in their running max; a NaN (or inf) in q,
    # pre_weight or scale reaches every head of its query row, one in k every output of its batch entry, as in the
    # eager form (0 * x is 0 for finite x, NaN otherwise)
    poison = (qm * 0).sum(dim=(1, 3))[:, None, :, None] + (kf[:, :1] * 0).sum(dim=(2, 3))[:, :, None, None]
    o = o + poison
    out = torch.einsum("ij,bjnid->bind", post_weight.to(ct), o.reshape(B, h, N, h, dv))
    if post_bias is not None:
        out = out + post_bias.to(ct)[None, :, None, None] * v.to(ct).sum(dim=2, keepdim=True)
    if pre_bias is not None and pre_bias.requires_grad:
        out = out + 0.0 * pre_bias.to(ct).sum()  # cancels in the softmax: zero gradient, like the eager form
    return out.to(dt)
