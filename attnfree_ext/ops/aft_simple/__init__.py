"""AFT-simple (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103, eq. 2 with w = 0).

    y[t, c] = sigmoid(q[t, c]) * sum_t' softmax_t'(k[., c])[t'] * v[t', c]

over all keys t' (non-causal) or t' <= t (causal: the RWKV-4 "WKV" recurrence without decay). ``reference`` holds
the pure-PyTorch path, ``compiled`` the capability record and the registrations of the compiled ops
(docs/design.md §1, §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.checks import check_causal, check_qkv
from ..common.dtypes import compute_dtype
from ..common.features import python_only_reasons, require_python
from ..common.state import check_state, merge_keys, state_as_key
from ..common.varlen import Packing, check_cu_seqlens
from .compiled import CAPABILITY, aft_simple_compiled
from .reference import AFTSimpleFunction

__all__ = ["aft_simple", "CAPABILITY"]


def aft_simple(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    *,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
):
    """AFT-simple: ``y = sigmoid(q) * sum_t' softmax_t'(k) * v`` per channel (AFT eq. 2 with w = 0;
    docs/design.md §1).

    Args:
        q, k, v: (B, T, D) tensors of one dtype (float16, bfloat16, float32 or float64) and one device.
            Non-contiguous inputs are made contiguous once. With ``cu_seqlens``: (1, total_T, D), packed.
        causal: a bool; if True, row t uses keys t' <= t only (the RWKV-4 WKV recurrence without decay).
        initial_state: causal only; None or the state of the keys before this call, (B, 3, D) (with
            ``cu_seqlens``: (N, 3, D), one per sequence), float32 for fp16/bf16/fp32 inputs, float64 for float64:
            rows (m, num, den) = (running max of k, sum exp(k - m) v, sum exp(k - m)); (-inf, 0, 0) equals None
            (docs/design.md §9.1). Differentiable (all three rows).
        output_final_state: causal only; if True also return the state after the last key (same format).
        cu_seqlens: None, or int32/int64 (N + 1,) offsets of N packed sequences (flash-attention's varlen
            convention): sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1] of q, k, v (1, total_T, D) and sees
            no other sequence (docs/design.md §9.3). On the compiled kernels (CPU and CUDA) each sequence is scanned
            alone on its packed rows (no padded copy); the Python path runs one padded batch.
        max_seqlen: None, or an int >= the longest packed sequence (flash-attention's argument; only with
            ``cu_seqlens``). With it nothing is read back from the device to size the padded batch (no host sync;
            torch.compile does not break the graph on it). Checked against CPU offsets; on CUDA it is trusted.

    Returns:
        y: (B, T, D) in q's dtype, or (y, final_state) when ``output_final_state``. Differentiable w.r.t. q, k, v
        (and initial_state). fp16/bf16 inputs are computed in float32.

    Raises:
        TypeError: a non-tensor or non-floating input, mixed dtypes, a causal / output_final_state that is not a
            bool, an initial_state of the wrong dtype, a cu_seqlens that is not int32/int64.
        ValueError: inputs that are not 3-D, differ in shape, or live on different devices; initial_state or
            output_final_state with causal=False; an initial_state not (B, 3, D) ((N, 3, D) with cu_seqlens); a
            cu_seqlens not 1-D, that does not start at 0, decreases or does not end at total_T (values checked for
            CPU offsets), or packed inputs whose batch is not 1; a max_seqlen < 0, smaller than the longest
            sequence (CPU offsets) or given without cu_seqlens. TypeError for a max_seqlen that is not an int.
        The state and packed sequences run on the compiled kernels (CPU and CUDA).

    Numerics: exact softmax normalisation in log space (no split max), finite for any finite input; memory
    O(B*T*D) forward and backward (never a (B, T, T, D) tensor). See docs/design.md §1-§3, §9.
    """
    check_qkv(q, k, v)
    check_causal(causal)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if not causal and initial_state is not None:
        raise ValueError(
            "initial_state needs causal=True (a state carries a causal prefix; non-causal rows see all keys)"
        )
    if not causal and output_final_state:
        raise ValueError("output_final_state needs causal=True (a state carries a causal prefix)")
    why = python_only_reasons(
        "aft_simple",
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
    )
    if cu_seqlens is None and max_seqlen is not None:
        raise ValueError("max_seqlen needs cu_seqlens (it bounds the packed sequences)")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q, max_seqlen)
        if initial_state is not None:
            check_state("initial_state", initial_state, q.new_empty(cu_seqlens.shape[0] - 1, 0, q.shape[2]))
        require_python("aft_simple", why)
        # native: each sequence scanned alone by the kernels (docs/design.md §9.3); transforms run the padded batch
        if not _composite.transform_active(q, k, v, initial_state) and dispatch.select("aft_simple", q, k, v) == (
            "compiled"
        ):
            if initial_state is None and not output_final_state:
                return torch.ops.attnfree.aft_simple_fwd(q, k, v, causal, cu_seqlens, max_seqlen)[0]
            return aft_simple_compiled(q, k, v, causal, initial_state, output_final_state, cu_seqlens, max_seqlen)
        pk = Packing(cu_seqlens, q.shape[1], max_seqlen)
        out = _python(*pk.pad_qkv(q, k, v), causal, initial_state, output_final_state)
        if output_final_state:
            return pk.unpad(out[0]), out[1]
        return pk.unpad(out)
    if initial_state is not None:
        check_state("initial_state", initial_state, q)
    if why:
        require_python("aft_simple", why)
        return _python(q, k, v, causal, initial_state, output_final_state)
    if initial_state is not None or output_final_state:
        # the kernels take the state as one more chunk of their scan (docs/design.md §2.7); transforms (forward
        # mode, functorch) have no kernel formula and run the Python path's differentiable state form
        if not _composite.transform_active(q, k, v, initial_state) and dispatch.select("aft_simple", q, k, v) == (
            "compiled"
        ):
            return aft_simple_compiled(q, k, v, causal, initial_state, output_final_state)
        return _python(q, k, v, causal, initial_state, output_final_state)
    if _composite.transform_active(q, k, v):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return _composite.aft_simple(q, k, v, causal)
    if dispatch.select("aft_simple", q, k, v) == "compiled":
        return torch.ops.attnfree.aft_simple_fwd(q, k, v, causal)[0]
    return AFTSimpleFunction.apply(q, k, v, causal)


def _core(q, k, v, causal):
    if _composite.transform_active(q, k, v):
        return _composite.aft_simple(q, k, v, causal)
    return AFTSimpleFunction.apply(q, k, v, causal)


def _python(q, k, v, causal, initial_state, output_final_state):
    """The Python path with a state: the state enters as one pseudo-key before the first row (docs/design.md §9.1),
    in the compute dtype so that low-precision inputs do not round it."""
    if causal and q.shape[1] == 1 and (initial_state is not None or output_final_state):
        # one token (generation): its row is the merged state itself, y = sigmoid(q) * num / den
        ct = compute_dtype(q.dtype)
        state = merge_keys(initial_state, k, v)
        den = state[:, 2:3]
        y = torch.sigmoid(q.to(ct)) * state[:, 1:2] / torch.where(den == 0, torch.ones_like(den), den)
        return (y.to(q.dtype), state) if output_final_state else y.to(q.dtype)
    if initial_state is None:
        y = _core(q, k, v, causal)
    else:
        ct = compute_dtype(q.dtype)
        k0, v0 = state_as_key(initial_state)
        qc = torch.cat([torch.zeros_like(k0), q.to(ct)], dim=1)
        kc = torch.cat([k0, k.to(ct)], dim=1)
        vc = torch.cat([v0, v.to(ct)], dim=1)
        y = _core(qc, kc, vc, True)[:, 1:].to(q.dtype)
    if output_final_state:
        return y, merge_keys(initial_state, k, v)
    return y
