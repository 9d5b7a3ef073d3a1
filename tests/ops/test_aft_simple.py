"""AFT-simple (attnfree_ext.ops.aft_simple, ops/common/scan.py) on every path (python, compiled CPU, CUDA) against
the float64 oracles.

Error measure of the public-function tests: max-abs error divided by a scale (the oracle's max-abs value; for dk
also max|v| * max|dv|, the size of the two terms that cancel in dk = v dv - sum P H). float64 tolerance 1e-10,
float32 1e-5, both plus 8 * eps * L where L is the largest |logit|: log-domain scans round to ~eps * |value|, and
lse is stored in the compute dtype, so large logits (|k| ~ 1e4, late spikes of 3000) cost a relative error
~eps * L. fp16/bf16: the 2x rule (tests/common/metrics.py; docs/design.md §5).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnfree_ext.ops.aft_simple import aft_simple
from attnfree_ext.ops.aft_simple.reference import aft_simple_bwd_ref, aft_simple_fwd_ref
from attnfree_ext.ops.common import scan
from common import aft as contract
from common import oracles
from common.inputs import qkv, qkvw, rand
from common.metrics import maxabs, rel_err

OP = "aft_simple"
OPS = torch.ops.attnfree
COMPILED = pytest.mark.paths("compiled-cpu", "cuda")
F64, F32 = torch.float64, torch.float32
BASE_TOL = {F64: 1e-10, F32: 1e-5}
SHAPES = [(2, 13, 6), (1, 1, 1), (1, 37, 1), (3, 7, 5), (2, 1, 4), (1, 2, 3)]


def _inputs(shape, dtype, k_scale=1.0):
    return qkv(*shape, dtype=dtype, k_scale=k_scale)


def _tol(dtype, logit_max):
    eps = torch.finfo(dtype).eps
    return BASE_TOL[dtype] + 8 * eps * float(logit_max)


def _oracle(q, k, v, dy, causal):
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    y = oracles.aft_simple(qd, kd, vd, causal)
    grads = torch.autograd.grad(y, (qd, kd, vd), dy.double())
    return y.detach(), grads


def _oracle_lse(k, causal):
    kd = k.double()
    if causal:
        return torch.logcumsumexp(kd, dim=1)
    return torch.logsumexp(kd, dim=1, keepdim=True).expand_as(kd)


def _check_all(y, grads, yo, go, v, tol):
    dq, dk, dv = grads
    oq, ok, ov = go
    assert rel_err(y, yo) < tol, rel_err(y, yo)
    assert rel_err(dq, oq) < tol, rel_err(dq, oq)
    assert rel_err(dv, ov) < tol, rel_err(dv, ov)
    dk_scale = max(ok.abs().max().item(), v.double().abs().max().item() * ov.abs().max().item())
    assert rel_err(dk, ok, dk_scale) < tol, rel_err(dk, ok, dk_scale)


def _run_public(path, q, k, v, dy, causal):
    return path.grads(aft_simple, (q, k, v), dy, causal=causal)


# ================================================================ scan helpers (python path)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_logcumsumexp_neg_inf_prefix(dtype):
    inf = float("inf")
    x = torch.full((2, 6, 3), -inf, dtype=dtype)
    x[:, 3, 1] = 2.0
    x[:, 0, 2] = -1.0
    out = scan.lcse(x)
    assert not out.isnan().any()
    assert torch.isneginf(out[:, :, 0]).all()  # all -inf column stays -inf
    assert torch.isneginf(out[:, :3, 1]).all() and (out[:, 3:, 1] == 2.0).all()
    assert (out[:, :, 2] == -1.0).all()
    assert (torch.exp(out[:, :3, 1]) == 0).all()
    rev = scan.rlcse(x)
    assert not rev.isnan().any()
    assert (rev[:, :4, 1] == 2.0).all() and torch.isneginf(rev[:, 4:, 1]).all()
    # log(0) inputs from the signed split (v == 0 everywhere): means are exactly 0, not NaN
    k = torch.randn(2, 6, 3, dtype=dtype)
    lse, mean = scan.prefix_summary(k, torch.zeros_like(k))
    assert torch.isfinite(lse).all() and (mean == 0).all()
    assert (scan.rows_after(k, -lse, torch.zeros_like(k)) == 0).all()


@pytest.mark.parametrize("s", [0, 1, 3, 6, 9])
def test_scan_helpers_match_naive(s):
    B, T, D = 2, 7, 3
    k, v, a, g = (torch.randn(B, T, D, dtype=F64) for _ in range(4))
    lse, mean = scan.prefix_summary(k, v)
    slse, smean = scan.suffix_summary(k, v)
    after = scan.rows_after(k, a, g, s)
    before = scan.rows_before(k, a, g, s)
    for t in range(T):
        p = torch.softmax(k[:, : t + 1], dim=1)
        torch.testing.assert_close(lse[:, t], torch.logsumexp(k[:, : t + 1], dim=1))
        torch.testing.assert_close(mean[:, t], (p * v[:, : t + 1]).sum(1))
        ps = torch.softmax(k[:, t:], dim=1)
        torch.testing.assert_close(slse[:, t], torch.logsumexp(k[:, t:], dim=1))
        torch.testing.assert_close(smean[:, t], (ps * v[:, t:]).sum(1))
        ref_after = (torch.exp(k[:, t : t + 1] + a[:, t + s :]) * g[:, t + s :]).sum(1)
        ref_before = (torch.exp(k[:, t : t + 1] + a[:, : max(t - s + 1, 0)]) * g[:, : max(t - s + 1, 0)]).sum(1)
        torch.testing.assert_close(after[:, t], ref_after)
        torch.testing.assert_close(before[:, t], ref_before)
    x = torch.arange(5.0)[None, :, None]
    assert scan.shift(x, 2, -1.0).flatten().tolist() == [-1, -1, 0, 1, 2]
    assert scan.shift(x, -2, -1.0).flatten().tolist() == [2, 3, 4, -1, -1]
    assert scan.shift(x, 7, -1.0).flatten().tolist() == [-1] * 5


# ================================================================ the public function
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle(path, shape, causal, dtype):
    q, k, v = _inputs(shape, dtype)
    dy = torch.randn(*shape, dtype=dtype)
    y, grads = _run_public(path, q, k, v, dy, causal)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    yo, go = _oracle(q, k, v, dy, causal)
    _check_all(y, grads, yo, go, v, _tol(dtype, k.abs().max()))


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_contract_directly(path, causal, dtype):
    """The fwd/bwd contract: (y, lse) and (dq, dk, dv) against the oracle."""
    shape = (2, 11, 4)
    q, k, v = _inputs(shape, dtype)
    dy = torch.randn(*shape, dtype=dtype)
    y, lse = path.fwd(OP, q, k, v, causal)
    ct = F64 if dtype == F64 else F32
    assert y.dtype == dtype and y.shape == shape
    assert lse.dtype == ct and lse.shape == shape and lse.is_contiguous()
    dq, dk, dv = path.bwd(OP, dy, q, k, v, y, lse, causal)
    assert dq.dtype == dk.dtype == dv.dtype == dtype
    yo, go = _oracle(q, k, v, dy, causal)
    tol = _tol(ct, 10) if dtype != torch.bfloat16 else 2e-2
    assert rel_err(lse, _oracle_lse(k, causal)) < tol
    _check_all(y, (dq, dk, dv), yo, go, v, tol)


@pytest.mark.parametrize("causal", [False, True])
def test_non_contiguous(path, causal):
    B, T, D = 2, 13, 5
    q, k, v = (torch.randn(B, D, T, dtype=F64).transpose(1, 2) for _ in range(3))
    dy = torch.randn(B, D, T, dtype=F64).transpose(1, 2)
    assert not q.is_contiguous()
    y, grads = _run_public(path, q, k, v, dy, causal)
    yo, go = _oracle(q, k, v, dy, causal)
    _check_all(y, grads, yo, go, v, 1e-10)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["k_1e4", "late_spike", "early_spike", "spike_every_channel"])
def test_adversarial(path, case, causal, dtype):
    """|k| ~ 1e4 and the causal late spike (a key > every earlier key by 3000): finite and matching."""
    shape = (2, 13, 6)
    q, k, v = _inputs(shape, F64)
    if case == "k_1e4":
        k = k * 1e4
    elif case == "late_spike":
        k[:, -3, :] += 3000
    elif case == "early_spike":
        k[:, 1, :] += 3000
    else:
        k[:, torch.arange(6) % 13 + 4, torch.arange(6)] += 3000.0
    q, k, v = (x.to(dtype) for x in (q, k, v))
    dy = torch.randn(*shape, dtype=dtype)
    y, grads = _run_public(path, q, k, v, dy, causal)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    yo, go = _oracle(q, k, v, dy, causal)
    _check_all(y, grads, yo, go, v, _tol(dtype, k.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_precision_2x_rule(path, seed, causal, dtype):
    torch.manual_seed(seed)
    shape = (2, 37, 8)
    q, k, v = _inputs(shape, dtype)
    dy = torch.randn(*shape, dtype=dtype)
    y, grads = _run_public(path, q, k, v, dy, causal)
    assert y.dtype == dtype
    qe, ke, ve = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ye = contract.eager_lowp(OP, qe, ke, ve, None, None, causal)
    ge = torch.autograd.grad(ye, (qe, ke, ve), dy)
    yo, go = _oracle(q, k, v, dy, causal)
    floor = 1e-4
    for ours, eager, ref in zip((y, *grads), (ye, *ge), (yo, *go)):
        e_ours = (ours.double() - ref).abs().max().item()
        e_eager = (eager.double() - ref).abs().max().item()
        assert torch.isfinite(ours).all()
        assert e_ours <= 2 * e_eager + floor * ref.abs().max().item(), (e_ours, e_eager)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(path, causal):
    q, k, v = (path.leaf(torch.randn(2, 5, 3, dtype=F64)) for _ in range(3))

    def f(q, k, v):
        with path.force():
            return aft_simple(q, k, v, causal=causal)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_input_validation():
    q = torch.randn(2, 5, 3)
    with pytest.raises(ValueError):
        aft_simple(q, q, q[:, :4])
    with pytest.raises(ValueError):
        aft_simple(q[0], q[0], q[0])
    with pytest.raises(TypeError):
        aft_simple(q, q.double(), q)
    with pytest.raises(TypeError):
        aft_simple(q.long(), q.long(), q.long())
    with pytest.raises(TypeError):
        aft_simple(q, q, q.numpy())


@pytest.mark.parametrize("causal", ["no", 1, None, torch.tensor(False)])
def test_causal_must_be_a_bool(causal):
    """Like aft_full and aft_local: a truthy non-bool (causal="no") raises instead of running causal."""
    q = torch.randn(2, 5, 3)
    with pytest.raises(TypeError, match="causal must be a bool"):
        aft_simple(q, q, q, causal)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.paths("python")
@pytest.mark.parametrize("causal", [False, True])
def test_memory_no_btt_tensor(path, causal):
    """No op of the python path (forward or backward) produces a tensor larger than B*T*D elements."""
    B, T, D = 2, 64, 4
    q, k, v = (torch.randn(B, T, D, requires_grad=True) for _ in range(3))
    with _MaxNumel() as mode, path.force():
        y = aft_simple(q, k, v, causal=causal)
        y.sum().backward()
    assert mode.max_numel <= B * T * D, mode.max_numel


# ================================================================ the fwd / bwd contract, against the oracle
CONTRACT_SHAPES = [  # (B, T, D, heads, window)
    (2, 13, 6, 1, 3),
    (1, 1, 1, 1, 1),
    (1, 7, 1, 1, 2),
    (2, 37, 8, 2, 5),
    (1, 131, 4, 4, 9),  # prime T > 64
    (2, 9, 4, 1, 20),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CONTRACT_SHAPES)
def test_contract_float64_vs_oracle(path, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = qkvw(B, T, D, None if H == 1 else H, F64)
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-10, 1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 13, 6, 1, 3), (1, 131, 4, 2, 9)])
def test_contract_float32_vs_oracle(path, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = qkvw(B, T, D, None if H == 1 else H, F32)
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-5, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contract_low_precision_2x_rule(path, causal, dtype):
    """error(contract, low dtype) <= 2 * error(eager PyTorch in that dtype) + 1e-3, both vs the float64 oracle."""
    B, T, D, H, window = 2, 29, 8, 2, 4
    q, k, v, w = qkvw(B, T, D, H, dtype)
    dy = rand(B, T, D, dtype=dtype)
    y, lse = path.fwd(OP, q, k, v, causal)
    assert y.dtype == dtype and lse.dtype == torch.float32
    yr, grads_r = contract.oracle_grads(OP, q, k, v, w, window, causal, dy)
    ins = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    ye = contract.eager_lowp(OP, *ins, window, causal)
    ge = torch.autograd.grad(ye, ins[:3], dy)
    assert maxabs(y, yr) <= 2 * maxabs(ye, yr) + 1e-3
    grads = path.bwd(OP, dy, q, k, v, y, lse, causal)
    for name, g, gr, gre in zip(("dq", "dk", "dv"), grads, grads_r, ge):
        assert g.dtype == dtype
        assert maxabs(g, gr) <= 2 * maxabs(gre, gr) + 1e-3, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_contract_adversarial_magnitudes(path, causal, dtype):
    """|k| up to 1e4: finite everywhere and close to the oracle."""
    B, T, D, H, window = 2, 17, 4, 2, 3
    q, k, v, w = qkvw(B, T, D, H, dtype)
    k = (torch.rand(B, T, D, dtype=F64) * 2e4 - 1e4).to(dtype)
    w = (torch.rand(*w.shape, dtype=F64) * 2e4 - 1e4).to(dtype)
    tol = 1e-9 if dtype == F64 else 2e-3
    contract.check_all(path, OP, q, k, v, w, window, causal, tol, tol, tol_lse=1e-6 if dtype == F32 else 1e-12)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_contract_causal_late_spike(path, dtype):
    """One late key larger than every earlier key by >> 88: a split max gives 0/0; here all finite + exact."""
    B, T, D, window = 2, 70, 5, 6
    q, k, v, w = qkvw(B, T, D, None, dtype)
    k = k.clone()
    k[:, T - 3, :] = 300.0
    k[1, T - 10, 2] = -300.0
    y, lse = path.fwd(OP, q, k, v, True)
    dy = rand(B, T, D, dtype=dtype)
    grads = path.bwd(OP, dy, q, k, v, y, lse, True)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads)
    yr, grads_r = contract.oracle_grads(OP, q, k, v, w, window, True, dy)
    tol = 1e-5 if dtype == F32 else 3e-2
    if path.name == "python" and dtype == F32:
        # the python path's causal prefix scans round log-domain values to ~eps * |logit| (module docstring of
        # ops/aft_simple/reference.py), as in test_adversarial: tolerance + 8 * eps * L with L = 300
        tol += 8 * torch.finfo(F32).eps * 300
    assert maxabs(y, yr) <= tol
    for g, gr in zip(grads, grads_r):
        assert maxabs(g, gr) / max(1.0, gr.abs().max().item()) <= tol


@pytest.mark.parametrize("causal", [False, True])
def test_contract_non_contiguous(path, causal):
    B, T, D, H, window = 2, 11, 6, 3, 3
    q, k, v = (rand(B, D, T).transpose(1, 2) for _ in range(3))
    w = rand(H, T, T).transpose(1, 2)
    assert not q.is_contiguous() and not w.is_contiguous()
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-10, 1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(path, causal):
    """Through the public function: the compiled op's registered autograd / the python path's Function."""
    q, k, v = (path.leaf(x) for x in qkv(2, 6, 4))

    def f(a, b, c):
        with path.force():
            return aft_simple(a, b, c, causal)

    assert torch.autograd.gradcheck(f, (q, k, v))


# ================================================================ the fwd / bwd contract, against the python path
_TOL = {F64: 1e-10, F32: 2e-5}
SHAPES_VS_PYTHON = [(2, 13, 5), (1, 1, 1), (1, 7, 1), (3, 37, 8), (2, 130, 33)]


def _grads(fn, inputs, dy):
    xs = [x.detach().double().requires_grad_(True) for x in inputs]
    return torch.autograd.grad(fn(*xs), xs, dy.double())


def _err(a, b):
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a.double() - b.double()).abs().max() / max(b.double().abs().max().item(), 1.0)).item()


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES_VS_PYTHON)
def test_contract_vs_oracle_and_python(path, dtype, causal, shape):
    q, k, v, dy = (rand(*shape, dtype=dtype, scale=3.0 if i == 1 else 1.0) for i in range(4))
    path.poison()
    y, lse = path.fwd(OP, q, k, v, causal)
    assert y.dtype == dtype and lse.dtype == (F64 if dtype == F64 else F32)
    tol = _TOL[dtype]
    assert _err(y, oracles.aft_simple(q, k, v, causal)) < tol
    yr, lr = aft_simple_fwd_ref(q, k, v, causal)
    assert _err(y, yr) < tol and _err(lse, lr) < tol
    path.poison()
    g = path.bwd(OP, dy, q, k, v, y, lse, causal)
    ref = _grads(lambda a, b, c: oracles.aft_simple(a, b, c, causal), (q, k, v), dy)
    gr = aft_simple_bwd_ref(dy, q, k, v, yr, lr, causal)
    for name, a, b, c in zip("qkv", g, ref, gr):
        assert _err(a, b) < tol, "d" + name
        assert _err(a, c) < tol, "d" + name + " vs python path"


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64_public(path, causal):
    q, k, v = (path.leaf(rand(2, 9, 3)) for _ in range(3))

    def f(a, b, c):
        with path.force():
            return aft_simple(a, b, c, causal)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_contract_low_precision_vs_python_path(path, dtype, causal):
    """2x rule with the python path in the same dtype as the baseline (references: float64 from the
    low-precision inputs)."""
    shape = (2, 97, 24)
    q, k, v, dy = (rand(*shape, dtype=F32).to(dtype) for _ in range(4))

    def check(ours, python, ref, what):
        e_ours = (ours.double() - ref).abs().max().item()
        e_py = (python.double() - ref).abs().max().item()
        assert e_ours <= 2 * e_py + 1e-4, (what, e_ours, e_py)

    y_ref = oracles.aft_simple(q, k, v, causal)
    y, lse = path.fwd(OP, q, k, v, causal)
    yp, lp = aft_simple_fwd_ref(q, k, v, causal)
    check(y, yp, y_ref, "simple y")
    g_ref = _grads(lambda a, b, c: oracles.aft_simple(a, b, c, causal), (q, k, v), dy)
    for a, b, r, n in zip(
        path.bwd(OP, dy, q, k, v, y, lse, causal), aft_simple_bwd_ref(dy, q, k, v, yp, lp, causal), g_ref, "qkv"
    ):
        check(a, b, r, "simple d" + n)


@pytest.mark.parametrize("causal", [False, True])
def test_contract_adversarial_numerics(path, causal):
    T = 300
    q, v, dy = (rand(2, T, 4, dtype=F32) for _ in range(3))
    k = rand(2, T, 4, dtype=F32)
    k[0, :, 0] = torch.linspace(-1e4, 1e4, T)
    k[0, :, 1] = -1e4
    k[1, 250, 2] = 3000.0  # late spike, >> 88 above every earlier key
    k[1, :, 3] = 1e4 * torch.sign(rand(T, dtype=F32))
    y, lse = path.fwd(OP, q, k, v, causal)
    yr, lr = aft_simple_fwd_ref(q, k, v, causal)
    # the python path's own error is ~eps*|logit| (~2e-4 at |k| = 1e4, see ops/aft_local/reference.py); the
    # compiled kernels' is ~1e-7
    tol = 2e-3 if path.name == "python" else 1e-4
    assert _err(y, oracles.aft_simple(q, k, v, causal)) < tol and _err(y, yr) < 2e-3
    for a in path.bwd(OP, dy, q, k, v, y, lse, causal):
        assert torch.isfinite(a).all()


@pytest.mark.paths("cuda")
@pytest.mark.parametrize("B,T,D", [(1, 16384, 4096), (64, 16384, 64), (4096, 64, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_large_shapes_forward(path, B, T, D, causal):
    """Grid limits of the CUDA kernels (forward only) against the python path on the same GPU."""
    q, k, v = (path.put(rand(B, T, D, dtype=torch.bfloat16)) for _ in range(3))
    path.poison()
    y, lse = OPS.aft_simple_fwd(q, k, v, causal)
    yr, lr = aft_simple_fwd_ref(q, k, v, causal)
    assert _err(y.float(), yr.float()) < 2e-2 and _err(lse, lr) < 1e-4


@COMPILED
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_matches_python_ref(path, causal):
    """The compiled contract equals the python path's aft_simple_fwd_ref / aft_simple_bwd_ref."""
    B, T, D = 2, 19, 6
    q, k, v = qkv(B, T, D, F32)
    dy = rand(B, T, D, dtype=F32)
    y, lse = path.fwd(OP, q, k, v, causal)
    yr, lr = aft_simple_fwd_ref(q, k, v, causal)
    gr = aft_simple_bwd_ref(dy, q, k, v, yr, lr, causal)
    assert y.dtype == yr.dtype and lse.dtype == lr.dtype and lse.shape == lr.shape
    assert maxabs(y, yr) < 1e-5 and maxabs(lse, lr) < 1e-4
    g = path.bwd(OP, dy, q, k, v, y, lse, causal)
    for a, b in zip(g, gr):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert maxabs(a, b) / max(1.0, b.abs().max().item()) < 1e-5


