"""AFT-conv (paper §3.2) against the float64 oracle (tests/common/oracles.py: conv_bias, aft_conv2d).

aft_conv2d is Python-only; it calls aft_full, so it runs over aft_full's paths (python, compiled CPU, CUDA).
Error metric: ``err`` (tests/common/metrics.py), max-abs error divided by max(max |reference|, 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnfree_ext.ops.aft_conv import aft_conv2d, conv_bias
from common import oracles
from common.metrics import err

OP = "aft_full"  # the paths aft_conv2d runs on are those of the aft_full call inside it


def make(B, D, H, W, heads, s, dtype):
    q = torch.randn(B, D, H, W, dtype=torch.float64)
    v = torch.randn(B, D, H, W, dtype=torch.float64)
    k = torch.randn(B, heads, H, W, dtype=torch.float64)
    w = torch.randn(heads, s, s, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, w)]


def grads(fn, xs, dy):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    y = fn(*xs)
    return y, torch.autograd.grad(y, xs, dy.to(y.dtype))


def run(path, q, k, v, w, dy):
    return path.grads(aft_conv2d, (q, k, v, w), dy)


SHAPES = [  # (B, D, H, W, heads, s)
    (1, 1, 1, 1, 1, 1),
    (2, 4, 5, 7, 2, 3),
    (1, 6, 9, 9, 3, 5),
    (2, 3, 3, 4, 1, 7),  # kernel larger than the image
    (1, 4, 13, 11, 4, 3),  # T = 143 > 2 tiles
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,D,H,W,heads,s", SHAPES)
def test_matches_oracle(path, B, D, H, W, heads, s, dtype):
    q, k, v, w = make(B, D, H, W, heads, s, dtype)
    dy = torch.randn(B, D, H, W, dtype=torch.float64)
    y, g = run(path, q, k, v, w, dy)
    yo, go = grads(oracles.aft_conv2d, (q.double(), k.double(), v.double(), w.double()), dy)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert y.shape == (B, D, H, W) and y.dtype == dtype
    assert err(y, yo) < tol
    for name, a, b in zip("qkvw", g, go):
        assert a.shape == b.shape and a.dtype == dtype, name
        assert err(a, b) < tol, name


def test_conv_bias_matches_oracle_and_convention():
    w = torch.randn(2, 3, 3, dtype=torch.float64)
    H, W = 4, 5
    bias = conv_bias(w, H, W)
    assert torch.equal(bias, oracles.conv_bias(w, H, W))
    # F.conv2d convention: sum over keys of bias * x equals conv2d(x, w) restricted to the neighbourhood
    x = torch.randn(1, 1, H, W, dtype=torch.float64)
    conv = F.conv2d(x.expand(1, 2, H, W), w[:, None], padding=1, groups=2)  # (1, 2, H, W)
    via_bias = torch.einsum("hts,s->ht", bias, x.flatten()).reshape(1, 2, H, W)
    assert torch.allclose(conv, via_bias)


def test_paper_form(path):
    """Paper §3.2 formula with F.conv2d and e^w - 1 equals the op (one head, float64)."""
    B, D, H, W, heads, s = 2, 3, 6, 5, 1, 3
    q, k, v, w = make(B, D, H, W, heads, s, torch.float64)
    ek = torch.exp(k)  # (B, 1, H, W), shared over D channels
    kern = (torch.exp(w) - 1)[:, None].expand(D, 1, s, s)
    num = F.conv2d(ek * v, kern, padding=s // 2, groups=D) + (ek * v).sum(dim=(2, 3), keepdim=True)
    den = F.conv2d(ek.expand(B, D, H, W), kern, padding=s // 2, groups=D) + ek.sum(dim=(2, 3), keepdim=True)
    ref = torch.sigmoid(q) * num / den
    with path.force():
        assert err(aft_conv2d(*path.put((q, k, v, w))).cpu(), ref) < 1e-12


def test_non_contiguous_and_gradcheck(path):
    B, D, H, W, heads, s = 1, 2, 3, 4, 2, 3
    q = torch.randn(B, D, W, H, dtype=torch.float64).transpose(2, 3)
    v = torch.randn(B, 2 * D, H, W, dtype=torch.float64)[:, ::2]
    k = torch.randn(B, heads, H, W, dtype=torch.float64)
    w = torch.randn(heads, s, s, dtype=torch.float64).transpose(1, 2)
    q, v, k, w = (path.put(x).requires_grad_() for x in (q, v, k, w))
    with path.force():
        assert torch.autograd.gradcheck(aft_conv2d, (q, k, v, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_finite_and_close(path, dtype):
    """Low precision: math is float32 inside, so the error is the final rounding to the low dtype."""
    q, k, v, w = make(2, 4, 6, 6, 2, 3, dtype)
    dy = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    y, g = run(path, q, k, v, w, dy)
    yo, go = grads(oracles.aft_conv2d, (q.double(), k.double(), v.double(), w.double()), dy)
    eps = torch.finfo(dtype).eps
    assert y.dtype == dtype and err(y, yo) < 2 * eps
    for a, b in zip(g, go):
        assert torch.isfinite(a).all() and err(a, b) < 4 * eps


def test_large_values_finite(path):
    q, k, v, w = make(1, 4, 5, 5, 2, 3, torch.float32)
    k = k * 1e4
    w = w * 1e3
    y, g = run(path, q, k, v, w, torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert torch.isfinite(y).all() and all(torch.isfinite(x).all() for x in g)


@pytest.mark.parametrize(
    "shapes,exc,match",
    [
        (((1, 4, 5, 5), (1, 2, 5, 5), (1, 4, 5, 5), (2, 4, 4)), ValueError, "odd"),
        (((1, 4, 5, 5), (1, 3, 5, 5), (1, 4, 5, 5), (3, 3, 3)), ValueError, "divisible"),
        (((1, 4, 5, 5), (1, 2, 5, 5), (1, 4, 5, 5), (3, 3, 3)), ValueError, "heads"),
        (((1, 4, 5, 5), (1, 2, 5, 5), (1, 4, 5, 4), (2, 3, 3)), ValueError, "v"),
        (((1, 4, 5, 5), (1, 2, 4, 5), (1, 4, 5, 5), (2, 3, 3)), ValueError, "k"),
        (((4, 5, 5), (1, 2, 5, 5), (1, 4, 5, 5), (2, 3, 3)), ValueError, "q"),
        (((1, 4, 5, 5), (1, 2, 5, 5), (1, 4, 5, 5), (2, 3)), ValueError, "w"),
        (((1, 4, 5, 5), (1, 2, 5, 5), (1, 4, 5, 5), (2, 3, 5)), ValueError, "square"),
    ],
)
def test_errors(shapes, exc, match):
    q, k, v, w = (torch.randn(s) for s in shapes)
    with pytest.raises(exc, match=match):
        aft_conv2d(q, k, v, w)


def test_dtype_errors():
    q, k, v, w = make(1, 4, 5, 5, 2, 3, torch.float32)
    with pytest.raises(TypeError, match="w"):
        aft_conv2d(q, k, v, w.double())
    with pytest.raises(TypeError, match="k"):
        aft_conv2d(q, k.half(), v, w)
    with pytest.raises(TypeError, match="q"):
        aft_conv2d(q.int(), k, v, w)
