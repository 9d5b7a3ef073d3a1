"""External attention's double normalisation (Guo et al. 2021, "Beyond Self-attention: External Attention using
Two Linear Layers for Visual Tasks", arXiv 2105.02358, eq. 5 and the official code's eps = 1e-9).

For logits ``l`` of shape (..., N, S) (N tokens, S memory units):

    p[n, s]   = softmax over n of l[:, s]           (per memory unit, over the tokens)
    out[n, s] = p[n, s] / (sum_s' p[n, s'] + eps)   (L1 over the memory units)

Pure-PyTorch path: ``ea_double_norm_fwd_ref`` / ``ea_double_norm_bwd_ref`` (the contract shared with the compiled
``torch.ops.attnfree.ea_double_norm_fwd`` / ``_bwd``) and the autograd glue. Everything is computed in log space:
``out = exp(l - lse_N(l) - log(sum_S p + eps))`` with ``log(sum_S p) = logsumexp_S(l - lse_N)``, so a row whose
every p underflows (a token ~100 below the column maxima) still gets its exact value instead of 0/0 (eps = 0) or a
silent 0 (eps > 0 in float32 where p/eps underflows). See NOTES §1, §3.
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from .._checks import check_tensor

__all__ = ["ea_double_norm", "ea_double_norm_fwd_ref", "ea_double_norm_bwd_ref"]

# below this (float32) the stored rowsum is too coarse to rebuild ``out`` as p / rowsum in the backward
_TINY_ROWSUM = 1e-30


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def ea_double_norm_fwd_ref(logits: torch.Tensor, eps: float = 1e-9):
    """Reference forward. Returns ``(out, lse, rowsum)``.

    logits: (..., N, S), floating. out: (..., N, S) in logits' dtype. lse: (..., 1, S) = logsumexp over N,
    rowsum: (..., N, 1) = sum_S p + eps; both float32 (float64 for float64 logits). Math runs in float32
    (float64 for float64). Memory O(numel). Finite logits of any magnitude give finite outputs.
    """
    ct = _compute_dtype(logits.dtype)
    l = logits.to(ct)
    if l.numel() == 0:
        shp = logits.shape
        return (torch.zeros_like(logits), torch.zeros(*shp[:-2], 1, shp[-1], dtype=ct, device=l.device),
                torch.zeros(*shp[:-1], 1, dtype=ct, device=l.device))
    lse = torch.logsumexp(l, dim=-2, keepdim=True)  # (..., 1, S)
    z = l - lse  # log p <= 0
    log_s = torch.logsumexp(z, dim=-1, keepdim=True)  # log sum_S p, (..., N, 1)
    log_r = log_s if eps == 0 else torch.logaddexp(log_s, torch.full_like(log_s, math.log(eps)))
    out = torch.exp(z - log_r)
    rowsum = torch.exp(log_s) + eps
    return out.to(logits.dtype), lse, rowsum


@torch.no_grad()
def ea_double_norm_bwd_ref(dout, logits, out, lse, rowsum):
    """Reference backward from logits, out, lse and rowsum. Returns ``dlogits`` in logits' dtype.

    With p = exp(l - lse) (<= 1) and a = out = p / rowsum:
        dp = (dout - sum_S(dout * a)) / rowsum;   dl = p * (dp - sum_N(p * dp))
    evaluated without the division as ``u = a * (dout - sum_S(dout * a))``, ``dl = u - p * sum_N(u)``
    (p * dp = u exactly), so a rowsum that underflowed (eps = 0) cannot give inf * 0. For fp16/bf16 ``a`` is
    rebuilt in float32 as p / rowsum (falling back to the stored ``out`` where rowsum < 1e-30).
    """
    ct = _compute_dtype(logits.dtype)
    l = logits.to(ct)
    lse = lse.to(ct)
    p = torch.exp(l - lse)
    if out.dtype == ct:
        a = out
    else:
        rowsum = rowsum.to(ct)
        a = torch.where(rowsum > _TINY_ROWSUM, p / rowsum.clamp_min(_TINY_ROWSUM), out.to(ct))
    do = dout.to(ct)
    u = a * (do - (do * a).sum(dim=-1, keepdim=True))
    dl = u - p * u.sum(dim=-2, keepdim=True)
    return dl.to(logits.dtype)


class _EADoubleNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, eps):
        out, lse, rowsum = ea_double_norm_fwd_ref(logits, eps)
        ctx.save_for_backward(logits, out, lse, rowsum)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        logits, out, lse, rowsum = ctx.saved_tensors
        return ea_double_norm_bwd_ref(dout, logits, out, lse, rowsum), None


def ea_double_norm(logits: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """External attention's double normalisation: softmax over tokens, then L1 over memory units.

    ``out = p / (sum_S p + eps)`` with ``p = softmax(logits, dim=-2)`` (Guo et al. 2021, arXiv 2105.02358, eq. 5;
    eps = 1e-9 as in the official EANet code; eps = 0 reproduces External-Attention-pytorch exactly).

    Args:
        logits: (..., N, S) tensor, N tokens (dim -2), S memory units (dim -1); float16, bfloat16, float32 or
            float64, any strides (non-contiguous inputs are read as they are).
        eps: added to the per-token sum over S; a float >= 0.

    Returns:
        (..., N, S) tensor in logits' dtype, differentiable w.r.t. logits. fp16/bf16 are computed in float32.

    Raises:
        TypeError: logits is not a floating tensor, or eps is not a real number.
        ValueError: logits has fewer than 2 dimensions, or eps is negative / not finite.

    Numerics: computed in log space, finite for any finite logits (tested to |logits| = 1e4); memory O(numel).
    """
    check_tensor("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must have at least 2 dimensions (..., N, S), got shape {tuple(logits.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    if _backend.select("ea_double_norm", logits) == "compiled":
        return torch.ops.attnfree.ea_double_norm_fwd(logits, eps)[0]
    return _EADoubleNormFunction.apply(logits, eps)
