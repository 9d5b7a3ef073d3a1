"""AFT-local (Zhai et al. 2021, "An Attention Free Transformer", arXiv 2105.14103, eq. 2 and §3.2).

    y[t, c] = sigmoid(q[t, c]) * sum_t' softmax_t'(k[t', c] + w'[t, t']) * v[t', c]

with the local bias ``w'[t, t'] = w[t, t']`` where ``|t - t'| < window`` and ``0`` outside (the paper's choice:
0, not -inf, so every token stays connected through the 0-bias global term). Causal: keys t' <= t only.
``reference`` holds the pure-PyTorch path, ``compiled`` the capability record and the registrations of the
compiled ops (docs/design.md §1, §6).
"""

from __future__ import annotations

import torch

from ..common import composite as _composite
from ..common import dispatch
from ..common.checks import check_causal, check_qkv, check_window
from . import layout
from .compiled import CAPABILITY
from .reference import AFTLocalFunction

__all__ = ["aft_local", "CAPABILITY"]


def aft_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    window: int,
    causal: bool = False,
    *,
    w_layout: str | None = None,
) -> torch.Tensor:
    """AFT-local: AFT (eq. 2) with bias ``w`` inside ``|t - t'| < window`` and 0 outside (paper §3.2;
    docs/design.md §1).

    Args:
        q, k, v: (B, T, D) tensors of one dtype (float16, bfloat16, float32 or float64) and one device.
            Non-contiguous inputs are made contiguous once.
        w: position bias, same dtype and device as q, D % heads == 0, channel c uses head c // (D // heads); in
            one of two layouts (:mod:`attnfree_ext.ops.aft_local.layout`):
            full, (T, T) or (heads, T, T): ``w[h, t, t']``, only the band |t - t'| < window is read;
            band, (T, 2W - 1) or (heads, T, 2W - 1) with W = min(window, T): ``w[h, t, j]`` is the bias of key
            t' = t + j - (W - 1); entries whose key falls outside [0, T) are ignored. O(T * window) memory.
        window: int >= 1. window >= T gives aft_full with w everywhere; window == 1 keeps only w's diagonal.
        causal: a bool; if True, row t uses keys t' <= t only.
        w_layout: None (read the layout from w's shape: last dimension T means full, 2W - 1 band), "full" or
            "band". Required when the shape fits both (T == 2W - 1 > 1, e.g. T = 5, window = 3).

    Returns:
        y: (B, T, D) in q's dtype. Differentiable w.r.t. q, k, v and w; dw has w's shape and layout (0 outside the
        band). fp16/bf16 inputs are computed in float32.

    Raises:
        TypeError: non-tensor / non-floating inputs, mixed dtypes (w must match q), window not an int, causal not
            a bool.
        ValueError: wrong shapes (q, k, v not one (B, T, D) shape; w of neither layout, or not of the one
            w_layout names; D % heads != 0), a w shape that fits both layouts without w_layout, w_layout not
            None / "full" / "band", window < 1, tensors on different devices.

    Numerics: exact per-row softmax normalisation, finite for any finite input (|k|, |w| up to 1e4, causal
    late spikes); memory O(B*T*D + T*window) besides w and dw (never a (B, T, T, D) tensor; with the banded
    layout no T x T tensor either, except in the forward-mode / double-backward composites). See
    docs/design.md §1-§3.
    """
    check_qkv(q, k, v)
    # any positive int (sys.maxsize, 2**64): the band only ever covers T keys, and the compiled op takes an int64
    window = min(check_window(window), max(q.shape[1], 1))
    _, banded = layout.resolve(w, q, window, w_layout)
    check_causal(causal)
    if _composite.transform_active(q, k, v, w):  # forward-mode AD / functorch: no kernel formula (§6.1)
        return layout.composite(q, k, v, w, window, causal, banded)
    if dispatch.select("aft_local", q, k, v, w) == "compiled":
        return torch.ops.attnfree.aft_local_fwd(q, k, v, w, window, causal, banded)[0]
    return AFTLocalFunction.apply(q, k, v, w, window, causal, banded)
