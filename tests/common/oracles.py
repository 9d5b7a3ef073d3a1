"""float64 oracles written straight from the papers' formulas (naive, small shapes only), and the eager
low-precision baselines of the 2x rule.

Each materialises the full (B, T, T, D) logits and uses logsumexp, so it is exact up to float64 rounding
for any finite input. Gradients come from autograd through these functions.
"""

from __future__ import annotations

import torch


def _bias_per_channel(w: torch.Tensor, D: int) -> torch.Tensor:
    """(T, T) or (heads, T, T) -> (T, T, D): channel c uses head c // (D // heads)."""
    if w.dim() == 2:
        return w[:, :, None].expand(*w.shape, D)
    heads = w.shape[0]
    return w.repeat_interleave(D // heads, dim=0).permute(1, 2, 0)


def aft(q, k, v, w, causal=False):
    """AFT eq. 2: sigma(q_t) * sum_t' softmax_t'(k_t' + w[t, t']) * v_t' (per channel)."""
    q, k, v, w = (x.double() for x in (q, k, v, w))
    B, T, D = q.shape
    logits = _bias_per_channel(w, D)[None] + k[:, None, :, :]  # (B, T, T', D)
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # t' > t
        logits = logits.masked_fill(mask[None, :, :, None], float("-inf"))
    p = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (p * v[:, None, :, :]).sum(dim=2)


def local_bias(w, window):
    """AFT-local bias: w where |t - t'| < window, 0 outside (the paper's choice, not -inf)."""
    T = w.shape[-1]
    idx = torch.arange(T, device=w.device)
    band = (idx[:, None] - idx[None, :]).abs() < window
    return torch.where(band, w, torch.zeros_like(w))


def aft_local(q, k, v, w, window, causal=False):
    return aft(q, k, v, local_bias(w.double(), window), causal)


def aft_simple(q, k, v, causal=False):
    T = q.shape[1]
    return aft(q, k, v, torch.zeros(T, T, dtype=torch.float64, device=q.device), causal)


def conv_bias(w, height, width):
    """AFT-conv bias (heads, HW, HW): w[i, s//2 + dy, s//2 + dx] from query (y, x) to key (y+dy, x+dx), else 0."""
    heads, s, _ = w.shape
    r = s // 2
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[None, :] - ys[:, None]  # key minus query
    dx = xs[None, :] - xs[:, None]
    inside = (dy.abs() <= r) & (dx.abs() <= r)
    iy = (dy + r).clamp(0, s - 1)
    ix = (dx + r).clamp(0, s - 1)
    wb = w.double()[:, iy, ix]  # (heads, HW, HW)
    return torch.where(inside[None].to(w.device), wb, torch.zeros_like(wb))


def aft_conv2d(q, k, v, w):
    """AFT-conv (paper 3.2): q, v (B, D, H, W); k (B, heads, H, W); w (heads, s, s)."""
    B, D, H, W = q.shape
    heads = k.shape[1]
    qt = q.double().flatten(2).transpose(1, 2)  # (B, HW, D)
    vt = v.double().flatten(2).transpose(1, 2)
    kt = k.double().flatten(2).transpose(1, 2).repeat_interleave(D // heads, dim=2)
    y = aft(qt, kt, vt, conv_bias(w, H, W))
    return y.transpose(1, 2).reshape(B, D, H, W)


def ea_double_norm(logits, eps=1e-9):
    """External attention: softmax over tokens N (dim -2), then divide by the sum over memory units S (+ eps)."""
    p = torch.softmax(logits.double(), dim=-2)
    return p / (p.sum(dim=-1, keepdim=True) + eps)


def talking_heads_attention(q, k, v, pre_weight, post_weight, pre_bias=None, post_bias=None, scale=None):
    """Shazeer et al. 2020 / CaiT: logits -> mix heads (P_l) -> softmax over keys -> mix heads (P_w) -> @ v."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, h, N, N)
    logits = torch.einsum("bhnm,gh->bgnm", logits, pre_weight.double())
    if pre_bias is not None:
        logits = logits + pre_bias.double()[None, :, None, None]
    a = logits.softmax(dim=-1)
    a = torch.einsum("bhnm,gh->bgnm", a, post_weight.double())
    if post_bias is not None:
        a = a + post_bias.double()[None, :, None, None]
    return a @ v


# ----------------------------------------------------------------------------------------- lse oracles
def causal_mask(T, device=None):
    """(T, T) bool, True where the key t' is after the query t (hidden when causal)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


def aft_lse(k, wfull, causal=False):
    """float64 lse[b, t, c] = logsumexp_t' (k[b, t', c] + wfull[t, t', c]) over the visible keys.

    ``wfull`` is the per-channel bias (T, T, D) (``bias_per_channel``), or None for w = 0.
    """
    k = k.double()
    B, T, D = k.shape
    if wfull is None:
        wfull = torch.zeros(T, T, D, dtype=torch.float64, device=k.device)
    logits = wfull.double()[None] + k[:, None]
    if causal:
        logits = logits.masked_fill(causal_mask(T, k.device)[None, :, :, None], float("-inf"))
    return torch.logsumexp(logits, dim=2)


def bias_per_channel(w, D):
    """Public name of ``_bias_per_channel``."""
    return _bias_per_channel(w, D)


# ----------------------------------------------------------------------------------------- eager baselines
def aft_eager(q, k, v, w=None, causal=False):
    """AFT eq. 2 computed naively in the inputs' own dtype (no float64 upcast, (B, T, T, D) logits): the baseline
    error of the low-precision 2x rule (docs/design.md §5). ``w`` None means w = 0 (AFT-simple)."""
    B, T, D = q.shape
    if w is None:
        w = torch.zeros(T, T, dtype=q.dtype, device=q.device)
    logits = _bias_per_channel(w, D)[None].to(q.dtype) + k[:, None, :, :]
    if causal:
        logits = logits.masked_fill(causal_mask(T, q.device)[None, :, :, None], float("-inf"))
    p = torch.softmax(logits, dim=2)
    return torch.sigmoid(q) * (p * v[:, None, :, :]).sum(dim=2)


def ea_double_norm_eager(x, eps):
    """The External-Attention / EANet double normalisation in x's own dtype."""
    p = x.softmax(dim=-2)
    return p / (p.sum(dim=-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------- masked (-inf) oracles
def _masked_softmax_weights(logits, dim):
    """exp(logits - max) with -inf logits excluded (weight 0, zero gradient) and a slice with no finite logit
    all 0 (never (-inf) - (-inf)); NaN logits propagate. Returns (weights, their sum over ``dim``)."""
    keep = logits != float("-inf")
    m = torch.where(keep, logits, float("-inf")).amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.where(keep, torch.exp(torch.where(keep, logits, torch.zeros_like(logits)) - m), torch.zeros_like(logits))
    return e, e.sum(dim=dim, keepdim=True)


def _safe_div(a, s):
    ok = s > 0
    return torch.where(ok, a / torch.where(ok, s, torch.ones_like(s)), torch.zeros_like(a))


def aft_masked_per_channel(q, k, v, wfull=None, causal=False):
    """AFT eq. 2 (float64) under docs/design.md §7 rules 3-4: a -inf logit (k or w) is an excluded key, a row
    with no finite logit gives y = 0; gradients through masked entries are 0. ``wfull``: per-channel bias
    (T, T, D) (``bias_per_channel`` / ``local_bias``) or None for w = 0. Returns (y, lse)."""
    q, k, v = q.double(), k.double(), v.double()
    B, T, D = q.shape
    if wfull is None:
        wfull = torch.zeros(T, T, D, dtype=torch.float64, device=q.device)
    logits = wfull.double()[None] + k[:, None]  # (B, T, T', D)
    if causal:
        logits = logits.masked_fill(causal_mask(T, q.device)[None, :, :, None], float("-inf"))
    e, s = _masked_softmax_weights(logits, 2)
    z = _safe_div((e * v[:, None]).sum(dim=2, keepdim=True), s).squeeze(2)
    return torch.sigmoid(q) * z, torch.logsumexp(logits.detach(), dim=2)


def ea_double_norm_masked(logits, eps=1e-9):
    """EA double normalisation (float64) under §7 rules 3-4: a -inf logit has p = 0, a column (memory unit) whose
    logits are all -inf has p = 0 (out = 0 there) and lse = -inf, a token with p = 0 for every unit gets out = 0.
    Returns (out, lse)."""
    x = logits.double()
    e, s = _masked_softmax_weights(x, -2)
    p = _safe_div(e, s)
    return _safe_div(p, p.sum(dim=-1, keepdim=True) + eps), torch.logsumexp(x.detach(), dim=-2, keepdim=True)


# ----------------------------------------------------------------------------------------- masked oracles (§7)
def aft_masked(q, k, v, w, causal=False, window=None, return_lse=False):
    """AFT eq. 2 in float64 with the masking rules of docs/design.md §7: a -inf logit (k or w) excludes that key,
    a row with no finite logit gives y = 0 and lse = -inf. ``w`` None means w = 0 (AFT-simple); ``window`` makes it
    AFT-local (w inside the band, 0 outside whatever w holds there). Differentiable by autograd: masked keys and
    all-masked rows get zero gradients."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, D = q.shape
    if w is None:
        w = torch.zeros(T, T, dtype=torch.float64, device=q.device)
    w = w.double()
    if window is not None:
        w = local_bias(w, window)
    logits = _bias_per_channel(w, D)[None] + k[:, None, :, :]  # (B, T, T', D)
    if causal:
        logits = logits.masked_fill(causal_mask(T, q.device)[None, :, :, None], float("-inf"))
    m = logits.detach().amax(dim=2, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # all-masked row: shift 0, e = 0
    e = torch.exp(logits - m)
    den = e.sum(dim=2)
    num = torch.where(e == 0, torch.zeros_like(e), e * v[:, None, :, :]).sum(dim=2)
    z = num / torch.where(den == 0, torch.ones_like(den), den)
    y = torch.sigmoid(q) * z
    if return_lse:
        return y, (m.squeeze(2) + torch.log(den)).detach()
    return y
