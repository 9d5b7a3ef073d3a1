"""AFT-full, pure-PyTorch reference path (docs/design.md §2, §3).

``aft_full_fwd_ref`` / ``aft_full_bwd_ref`` have the contract of ``torch.ops.attnfree.aft_full_fwd`` / ``_bwd``;
``AFTFullFunction`` is the autograd glue the public function uses when the compiled path does not run.
Algorithm: tile-wise split max with an online merge (docs/design.md §2); backward from y and lse only (§3).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import tiles as _tiles
from ..common.checks import check_bias, check_factors, check_qkv
from ..common.dtypes import compute_dtype
from ..common.scan import safe_max
from ..common.tiles import TAU, exact_rows_bwd, exact_rows_fwd, merge_, merge_scaled_, sgnexp

__all__ = [
    "aft_full_fwd_ref",
    "aft_full_bwd_ref",
    "aft_full_lowrank_fwd_ref",
    "aft_full_lowrank_bwd_ref",
    "AFTFullFunction",
]


def _heads_view(w: torch.Tensor) -> torch.Tensor:
    """(T, T) -> (1, T, T); (heads, T, T) unchanged."""
    return w.unsqueeze(0) if w.dim() == 2 else w


@torch.compiler.disable
def _fwd_head(wh, k, v, causal):
    """One head: returns (Z, lse), each (B, T, Dh), for the head's bias wh (T, T) and channel slices k, v.

    Data-dependent (it falls back to exact blocks for some rows), so torch.compile graph-breaks here.
    """
    B, T, Dh = k.shape
    ct = k.dtype
    tiny = _tiles.tiny(ct)
    M = torch.full((B, T, Dh), float("-inf"), dtype=ct, device=k.device)
    S = torch.zeros((B, T, Dh), dtype=ct, device=k.device)
    A = torch.zeros((B, T, Dh), dtype=ct, device=k.device)
    for j0 in range(0, T, TAU):
        j1 = min(j0 + TAU, T)
        if causal:
            # diagonal tile: exact per element (the row max must only see t' <= t)
            rows = range(j0, j1)
            l, mean = exact_rows_fwd(wh, k, v, rows, j0, j1, True)
            merge_(M[:, j0:j1], S[:, j0:j1], A[:, j0:j1], l, mean)
            r0 = j1  # rows below the tile see all of it
        else:
            r0 = 0
        if r0 >= T:
            continue
        wt = wh[r0:, j0:j1]  # (nr, tk)
        r_raw = wt.amax(dim=1)  # (nr,); -inf where the row's bias is masked over the whole tile
        r = safe_max(r_raw)
        Ew = torch.exp(wt - r[:, None])  # in [0, 1]
        kJ, vJ = k[:, j0:j1], v[:, j0:j1]
        m_raw = kJ.amax(dim=1)  # (B, Dh); -inf where the channel's keys are masked over the whole tile
        m = safe_max(m_raw)
        X = torch.exp(kJ - m[:, None])  # in [0, 1]
        nd = torch.matmul(Ew, torch.cat([X * vJ, X], dim=-1))  # (B, nr, 2 Dh): one GEMM
        n, d = nd[..., :Dh], nd[..., Dh:]
        # tile value = d * e^base, mean n / d; base = -inf: no visible key in this tile (d = 0, exactly)
        base = r_raw[None, :, None] + m_raw[:, None, :]
        # exactness guard: a row where some (b, c) denominator underflowed is recomputed exactly for this tile
        # (d = 0 with base = -inf is an exact empty tile, not an underflow)
        lost = ((d < tiny) & (base > float("-inf"))).any(dim=2).any(dim=0)  # (nr,)
        if bool(lost.any()):
            idx = lost.nonzero().flatten()
            l_ex, mean_ex = exact_rows_fwd(wh, k, v, idx + r0, j0, j1, causal)
            base[:, idx] = l_ex
            d[:, idx] = 1.0
            n[:, idx] = mean_ex
        merge_scaled_(M[:, r0:], S[:, r0:], A[:, r0:], base, n, d)
    # S = 0 only where no key is visible (every logit -inf, docs/design.md §7): Z = 0, lse = -inf there
    return A / torch.where(S == 0, torch.ones_like(S), S), M + torch.log(S)


def _forward(q, k, v, w, causal: bool):
    """(y in the compute dtype, lse): the forward of ``aft_full_fwd_ref`` before y is rounded to q's dtype."""
    B, T, D = q.shape
    heads = 1 if w.dim() == 2 else w.shape[0]
    ct = compute_dtype(q.dtype)
    if T == 0 or B * D == 0 or q.device.type == "meta":  # nothing to reduce over / shapes only
        return torch.zeros(B, T, D, dtype=ct, device=q.device), torch.zeros(B, T, D, dtype=ct, device=q.device)
    kc, vc, wc = k.to(ct), v.to(ct), _heads_view(w).to(ct)
    Dh = D // heads
    Z = torch.empty((B, T, D), dtype=ct, device=q.device)
    lse = torch.empty((B, T, D), dtype=ct, device=q.device)
    for h in range(heads):
        cs = slice(h * Dh, (h + 1) * Dh)
        Zh, lh = _fwd_head(wc[h], kc[:, :, cs], vc[:, :, cs], causal)
        Z[:, :, cs] = Zh
        lse[:, :, cs] = lh
    return torch.sigmoid(q.to(ct)) * Z, lse


