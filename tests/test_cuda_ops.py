"""CUDA kernels of AFT-simple, AFT-local and the EA double normalisation (csrc/cuda, csrc/cuda_glue) on a GPU.

Skipped unless torch.cuda.is_available() and the CUDA kernels are registered (attnfree_ext._C built with nvcc).
Checks: float64 oracles (tests/oracles.py) and the python path on the same GPU, forward and backward; fp64
gradcheck through the public functions (compiled backend); fp16/bf16 by the 2x rule (max-abs error vs the float64
oracle at most 2x that of the python path in the same dtype, + 1e-4 abs floor); NaN-poisoned allocator before each
call (outputs must be fully written); large shapes (T = 16384, B*D >= 4096; forward vs python path); adversarial
numerics (|k|, |w| up to 1e4, causal late spike, eps = 0 with underflowing EA rows); non-contiguous inputs.
Errors are max-abs, relative to max(|reference|, 1) unless stated.
"""
from __future__ import annotations

import pytest
import torch

import attnfree_ext
import oracles
from attnfree_ext.ops.aft_local import aft_local_bwd_ref, aft_local_fwd_ref
from attnfree_ext.ops.aft_simple import aft_simple_bwd_ref, aft_simple_fwd_ref
from attnfree_ext.ops.ea import ea_double_norm_bwd_ref, ea_double_norm_fwd_ref

try:  # loading the extension registers the ops
    import attnfree_ext._C  # noqa: F401
except Exception:  # pragma: no cover - CPU-only or unbuilt
    pass

_OPS = ("aft_simple_fwd", "aft_simple_bwd", "aft_local_fwd", "aft_local_bwd", "ea_double_norm_fwd",
        "ea_double_norm_bwd")


def _registered() -> bool:
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"attnfree::{op}", "CUDA") for op in _OPS)
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not _registered(),
                                reason="needs a GPU and the attnfree CUDA kernels")
DEV = "cuda"
ops = torch.ops.attnfree


def _poison():
    """Fill the caching allocator's free blocks with NaN so that unwritten outputs show up."""
    free = torch.cuda.mem_get_info()[0]
    n = int(min(free // 4, 2**30) // 4)  # float32 elements: <= 1 GiB, at most a quarter of free memory
    x = torch.empty(n, dtype=torch.float32, device=DEV)
    x.fill_(float("nan"))
    del x
    for sz in (1 << 10, 1 << 16, 1 << 20):  # small pools too
        xs = [torch.full((sz,), float("nan"), device=DEV) for _ in range(8)]
        del xs


def _err(a, b):
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a.double() - b.double()).abs().max() / max(b.double().abs().max().item(), 1.0)).item()


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV, dtype=torch.float64) * scale).to(dtype)


def _grads(fn, inputs, dy):
    xs = [x.detach().double().requires_grad_(True) for x in inputs]
    return torch.autograd.grad(fn(*xs), xs, dy.double())


_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
SHAPES = [(2, 13, 5), (1, 1, 1), (1, 7, 1), (3, 37, 8), (2, 130, 33)]


# ------------------------------------------------------------------ AFT-simple
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_aft_simple_vs_oracle_and_python(dtype, causal, shape):
    q, k, v, dy = (_rand(*shape, dtype=dtype, seed=i, scale=3.0 if i == 1 else 1.0) for i in range(4))
    _poison()
    y, lse = ops.aft_simple_fwd(q, k, v, causal)
    assert y.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = _TOL[dtype]
    assert _err(y, oracles.aft_simple(q, k, v, causal)) < tol
    yr, lr = aft_simple_fwd_ref(q, k, v, causal)
    assert _err(y, yr) < tol and _err(lse, lr) < tol
    _poison()
    g = ops.aft_simple_bwd(dy, q, k, v, y, lse, causal)
    ref = _grads(lambda a, b, c: oracles.aft_simple(a, b, c, causal), (q, k, v), dy)
    gr = aft_simple_bwd_ref(dy, q, k, v, yr, lr, causal)
    for name, a, b, c in zip("qkv", g, ref, gr):
        assert _err(a, b) < tol, "d" + name
        assert _err(a, c) < tol, "d" + name + " vs python path"


