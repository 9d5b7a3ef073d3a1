"""docs/design.md §7 rules 3-4 on the CUDA kernels: -inf in k or w is a mask (an excluded key, zero gradient), a
row with no finite logit gives y = 0, lse = -inf and zero gradients; EA: a -inf logit has p = 0, a column of all
-inf logits gives out = 0 there and lse = -inf. Against the float64 masked oracles of tests/common/oracles.py.

Every op on every path it has (python, compiled CPU, CUDA, emulation); float64 exercises the scalar CPU kernels,
float32 the vectorised ones where the CPU has AVX2.
"""

from __future__ import annotations

import pytest
import torch

from common import oracles
from common.metrics import rel_err

NINF = float("-inf")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _g(x):
    return x.detach().double().requires_grad_()


def _check(got, ref, tol, what):
    assert torch.isfinite(got).all(), (what, "non-finite")
    assert rel_err(got, ref, max(ref.abs().max().item(), 1.0)) < tol, (what, rel_err(got, ref))


def _check_lse(lse, ref, tol):
    dead = ref == NINF
    assert (lse[dead] == NINF).all(), "lse of a row with no finite logit must be -inf"
    assert torch.isfinite(lse[~dead]).all()
    _check(lse[~dead], ref[~dead], tol, "lse")


def _qkv(B, T, D, dtype, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    k[0, 5 % T, 1] = NINF  # one masked key of one channel
    k[0, :, 0][::3] = NINF  # every third key of a channel
    if B > 1:
        k[1, :, D - 1] = NINF  # a channel with every key masked: every row has no finite logit
    if causal:
        k[0, 0, 2] = NINF  # causal row 0 of channel 2 sees only this key
    dy = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), dy.to(dtype)


def _mask_w(w, T):
    w = w.clone()
    w[..., 3 % T, :] = NINF  # a query row whose every bias is -inf: no finite logit
    w[..., 7 % T, 2 % T] = NINF
    w[..., :, 4 % T] = NINF  # one key excluded from every row
    return w


@pytest.mark.paths("python", "compiled-cpu", "cuda", "emulation", op="aft_simple")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [4, 67])  # 67: more than one 64-channel task of the CPU kernels, a vector tail
def test_mask_aft_simple(path, causal, dtype, D):
    q, k, v, dy = _qkv(2, 19, D, dtype, causal)
    y, lse = path.fwd("aft_simple", q, k, v, causal)
    dq, dk, dv = path.bwd("aft_simple", dy, q, k, v, y, lse, causal)
    qd, kd, vd = _g(q), _g(k), _g(v)
    yo, lo = oracles.aft_masked_per_channel(qd, kd, vd, None, causal)
    go = torch.autograd.grad(yo, (qd, kd, vd), dy.double())
    tol = TOL[dtype]
    _check(y, yo, tol, "y")
    _check_lse(lse, lo, tol)
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), go):
        _check(a, b, tol, name)
    assert (dk[k == NINF] == 0).all() and (dv[k == NINF] == 0).all()


