"""AFT-local (attnfree_ext.ops.aft_local) on every path (python, compiled CPU, CUDA) against the float64 oracles.

Error measure of the public-function tests: max-abs error divided by a scale: the oracle's max-abs value; for dk
also max|v| * max|dv| (the terms that cancel in dk = v dv - sum P H); for dw also B * D/heads * max|dy| * max|v|
(the size of the summed terms P (G v - H)). float64 tolerance 1e-10, float32 1e-5, both plus 8 * eps * L with L
the largest |logit| (|k| + |w|): log-domain scans and the stored lse round to ~eps * |value|.
fp16/bf16: the 2x rule (tests/common/metrics.py; docs/design.md §5).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnfree_ext.ops.aft_local import aft_local, layout
from attnfree_ext.ops.aft_local import reference as aft_local_ref
from common import aft as contract
from common import oracles
from common.inputs import qkvw, rand
from common.metrics import maxabs, rel_err

OP = "aft_local"
OPS = torch.ops.attnfree
COMPILED = pytest.mark.paths("compiled-cpu", "cuda")
F64, F32 = torch.float64, torch.float32
BASE_TOL = {F64: 1e-10, F32: 1e-5}


def _tol(dtype, k, w):
    eps = torch.finfo(dtype).eps
    return BASE_TOL[dtype] + 8 * eps * (k.abs().max().item() + w.abs().max().item())


def _oracle(q, k, v, w, window, dy, causal):
    qd, kd, vd, wd = (x.detach().double().requires_grad_() for x in (q, k, v, w))
    y = oracles.aft_local(qd, kd, vd, wd, window, causal)
    return y.detach(), torch.autograd.grad(y, (qd, kd, vd, wd), dy.double())


def _oracle_lse(k, w, window, causal):
    return oracles.aft_lse(k, oracles.bias_per_channel(oracles.local_bias(w.double(), window), k.shape[2]), causal)


def _check_all(y, grads, yo, go, v, w, dy, tol):
    dq, dk, dv, dw = grads
    oq, ok, ov, ow = go
    B, T, D = v.shape
    dh = D // (w.shape[0] if w.dim() == 3 else 1)
    assert rel_err(y, yo) < tol, ("y", rel_err(y, yo))
    assert rel_err(dq, oq) < tol, ("dq", rel_err(dq, oq))
    assert rel_err(dv, ov) < tol, ("dv", rel_err(dv, ov))
    vmax = v.double().abs().max().item()
    dk_scale = max(ok.abs().max().item(), vmax * ov.abs().max().item())
    assert rel_err(dk, ok, dk_scale) < tol, ("dk", rel_err(dk, ok, dk_scale))
    dw_scale = max(ow.abs().max().item(), B * dh * dy.double().abs().max().item() * vmax)
    assert rel_err(dw, ow, dw_scale) < tol, ("dw", rel_err(dw, ow, dw_scale))


def _run_public(path, q, k, v, w, window, dy, causal, w_layout="full"):
    return path.grads(aft_local, (q, k, v, w), dy, window, causal=causal, w_layout=w_layout)


def _band(T, window, causal=False):
    idx = torch.arange(T)
    rel = idx[:, None] - idx[None, :]
    band = rel.abs() < window
    return band & (rel >= 0) if causal else band


# ================================================================ the public function
CASES = [  # (B, T, D, heads) ; heads == 0 means a 2-D (T, T) w
    (2, 13, 6, 0),
    (2, 13, 6, 3),
    (1, 37, 4, 2),
    (1, 1, 1, 0),
    (3, 7, 5, 5),
    (1, 2, 1, 1),
]


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 7, 40])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_oracle(path, case, window, causal, dtype):
    B, T, D, heads = case
    q, k, v, w = qkvw(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=dtype)
    y, grads = _run_public(path, q, k, v, w, window, dy, causal)
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert grads[3].shape == w.shape
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, _tol(dtype, k, w))


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 11])
def test_contract_directly(path, window, causal, dtype):
    """The fwd/bwd contract: (y, lse) and (dq, dk, dv, dw) against the oracle."""
    B, T, D, heads = 2, 11, 4, 2
    q, k, v, w = qkvw(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=dtype)
    y, lse = path.fwd(OP, q, k, v, w, window, causal)
    ct = F64 if dtype == F64 else F32
    assert y.dtype == dtype and y.shape == (B, T, D)
    assert lse.dtype == ct and lse.shape == (B, T, D)
    dq, dk, dv, dw = path.bwd(OP, dy, q, k, v, w, y, lse, window, causal)
    assert dq.dtype == dk.dtype == dv.dtype == dw.dtype == dtype and dw.shape == w.shape
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    tol = _tol(ct, k, w) if dtype != torch.bfloat16 else 3e-2
    assert rel_err(lse, _oracle_lse(k, w, window, causal)) < tol
    _check_all(y, (dq, dk, dv, dw), yo, go, v, w, dy, tol)


@pytest.mark.parametrize("causal", [False, True])
def test_window_limits(path, causal):
    """window >= T is aft_full with w everywhere; window == 1 keeps only w's diagonal."""
    B, T, D = 2, 9, 4
    q, k, v, w = qkvw(B, T, D, 2, F64)
    qp, kp, vp, wp = path.put((q, k, v, w))
    with path.force():
        full = aft_local(qp, kp, vp, wp, T, causal=causal).cpu()
        huge = aft_local(qp, kp, vp, wp, 10 * T, causal=causal).cpu()
        diag = aft_local(qp, kp, vp, wp, 1, causal=causal).cpu()
    torch.testing.assert_close(full, oracles.aft(q, k, v, w, causal), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(huge, full, rtol=1e-12, atol=1e-12)
    wdiag = torch.diag_embed(torch.diagonal(w, dim1=-2, dim2=-1))
    torch.testing.assert_close(diag, oracles.aft(q, k, v, wdiag, causal), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_window_int64_max_equals_T(path, causal):
    """window = 2**63 - 1 is clamped to T (binding, launchers, workspace sizes): no overflow of T + window, the
    forward and backward ops equal window = T exactly."""
    B, T, D = 2, 9, 4
    q, k, v, w = qkvw(B, T, D, 2, F64)
    dy = rand(B, T, D, dtype=F64)
    big = 2**63 - 1
    y_t, lse_t = path.fwd(OP, q, k, v, w, T, causal)
    y_b, lse_b = path.fwd(OP, q, k, v, w, big, causal)
    g_t = path.bwd(OP, dy, q, k, v, w, y_t, lse_t, T, causal)
    g_b = path.bwd(OP, dy, q, k, v, w, y_b, lse_b, big, causal)
    torch.testing.assert_close(y_b, y_t, rtol=0, atol=0)
    torch.testing.assert_close(lse_b, lse_t, rtol=0, atol=0)
    for a, b in zip(g_b, g_t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [2, 5])
def test_reads_only_the_band(path, window, causal):
    """w outside the band is never used (NaN there changes nothing) and gets a zero gradient."""
    B, T, D = 2, 10, 3
    q, k, v, w = qkvw(B, T, D, 0, F64)
    dy = torch.randn(B, T, D, dtype=F64)
    band = _band(T, window)
    w_nan = w.masked_fill(~band, float("nan"))
    y1, g1 = _run_public(path, q, k, v, w, window, dy, causal)
    y2, g2 = _run_public(path, q, k, v, w_nan, window, dy, causal)
    assert torch.isfinite(y2).all() and all(torch.isfinite(g).all() for g in g2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    visible = _band(T, window, causal)
    assert (g1[3][~visible] == 0).all()


@pytest.mark.paths("python")
@pytest.mark.parametrize("factor", [1, 2, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_chunk_size_does_not_matter(path, factor, causal, monkeypatch):
    B, T, D = 2, 23, 4
    q, k, v, w = qkvw(B, T, D, 2, F64)
    dy = torch.randn(B, T, D, dtype=F64)
    ref = _run_public(path, q, k, v, w, 4, dy, causal)
    monkeypatch.setattr(aft_local_ref, "_BLOCK_FACTOR", factor)
    got = _run_public(path, q, k, v, w, 4, dy, causal)
    for a, b in zip((ref[0], *ref[1]), (got[0], *got[1])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [0, 2])
def test_non_contiguous(path, heads, causal):
    B, T, D = 2, 13, 4
    q, k, v = (torch.randn(B, D, T, dtype=F64).transpose(1, 2) for _ in range(3))
    w = torch.randn(T, T, dtype=F64).t() if heads == 0 else torch.randn(T, T, heads, dtype=F64).permute(2, 0, 1)
    dy = torch.randn(B, D, T, dtype=F64).transpose(1, 2)
    assert not (q.is_contiguous() or w.is_contiguous())
    y, grads = _run_public(path, q, k, v, w, 3, dy, causal)
    yo, go = _oracle(q, k, v, w, 3, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, 1e-10)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 13])
@pytest.mark.parametrize("case", ["k_1e4", "w_1e4", "late_spike", "early_spike"])
def test_adversarial(path, case, window, causal, dtype):
    """|k|, |w| ~ 1e4 and causal late/early spikes of 3000: finite and matching the oracle."""
    B, T, D = 2, 13, 6
    q, k, v, w = qkvw(B, T, D, 3, F64, k_scale=1e4 if case == "k_1e4" else 1.0, w_scale=1e4 if case == "w_1e4" else 1.0)
    if case == "late_spike":
        k[:, -3, :] += 3000
    elif case == "early_spike":
        k[:, 1, :] += 3000
    q, k, v, w = (x.to(dtype) for x in (q, k, v, w))
    dy = torch.randn(B, T, D, dtype=dtype)
    y, grads = _run_public(path, q, k, v, w, window, dy, causal)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, _tol(dtype, k, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 4, 37])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_low_precision_2x_rule(path, seed, window, causal, dtype):
    torch.manual_seed(seed)
    B, T, D = 2, 37, 4
    q, k, v, w = qkvw(B, T, D, 2, dtype)
    dy = torch.randn(B, T, D, dtype=dtype)
    y, grads = _run_public(path, q, k, v, w, window, dy, causal)
    assert y.dtype == dtype and grads[3].dtype == dtype
    qe, ke, ve, we = (x.detach().clone().requires_grad_() for x in (q, k, v, w))
    ye = contract.eager_lowp(OP, qe, ke, ve, we, window, causal)
    ge = torch.autograd.grad(ye, (qe, ke, ve, we), dy)
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    for name, ours, eager, ref in zip("y q k v w".split(), (y, *grads), (ye, *ge), (yo, *go)):
        e_ours = (ours.double() - ref).abs().max().item()
        e_eager = (eager.double() - ref).abs().max().item()
        assert torch.isfinite(ours).all()
        assert e_ours <= 2 * e_eager + 1e-4 * ref.abs().max().item(), (name, e_ours, e_eager)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [0, 2])
@pytest.mark.parametrize("window", [1, 2, 5])
def test_gradcheck(path, window, heads, causal):
    T = 5
    q, k, v = (path.leaf(torch.randn(2, T, 2, dtype=F64)) for _ in range(3))
    w = path.leaf(torch.randn(*(() if heads == 0 else (heads,)), T, T, dtype=F64))

    def f(q, k, v, w):
        with path.force():
            return aft_local(q, k, v, w, window, causal=causal)

    assert torch.autograd.gradcheck(f, (q, k, v, w))


def test_input_validation():
    B, T, D = 2, 5, 4
    q = torch.randn(B, T, D)
    w = torch.randn(T, T)
    with pytest.raises(ValueError):
        aft_local(q, q, q, torch.randn(T, T + 1), 2)
    with pytest.raises(ValueError):
        aft_local(q, q, q, torch.randn(3, T, T), 2)  # D % heads != 0
    with pytest.raises(ValueError):
        aft_local(q, q, q, w, 0)
    with pytest.raises(TypeError):
        aft_local(q, q, q, w, 2.0)
    with pytest.raises(TypeError):
        aft_local(q, q, q, w.double(), 2)
    with pytest.raises(TypeError):
        aft_local(q, q.half(), q, w, 2)
    with pytest.raises(ValueError):
        aft_local(q, q, q[:, :3], w, 2)
    with pytest.raises(ValueError):
        aft_local(q, q, q, w.to("meta"), 2)


@pytest.mark.parametrize("causal", ["no", 1, None, torch.tensor(False)])
def test_causal_must_be_a_bool(causal):
    """Like aft_full and aft_simple: a truthy non-bool (causal="no") raises instead of running causal."""
    q = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="causal must be a bool"):
        aft_local(q, q, q, torch.randn(5, 5), 2, causal)


