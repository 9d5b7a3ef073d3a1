"""External-attention layers (Guo et al. 2021, "Beyond Self-attention: External Attention using Two Linear Layers
for Visual Tasks", arXiv 2105.02358).

Both map ``x`` of shape (B, N, dim) to (B, N, dim) for any N >= 1 and run the double normalisation (softmax over the
N tokens, L1 over the S memory units) through :func:`attnfree_ext.ea_double_norm` (stable in log space, compiled
kernel when available).
"""

from __future__ import annotations

from torch import nn

from ..ops.ea_double_norm import ea_double_norm
from ._validate import check_tokens, dropout_p, positive_int

__all__ = ["ExternalAttention", "MultiHeadExternalAttention"]

#: eps added to the per-token sum over the memory units (the official EANet code's value)
EA_EPS = 1e-9


class ExternalAttention(nn.Module):
    """External attention (Guo et al. 2021, arXiv 2105.02358, eq. 5): ``mv(double_norm(mk(x)))``.

    Args:
        dim: channels of x.
        S: number of memory units (64 in the paper).

    Parameters: ``mk`` = Linear(dim, S, bias=False) (memory keys M_k), ``mv`` = Linear(S, dim, bias=False)
    (memory values M_v); PyTorch's default Linear init.

    Input ``x``: (B, N, dim), any N >= 1. Output: (B, N, dim). The double normalisation uses eps = 1e-9.

    Raises:
        TypeError / ValueError: non-int or non-positive dim / S; x not a (B, N, dim) tensor (names the argument).
    """

    def __init__(self, dim, S=64):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.S = positive_int("S", S)
        self.mk = nn.Linear(self.dim, self.S, bias=False)
        self.mv = nn.Linear(self.S, self.dim, bias=False)

    def forward(self, x):
        check_tokens(x, self.dim, axes=("B", "N", "dim"))
        return self.mv(ea_double_norm(self.mk(x), EA_EPS))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, S={self.S}"


class MultiHeadExternalAttention(nn.Module):
    """Multi-head external attention, the EAMLP block of Guo et al. 2021 (arXiv 2105.02358, §3.3 / Fig. 2; official
    code MenghaoGuo/EANet ``multi_head_attention_torch.py``).

    ``x (B, N, dim) -> trans_dims: Linear(dim, dim*coef) -> heads = num_heads*coef heads of width dim/num_heads
    -> linear_0: Linear(dim/num_heads, 256//coef) (memory keys, shared by all heads) -> softmax over N, L1 over the
    256//coef memory units (eps 1e-9) -> attn_drop -> linear_1: Linear(256//coef, dim/num_heads) (memory values,
    shared) -> merge heads -> proj: Linear(dim*coef, dim) -> proj_drop``.

    Args:
        dim: channels; must be divisible by num_heads.
        num_heads: heads before the coef expansion (the layer uses num_heads * coef heads).
        coef: channel expansion (4 in the paper); the memory size is 256 // coef.
        attn_drop, proj_drop: dropout after the double normalisation / after proj (official code's defaults 0).

    Parameter names equal the official code's (``trans_dims``, ``linear_0``, ``linear_1``, ``proj``; all Linear
    layers with bias), so its state_dict loads with strict=True. ``self.k`` / ``self.v`` are aliases of
    ``linear_0`` / ``linear_1`` (the shared memory-key and memory-value layers; not extra state_dict entries).

    Raises:
        ValueError: dim % num_heads != 0, 256 // coef == 0, non-positive sizes, bad dropout; x not (B, N, dim).
    """

    def __init__(self, dim, num_heads=8, coef=4, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.num_heads = positive_int("num_heads", num_heads)
        self.coef = positive_int("coef", coef)
        if self.dim % self.num_heads != 0:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if 256 // self.coef < 1:
            raise ValueError(f"coef={coef} leaves no memory units (256 // coef == 0); use coef <= 256")
        self.heads = self.num_heads * self.coef
        self.head_dim = self.dim * self.coef // self.heads
        self.S = 256 // self.coef
        self.trans_dims = nn.Linear(self.dim, self.dim * self.coef)
        self.linear_0 = nn.Linear(self.head_dim, self.S)
        self.linear_1 = nn.Linear(self.S, self.head_dim)
        self.attn_drop = nn.Dropout(dropout_p("attn_drop", attn_drop))
        self.proj = nn.Linear(self.dim * self.coef, self.dim)
        self.proj_drop = nn.Dropout(dropout_p("proj_drop", proj_drop))

    @property
    def k(self) -> nn.Linear:
        """The shared memory-key layer (``linear_0``)."""
        return self.linear_0

    @property
    def v(self) -> nn.Linear:
        """The shared memory-value layer (``linear_1``)."""
        return self.linear_1

    def forward(self, x):
        check_tokens(x, self.dim, axes=("B", "N", "dim"))
        B, N, _ = x.shape
        x = self.trans_dims(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, d)
        attn = ea_double_norm(self.linear_0(x), EA_EPS)  # (B, H, N, S)
        attn = self.attn_drop(attn)
        x = self.linear_1(attn).transpose(1, 2).reshape(B, N, self.dim * self.coef)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, coef={self.coef}, S={self.S}"