def aft_full_fwd_ref(q, k, v, w, causal: bool = False):
    """Reference (pure-PyTorch) forward of AFT-full; same contract as ``torch.ops.attnfree.aft_full_fwd``.

    Args:
        q, k, v: (B, T, D), one floating dtype (fp16/bf16/fp32/fp64), one device. Non-contiguous inputs are fine.
        w: (T, T) or (heads, T, T) with D % heads == 0, q's dtype; channel c uses head c // (D // heads).
        causal: sum only over keys t' <= t.

    Returns:
        (y, lse): y (B, T, D) in q's dtype, y = sigmoid(q) * Z (AFT eq. 2, docs/design.md §1);
        lse (B, T, D) float32 (float64 for float64 inputs), lse[t, c] = log sum_t' exp(k[t', c] + w[t, t']).

    Algorithm (docs/design.md §2): math in float32 (float64 for float64 inputs). Keys are split into tiles of
    width ``TAU`` = 64; per tile the row max r[t] of w and the column max m[b, c] of k are subtracted, so both GEMM
    operands exp(w - r) and exp(k - m) lie in [0, 1]; the tile's log-magnitude l = r + m + log d and mean n / d are
    merged per (b, t, c) like an online softmax. Causal diagonal tiles are computed exactly per element (a
    (B, tau, tau, Dh) block); off-diagonal tiles are fully visible. Memory: O(T^2 + B*T*D) (w, a (T, tau) tile,
    a few (B, T, D) states, exact blocks of at most ``tiles.BLOCK_ELEMS`` elements); never (B, T, T, D).

    Tile bound / exactness guard: a factorised tile can only lose precision where its denominator d underflows,
    i.e. where inside one tile the row max of w and the column max of k sit at positions whose other factor is
    ~64 (fp32; ~666 fp64) log units below its own max. Such rows (d < 1e-28 fp32 / 1e-290 fp64 for any (b, c))
    are recomputed exactly for that tile, so finite inputs with |k| and |w| up to 1e4 give finite, exact results
    (up to the rounding of logits of that size in the compute dtype).
    """
    check_qkv(q, k, v)
    check_bias(w, q)
    y, lse = _forward(q, k, v, w, causal)
    return y.to(q.dtype), lse


