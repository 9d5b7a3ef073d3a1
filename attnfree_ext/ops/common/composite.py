"""Differentiable composites: each op written in plain, differentiable torch ops (docs/design.md §3, §6.1, §7).

These are the naive formulas (AFT materialises its (B, T, T, D) logits; memory O(B·T²·D)), with the masking rules
of docs/design.md §7 (a −inf logit excludes a key; a row with no finite logit gives 0). They serve the autograd
transforms the kernels have no formula for:

* **double backward** (``create_graph=True``): the backward of every op, on every path, recomputes its gradient
  through these composites when grad mode is on during the backward (:func:`vjp`), so the result is itself
  differentiable (second-order terms included);
* **forward-mode AD** (``torch.autograd.forward_ad`` dual tensors, ``torch.func.jvp``) and the other functorch
  transforms: the public functions run these composites instead of the kernels (:func:`transform_active`).

Math in float32 for fp16/bf16/fp32 inputs (float64 for float64), results rounded to the input dtype.
"""

from __future__ import annotations

import torch

from .dtypes import compute_dtype

__all__ = [
    "aft_composite",
    "aft_local_bias",
    "ea_double_norm_composite",
    "transform_active",
    "vjp",
]


def _safe_softmax_parts(logits: torch.Tensor, dim: int):
    """(e, den) with e = exp(logits - m) and den = sum e, m the max over ``dim`` (detached: the result does not
    depend on it) with -inf maxima (no finite logit) replaced by 0 so that such rows give e = 0, den = 0."""
    m = logits.detach().amax(dim=dim, keepdim=True)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(logits - m)
    return e, e.sum(dim=dim, keepdim=True)


def _per_channel(w3: torch.Tensor, D: int) -> torch.Tensor:
    """(heads, T, T) -> (T, T, D): channel c uses head c // (D // heads)."""
    heads = w3.shape[0]
    return w3.repeat_interleave(D // heads, dim=0).permute(1, 2, 0)


def aft_local_bias(w: torch.Tensor, window: int) -> torch.Tensor:
    """w inside the band |t - t'| < window, 0 outside (whatever w holds there: it is never read)."""
    T = w.shape[-1]
    idx = torch.arange(T, device=w.device)
    band = (idx[:, None] - idx[None, :]).abs() < window
    return torch.where(band, w, torch.zeros_like(w))


def aft_composite(q, k, v, w, causal: bool):
    """AFT (eq. 2) for w (T, T), (heads, T, T) or None (w = 0), returning y in q's dtype (docs/design.md §1, §7)."""
    B, T, D = q.shape
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    if w is None:
        logits = kc[:, None, :, :].expand(B, T, T, D)
    else:
        w3 = w.to(ct).unsqueeze(0) if w.dim() == 2 else w.to(ct)
        logits = _per_channel(w3, D)[None] + kc[:, None, :, :]  # (B, T, T', D)
    if causal:
        hidden = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # t' > t
        logits = logits.masked_fill(hidden[None, :, :, None], float("-inf"))
    e, den = _safe_softmax_parts(logits, dim=2)
    # a key with weight 0 (masked, or hidden by causality) contributes nothing, even a NaN/inf v (§7 rule 2, 3)
    ev = torch.where(e == 0, torch.zeros_like(e), e * vc[:, None, :, :])
    num = ev.sum(dim=2)
    den = den.squeeze(2)
    Z = num / torch.where(den == 0, torch.ones_like(den), den)
    return (torch.sigmoid(qc) * Z).to(q.dtype)


def ea_double_norm_composite(logits, eps: float):
    """out = p / (sum_S p + eps), p the softmax over tokens (dim -2); a column with no finite logit has p = 0 and
    a token whose p is 0 for every unit gets 0 (also with eps = 0) (docs/design.md §7 rule 4)."""
    ct = compute_dtype(logits.dtype)
    e, den = _safe_softmax_parts(logits.to(ct), dim=-2)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    r = p.sum(dim=-1, keepdim=True) + eps
    return (p / torch.where(r == 0, torch.ones_like(r), r)).to(logits.dtype)


def vjp(composite, inputs, needs, dy):
    """Gradients of ``composite(*inputs)`` with cotangent dy, as a differentiable graph (the double-backward path).

    ``inputs``: the saved forward inputs (tensors or non-tensors); ``needs``: ``ctx.needs_input_grad``. Returns one
    entry per input: a tensor (zeros where unused) for differentiable inputs that need it, else None.
    """
    with torch.enable_grad():
        idx = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and needs[i]]
        if not idx:
            return [None] * len(inputs)
        # inputs that do not carry a graph (e.g. leaves of the first backward) still need one to differentiate
        xs = list(inputs)
        for i in idx:
            if not xs[i].requires_grad:
                xs[i] = xs[i].detach().requires_grad_(True)
        y = composite(*xs)
        grads = torch.autograd.grad(
            y, [xs[i] for i in idx], dy, create_graph=True, allow_unused=True, materialize_grads=True
        )
    out = [None] * len(inputs)
    for i, g in zip(idx, grads):
        out[i] = g
    return out


def _is_dual(t) -> bool:
    if not isinstance(t, torch.Tensor):
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):  # torch.func.jvp / vmap / grad
        return True
    return (
        torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
    )


def transform_active(*tensors) -> bool:
    """True when a forward-mode AD tangent or a functorch transform is attached to any input: the kernels have no
    forward-mode formula, so the public functions then run the differentiable composite (never while tracing
    with torch.compile / torch.export, which handle autograd themselves)."""
    if torch.compiler.is_compiling():
        return False
    return any(_is_dual(t) for t in tensors)


# ------------------------------------------------------------ the composites with each op's forward signature
def aft_full(q, k, v, w, causal=False):
    return aft_composite(q, k, v, w, causal)


def aft_local(q, k, v, w, window, causal=False):
    return aft_composite(q, k, v, aft_local_bias(w, window), causal)


def aft_simple(q, k, v, causal=False):
    return aft_composite(q, k, v, None, causal)


def ea_double_norm(logits, eps=1e-9):
    return ea_double_norm_composite(logits, eps)


def double_backward_active() -> bool:
    """True inside a backward run with ``create_graph=True`` (grad mode on), outside tracing: the gradient must then
    itself be differentiable, so the backward goes through :func:`vjp` of the composite."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()
