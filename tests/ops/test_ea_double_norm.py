"""ea_double_norm (external attention's double normalisation) on every path (python, compiled CPU, CUDA) against
the float64 oracle.

Errors are max-abs unless stated. Low precision: the 2x rule against the plain-PyTorch eager formula in that
same dtype, plus a tiny absolute floor (tests/common/metrics.py; docs/design.md §5).
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfree_ext.ops.ea_double_norm import ea_double_norm
from attnfree_ext.ops.ea_double_norm.reference import ea_double_norm_bwd_ref, ea_double_norm_fwd_ref
from common import oracles
from common.inputs import rand
from common.metrics import maxabs

OP = "ea_double_norm"
OPS = torch.ops.attnfree
COMPILED = pytest.mark.paths("compiled-cpu", "cuda")
SHAPES = [(1, 1), (1, 5), (7, 1), (13, 3), (2, 7, 5), (2, 3, 37, 4), (1, 2, 1, 1)]
LOW = [torch.bfloat16, torch.float16]


def _oracle_grad(x, dout, eps):
    xd = x.detach().double().requires_grad_(True)
    out = oracles.ea_double_norm(xd, eps)
    (g,) = torch.autograd.grad(out, xd, dout.double())
    return out.detach(), g


def _ours(path, x, dout, eps):
    out, (g,) = path.grads(ea_double_norm, (x,), dout, eps)
    return out, g


# ================================================================ the public function
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eps", [1e-9, 0.0, 0.5])
def test_float64_forward_backward(path, shape, eps):
    x = torch.randn(shape, dtype=torch.float64) * 3
    dout = torch.randn(shape, dtype=torch.float64)
    ref, gref = _oracle_grad(x, dout, eps)
    out, g = _ours(path, x, dout, eps)
    assert out.dtype == torch.float64 and g.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_forward_backward(path, shape):
    x = torch.randn(shape) * 3
    dout = torch.randn(shape)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    out, g = _ours(path, x, dout, 1e-9)
    assert out.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.double(), gref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("shape", [(2, 13, 5), (3, 37, 16), (1, 1, 4)])
def test_low_precision_two_x_rule(path, dtype, shape):
    x = (torch.randn(shape) * 3).to(dtype)
    dout = torch.randn(shape).to(dtype)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    out, g = _ours(path, x, dout, 1e-9)
    assert out.dtype == dtype and g.dtype == dtype
    xe = x.detach().clone().requires_grad_(True)
    oe = oracles.ea_double_norm_eager(xe, 1e-9)
    (ge,) = torch.autograd.grad(oe, xe, dout)
    floor = 1e-3 if dtype == torch.bfloat16 else 1e-4
    assert maxabs(out, ref) <= 2 * maxabs(oe, ref) + floor
    assert maxabs(g, gref) <= 2 * maxabs(ge, gref) + floor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e2, 1e3, 1e4])
def test_adversarial_large_logits(path, dtype, scale):
    """|logits| up to 1e4: finite forward and backward, matching the oracle (fp32: log-space rounding ~ scale*eps)."""
    x = (torch.randn(2, 11, 6, dtype=torch.float64) * scale).to(dtype)
    dout = torch.randn(2, 11, 6, dtype=dtype)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    out, g = _ours(path, x, dout, 1e-9)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    tol = 1e-10 if dtype == torch.float64 else 4 * scale * torch.finfo(torch.float32).eps
    assert maxabs(out, ref) <= tol
    assert maxabs(g, gref) <= 10 * tol


def _logspace_oracle(x, eps):
    """float64, in log space: stays exact where p underflows (a token far below every column's maximum)."""
    x = x.double()
    z = x - torch.logsumexp(x, dim=-2, keepdim=True)
    log_s = torch.logsumexp(z, dim=-1, keepdim=True)
    log_r = log_s if eps == 0 else torch.logaddexp(log_s, torch.full_like(log_s, math.log(eps)))
    return torch.exp(z - log_r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_eps0_underflowed_row_is_finite(path, dtype):
    """eps = 0 (External-Attention-pytorch): a token 1e4 below the others has p = 0 in every column; the naive
    formula gives 0/0 = NaN there, ours the exact value (softmax over S of log p; docs/design.md §7)."""
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    x[:, 3] -= 1e4
    x = x.to(dtype)
    assert torch.isnan(oracles.ea_double_norm_eager(x.double(), 0.0)).any()  # the naive formula breaks
    dout = torch.randn(2, 7, 5).to(dtype)
    out, g = _ours(path, x, dout, 0.0)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    tol = {torch.float64: 1e-9, torch.float32: 2e-3, torch.bfloat16: 3e-2}[dtype]
    assert maxabs(out, _logspace_oracle(x, 0.0)) <= tol
    torch.testing.assert_close(out.double().sum(-1), torch.ones(2, 7, dtype=torch.float64), atol=tol, rtol=0)


@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_gradcheck_float64(path, eps):
    x = path.leaf(torch.randn(2, 5, 3, dtype=torch.float64))

    def f(t):
        with path.force():
            return ea_double_norm(t, eps)

    assert torch.autograd.gradcheck(f, (x,))


def test_non_contiguous(path):
    base = torch.randn(3, 6, 13, dtype=torch.float64)  # (..., S, N)
    x = base.transpose(-1, -2)  # (3, 13, 6) non-contiguous
    assert not x.is_contiguous()
    dout = torch.randn(3, 6, 13, dtype=torch.float64).transpose(-1, -2)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    out, g = _ours(path, x, dout, 1e-9)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, gref, rtol=1e-10, atol=1e-12)


def test_public_function_default_backend():
    """Whatever backend is active (compiled when built) matches the oracle in float64 and float32."""
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = torch.randn(2, 13, 5, dtype=dtype)
        dout = torch.randn(2, 13, 5, dtype=dtype)
        ref, gref = _oracle_grad(x, dout, 1e-9)
        xx = x.clone().requires_grad_(True)
        out = ea_double_norm(xx, 1e-9)
        (g,) = torch.autograd.grad(out, xx, dout)
        assert maxabs(out, ref) <= tol and maxabs(g, gref) <= tol


def test_rows_sum_to_one_and_columns_normalised(path):
    x = torch.randn(4, 10, 8, dtype=torch.float64)
    with path.force():
        out = ea_double_norm(path.put(x), 0.0).cpu()
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 10, dtype=torch.float64))