# ================================================================ registration of the compiled ops
@COMPILED
@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_opcheck(path, dtype, causal, which):
    B, T, D = 2, 7, 4
    q, k, v = (path.leaf(x) for x in qkv(B, T, D, dtype))
    if which == "fwd":
        torch.library.opcheck(OPS.aft_simple_fwd.default, (q, k, v, causal))
    else:
        y, lse = (t.detach() for t in OPS.aft_simple_fwd(q, k, v, causal))
        dy = path.put(rand(B, T, D, dtype=dtype))
        torch.library.opcheck(OPS.aft_simple_bwd.default, (dy, q.detach(), k.detach(), v.detach(), y, lse, causal))


@COMPILED
def test_torch_compile_fullgraph(path):
    torch._dynamo.reset()
    q, k, v = (path.leaf(x) for x in qkv(2, 7, 4, F32))

    def fn(q, k, v):
        return OPS.aft_simple_fwd(q, k, v, True)[0].sum()

    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = cfn(q, k, v)
    g = torch.autograd.grad(out, (q,))[0]
    out_e = fn(q, k, v)
    g_e = torch.autograd.grad(out_e, (q,))[0]
    assert maxabs(out, out_e) < 1e-5 and maxabs(g, g_e) < 1e-5


@COMPILED
def test_public_function_torch_compile_fullgraph(path):
    """select() is traceable: the public function's compiled branch works under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    q, k, v = (path.leaf(x) for x in qkv(2, 7, 4, F32))
    f = torch.compile(lambda a, b, c: aft_simple(a, b, c, True), fullgraph=True, backend="aot_eager")
    with path.force():
        y = f(q, k, v)
        g = torch.autograd.grad(y.sum(), (k,))[0]
    y2 = OPS.aft_simple_fwd(q, k, v, True)[0]
    g2 = torch.autograd.grad(y2.sum(), (k,))[0]
    assert maxabs(y, y2) < 1e-6 and maxabs(g, g2) < 1e-6


def _bad_cases():
    q, k, v = qkv(2, 7, 4, F32)
    return [
        ((q[0], k, v), ValueError, "q must have 3 dimensions, got shape (7, 4)"),
        ((q, k[:, :5], v), ValueError, "k must have the shape of q (2, 7, 4), got (2, 5, 4)"),
        (
            (q, k.double(), v),
            TypeError,
            "q, k and v must share one dtype, got torch.float32, torch.float64, torch.float32",
        ),
    ]


@COMPILED
@pytest.mark.parametrize("idx", range(3))
def test_bad_inputs_reach_compiled_checks(path, idx):
    args, exc, msg = _bad_cases()[idx]
    with pytest.raises(exc) as info:
        path.fwd(OP, *args, False)
    assert msg in str(info.value)


@COMPILED
def test_bad_lse_reaches_compiled_checks(path):
    q, k, v = qkv(2, 7, 4, F32)
    with pytest.raises(ValueError) as info:
        path.bwd(OP, q, q, k, v, q, q[..., :2], False)
    assert "lse must have the shape of q (2, 7, 4), got (2, 7, 2)" in str(info.value)


# ================================================================ AVX2 global kernel (CPU float32)
@pytest.mark.paths("compiled-cpu")
def test_global_bit_identical_across_threads(path):
    """Non-causal float32 (the vectorised global kernel, channel tails included): same bits for 1/2/3 threads."""
    q, k, v = _inputs((3, 150, 76), F32)
    dy = torch.randn(3, 150, 76, dtype=F32)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, grads = _run_public(path, q, k, v, dy, False)
            outs.append((y, *grads))
    finally:
        torch.set_num_threads(n0)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


@pytest.mark.paths("compiled-cpu")
def test_global_nonfinite_contract(path):
    """-inf k excludes a key; an all -inf column gives y = 0, lse = -inf, zero grads; NaN in v propagates."""
    q, k, v = _inputs((1, 40, 20), F32)
    dy = torch.randn(1, 40, 20, dtype=F32)
    k[0, 3, 0] = float("-inf")
    k[0, :, 1] = float("-inf")
    v[0, 7, 2] = float("nan")
    y, lse = path.fwd(OP, q, k, v, False)
    keep = torch.ones(40, dtype=torch.bool)
    keep[3] = False
    yo = torch.sigmoid(q[0, :, 0]) * (torch.softmax(k[0, keep, 0], 0) * v[0, keep, 0]).sum()
    assert torch.allclose(y[0, :, 0], yo, atol=1e-6)
    assert (y[0, :, 1] == 0).all() and (lse[0, :, 1] == float("-inf")).all()
    assert torch.isnan(y[0, :, 2]).all() and torch.isfinite(y[0, :, 3:]).all()
    dq, dk, dv = path.bwd(OP, dy, q, k, v, y, lse, False)
    assert (dk[0, :, 1] == 0).all() and (dv[0, :, 1] == 0).all() and (dq[0, :, 1] == 0).all()
    assert dk[0, 3, 0] == 0 and dv[0, 3, 0] == 0
    assert torch.isfinite(dk[0, :, 3:]).all()


# ================================================================ recurrent state (causal; docs/design.md §2.7)
# The state ops torch.ops.attnfree.aft_simple_state_fwd / _bwd and aft_simple_compiled, on the compiled-CPU, CUDA
# and emulation paths. State (B, 3, D) = (running max, sum exp(k - m) v, sum exp(k - m)) in the accumulate type.
STATE_PATHS = pytest.mark.paths("compiled-cpu", "cuda", "emulation")
STATE_TOL = {F64: 1e-12, F32: 1e-5}
NINF = float("-inf")


def _state_fwd(path, q, k, v, s0, causal=True):
    return path.fwd("aft_simple_state", q, k, v, causal, None if s0 is None else path.put(s0))


def _splits(T, seed):
    """Random cut points of [0, T): chunks of length 1, longer ones and (at the start) an empty one."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted({0, 1, T // 2, T - 1, *torch.randint(0, T + 1, (3,), generator=g).tolist(), T})
    return [(a, b) for a, b in zip([0] + cuts, cuts)]  # the first pair (0, 0) is an empty chunk