@pytest.mark.parametrize("causal", [False, True])
def test_aft_simple_gradcheck_fp64(causal):
    q, k, v = (_rand(2, 9, 3, dtype=torch.float64, seed=i).requires_grad_(True) for i in range(3))
    with attnfree_ext.force_backend("compiled"):
        assert torch.autograd.gradcheck(lambda a, b, c: attnfree_ext.aft_simple(a, b, c, causal), (q, k, v))


# ------------------------------------------------------------------ AFT-local
LOCAL_CASES = [((2, 13, 4), 1, 0), ((2, 13, 4), 3, 2), ((3, 37, 6), 5, 3), ((1, 7, 2), 100, 1), ((1, 1, 1), 2, 0),
               ((2, 130, 33), 16, 0), ((1, 200, 64), 32, 4)]


def _w(T, heads, dtype, seed=7, scale=1.0):
    return _rand(T, T, dtype=dtype, seed=seed, scale=scale) if heads == 0 else _rand(heads, T, T, dtype=dtype,
                                                                                    seed=seed, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,window,heads", LOCAL_CASES)
def test_aft_local_vs_oracle_and_python(dtype, causal, shape, window, heads):
    q, k, v, dy = (_rand(*shape, dtype=dtype, seed=i) for i in range(4))
    w = _w(shape[1], heads, dtype)
    tol = _TOL[dtype]
    _poison()
    y, lse = ops.aft_local_fwd(q, k, v, w, window, causal)
    assert _err(y, oracles.aft_local(q, k, v, w, window, causal)) < tol
    yr, lr = aft_local_fwd_ref(q, k, v, w, window, causal)
    assert _err(y, yr) < tol and _err(lse, lr) < tol
    _poison()
    g = ops.aft_local_bwd(dy, q, k, v, w, y, lse, window, causal)
    assert g[3].shape == w.shape and g[3].dtype == w.dtype
    ref = _grads(lambda a, b, c, ww: oracles.aft_local(a, b, c, ww, window, causal), (q, k, v, w), dy)
    gr = aft_local_bwd_ref(dy, q, k, v, w, yr, lr, window, causal)
    for name, a, b, c in zip(("dq", "dk", "dv", "dw"), g, ref, gr):
        assert _err(a, b) < tol, name
        assert _err(a, c) < tol, name + " vs python path"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [0, 3])
def test_aft_local_gradcheck_fp64(causal, heads):
    q, k, v = (_rand(2, 11, 3, dtype=torch.float64, seed=i).requires_grad_(True) for i in range(3))
    w = _w(11, heads, torch.float64).requires_grad_(True)
    with attnfree_ext.force_backend("compiled"):
        assert torch.autograd.gradcheck(lambda a, b, c, ww: attnfree_ext.aft_local(a, b, c, ww, 3, causal),
                                        (q, k, v, w))


def test_aft_local_noncontiguous_and_w_dtype():
    base = _rand(2, 5, 13, dtype=torch.float32, seed=1)
    q = base.transpose(1, 2)  # (2, 13, 5), non-contiguous
    k = _rand(2, 5, 13, seed=2).transpose(1, 2)
    v = _rand(13, 2, 5, seed=3).transpose(0, 1)
    w = _rand(13, 13, seed=4).t()
    y, lse = ops.aft_local_fwd(q, k, v, w, 3, False)
    assert _err(y, oracles.aft_local(q, k, v, w, 3, False)) < 2e-5
    dy = _rand(2, 13, 5, seed=5)
    g = ops.aft_local_bwd(dy.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, w, y, lse, 3, False)
    ref = _grads(lambda a, b, c, ww: oracles.aft_local(a, b, c, ww, 3, False), (q, k, v, w), dy)
    for a, b in zip(g, ref):
        assert _err(a, b) < 2e-5