def test_errors():
    with pytest.raises(ValueError, match="logits"):
        ea_double_norm(torch.randn(5))
    with pytest.raises(ValueError, match="logits"):
        ea_double_norm(torch.tensor(1.0))
    with pytest.raises(TypeError, match="logits"):
        ea_double_norm(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits"):
        ea_double_norm([[1.0, 2.0]])
    with pytest.raises(ValueError, match="eps"):
        ea_double_norm(torch.randn(3, 4), eps=-1e-9)
    with pytest.raises(ValueError, match="eps"):
        ea_double_norm(torch.randn(3, 4), eps=float("nan"))
    with pytest.raises(TypeError, match="eps"):
        ea_double_norm(torch.randn(3, 4), eps="1e-9")


# ================================================================ the fwd / bwd contract
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_contract_shapes_dtypes_and_grads(path, dtype):
    """fwd returns (out, lse (...,1,S), rowsum (...,N,1)) in the compute dtype; bwd matches autograd."""
    x = torch.randn(2, 9, 4).to(dtype)
    out, lse, rowsum = path.fwd(OP, x, 1e-9)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == x.shape and out.dtype == dtype
    assert lse.shape == (2, 1, 4) and lse.dtype == ct
    assert rowsum.shape == (2, 9, 1) and rowsum.dtype == ct
    xd = x.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(xd, dim=-2, keepdim=True), rtol=1e-6, atol=1e-6)
    p = torch.softmax(xd, dim=-2)
    torch.testing.assert_close(rowsum.double(), p.sum(-1, keepdim=True) + 1e-9, rtol=1e-6, atol=1e-6)
    dout = torch.randn(2, 9, 4).to(dtype)
    dl = path.bwd(OP, dout, x, out, lse, rowsum)
    assert dl.dtype == dtype and dl.shape == x.shape
    _, gref = _oracle_grad(x, dout, 1e-9)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert maxabs(dl, gref) <= tol


CONTRACT_SHAPES = [(2, 3, 7, 5), (1, 1), (4, 1), (1, 6), (5, 131, 8), (2, 64, 16)]


