"""AFT-simple, pure-PyTorch reference path (docs/design.md §1-§3).

``aft_simple_fwd_ref`` / ``aft_simple_bwd_ref`` have the contract of ``torch.ops.attnfree.aft_simple_fwd`` /
``_bwd``; ``AFTSimpleFunction`` is the autograd glue the public function uses when the compiled path does not run.
The causal case uses the stable log-space prefix scans of :mod:`attnfree_ext.ops.common.scan` (no Python loop
over T).

Accuracy: exact normalisation for any finite input; in the causal case log-domain values are rounded to
~eps * |value|, so with |k| ~ L the relative error is ~eps * L (float32: 6e-8 * L; ~1e-4 for a spike of 3000).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common.dtypes import compute_dtype
from ..common.scan import neg_lse, prefix_summary, rows_after, safe_max

__all__ = ["aft_simple_fwd_ref", "aft_simple_bwd_ref", "AFTSimpleFunction"]


@torch.no_grad()
def _aft_simple_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """(y in the compute dtype, lse): see aft_simple_fwd_ref."""
    ct = compute_dtype(q.dtype)
    B, T, D = q.shape
    qc, kc, vc = (x.to(ct).contiguous() for x in (q, k, v))
    if T == 0 or B * D == 0:
        return torch.zeros(B, T, D, dtype=ct, device=q.device), torch.zeros(B, T, D, dtype=ct, device=q.device)
    if causal:
        lse, z = prefix_summary(kc, vc)
    else:
        lse1 = torch.logsumexp(kc, dim=1, keepdim=True)  # (B, 1, D); -inf where every key is masked (§7)
        z = torch.einsum("btd,btd->bd", torch.exp(kc - safe_max(lse1)), vc)[:, None, :]  # 0 there
        lse = lse1.expand(B, T, D).contiguous()
    y = torch.sigmoid(qc) * z
    return y, lse


def aft_simple_fwd_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """Reference forward. Returns ``(y, lse)``.

    q, k, v: (B, T, D), one floating dtype. y: (B, T, D) in q's dtype. lse: (B, T, D) float32 (float64 for
    float64 inputs), ``lse[t, c] = log sum_{visible t'} exp(k[t', c])`` (the same value on every row when
    ``causal`` is False). Math runs in float32 (float64 for float64 inputs); inputs are made contiguous once.
    Memory O(B*T*D). Finite inputs give finite outputs for any magnitude of k (no split max, no overflow).
    """
    y, lse = _aft_simple_fwd(q, k, v, causal)
    return y.to(q.dtype), lse


@torch.no_grad()
def aft_simple_bwd_ref(dy, q, k, v, y, lse, causal: bool):
    """Reference backward from the inputs, y and lse only. Returns ``(dq, dk, dv)`` in q's dtype.

    With P[t, t', c] = exp(k[t', c] - lse[t, c]) (<= 1), G = dy * sigmoid(q), H = dy * y:
    dq = dy * y * (1 - sigmoid(q)); dv[t'] = sum_t P G; dk[t'] = v[t'] dv[t'] - sum_t P H
    (sums over the rows t that see key t'). Causal: reverse log-cumsums ``exp(k + rlcse(-lse + log G+-))``,
    every exponent <= log sum|G|. Memory O(B*T*D).
    y may be given in q's dtype (the contract) or unrounded in the compute dtype (what ``AFTSimpleFunction`` saves
    for fp16/bf16 inputs); it is used as given (docs/design.md §3).
    """
    ct = compute_dtype(q.dtype)
    B, T, D = q.shape
    if T == 0 or B * D == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qc, kc, vc, yc, dyc = (x.to(ct).contiguous() for x in (q, k, v, y, dy))
    lse = lse.to(ct)
    s = torch.sigmoid(qc)
    g = dyc * s
    h = dyc * yc
    dq = h * (1 - s)
    if causal:
        a = neg_lse(lse)  # rows with lse = -inf see no key: weight 0
        dv = rows_after(kc, a, g)
        dk = vc * dv - rows_after(kc, a, h)
    else:
        p = torch.exp(kc - safe_max(lse[:, :1]))  # every row shares one normaliser; 0 where lse = -inf
        dv = p * g.sum(dim=1, keepdim=True)
        dk = vc * dv - p * h.sum(dim=1, keepdim=True)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class AFTSimpleFunction(torch.autograd.Function):
    """Python-path autograd: forward saves q, k, v, y (unrounded, compute dtype) and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        y, lse = _aft_simple_fwd(q, k, v, causal)
        # y stays in the compute dtype (docs/design.md §3): H = dy * y enters dk, and the unrounded y keeps it
        # free of the low-precision rounding of y.
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.causal = causal
        return y.to(q.dtype)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, y, lse = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(_composite.vjp(_composite.aft_simple, (q, k, v, ctx.causal), ctx.needs_input_grad, dy))
        dq, dk, dv = aft_simple_bwd_ref(dy, q, k, v, y, lse, ctx.causal)
        return dq, dk, dv, None
