"""Compiled EA double normalisation: its capability record and the Python-side registrations of
``torch.ops.attnfree.ea_double_norm_*`` (schemas and CPU/CUDA kernels come from attnfree_ext._C,
csrc/ea_double_norm/): a fake kernel for each op and autograd on ``ea_double_norm_fwd`` through
``ea_double_norm_bwd`` (only out is differentiable; lse and rowsum are saved statistics). Registered only when
attnfree_ext._C defines the ops (docs/design.md §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.capabilities import CLUSTER_SWITCH, Capability, Input
from ..common.dtypes import compute_dtype
from ..common.fakes import like

__all__ = ["CAPABILITY"]

CAPABILITY = dispatch.register(
    Capability(
        name="ea_double_norm",
        fwd="ea_double_norm_fwd",
        bwd="ea_double_norm_bwd",
        devices=("cpu", "cuda"),
        inputs=(Input("logits", "(..., N, S) (at least 2 dimensions)", 2),),
        switches=(CLUSTER_SWITCH,),
    )
)

if dispatch.has_op("ea_double_norm_fwd"):

    @torch.library.register_fake("attnfree::ea_double_norm_fwd")
    def _ea_double_norm_fwd_fake(logits, eps):
        torch._check(logits.dim() >= 2, lambda: "logits must have at least 2 dimensions (..., N, S)")
        sd = compute_dtype(logits.dtype)
        shp = tuple(logits.shape)
        out = torch.empty(shp, dtype=logits.dtype, device=logits.device)
        lse = torch.empty(shp[:-2] + (1, shp[-1]), dtype=sd, device=logits.device)
        rowsum = torch.empty(shp[:-1] + (1,), dtype=sd, device=logits.device)
        return out, lse, rowsum

    @torch.library.register_fake("attnfree::ea_double_norm_bwd")
    def _ea_double_norm_bwd_fake(dout, logits, out, lse, rowsum):
        return like(logits)

    def _ea_double_norm_setup(ctx, inputs, output):
        logits, eps = inputs
        out, lse, rowsum = output
        ctx.save_for_backward(logits, out, lse, rowsum)
        ctx.eps = eps

    def _ea_double_norm_backward(ctx, dout, dlse, drowsum):
        logits, out, lse, rowsum = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(_composite.vjp(_composite.ea_double_norm, (logits, ctx.eps), ctx.needs_input_grad, dout))
        return torch.ops.attnfree.ea_double_norm_bwd(dout, logits, out, lse, rowsum), None

    torch.library.register_autograd(
        "attnfree::ea_double_norm_fwd", _ea_double_norm_backward, setup_context=_ea_double_norm_setup
    )