def test_w_dtype_message_matches_aft_full():
    q = torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match=r"w must have the dtype of q \(torch.float32\), got torch.float64"):
        aft_local(q, q, q, torch.randn(5, 5, dtype=torch.float64), 2)


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
@pytest.mark.parametrize("window", [1, 8, 64])
def test_memory_bound(path, window, causal):
    """No op produces more than O(B*T*D + T*window) elements: the band block is <= ~4*B*T*D, dw is (T, T)."""
    B, T, D = 2, 64, 4
    q, k, v = (torch.randn(B, T, D, requires_grad=True) for _ in range(3))
    w = torch.randn(T, T, requires_grad=True)
    with _MaxNumel() as mode, path.force():
        y = aft_local(q, k, v, w, window, causal=causal)
        y.sum().backward()
    assert mode.max_numel <= max(4 * B * T * D + B * T * D, T * T), mode.max_numel


# ================================================================ the fwd / bwd contract, against the oracle
CONTRACT_SHAPES = [  # (B, T, D, heads, window); heads 1 -> (T, T) bias
    (2, 13, 6, 1, 3),
    (1, 1, 1, 1, 1),
    (1, 7, 1, 1, 2),
    (2, 37, 8, 2, 5),
    (1, 131, 4, 4, 9),  # prime T > 64
    (2, 9, 4, 1, 20),  # window > T
]


