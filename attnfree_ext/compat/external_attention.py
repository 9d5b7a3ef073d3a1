"""Drop-in replacements for External-Attention-pytorch (xmu-xiaoma666/External-Attention-pytorch):
``model/attention/ExternalAttention.py`` (``ExternalAttention``) and ``model/attention/AFT.py`` (``AFT_FULL``).

Same constructor signatures, parameter names / state_dict keys, creation order and initialisation (Linear weights
N(0, 0.001), biases 0; so one seed gives the same weights), and the same outputs wherever the originals' are
finite. A state_dict saved from the original loads with ``strict=True`` and vice versa.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init

from ..nn._validate import check_tokens
from ..ops.aft_full import aft_full
from ..ops.aft_simple import aft_simple
from ..ops.ea_double_norm import ea_double_norm

__all__ = ["ExternalAttention", "AFT_FULL"]


def _init_like_original(module: nn.Module) -> None:
    """The originals' ``init_weights``: Linear weight ~ N(0, 0.001), bias 0 (they also touch Conv2d/BatchNorm2d,
    which these layers do not have)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                init.constant_(m.bias, 0)


class ExternalAttention(nn.Module):
    """External-Attention-pytorch ``ExternalAttention(d_model, S=64)`` (Guo et al. 2021, arXiv 2105.02358).

    queries (bs, n, d_model) -> ``mv(attn)``, ``attn = softmax over n of mk(queries)`` divided by its sum over the S
    memory units. Parameters: ``mk`` = Linear(d_model, S, bias=False), ``mv`` = Linear(S, d_model, bias=False).

    Differences from the original:

    - The double normalisation runs through :func:`attnfree_ext.ea_double_norm` with eps = 0 (the original adds no
      eps), computed in log space: where the original's row sum underflows to 0 (a token ~100 below the column
      maxima, e.g. logits of magnitude 1e3 in float32) it returns NaN (0/0); ours returns the exact finite value.
    - The original keeps an unused ``self.softmax = nn.Softmax(dim=1)`` module (no parameters); ours does too, for
      attribute compatibility. Only 3-D input (bs, n, d_model) is accepted (ValueError otherwise).
    """

    def __init__(self, d_model, S=64):
        super().__init__()
        self.mk = nn.Linear(d_model, S, bias=False)
        self.mv = nn.Linear(S, d_model, bias=False)
        self.softmax = nn.Softmax(dim=1)
        self.d_model = d_model
        self.S = S
        self.init_weights()

    def init_weights(self):
        _init_like_original(self)

    def forward(self, queries):
        check_tokens(queries, self.d_model, name="input", axes=("bs", "n", "d_model"))
        return self.mv(ea_double_norm(self.mk(queries), 0.0))


class AFT_FULL(nn.Module):
    """External-Attention-pytorch ``AFT_FULL(d_model, n=49, simple=False)`` (Zhai et al. 2021, arXiv 2105.14103, eq. 2).

    input (bs, T, d_model) -> ``sigmoid(fc_q(x)) * sum_t' exp(k[t'] + w[t, t']) v[t'] / sum_t' exp(k[t'] + w[t, t'])``
    with k = fc_k(x), v = fc_v(x) (per channel; sigmoid applied to q after the normalised sum, as in the original)
    and w = position_biases (n, n), initialised to ones. ``simple=True``: w = 0 (AFT-simple, non-causal).
    Parameters: ``fc_q``, ``fc_k``, ``fc_v`` (Linear(d_model, d_model)), ``position_biases`` (n, n) Parameter.

    Differences from the original:

    - Runs :func:`attnfree_ext.ops.aft_full.aft_full` / :func:`aft_simple` (stable, never builds the original's
      (T, bs, T, d_model) tensor, which it builds twice): the original overflows to inf/NaN once k + w passes ~88
      (float32); ours is finite for every finite input.
    - Accepts any T <= n, using ``position_biases[:T, :T]``; the original only works for T == n. T > n raises
      ValueError naming n.
    - ``simple=True``: the original stores ``position_biases = torch.zeros(n, n)`` as a plain attribute (not in the
      state_dict, left on the CPU by ``.to()``/``.cuda()``, which breaks it on a GPU); ours registers it as a
      non-persistent buffer (still not in the state_dict, so state_dicts match, but it follows the module's device)
      and calls aft_simple without reading it.
    """

    def __init__(self, d_model, n=49, simple=False):
        super().__init__()
        self.fc_q = nn.Linear(d_model, d_model)
        self.fc_k = nn.Linear(d_model, d_model)
        self.fc_v = nn.Linear(d_model, d_model)
        if simple:
            self.register_buffer("position_biases", torch.zeros((n, n)), persistent=False)
        else:
            self.position_biases = nn.Parameter(torch.ones((n, n)))
        self.d_model = d_model
        self.n = n
        self.simple = bool(simple)
        self.sigmoid = nn.Sigmoid()
        self.init_weights()

    def init_weights(self):
        _init_like_original(self)

    def forward(self, input):
        check_tokens(input, self.d_model, name="input", axes=("bs", "n", "d_model"))
        T = input.shape[1]
        if T > self.n:
            raise ValueError(
                f"sequence length {T} exceeds n={self.n} this layer was built for (position_biases is "
                f"({self.n}, {self.n})); build it with n >= {T}"
            )
        q = self.fc_q(input)
        k = self.fc_k(input)
        v = self.fc_v(input)
        if self.simple:
            return aft_simple(q, k, v)
        w = self.position_biases[:T, :T]
        if w.dtype != q.dtype:  # autocast: float16/bfloat16 projections, float32 parameter
            w = w.to(q.dtype)
        return aft_full(q, k, v, w)