@pytest.mark.paths("python", "compiled-cpu", "cuda", "emulation", op="aft_local")
@pytest.mark.parametrize("part", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [3, 20, 100])
@pytest.mark.parametrize("T", [17, 200])
def test_mask_aft_local(path, causal, dtype, window, T, part):
    """T = 200 spans four 64-key tiles of the CPU banded-tile kernel: in channel 3 of batch 0 the keys of tile 0
    have logits near -200 and tile 1 is masked entirely, so a far-state or union scale of exp(0 - (-200)) would
    meet sums of 0 (0 * inf)."""
    B, D, heads = 2, 4, 2
    q, k, v, dy = _qkv(B, T, D, dtype, causal)
    if T > 128:
        k[0, :64, 3] = k[0, :64, 3] - 200
        k[0, 64:128, 3] = NINF
    w = torch.randn(heads, T, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    idx = torch.arange(T)
    band = (idx[:, None] - idx[None, :]).abs() < window
    w = torch.where(band & (torch.rand(T, T, generator=torch.Generator().manual_seed(2)) < 0.3), NINF, w)
    w = w.to(dtype)
    qd, kd, vd, wd = _g(q), _g(k), _g(v), _g(w)
    yo, lo = oracles.aft_masked_per_channel(
        qd, kd, vd, oracles.bias_per_channel(oracles.local_bias(wd, window), D), causal
    )
    tol = TOL[dtype]
    y, lse = path.fwd("aft_local", q, k, v, w, window, causal)
    if part == "fwd":
        _check(y, yo, tol, "y")
        _check_lse(lse, lo, tol)
        return
    # the backward from the oracle's (y, lse), so that it is tested on its own
    y, lse = yo.detach().to(dtype), lo.detach().to(lse.dtype)
    dq, dk, dv, dw = path.bwd("aft_local", dy, q, k, v, w, y, lse, window, causal)
    go = torch.autograd.grad(yo, (qd, kd, vd, wd), dy.double())
    for name, a, b in zip(("dq", "dk", "dv", "dw"), (dq, dk, dv, dw), go):
        _check(a, b, tol, name)
    assert (dw[w == NINF] == 0).all()


@pytest.mark.paths("python", "compiled-cpu", "cuda", "emulation", op="aft_full")
@pytest.mark.parametrize("kernel", ["tiled", "exact"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T", [13, 70])
def test_mask_aft_full(path, causal, dtype, kernel, T, monkeypatch):
    """The tiled kernels (emulation: dense fp64 SIMT / tensor-core fp32 3xTF32; compiled CPU: ATTNFREE_AFT_FULL_KERNEL
    =tiled, the scalar 64-key tiles in float64 and the AVX2 kernel in float32) and the exact ones
    (ATTNFREE_AFT_FULL_KERNEL=exact), and the python path; T = 70 spans two 64-key tiles, with a tile whose keys
    are all masked in one channel."""
    if not path.compiled and kernel == "exact":
        pytest.skip("the python path has one kernel")
    if path.emulated and kernel == "tiled" and dtype == torch.float64:
        pytest.skip("float64 always runs the exact/SIMT kernels")
    if kernel == "exact" or not path.emulated:
        monkeypatch.setenv("ATTNFREE_AFT_FULL_KERNEL", kernel)
    B, D, heads = 2, 4, 2
    q, k, v, dy = _qkv(B, T, D, dtype, causal)
    if T > 64:
        k[0, 64:, 3] = NINF
    w = _mask_w(torch.randn(heads, T, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64), T)
    w = w.to(dtype)
    y, lse = path.fwd("aft_full", q, k, v, w, causal)
    dq, dk, dv, dw = path.bwd("aft_full", dy, q, k, v, w, y, lse, causal)
    qd, kd, vd, wd = _g(q), _g(k), _g(v), _g(w)
    yo, lo = oracles.aft_masked_per_channel(qd, kd, vd, oracles.bias_per_channel(wd, D), causal)
    go = torch.autograd.grad(yo, (qd, kd, vd, wd), dy.double())
    tol = TOL[dtype]
    _check(y, yo, tol, "y")
    _check_lse(lse, lo, tol)
    for name, a, b in zip(("dq", "dk", "dv", "dw"), (dq, dk, dv, dw), go):
        _check(a, b, tol, name)
    assert (dw[w == NINF] == 0).all() and (dk[k == NINF] == 0).all()


@pytest.mark.paths("python", "compiled-cpu", "cuda", "emulation")
@pytest.mark.paths(op="ea_double_norm")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-9, 0.0])
@pytest.mark.parametrize("S", [40, 13])  # 13: the AVX2 kernels' masked S tail (5 of 8 lanes)
def test_mask_ea_double_norm(path, dtype, eps, S):
    """EA on the CUDA kernels (emulation), the compiled CPU kernels (scalar float64, AVX2 float32) and the Python
    path."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, S, generator=g, dtype=torch.float64)
    x[0, :, 3] = NINF  # a memory unit with all -inf logits: out = 0 in that column, lse = -inf
    x[1, 2, :] = NINF  # a token masked from every unit: out = 0 in that row
    x[1, ::2, 7] = NINF
    x = x.to(dtype)
    dout = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    out, lse, rowsum = path.fwd("ea_double_norm", x, eps)
    dl = path.bwd("ea_double_norm", dout, x, out, lse, rowsum)
    xd = _g(x)
    oo, lo = oracles.ea_double_norm_masked(xd, eps)
    (go,) = torch.autograd.grad(oo, (xd,), dout.double())
    tol = TOL.get(dtype, 1e-2)  # bfloat16: out rounded to 8 bits; the backward rebuilds p / rowsum in float32
    _check(out, oo, tol, "out")
    assert (out[0, :, 3] == 0).all() and (out[1, 2, :] == 0).all()
    _check_lse(lse, lo, tol)
    _check(dl, go, tol, "dlogits")
    assert (dl[x == NINF] == 0).all()