def _w_heads(H):
    return 0 if H == 1 else H


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CONTRACT_SHAPES)
def test_contract_float64_vs_oracle(path, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = qkvw(B, T, D, _w_heads(H), F64)
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-10, 1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 13, 6, 1, 3), (1, 131, 4, 2, 9)])
def test_contract_float32_vs_oracle(path, causal, shape):
    B, T, D, H, window = shape
    q, k, v, w = qkvw(B, T, D, _w_heads(H), F32)
    contract.check_all(path, OP, q, k, v, w, window, causal, 1e-5, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contract_low_precision_2x_rule(path, causal, dtype):
    """error(contract, low dtype) <= 2 * error(eager PyTorch in that dtype) + 1e-3, both vs the float64 oracle."""
    B, T, D, H, window = 2, 29, 8, 2, 4
    q, k, v, w = qkvw(B, T, D, H, dtype)
    dy = rand(B, T, D, dtype=dtype)
    y, lse = path.fwd(OP, q, k, v, w, window, causal)
    assert y.dtype == dtype and lse.dtype == torch.float32
    yr, grads_r = contract.oracle_grads(OP, q, k, v, w, window, causal, dy)
    ins = [x.detach().clone().requires_grad_() for x in (q, k, v, w)]
    ye = contract.eager_lowp(OP, *ins, window, causal)
    ge = torch.autograd.grad(ye, ins, dy)
    assert maxabs(y, yr) <= 2 * maxabs(ye, yr) + 1e-3
    grads = path.bwd(OP, dy, q, k, v, w, y, lse, window, causal)
    for name, g, gr, gre in zip(("dq", "dk", "dv", "dw"), grads, grads_r, ge):
        assert g.dtype == dtype
        assert maxabs(g, gr) <= 2 * maxabs(gre, gr) + 1e-3, name


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_contract_adversarial_magnitudes(path, causal, dtype):
    """|k|, |w| up to 1e4: finite everywhere and close to the oracle."""
    B, T, D, H, window = 2, 17, 4, 2, 3
    q, k, v, w = qkvw(B, T, D, H, dtype)
    k = (torch.rand(B, T, D, dtype=F64) * 2e4 - 1e4).to(dtype)
    w = (torch.rand(*w.shape, dtype=F64) * 2e4 - 1e4).to(dtype)
    tol = 1e-9 if dtype == F64 else 2e-3
    contract.check_all(path, OP, q, k, v, w, window, causal, tol, tol, tol_lse=1e-6 if dtype == F32 else 1e-12)


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16])
def test_contract_causal_late_spike(path, dtype):
    """One late key larger than every earlier key by >> 88: a split max gives 0/0; here all finite + exact."""
    B, T, D, H, window = 2, 70, 5, 1, 6
    q, k, v, w = qkvw(B, T, D, _w_heads(H), dtype)
    k = k.clone()
    k[:, T - 3, :] = 300.0
    k[1, T - 10, 2] = -300.0
    y, lse = path.fwd(OP, q, k, v, w, window, True)
    dy = rand(B, T, D, dtype=dtype)
    grads = path.bwd(OP, dy, q, k, v, w, y, lse, window, True)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    assert all(torch.isfinite(g).all() for g in grads)
    yr, grads_r = contract.oracle_grads(OP, q, k, v, w, window, True, dy)
    tol = 1e-5 if dtype == F32 else 3e-2
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
    B, T, D, H, window = 2, 6, 4, 2, 2
    q, k, v, w = (path.leaf(x) for x in qkvw(B, T, D, H, F64))

    def f(a, b, c, d):
        with path.force():
            return aft_local(a, b, c, d, window, causal)

    assert torch.autograd.gradcheck(f, (q, k, v, w))


