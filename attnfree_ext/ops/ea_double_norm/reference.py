"""External attention's double normalisation, pure-PyTorch reference path (docs/design.md §1, §3, §7).

``ea_double_norm_fwd_ref`` / ``ea_double_norm_bwd_ref`` have the contract of ``torch.ops.attnfree.ea_double_norm_fwd``
/ ``_bwd``; ``EADoubleNormFunction`` is the autograd glue the public function uses when the compiled path does not
run. Everything is computed in log space:
``out = exp(l - lse_N(l) - log(sum_S p + eps))`` with ``log(sum_S p) = logsumexp_S(l - lse_N)``, so a row whose
every p underflows (a token ~100 below the column maxima) still gets its exact value instead of 0/0 (eps = 0) or a
silent 0 (eps > 0 in float32 where p/eps underflows). Masks (docs/design.md §7 rules 3-4): a -inf logit has p = 0,
a column of all -inf logits has lse = -inf and p = 0, a token with p = 0 for every unit has out = 0 (also with
eps = 0) and zero gradient.
"""

from __future__ import annotations

import math

import torch

from ..common import composite as _composite
from ..common.dtypes import compute_dtype

__all__ = ["ea_double_norm_fwd_ref", "ea_double_norm_bwd_ref", "EADoubleNormFunction"]


def _safe(x: torch.Tensor) -> torch.Tensor:
    """x with -inf as 0: a shift that never forms (-inf) - (-inf) (docs/design.md §7 rules 3-4)."""
    return x.masked_fill(x == -math.inf, 0.0)


@torch.no_grad()
def _forward(logits: torch.Tensor, eps: float):
    """(out in the compute dtype, lse, rowsum): the forward of ``ea_double_norm_fwd_ref`` before out is rounded."""
    ct = compute_dtype(logits.dtype)
    l = logits.to(ct)
    if l.numel() == 0:
        shp = logits.shape
        return (
            torch.zeros(shp, dtype=ct, device=l.device),
            torch.zeros(*shp[:-2], 1, shp[-1], dtype=ct, device=l.device),
            torch.zeros(*shp[:-1], 1, dtype=ct, device=l.device),
        )
    lse = torch.logsumexp(l, dim=-2, keepdim=True)  # (..., 1, S); -inf for a column of all -inf logits
    z = l - _safe(lse)  # log p <= 0; -inf for a masked logit and in an all -inf column (p = 0, docs §7)
    log_s = torch.logsumexp(z, dim=-1, keepdim=True)  # log sum_S p, (..., N, 1); -inf: p = 0 for every unit
    log_r = log_s if eps == 0 else torch.logaddexp(log_s, torch.full_like(log_s, math.log(eps)))
    out = torch.exp(z - _safe(log_r))  # a token with p = 0 everywhere: exp(-inf) = 0, also for eps = 0
    rowsum = torch.exp(log_s) + eps
    return out, lse, rowsum


def ea_double_norm_fwd_ref(logits: torch.Tensor, eps: float = 1e-9):
    """Reference forward. Returns ``(out, lse, rowsum)``.

    logits: (..., N, S), floating. out: (..., N, S) in logits' dtype. lse: (..., 1, S) = logsumexp over N,
    rowsum: (..., N, 1) = sum_S p + eps; both float32 (float64 for float64 logits). Math runs in float32
    (float64 for float64). Memory O(numel). Finite logits of any magnitude give finite outputs.
    """
    out, lse, rowsum = _forward(logits, eps)
    return out.to(logits.dtype), lse, rowsum


@torch.no_grad()
def ea_double_norm_bwd_ref(dout, logits, out, lse, rowsum):
    """Reference backward from logits, out, lse and rowsum. Returns ``dlogits`` in logits' dtype.

    With p = exp(l - lse) (<= 1) and a = out = p / rowsum:
        dp = (dout - sum_S(dout * a)) / rowsum;   dl = p * (dp - sum_N(p * dp))
    evaluated without the division as ``u = a * (dout - sum_S(dout * a))``, ``dl = u - p * sum_N(u)``
    (p * dp = u exactly), so a rowsum that underflowed (eps = 0) cannot give inf * 0. ``out`` may be given in
    logits' dtype (the contract) or unrounded in the compute dtype (what ``EADoubleNormFunction`` saves for
    fp16/bf16 logits); it is used as given (docs/design.md §3). ``rowsum`` is part of the contract (the compiled
    backward reads it) but not needed here.
    """
    ct = compute_dtype(logits.dtype)
    l = logits.to(ct)
    lse = lse.to(ct)
    p = torch.exp(l - _safe(lse))
    a = out.to(ct)
    do = dout.to(ct)
    u = a * (do - (do * a).sum(dim=-1, keepdim=True))
    dl = u - p * u.sum(dim=-2, keepdim=True)
    return dl.to(logits.dtype)


class EADoubleNormFunction(torch.autograd.Function):
    """Python-path autograd: forward saves logits, out (unrounded, compute dtype), lse and rowsum."""

    @staticmethod
    def forward(ctx, logits, eps):
        out, lse, rowsum = _forward(logits, eps)
        # out stays in the compute dtype (docs/design.md §3): the backward uses it in place of p / rowsum
        ctx.save_for_backward(logits, out, lse, rowsum)
        ctx.eps = eps
        return out.to(logits.dtype)

    @staticmethod
    def backward(ctx, dout):
        logits, out, lse, rowsum = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(_composite.vjp(_composite.ea_double_norm, (logits, ctx.eps), ctx.needs_input_grad, dout))
        return ea_double_norm_bwd_ref(dout, logits, out, lse, rowsum), None
