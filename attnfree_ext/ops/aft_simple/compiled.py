"""Compiled AFT-simple: its capability record and the Python-side registrations of
``torch.ops.attnfree.aft_simple_*`` (schemas and CPU/CUDA kernels come from attnfree_ext._C, csrc/aft_simple/): a
fake kernel for each op, autograd on ``aft_simple_fwd`` through ``aft_simple_bwd`` (only y is differentiable) and
on ``aft_simple_state_fwd`` through ``aft_simple_state_bwd`` (y and the final state; gradients for q, k, v and the
initial state), and :func:`aft_simple_compiled`, the compiled path with a recurrent state.
Registered only when attnfree_ext._C defines the ops (docs/design.md §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.capabilities import Capability, Input
from ..common.dtypes import compute_dtype
from ..common.fakes import aft_fwd_outputs, like

__all__ = ["CAPABILITY", "aft_simple_compiled", "state_composite"]

CAPABILITY = dispatch.register(
    Capability(
        name="aft_simple",
        fwd="aft_simple_fwd",
        bwd="aft_simple_bwd",
        devices=("cpu", "cuda"),
        inputs=(Input("q", "(B, T, D)", 3, 3), Input("k", "(B, T, D)", 3, 3), Input("v", "(B, T, D)", 3, 3)),
    )
)

if dispatch.has_op("aft_simple_fwd"):

    @torch.library.register_fake("attnfree::aft_simple_fwd")
    def _aft_simple_fwd_fake(q, k, v, causal, cu_seqlens=None, max_seqlen=None):
        return aft_fwd_outputs(q)

    @torch.library.register_fake("attnfree::aft_simple_bwd")
    def _aft_simple_bwd_fake(dy, q, k, v, y, lse, causal, cu_seqlens=None, max_seqlen=None):
        return like(q), like(q), like(q)

    def _aft_simple_setup(ctx, inputs, output):
        q, k, v, causal, cu_seqlens, max_seqlen = _with_varlen(inputs, 4)
        y, lse = output
        ctx.save_for_backward(q, k, v, y, lse, cu_seqlens)
        ctx.causal, ctx.max_seqlen = causal, max_seqlen

    def _aft_simple_backward(ctx, dy, dlse):
        q, k, v, y, lse, cu = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            fn = _packed(_composite.aft_simple, cu, ctx.max_seqlen)
            grads = _composite.vjp(fn, (q, k, v, ctx.causal), ctx.needs_input_grad[:4], dy)
            return (*grads, None, None)
        dq, dk, dv = torch.ops.attnfree.aft_simple_bwd(dy, q, k, v, y, lse, ctx.causal, cu, ctx.max_seqlen)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd("attnfree::aft_simple_fwd", _aft_simple_backward, setup_context=_aft_simple_setup)


def _with_varlen(inputs, n):
    """The op's inputs with the optional (cu_seqlens, max_seqlen) filled in (callers may omit them)."""
    inputs = tuple(inputs)
    return inputs + (None,) * (n + 2 - len(inputs))


def _packed(fn, cu_seqlens, max_seqlen):
    """``fn(q, k, v, causal, *rest)`` -> ``(y, *state)`` as a function of packed (1, total_T, D) inputs: one call on
    the padded batch (padding keys -inf: masked), y unpacked (the double-backward formula with cu_seqlens)."""
    if cu_seqlens is None:
        return fn
    from ..common.varlen import Packing

    def packed(q, k, v, causal, *rest):
        pk = Packing(cu_seqlens, q.shape[1], max_seqlen)
        out = fn(*pk.pad_qkv(q, k, v), causal, *rest)
        if isinstance(out, tuple):
            return (pk.unpad(out[0]), *out[1:])
        return pk.unpad(out)

    return packed


def state_composite(q, k, v, causal, initial_state):
    """``(y, final_state)`` of AFT-simple with a recurrent state in plain differentiable torch ops (O(B*T^2*D)
    memory): the double-backward formula of the state ops. The initial state (m0, num0, den0) is one more key
    column with logit m0 whose weights are num0 (numerator) and den0 (denominator); -inf masks as in
    docs/design.md §7."""
    B, T, D = q.shape
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    ninf = float("-inf")
    logits = kc[:, None, :, :].expand(B, T, T, D)
    if causal:
        hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(hidden[None, :, :, None], ninf)
    if initial_state is None:
        s0 = torch.zeros(B, 3, D, dtype=ct, device=q.device)
        s0 = torch.cat([torch.full_like(s0[:, :1], ninf), s0[:, 1:]], 1)
    else:
        s0 = initial_state.to(ct)
    m0, n0, d0 = s0[:, 0], s0[:, 1], s0[:, 2]

    def parts(lg, mcol):  # lg (..., T', D) logits of the keys, mcol (..., D) the state's logit
        m = torch.maximum(lg.detach().amax(dim=-2), mcol.detach())
        m = torch.where(m == ninf, torch.zeros_like(m), m)
        e = torch.exp(lg - m[..., None, :])
        es = torch.exp(mcol - m)
        return e, es

    e, es = parts(logits, m0[:, None, :].expand(B, T, D))
    ev = torch.where(e == 0, torch.zeros_like(e), e * vc[:, None, :, :])
    num = ev.sum(dim=2) + es * n0[:, None, :]
    den = e.sum(dim=2) + es * d0[:, None, :]
    y = torch.sigmoid(qc) * num / torch.where(den == 0, torch.ones_like(den), den)
    # final state: every key and the initial state under their max mF (a function of the keys: amax)
    mF = torch.maximum(kc.amax(dim=1), m0) if T else m0
    mF = torch.where(mF == ninf, mF.detach(), mF)  # an empty state: masked keys get no gradient (§7 rule 3)
    off = torch.where(mF == ninf, torch.zeros_like(mF), mF)
    ek = torch.exp(kc - off[:, None, :])
    es = torch.exp(m0 - off)
    nF = torch.where(ek == 0, torch.zeros_like(ek), ek * vc).sum(1) + es * n0
    dF = ek.sum(1) + es * d0
    return y.to(q.dtype), torch.stack([mF, nF, dF], 1)