def test_contract_window_limits_match_full_and_simple(path):
    """window >= T is aft_full; window == 1 with a zero diagonal is aft_simple."""
    B, T, D = 2, 12, 3
    q, k, v, w = qkvw(B, T, D, 0, F64)
    for causal in (False, True):
        yl, ll = path.fwd(OP, q, k, v, w, T + 3, causal)
        yf, lf = path.fwd("aft_full", q, k, v, w, causal)
        assert maxabs(yl, yf) < 1e-14 and maxabs(ll, lf) < 1e-12
        w0 = w - torch.diag(torch.diagonal(w))
        yl1, _ = path.fwd(OP, q, k, v, w0, 1, causal)
        ys, _ = path.fwd("aft_simple", q, k, v, causal)
        assert maxabs(yl1, ys) < 1e-14


def test_autograd_through_public_function_float32(path):
    """aft_local's gradients (the compiled op's register_autograd / the python Function) match the oracle."""
    B, T, D, H, window = 2, 10, 4, 2, 3
    q, k, v, w = qkvw(B, T, D, H, F32)
    dy = rand(B, T, D, dtype=F32)
    _, g = path.grads(aft_local, (q, k, v, w), dy, window, True)
    _, gr = contract.oracle_grads(OP, q, k, v, w, window, True, dy)
    for a, b in zip(g, gr):
        assert maxabs(a, b) < 1e-5


# ================================================================ the fwd / bwd contract, against the python path
_TOL = {F64: 1e-10, F32: 2e-5}
LOCAL_CASES = [
    ((2, 13, 4), 1, 0),
    ((2, 13, 4), 3, 2),
    ((3, 37, 6), 5, 3),
    ((1, 7, 2), 100, 1),
    ((1, 1, 1), 2, 0),
    ((2, 130, 33), 16, 0),
    ((1, 200, 64), 32, 4),
]


def _grads(fn, inputs, dy):
    xs = [x.detach().double().requires_grad_(True) for x in inputs]
    return torch.autograd.grad(fn(*xs), xs, dy.double())


def _err(a, b):
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a.double() - b.double()).abs().max() / max(b.double().abs().max().item(), 1.0)).item()


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,window,heads", LOCAL_CASES)
def test_contract_vs_oracle_and_python(path, dtype, causal, shape, window, heads):
    B, T, D = shape
    q, k, v, dy = (rand(*shape, dtype=dtype) for _ in range(4))
    w = rand(T, T, dtype=dtype) if heads == 0 else rand(heads, T, T, dtype=dtype)
    tol = _TOL[dtype]
    path.poison()
    y, lse = path.fwd(OP, q, k, v, w, window, causal)
    assert _err(y, oracles.aft_local(q, k, v, w, window, causal)) < tol
    yr, lr = aft_local_ref.aft_local_fwd_ref(q, k, v, w, window, causal)
    assert _err(y, yr) < tol and _err(lse, lr) < tol
    path.poison()
    g = path.bwd(OP, dy, q, k, v, w, y, lse, window, causal)
    assert g[3].shape == w.shape and g[3].dtype == w.dtype
    ref = _grads(lambda a, b, c, ww: oracles.aft_local(a, b, c, ww, window, causal), (q, k, v, w), dy)
    gr = aft_local_ref.aft_local_bwd_ref(dy, q, k, v, w, yr, lr, window, causal)
    for name, a, b, c in zip(("dq", "dk", "dv", "dw"), g, ref, gr):
        assert _err(a, b) < tol, name
        assert _err(a, c) < tol, name + " vs python path"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [0, 3])
def test_gradcheck_float64_heads(path, causal, heads):
    q, k, v = (path.leaf(rand(2, 11, 3)) for _ in range(3))
    w = path.leaf(rand(11, 11) if heads == 0 else rand(heads, 11, 11))

    def f(a, b, c, ww):
        with path.force():
            return aft_local(a, b, c, ww, 3, causal)

    assert torch.autograd.gradcheck(f, (q, k, v, w))


def test_contract_noncontiguous_float32(path):
    q = rand(2, 5, 13, dtype=F32).transpose(1, 2)  # (2, 13, 5), non-contiguous
    k = rand(2, 5, 13, dtype=F32).transpose(1, 2)
    v = rand(13, 2, 5, dtype=F32).transpose(0, 1)
    w = rand(13, 13, dtype=F32).t()
    y, lse = path.fwd(OP, q, k, v, w, 3, False)
    assert _err(y, oracles.aft_local(q, k, v, w, 3, False)) < 2e-5
    dy = rand(2, 13, 5, dtype=F32)
    g = path.bwd(OP, dy.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, w, y, lse, 3, False)
    ref = _grads(lambda a, b, c, ww: oracles.aft_local(a, b, c, ww, 3, False), (q, k, v, w), dy)
    for a, b in zip(g, ref):
        assert _err(a, b) < 2e-5


