"""Tile helpers for the pure-PyTorch AFT-full path (docs/design.md §2, §3).

Everything here works on one head at a time: ``wh`` is that head's (T, T) bias, ``k``/``v``/... are the
(B, T, Dh) channel slices of that head, all in the compute dtype (float32, or float64 for float64 inputs).

Two kinds of tile computations are provided:

* factorised tiles (``exp(w - rowmax) @ exp(k - colmax)``-style GEMMs, operands in [0, 1]) are written inline in
  ``ops/aft_full/reference.py``;
* *exact* blocks (``exact_rows_fwd`` / ``exact_rows_bwd``): the logits ``w[t, t'] + k[b, t', c]`` of a set of
  query rows against one key tile are materialised as a (B, rows, tau, Dh) block, chunked over rows so that a block
  never holds more than ``BLOCK_ELEMS`` elements. These are used for the causal diagonal tiles (the only place where
  the per-row max must be taken over t' <= t) and as the exactness fallback for rows where a factorised tile would
  lose precision to underflow. They never build a (B, T, T, D) tensor.
"""

from __future__ import annotations

import torch

from .scan import safe_max

#: key-tile width (tau in docs/design.md §2)
TAU = 64
#: max number of elements of one exact (B, rows, tau, Dh) block
BLOCK_ELEMS = 1 << 21


def tiny(dtype: torch.dtype) -> float:
    """Smallest factorised denominator trusted as exact.

    A factorised tile sums at most TAU products in [0, 1]; products below the smallest normal number
    (1.2e-38 fp32, 2.2e-308 fp64) lose precision, so the tile is trusted only where its denominator is at least
    ``tiny``: the relative error from those products is then <= TAU * 1.2e-38 / 1e-28 ~ 8e-9 (fp32) and
    TAU * 2.2e-308 / 1e-290 ~ 1.4e-15 (fp64).
    """
    return 1e-290 if dtype == torch.float64 else 1e-28


def qmax(dtype: torch.dtype) -> float:
    """Largest log-gap a factorised backward tile may have (see ``aft_full_bwd_ref``).

    exp underflows below e^-87.3 (fp32) / e^-708 (fp64); with a gap Q <= qmax a lost product is at most
    e^-(87 - 50) = e^-37 ~ 1e-16 (fp32) / e^-(708 - 670) = e^-38 (fp64) of a probability <= 1.
    """
    return 670.0 if dtype == torch.float64 else 50.0


def exp_lim(dtype: torch.dtype) -> float:
    """|s| below which exp(s) is a normal number (direct multiplication is then exact to rounding)."""
    return 700.0 if dtype == torch.float64 else 80.0


