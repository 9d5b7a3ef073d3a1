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
from ..common.checks import check_bias, check_causal, check_factors, check_like, check_qkv, check_tensor
from ..common.features import python_only_reasons, require_python
from ..common.rect import aft_rows, check_chunk, check_chunk_bias, chunk_mask, is_chunk
from ..common.varlen import check_varlen_bias, packing
from .compiled import CAPABILITY, LOWRANK_CAPABILITY
from .reference import AFTFullFunction, aft_full_fwd_traceable

__all__ = ["aft_full", "aft_full_lowrank", "CAPABILITY", "LOWRANK_CAPABILITY"]


def aft_full(q, k, v, w, causal: bool = False, *, cu_seqlens=None, max_seqlen=None):
    """AFT-full (Zhai et al. 2021, arXiv 2105.14103, eq. 2; docs/design.md §1).

        y[b, t, c] = sigmoid(q[b, t, c]) * sum_t' softmax_t'(k[b, t', c] + w[t, t']) v[b, t', c]

    Args:
        q, k, v: (B, T, D) tensors of one floating dtype (float16, bfloat16, float32, float64) on one device.
        w: pairwise position bias, (T, T) or (heads, T, T) with D % heads == 0 (channel c uses head
            c // (D // heads)); same dtype and device as q.
        causal: a bool; if True, query t only sees keys t' <= t (autoregressive AFT, paper §4.1).
        cu_seqlens: None, or int32/int64 (N + 1,) offsets of N packed sequences (flash-attention's varlen
            convention): q, k, v are (1, total_T, D), sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1] and sees
            no other one; w covers the longest sequence, (L, L) or (heads, L, L) with L >= T_max, and every
            sequence uses w[..., :len, :len] (positions restart at 0; docs/design.md §9.3). Runs as one padded
            batch (N, T_max, D) on whichever path is selected (compiled kernels included), padding keys -inf.
        max_seqlen: None, or an int >= the longest packed sequence (only with ``cu_seqlens``): the padded length
            T_max, so nothing is read back from the device (no host sync; no torch.compile graph break); w must
            cover it. Checked against CPU offsets; on CUDA it is trusted.

    Decoding chunk (causal only; docs/design.md §9.2): q may have fewer rows than k and v, q (B, L, D) and k, v
    (B, S, D) with S > L, the keys so far (a cache) followed by the chunk's own. Query i sits at position
    S - L + i and sees keys j <= S - L + i; w is then the bias rows of the chunk's positions, (L, S) or
    (heads, L, S) (w[..., S - L + i, :S] of the full bias). Runs on the pure-PyTorch path, per element.

    Returns:
        y: (B, T, D) in q's dtype (a chunk: (B, L, D)). Differentiable w.r.t. q, k, v and w.

    Raises:
        TypeError: a non-tensor or non-floating input, mixed dtypes of q/k/v, w's dtype differing from q's, or a
            causal that is not a bool.
        ValueError: wrong ranks/shapes, D % heads != 0, or inputs on different devices; a chunk (S > L) with
            causal=False; a bad cu_seqlens (not (N + 1,), not from 0, decreasing, not ending at total_T) or packed
            inputs whose batch is not 1; a max_seqlen < 0, smaller than the longest sequence (CPU offsets) or without
            cu_seqlens. TypeError for a cu_seqlens that is not int32/int64 or a max_seqlen that is not an int.
        RuntimeError: backend "compiled" forced for a chunk (Python path only).

    Numerics: math in float32 (float64 for float64 inputs), a numerically stable tile-wise algorithm
    (docs/design.md §2) that stays finite and accurate for |k|, |w| up to 1e4 and for a causal "late spike" key;
    memory O(T^2 + B*T*D), never a (B, T, T, D) tensor. Dispatches to the compiled extension when it can run the
    inputs (docs/design.md §6; ``ATTNFREE_AFT_FULL_KERNEL=auto|tiled|exact`` picks its algorithm).
    """
    if is_chunk(q, k):
        check_chunk(q, k, v)
        check_chunk_bias("w", w, q, k)
        check_causal(causal)
        if not causal:
            raise ValueError(
                f"q with fewer rows than k (a decoding chunk: {q.shape[1]} < {k.shape[1]}) needs causal=True"
            )
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens cannot be combined with a decoding chunk (q with fewer rows than k)")
        require_python("aft_full", python_only_reasons("aft_full", chunk=True))
        w3 = w if w.dim() == 3 else w[None]
        if q.shape[1] == 1:  # one token sees every key: no mask
            return aft_rows(q, k, v, w3).to(q.dtype)
        visible, _ = chunk_mask(q.shape[1], k.shape[1], None, q.device)
        return aft_rows(q, k, v, w3.masked_fill(~visible, float("-inf"))).to(q.dtype)
    check_qkv(q, k, v)
    if cu_seqlens is None and max_seqlen is not None:
        raise ValueError("max_seqlen needs cu_seqlens (it bounds the packed sequences)")
    if cu_seqlens is None:
        check_bias(w, q)
    check_causal(causal)
    if cu_seqlens is not None:
        pk = packing(cu_seqlens, q, max_seqlen)
        qp, kp, vp = pk.pad_qkv(q, k, v)
        wp = _varlen_bias(w, q, pk.t_max)
        check_bias(wp, qp)
        return pk.unpad(_dense(qp, kp, vp, wp, causal))
    return _dense(q, k, v, w, causal)


def _dense(q, k, v, w, causal):
    """One (B, T, D) call on the selected path (also the padded batch of packed sequences)."""
    if _composite.transform_active(q, k, v, w):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return _composite.aft_full(q, k, v, w, causal)
    if dispatch.select("aft_full", q, k, v, w) == "compiled":
        return torch.ops.attnfree.aft_full_fwd(q, k, v, w, causal)[0]
    return _python(q, k, v, w, causal)


def _varlen_bias(w, q, t_max):
    """w checked as a tensor of q's dtype and device, sliced to the longest packed sequence."""
    check_tensor("w", w)
    check_like("w", w, "q", q)
    return check_varlen_bias("w", w, t_max)


def _python(q, k, v, w, causal):
    """The pure-PyTorch path (``_dense`` has already sent forward-mode AD to the composite)."""
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
