"""Talking-heads self-attention layer (Shazeer et al. 2020, arXiv 2003.02436; the CaiT layer of Touvron et al. 2021,
arXiv 2103.17239), running :func:`attnfree_ext.talking_heads_attention` (no N x N tensor unless attention dropout
is active).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.talking_heads import talking_heads_attention
from ._validate import check_tokens, dropout_p, positive_int

__all__ = ["TalkingHeadAttention"]


class TalkingHeadAttention(nn.Module):
    """CaiT's talking-heads attention layer: x (B, N, dim) -> (B, N, dim).

    ``qkv`` = Linear(dim, 3*dim, bias=qkv_bias) -> q, k, v per head (width dim // num_heads), q scaled by
    head_dim ** -0.5 -> logits mixed over heads by ``proj_l`` (Linear(num_heads, num_heads)) -> softmax over keys ->
    mixed by ``proj_w`` (Linear(num_heads, num_heads)) -> ``attn_drop`` -> @ v -> merge heads -> ``proj``
    (Linear(dim, dim)) -> ``proj_drop``. Parameter names, creation order and default init equal timm's
    ``TalkingHeadAttn`` (so one seed gives the same weights and state_dicts load both ways).

    Memory: O(B * N * dim * num_heads) in training without attention dropout and at eval (see
    :func:`attnfree_ext.talking_heads_attention`); with ``attn_drop > 0`` in training the eager O(B * h * N^2) form
    runs (dropout acts on the mixed N x N weights).

    Raises:
        ValueError: dim % num_heads != 0, non-positive sizes, dropout outside [0, 1]; x not (B, N, dim).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}  # timm >= 1.0 passes both (its factory kwargs)
        self.dim = positive_int("dim", dim)
        self.num_heads = positive_int("num_heads", num_heads)
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.head_dim = self.dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(self.dim, self.dim * 3, bias=bool(qkv_bias), **dd)
        self.attn_drop = nn.Dropout(dropout_p("attn_drop", attn_drop))
        self.proj = nn.Linear(self.dim, self.dim, **dd)
        self.proj_l = nn.Linear(self.num_heads, self.num_heads, **dd)
        self.proj_w = nn.Linear(self.num_heads, self.num_heads, **dd)
        self.proj_drop = nn.Dropout(dropout_p("proj_drop", proj_drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim, axes=("B", "N", "dim"))
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each
        p = self.attn_drop.p if self.training else 0.0
        y = talking_heads_attention(
            q,
            k,
            v,
            self.proj_l.weight,
            self.proj_w.weight,
            self.proj_l.bias,
            self.proj_w.bias,
            scale=self.scale,
            dropout_p=p,
        )
        y = y.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(y))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