def _oracle_state(k, v, s0=None):
    """The state of all keys of k, v (B, T, D) after s0, in float64."""
    kd, vd = k.double(), v.double()
    m = kd.amax(1)
    if s0 is not None:
        m = torch.maximum(m, s0[:, 0].double())
    m = torch.where(torch.isneginf(m), m.detach(), m)  # an empty state's -inf max: masked keys get no gradient
    off = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(kd - off[:, None])
    num, den = (e * vd).sum(1), e.sum(1)
    if s0 is not None:
        es = torch.exp(s0[:, 0].double() - off)
        num, den = num + es * s0[:, 1].double(), den + es * s0[:, 2].double()
    return torch.stack([m, num, den], 1)


def _state_rel(a, b):
    """Relative error of two states: m and the sums under one offset (a state is the pair num e^m, den e^m)."""
    a, b = a.double(), b.double()
    assert torch.equal(torch.isneginf(a[:, 0]), torch.isneginf(b[:, 0]))
    live = ~torch.isneginf(b[:, 0])
    em = torch.exp(a[:, 0] - b[:, 0]).where(live, torch.ones_like(b[:, 0]))
    rm = rel_err(a[:, 0][live], b[:, 0][live], max(b[:, 0][live].abs().max().item(), 1.0)) if live.any() else 0.0
    rs = rel_err(a[:, 1:] * em[:, None], b[:, 1:], max(b[:, 1:].abs().max().item(), 1e-300))
    return max(rm, rs)