# ------------------------------------------------------------------ EA double normalisation
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [1e-9, 0.0])
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1), (2, 3, 40, 64), (130, 3), (4, 1000, 64)])
def test_ea_double_norm_vs_oracle_and_python(dtype, eps, shape):
    l = _rand(*shape, dtype=dtype, seed=1, scale=3.0)
    dout = _rand(*shape, dtype=dtype, seed=2)
    tol = _TOL[dtype]
    _poison()
    out, lse, rowsum = ops.ea_double_norm_fwd(l, eps)
    assert lse.shape == (*shape[:-2], 1, shape[-1]) and rowsum.shape == (*shape[:-1], 1)
    assert _err(out, oracles.ea_double_norm(l, eps)) < tol
    ro, rl, rr = ea_double_norm_fwd_ref(l, eps)
    assert _err(out, ro) < tol and _err(lse, rl) < tol and _err(rowsum, rr) < tol
    _poison()
    dl = ops.ea_double_norm_bwd(dout, l, out, lse, rowsum)
    (ref,) = _grads(lambda a: oracles.ea_double_norm(a, eps), (l,), dout)
    assert _err(dl, ref) < tol
    assert _err(dl, ea_double_norm_bwd_ref(dout, l, ro, rl, rr)) < tol


def test_ea_gradcheck_fp64():
    l = _rand(2, 6, 5, dtype=torch.float64, seed=3).requires_grad_(True)
    with attnfree_ext.force_backend("compiled"):
        assert torch.autograd.gradcheck(lambda a: attnfree_ext.ea_double_norm(a), (l,))


# ------------------------------------------------------------------ low precision: the 2x rule
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_two_x_rule(dtype, causal):
    shape, window = (2, 97, 24), 8
    q32, k32, v32, dy32 = (_rand(*shape, seed=i) for i in range(4))
    w32 = _rand(2, 97, 97, seed=9)
    q, k, v, dy, w = (x.to(dtype) for x in (q32, k32, v32, dy32, w32))

    def check(ours, python, ref, what):
        e_ours = (ours.double() - ref).abs().max().item()
        e_py = (python.double() - ref).abs().max().item()
        assert e_ours <= 2 * e_py + 1e-4, (what, e_ours, e_py)

    # references from the low-precision inputs, in float64
    y_ref = oracles.aft_simple(q, k, v, causal)
    y, lse = ops.aft_simple_fwd(q, k, v, causal)
    yp, lp = aft_simple_fwd_ref(q, k, v, causal)
    check(y, yp, y_ref, "simple y")
    g_ref = _grads(lambda a, b, c: oracles.aft_simple(a, b, c, causal), (q, k, v), dy)
    for a, b, r, n in zip(ops.aft_simple_bwd(dy, q, k, v, y, lse, causal),
                          aft_simple_bwd_ref(dy, q, k, v, yp, lp, causal), g_ref, "qkv"):
        check(a, b, r, "simple d" + n)
    y_ref = oracles.aft_local(q, k, v, w, window, causal)
    y, lse = ops.aft_local_fwd(q, k, v, w, window, causal)
    yp, lp = aft_local_fwd_ref(q, k, v, w, window, causal)
    check(y, yp, y_ref, "local y")
    g_ref = _grads(lambda a, b, c, ww: oracles.aft_local(a, b, c, ww, window, causal), (q, k, v, w), dy)
    for a, b, r, n in zip(ops.aft_local_bwd(dy, q, k, v, w, y, lse, window, causal),
                          aft_local_bwd_ref(dy, q, k, v, w, yp, lp, window, causal), g_ref, ("q", "k", "v", "w")):
        check(a, b, r, "local d" + n)
    l = _rand(3, 50, 64, seed=11, scale=3.0).to(dtype)
    o, ls, rs = ops.ea_double_norm_fwd(l, 1e-9)
    op_, lp_, rp_ = ea_double_norm_fwd_ref(l, 1e-9)
    check(o, op_, oracles.ea_double_norm(l), "ea out")
    do = _rand(3, 50, 64, seed=12).to(dtype)
    (gr,) = _grads(lambda a: oracles.ea_double_norm(a), (l,), do)
    check(ops.ea_double_norm_bwd(do, l, o, ls, rs), ea_double_norm_bwd_ref(do, l, op_, lp_, rp_), gr, "ea dl")