@torch.compiler.disable
def _bwd_head(wh, k, v, G, H, lse, causal):
    """One head: returns (PG, PH, dwh) with PG = sum_t P G, PH = sum_t P H (B, T, Dh) and dwh (T, T)."""
    B, T, Dh = k.shape
    ct = k.dtype
    qlim = _tiles.qmax(ct)
    PG = torch.zeros_like(k)
    PH = torch.zeros_like(k)
    dwh = torch.zeros((T, T), dtype=ct, device=k.device)
    GH = torch.stack([G, H], dim=2)  # (B, T, 2, Dh)
    GHn = torch.stack([G, -H], dim=2)
    for j0 in range(0, T, TAU):
        j1 = min(j0 + TAU, T)
        if causal:
            rows = range(j0, j1)
            pg, ph, dwr = exact_rows_bwd(wh, k, v, G, H, lse, rows, j0, j1, True)
            PG[:, j0:j1] += pg
            PH[:, j0:j1] += ph
            dwh[j0:j1, j0:j1] += dwr
            r0 = j1
        else:
            r0 = 0
        if r0 >= T:
            continue
        kJ, vJ = k[:, j0:j1], v[:, j0:j1]
        nr = T - r0
        wt = wh[r0:, j0:j1]  # (nr, tk)
        a_raw = wt.amax(dim=1)  # (nr,); -inf: the row's bias is masked over the whole tile
        a = safe_max(a_raw)
        Ew = torch.exp(wt - a[:, None])  # in [0, 1]
        mu_raw = kJ.amax(dim=1)  # (B, Dh); -inf: the channel's keys are masked over the whole tile
        mu = safe_max(mu_raw)
        # La = -inf where P is 0 for the whole tile row: masked bias row, or lse = -inf (no visible key at all)
        lse_t = lse[:, r0:]
        La = torch.where(lse_t == float("-inf"), lse_t, a_raw[None, :, None] - lse_t)  # (B, nr, Dh)
        # log-gap of the factorisation: P[t, s, c] <= exp(Q[b, t, c]) with Q = a + mu - lse; lost products are
        # at most e^-87 * e^Q, so rows with max Q > qmax go to the exact block instead.
        Q = La + mu_raw[:, None, :]
        nu = Q.amax(dim=2).amax(dim=0)  # (nr,)
        bad = nu > qlim
        any_bad = bool(bad.any())
        if any_bad:
            La.masked_fill_(bad[None, :, None], float("-inf"))
            Q.masked_fill_(bad[None, :, None], float("-inf"))
            nu = nu.masked_fill(bad, 0.0)
        nu = safe_max(nu)  # -inf: no row of the tile sees a key of it
        # dv / sum P H part: P = Ew * R * exp(k + lam), R = exp(La - lam) <= 1
        lam = safe_max(La.amax(dim=1))  # (B, Dh)
        R = La.sub_(lam[:, None]).exp_()
        RGH = (GH[:, r0:] * R[:, :, None, :]).reshape(B, nr, 2 * Dh)
        gv = torch.matmul(Ew.t(), RGH)  # (B, tk, 2 Dh)
        s = kJ + lam[:, None]
        PG[:, j0:j1] += sgnexp(gv[..., :Dh], s)
        PH[:, j0:j1] += sgnexp(gv[..., Dh:], s)
        # dw part: P = Ew * Xt * Y * exp(nu), Xt = exp(Q - nu) <= 1, Y = exp(k - mu) <= 1
        Xt = Q.sub_(nu[None, :, None]).exp_()  # (B, nr, Dh)
        XGH = (GHn[:, r0:] * Xt[:, :, None, :]).reshape(B, nr, 2 * Dh)
        Y = torch.exp(kJ - mu[:, None])  # (B, tk, Dh)
        rhs = torch.cat([Y * vJ, Y], dim=-1)  # (B, tk, 2 Dh)
        g = torch.matmul(XGH, rhs.transpose(1, 2)).sum(dim=0)  # (nr, tk)
        dwh[r0:, j0:j1] += sgnexp(g, wt - a[:, None] + nu[:, None])
        if any_bad:
            idx = bad.nonzero().flatten() + r0
            pg, ph, dwr = exact_rows_bwd(wh, k, v, G, H, lse, idx, j0, j1, causal)
            PG[:, j0:j1] += pg
            PH[:, j0:j1] += ph
            dwh[idx, j0:j1] += dwr
    return PG, PH, dwh


