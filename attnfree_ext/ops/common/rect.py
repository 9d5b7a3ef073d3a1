"""Causal AFT for a decoding chunk: L query rows at the end of S >= L keys (docs/design.md §9.2).

Query i sits at position S - L + i of the key sequence (flash-attention's bottom-right causal alignment for
seqlen_q != seqlen_k) and sees keys j <= S - L + i. The caller gives the bias of those rows, (heads, L, S), with
-inf where a key is invisible; an optional prefix state (docs/design.md §9.1, ``ops/common/state.py``) adds keys
that every row sees with bias 0.

Computed per element in plain differentiable torch ops (exact per-row softmax with a max shift, as the composites
of ``ops/common/composite.py``), in row blocks of at most ``BLOCK_ELEMS`` logits; under autograd each block is
checkpointed (its logits are recomputed in the backward), so memory stays O(BLOCK_ELEMS + B*S*D) forward and
backward. Work O(B*L*S*D): meant for decoding (L small); long sequences go through the ops' own kernels.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .checks import check_same_device, check_tensor
from .dtypes import compute_dtype
from .state import state_as_key

__all__ = ["BLOCK_ELEMS", "is_chunk", "check_chunk", "check_chunk_bias", "chunk_mask", "aft_rows"]

#: logits per row block (B * rows * S * D elements)
BLOCK_ELEMS = 1 << 22
_NEG_INF = float("-inf")


def is_chunk(q, k) -> bool:
    """q with fewer rows than k: a decoding chunk (the shapes are then checked by :func:`check_chunk`)."""
    return (
        isinstance(q, torch.Tensor)
        and isinstance(k, torch.Tensor)
        and q.dim() == 3
        and k.dim() == 3
        and q.shape[1] < k.shape[1]
    )


def check_chunk(q, k, v) -> None:
    """q (B, L, D); k, v (B, S, D) with S >= L; one dtype and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=3)
    check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, L, D = q.shape
    if k.shape[0] != B or k.shape[2] != D or k.shape[1] < L:
        raise ValueError(
            f"k and v must be (B, S, D) = ({B}, S >= {L}, {D}) for q {tuple(q.shape)} (a decoding chunk: the "
            f"L query rows are the last L of S keys), got {tuple(k.shape)}"
        )


def check_chunk_bias(name: str, w, q, k) -> int:
    """w: the bias rows of a chunk, (L, S) or (heads, L, S), D % heads == 0, q's dtype and device. Returns heads."""
    check_tensor(name, w)
    if w.dtype != q.dtype:
        raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {w.dtype}")
    check_same_device(q=q, **{name: w})
    L, S, D = q.shape[1], k.shape[1], q.shape[2]
    if w.dim() == 2 and tuple(w.shape) == (L, S):
        return 1
    if w.dim() == 3 and tuple(w.shape[1:]) == (L, S) and w.shape[0] >= 1 and D % w.shape[0] == 0:
        return w.shape[0]
    raise ValueError(
        f"{name} must have shape (L, S) or (heads, L, S) with L={L} query rows, S={S} keys and D % heads == 0 "
        f"(the rows of the bias at the chunk's positions), got {tuple(w.shape)}"
    )


def chunk_mask(L: int, S: int, window: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(visible, band), each (L, S) bool: query i (position S - L + i) sees key j <= S - L + i; band: it also lies
    within ``window`` (always True when window is None)."""
    rel = (torch.arange(L, device=device) + (S - L))[:, None] - torch.arange(S, device=device)[None, :]
    visible = rel >= 0
    band = visible if window is None else visible & (rel < window)
    return visible, band


def _block(bias, kc, vc, qc):
    """y rows for one row block: bias (H, c, S), kc, vc (B, S, D), qc (B, c, D)."""
    H, D = bias.shape[0], kc.shape[2]
    wb = bias.repeat_interleave(D // H, dim=0).permute(1, 2, 0)  # (c, S, D)
    x = wb[None] + kc[:, None]  # (B, c, S, D)
    m = x.detach().amax(dim=2, keepdim=True)
    m = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
    e = torch.exp(x - m)
    den = e.sum(dim=2)
    # an invisible key (weight 0) contributes nothing, whatever its v (docs/design.md §7)
    num = torch.where(e == 0, torch.zeros_like(e), e * vc[:, None]).sum(dim=2)
    return torch.sigmoid(qc) * (num / torch.where(den == 0, torch.ones_like(den), den))


def aft_rows(q, k, v, bias, prefix=None):
    """y (B, L, D) in the compute dtype for q (B, L, D), k, v (B, S, D), bias (H, L, S) (-inf: invisible) and an
    optional prefix state (B, 3, D) seen by every row with bias 0. Differentiable w.r.t. every tensor argument."""
    ct = compute_dtype(q.dtype)
    qc, kc, vc, bc = q.to(ct), k.to(ct), v.to(ct), bias.to(ct)
    if prefix is not None:
        k0, v0 = state_as_key(prefix.to(ct))
        kc, vc = torch.cat([k0, kc], dim=1), torch.cat([v0, vc], dim=1)
        bc = torch.cat([bc.new_zeros(bc.shape[0], bc.shape[1], 1), bc], dim=2)
    B, L, D = qc.shape
    S = kc.shape[1]
    if L == 0 or B * D == 0:
        return qc.new_zeros(B, L, D)
    if L * B * S * D <= BLOCK_ELEMS:  # one block (decoding); an inequality, so torch.compile does not re-trace
        return _block(bc, kc, vc, qc)
    rows = max(1, BLOCK_ELEMS // max(1, B * S * D))
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (qc, kc, vc, bc))
    out = []
    for r0 in range(0, L, rows):
        r1 = min(L, r0 + rows)
        args = (bc[:, r0:r1], kc, vc, qc[:, r0:r1])
        out.append(checkpoint(_block, *args, use_reentrant=False) if track else _block(*args))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)
