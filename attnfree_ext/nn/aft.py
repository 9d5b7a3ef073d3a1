"""AFT layers (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103).

Token layers map ``x`` of shape (B, T, dim) to (B, T, dim); :class:`AFTConv2d` maps (B, dim, H, W) to the same
shape. Every layer projects ``x`` to Q, K, V with ``to_q``/``to_k``/``to_v`` (the parameter names of aft-pytorch, so
:mod:`attnfree_ext.compat.aft_pytorch` shares them), applies the AFT operator of eq. 2

    Y[t, c] = sigmoid(Q[t, c]) * sum_t' softmax_t'(K[t', c] + w[t, t']) * V[t', c]

through the functional ops of :mod:`attnfree_ext.ops` (numerically stable, no (B, T, T, D) tensor, compiled
kernels when available), and maps back with ``project``.

dtypes: the layers work in whatever dtype their parameters and the input share (float32, float64, float16,
bfloat16). Under autocast the projections give float16/bfloat16 Q, K, V; the float32 position bias is then cast to
that dtype before the op (the ops take the bias in Q's dtype) and the ops do their arithmetic in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.aft_conv import aft_conv2d
from ..ops.aft_full import aft_full, aft_full_lowrank
from ..ops.aft_local import aft_local
from ..ops.aft_local.layout import band_width, full_to_band
from ..ops.aft_simple import aft_simple
from ._validate import as_dtype_of, check_image, check_tokens, positive_int

__all__ = ["AFTFull", "AFTLocal", "AFTSimple", "AFTConv2d"]

#: standard deviation of the initial position bias (dense w, and each factor U, V of the factorised one).
BIAS_INIT_STD = 1e-2


class _AFTTokenBase(nn.Module):
    """Shared projections and position bias of AFTFull / AFTLocal."""

    def __init__(self, max_seqlen, dim, hidden_dim, heads, causal, bias_rank, bias_cols=None):
        super().__init__()
        self.max_seqlen = positive_int("max_seqlen", max_seqlen)
        self.dim = positive_int("dim", dim)
        self.hidden_dim = positive_int("hidden_dim", dim if hidden_dim is None else hidden_dim)
        self.heads = positive_int("heads", heads)
        if self.hidden_dim % self.heads != 0:
            raise ValueError(f"hidden_dim={self.hidden_dim} must be divisible by heads={self.heads}")
        self.causal = bool(causal)
        self.bias_rank = None if bias_rank is None else positive_int("bias_rank", bias_rank)

        self.to_q = nn.Linear(self.dim, self.hidden_dim)
        self.to_k = nn.Linear(self.dim, self.hidden_dim)
        self.to_v = nn.Linear(self.dim, self.hidden_dim)
        self.project = nn.Linear(self.hidden_dim, self.dim)

        lead = () if self.heads == 1 else (self.heads,)
        if self.bias_rank is None:
            # bias_cols: the last dimension of w (max_seqlen; AFTLocal: its band width)
            cols = self.max_seqlen if bias_cols is None else bias_cols
            self.w = nn.Parameter(torch.empty(*lead, self.max_seqlen, cols))
            self.bias_u = None
            self.bias_v = None
        else:
            self.w = None
            self.bias_u = nn.Parameter(torch.empty(*lead, self.max_seqlen, self.bias_rank))
            self.bias_v = nn.Parameter(torch.empty(*lead, self.max_seqlen, self.bias_rank))
        self.reset_bias()

    def reset_bias(self) -> None:
        """Re-initialise the position bias: w ~ N(0, BIAS_INIT_STD^2) (dense), or U, V ~ N(0, BIAS_INIT_STD^2).

        Small values start the layer close to AFT-simple (w = 0), the regime the paper trains from; with the
        factorised form the initial w = U V^T is of order bias_rank * 1e-4.
        """
        with torch.no_grad():
            for p in (self.w, self.bias_u, self.bias_v):
                if p is not None:
                    nn.init.normal_(p, mean=0.0, std=BIAS_INIT_STD)

    def position_bias(self, T: int | None = None) -> torch.Tensor:
        """The bias w[..., :T, :T] used for a length-T input, (T, T) or (heads, T, T); built as U V^T if factorised."""
        T = self.max_seqlen if T is None else T
        if self.bias_rank is None:
            return self.w[..., :T, :T]
        return self.bias_u[..., :T, :] @ self.bias_v[..., :T, :].transpose(-1, -2)

    def _qkv(self, x):
        check_tokens(x, self.dim, self.max_seqlen)
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def extra_repr(self) -> str:
        return (
            f"max_seqlen={self.max_seqlen}, dim={self.dim}, hidden_dim={self.hidden_dim}, heads={self.heads}, "
            f"causal={self.causal}, bias_rank={self.bias_rank}"
        )


class AFTFull(_AFTTokenBase):
    """AFT-full layer (Zhai et al. 2021, arXiv 2105.14103, eq. 2), optionally causal, multi-head or factorised.

    Args:
        max_seqlen: largest sequence length T accepted; the learned bias w is (max_seqlen, max_seqlen) and an input
            of length T <= max_seqlen uses w[..., :T, :T].
        dim: token width (input and output).
        hidden_dim: width of Q, K, V (default ``dim``). ``to_q``/``to_k``/``to_v`` are Linear(dim, hidden_dim),
            ``project`` is Linear(hidden_dim, dim).
        heads: number of position-bias heads; w gets shape (heads, max_seqlen, max_seqlen) when heads > 1 and
            channel c of Q/K/V uses head c // (hidden_dim // heads). hidden_dim % heads must be 0.
        causal: if True, token t only sees tokens t' <= t (paper §4.1, 4.2).
        bias_rank: if given (d'), the bias is factorised as w = U V^T with parameters ``bias_u``, ``bias_v`` of shape
            (heads?, max_seqlen, d'), initialised N(0, 1e-2^2) (paper §3.1, "factorized" position bias); the layer
            then calls :func:`attnfree_ext.ops.aft_full.aft_full_lowrank` so a compiled kernel can build w on the fly.

    Parameters ``w`` (dense bias, when ``bias_rank`` is None) are initialised N(0, 1e-2^2) (see ``reset_bias``).

    Shapes: x (B, T, dim) -> (B, T, dim), 1 <= T <= max_seqlen; output dtype = dtype of the projections' output.

    Raises:
        ValueError: bad constructor values (non-positive sizes, hidden_dim % heads != 0); x not (B, T, dim);
            T > max_seqlen (the message names max_seqlen).
        TypeError: non-int sizes; x not a tensor.
    """

    def __init__(self, max_seqlen, dim, hidden_dim=None, heads=1, causal=False, bias_rank=None):
        super().__init__(max_seqlen, dim, hidden_dim, heads, causal, bias_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        T = x.shape[1]
        if self.bias_rank is None:
            y = aft_full(q, k, v, as_dtype_of(self.w[..., :T, :T], q), self.causal)
        else:
            u = as_dtype_of(self.bias_u[..., :T, :], q)
            vb = as_dtype_of(self.bias_v[..., :T, :], q)
            y = aft_full_lowrank(q, k, v, u, vb, self.causal)
        return self.project(y)


class AFTLocal(_AFTTokenBase):
    """AFT-local layer (Zhai et al. 2021, arXiv 2105.14103, §3.2 "AFT-local").

    The learned bias is used only inside the band |t - t'| < window; outside it the bias is 0 (not -inf), so every
    token still sees every other one through the global, bias-free term. Arguments as :class:`AFTFull`, plus

        window: band half-width s >= 1 (window=1 keeps only the diagonal bias; window >= T equals AFT-full).

    With ``bias_rank`` the layer builds w = U V^T (sliced to T) and calls :func:`attnfree_ext.ops.aft_local.aft_local`.
    Parameters: ``w`` in the banded layout (heads?, max_seqlen, 2W - 1), W = min(window, max_seqlen): ``w[h, t, j]``
    is the bias between tokens t and t + j - (W - 1) (:mod:`attnfree_ext.ops.aft_local.layout`), O(max_seqlen *
    window) numbers; entries whose key falls outside [0, max_seqlen) are stored but unused (gradient 0). Or
    ``bias_u``/``bias_v`` (full (T, T) w = U V^T). A state_dict with the full (heads?, max_seqlen, max_seqlen) ``w``
    of earlier versions loads (converted to the band; the out-of-band entries, never used, are dropped).

    Shapes: x (B, T, dim) -> (B, T, dim), 1 <= T <= max_seqlen.

    Raises:
        ValueError: window < 1 and the errors of :class:`AFTFull` (T > max_seqlen names max_seqlen).
        TypeError: non-int window or sizes.
    """

    # 2: ``w`` is banded (earlier versions stored it as (heads?, max_seqlen, max_seqlen)); read by _load_full_w
    _version = 2

    def __init__(self, max_seqlen, dim, window, hidden_dim=None, heads=1, causal=False, bias_rank=None):
        window = positive_int("window", window)
        cols = band_width(positive_int("max_seqlen", max_seqlen), window)  # the band only: (heads?, max_seqlen, 2W - 1)
        super().__init__(max_seqlen, dim, hidden_dim, heads, causal, bias_rank, bias_cols=cols)
        self.window = window
        self._w_layout = "full" if self.w is None else "band"
        self._register_load_state_dict_pre_hook(_load_full_w, with_module=True)

    def position_bias(self, T: int | None = None) -> torch.Tensor:
        """The bias for a length-T input: banded (heads?, T, 2 min(window, T) - 1) (``w`` sliced to the rows :T
        and the diagonals |t - t'| < min(window, T)), or the full (heads?, T, T) U V^T when factorised."""
        T = self.max_seqlen if T is None else T
        if self.w is None:
            return super().position_bias(T)
        Wp = min(self.window, self.max_seqlen)
        W = min(self.window, max(T, 1))
        return self.w[..., :T, Wp - W : Wp + W - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        T = x.shape[1]
        w = as_dtype_of(self.position_bias(T), q)
        return self.project(aft_local(q, k, v, w, self.window, self.causal, w_layout=self._w_layout))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}"


def _load_full_w(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """load_state_dict pre-hook of AFTLocal: a full-layout ``w`` (heads?, max_seqlen, max_seqlen) of a state_dict
    saved before version 2 (or of any shape that is unambiguously full) becomes the banded layout."""
    key = prefix + "w"
    w = state_dict.get(key)
    if module.w is None or not isinstance(w, torch.Tensor) or w.dim() < 2:
        return
    n = module.max_seqlen
    full_shape = (*module.w.shape[:-2], n, n)
    old = local_metadata.get("version", 1) < 2
    if tuple(w.shape) == full_shape and (old or tuple(w.shape) != tuple(module.w.shape)):
        state_dict[key] = full_to_band(w, module.window)


class AFTSimple(nn.Module):
    """AFT-simple layer (Zhai et al. 2021, arXiv 2105.14103, §3.2 "AFT-simple"): w = 0, so

        Y = sigmoid(Q) * sum_t' softmax_t'(K) * V   (causal: a running, max-rescaled scan over t' <= t).

    Args:
        dim: token width; hidden_dim: width of Q, K, V (default ``dim``); causal: only t' <= t are visible.
    Non-causal output is the same for every t (apart from the sigmoid(Q) gate). No length limit, no bias.

    Shapes: x (B, T, dim) -> (B, T, dim), any T >= 1.

    Raises:
        ValueError / TypeError: bad sizes; x not a (B, T, dim) tensor.
    """

    def __init__(self, dim, hidden_dim=None, causal=False):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.hidden_dim = positive_int("hidden_dim", dim if hidden_dim is None else hidden_dim)
        self.causal = bool(causal)
        self.to_q = nn.Linear(self.dim, self.hidden_dim)
        self.to_k = nn.Linear(self.dim, self.hidden_dim)
        self.to_v = nn.Linear(self.dim, self.hidden_dim)
        self.project = nn.Linear(self.hidden_dim, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tokens(x, self.dim)
        y = aft_simple(self.to_q(x), self.to_k(x), self.to_v(x), self.causal)
        return self.project(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, causal={self.causal}"


class AFTConv2d(nn.Module):
    """AFT-conv layer for images (Zhai et al. 2021, arXiv 2105.14103, §3.2 "AFT-conv").

    x (B, dim, H, W) -> Q = to_q(x), V = to_v(x) (1x1 convs dim -> dim), K = to_k(x) (1x1 conv dim -> heads, one key
    channel per head), then per head i

        Y^i = sigmoid(Q^i) * [conv2d(e^{K^i} V^i, e^{w^i} - 1) + sum e^{K^i} V^i]
                           / [conv2d(e^{K^i}, e^{w^i} - 1) + sum e^{K^i}]

    (:func:`attnfree_ext.ops.aft_conv.aft_conv2d`, stable), and ``project`` (1x1 conv dim -> dim).
    The s x s kernel ``weight`` (heads, s, s) is reparameterised per head as in the paper:

        w_i = gamma_i * (weight_i - mean(weight_i)) / sqrt(var(weight_i) + eps) + beta_i

    with ``gamma``, ``beta`` (heads,) learned and initialised to 0, so training starts from AFT-simple over the image
    (w = 0); var is the population variance, eps = 1e-5. ``weight`` starts N(0, 1).

    Args:
        dim: channels (divisible by heads); heads: number of kernel heads; kernel_size: odd s >= 1.

    Shapes: x (B, dim, H, W) -> (B, dim, H, W).

    Raises:
        ValueError: even or non-positive kernel_size, dim % heads != 0, x not (B, dim, H, W).
        TypeError: non-int sizes; x not a tensor.
    """

    eps = 1e-5

    def __init__(self, dim, heads, kernel_size):
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.heads = positive_int("heads", heads)
        self.kernel_size = positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if self.dim % self.heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.to_q = nn.Conv2d(self.dim, self.dim, 1)
        self.to_k = nn.Conv2d(self.dim, self.heads, 1)
        self.to_v = nn.Conv2d(self.dim, self.dim, 1)
        self.project = nn.Conv2d(self.dim, self.dim, 1)
        s = self.kernel_size
        self.weight = nn.Parameter(torch.randn(self.heads, s, s))
        self.gamma = nn.Parameter(torch.zeros(self.heads))
        self.beta = nn.Parameter(torch.zeros(self.heads))

    def kernel(self) -> torch.Tensor:
        """The reparameterised kernel w (heads, s, s) that is passed to aft_conv2d."""
        wt = self.weight
        mean = wt.mean(dim=(1, 2), keepdim=True)
        var = wt.var(dim=(1, 2), keepdim=True, unbiased=False)
        wn = (wt - mean) / torch.sqrt(var + self.eps)
        return self.gamma[:, None, None] * wn + self.beta[:, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.dim)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return self.project(aft_conv2d(q, k, v, as_dtype_of(self.kernel(), q)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, kernel_size={self.kernel_size}"