@STATE_PATHS
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_state_chunked_equals_full(path, dtype, seed):
    """Chunks carrying the state give the full-sequence output and final state (fp32 <= 1e-5, fp64 <= 1e-12) and
    match the float64 oracle; random cut points, chunks of length 1, an empty chunk, an empty-state start."""
    torch.manual_seed(seed)
    B, T, D = 2, 29, 67
    q, k, v = _inputs((B, T, D), dtype)
    y_full, lse_full, s_full = _state_fwd(path, q, k, v, None)
    ys, s = [], None
    for a, b in _splits(T, seed):
        y, lse, s = _state_fwd(path, q[:, a:b], k[:, a:b], v[:, a:b], s)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_full[:, a:b]))
        ys.append(y)
    y_chunk = torch.cat(ys, 1)
    tol = STATE_TOL[dtype]
    assert rel_err(y_chunk, y_full) < tol and _state_rel(s, s_full) < tol
    yo = oracles.aft_simple(q.double(), k.double(), v.double(), True)
    assert rel_err(y_chunk, yo) < BASE_TOL[dtype] and rel_err(y_full, yo) < BASE_TOL[dtype]
    assert _state_rel(s, _oracle_state(k, v)) < BASE_TOL[dtype]
    # the plain op gives the same y and lse
    y0, lse0 = path.fwd(OP, q, k, v, True)
    assert torch.equal(y0, y_full) and torch.equal(lse0, lse_full)