# ------------------------------------------------------------------ adversarial numerics
@pytest.mark.parametrize("causal", [False, True])
def test_adversarial_numerics(causal):
    T = 300
    q, v, dy = (_rand(2, T, 4, seed=i) for i in range(3))
    k = _rand(2, T, 4, seed=5)
    k[0, :, 0] = torch.linspace(-1e4, 1e4, T, device=DEV)
    k[0, :, 1] = -1e4
    k[1, 250, 2] = 3000.0  # late spike, >> 88 above every earlier key
    k[1, :, 3] = 1e4 * torch.sign(_rand(T, seed=6))
    w = _rand(T, T, seed=8, scale=1e4)
    y, lse = ops.aft_simple_fwd(q, k, v, causal)
    yr, lr = aft_simple_fwd_ref(q, k, v, causal)
    # the python path's own error is ~eps*|logit| (~2e-4 at |k| = 1e4, see ops/aft_local.py), ours is ~1e-7
    assert _err(y, oracles.aft_simple(q, k, v, causal)) < 1e-4 and _err(y, yr) < 2e-3
    for a in ops.aft_simple_bwd(dy, q, k, v, y, lse, causal):
        assert torch.isfinite(a).all()
    for window in (1, 7):
        y, lse = ops.aft_local_fwd(q, k, v, w, window, causal)
        assert _err(y, oracles.aft_local(q, k, v, w, window, causal)) < 1e-4
        for a in ops.aft_local_bwd(dy, q, k, v, w, y, lse, window, causal):
            assert torch.isfinite(a).all()
    l = _rand(2, 64, 16, seed=9, scale=1e4)
    l[0, 5] = -1e4
    for eps in (0.0, 1e-9):
        out, ls, rs = ops.ea_double_norm_fwd(l, eps)
        assert torch.isfinite(out).all() and torch.isfinite(rs).all()
        dl = ops.ea_double_norm_bwd(torch.ones_like(l), l, out, ls, rs)
        assert torch.isfinite(dl).all()


# ------------------------------------------------------------------ large shapes (grid limits), forward only
@pytest.mark.parametrize("B,T,D", [(1, 16384, 4096), (64, 16384, 64), (4096, 64, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_large_shapes_forward(B, T, D, causal):
    q, k, v = (_rand(B, T, D, dtype=torch.bfloat16, seed=i) for i in range(3))
    _poison()
    y, lse = ops.aft_simple_fwd(q, k, v, causal)
    yr, lr = aft_simple_fwd_ref(q, k, v, causal)
    assert _err(y.float(), yr.float()) < 2e-2 and _err(lse, lr) < 1e-4
    del yr, lr
    w = _rand(T, T, dtype=torch.bfloat16, seed=5)
    _poison()
    y, lse = ops.aft_local_fwd(q, k, v, w, 32, causal)
    yr, lr = aft_local_fwd_ref(q, k, v, w, 32, causal)
    assert _err(y.float(), yr.float()) < 2e-2 and _err(lse, lr) < 1e-4


def test_large_ea_forward():
    l = _rand(64, 16384, 64, dtype=torch.bfloat16, seed=1)
    _poison()
    out, lse, rs = ops.ea_double_norm_fwd(l, 1e-9)
    ro, rl, rr = ea_double_norm_fwd_ref(l, 1e-9)
    assert _err(out.float(), ro.float()) < 2e-2 and _err(lse, rl) < 1e-4 and _err(rs, rr) < 1e-4
