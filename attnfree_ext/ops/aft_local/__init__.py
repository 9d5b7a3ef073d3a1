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
from ..common.dtypes import compute_dtype
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
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
):
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
            fp16/bf16/fp32 inputs, float64 for float64. Differentiable. With ``cu_seqlens`` (causal): None or a
            list of N states, one per sequence, each None (a fresh sequence) or the
            :class:`attnfree_ext.nn.state.AFTLocalState` of batch 1 that the causal ``AFTLocal`` layer uses
            (prefix summary, the last window - 1 keys and values, offset): sequence i continues at position
            offset_i, and w (full layout, or banded with ``w_layout="band"``) must cover offset_i + len_i rows.
        output_final_state: with ``cu_seqlens`` and causal only: also return the N states after each sequence
            (a list of AFTLocalState, same convention), ``(y, states)``. Runs on the Python path per sequence
            (each sequence's own call may use the compiled kernels when it has no state).
        cu_seqlens: None, or int32/int64 (N + 1,) offsets of N packed sequences (flash-attention's varlen
            convention): q, k, v are (1, total_T, D), sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1] and sees
            no other one; w covers the longest sequence, (L, L) or (heads, L, L) with L >= T_max, and every
            sequence uses w[..., :len, :len] (positions restart at 0; docs/design.md §9.3). Runs as one padded
            batch (N, T_max, D) on whichever path is selected (compiled kernels included), padding keys -inf.
        max_seqlen: None, or an int >= the longest packed sequence (only with ``cu_seqlens``): the padded length
            T_max, so nothing is read back from the device (no host sync; no torch.compile graph break); w must
            cover it. Checked against CPU offsets; on CUDA it is trusted.

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
            int32/int64), packed inputs whose batch is not 1, cu_seqlens with a chunk; with cu_seqlens, an
            initial_state that is not a list of N AFTLocalState / None, states or output_final_state with
            causal=False, a w not covering offset + length of every sequence; output_final_state without
            cu_seqlens (TypeError: not a bool).
            A max_seqlen < 0, smaller than the longest sequence (CPU offsets) or without cu_seqlens.
        RuntimeError: backend "compiled" forced for a chunk or initial_state (Python path only).

    Numerics: exact per-row softmax normalisation, finite for any finite input (|k|, |w| up to 1e4, causal
    late spikes); memory O(B*T*D + T*window) besides w and dw (never a (B, T, T, D) tensor; with the banded
    layout no T x T tensor either, except in the forward-mode / double-backward composites). See
    docs/design.md §1-§3.
    """
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        states = (initial_state, output_final_state)
        return _packed_with_states(q, k, v, w, window, causal, w_layout, states, cu_seqlens, max_seqlen)
    if output_final_state:
        raise ValueError("output_final_state needs cu_seqlens here (the AFTLocal layer returns its state itself)")
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
            raise ValueError("cu_seqlens cannot be combined with a decoding chunk (q with fewer rows than k)")
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
    if cu_seqlens is None and max_seqlen is not None:
        raise ValueError("max_seqlen needs cu_seqlens (it bounds the packed sequences)")
    if cu_seqlens is not None:
        pk = packing(cu_seqlens, q, max_seqlen)
        check_tensor("w", w)
        check_like("w", w, "q", q)
        qp, kp, vp = pk.pad_qkv(q, k, v)
        window = min(check_window(window), max(pk.t_max, 1))
        # the padded batch is one (N, T_max, D) call: w's rows (and, full, its columns) cut to T_max
        wp = w[..., : pk.t_max, :] if w_layout == layout.BAND else check_varlen_bias("w", w, pk.t_max)
        _, banded = layout.resolve(wp, qp, window, w_layout or layout.FULL)
        return pk.unpad(_dense(qp, kp, vp, wp, window, causal, banded))
    # any positive int (sys.maxsize, 2**64): the band only ever covers T keys, and the compiled op takes an int64
    window = min(check_window(window), max(q.shape[1], 1))
    _, banded = layout.resolve(w, q, window, w_layout)
    return _dense(q, k, v, w, window, causal, banded)


def _dense(q, k, v, w, window, causal, banded):
    """One (B, T, D) call on the selected path (also the padded batch of packed sequences)."""
    if _composite.transform_active(q, k, v, w):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return layout.composite(q, k, v, w, window, causal, banded)
    if dispatch.select("aft_local", q, k, v, w) == "compiled":
        return torch.ops.attnfree.aft_local_fwd(q, k, v, w, window, causal, banded)[0]
    return AFTLocalFunction.apply(q, k, v, w, window, causal, banded)


def _packed_with_states(q, k, v, w, window, causal, w_layout, states, cu_seqlens, max_seqlen):
    """Packed causal sequences that continue from (and return) per-sequence AFTLocal states: each sequence runs the
    decoding step of the causal layer (attnfree_ext.nn._decode.local_step) on its rows, on the Python path."""
    from ...nn import _decode  # the layer's state and step (imported here: nn imports the ops)

    initial_state, output_final_state = states
    check_qkv(q, k, v)
    check_causal(causal)
    if not causal:
        raise ValueError("initial_state / output_final_state with cu_seqlens need causal=True")
    pk = packing(cu_seqlens, q, max_seqlen)
    window = check_window(window)
    check_tensor("w", w)
    check_like("w", w, "q", q)
    if initial_state is None:
        initial_state = [None] * pk.n
    if not isinstance(initial_state, (list, tuple)) or len(initial_state) != pk.n:
        raise ValueError(
            f"initial_state with cu_seqlens must be a list of N = {pk.n} AFTLocalState (or None) entries, one per "
            f"sequence, got {type(initial_state).__name__}"
            + (f" of length {len(initial_state)}" if isinstance(initial_state, (list, tuple)) else "")
        )
    cu = cu_seqlens.tolist()
    for i, st in enumerate(initial_state):
        if st is not None:
            _decode.check_local_state(st, q[:, cu[i] : cu[i + 1]], window)
    ends = [(st.offset if st is not None else 0) + cu[i + 1] - cu[i] for i, st in enumerate(initial_state)]
    need = max(ends, default=0)
    if w_layout == layout.BAND:
        w = layout.band_to_full(w, window)
    if w.dim() not in (2, 3) or w.shape[-1] != w.shape[-2] or w.shape[-1] < need:
        raise ValueError(
            f"with cu_seqlens and states, w must have shape (L, L) or (heads, L, L) covering every sequence's last "
            f"position (offset + length: L >= {need}), got {tuple(w.shape)}"
        )
    ys, finals = [], []
    for i, st in enumerate(initial_state):
        a, b = cu[i], cu[i + 1]
        qi, ki, vi = q[:, a:b], k[:, a:b], v[:, a:b]
        ct = compute_dtype(q.dtype)
        if st is None:
            if b > a:
                ys.append(aft_local(qi, ki, vi, w[..., : b - a, : b - a], window, True, w_layout=layout.FULL))
            new = _decode.local_state(None, ki.to(ct), vi.to(ct), window, b - a)
        else:
            if b == a:
                new = st
            else:
                t0, c = st.offset, st.k.shape[1]
                yi, new = _decode.local_step(qi, ki, vi, w[..., t0 : t0 + b - a, t0 - c : t0 + b - a], window, st)
                ys.append(yi)
        finals.append(new)
    y = torch.cat(ys, dim=1) if ys else q.new_empty(q.shape)
    return (y, finals) if output_final_state else y