@STATE_PATHS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_state_chunked_low_precision(path, dtype):
    """fp16/bf16 inputs, float32 state: the chunked run is as close to the float64 oracle as the full run (y
    rounds to the input dtype at the same float32 values up to ~1e-6)."""
    B, T, D = 2, 33, 20
    q, k, v = _inputs((B, T, D), dtype)
    y_full, _, s_full = _state_fwd(path, q, k, v, None)
    assert s_full.dtype == F32
    ys, s = [], None
    for a, b in _splits(T, 3):
        y, _, s = _state_fwd(path, q[:, a:b], k[:, a:b], v[:, a:b], s)
        ys.append(y)
    yo = oracles.aft_simple(q.double(), k.double(), v.double(), True)
    e_full = rel_err(y_full, yo)
    assert rel_err(torch.cat(ys, 1), yo) <= 2 * e_full + torch.finfo(dtype).eps
    assert _state_rel(s, s_full) < 1e-5 and _state_rel(s, _oracle_state(k, v)) < 1e-5


@STATE_PATHS
def test_state_empty_is_none(path):
    """(-inf, 0, 0) is the same state as None (same bits)."""
    q, k, v = _inputs((2, 9, 5), F32)
    empty = torch.zeros(2, 3, 5)
    empty[:, 0] = NINF
    a = _state_fwd(path, q, k, v, None)
    b = _state_fwd(path, q, k, v, empty)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _chunked_grads(path, q, k, v, dy, gF, s0, cuts, dtype):
    """Gradients of <y, dy> + <final_state, gF> for q, k, v, s0 through a run cut at `cuts` (state carried)."""
    from attnfree_ext.ops.aft_simple.compiled import aft_simple_compiled

    leaves = [path.leaf(x) for x in (q, k, v)]
    s0l = path.leaf(s0) if s0 is not None else None
    ys, s = [], s0l
    with path.force():
        for a, b in cuts:
            y, s = aft_simple_compiled(*(x[:, a:b] for x in leaves), True, s, True)
            ys.append(y)
        y = torch.cat(ys, 1)
        outs = [y, s]
        want = leaves + ([s0l] if s0l is not None else [])
        g = torch.autograd.grad(outs, want, [path.put(dy.to(dtype)), path.put(gF)])
    return y.detach().cpu(), s.detach().cpu(), [t.cpu() for t in g]