if dispatch.has_op("aft_simple_state_fwd"):

    def _state_shape(q, cu_seqlens=None):
        n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1  # one state per packed sequence
        return torch.empty(n, 3, q.shape[2], dtype=compute_dtype(q.dtype), device=q.device)

    @torch.library.register_fake("attnfree::aft_simple_state_fwd")
    def _aft_simple_state_fwd_fake(q, k, v, causal, initial_state, cu_seqlens=None, max_seqlen=None):
        y, lse = aft_fwd_outputs(q)
        return y, lse, _state_shape(q, cu_seqlens)

    @torch.library.register_fake("attnfree::aft_simple_state_bwd")
    def _aft_simple_state_bwd_fake(
        dy, dfinal_state, q, k, v, initial_state, y, lse, final_state, causal, cu_seqlens=None, max_seqlen=None
    ):
        return like(q), like(q), like(q), _state_shape(q, cu_seqlens)

    def _aft_simple_state_setup(ctx, inputs, output):
        q, k, v, causal, initial_state, cu_seqlens, max_seqlen = _with_varlen(inputs, 5)
        y, lse, final_state = output
        ctx.save_for_backward(q, k, v, initial_state, y, lse, final_state, cu_seqlens)
        ctx.causal, ctx.max_seqlen = causal, max_seqlen

    def _aft_simple_state_backward(ctx, dy, dlse, dfinal_state):
        q, k, v, s0, y, lse, sF, cu = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            fn = _packed(state_composite, cu, ctx.max_seqlen)
            args = (q, k, v, ctx.causal, s0)
            grads = _composite.vjp(fn, args, ctx.needs_input_grad[:5], (dy, dfinal_state))
            return (*grads, None, None)
        dq, dk, dv, ds0 = torch.ops.attnfree.aft_simple_state_bwd(
            dy, dfinal_state, q, k, v, s0, y, lse, sF, ctx.causal, cu, ctx.max_seqlen
        )
        return dq, dk, dv, None, (ds0 if s0 is not None else None), None, None

    torch.library.register_autograd(
        "attnfree::aft_simple_state_fwd", _aft_simple_state_backward, setup_context=_aft_simple_state_setup
    )


def aft_simple_compiled(
    q, k, v, causal, initial_state=None, output_final_state=False, cu_seqlens=None, max_seqlen=None
):
    """AFT-simple on the compiled kernels with a recurrent state (the compiled path of the public ``aft_simple``
    when it gets ``initial_state`` or ``output_final_state``; docs/design.md §2.7).

    Args:
        q, k, v: (B, T, D), one float dtype (float16, bfloat16, float32, float64), one device (CPU or CUDA); the
            caller has checked them.
        causal: bool. ``initial_state`` needs ``causal=True``.
        initial_state: None or a (B, 3, D) tensor on q's device, float32 for float16/bfloat16/float32 inputs and
            float64 for float64 inputs: rows (m, num, den) = (running max of the keys seen, -inf when none;
            sum exp(k - m) v; sum exp(k - m)). (-inf, 0, 0) is the same as None.
        output_final_state: bool; if True also return the state after the last key, in the same format (also for
            ``causal=False``: the state of all keys).
        cu_seqlens, max_seqlen: None, or packed sequences (q, k, v (1, total_T, D), int32/int64 (N + 1,) offsets
            and an optional int bound on the longest sequence; docs/design.md §9.3): each sequence is scanned alone
            and the states are (N, 3, D), one per sequence.

    Returns:
        y (B, T, D) in q's dtype, or ``(y, final_state)``. Differentiable w.r.t. q, k, v and initial_state
        (all three rows: the state stands for num * e^m and den * e^m), through y and final_state. Continuing
        from the final state of a run equals running the concatenated sequence.

    Raises (from the kernels' checks): ValueError naming initial_state for a non-causal call with a state or a
        wrong shape / device; TypeError naming initial_state for a wrong dtype; the q, k, v checks of the plain op.
    """
    y, _, final_state = torch.ops.attnfree.aft_simple_state_fwd(q, k, v, causal, initial_state, cu_seqlens, max_seqlen)
    return (y, final_state) if output_final_state else y