def aft_full_bwd_ref(dy, q, k, v, w, y, lse, causal: bool = False):
    """Reference (pure-PyTorch) backward of AFT-full; same contract as ``torch.ops.attnfree.aft_full_bwd``.

    Args: dy (B, T, D); q, k, v, w as in ``aft_full_fwd_ref``; y, lse its outputs; causal as in the forward.
    y may be given in q's dtype (the contract) or unrounded in the compute dtype (what ``AFTFullFunction``
    saves for fp16/bf16 inputs); it is used as given (docs/design.md §3).
    Returns (dq, dk, dv, dw): dq/dk/dv (B, T, D) in q's dtype, dw with w's shape and dtype.

    Formulas (docs/design.md §3): P[t, t', c] = exp(k[t', c] + w[t, t'] - lse[t, c]) <= 1, G = dy * sigmoid(q),
    H = dy * y; dq = dy * y * (1 - sigmoid(q)); dv = sum_t P G; dk = v * dv - sum_t P H;
    dw[t, t'] = sum_{b, c in head} P (G v[t'] - H). Only q, k, v, w, y, lse are needed (everything else is
    recomputed per tile). Memory O(T^2 + B*T*D).

    Tile bound: per key tile, P = exp(w - a) * exp(a - lse + k) is split into factors in [0, 1] times
    exp(max); every accumulated term is bounded because P <= 1. The only loss mode is one factor underflowing
    inside a tile, which can drop a product of size at most e^-87 * e^Q (fp32; e^-708 * e^Q fp64) with
    Q = rowmax(w) + colmax(k) - lse the split-max gap of that row and tile. Rows with Q > 50 (fp32) / 670 (fp64)
    are computed exactly per element instead, so dropped products are < e^-37 of a probability.
    """
    check_qkv(q, k, v)
    check_bias(w, q)
    B, T, D = q.shape
    if T == 0 or B * D == 0 or q.device.type == "meta":  # nothing to reduce over / shapes only
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(w)
    dq, dk, dv, dw = _backward(dy, q, k, v, w, y, lse, causal)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), dw.to(w.dtype)


def _backward(dy, q, k, v, w, y, lse, causal):
    """(dq, dk, dv, dw) of ``aft_full_bwd_ref`` in the compute dtype, before rounding (dw with w's shape)."""
    B, T, D = q.shape
    heads = 1 if w.dim() == 2 else w.shape[0]
    ct = compute_dtype(q.dtype)
    dyc, qc, kc, vc, yc = (x.to(ct) for x in (dy, q, k, v, y))
    lsec = lse.to(ct)
    wc = _heads_view(w).to(ct)
    sig = torch.sigmoid(qc)
    G = dyc * sig
    Dh = D // heads
    H = dyc * yc
    dq = H * (1 - sig)
    dk = torch.empty((B, T, D), dtype=ct, device=q.device)
    dv = torch.empty((B, T, D), dtype=ct, device=q.device)
    dw = torch.empty(wc.shape, dtype=ct, device=q.device)
    for h in range(heads):
        cs = slice(h * Dh, (h + 1) * Dh)
        PG, PH, dwh = _bwd_head(wc[h], kc[:, :, cs], vc[:, :, cs], G[:, :, cs], H[:, :, cs], lsec[:, :, cs], causal)
        dv[:, :, cs] = PG
        dk[:, :, cs] = vc[:, :, cs] * PG - PH
        dw[h] = dwh
    return dq, dk, dv, dw.reshape(w.shape)