def _prefix_state(k, v):
    """A state from a real prefix (so it is a canonical one), float64 or float32 like k."""
    return _oracle_state(k, v).to(F64 if k.dtype == F64 else F32)


@STATE_PATHS
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("with_state", [False, True])
def test_state_gradients_chunked_equal_full(path, dtype, with_state):
    """Gradients (q, k, v, initial_state) through a chunked run with the state carried equal those of the
    full-sequence run, and the full run's equal the float64 oracle over the prefix + sequence."""
    B, T, D = 2, 23, 11
    q, k, v = _inputs((B, T, D), dtype)
    dy = rand(B, T, D, dtype=dtype)
    acc = F64 if dtype == F64 else F32
    gF = rand(B, 3, D, dtype=acc)
    pk, pv = _inputs((B, 5, D), dtype)[1:]
    s0 = _prefix_state(pk, pv) if with_state else None
    yf, sf, gfull = _chunked_grads(path, q, k, v, dy, gF, s0, [(0, T)], dtype)
    yc, sc, gchunk = _chunked_grads(path, q, k, v, dy, gF, s0, _splits(T, 5), dtype)
    tol = STATE_TOL[dtype] * 10
    assert rel_err(yc, yf) < tol and _state_rel(sc, sf) < tol
    for name, a, b in zip(("dq", "dk", "dv", "ds0"), gchunk, gfull):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    # float64 oracle: the state as the prefix (pk, pv) it came from (the prefix's q does not matter)
    n0 = 5 if with_state else 0
    qd = torch.cat([torch.zeros(B, n0, D, dtype=F64), q.double()], 1).requires_grad_()
    kd = torch.cat([pk.double()[:, :n0], k.double()], 1).requires_grad_()
    vd = torch.cat([pv.double()[:, :n0], v.double()], 1).requires_grad_()
    yo = oracles.aft_simple(qd, kd, vd, True)[:, n0:]
    so = _oracle_state(kd, vd)
    go = torch.autograd.grad((yo, so), (qd, kd, vd), (dy.double(), gF.double()))
    assert rel_err(yf, yo.detach()) < BASE_TOL[dtype] and _state_rel(sf, so.detach()) < BASE_TOL[dtype]
    for name, a, b in zip(("dq", "dk", "dv"), gfull[:3], (g[:, n0:] for g in go)):
        assert rel_err(a, b) < 10 * BASE_TOL[dtype], (name, rel_err(a, b))


@STATE_PATHS
def test_state_gradcheck_float64(path):
    """Finite differences through y and the final state w.r.t. q, k, v and all three rows of initial_state
    (the m row included: the state stands for num e^m, den e^m)."""
    from attnfree_ext.ops.aft_simple.compiled import aft_simple_compiled

    B, T, D = 2, 6, 3
    q, k, v = (x.requires_grad_() for x in _inputs((B, T, D), F64))
    s0 = torch.stack([rand(B, D), rand(B, D), rand(B, D).abs() + 0.5], 1).requires_grad_()
    s0.data[0, 0, 0] = 5.0  # the state holds the final max of this channel

    def f(q, k, v, s0):
        with path.force():
            return aft_simple_compiled(q, k, v, True, s0, True)

    with path.force():  # emulation: the backward op must run under the dispatch mode too
        assert torch.autograd.gradcheck(f, (q, k, v, s0), eps=1e-6, atol=1e-7)


@STATE_PATHS
@pytest.mark.parametrize("dtype", [F64, F32])
def test_state_neg_inf_masks(path, dtype):
    """-inf keys with a state: a masked key is excluded (zero gradient); a channel whose keys and state are all
    empty gives y = 0, lse = -inf and the empty final state; a masked chunk leaves the state unchanged."""
    B, T, D = 2, 12, 5
    q, k, v = _inputs((B, T, D), dtype)
    k[0, 3, 1] = NINF
    k[0, :, 2] = NINF  # with the prefix state below: every row of (0, 2) sees only the state
    k[1, :, 4] = NINF  # and an empty state on (1, 4): no finite logit anywhere
    k[1, ::2, 0] = NINF
    pk, pv = _inputs((B, 4, D), dtype)[1:]
    pk[1, :, 4] = NINF
    s0 = _prefix_state(pk, pv)
    assert torch.isneginf(s0[1, 0, 4]) and s0[1, 2, 4] == 0
    y, lse, sF = _state_fwd(path, q, k, v, s0)
    assert (y[1, :, 4] == 0).all() and torch.isneginf(lse[1, :, 4]).all()
    assert torch.isneginf(sF[1, 0, 4]) and sF[1, 1, 4] == 0 and sF[1, 2, 4] == 0
    assert torch.equal(sF[0, :, 2], s0[0, :, 2])  # nothing was added
    live = ~torch.isneginf(lse)
    assert torch.isfinite(y).all() and torch.isfinite(lse[live]).all()
    # against the masked float64 oracle over prefix + sequence
    qd = torch.cat([torch.zeros(B, 4, D, dtype=F64), q.double()], 1).requires_grad_()
    kd = torch.cat([pk.double(), k.double()], 1).requires_grad_()
    vd = torch.cat([pv.double(), v.double()], 1).requires_grad_()
    yo, lo = oracles.aft_masked_per_channel(qd, kd, vd, None, True)
    assert rel_err(y, yo[:, 4:].detach()) < BASE_TOL[dtype]
    assert rel_err(lse[live], lo[:, 4:][live].detach()) < BASE_TOL[dtype]
    assert _state_rel(sF, _oracle_state(kd.detach(), vd.detach())) < BASE_TOL[dtype]
    dy = rand(B, T, D, dtype=dtype)
    gF = rand(B, 3, D, dtype=F64 if dtype == F64 else F32)
    _, _, g = _chunked_grads(path, q, k, v, dy, gF, s0, _splits(T, 1), dtype)
    for t in g:
        assert torch.isfinite(t).all()
    assert (g[1][torch.isneginf(k)] == 0).all() and (g[2][torch.isneginf(k)] == 0).all()
    assert (g[3][1, :, 4] == 0).all()  # the empty state of (1, 4) gets no gradient
    so = _oracle_state(kd, vd)
    go = torch.autograd.grad((yo[:, 4:], so), (kd, vd), (dy.double(), gF.double()))
    for name, a, b in zip(("dk", "dv"), g[1:3], (x[:, 4:] for x in go)):
        assert rel_err(a, b) < 10 * BASE_TOL[dtype], (name, rel_err(a, b))


