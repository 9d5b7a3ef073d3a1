"""Stable prefix / suffix softmax summaries along time, with no Python loop over T.

Used by the pure-PyTorch path of AFT-simple (causal) and AFT-local (the out-of-band, 0-bias keys).
All functions work on (B, T, D) tensors along dim 1 (time) in the caller's compute dtype (float32 or
float64) and are meant to run under ``torch.no_grad()`` (the ops have hand-written backward passes).

Summaries are kept in log space, built on ``torch.logcumsumexp`` (which maps an all ``-inf`` prefix to
``-inf`` without NaN; tested in tests/ops/test_aft_simple.py):

* ``lse[t] = log sum_{t' <= t} exp(k[t'])``
* ``mean[t] = sum_{t' <= t} exp(k[t'] - lse[t]) v[t']`` via the signed log trick
  ``lp = logcumsumexp(k + log relu(v))``, ``ln = logcumsumexp(k + log relu(-v))``,
  ``mean = exp(lp - lse) - exp(ln - lse)``.  Both exponents are ``<= log max|v|``, so nothing overflows;
  the subtraction costs an absolute error ~ ``eps * sum_t' P|v|`` (relative error ~eps unless the positive and
  negative parts nearly cancel).  Log-domain values are rounded to ~``eps * |value|``, so with logits of
  magnitude ``L`` results carry a relative error ~ ``eps * L`` (float32: 6e-8 * L).

Backward sums over *rows* of the form ``out[t'] = sum_{t in rows(t')} exp(k[t'] + a[t]) g[t]`` (with
``a = -lse``, so every exponent ``k[t'] - lse[t] <= 0`` when key t' is visible from row t) use the same trick:
``out = exp(k + rlcse(a + log g+)) - exp(k + rlcse(a + log g-))``, whose exponents are ``<= log sum |g|``.

Masks (docs/design.md §7 rules 3-4): a -inf logit is an absent key; a summary with no key has lse = -inf and
mean 0. Max shifts go through :func:`safe_max` (0 where the max is -inf) so that no (-inf) - (-inf) is formed, and
backward row weights through :func:`neg_lse` (rows with lse = -inf see no key and contribute 0). NaN propagates.

Memory: a constant number of (B, T, D) temporaries.
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def safe_max(m: torch.Tensor) -> torch.Tensor:
    """A max used as a shift, with -inf (no finite logit) replaced by 0: exp(-inf - 0) = 0, never exp(NaN).
    NaN stays NaN."""
    return torch.where(m == _NEG_INF, torch.zeros_like(m), m)


def neg_lse(lse: torch.Tensor) -> torch.Tensor:
    """-lse as a backward row weight, -inf where lse = -inf (a row with no visible key contributes nothing)."""
    return torch.where(lse == _NEG_INF, lse, -lse)


def signed_logs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log relu(x), log relu(-x)); log 0 = -inf."""
    return torch.log(torch.relu(x)), torch.log(torch.relu(-x))


def lcse(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Prefix logcumsumexp along ``dim``: out[t] = log sum_{s <= t} exp(x[s])."""
    return torch.logcumsumexp(x, dim=dim)


def rlcse(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Reverse (suffix) logcumsumexp along ``dim``: out[t] = log sum_{s >= t} exp(x[s])."""
    return torch.logcumsumexp(x.flip(dim), dim=dim).flip(dim)


def shift(x: torch.Tensor, s: int, fill: float, dim: int = 1) -> torch.Tensor:
    """out[t] = x[t - s] where 0 <= t - s < T, else ``fill`` (s > 0 delays, s < 0 advances)."""
    T = x.shape[dim]
    out = torch.full_like(x, fill)
    if abs(s) >= T:
        return out
    if s >= 0:
        out.narrow(dim, s, T - s).copy_(x.narrow(dim, 0, T - s))
    else:
        out.narrow(dim, 0, T + s).copy_(x.narrow(dim, -s, T + s))
    return out


def _mean_from_logs(lp: torch.Tensor, ln: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # exp(-inf - finite) = 0; an empty summary (lse = -inf, hence lp = ln = -inf) has mean 0.
    ls = safe_max(lse)
    return torch.exp(lp - ls) - torch.exp(ln - ls)


def prefix_summary(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax summary of keys t' <= t: (lse, mean), both (B, T, D).

    lse[t] = log sum_{t'<=t} exp(k[t']); mean[t] = sum_{t'<=t} softmax(k)[t'] v[t'].
    """
    lse = lcse(k)
    vp, vn = signed_logs(v)
    return lse, _mean_from_logs(lcse(k + vp), lcse(k + vn), lse)


def suffix_summary(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax summary of keys t' >= t: (lse, mean), both (B, T, D)."""
    lse = rlcse(k)
    vp, vn = signed_logs(v)
    return lse, _mean_from_logs(rlcse(k + vp), rlcse(k + vn), lse)


def rows_after(k: torch.Tensor, a: torch.Tensor, g: torch.Tensor, s: int = 0) -> torch.Tensor:
    """out[t'] = sum_{t >= t' + s} exp(k[t'] + a[t]) g[t]   (rows that see key t' as a prefix key).

    Stable when k[t'] + a[t] <= 0 for every pair summed (a = -lse): exponents stay <= log sum|g|.
    """
    gp, gn = signed_logs(g)
    rp = shift(rlcse(a + gp), -s, _NEG_INF)
    rn = shift(rlcse(a + gn), -s, _NEG_INF)
    return torch.exp(k + rp) - torch.exp(k + rn)


def rows_before(k: torch.Tensor, a: torch.Tensor, g: torch.Tensor, s: int = 0) -> torch.Tensor:
    """out[t'] = sum_{t <= t' - s} exp(k[t'] + a[t]) g[t]   (rows that see key t' as a suffix key)."""
    gp, gn = signed_logs(g)
    rp = shift(lcse(a + gp), s, _NEG_INF)
    rn = shift(lcse(a + gn), s, _NEG_INF)
    return torch.exp(k + rp) - torch.exp(k + rn)


def merge(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge softmax summaries [(lse_i, mean_i), ...] of disjoint key sets into one (lse, mean).

    Max-shifted (safe max); parts with lse = -inf (no keys) contribute nothing; where every part is empty the result
    is (lse, mean) = (-inf, 0).
    """
    m = parts[0][0]
    for l_i, _ in parts[1:]:
        m = torch.maximum(m, l_i)
    m = safe_max(m)
    s = torch.zeros_like(m)
    for l_i, _ in parts:
        s = s + torch.exp(l_i - m)
    lse = m + torch.log(s)
    ls = safe_max(lse)
    mean = torch.zeros_like(m)
    for l_i, mu in parts:
        mean = mean + torch.exp(l_i - ls) * mu
    return lse, mean
