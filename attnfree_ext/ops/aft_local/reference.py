"""AFT-local, pure-PyTorch reference path (docs/design.md §2, §3).

``aft_local_fwd_ref`` / ``aft_local_bwd_ref`` have the contract of ``torch.ops.attnfree.aft_local_fwd`` / ``_bwd``;
``AFTLocalFunction`` is the autograd glue the public function uses when the compiled path does not run.

For each row the keys split into
  (a) the band ``|t - t'| < window`` -- computed exactly, per element, over chunks of C query rows
      (a (B, heads, D/heads, C, <= C + 2*window - 2) logits block, channels-first so the key axis is innermost;
      C ~ max(16, window), capped so the block holds <= ~4*B*T*D elements; the backward holds two such blocks);
  (b) out-of-band keys with logit k alone: the prefix ``t' <= t - window`` and (non-causal) the suffix
      ``t' >= t + window`` -- shifted gathers of the stable log-space scans of :mod:`attnfree_ext.ops.common.scan`.
The (log-weight, mean) summaries of the parts are merged with a max shift. Memory O(B*T*D + T*window) besides w
and dw; w is read only inside the band (values outside it are never used, even if inf/NaN).

Accuracy: exact normalisation for any finite input; log-domain values (the scans, the stored lse) are rounded to
~eps * |value|, so with logits of magnitude L the relative error is ~eps * L (float32: 6e-8 * L; ~1e-6 for
ordinary inputs, ~1e-4 for a causal spike of 3000, ~1e-3 for |k| ~ 1e4). The signed-log means lose ~eps * sum P|v|
absolutely where positive and negative v nearly cancel.
"""

from __future__ import annotations

import math

import torch

from ..common import composite as _composite
from ..common.dtypes import compute_dtype
from ..common.scan import merge, neg_lse, prefix_summary, rows_after, rows_before, safe_max, shift, suffix_summary
from . import layout as _layout

__all__ = ["aft_local_fwd_ref", "aft_local_bwd_ref", "AFTLocalFunction"]

_NEG_INF = float("-inf")
# Upper bound of a band logits block, in units of B*T*D elements.
_BLOCK_FACTOR = 4
# Rows per chunk aim at ~window (1/2 (causal) to 2/3 of each block is then inside the band), at least _MIN_ROWS
# (fewer Python iterations), never above the block bound.
_MIN_ROWS = 16