@pytest.mark.paths("compiled-cpu", "cuda")
def test_state_bad_inputs_name_initial_state(path):
    q, k, v = (path.put(x) for x in _inputs((2, 7, 4), F32))
    ok = path.put(torch.zeros(2, 3, 4))
    ops = torch.ops.attnfree
    with pytest.raises(ValueError, match=r"initial_state must have the shape \(B, 3, D\) = \(2, 3, 4\)"):
        ops.aft_simple_state_fwd(q, k, v, True, ok[:, :2])
    with pytest.raises(TypeError, match="initial_state must be torch.float32 for torch.float32 inputs"):
        ops.aft_simple_state_fwd(q, k, v, True, ok.double())
    with pytest.raises(ValueError, match="initial_state needs causal=True"):
        ops.aft_simple_state_fwd(q, k, v, False, ok)
    # the plain ops are unchanged, and a non-causal final state is the state of all keys
    y, lse, sF = ops.aft_simple_state_fwd(q, k, v, False, None)
    y0, lse0 = ops.aft_simple_fwd(q, k, v, False)
    assert torch.equal(y, y0) and torch.equal(lse, lse0)
    assert _state_rel(sF.cpu(), _oracle_state(k.cpu(), v.cpu())) < 1e-6


@STATE_PATHS
def test_state_non_causal_final_state_gradients(path):
    """causal=False with the final state: gradients through y and the state of all keys vs float64 autograd."""
    B, T, D = 2, 9, 4
    q, k, v = _inputs((B, T, D), F64)
    dy, gF = rand(B, T, D), rand(B, 3, D)
    from attnfree_ext.ops.aft_simple.compiled import aft_simple_compiled

    leaves = [path.leaf(x) for x in (q, k, v)]
    with path.force():
        y, s = aft_simple_compiled(*leaves, False, None, True)
        g = torch.autograd.grad((y, s), leaves, (dy, gF))
    qd, kd, vd = (x.clone().requires_grad_() for x in (q, k, v))
    yo = oracles.aft_simple(qd, kd, vd, False)
    so = _oracle_state(kd, vd)
    go = torch.autograd.grad((yo, so), (qd, kd, vd), (dy, gF))
    assert _state_rel(s.detach(), so.detach()) < 1e-12
    for name, a, b in zip("qkv", g, go):
        assert rel_err(a, b) < 1e-10, (name, rel_err(a, b))


@STATE_PATHS
def test_state_double_backward(path):
    """create_graph=True through the state ops (the differentiable composite of compiled.state_composite)."""
    from attnfree_ext.ops.aft_simple.compiled import aft_simple_compiled

    B, T, D = 1, 4, 2
    q, k, v = (x.requires_grad_() for x in _inputs((B, T, D), F64))
    s0 = torch.stack([rand(B, D), rand(B, D), rand(B, D).abs() + 0.5], 1).requires_grad_()

    def f(q, k, v, s0):
        return aft_simple_compiled(q, k, v, True, s0, True)

    with path.force():
        assert torch.autograd.gradgradcheck(f, (q, k, v, s0), eps=1e-6, atol=1e-6)


@pytest.mark.paths("compiled-cpu")
@pytest.mark.parametrize("dtype", [F32, F64])
def test_state_causal_bit_identical_across_threads(path, dtype):
    """Causal with a state and -inf masks (the band kernels: AVX2 for float32, scalar for float64): same bits for
    1/2/3 threads, forward and backward."""
    B, T, D = 3, 40, 76
    q, k, v = _inputs((B, T, D), dtype)
    k[0, :, 5] = NINF
    k[1, ::3, 9] = NINF
    s0 = _prefix_state(*_inputs((B, 6, D), dtype)[1:])
    dy = rand(B, T, D, dtype=dtype)
    gF = rand(B, 3, D, dtype=s0.dtype)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, lse, sF = OPS.aft_simple_state_fwd(q, k, v, True, s0)
            g = OPS.aft_simple_state_bwd(dy, gF, q, k, v, s0, y, lse, sF, True)
            outs.append((y, lse, sF, *g))
    finally:
        torch.set_num_threads(n0)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_spikes_inside_chunks_and_long_sequences(path, dtype, causal):
    """Shapes the vectorised CUDA forward takes (D a multiple of 16 bytes of channels; T = 1100 spans three tiles
    of 512 steps and a partial one): spikes of +200 and -200 in the middle of 8-step chunks (its exactness guard
    re-walks such a chunk per element), -inf keys, a state carried across the tiles; y, lse and the gradients
    against the float64 oracle."""
    B, T, D = 1, 1100, 16
    q, k, v = _inputs((B, T, D), F64)
    k[0, 37, :4] = 200.0  # a late spike inside chunk [32, 40): rows 32..36 see only far smaller keys
    k[0, 613, 4:8] = -200.0
    k[0, 700:705, 8] = NINF
    k[0, :3, 9] = NINF  # causal rows 0..2 of channel 9: no finite logit
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    dy = rand(B, T, D, dtype=dtype)
    y, lse = path.fwd(OP, q, k, v, causal)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    yo, lo = oracles.aft_masked_per_channel(qd, kd, vd, None, causal)
    tol = 1e-10 if dtype == F64 else (1e-5 if dtype == F32 else 2e-2)
    ltol = tol + 8 * torch.finfo(dtype if dtype != torch.bfloat16 else F32).eps * 200
    assert torch.isfinite(y).all() and rel_err(y, yo.detach()) < tol
    dead = torch.isneginf(lo)
    assert torch.equal(torch.isneginf(lse), dead)
    assert rel_err(lse[~dead], lo[~dead].detach(), lo[~dead].abs().max().item()) < ltol
    if dtype == torch.bfloat16:
        return
    dq, dk, dv = path.bwd(OP, dy, q, k, v, y, lse, causal)
    go = torch.autograd.grad(yo, (qd, kd, vd), dy.double())
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), go):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 10 * tol + ltol, (name, rel_err(a, b))


