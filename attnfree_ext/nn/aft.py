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
from ..ops.common.dtypes import compute_dtype
from ..ops.common.state import check_state
from . import _decode
from ._validate import as_dtype_of, check_image, check_tokens, positive_int
from .state import AFTFullState, AFTLocalState

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

    def forward(self, x: torch.Tensor, state: AFTFullState | None = None, return_state: bool = False):
        """y = project(AFT(x)); with ``state`` / ``return_state`` (causal layers only) the chunk continues the
        sequence ``state`` ended and ``(y, new_state)`` is returned (:class:`AFTFullState`: the keys and values so
        far, docs/design.md §9.2). Output equals the full-sequence forward for any split into chunks."""
        if state is None and not return_state:
            q, k, v = self._qkv(x)
            return self.project(self._full(q, k, v, x.shape[1]))
        t0 = _start(self, x, state, return_state)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        t1 = t0 + x.shape[1]
        if state is None:
            y = self._full(q, k, v, t1)
            ct = compute_dtype(q.dtype)
            new = AFTFullState(k.to(ct), v.to(ct))
        else:
            _decode.check_full_state(state, q)
            y, new = _decode.full_step(q, k, v, self._bias_rows(t0, t1), state)
        y = self.project(y)
        return (y, new) if return_state else y

    def _full(self, q, k, v, T):
        if self.bias_rank is None:
            return aft_full(q, k, v, as_dtype_of(self.w[..., :T, :T], q), self.causal)
        u = as_dtype_of(self.bias_u[..., :T, :], q)
        vb = as_dtype_of(self.bias_v[..., :T, :], q)
        return aft_full_lowrank(q, k, v, u, vb, self.causal)

    def _bias_rows(self, t0, t1):
        """The bias rows of positions t0..t1-1 over keys 0..t1-1: (heads?, t1 - t0, t1)."""
        if self.bias_rank is None:
            return self.w[..., t0:t1, :t1]
        return self.bias_u[..., t0:t1, :] @ self.bias_v[..., :t1, :].transpose(-1, -2)


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

    def forward(self, x: torch.Tensor, state: AFTLocalState | None = None, return_state: bool = False):
        """y = project(AFT-local(x)); with ``state`` / ``return_state`` (causal layers only) the chunk continues the
        sequence ``state`` ended and ``(y, new_state)`` is returned (:class:`AFTLocalState`: a prefix summary of the
        keys older than the window plus the last window - 1 keys and values, docs/design.md §9.2). Output equals
        the full-sequence forward for any split into chunks."""
        if state is None and not return_state:
            q, k, v = self._qkv(x)
            T = x.shape[1]
            w = as_dtype_of(self.position_bias(T), q)
            return self.project(aft_local(q, k, v, w, self.window, self.causal, w_layout=self._w_layout))
        t0 = _start(self, x, state, return_state)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        t1 = t0 + x.shape[1]
        if state is None:
            y = aft_local(q, k, v, as_dtype_of(self.position_bias(t1), q), self.window, True, w_layout=self._w_layout)
            ct = compute_dtype(q.dtype)
            new = _decode.local_state(None, k.to(ct), v.to(ct), self.window, t1)
        else:
            _decode.check_local_state(state, q, self.window)
            ks = t0 - state.k.shape[1]  # position of the oldest cached key
            y, new = _decode.local_step(q, k, v, self._chunk_bias(t0, t1, ks), self.window, state)
        y = self.project(y)
        return (y, new) if return_state else y

    def _chunk_bias(self, t0: int, t1: int, ks: int) -> torch.Tensor:
        """Full-layout bias rows of positions t0..t1-1 over keys ks..t1-1 (0 outside the band), read from the banded
        ``w`` without forming its (T, T) expansion: O((t1 - t0) * (t1 - ks)) for a decoding chunk."""
        if self.w is None:
            return self.position_bias(t1)[..., t0:t1, ks:t1]
        Wp = min(self.window, self.max_seqlen)
        t = torch.arange(t0, t1, device=self.w.device)[:, None]
        j = torch.arange(ks, t1, device=self.w.device)[None, :] - t + (Wp - 1)  # the band index of (t, t')
        inside = (j >= 0) & (j <= 2 * Wp - 2)
        rows = self.w[..., t0:t1, :]
        rows = torch.gather(rows, -1, j.clamp(0, 2 * Wp - 2).expand(*rows.shape[:-1], j.shape[-1]))
        return torch.where(inside, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))

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

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None, return_state: bool = False):
        """y = project(AFT-simple(x)); with ``state`` / ``return_state`` (causal layers only) the chunk continues
        the sequence ``state`` ended and ``(y, new_state)`` is returned: the (B, 3, hidden_dim) state of
        :func:`attnfree_ext.aft_simple` (docs/design.md §9.1). Output equals the full-sequence forward for any
        split into chunks."""
        if state is None and not return_state:
            check_tokens(x, self.dim)
            y = aft_simple(self.to_q(x), self.to_k(x), self.to_v(x), self.causal)
            return self.project(y)
        _check_decoding(self, return_state)
        check_tokens(x, self.dim)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if state is not None:
            check_state("state", state, q)
        out = aft_simple(q, k, v, True, initial_state=state, output_final_state=return_state)
        if return_state:
            return self.project(out[0]), out[1]
        return self.project(out)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, causal={self.causal}"


def _check_decoding(layer, return_state) -> None:
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {type(return_state).__name__}")
    if not layer.causal:
        raise ValueError(
            f"{type(layer).__name__}: state / return_state need a causal layer (built with causal=True); a "
            "non-causal layer's rows see the whole sequence, so there is no state to carry"
        )


def _start(layer, x, state, return_state) -> int:
    """Checks of a decoding call of AFTFull / AFTLocal; returns the position of the chunk's first token."""
    _check_decoding(layer, return_state)
    check_tokens(x, layer.dim)
    want = AFTLocalState if isinstance(layer, AFTLocal) else AFTFullState
    if state is None:
        t0 = 0
    elif not isinstance(state, want):
        raise TypeError(
            f"state must be an {want.__name__} (from forward(..., return_state=True)), got {type(state).__name__}"
        )
    elif isinstance(state, AFTLocalState):
        t0 = state.offset
    else:
        t0 = state.k.shape[1] if isinstance(state.k, torch.Tensor) and state.k.dim() == 3 else 0
    if isinstance(t0, int) and t0 + x.shape[1] > layer.max_seqlen:
        raise ValueError(
            f"positions {t0}..{t0 + x.shape[1] - 1} exceed max_seqlen={layer.max_seqlen} this layer was built for "
            f"(the state has seen {t0} tokens)"
        )
    return t0


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