def _chunk_rows(T: int, window: int, causal: bool) -> int:
    """Rows per chunk: ~max(_MIN_ROWS, window), capped so C * (keys per chunk) <= _BLOCK_FACTOR * T."""
    extra = (window - 1) if causal else 2 * (window - 1)
    budget = _BLOCK_FACTOR * T
    # C * (C + extra) <= budget
    c = int((-extra + math.sqrt(extra * extra + 4 * budget)) // 2)
    while c > 1 and c * min(T, c + extra) > budget:
        c -= 1
    c = max(c, min(_BLOCK_FACTOR, T), 1)  # when keys are capped at T, C = _BLOCK_FACTOR always fits
    return min(c, max(_MIN_ROWS, window), T)


def _chunks(T: int, window: int, causal: bool):
    """Yield (t0, t1, ks, ke) for query rows [t0, t1) and their keys [ks, ke)."""
    C = _chunk_rows(T, window, causal)
    for t0 in range(0, T, C):
        t1 = min(T, t0 + C)
        ks = max(0, t0 - window + 1)
        ke = t1 if causal else min(T, t1 + window - 1)
        yield t0, t1, ks, ke


def _band_mask(t0, t1, ks, ke, window, causal, device):
    rel = torch.arange(t0, t1, device=device)[:, None] - torch.arange(ks, ke, device=device)[None, :]
    band = rel.abs() < window
    if causal:
        band &= rel >= 0
    return band  # (C, L): True where w is used


def _band_cols(t0, t1, ks, ke, window, device):
    """(C, L) column j = t' - t + window - 1 of a banded w row for queries [t0, t1) and keys [ks, ke), clamped
    to [0, 2 window - 2] (the clamped entries lie outside the band and are masked)."""
    j = torch.arange(ks, ke, device=device)[None, :] - torch.arange(t0, t1, device=device)[:, None] + (window - 1)
    return j.clamp_(0, 2 * window - 2)


def _w_block(w3, banded, t0, t1, ks, ke, window):
    """(H, C, L) bias block w[h, t, t'] for queries [t0, t1), keys [ks, ke), from either layout (docs/design.md
    §2.6); entries outside the band hold arbitrary values of w (the caller masks them)."""
    if not banded:
        return w3[:, t0:t1, ks:ke]
    j = _band_cols(t0, t1, ks, ke, window, w3.device)
    return w3[:, t0:t1].gather(-1, j.expand(w3.shape[0], -1, -1))


def _block_logits(w3, banded, kT, t0, t1, ks, ke, window, causal, ct):
    """(B, H, Dh, C, L) logits w[h, t, t'] + k[b, t', h, d] inside the band, -inf outside (w read in the band).

    Channels-first layout: the key axis L is innermost, so the softmax reductions and the products with v
    are contiguous (no permuted copies of the block).
    """
    band = _band_mask(t0, t1, ks, ke, window, causal, kT.device)
    wb = _w_block(w3, banded, t0, t1, ks, ke, window).to(ct).masked_fill(~band[None], _NEG_INF)  # (H, C, L)
    return wb[None, :, None] + kT[:, :, :, None, ks:ke]


def _store_dw(dw3, banded, block, t0, t1, ks, ke, window, causal):
    """Writes the (H, C, L) dw block of queries [t0, t1) x keys [ks, ke) (0 outside the band) into dw3 of w's
    layout. Banded: row t gets block[t, t' - ks] at j = t' - t + window - 1, 0 where t' is outside [ks, ke) (keys
    outside [0, T), or t' > t when causal: not in the chunk) or outside the band."""
    if not banded:
        dw3[:, t0:t1, ks:ke] = block.to(dw3.dtype)
        return
    C, L = t1 - t0, ke - ks
    col = torch.arange(t0, t1, device=block.device)[:, None] + torch.arange(2 * window - 1, device=block.device)
    col = col - (window - 1) - ks  # (C, 2W-1) position of the key in the block
    valid = (col >= 0) & (col < L)
    if causal:
        valid &= torch.arange(2 * window - 1, device=block.device)[None, :] <= window - 1
    got = block.gather(-1, col.clamp(0, max(L - 1, 0)).expand(block.shape[0], C, -1))
    dw3[:, t0:t1] = torch.where(valid, got, torch.zeros((), dtype=got.dtype, device=got.device)).to(dw3.dtype)


def _to_channels_first(x, H):
    """(B, T, D) -> contiguous (B, H, Dh, T)."""
    B, T, D = x.shape
    return x.reshape(B, T, H, D // H).permute(0, 2, 3, 1).contiguous()


def _from_channels_first(x):
    """(B, H, Dh, T) -> contiguous (B, T, D)."""
    B, H, Dh, T = x.shape
    return x.permute(0, 3, 1, 2).reshape(B, T, H * Dh)


@torch.no_grad()
def _aft_local_fwd(q, k, v, w, window: int, causal: bool, banded: bool = False):
    """(y in the compute dtype, lse): see aft_local_fwd_ref."""
    ct = compute_dtype(q.dtype)
    B, T, D = q.shape
    w3 = w if w.dim() == 3 else w[None]
    H = w3.shape[0]
    Dh = D // H if H else 0
    if T == 0 or B * D == 0:
        return torch.zeros(B, T, D, dtype=ct, device=q.device), torch.zeros(B, T, D, dtype=ct, device=q.device)
    W = min(int(window), T)
    qc, kc, vc = (x.to(ct).contiguous() for x in (q, k, v))
    kT, vT = _to_channels_first(kc, H), _to_channels_first(vc, H)

    band_lse = torch.empty(B, H, Dh, T, dtype=ct, device=q.device)
    band_mean = torch.empty_like(band_lse)
    for t0, t1, ks, ke in _chunks(T, W, causal):
        x = _block_logits(w3, banded, kT, t0, t1, ks, ke, W, causal, ct)  # (B, H, Dh, C, L)
        # -inf where every band logit is masked (-inf in k or w, docs/design.md §7): safe max, s = 0, lse = -inf
        m = safe_max(x.amax(dim=-1, keepdim=True))
        e = x.sub_(m).exp_()  # in [0, 1], max 1 per row
        s = e.sum(dim=-1)  # in [1, L], or 0 (no band key)
        band_lse[..., t0:t1] = m[..., 0] + torch.log(s)
        # a select, not a matmul: a weight of 0 (a key the row does not see) times a NaN or inf in v must not reach
        # the row (docs/design.md §7 rule 2)
        band = _band_mask(t0, t1, ks, ke, W, causal, q.device)
        num = torch.where(band, e * vT[..., None, ks:ke], 0.0).sum(dim=-1)
        band_mean[..., t0:t1] = num / torch.where(s == 0, 1.0, s)
        del x, e, num
    parts = [(_from_channels_first(band_lse), _from_channels_first(band_mean))]
    if T > W:
        pl, pm = prefix_summary(kc, vc)  # keys t' <= t - W: summary at index t - W
        parts.append((shift(pl, W, _NEG_INF), shift(pm, W, 0.0)))
        if not causal:
            sl, sm = suffix_summary(kc, vc)  # keys t' >= t + W: summary at index t + W
            parts.append((shift(sl, -W, _NEG_INF), shift(sm, -W, 0.0)))
    lse, z = merge(parts)
    y = torch.sigmoid(qc) * z
    return y, lse


def aft_local_fwd_ref(q, k, v, w, window: int, causal: bool, banded: bool = False):
    """Reference forward. Returns ``(y, lse)``.

    q, k, v: (B, T, D), one floating dtype; w: (T, T) or (heads, T, T) with D % heads == 0, q's dtype (channel c
    uses head c // (D // heads)), or with ``banded`` (T, 2W - 1) / (heads, T, 2W - 1), W = min(window, T), the
    banded layout of :mod:`attnfree_ext.ops.aft_local.layout`; window >= 1. y: (B, T, D) in q's dtype.
    lse: (B, T, D) float32 (float64 for float64 inputs), ``lse[t, c] = log sum_{visible t'} exp(k[t', c] +
    w'[t, t'])``. Math in float32 (float64 for float64 inputs); inputs are made contiguous once. window >= T equals
    aft_full; window == 1 keeps only the diagonal bias.
    """
    y, lse = _aft_local_fwd(q, k, v, w, window, causal, banded)
    return y.to(q.dtype), lse


@torch.no_grad()
def aft_local_bwd_ref(dy, q, k, v, w, y, lse, window: int, causal: bool, banded: bool = False):
    """Reference backward from the inputs, y and lse only. Returns ``(dq, dk, dv, dw)``.

    With P[t, t', c] = exp(k[t', c] + w'[t, t'] - lse[t, c]) (<= 1), G = dy * sigmoid(q), H = dy * y:
    dq = dy * y * (1 - sigmoid(q)); dv[t'] = sum_t P G; dk[t'] = v[t'] dv[t'] - sum_t P H;
    dw[h, t, t'] = sum_{b, c in head h} P (G[t] v[t'] - H[t]) inside the band, 0 outside.
    Band: exact per element over the same row chunks as the forward. Out-of-band: shifted reverse/forward
    log-cumsums (every exponent <= log sum|G|). dq/dk/dv in q's dtype, dw with w's shape, layout and dtype.
    Memory O(B*T*D + T*window) besides dw (with a banded w, dw is banded too: no T x T tensor).
    y may be given in q's dtype (the contract) or unrounded in the compute dtype (what ``AFTLocalFunction`` saves
    for fp16/bf16 inputs); it is used as given (docs/design.md §3).
    """
    ct = compute_dtype(q.dtype)
    B, T, D = q.shape
    w3 = w if w.dim() == 3 else w[None]
    H = w3.shape[0]
    Dh = D // H if H else 0
    dw3 = torch.zeros_like(w3, memory_format=torch.contiguous_format)
    if T == 0 or B * D == 0:
        dw = dw3 if w.dim() == 3 else dw3[0]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dw
    W = min(int(window), T)
    qc, kc, vc, yc, dyc = (x.to(ct).contiguous() for x in (q, k, v, y, dy))
    lse = lse.to(ct).contiguous()
    s = torch.sigmoid(qc)
    g = dyc * s
    h = dyc * yc
    dq = h * (1 - s)

    kT, vT = _to_channels_first(kc, H), _to_channels_first(vc, H)
    gT, hT, lseT = _to_channels_first(g, H), _to_channels_first(h, H), _to_channels_first(lse, H)
    dvT = torch.zeros(B, H, Dh, T, dtype=ct, device=q.device)
    phT = torch.zeros_like(dvT)  # sum_t P H
    for t0, t1, ks, ke in _chunks(T, W, causal):
        x = _block_logits(w3, banded, kT, t0, t1, ks, ke, W, causal, ct)
        # (B, H, Dh, C, L); 0 outside the band, at masked keys and on rows with lse = -inf
        p = x.sub_(safe_max(lseT[..., t0:t1, None])).exp_()
        # selects on the band, not products with p = 0: a NaN in a row's G or H (or in v) reaches only the keys
        # (and pairs) that row sees (docs/design.md §7 rule 2)
        band = _band_mask(t0, t1, ks, ke, W, causal, q.device)
        gp = torch.where(band, gT[..., t0:t1, None] * p, 0.0)
        hp = torch.where(band, hT[..., t0:t1, None] * p, 0.0)
        dvT[..., ks:ke] += gp.sum(dim=-2)
        phT[..., ks:ke] += hp.sum(dim=-2)
        # dw[h, t, t'] = sum_{b, d} P (G[t] v[t'] - H[t])
        tmp = torch.where(band, gp * vT[..., None, ks:ke] - hp, 0.0)
        _store_dw(dw3, banded, tmp.sum(dim=(0, 2)), t0, t1, ks, ke, W, causal)
        del x, p, gp, hp, tmp
    dv, ph = _from_channels_first(dvT), _from_channels_first(phT)
    if T > W:
        a = neg_lse(lse)  # rows with lse = -inf see no key: weight 0
        # prefix keys: row t sees t' iff t >= t' + W
        dv = dv + rows_after(kc, a, g, W)
        ph = ph + rows_after(kc, a, h, W)
        if not causal:  # suffix keys: row t sees t' iff t <= t' - W
            dv = dv + rows_before(kc, a, g, W)
            ph = ph + rows_before(kc, a, h, W)
    dk = vc * dv - ph
    dw = dw3 if w.dim() == 3 else dw3[0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw


class AFTLocalFunction(torch.autograd.Function):
    """Python-path autograd: forward saves q, k, v, w, y (unrounded, compute dtype) and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, w, window, causal, banded=False):
        y, lse = _aft_local_fwd(q, k, v, w, window, causal, banded)
        # y stays in the compute dtype (docs/design.md §3): H = dy * y enters dk and dw, and the unrounded y keeps
        # them free of the low-precision rounding of y.
        ctx.save_for_backward(q, k, v, w, y, lse)
        ctx.window = window
        ctx.causal = causal
        ctx.banded = banded
        return y.to(q.dtype)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, w, y, lse = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(
                _composite.vjp(
                    _layout.composite, (q, k, v, w, ctx.window, ctx.causal, ctx.banded), ctx.needs_input_grad, dy
                )
            )
        dq, dk, dv, dw = aft_local_bwd_ref(dy, q, k, v, w, y, lse, ctx.window, ctx.causal, ctx.banded)
        return dq, dk, dv, dw, None, None, None