@COMPILED
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_opcheck_state_ops(path, dtype, with_state):
    """Schemas, fake kernels and the autograd registration of aft_simple_state_fwd / _bwd."""
    B, T, D = 2, 7, 4
    q, k, v = (path.leaf(x) for x in qkv(B, T, D, dtype))
    s0 = path.leaf(_prefix_state(*_inputs((B, 3, D), dtype)[1:])) if with_state else None
    torch.library.opcheck(OPS.aft_simple_state_fwd.default, (q, k, v, True, s0))
    y, lse, sF = (t.detach() for t in OPS.aft_simple_state_fwd(q, k, v, True, s0))
    dy, gF = path.put(rand(B, T, D, dtype=dtype)), path.put(torch.randn_like(sF.cpu()))
    s0d = None if s0 is None else s0.detach()
    args = (dy, gF, q.detach(), k.detach(), v.detach(), s0d, y, lse, sF, True)
    torch.library.opcheck(OPS.aft_simple_state_bwd.default, args)


# ================================================================ packed sequences (cu_seqlens) on the compiled ops
# Native: each sequence is scanned alone on its rows of (1, total_T, D); states (N, 3, D) (docs/design.md §9.3).
def _varlen_inputs(dtype=F64):
    lengths = [4, 1, 0, 6]
    q, k, v = qkv(1, sum(lengths), 4, dtype)
    cu = torch.tensor([0, 4, 5, 5, 11], dtype=torch.int32)
    return q, k, v, cu, lengths


@COMPILED
@pytest.mark.parametrize("which", ["fwd", "bwd", "state_fwd", "state_bwd"])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_varlen(path, which, causal):
    """Schemas, fake kernels (N states) and autograd of the ops with cu_seqlens / max_seqlen."""
    q, k, v, cu, _ = _varlen_inputs()
    q, k, v = (path.leaf(x) for x in (q, k, v))
    cu = path.put(cu)
    if which == "fwd":
        torch.library.opcheck(OPS.aft_simple_fwd.default, (q, k, v, causal, cu, 6))
        return
    if which == "bwd":
        y, lse = (t.detach() for t in OPS.aft_simple_fwd(q, k, v, causal, cu))
        dy = path.put(rand(*q.shape, dtype=F64))
        torch.library.opcheck(OPS.aft_simple_bwd.default, (dy, q.detach(), k.detach(), v.detach(), y, lse, causal, cu))
        return
    s0 = None
    if causal:
        s0 = path.leaf(
            torch.stack([rand(4, 4, dtype=F64), rand(4, 4, dtype=F64), rand(4, 4, dtype=F64).abs() + 0.5], 1)
        )
    if which == "state_fwd":
        torch.library.opcheck(OPS.aft_simple_state_fwd.default, (q, k, v, causal, s0, cu, None))
        return
    y, lse, sF = (t.detach() for t in OPS.aft_simple_state_fwd(q, k, v, causal, s0, cu))
    assert sF.shape == (4, 3, 4)
    dy, gF = path.put(rand(*q.shape, dtype=F64)), path.put(rand(4, 3, 4, dtype=F64))
    s0d = None if s0 is None else s0.detach()
    args = (dy, gF, q.detach(), k.detach(), v.detach(), s0d, y, lse, sF, causal, cu, 6)
    torch.library.opcheck(OPS.aft_simple_state_bwd.default, args)


@pytest.mark.paths("compiled-cpu", "emulation")
def test_varlen_bad_arguments_reach_compiled_checks(path):
    """Bad cu_seqlens / max_seqlen / per-sequence states given straight to the ops: the C++ checks name them."""
    q, k, v, cu, _ = _varlen_inputs(F32)
    bad = [
        ((cu[None], None), ValueError, "cu_seqlens must have shape (N + 1,) with N >= 0, got (1, 5)"),
        ((cu.float(), None), TypeError, "cu_seqlens must be int32 or int64, got torch.float32"),
        ((torch.tensor([1, 4, 11]), None), ValueError, "cu_seqlens must start at 0, got 1"),
        ((torch.tensor([0, 5, 4, 11]), None), ValueError, "cu_seqlens must be non-decreasing, got 5 then 4"),
        ((torch.tensor([0, 4, 10]), None), ValueError, "cu_seqlens must end at total_T = q.shape[1] = 11, got 10"),
        ((cu, 5), ValueError, "max_seqlen = 5 is smaller than the longest sequence of cu_seqlens (6)"),
        ((cu, -1), ValueError, "max_seqlen must be >= 0, got -1"),
        ((None, 6), ValueError, "max_seqlen needs cu_seqlens"),
    ]
    for (c, m), exc, msg in bad:
        for causal in (False, True):
            with pytest.raises(exc) as info:
                path.fwd(OP, q, k, v, causal, c, m)
            assert msg in str(info.value)
    with pytest.raises(ValueError) as info:
        path.fwd(OP, q.expand(2, -1, -1), k.expand(2, -1, -1), v.expand(2, -1, -1), True, cu)
    assert "with cu_seqlens, q, k and v must be packed as (1, total_T, D), got (2, 11, 4)" in str(info.value)
    s1 = torch.zeros(1, 3, 4)
    with pytest.raises(ValueError) as info:
        path.fwd("aft_simple_state", q, k, v, True, s1, cu)
    assert "initial_state must have the shape (N, 3, D) = (4, 3, 4) with cu_seqlens" in str(info.value)
