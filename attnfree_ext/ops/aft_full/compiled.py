"""Compiled AFT-full: its capability records and the Python-side registrations of ``torch.ops.attnfree.aft_full_*``
and ``aft_full_lowrank_*`` (schemas and CPU/CUDA kernels come from attnfree_ext._C, csrc/aft_full/).

* ``torch.library.register_fake`` for every op, so FakeTensor / torch.compile tracing works without a kernel;
* ``torch.library.register_autograd`` on each ``*_fwd`` op, calling the matching ``*_bwd`` op. Only y is
  differentiable; the gradient of lse is ignored (a saved statistic). So ``torch.ops.attnfree.aft_full_fwd(q, k,
  v, w, causal)[0]`` is differentiable and traceable with ``torch.compile(fullgraph=True)``.

Registered only when attnfree_ext._C defines the ops (docs/design.md §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.capabilities import CLUSTER_SWITCH, Capability, Input, Switch
from ..common.fakes import aft_fwd_outputs, like

__all__ = ["CAPABILITY", "LOWRANK_CAPABILITY", "KERNEL_SWITCH"]

_QKV = (Input("q", "(B, T, D)", 3, 3), Input("k", "(B, T, D)", 3, 3), Input("v", "(B, T, D)", 3, 3))

KERNEL_SWITCH = Switch(
    "ATTNFREE_AFT_FULL_KERNEL",
    ("auto", "tiled", "exact"),
    "auto",
    "tiled: factorised tile GEMMs (CPU) / tensor cores (CUDA); exact: per-element kernels; auto picks by shape",
)

CAPABILITY = dispatch.register(
    Capability(
        name="aft_full",
        fwd="aft_full_fwd",
        bwd="aft_full_bwd",
        devices=("cpu", "cuda"),
        inputs=_QKV + (Input("w", "(T, T) or (heads, T, T)", 2, 3),),
        switches=(KERNEL_SWITCH, CLUSTER_SWITCH),
    )
)

LOWRANK_CAPABILITY = dispatch.register(
    Capability(
        name="aft_full_lowrank",
        fwd="aft_full_lowrank_fwd",
        bwd="aft_full_lowrank_bwd",
        devices=("cuda",),
        inputs=_QKV
        + (Input("u", "(T, rank) or (heads, T, rank)", 2, 3), Input("vb", "(T, rank) or (heads, T, rank)", 2, 3)),
        switches=(KERNEL_SWITCH,),
    )
)

if dispatch.has_op("aft_full_fwd"):

    @torch.library.register_fake("attnfree::aft_full_fwd")
    def _aft_full_fwd_fake(q, k, v, w, causal):
        return aft_fwd_outputs(q)

    @torch.library.register_fake("attnfree::aft_full_bwd")
    def _aft_full_bwd_fake(dy, q, k, v, w, y, lse, causal):
        return like(q), like(q), like(q), like(w)

    def _aft_full_setup(ctx, inputs, output):
        q, k, v, w, causal = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, w, y, lse)
        ctx.causal = causal

    def _aft_full_backward(ctx, dy, dlse):
        q, k, v, w, y, lse = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(_composite.vjp(_composite.aft_full, (q, k, v, w, ctx.causal), ctx.needs_input_grad, dy))
        dq, dk, dv, dw = torch.ops.attnfree.aft_full_bwd(dy, q, k, v, w, y, lse, ctx.causal)
        return dq, dk, dv, dw, None

    torch.library.register_autograd("attnfree::aft_full_fwd", _aft_full_backward, setup_context=_aft_full_setup)

if dispatch.has_op("aft_full_lowrank_fwd"):

    @torch.library.register_fake("attnfree::aft_full_lowrank_fwd")
    def _aft_full_lowrank_fwd_fake(q, k, v, u, vb, causal):
        return aft_fwd_outputs(q)

    @torch.library.register_fake("attnfree::aft_full_lowrank_bwd")
    def _aft_full_lowrank_bwd_fake(dy, q, k, v, u, vb, y, lse, causal):
        return like(q), like(q), like(q), like(u), like(vb)

    def _lowrank_composite(q, k, v, u, vb, causal):
        return _composite.aft_full(q, k, v, u @ vb.transpose(-1, -2), causal)

    def _aft_full_lowrank_setup(ctx, inputs, output):
        q, k, v, u, vb, causal = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, u, vb, y, lse)
        ctx.causal = causal

    def _aft_full_lowrank_backward(ctx, dy, dlse):
        q, k, v, u, vb, y, lse = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(_composite.vjp(_lowrank_composite, (q, k, v, u, vb, ctx.causal), ctx.needs_input_grad, dy))
        dq, dk, dv, du, dvb = torch.ops.attnfree.aft_full_lowrank_bwd(dy, q, k, v, u, vb, y, lse, ctx.causal)
        return dq, dk, dv, du, dvb, None

    torch.library.register_autograd(
        "attnfree::aft_full_lowrank_fwd", _aft_full_lowrank_backward, setup_context=_aft_full_lowrank_setup
    )