@pytest.mark.parametrize("shape", CONTRACT_SHAPES)
@pytest.mark.parametrize("eps", [1e-9, 0.0, 0.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_contract_vs_oracle(path, shape, eps, dtype, tol):
    x = rand(*shape, dtype=dtype, scale=3.0)
    out, lse, rowsum = path.fwd(OP, x, eps)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.shape == x.shape
    assert lse.dtype == sd and lse.shape == shape[:-2] + (1, shape[-1])
    assert rowsum.dtype == sd and rowsum.shape == shape[:-1] + (1,)
    dout = rand(*shape, dtype=dtype)
    ref, gref = _oracle_grad(x, dout, eps)
    assert maxabs(out, ref) <= tol
    assert maxabs(lse, torch.logsumexp(x.double(), dim=-2, keepdim=True)) <= tol * 10
    p = torch.softmax(x.double(), dim=-2)
    assert maxabs(rowsum, p.sum(-1, keepdim=True) + eps) <= tol * 10
    g = path.bwd(OP, dout, x, out, lse, rowsum)
    assert g.dtype == dtype and g.shape == x.shape
    assert maxabs(g, gref) / max(1.0, gref.abs().max().item()) <= tol * 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contract_low_precision_2x_rule(path, dtype):
    x = rand(3, 40, 16, dtype=dtype, scale=3.0)
    dout = rand(3, 40, 16, dtype=dtype)
    ref, gref = _oracle_grad(x, dout, 1e-9)
    xe = x.detach().clone().requires_grad_()
    oe = oracles.ea_double_norm_eager(xe, 1e-9)
    (ge,) = torch.autograd.grad(oe, xe, dout)
    out, lse, rowsum = path.fwd(OP, x, 1e-9)
    assert lse.dtype == torch.float32
    g = path.bwd(OP, dout, x, out, lse, rowsum)
    assert maxabs(out, ref) <= 2 * maxabs(oe, ref) + 1e-4
    assert maxabs(g, gref) <= 2 * maxabs(ge, gref) + 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_contract_adversarial(path, dtype, eps):
    """Logits up to 1e4 (whole rows of p underflow): finite, and equal to the oracle."""
    x = (torch.rand(2, 33, 7, dtype=torch.float64) * 2e4 - 1e4).to(dtype)
    out, lse, rowsum = path.fwd(OP, x, eps)
    dout = rand(2, 33, 7, dtype=dtype)
    g = path.bwd(OP, dout, x, out, lse, rowsum)
    assert torch.isfinite(out).all() and torch.isfinite(g).all() and torch.isfinite(lse).all()
    ref, gref = _oracle_grad(x, dout, eps)
    if eps == 0.0:  # oracle itself gives 0/0 on rows whose p all underflow in float64; compare the rest
        ok = torch.isfinite(ref)
        assert maxabs(out[ok], ref[ok]) <= 1e-5
    else:
        assert maxabs(out, ref) <= 1e-5


def test_contract_non_contiguous_and_gradcheck(path):
    x = rand(2, 6, 5).transpose(-1, -2)  # (2, 5, 6) non-contiguous
    out, _, _ = path.fwd(OP, x, 1e-9)
    assert maxabs(out, oracles.ea_double_norm(x, 1e-9)) < 1e-14
    xg = path.leaf(rand(2, 5, 4))

    def f(a):
        with path.force():
            return ea_double_norm(a, 1e-3)

    assert torch.autograd.gradcheck(f, (xg,))


_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _err(a, b):
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a.double() - b.double()).abs().max() / max(b.double().abs().max().item(), 1.0)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [1e-9, 0.0])
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1), (2, 3, 40, 64), (130, 3), (4, 1000, 64)])
def test_contract_vs_oracle_and_python(path, dtype, eps, shape):
    lg = rand(*shape, dtype=dtype, scale=3.0)
    dout = rand(*shape, dtype=dtype)
    tol = _TOL[dtype]
    path.poison()
    out, lse, rowsum = path.fwd(OP, lg, eps)
    assert lse.shape == (*shape[:-2], 1, shape[-1]) and rowsum.shape == (*shape[:-1], 1)
    assert _err(out, oracles.ea_double_norm(lg, eps)) < tol
    ro, rl, rr = ea_double_norm_fwd_ref(lg, eps)
    assert _err(out, ro) < tol and _err(lse, rl) < tol and _err(rowsum, rr) < tol
    path.poison()
    dl = path.bwd(OP, dout, lg, out, lse, rowsum)
    xd = lg.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(oracles.ea_double_norm(xd, eps), xd, dout.double())
    assert _err(dl, ref) < tol
    assert _err(dl, ea_double_norm_bwd_ref(dout, lg, ro, rl, rr)) < tol


