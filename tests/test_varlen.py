"""Packed variable-length sequences (cu_seqlens, docs/design.md §9.3) on aft_full, aft_local and aft_simple: equal to
running each sequence alone (float64 oracles), forward and backward, causal and not; bad cu_seqlens refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnfree_ext
from attnfree_ext import aft_full, aft_local, aft_simple
from attnfree_ext.ops.common.features import backend_info
from attnfree_ext.ops.common.state import empty_state
from common import oracles
from common.metrics import err, maxabs

PATHS = pytest.mark.paths("python", "compiled-cpu", "emulation", op="aft_simple")

OPS = ("aft_simple", "aft_local", "aft_full")


def _call(op, q, k, v, w, causal, **kw):
    if op == "aft_simple":
        return aft_simple(q, k, v, causal, **kw)
    if op == "aft_local":
        return aft_local(q, k, v, w, 3, causal, **kw)
    return aft_full(q, k, v, w, causal, **kw)


def _oracle(op, q, k, v, w, causal):
    if op == "aft_simple":
        return oracles.aft_simple(q, k, v, causal)
    if op == "aft_local":
        return oracles.aft_local(q, k, v, w, 3, causal)
    return oracles.aft(q, k, v, w, causal)


def _per_sequence(op, q, k, v, w, causal, lengths):
    """Each sequence alone, with w[..., :len, :len] (positions restart at 0)."""
    out, a = [], 0
    for n in lengths:
        b = a + n
        if n:
            out.append(_oracle(op, q[:, a:b], k[:, a:b], v[:, a:b], w[..., :n, :n], causal))
        a = b
    return torch.cat(out, dim=1)


def _packed(lengths, D, heads, dtype=torch.float64, idx_dtype=torch.int32, extra=0):
    total = sum(lengths)
    q, k, v = (torch.randn(1, total, D, dtype=torch.float64).to(dtype) for _ in range(3))
    L = max(lengths) + extra
    w = torch.randn(*(() if heads is None else (heads,)), L, L, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=idx_dtype)
    return q, k, v, w, cu


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [None, 2])
def test_varlen_forward_backward_equal_per_sequence(op, causal, heads):
    lengths = [5, 0, 1, 9, 3]
    q, k, v, w, cu = _packed(lengths, 4, heads, extra=2)  # w larger than the longest sequence: sliced
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    y = _call(op, *xs, causal, cu_seqlens=cu)
    ref = _per_sequence(op, *xs, causal, lengths)
    assert y.shape == q.shape and err(y, ref) <= 1e-12
    g = torch.randn_like(y)
    want = [x for x in xs if op != "aft_simple" or x is not w]
    ga = torch.autograd.grad(y, want, g)
    gb = torch.autograd.grad(ref, want, g, allow_unused=True, materialize_grads=True)
    for a, b in zip(ga, gb):
        assert err(a, b) <= 1e-12


@pytest.mark.parametrize("op", OPS)
def test_varlen_gradcheck(op):
    q, k, v, w, cu = _packed([3, 1, 2], 2, None, idx_dtype=torch.int64)
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    for causal in (False, True):
        if op == "aft_simple":

            def f(q, k, v, causal=causal):
                return aft_simple(q, k, v, causal, cu_seqlens=cu)

            assert torch.autograd.gradcheck(f, tuple(xs[:3]))
        else:

            def g(q, k, v, w, causal=causal):
                return _call(op, q, k, v, w, causal, cu_seqlens=cu)

            assert torch.autograd.gradcheck(g, tuple(xs))


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(0, 7), min_size=1, max_size=5).filter(lambda ls: sum(ls) > 0))
def test_varlen_random_lengths(lengths):
    for op in OPS:
        for causal in (False, True):
            q, k, v, w, cu = _packed(lengths, 3, 3 if op == "aft_full" else None)
            assert (
                err(_call(op, q, k, v, w, causal, cu_seqlens=cu), _per_sequence(op, q, k, v, w, causal, lengths))
                <= 1e-12
            )


@pytest.mark.parametrize("op", OPS)
def test_varlen_bf16_2x_rule(op):
    lengths = [7, 12, 4]
    q, k, v, w, cu = _packed(lengths, 16, None, dtype=torch.bfloat16)
    for causal in (False, True):
        ref = _per_sequence(op, q, k, v, w, causal, lengths)
        y = _call(op, q, k, v, w, causal, cu_seqlens=cu)
        assert y.dtype == torch.bfloat16
        eager, a = [], 0
        for n in lengths:
            ww = None if op == "aft_simple" else (oracles.local_bias(w[:n, :n], 3) if op == "aft_local" else w[:n, :n])
            eager.append(oracles.aft_eager(q[:, a : a + n], k[:, a : a + n], v[:, a : a + n], ww, causal))
            a += n
        assert maxabs(y, ref) <= 2 * maxabs(torch.cat(eager, 1), ref) + 1e-3


def test_varlen_aft_simple_with_state_per_sequence():
    lengths = [4, 6]
    q, k, v, _, cu = _packed(lengths, 3, None)
    s0 = torch.stack([torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3) + 0.5], 1).double()
    y, s = aft_simple(q, k, v, True, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    assert s.shape == (2, 3, 3)
    for i, (a, b) in enumerate([(0, 4), (4, 10)]):
        yi, si = aft_simple(q[:, a:b], k[:, a:b], v[:, a:b], True, initial_state=s0[i : i + 1], output_final_state=True)
        assert (
            err(y[:, a:b], yi) <= 1e-12
            and err(s[i : i + 1, 1:] * s[i : i + 1, :1].exp(), si[:, 1:] * si[:, :1].exp()) <= 1e-12
        )


def test_varlen_backend_info_says_native_or_padded():
    """backend_info with cu_seqlens: the compiled path when _C is there (no Python-only reason), and per path
    whether the packed sequences run natively in the kernels (aft_simple) or as one padded batch."""
    q, k, v, w, cu = _packed([2, 3], 2, None, dtype=torch.float32)
    for op, native in (("aft_simple", True), ("aft_local", False), ("aft_full", False)):
        info = (
            backend_info(op, q, k, v, w, cu_seqlens=cu)
            if op != "aft_simple"
            else backend_info(op, q, k, v, cu_seqlens=cu)
        )
        plain = (
            attnfree_ext.backend_info(op, q, k, v) if op == "aft_simple" else attnfree_ext.backend_info(op, q, k, v, w)
        )
        assert info["selected"] == plain["selected"]
        assert info["varlen"] == {"python": "padded", "compiled": "native" if native else "padded"}
        assert f"packed sequences: {info['varlen'][info['selected']]}" in info["summary"]
    with attnfree_ext.force_backend("compiled"):  # no longer refused
        if attnfree_ext.ops.common.dispatch.compiled_available():
            assert err(aft_local(q, k, v, w, 2, True, cu_seqlens=cu), _per_sequence_local2(q, k, v, w, [2, 3])) < 1e-5


def _per_sequence_local2(q, k, v, w, lengths):
    out, a = [], 0
    for n in lengths:
        out.append(oracles.aft_local(q[:, a : a + n], k[:, a : a + n], v[:, a : a + n], w[:n, :n], 2, True))
        a += n
    return torch.cat(out, 1)


@pytest.mark.parametrize("op", OPS)
def test_varlen_bad_cu_seqlens(op):
    q, k, v, w, cu = _packed([2, 3], 2, None)
    bad = [
        (TypeError, "cu_seqlens must be a torch.Tensor", [0, 2, 5]),
        (TypeError, "cu_seqlens must be int32 or int64", cu.double()),
        (ValueError, r"cu_seqlens must have shape \(N \+ 1,\)", cu[None]),
        (ValueError, r"cu_seqlens must have shape \(N \+ 1,\)", cu[:0]),
        (ValueError, "cu_seqlens must start at 0", torch.tensor([1, 2, 5])),
        (ValueError, "cu_seqlens must be non-decreasing", torch.tensor([0, 3, 2, 5])),
        (ValueError, "cu_seqlens must end at total_T", torch.tensor([0, 2, 4])),
    ]
    for exc, msg, c in bad:
        with pytest.raises(exc, match=msg):
            _call(op, q, k, v, w, False, cu_seqlens=c)
    for m, exc, msg in [
        (3, ValueError, r"max_seqlen = 3 is smaller than the longest sequence of cu_seqlens \(4\)"),
        (-1, ValueError, "max_seqlen must be >= 0"),
        (2.5, TypeError, "max_seqlen must be an int"),
    ]:
        with pytest.raises(exc, match=msg):
            _call(op, q, k, v, w, False, cu_seqlens=torch.tensor([0, 1, 5]), max_seqlen=m)
    with pytest.raises(ValueError, match="max_seqlen needs cu_seqlens"):
        _call(op, q, k, v, w, False, max_seqlen=5)
    with pytest.raises(ValueError, match=r"packed as \(1, total_T, D\)"):
        _call(op, q.expand(2, -1, -1), k.expand(2, -1, -1), v.expand(2, -1, -1), w, False, cu_seqlens=cu)
    if op != "aft_simple":
        with pytest.raises(ValueError, match="covering the longest sequence"):
            _call(op, q, k, v, w[:2, :2], False, cu_seqlens=cu)
    else:
        with pytest.raises(ValueError, match=r"initial_state must have shape \(B, 3, D\) = \(2, 3, 2\)"):
            aft_simple(q, k, v, True, initial_state=empty_state(1, 2, torch.float64, "cpu"), cu_seqlens=cu)


# ----------------------------------------------------------------------- every path (python, compiled, emulation)
def _band(w, window):
    """(L, L) -> the banded layout (L, 2W - 1) of aft_local."""
    from attnfree_ext.ops.aft_local.layout import full_to_band

    return full_to_band(w, window)


def _path_call(op, causal, cu, banded=False, max_seqlen=None):
    def f(q, k, v, w=None):
        kw = {"cu_seqlens": cu, "max_seqlen": max_seqlen}
        if op == "aft_simple":
            return aft_simple(q, k, v, causal, **kw)
        if op == "aft_local":
            return aft_local(q, k, v, w, 3, causal, w_layout="band" if banded else None, **kw)
        return aft_full(q, k, v, w, causal, **kw)

    return f


def _reference_grads(op, q, k, v, w, causal, lengths, dy):
    xs = [x.detach().double().requires_grad_() for x in (q, k, v, w)]
    ref = _per_sequence(op, *xs, causal, lengths)
    want = xs[:3] if op == "aft_simple" else xs
    return ref, torch.autograd.grad(ref, want, dy.double(), allow_unused=True, materialize_grads=True)


VARLEN_CASES = [
    ("aft_simple", None, False),
    ("aft_local", None, False),
    ("aft_local", 2, False),
    ("aft_local", None, True),  # banded w: rows [:len] of each sequence
    ("aft_full", None, False),
    ("aft_full", 2, False),
]


@PATHS
@pytest.mark.parametrize("op,heads,banded", VARLEN_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("D", [4, 6])  # float64: 16-byte channel vectors (D even) and the fallback scan (D = 6 is
def test_varlen_paths_equal_per_sequence(path, op, heads, banded, causal, idx_dtype, D):  # 3 vectors, fine too)
    """On every path, forward and backward (dq, dk, dv, dw) equal each sequence run alone (float64 oracles), for
    odd unequal lengths with a length 1 and an empty sequence; w larger than the longest sequence."""
    lengths = [5, 1, 0, 9, 3]
    q, k, v, w, cu = _packed(lengths, D, heads, idx_dtype=idx_dtype, extra=2)
    dy = torch.randn_like(q)
    fn = _path_call(op, causal, cu, banded)
    if banded:
        wb = _band(w, 3)
        y, g = path.grads(fn, (q, k, v, wb), dy)
    else:
        y, g = path.grads(fn, (q, k, v) if op == "aft_simple" else (q, k, v, w), dy)
    ref, gr = _reference_grads(op, q, k, v, w, causal, lengths, dy)
    assert y.shape == q.shape and err(y, ref) <= 1e-12
    if banded:  # the banded gradient is the full one's band
        gr = (*gr[:3], _band(gr[3], 3))
    for a, b in zip(g, gr):
        assert err(a, b) <= 1e-11


@PATHS
@pytest.mark.parametrize("D", [3, 8])  # float32: the fallback scan (D % 4 != 0) and the vector kernels
def test_varlen_aft_simple_fp32_paths(path, D):
    lengths = [7, 1, 12, 3]
    q, k, v, _, cu = _packed(lengths, D, None, dtype=torch.float32, idx_dtype=torch.int64)
    dy = torch.randn_like(q)
    for causal in (False, True):
        y, g = path.grads(_path_call("aft_simple", causal, cu), (q, k, v), dy)
        ref, gr = _reference_grads("aft_simple", q, k, v, q, causal, lengths, dy)
        assert err(y, ref) <= 1e-5
        for a, b in zip(g, gr):
            assert err(a, b) <= 1e-5


@PATHS
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_adversarial_numerics(path, op, causal):
    """|k| = 1e4 and a causal late spike inside packed sequences: finite, and equal to each sequence alone."""
    lengths = [40, 1, 67, 21]
    q, k, v, w, cu = _packed(lengths, 4, None, dtype=torch.float32, idx_dtype=torch.int64)
    k[0, :40, 0] = torch.linspace(-1e4, 1e4, 40)
    k[0, 41:108, 1] = -1e4
    k[0, 100, 2] = 3000.0  # late in the third sequence, far above every earlier key
    k[0, 108:, 3] = 1e4 * torch.sign(torch.randn(21))
    dy = torch.randn_like(q)
    args = (q, k, v) if op == "aft_simple" else (q, k, v, w)
    y, g = path.grads(_path_call(op, causal, cu), args, dy)
    ref, gr = _reference_grads(op, q, k, v, w, causal, lengths, dy)
    tol = 2e-3 if path.name == "python" else 1e-4  # the python path's error is ~eps * |logit|
    assert torch.isfinite(y).all() and err(y, ref) < tol
    for a, b in zip(g, gr):
        assert torch.isfinite(a).all() and err(a, b) < 5e-3


@PATHS
@pytest.mark.parametrize("D", [4, 3])
def test_varlen_aft_simple_state_paths(path, D):
    """initial_state (N, 3, D) and final states (N, 3, D) with cu_seqlens on every path: equal to each sequence
    run alone with its state, forward and backward (dq, dk, dv and all three rows of d initial_state)."""
    lengths = [5, 1, 0, 9, 3]
    N = len(lengths)
    q, k, v, _, cu = _packed(lengths, D, None, idx_dtype=torch.int32)
    s0 = torch.stack([torch.randn(N, D), torch.randn(N, D), torch.rand(N, D) + 0.5], 1).double()
    s0[3, 0] = float("-inf")  # one empty state (-inf, 0, 0) = no state
    s0[3, 1:] = 0
    dy, ds = torch.randn_like(q), torch.randn(N, 3, D, dtype=torch.float64)
    leaves = [path.leaf(x) for x in (q, k, v, s0)]
    with path.force():
        y, sF = aft_simple(*leaves[:3], True, initial_state=leaves[3], output_final_state=True, cu_seqlens=cu)
    with path.force() if path.emulated else torch.enable_grad():
        g = torch.autograd.grad((y * dy).sum() + (sF * ds).sum(), leaves)
    xs = [x.clone().requires_grad_() for x in (q, k, v, s0)]
    ys, ss, a = [], [], 0
    with attnfree_ext.force_backend("python"):
        for i, n in enumerate(lengths):
            b = a + n
            yi, si = aft_simple(
                *(x[:, a:b] for x in xs[:3]), True, initial_state=xs[3][i : i + 1], output_final_state=True
            )
            ys.append(yi)
            ss.append(si)
            a = b
    yr, sr = torch.cat(ys, 1), torch.cat(ss, 0)
    gr = torch.autograd.grad((yr * dy).sum() + (sr * ds).sum(), xs)
    assert err(y, yr) <= 1e-12 and err(sF, sr) <= 1e-12
    for a, b in zip(g, gr):
        assert err(a, b) <= 1e-11


@pytest.mark.parametrize("op", OPS)
def test_varlen_max_seqlen_torch_compile_fullgraph(op):
    """With max_seqlen nothing is read back from cu_seqlens: torch.compile(fullgraph=True) traces the packed call
    (no graph break), forward and backward equal to eager; without it, the padded ops need a host read."""
    torch._dynamo.reset()
    lengths = [3, 1, 5]
    q, k, v, w, cu = _packed(lengths, 4, None, dtype=torch.float32, idx_dtype=torch.int64)
    xs = [x.requires_grad_() for x in (q, k, v, w)]
    fn = _path_call(op, True, cu, max_seqlen=5)
    args = xs[:3] if op == "aft_simple" else xs
    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = cfn(*args)
    g = torch.autograd.grad(y.sum(), args)
    y2 = fn(*args)
    g2 = torch.autograd.grad(y2.sum(), args)
    assert maxabs(y, y2) < 1e-6 and all(maxabs(a, b) < 1e-5 for a, b in zip(g, g2))
    assert err(y2, _per_sequence(op, *(x.detach().double() for x in xs), True, lengths)) < 1e-5


def test_varlen_max_seqlen_equals_without():
    """A max_seqlen larger than the longest sequence pads more (w must cover it) and changes nothing."""
    lengths = [2, 7, 1]
    q, k, v, w, cu = _packed(lengths, 3, None, extra=3)
    for op in OPS:
        for causal in (False, True):
            a = _call(op, q, k, v, w, causal, cu_seqlens=cu)
            b = _call(op, q, k, v, w, causal, cu_seqlens=cu, max_seqlen=10)
            assert err(a, b) <= 1e-13
