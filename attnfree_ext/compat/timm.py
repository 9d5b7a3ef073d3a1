"""Drop-in replacement for timm's CaiT ``TalkingHeadAttn`` (``timm.models.cait.TalkingHeadAttn``).

Same constructor signature as timm 1.0.31 ``(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.,
device=None, dtype=None)``, same parameter
names and state_dict keys (``qkv``, ``proj``, ``proj_l``, ``proj_w``), same creation order and default init, and
the same outputs (up to float rounding).
"""

from __future__ import annotations

from ..nn.talking_heads import TalkingHeadAttention

__all__ = ["TalkingHeadAttn"]


class TalkingHeadAttn(TalkingHeadAttention):
    """timm ``TalkingHeadAttn(dim, num_heads=8, qkv_bias=False, attn_drop=0., proj_drop=0.)`` (Touvron et al. 2021,
    CaiT, arXiv 2103.17239; talking heads of Shazeer et al. 2020, arXiv 2003.02436).

    x (B, N, dim) -> (B, N, dim). Parameters: ``qkv`` Linear(dim, 3*dim, bias=qkv_bias), ``proj`` Linear(dim, dim),
    ``proj_l`` / ``proj_w`` Linear(num_heads, num_heads); ``attn_drop`` / ``proj_drop`` Dropout modules.

    Differences from timm's:

    - Without attention dropout (eval, or ``attn_drop == 0``) no (B, h, N, N) tensor is built: the exact
      O(N)-memory form of :func:`attnfree_ext.talking_heads_attention` on top of ``scaled_dot_product_attention``
      (h times the FLOPs of plain attention). Training with ``attn_drop > 0`` runs the eager form, as timm's.
    - ``dim % num_heads != 0`` raises ValueError at construction (timm fails later, in forward's reshape); inputs
      other than (B, N, dim) raise ValueError.
    - ``proj_l.bias`` cancels in the softmax in both; ours gives it an exact zero gradient (timm's is ~1e-17).
    """