def test_gradcheck_float64_default_eps(path):
    lg = path.leaf(rand(2, 6, 5))

    def f(a):
        with path.force():
            return ea_double_norm(a)

    assert torch.autograd.gradcheck(f, (lg,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contract_low_precision_vs_python_path(path, dtype):
    """2x rule with the python path in the same dtype as the baseline (references: float64 from the
    low-precision inputs)."""

    def check(ours, python, ref, what):
        e_ours = (ours.double() - ref).abs().max().item()
        e_py = (python.double() - ref).abs().max().item()
        assert e_ours <= 2 * e_py + 1e-4, (what, e_ours, e_py)

    lg = rand(3, 50, 64, dtype=torch.float32, scale=3.0).to(dtype)
    o, ls, rs = path.fwd(OP, lg, 1e-9)
    op_, lp_, rp_ = ea_double_norm_fwd_ref(lg, 1e-9)
    check(o, op_, oracles.ea_double_norm(lg), "ea out")
    do = rand(3, 50, 64, dtype=torch.float32).to(dtype)
    xd = lg.detach().double().requires_grad_(True)
    (gr,) = torch.autograd.grad(oracles.ea_double_norm(xd), xd, do.double())
    check(path.bwd(OP, do, lg, o, ls, rs), ea_double_norm_bwd_ref(do, lg, op_, lp_, rp_), gr, "ea dl")


def test_contract_adversarial_numerics(path):
    lg = rand(2, 64, 16, dtype=torch.float32, scale=1e4)
    lg[0, 5] = -1e4
    for eps in (0.0, 1e-9):
        out, ls, rs = path.fwd(OP, lg, eps)
        assert torch.isfinite(out).all() and torch.isfinite(rs).all()
        dl = path.bwd(OP, torch.ones_like(lg), lg, out, ls, rs)
        assert torch.isfinite(dl).all()


@pytest.mark.paths("cuda")
def test_large_forward(path):
    lg = path.put(rand(64, 16384, 64, dtype=torch.bfloat16))
    path.poison()
    out, lse, rs = OPS.ea_double_norm_fwd(lg, 1e-9)
    ro, rl, rr = ea_double_norm_fwd_ref(lg, 1e-9)
    assert _err(out.float(), ro.float()) < 2e-2 and _err(lse, rl) < 1e-4 and _err(rs, rr) < 1e-4


@COMPILED
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_matches_python_ref(path, dtype):
    x = rand(3, 17, 8, dtype=dtype, scale=2.0)
    dout = rand(3, 17, 8, dtype=dtype)
    o, l, r = path.fwd(OP, x, 1e-9)
    o2, l2, r2 = ea_double_norm_fwd_ref(x, 1e-9)
    for a, b in ((o, o2), (l, l2), (r, r2)):
        assert a.dtype == b.dtype and a.shape == b.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert maxabs(o, o2) <= tol and maxabs(l, l2) <= 1e-5 and maxabs(r, r2) <= 1e-5
    g = path.bwd(OP, dout, x, o, l, r)
    g2 = ea_double_norm_bwd_ref(dout, x, o2, l2, r2)
    assert g.dtype == g2.dtype and maxabs(g, g2) <= tol


# ================================================================ registration of the compiled ops
@COMPILED
@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_opcheck(path, dtype, which):
    x = path.leaf(rand(3, 5, 6, dtype=dtype))
    if which == "fwd":
        torch.library.opcheck(OPS.ea_double_norm_fwd.default, (x, 1e-9))
    else:
        out, lse, rs = (t.detach() for t in OPS.ea_double_norm_fwd(x, 1e-9))
        dout = path.put(rand(3, 5, 6, dtype=dtype))
        torch.library.opcheck(OPS.ea_double_norm_bwd.default, (dout, x.detach(), out, lse, rs))


@COMPILED
def test_torch_compile_fullgraph(path):
    torch._dynamo.reset()
    q = path.leaf(rand(2, 7, 4, dtype=torch.float32))

    def fn(q):
        return OPS.ea_double_norm_fwd(q * 2, 1e-9)[0].square().sum()

    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = cfn(q)
    g = torch.autograd.grad(out, (q,))[0]
    out_e = fn(q)
    g_e = torch.autograd.grad(out_e, (q,))[0]
    assert maxabs(out, out_e) < 1e-5 and maxabs(g, g_e) < 1e-5


def _bad_cases():
    q = rand(2, 7, 4, dtype=torch.float32)
    return [
        ((q[0, 0], 1e-9), ValueError, "logits must have at least 2 dimensions (..., N, S), got shape (4,)"),
        ((q, -1.0), ValueError, "eps must be a finite float >= 0, got -1"),
        ((q.to(torch.int64), 1e-9), TypeError, "logits must be float16, bfloat16, float32 or float64, got torch.int64"),
    ]


@COMPILED
@pytest.mark.parametrize("idx", range(3))
def test_bad_inputs_reach_compiled_checks(path, idx):
    args, exc, msg = _bad_cases()[idx]
    with pytest.raises(exc) as info:
        path.fwd(OP, *args)
    assert msg in str(info.value)


@COMPILED
def test_bad_dout_reaches_compiled_checks(path):
    q = rand(2, 7, 4, dtype=torch.float32)
    with pytest.raises(ValueError) as info:
        path.bwd(OP, q[:1], q, q, q[:, :1], q[..., :1])
    assert "dout must have the shape of logits (2, 7, 4), got (1, 7, 4)" in str(info.value)


@pytest.mark.paths("compiled-cpu")
def test_fwd_bit_identical_across_threads(path):
    """float32 forward (the AVX2 kernel, S tail included) and backward: same bits for 1/2/3 threads."""
    x = torch.randn(5, 70, 21)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xl = x.clone().requires_grad_()
            with path.force():
                y = ea_double_norm(xl)
            (g,) = torch.autograd.grad(y, xl, torch.ones_like(y))
            outs.append((y.detach(), g))
    finally:
        torch.set_num_threads(n0)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


@pytest.mark.paths("emulation", "compiled-cpu")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_many_row_blocks_with_masks(path, dtype):
    """N = 700 spans several row blocks of the CUDA kernels (their column statistics and column sums of u are merged
    across blocks) and several AVX2 row blocks; S = 64 is the vectorised case. With -inf masks (docs/design.md §7),
    against the masked float64 oracle (out, lse) and its autograd gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 700, 64, generator=g, dtype=torch.float64) * 3
    x[0, :, 5] = -math.inf
    x[1, 600, :] = -math.inf
    x[2, 100:650, 7] = -math.inf
    x = x.to(dtype)
    dout = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    out, lse, rowsum = path.fwd(OP, x, 0.0)
    dl = path.bwd(OP, dout, x, out, lse, rowsum)
    xd = x.double().requires_grad_()
    oo, lo = oracles.ea_double_norm_masked(xd, 0.0)
    (go,) = torch.autograd.grad(oo, xd, dout.double())
    # fp16/bf16: out rounded to the dtype; dl also carries dout's and the logits' rounding through rowdot
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for got, ref in ((out, oo), (dl, go)):
        assert torch.isfinite(got).all()
        assert maxabs(got, ref.detach()) <= tol * ref.detach().abs().max()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lo))
    assert maxabs(lse.nan_to_num(neginf=0.0), lo.nan_to_num(neginf=0.0)) <= max(tol, 1e-6) * 10
    assert not out[1, 600].any() and not out[0, :, 5].any() and not dl[torch.isneginf(x)].any()


@pytest.mark.paths("python", "compiled-cpu", "emulation")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("S", [64, 13])  # the vectorised kernels and the general / S-tail ones
def test_nan_logit_poisons_its_matrix_only(path, dtype, S):
    """docs/design.md §7 rule 2 for EA: a NaN logit in memory unit s makes that column's softmax NaN and hence every
    row sum of its matrix, also the row of a token masked from every unit; the other matrices are unchanged."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 40, S, generator=g, dtype=torch.float64).to(dtype)
    x[0, 3, :] = -math.inf  # a token masked from every unit, in the poisoned matrix
    x[1, 5, :] = -math.inf
    ref, _, ref_rs = path.fwd(OP, x, 0.0)
    x[0, 17, 2] = math.nan
    out, lse, rowsum = path.fwd(OP, x, 0.0)
    assert torch.isnan(lse[0, 0, 2]) and not torch.isnan(lse[0, 0, 3:]).any()
    assert torch.isnan(rowsum[0]).all()
    assert torch.isnan(out[0][torch.isfinite(x[0]) | torch.isnan(x[0])]).all()
    assert torch.equal(out[1], ref[1]) and torch.equal(rowsum[1], ref_rs[1])