def sgnexp(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """g * exp(s) without overflow/underflow of exp(s) alone.

    Where |s| is small the product is formed directly (most accurate); elsewhere in log space,
    sign(g) * exp(log|g| + s). The caller guarantees the true product is bounded (it is a sum of P * G terms with
    P <= 1), so the result is finite.
    """
    lim = exp_lim(g.dtype)
    direct = g * torch.exp(s.clamp(-lim, lim))
    logsp = torch.sign(g) * torch.exp(torch.log(g.abs()) + s)
    return torch.where(s.abs() <= lim, direct, logsp)


def merge_(M: torch.Tensor, S: torch.Tensor, A: torch.Tensor, l: torch.Tensor, mean: torch.Tensor) -> None:
    """Online-softmax merge of one tile into the running state, in place (docs/design.md §2).

    State per (b, t, c): M running max of log-magnitudes, S = sum_j e^{l_j - M}, A = sum_j mean_j e^{l_j - M}.
    ``M`` and ``l`` may be -inf (empty state / a tile with no visible key, docs/design.md §7); the shift is the safe
    max (0 where both are -inf), so exp(-inf - shift) = 0 and no (-inf) - (-inf) is formed.
    """
    Mn = torch.maximum(M, l)
    Ms = safe_max(Mn)
    a = torch.exp(M - Ms)
    b = torch.exp(l - Ms)
    S.mul_(a).add_(b)
    A.mul_(a).add_(mean * b)
    M.copy_(Mn)


def merge_scaled_(M, S, A, base, n, d) -> None:
    """``merge_`` for a factorised tile given as value d * e^base and weighted sum n * e^base (d >= tiny).

    Same result as ``merge_(M, S, A, base + log d, n / d)`` with fewer passes: l = base + log d,
    M' = max(M, l); S = S e^{M - M'} + d e^{base - M'}; A = A e^{M - M'} + n e^{base - M'}. Since l <= M',
    base - M' <= -log d <= -log(tiny), so e^{base - M'} stays finite (<= 1e28 fp32 / 1e290 fp64).
    An empty tile (base = -inf, or d = 0 with no visible key) adds nothing; the shift is the safe max.
    """
    Mn = torch.maximum(M, base + torch.log(d))
    Ms = safe_max(Mn)
    e = torch.exp(base - Ms)
    a = torch.exp(M - Ms)
    S.mul_(a).addcmul_(d, e)
    A.mul_(a).addcmul_(n, e)
    M.copy_(Mn)


def _row_chunks(n_rows: int, per_row: int):
    step = max(1, BLOCK_ELEMS // max(1, per_row))
    for i in range(0, n_rows, step):
        yield i, min(n_rows, i + step)


def _rows_index(rows, a, b):
    """Sub-range [a, b) of ``rows``: a slice when rows is a contiguous range (cheap views), else an index tensor."""
    if isinstance(rows, range):
        return slice(rows.start + a, rows.start + b)
    return rows[a:b]


def _n_rows(rows) -> int:
    return len(rows) if isinstance(rows, range) else rows.numel()


def _block_logits(wh, kJ, rows, j0, j1, causal):
    """(B, n, tk, Dh) logits w[rows, j0:j1] + k[:, j0:j1], and the causal mask.

    ``rows`` is a slice or a 1-D index tensor of absolute query rows. When causal, keys after the row get logit
    -inf and the mask (1, n, tk, 1), True at those (t, t') pairs, is returned; else (and when no pair of the block
    is hidden) the mask is None. Products with a hidden key's v, or a hidden pair's G, H, go through a select on
    the mask, not a multiplication by the weight 0: a NaN/inf there must not reach the rows that do not see it
    (docs/design.md §7 rule 2).
    """
    wr = wh[rows, j0:j1]  # (n, tk)
    logits = wr[None, :, :, None] + kJ[:, None, :, :]
    if not causal or (isinstance(rows, slice) and rows.start >= j1 - 1):
        return logits, None
    if isinstance(rows, slice):
        ridx = torch.arange(rows.start, rows.stop, device=wh.device)
    else:
        ridx = rows
    keys = torch.arange(j0, j1, device=wh.device)
    mask = (keys[None, :] > ridx[:, None])[None, :, :, None]
    return logits.masked_fill(mask, float("-inf")), mask


def exact_rows_fwd(wh, k, v, rows, j0, j1, causal):
    """Exact log-magnitude ``l`` and softmax mean of key tile [j0, j1) for query ``rows``.

    ``rows``: a ``range`` of absolute query rows (sliced, no gather) or a 1-D index tensor.

    Returns (l, mean), each (B, len(rows), Dh). Where a row sees no key of the tile (every logit -inf: masked by
    -inf in k or w, docs/design.md §7) l = -inf and mean = 0.
    """
    kJ = k[:, j0:j1]
    vJ = v[:, j0:j1]
    B, tk, Dh = kJ.shape
    ls, means = [], []
    for a, b in _row_chunks(_n_rows(rows), B * tk * Dh):
        logits, hidden = _block_logits(wh, kJ, _rows_index(rows, a, b), j0, j1, causal)
        l = torch.logsumexp(logits, dim=2)  # (B, n, Dh); -inf where every logit is -inf
        p = torch.exp(logits - safe_max(l)[:, :, None, :])  # 0 for such rows
        pv = p * vJ[:, None]
        if hidden is not None:
            pv.masked_fill_(hidden, 0.0)
        ls.append(l)
        means.append(pv.sum(dim=2))
    return torch.cat(ls, dim=1), torch.cat(means, dim=1)


def exact_rows_bwd(wh, k, v, G, H, lse, rows, j0, j1, causal):
    """Exact backward contributions of query ``rows`` against key tile [j0, j1).

    With P = exp(w + k - lse) (<= 1; masked keys and rows with lse = -inf give 0): returns
    pg = sum_t P G  (B, tk, Dh),  ph = sum_t P H  (B, tk, Dh),  dwr = sum_{b,c} P (G v - H)  (len(rows), tk).
    ``G``, ``H``, ``lse`` are full-length (B, T, Dh) tensors indexed by ``rows`` (a ``range`` or an index tensor).
    """
    kJ = k[:, j0:j1]
    vJ = v[:, j0:j1]
    B, tk, Dh = kJ.shape
    pg = torch.zeros_like(kJ)
    ph = torch.zeros_like(kJ)
    dws = []
    for a, b in _row_chunks(_n_rows(rows), B * tk * Dh):
        ri = _rows_index(rows, a, b)
        logits, hidden = _block_logits(wh, kJ, ri, j0, j1, causal)
        P = torch.exp(logits - safe_max(lse[:, ri])[:, :, None, :])  # (B, n, tk, Dh)
        Gi, Hi = G[:, ri], H[:, ri]
        PG4 = P * Gi[:, :, None, :]
        PH4 = P * Hi[:, :, None, :]
        dw4 = PG4 * vJ[:, None] - PH4
        if hidden is not None:  # hidden pairs: 0 even for a NaN row (G, H) or a NaN v of a hidden key
            PG4.masked_fill_(hidden, 0.0)
            PH4.masked_fill_(hidden, 0.0)
            dw4.masked_fill_(hidden, 0.0)
        pg += PG4.sum(dim=1)
        ph += PH4.sum(dim=1)
        dws.append(dw4.sum(dim=(0, 3)))
    return pg, ph, torch.cat(dws, dim=0)
