"""Drop-in replacements for aft-pytorch 0.2.2 (``from aft_pytorch import AFTFull, AFTSimple, AFTLocal``).

Same constructor signatures, same parameter names and state_dict keys (``to_q``, ``to_k``, ``to_v``, ``project``
Linear layers and, except for AFTSimple, ``wbias`` of shape (max_seqlen, max_seqlen)), same initialisation order
(so one seed gives the same weights), and the same outputs wherever aft-pytorch's are finite. A state_dict saved
from aft-pytorch loads with ``strict=True`` and vice versa. The AFT operator (Zhai et al. 2021, arXiv 2105.14103,
eq. 2) runs through :mod:`attnfree_ext.ops`: numerically stable and without aft-pytorch's per-call Python loops.

Differences (all where aft-pytorch departs from the paper or breaks):

- AFTFull / AFTLocal: aft-pytorch computes exp(w) @ exp(K) with no max subtraction, so its output becomes inf/NaN
  once |K + w| passes ~88 (float32); ours is finite for every finite input.
- AFTLocal: aft-pytorch rebuilds ``wbias`` on every call from a Python loop of max_seqlen^2 steps, replaces the
  Parameter by a new one (out-of-band entries permanently set to 0, detached from autograd, so ``wbias`` never
  receives a gradient and optimizers holding the old Parameter are left with a stale tensor). Ours keeps ``wbias``
  as is and masks the band |t - t'| < s on the fly (w outside the band taken as 0, the paper's choice); gradients
  flow into ``wbias`` (only band entries get a non-zero gradient) and the stored out-of-band values are untouched.
- T > max_seqlen: aft-pytorch fails with a shape error inside matmul; ours raises ValueError naming max_seqlen
  (AFTSimple, which has no bias, accepts any T in both).
- AFTSimple is non-causal in both: softmax of K over the T axis (dim 1), one context vector for all positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn._validate import as_dtype_of, check_tokens, finite_real, positive_int
from ..ops.aft_full import aft_full
from ..ops.aft_local import aft_local
from ..ops.aft_simple import aft_simple

__all__ = ["AFTFull", "AFTSimple", "AFTLocal"]


class _AFTPytorchBase(nn.Module):
    def __init__(self, max_seqlen, dim, hidden_dim, with_bias: bool):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.hidden_dim = positive_int("hidden_dim", hidden_dim)
        self.max_seqlen = positive_int("max_seqlen", max_seqlen)
        self.to_q = nn.Linear(dim, hidden_dim)
        self.to_k = nn.Linear(dim, hidden_dim)
        self.to_v = nn.Linear(dim, hidden_dim)
        self.project = nn.Linear(hidden_dim, dim)
        if with_bias:
            self.wbias = nn.Parameter(torch.empty(max_seqlen, max_seqlen))
            nn.init.xavier_uniform_(self.wbias)  # as aft-pytorch

    def _qkv(self, x, limit: bool = True):
        check_tokens(x, self.dim, self.max_seqlen if limit else None)
        return self.to_q(x), self.to_k(x), self.to_v(x)


class AFTFull(_AFTPytorchBase):
    """aft-pytorch ``AFTFull(max_seqlen, dim, hidden_dim=64)``: AFT-full (arXiv 2105.14103, eq. 2), one head.

    x (B, T, dim) -> (B, T, dim) for T <= max_seqlen, using ``wbias[:T, :T]``. Parameters: to_q, to_k, to_v
    (Linear(dim, hidden_dim)), project (Linear(hidden_dim, dim)), wbias (max_seqlen, max_seqlen), xavier-uniform.

    Differs from aft-pytorch only where its output is not finite (large |K + w|): ours stays finite.

    Raises:
        TypeError / ValueError at construction: ``s`` not a finite real number (e.g. ``"2"``, NaN), sizes not
            positive ints (each message names the argument).
        ValueError: x not (B, T, dim); T > max_seqlen (names max_seqlen).
    """

    def __init__(self, max_seqlen, dim, hidden_dim=64):
        super().__init__(max_seqlen, dim, hidden_dim, with_bias=True)

    def forward(self, x):
        q, k, v = self._qkv(x)
        T = x.shape[1]
        return self.project(aft_full(q, k, v, as_dtype_of(self.wbias[:T, :T], q), False))


class AFTSimple(_AFTPytorchBase):
    """aft-pytorch ``AFTSimple(max_seqlen, dim, hidden_dim=64)``: AFT-simple (arXiv 2105.14103, §3.2), non-causal.

    Y = sigmoid(Q) * sum_t softmax_t(K) * V, the softmax taken over the T axis. ``max_seqlen`` is accepted for
    signature compatibility and not used (any T works, as in aft-pytorch). Parameters: to_q, to_k, to_v, project.

    Raises:
        ValueError: x not (B, T, dim).
    """

    def __init__(self, max_seqlen, dim, hidden_dim=64):
        super().__init__(max_seqlen, dim, hidden_dim, with_bias=False)

    def forward(self, x):
        q, k, v = self._qkv(x, limit=False)
        return self.project(aft_simple(q, k, v, False))


class AFTLocal(_AFTPytorchBase):
    """aft-pytorch ``AFTLocal(max_seqlen, dim, hidden_dim=64, s=256)``: AFT-local (arXiv 2105.14103, §3.2).

    Bias ``wbias[t, t']`` where |t - t'| < s, 0 outside, non-causal. x (B, T, dim) -> (B, T, dim), T <= max_seqlen.

    Unlike aft-pytorch (which overwrites ``wbias`` with a detached, masked copy built by a Python loop on every
    call), the band is applied on the fly: ``wbias`` stays the same Parameter, keeps its out-of-band values, and
    receives gradients (zero outside the band). Outputs equal aft-pytorch's wherever those are finite; ours stay
    finite for large |K + w|. ``s`` may be any real, as in aft-pytorch (band |t - t'| < s); s <= 0 (no band)
    gives AFT-simple.

    Raises:
        TypeError / ValueError at construction: ``s`` not a finite real number (e.g. ``"2"``, NaN), sizes not
            positive ints (each message names the argument).
        ValueError: x not (B, T, dim); T > max_seqlen (names max_seqlen).
    """

    def __init__(self, max_seqlen, dim, hidden_dim=64, s=256):
        super().__init__(max_seqlen, dim, hidden_dim, with_bias=True)
        self.s = finite_real("s", s)

    def forward(self, x):
        q, k, v = self._qkv(x)
        T = x.shape[1]
        if self.s <= 0:  # empty band: w' = 0 everywhere
            return self.project(aft_simple(q, k, v, False))
        window = math.ceil(self.s)  # integer |t - t'| < s  <=>  |t - t'| < ceil(s)
        w = as_dtype_of(self.wbias[:T, :T], q)
        return self.project(aft_local(q, k, v, w, window, False, w_layout="full"))  # aft-pytorch's (T, T) wbias