def aft_full_lowrank_fwd_ref(q, k, v, u, vb, causal: bool = False):
    """Reference forward of AFT-full with the factorised bias w = u @ vb^T; the contract of
    ``torch.ops.attnfree.aft_full_lowrank_fwd``. u, vb: (T, rank) or (heads, T, rank). Forms w (O(T^2) memory) and
    returns ``aft_full_fwd_ref(q, k, v, w, causal)``."""
    check_qkv(q, k, v)
    check_factors(u, vb, q)
    return aft_full_fwd_ref(q, k, v, u @ vb.transpose(-1, -2), causal)


def aft_full_lowrank_bwd_ref(dy, q, k, v, u, vb, y, lse, causal: bool = False):
    """Reference backward of ``aft_full_lowrank_fwd_ref``: (dq, dk, dv, du, dvb) with du = dw @ vb and
    dvb = dw^T @ u for the dw of ``aft_full_bwd_ref``."""
    check_qkv(q, k, v)
    check_factors(u, vb, q)
    B, T, D = q.shape
    if T == 0 or B * D == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(u), torch.zeros_like(vb)
    w = u @ vb.transpose(-1, -2)
    dq, dk, dv, dw = _backward(dy, q, k, v, w, y, lse, causal)  # dw unrounded, in the compute dtype
    ct = dw.dtype
    du = dw @ vb.to(ct)
    dvb = dw.transpose(-1, -2) @ u.to(ct)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), du.to(u.dtype), dvb.to(vb.dtype)


class AFTFullFunction(torch.autograd.Function):
    """Python-path autograd: forward saves q, k, v, w, y (unrounded, compute dtype) and lse only; the backward
    recomputes everything else per tile (docs/design.md §3)."""

    @staticmethod
    def forward(ctx, q, k, v, w, causal):
        y, lse = _forward(q, k, v, w, causal)
        ctx.save_for_backward(q, k, v, w, y, lse)
        ctx.causal = causal
        return y.to(q.dtype)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, w, y, lse = ctx.saved_tensors
        if _composite.double_backward_active():  # create_graph=True: a differentiable gradient (§3)
            return tuple(_composite.vjp(_composite.aft_full, (q, k, v, w, ctx.causal), ctx.needs_input_grad, dy))
        dq, dk, dv, dw = aft_full_bwd_ref(dy, q, k, v, w, y, lse, ctx.causal)
        return dq, dk, dv, dw, None


# ---------------------------------------------------------------- the python path as an opaque op, for tracing
# The tile loop is data-dependent (the exactness guard), so torch.compile(fullgraph=True) / torch.export cannot
# trace it; under tracing the public function calls this custom op instead (docs/design.md §6.2).
@torch.library.custom_op("attnfree_py::aft_full_fwd", mutates_args=())
def aft_full_fwd_traceable(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, lse) of the python path, both in the compute dtype (y unrounded, as ``AFTFullFunction`` saves it)."""
    y, lse = _forward(q, k, v, w, causal)
    return y, lse


@aft_full_fwd_traceable.register_fake
def _(q, k, v, w, causal):
    ct = compute_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=ct), q.new_empty(q.shape, dtype=ct)


@torch.library.custom_op("attnfree_py::aft_full_bwd", mutates_args=())
def aft_full_bwd_traceable(
    dy: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return aft_full_bwd_ref(dy, q, k, v, w, y, lse, causal)


@aft_full_bwd_traceable.register_fake
def _(dy, q, k, v, w, y, lse, causal):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(w)


def _traceable_setup(ctx, inputs, output):
    q, k, v, w, causal = inputs
    ctx.save_for_backward(q, k, v, w, *output)
    ctx.causal = causal


def _traceable_backward(ctx, dy, dlse):
    q, k, v, w, y, lse = ctx.saved_tensors
    if _composite.double_backward_active():
        return tuple(_composite.vjp(_composite.aft_full, (q, k, v, w, ctx.causal), ctx.needs_input_grad, dy))
    dq, dk, dv, dw = aft_full_bwd_traceable(dy.to(y.dtype), q, k, v, w, y, lse, ctx.causal)
    return dq, dk, dv, dw, None


aft_full_fwd_traceable.register_autograd(_traceable_backward, setup_context=_traceable_setup)
