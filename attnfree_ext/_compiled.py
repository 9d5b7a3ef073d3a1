"""Python-side registrations for the compiled ops ``torch.ops.attnfree.*`` (from attnfree_ext._C).

* ``torch.library.register_fake`` for every op (shapes/dtypes of the brief), so FakeTensor / torch.compile
  tracing works without running a kernel;
* ``torch.library.register_autograd`` on every ``*_fwd`` op, calling the matching ``*_bwd`` op. Only the first
  output (y / out) is differentiable; the gradient of lse (and rowsum) is ignored (they are saved statistics).
  So ``torch.ops.attnfree.aft_full_fwd(q, k, v, w, causal)[0]`` is differentiable and traceable with
  ``torch.compile(fullgraph=True)``.

Imported by attnfree_ext._backend after attnfree_ext._C loaded; importing it without the ops is a no-op.
"""
from __future__ import annotations

import torch

__all__ = ["registered_ops"]

_OPS = (
    "aft_full",
    "aft_local",
    "aft_simple",
    "ea_double_norm",
    "aft_full_lowrank",
)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.attnfree, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _fake_aft_fwd(q):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty(
        q.shape, dtype=_stat_dtype(q.dtype), device=q.device
    )


def _like(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _register() -> list[str]:
    done = []
    if not _has_op("aft_full_fwd"):
        return done
    lib = "attnfree::"

    # ---------------------------------------------------------------- fakes
    @torch.library.register_fake(lib + "aft_full_fwd")
    def _(q, k, v, w, causal):
        return _fake_aft_fwd(q)

    @torch.library.register_fake(lib + "aft_full_bwd")
    def _(dy, q, k, v, w, y, lse, causal):
        return _like(q), _like(q), _like(q), _like(w)

    @torch.library.register_fake(lib + "aft_local_fwd")
    def _(q, k, v, w, window, causal):
        return _fake_aft_fwd(q)

    @torch.library.register_fake(lib + "aft_local_bwd")
    def _(dy, q, k, v, w, y, lse, window, causal):
        return _like(q), _like(q), _like(q), _like(w)

    @torch.library.register_fake(lib + "aft_simple_fwd")
    def _(q, k, v, causal):
        return _fake_aft_fwd(q)

    @torch.library.register_fake(lib + "aft_simple_bwd")
    def _(dy, q, k, v, y, lse, causal):
        return _like(q), _like(q), _like(q)

    @torch.library.register_fake(lib + "ea_double_norm_fwd")
    def _(logits, eps):
        torch._check(logits.dim() >= 2, lambda: "logits must have at least 2 dimensions (..., N, S)")
        sd = _stat_dtype(logits.dtype)
        shp = tuple(logits.shape)
        out = torch.empty(shp, dtype=logits.dtype, device=logits.device)
        lse = torch.empty(shp[:-2] + (1, shp[-1]), dtype=sd, device=logits.device)
        rowsum = torch.empty(shp[:-1] + (1,), dtype=sd, device=logits.device)
        return out, lse, rowsum

    @torch.library.register_fake(lib + "ea_double_norm_bwd")
    def _(dout, logits, out, lse, rowsum):
        return _like(logits)

    @torch.library.register_fake(lib + "aft_full_lowrank_fwd")
    def _(q, k, v, u, vb, causal):
        return _fake_aft_fwd(q)

    @torch.library.register_fake(lib + "aft_full_lowrank_bwd")
    def _(dy, q, k, v, u, vb, y, lse, causal):
        return _like(q), _like(q), _like(q), _like(u), _like(vb)

    # ---------------------------------------------------------------- autograd
    def _setup_full(ctx, inputs, output):
        q, k, v, w, causal = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, w, y, lse)
        ctx.causal = causal

    def _bwd_full(ctx, dy, dlse):
        q, k, v, w, y, lse = ctx.saved_tensors
        dq, dk, dv, dw = torch.ops.attnfree.aft_full_bwd(dy, q, k, v, w, y, lse, ctx.causal)
        return dq, dk, dv, dw, None

    torch.library.register_autograd(lib + "aft_full_fwd", _bwd_full, setup_context=_setup_full)

    def _setup_local(ctx, inputs, output):
        q, k, v, w, window, causal = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, w, y, lse)
        ctx.window = window
        ctx.causal = causal

    def _bwd_local(ctx, dy, dlse):
        q, k, v, w, y, lse = ctx.saved_tensors
        dq, dk, dv, dw = torch.ops.attnfree.aft_local_bwd(dy, q, k, v, w, y, lse, ctx.window, ctx.causal)
        return dq, dk, dv, dw, None, None

    torch.library.register_autograd(lib + "aft_local_fwd", _bwd_local, setup_context=_setup_local)

    def _setup_simple(ctx, inputs, output):
        q, k, v, causal = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.causal = causal

    def _bwd_simple(ctx, dy, dlse):
        q, k, v, y, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.attnfree.aft_simple_bwd(dy, q, k, v, y, lse, ctx.causal)
        return dq, dk, dv, None

    torch.library.register_autograd(lib + "aft_simple_fwd", _bwd_simple, setup_context=_setup_simple)

    def _setup_ea(ctx, inputs, output):
        logits, eps = inputs
        out, lse, rowsum = output
        ctx.save_for_backward(logits, out, lse, rowsum)

    def _bwd_ea(ctx, dout, dlse, drowsum):
        logits, out, lse, rowsum = ctx.saved_tensors
        return torch.ops.attnfree.ea_double_norm_bwd(dout, logits, out, lse, rowsum), None

    torch.library.register_autograd(lib + "ea_double_norm_fwd", _bwd_ea, setup_context=_setup_ea)

    def _setup_lowrank(ctx, inputs, output):
        q, k, v, u, vb, causal = inputs
        y, lse = output
        ctx.save_for_backward(q, k, v, u, vb, y, lse)
        ctx.causal = causal

    def _bwd_lowrank(ctx, dy, dlse):
        q, k, v, u, vb, y, lse = ctx.saved_tensors
        dq, dk, dv, du, dvb = torch.ops.attnfree.aft_full_lowrank_bwd(dy, q, k, v, u, vb, y, lse, ctx.causal)
        return dq, dk, dv, du, dvb, None

    torch.library.register_autograd(lib + "aft_full_lowrank_fwd", _bwd_lowrank, setup_context=_setup_lowrank)

    return [op for op in _OPS if _has_op(op + "_fwd")]


registered_ops = _register()
