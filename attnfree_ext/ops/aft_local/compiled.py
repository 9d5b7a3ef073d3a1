"""Compiled AFT-local: its capability record and the Python-side registrations of ``torch.ops.attnfree.aft_local_*``
(schemas and CPU/CUDA kernels come from attnfree_ext._C, csrc/aft_local/): a fake kernel for each op and autograd
on ``aft_local_fwd`` through ``aft_local_bwd`` (only y is differentiable). Registered only when attnfree_ext._C
defines the ops (docs/design.md §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.capabilities import Capability, Input
from ..common.fakes import aft_fwd_outputs, like
from . import layout as _layout

__all__ = ["CAPABILITY"]

CAPABILITY = dispatch.register(
    Capability(
        name="aft_local",
        fwd="aft_local_fwd",
        bwd="aft_local_bwd",
        devices=("cpu", "cuda"),
        inputs=(
            Input("q", "(B, T, D)", 3, 3),
            Input("k", "(B, T, D)", 3, 3),
            Input("v", "(B, T, D)", 3, 3),
            Input("w", "(T, T), (heads, T, T), (T, 2W-1) or (heads, T, 2W-1)", 2, 3),
        ),
    )
)

if dispatch.has_op("aft_local_fwd"):

    @torch.library.register_fake("attnfree::aft_local_fwd")
    def _aft_local_fwd_fake(q, k, v, w, window, causal, banded=False):
        return aft_fwd_outputs(q)

    @torch.library.register_fake("attnfree::aft_local_bwd")
    def _aft_local_bwd_fake(dy, q, k, v, w, y, lse, window, causal, banded=False):
        return like(q), like(q), like(q), like(w)

    def _aft_local_setup(ctx, inputs, output):
        q, k, v, w, window, causal, *rest = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, w, y, lse)
        ctx.window = window
        ctx.causal = causal
        ctx.banded = bool(rest[0]) if rest else False

    def _aft_local_backward(ctx, dy, dlse):
        q, k, v, w, y, lse = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(
                _composite.vjp(
                    _layout.composite, (q, k, v, w, ctx.window, ctx.causal, ctx.banded), ctx.needs_input_grad, dy
                )
            )
        dq, dk, dv, dw = torch.ops.attnfree.aft_local_bwd(dy, q, k, v, w, y, lse, ctx.window, ctx.causal, ctx.banded)
        return dq, dk, dv, dw, None, None, None

    torch.library.register_autograd("attnfree::aft_local_fwd", _aft_local_backward, setup_context=_aft_local_setup)