def _check_2x(ours, python, ref, what):
    e_ours = (ours.double() - ref).abs().max().item()
    e_py = (python.double() - ref).abs().max().item()
    assert e_ours <= 2 * e_py + 1e-4, (what, e_ours, e_py)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_contract_low_precision_vs_python_path(path, dtype, causal):
    """2x rule with the python path in the same dtype as the baseline (references: float64 from the
    low-precision inputs)."""
    shape, window = (2, 97, 24), 8
    q, k, v, dy = (rand(*shape, dtype=F32).to(dtype) for _ in range(4))
    w = rand(2, 97, 97, dtype=F32).to(dtype)
    y_ref = oracles.aft_local(q, k, v, w, window, causal)
    y, lse = path.fwd(OP, q, k, v, w, window, causal)
    yp, lp = aft_local_ref.aft_local_fwd_ref(q, k, v, w, window, causal)
    _check_2x(y, yp, y_ref, "local y")
    g_ref = _grads(lambda a, b, c, ww: oracles.aft_local(a, b, c, ww, window, causal), (q, k, v, w), dy)
    for a, b, r, n in zip(
        path.bwd(OP, dy, q, k, v, w, y, lse, window, causal),
        aft_local_ref.aft_local_bwd_ref(dy, q, k, v, w, yp, lp, window, causal),
        g_ref,
        ("q", "k", "v", "w"),
    ):
        _check_2x(a, b, r, "local d" + n)


def _adversarial_k(T):
    k = rand(2, T, 4, dtype=F32)
    k[0, :, 0] = torch.linspace(-1e4, 1e4, T)
    k[0, :, 1] = -1e4
    k[1, 250, 2] = 3000.0  # late spike, >> 88 above every earlier key
    k[1, :, 3] = 1e4 * torch.sign(rand(T, dtype=F32))
    return k


@pytest.mark.parametrize("causal", [False, True])
def test_contract_adversarial_numerics(path, causal):
    T = 300
    q, v, dy = (rand(2, T, 4, dtype=F32) for _ in range(3))
    k = _adversarial_k(T)
    w = rand(T, T, dtype=F32, scale=1e4)
    # the python path's own error is ~eps * |logit| (~1e-3 at |k| + |w| ~ 2e4, see ops/aft_local/reference.py);
    # the compiled kernels' is ~1e-7
    tol = 2e-3 if path.name == "python" else 1e-4
    for window in (1, 7):
        y, lse = path.fwd(OP, q, k, v, w, window, causal)
        assert _err(y, oracles.aft_local(q, k, v, w, window, causal)) < tol
        for a in path.bwd(OP, dy, q, k, v, w, y, lse, window, causal):
            assert torch.isfinite(a).all()


