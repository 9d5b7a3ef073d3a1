"""AFT-local (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103, eq. 2 and §3.2).

    y[t, c] = sigmoid(q[t, c]) * sum_t' softmax_t'(k[t', c] + w'[t, t']) * v[t', c]

with the local bias ``w'[t, t'] = w[t, t']`` where ``|t - t'| < window`` and ``0`` outside (the paper's choice:
0, not -inf, so every token stays connected through the 0-bias global term). Causal: keys t' <= t only.
``reference`` holds the pure-PyTorch path, ``compiled`` the capability record and the registrations of the
compiled ops (docs/design.md §1, §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.checks import check_causal, check_like, check_qkv, check_tensor, check_window
from ..common.features import python_only_reasons, require_python
from ..common.rect import aft_rows, check_chunk, check_chunk_bias, chunk_mask, is_chunk
from ..common.state import check_state
from ..common.varlen import check_varlen_bias, packing
from . import layout
from .compiled import CAPABILITY
from .reference import AFTLocalFunction

__all__ = ["aft_local", "CAPABILITY"]


def aft_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    window: int,
    causal: bool = False,
    *,
    w_layout: str | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """AFT-local: AFT (eq. 2) with bias ``w`` inside ``|t - t'| < window`` and 0 outside (paper §3.2;
    docs/design.md §1).

    Args:
        q, k, v: (B, T, D) tensors of one dtype (float16, bfloat16, float32 or float64) and one device.
            Non-contiguous inputs are made contiguous once.
        w: position bias, same dtype and device as q, D % heads == 0, channel c uses head c // (D // heads); in
            one of two layouts (:mod:`attnfree_ext.ops.aft_local.layout`):
            full, (T, T) or (heads, T, T): ``w[h, t, t']``, only the band |t - t'| < window is read;
            band, (T, 2W - 1) or (heads, T, 2W - 1) with W = min(window, T): ``w[h, t, j]`` is the bias of key
            t' = t + j - (W - 1); entries whose key falls outside [0, T) are ignored. O(T * window) memory.
        window: int >= 1. window >= T gives aft_full with w everywhere; window == 1 keeps only w's diagonal.
        causal: a bool; if True, row t uses keys t' <= t only.
        w_layout: None (read the layout from w's shape: last dimension T means full, 2W - 1 band), "full" or
            "band". Required when the shape fits both (T == 2W - 1 > 1, e.g. T = 5, window = 3). With cu_seqlens
            None means "full" (w covers the longest sequence) and the band's T is the longest sequence's; a
            decoding chunk takes the full layout's rows (below).
        initial_state: causal only; None or a prefix state (B, 3, D) of keys that come before k and are out of
            every row's band (bias 0): the format of aft_simple's state (docs/design.md §9.1), float32 for
            fp16/bf16/fp32 inputs, float64 for float64. Differentiable.
        cu_seqlens: None, or int32/int64 (N + 1,) offsets of N packed sequences (flash-attention's varlen
            convention): q, k, v are (1, total_T, D), sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1] and sees
            no other one; w covers the longest sequence, (L, L) or (heads, L, L) with L >= T_max, and every
            sequence uses w[..., :len, :len] (positions restart at 0; docs/design.md §9.3).

    Decoding chunk (causal only; docs/design.md §9.2): q may have fewer rows than k and v, q (B, L, D) and k, v
    (B, S, D) with S > L, the preceding keys followed by the chunk's own. Query i sits at position S - L + i, sees
    keys j <= S - L + i with bias w inside the band (S - L + i - j < window) and 0 outside, plus the keys of
    initial_state with bias 0; w is then the bias rows of the chunk's positions, (L, S) or (heads, L, S). The
    chunk form (also taken whenever initial_state is given) runs on the pure-PyTorch path, per element.

    Returns:
        y: (B, T, D) in q's dtype (a chunk: (B, L, D)). Differentiable w.r.t. q, k, v and w; dw has w's shape and
        layout (0 outside the band).
        fp16/bf16 inputs are computed in float32.

    Raises:
        TypeError: non-tensor / non-floating inputs, mixed dtypes (w must match q), window not an int, causal not
            a bool.
        ValueError: wrong shapes (q, k, v not one (B, T, D) shape; w of neither layout, or not of the one
            w_layout names; D % heads != 0), a w shape that fits both layouts without w_layout, w_layout not
            None / "full" / "band", a banded w for a decoding chunk, window < 1, tensors on different devices; a
            chunk or initial_state with causal=False; an initial_state not (B, 3, D) (TypeError: not the state
            dtype); a bad cu_seqlens (not (N + 1,), not from 0, decreasing, not ending at total_T; TypeError: not
            int32/int64), packed inputs whose batch is not 1, cu_seqlens with initial_state or a chunk.
        RuntimeError: backend "compiled" forced for a chunk, initial_state or packed call (Python path only).

    Numerics: exact per-row softmax normalisation, finite for any finite input (|k|, |w| up to 1e4, causal
    late spikes); memory O(B*T*D + T*window) besides w and dw (never a (B, T, T, D) tensor; with the banded
    layout no T x T tensor either, except in the forward-mode / double-backward composites). See
    docs/design.md §1-§3.
    """
    chunk = is_chunk(q, k)
    if chunk or initial_state is not None:
        if w_layout == layout.BAND:
            raise ValueError("a decoding chunk (or initial_state) takes w as the chunk's bias rows, w_layout='full'")
        check_chunk(q, k, v)
        check_chunk_bias("w", w, q, k)
        window = min(check_window(window), max(k.shape[1], 1))
        check_causal(causal)
        if not causal:
            name = "initial_state" if initial_state is not None else "q with fewer rows than k (a decoding chunk)"
            raise ValueError(f"{name} needs causal=True")
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens cannot be combined with initial_state or a decoding chunk")
        if initial_state is not None:
            check_state("initial_state", initial_state, q)
        require_python("aft_local", python_only_reasons("aft_local", chunk=chunk, initial_state=initial_state))
        w3 = w if w.dim() == 3 else w[None]
        if q.shape[1] == 1 and k.shape[1] <= window:  # one token whose keys all lie in its band: no mask
            bias = w3
        else:
            visible, band = chunk_mask(q.shape[1], k.shape[1], window, q.device)
            bias = torch.where(band, w3, torch.zeros_like(w3)).masked_fill(~visible, float("-inf"))
        return aft_rows(q, k, v, bias, prefix=initial_state).to(q.dtype)
    check_qkv(q, k, v)
    check_causal(causal)
    if cu_seqlens is not None:
        pk = packing(cu_seqlens, q)
        check_tensor("w", w)
        check_like("w", w, "q", q)
        qp, kp, vp = pk.pad(q, 0.0), pk.pad(k, float("-inf")), pk.pad(v, 0.0)  # padding keys masked (§7)
        window = min(check_window(window), max(pk.t_max, 1))
        # the padded batch is one (N, T_max, D) call: w's rows (and, full, its columns) cut to T_max
        wp = w[..., : pk.t_max, :] if w_layout == layout.BAND else check_varlen_bias("w", w, pk.t_max)
        _, banded = layout.resolve(wp, qp, window, w_layout or layout.FULL)
        require_python("aft_local", python_only_reasons("aft_local", cu_seqlens=cu_seqlens))
        if _composite.transform_active(qp, kp, vp, wp):
            return pk.unpad(layout.composite(qp, kp, vp, wp, window, causal, banded))
        return pk.unpad(AFTLocalFunction.apply(qp, kp, vp, wp, window, causal, banded))
    # any positive int (sys.maxsize, 2**64): the band only ever covers T keys, and the compiled op takes an int64
    window = min(check_window(window), max(q.shape[1], 1))
    _, banded = layout.resolve(w, q, window, w_layout)
    if _composite.transform_active(q, k, v, w):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return layout.composite(q, k, v, w, window, causal, banded)
    if dispatch.select("aft_local", q, k, v, w) == "compiled":
        return torch.ops.attnfree.aft_local_fwd(q, k, v, w, window, causal, banded)[0]
    return AFTLocalFunction.apply(q, k, v, w, window, causal, banded)
