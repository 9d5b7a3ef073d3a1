"""Compiled AFT-simple: its capability record and the Python-side registrations of
``torch.ops.attnfree.aft_simple_*`` (schemas and CPU/CUDA kernels come from attnfree_ext._C, csrc/aft_simple/): a
fake kernel for each op and autograd on ``aft_simple_fwd`` through ``aft_simple_bwd`` (only y is differentiable).
Registered only when attnfree_ext._C defines the ops (docs/design.md §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.capabilities import Capability, Input
from ..common.fakes import aft_fwd_outputs, like

__all__ = ["CAPABILITY"]

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
    def _aft_simple_fwd_fake(q, k, v, causal):
        return aft_fwd_outputs(q)

    @torch.library.register_fake("attnfree::aft_simple_bwd")
    def _aft_simple_bwd_fake(dy, q, k, v, y, lse, causal):
        return like(q), like(q), like(q)

    def _aft_simple_setup(ctx, inputs, output):
        q, k, v, causal = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.causal = causal

    def _aft_simple_backward(ctx, dy, dlse):
        q, k, v, y, lse = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(_composite.vjp(_composite.aft_simple, (q, k, v, ctx.causal), ctx.needs_input_grad, dy))
        dq, dk, dv = torch.ops.attnfree.aft_simple_bwd(dy, q, k, v, y, lse, ctx.causal)
        return dq, dk, dv, None

    torch.library.register_autograd("attnfree::aft_simple_fwd", _aft_simple_backward, setup_context=_aft_simple_setup)