@pytest.mark.paths("cuda")
@pytest.mark.parametrize("B,T,D", [(1, 16384, 4096), (64, 16384, 64), (4096, 64, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_large_shapes_forward(path, B, T, D, causal):
    """Grid limits of the CUDA kernels (forward only) against the python path on the same GPU."""
    q, k, v = (path.put(rand(B, T, D, dtype=torch.bfloat16)) for _ in range(3))
    w = path.put(rand(T, T, dtype=torch.bfloat16))
    path.poison()
    y, lse = OPS.aft_local_fwd(q, k, v, w, 32, causal)
    yr, lr = aft_local_ref.aft_local_fwd_ref(q, k, v, w, 32, causal)
    assert _err(y.float(), yr.float()) < 2e-2 and _err(lse, lr) < 1e-4


@COMPILED
@pytest.mark.parametrize("causal", [False, True])
def test_compiled_matches_python_ref(path, causal):
    """The compiled contract equals the python path's aft_local_fwd_ref / aft_local_bwd_ref."""
    B, T, D, H, window = 2, 19, 6, 2, 4
    q, k, v, w = qkvw(B, T, D, H, F32)
    dy = rand(B, T, D, dtype=F32)
    y, lse = path.fwd(OP, q, k, v, w, window, causal)
    yr, lr = aft_local_ref.aft_local_fwd_ref(q, k, v, w, window, causal)
    gr = aft_local_ref.aft_local_bwd_ref(dy, q, k, v, w, yr, lr, window, causal)
    assert y.dtype == yr.dtype and lse.dtype == lr.dtype and lse.shape == lr.shape
    assert maxabs(y, yr) < 1e-5 and maxabs(lse, lr) < 1e-4
    g = path.bwd(OP, dy, q, k, v, w, y, lse, window, causal)
    for a, b in zip(g, gr):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert maxabs(a, b) / max(1.0, b.abs().max().item()) < 1e-5


# ================================================================ registration of the compiled ops
_W = 3


@COMPILED
@pytest.mark.parametrize("which", ["fwd", "bwd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_opcheck(path, dtype, causal, which):
    B, T, D, H = 2, 7, 4, 2
    q, k, v, w = (path.leaf(x) for x in qkvw(B, T, D, H, dtype))
    if which == "fwd":
        torch.library.opcheck(OPS.aft_local_fwd.default, (q, k, v, w, _W, causal))
    else:
        y, lse = (t.detach() for t in OPS.aft_local_fwd(q, k, v, w, _W, causal))
        dy = path.put(rand(B, T, D, dtype=dtype))
        args = (dy, q.detach(), k.detach(), v.detach(), w.detach(), y, lse, _W, causal)
        torch.library.opcheck(OPS.aft_local_bwd.default, args)


@COMPILED
def test_torch_compile_fullgraph(path):
    torch._dynamo.reset()
    q, k, v, w = (path.leaf(x) for x in qkvw(2, 7, 4, 2, F32))

    def fn(q, k, v, w):
        return OPS.aft_local_fwd(q, k, v, w, _W, False)[0].sum()

    cfn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = cfn(q, k, v, w)
    g = torch.autograd.grad(out, (q,))[0]
    out_e = fn(q, k, v, w)
    g_e = torch.autograd.grad(out_e, (q,))[0]
    assert maxabs(out, out_e) < 1e-5 and maxabs(g, g_e) < 1e-5


def _bad_cases():
    q, k, v, w = qkvw(2, 7, 4, 2, F32)
    return [
        (lambda p: p.fwd(OP, q, k, v, w, 0, False), ValueError, "window must be >= 1, got 0"),
        (
            lambda p: p.bwd(OP, q[:, :3], q, k, v, w, q, q, 2, False),
            ValueError,
            "dy must have the shape of q (2, 7, 4), got (2, 3, 4)",
        ),
    ]


@COMPILED
@pytest.mark.parametrize("idx", range(2))
def test_bad_inputs_reach_compiled_checks(path, idx):
    fn, exc, msg = _bad_cases()[idx]
    with pytest.raises(exc) as info:
        fn(path)
    assert msg in str(info.value)


@COMPILED
def test_compiled_w_dtype_check(path):
    """The compiled op rejects a w of another dtype (TypeError naming w and q's dtype)."""
    q, k, v, w = qkvw(2, 7, 4, 2, F32)
    with pytest.raises(TypeError, match=r"w must have .*dtype.*torch.float32.*got torch.float64"):
        path.fwd(OP, q, k, v, w.double(), 2, False)


# ================================================================ banded tiles (CPU float32, window >= 16, T > 64)
TILED = [(2, 150, 12, 0, 16), (1, 200, 10, 2, 40), (2, 130, 8, 0, 64), (1, 97, 9, 0, 200)]


def _tile_case_inputs(shape, case):
    """float32 q, k, v, w, dy of a banded-tiles case: normal, |k| or |w| = 1e4, a causal late spike, or split_gap
    (the row maximum of w and the column maximum of k on different keys, r + m - lse ~ 60)."""
    B, T, D, heads, _ = shape
    q, k, v, w = qkvw(
        B, T, D, heads, F64, k_scale=1e4 if case == "k_1e4" else 1.0, w_scale=1e4 if case == "w_1e4" else 1.0
    )
    if case == "late_spike":
        k[:, T - 5, :] += 120
    if case == "split_gap":
        k = k - 60
        k[:, 10::64, :] += 120
        idx = torch.arange(1, T)
        w[..., idx, idx - 1] = 60.0
    q, k, v, w = (x.to(F32) for x in (q, k, v, w))
    return q, k, v, w, torch.randn(B, T, D, dtype=F32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["normal", "k_1e4", "w_1e4", "late_spike", "split_gap"])
@pytest.mark.parametrize("shape", TILED, ids=lambda c: "x".join(map(str, c)))
def test_tiled_sizes_vs_oracle(path, shape, case, causal):
    """Shapes that take the CPU banded-tile kernels (several key tiles, band edges inside tiles), incl. adversarial.
    split_gap: the row maximum of w (on key t - 1) and the column maximum of k (keys 10, 74, ...) sit on different
    keys, so r + m - lse reaches ~60 and the backward's per-element guard runs (docs/design.md §3)."""
    B, T, D, heads, window = shape
    q, k, v, w, dy = _tile_case_inputs(shape, case)
    y, grads = _run_public(path, q, k, v, w, window, dy, causal)
    assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, _tol(F32, k, w))


@pytest.mark.paths("compiled-cpu")
def test_cpu_avx512_switch_bad_value(path, monkeypatch):
    """ATTNFREE_CPU_AVX512 takes 0 or 1: another value is an error naming the variable, not a silent default."""
    q, k, v, w = (x.to(F32) for x in qkvw(2, 150, 12, 0, F64))
    monkeypatch.setenv("ATTNFREE_CPU_AVX512", "off")
    with pytest.raises(ValueError, match="ATTNFREE_CPU_AVX512 must be 0 or 1"):
        aft_local(q, k, v, w, 16)


@pytest.mark.paths("compiled-cpu")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ["normal", "w_1e4", "split_gap"])
@pytest.mark.parametrize("shape", [(2, 150, 12, 0, 16), (1, 200, 10, 2, 40), (3, 130, 40, 0, 64)], ids=str)
def test_tiled_gemm_without_avx512(path, shape, case, causal, monkeypatch):
    """ATTNFREE_CPU_AVX512=0: the banded tiles take at::mm instead of their AVX-512 tile GEMM (the path of CPUs
    without AVX-512); both agree with the oracle, and with each other to float32 rounding."""
    window = shape[-1]
    q, k, v, w, dy = _tile_case_inputs(shape, case)
    monkeypatch.setenv("ATTNFREE_CPU_AVX512", "0")
    y, grads = _run_public(path, q, k, v, w, window, dy, causal)
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    _check_all(y, grads, yo, go, v, w, dy, _tol(F32, k, w))
    monkeypatch.delenv("ATTNFREE_CPU_AVX512")
    y2, grads2 = _run_public(path, q, k, v, w, window, dy, causal)
    for a, b in zip((y, *grads), (y2, *grads2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))
    # two different GEMMs ran: not bit-identical (the adversarial cases may end on the per-element paths)
    if case == "normal" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert not all(torch.equal(a, b) for a, b in zip((y, *grads), (y2, *grads2)))


@pytest.mark.paths("compiled-cpu")
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_bit_identical_across_threads(path, causal):
    B, T, D, window = 2, 200, 20, 24
    q, k, v, w = (x.to(F32) for x in qkvw(B, T, D, 2, F64))
    dy = torch.randn(B, T, D, dtype=F32)
    n0 = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y, grads = _run_public(path, q, k, v, w, window, dy, causal)
            outs.append((y, *grads))
    finally:
        torch.set_num_threads(n0)
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_nonfinite_contract(path, causal):
    """docs/design.md §7 on the tiled shapes: NaN in v reaches exactly the rows that see it; -inf k masks a key."""
    B, T, D, window = 1, 150, 8, 20
    q, k, v, w = (x.to(F32) for x in qkvw(B, T, D, 0, F64))
    with torch.no_grad():
        yref = aft_local(q, k, v, w, window, causal)
        v2 = v.clone()
        v2[0, 100, 3] = float("nan")
        y = aft_local(q, k, v2, w, window, causal)
    bad = torch.isnan(y)
    assert bad[0, :, 3].sum() == (T - 100 if causal else T) and bad.sum() == bad[0, :, 3].sum()
    # -inf in k = the key is absent
    k2 = k.clone()
    k2[0, 70, :] = float("-inf")
    with torch.no_grad():
        y2 = aft_local(q, k2, v, w, window, causal)
    assert torch.isfinite(y2).all()
    assert yref.shape == y2.shape


# ================================================================ the banded layout of w (ops/aft_local/layout.py)
BANDED = [  # (B, T, D, heads, window); heads == 0: a 2-D w
    (2, 13, 6, 3, 3),
    (2, 9, 4, 2, 5),  # T == 2W - 1: the layout must be named
    (1, 5, 2, 0, 100),  # window > T: W = T
    (1, 150, 8, 2, 20),  # CPU float32: the banded-tile forward, several key tiles
    (2, 70, 5, 0, 1),
]


def _banded(w, window, poison=True):
    """w's banded layout; entries whose key falls outside [0, T) (never read) are NaN when ``poison``."""
    wb = layout.full_to_band(w, window)
    if poison:
        T = w.shape[-1]
        W = min(window, T)
        tp = torch.arange(T)[:, None] + torch.arange(2 * W - 1)[None, :] - (W - 1)
        wb = wb.masked_fill((tp < 0) | (tp >= T), float("nan"))
    return wb


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", BANDED, ids=lambda c: "x".join(map(str, c)))
def test_banded_equals_full_contract(path, case, causal, dtype):
    """fwd/bwd contract with banded=True equals the full layout with the same weights; dw comes back banded."""
    B, T, D, heads, window = case
    q, k, v, w = qkvw(B, T, D, heads, dtype)
    dy = torch.randn(B, T, D, dtype=dtype)
    wb = _banded(w, window)
    y, lse = path.fwd(OP, q, k, v, w, window, causal)
    yb, lseb = path.fwd(OP, q, k, v, wb, window, causal, True)
    tol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(yb, y, rtol=tol, atol=tol)
    torch.testing.assert_close(lseb, lse, rtol=tol, atol=tol)
    g = path.bwd(OP, dy, q, k, v, w, y, lse, window, causal)
    gb = path.bwd(OP, dy, q, k, v, wb, y, lse, window, causal, True)
    assert gb[3].shape == wb.shape
    for a, b in zip(gb[:3], g[:3]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(gb[3], layout.full_to_band(g[3], window), rtol=tol, atol=tol)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", BANDED, ids=lambda c: "x".join(map(str, c)))
def test_banded_public_matches_oracle(path, case, causal):
    """The public function with a banded w (layout from the shape, or named) against the float64 oracle."""
    B, T, D, heads, window = case
    q, k, v, w = qkvw(B, T, D, heads, F32)
    dy = torch.randn(B, T, D, dtype=F32)
    wb = _banded(w, window, poison=False)
    named = "band" if T == 2 * min(window, T) - 1 else None
    y, grads = _run_public(path, q, k, v, wb, window, dy, causal, w_layout=named)
    assert grads[3].shape == wb.shape
    yo, go = _oracle(q, k, v, w, window, dy, causal)
    go = (*go[:3], layout.full_to_band(go[3], window))
    _check_all(y, grads, yo, go, v, wb, dy, _tol(F32, k, w))


@pytest.mark.parametrize("causal", [False, True])
def test_banded_gradcheck_float64(path, causal):
    B, T, D, heads, window = 2, 8, 4, 2, 3
    q, k, v, w = qkvw(B, T, D, heads, F64)
    wb = layout.full_to_band(w, window)

    def f(a, b, c, d):
        with path.force():
            return aft_local(a, b, c, d, window, causal)

    inputs = tuple(path.leaf(x) for x in (q, k, v, wb))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_layout_rule_and_errors():
    """The layout comes from the shape; a shape that fits both must be named; wrong shapes name w and both forms."""
    q = torch.randn(1, 5, 4)
    wf, wb = torch.randn(5, 5), torch.randn(5, 3)
    y_full = aft_local(q, q, q, wf, 2)
    y_band = aft_local(q, q, q, layout.full_to_band(wf, 2), 2)
    torch.testing.assert_close(y_band, y_full)
    aft_local(q, q, q, wb, 2, w_layout="band")
    with pytest.raises(ValueError, match=r"fits both layouts.*w_layout='full' or w_layout='band'"):
        aft_local(q, q, q, wf, 3)  # T = 5 = 2 * 3 - 1
    torch.testing.assert_close(
        aft_local(q, q, q, wf, 3, w_layout="full"), aft_local(q, q, q, layout.full_to_band(wf, 3), 3, w_layout="band")
    )
    with pytest.raises(ValueError, match=r"w must have shape .*'full'.*'band'.*T=5, 2W-1=3"):
        aft_local(q, q, q, torch.randn(5, 4), 2)
    with pytest.raises(ValueError, match=r"w with w_layout='band' must have last dimension 3"):
        aft_local(q, q, q, wf, 2, w_layout="band")
    with pytest.raises(ValueError, match=r"w_layout must be None, 'full' or 'band'"):
        aft_local(q, q, q, wf, 2, w_layout="banded")
    with pytest.raises(ValueError, match="heads"):
        aft_local(q, q, q, torch.randn(3, 5, 3), 2)


@COMPILED
def test_banded_binding_checks(path):
    q = path.put(torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match=r"w with w_layout='band' must have shape .*T=5, 2W-1=3"):
        OPS.aft_local_fwd(q, q, q, path.put(torch.randn(5, 5)), 2, False, True)
    with pytest.raises(TypeError, match="w must have q's dtype"):
        OPS.aft_local_fwd(q, q, q, path.put(torch.randn(5, 3, dtype=F64)), 2, False, True)


_RSS_SCRIPT = r"""
import sys, torch
import attnfree_ext
from attnfree_ext.ops.aft_local import aft_local
backend, part = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)

def run(T):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, 8, generator=g, requires_grad=part == "bwd") for _ in range(3))
    w = (torch.randn(T, 31, generator=g) * 0.1).requires_grad_(part == "bwd")
    with attnfree_ext.force_backend(backend):
        y = aft_local(q, k, v, w, 16)
        if part == "bwd":
            y.sum().backward()
            assert w.grad.shape == w.shape

run(200)  # everything loaded and initialised
def peak_kib():  # this process's own high-water mark (ru_maxrss keeps the parent's across fork + exec)
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))

before = peak_kib()
run(16384)
print((peak_kib() - before) / 1024)
"""


@pytest.mark.paths("python", "compiled-cpu")
@pytest.mark.parametrize("part", ["fwd", "bwd"])
def test_banded_memory_no_t_by_t(path, part):
    """With a banded w nothing of size T x T is formed: at T = 16384 a T x T float32 tensor would be 1 GiB; the
    peak resident memory of the forward (+ backward) grows by far less (memory O(B*T*D + T*window)). Compiled CPU:
    float32 with window 16 takes the banded-tile kernels (the per-element band kernels would expand w)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, path.backend, part], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    grew_mib = float(out.stdout.strip().splitlines()[-1])
    assert grew_mib < 300, grew_mib


@pytest.mark.paths("emulation")
def test_banded_launcher_memory(path):
    """The CUDA launchers' workspace is O(B*T*D) whatever the layout, and with a banded w the binding's dw is
    banded: at T = 65536 a T x T buffer (16 GiB in float32) would dwarf both."""
    from common.paths import _emu_ops

    emu_ops = _emu_ops()
    B, T, D, W = 1, 65536, 8, 16
    lib = emu_ops.library()
    for name in ("emu_aft_local_fwd_ws", "emu_aft_local_bwd_ws"):
        for causal in (False, True):
            ws = lib.raw(name, emu_ops.DTYPE[F32], B, T, D, 1, W, causal)
            assert ws <= 16 * B * T * D * 4 + (1 << 20), (name, ws)
    q, k, v, w = qkvw(1, 40, 4, 2, F32)
    wb = layout.full_to_band(w, 4)
    y, lse = emu_ops.aft_local_fwd(q, k, v, wb, 4, False, True)
    assert emu_ops.aft_local_bwd(torch.randn_like(q), q, k, v, wb, y, lse, 4, False, True)[3].shape == wb.shape


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_backward_nan_propagates_exactly(path, causal):
    """A NaN in v sends the backward to the exact per-element kernel: the gradients it reaches are NaN, the others
    equal those of the NaN-free problem (docs/design.md §7 rule 2)."""
    B, T, D, window = 1, 150, 8, 20
    q, k, v, w = (x.to(F32) for x in qkvw(B, T, D, 0, F64))
    dy = torch.randn(B, T, D, dtype=F32)
    v2 = v.clone()
    v2[0, 100, 3] = float("nan")
    _, g = _run_public(path, q, k, v, w, window, dy, causal)
    _, g2 = _run_public(path, q, k, v2, w, window, dy, causal)
    # dv = sum_t P G does not involve v; dk = v dv - sum_t P H meets H = dy * y, NaN in channel 3 of every row that
    # sees key 100, and every key is seen by those rows (through the bias-0 term)
    torch.testing.assert_close(g2[2], g[2], rtol=1e-5, atol=1e-6)
    dk2, others = g2[1], [0, 1, 2, 4, 5, 6, 7]
    assert torch.isnan(dk2[0, :, 3]).all() and not torch.isnan(dk2[0][:, others]).any()
    torch.testing.assert_close(dk2[0][:, others], g[1][0][:, others], rtol=1e-5, atol=1e-6)


@pytest.mark.paths("python", "compiled-cpu")
def test_banded_double_backward_and_forward_mode(path):
    """The composites (double backward, forward-mode AD) take the banded layout too."""
    q, k, v, w = qkvw(1, 6, 2, 0, F64)
    inputs = tuple(path.leaf(x) for x in (q, k, v, layout.full_to_band(w, 2)))

    def f(a, b, c, d):
        with path.force():
            return aft_local(a, b, c, d, 2, causal=True)

    assert torch.autograd.gradgradcheck(f, inputs)
    tangent = torch.randn_like(inputs[3])
    _, got = torch.func.jvp(lambda d: f(*(x.detach() for x in inputs[:3]), d), (inputs[3].detach(),), (tangent,))
    _, want = torch.func.jvp(
        lambda d: oracles.aft_local(*(x.detach() for x in inputs[:3]), layout.band_to_full(d, 2), 2, True),
        (inputs[3].detach(),),
        (tangent,),
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
