"""Recurrent state and decoding chunks (docs/design.md §9.1-§9.2): aft_simple's initial_state /
output_final_state, the chunk forms of aft_full / aft_local, and forward(x, state, return_state) of the causal
AFT layers, against the float64 oracles and the full-sequence forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnfree_ext
from attnfree_ext import aft_full, aft_local, aft_simple
from attnfree_ext.nn import AFTFull, AFTLocal, AFTSimple
from attnfree_ext.nn.state import AFTFullState, AFTLocalState
from attnfree_ext.ops.aft_local.layout import full_to_band
from attnfree_ext.ops.common.features import backend_info
from attnfree_ext.ops.common.state import empty_state, merge_keys
from common import oracles
from common.inputs import qkv
from common.metrics import err, maxabs, rel_err

NEG_INF = float("-inf")
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _splits(T, cuts):
    """Chunk boundaries [(a, b), ...] covering 0..T from sorted, distinct cut points in 1..T-1."""
    pts = [0] + sorted(set(c for c in cuts if 0 < c < T)) + [T]
    return list(zip(pts, pts[1:]))


def _chunked_simple(q, k, v, bounds, state=None):
    ys = []
    for a, b in bounds:
        y, state = aft_simple(q[:, a:b], k[:, a:b], v[:, a:b], True, initial_state=state, output_final_state=True)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _true_state(k, v):
    """(m, num, den) of all keys, in float64, from the definition."""
    k, v = k.double(), v.double()
    m = k.amax(dim=1)
    e = torch.exp(k - m[:, None])
    return torch.stack([m, (e * v).sum(1), e.sum(1)], dim=1)


# ------------------------------------------------------------------------------------------- aft_simple state
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bounds", [[(0, 13)], [(0, 1), (1, 13)], [(0, 5), (5, 6), (6, 13)]])
def test_aft_simple_chunks_equal_full(dtype, bounds):
    q, k, v = qkv(2, 13, 7, dtype)
    ref = oracles.aft_simple(q, k, v, True)
    y, s = _chunked_simple(q, k, v, bounds)
    assert y.dtype == dtype and s.dtype == dtype and s.shape == (2, 3, 7)
    assert rel_err(y, ref) <= TOL[dtype]
    # the final state is the softmax summary of every key (m is a free shift: compare num e^m, den e^m)
    t = _true_state(k, v)
    for row in (1, 2):
        assert rel_err(s[:, row].double() * torch.exp(s[:, 0].double() - t[:, 0]), t[:, row]) <= TOL[dtype]


def test_aft_simple_state_token_by_token_and_spike():
    q, k, v = qkv(1, 20, 3)
    k[0, 17] = 3000.0  # a late spike: the running max jumps; the rescale must not overflow
    y, _ = _chunked_simple(q, k, v, [(t, t + 1) for t in range(20)])
    assert rel_err(y, oracles.aft_simple(q, k, v, True)) <= 1e-12


def test_aft_simple_state_bf16_2x_rule():
    q, k, v = qkv(2, 33, 16, torch.bfloat16)
    ref = oracles.aft_simple(q, k, v, True)
    y, s = _chunked_simple(q, k, v, [(0, 10), (10, 11), (11, 33)])
    assert s.dtype == torch.float32 and y.dtype == torch.bfloat16
    # plain PyTorch in bf16 (the eager formula) as the baseline of the 2x rule (docs/design.md §6.4)
    eager = oracles.aft_eager(q, k, v, None, True)
    assert maxabs(y, ref) <= 2 * maxabs(eager, ref) + 1e-3


def test_aft_simple_state_masked_keys():
    """-inf keys are masks (docs/design.md §7): a chunk of masked keys leaves the state empty and rows that see no
    key give 0."""
    q, k, v = qkv(2, 9, 3)
    k[:, :3] = NEG_INF  # the whole first chunk masked
    k[1, 5, 0] = NEG_INF
    ref = oracles.aft_masked(q, k, v, None, True)
    for bounds in ([(0, 3), (3, 9)], [(t, t + 1) for t in range(9)]):
        y, s = _chunked_simple(q, k, v, bounds)
        assert torch.isfinite(y).all() and maxabs(y[:, :3], torch.zeros_like(y[:, :3])) == 0.0
        assert maxabs(y, ref) <= 1e-12
    _, s3 = aft_simple(q[:, :3], k[:, :3], v[:, :3], True, output_final_state=True)
    assert torch.equal(s3, empty_state(2, 3, torch.float64, "cpu"))


def test_aft_simple_empty_state_equals_none():
    q, k, v = qkv(2, 6, 5, torch.float32)
    y0 = aft_simple(q, k, v, True)
    y1, s1 = aft_simple(q, k, v, True, initial_state=empty_state(2, 5, torch.float32, "cpu"), output_final_state=True)
    assert torch.equal(y0, y1) or maxabs(y0, y1) <= 1e-6
    _, s0 = aft_simple(q, k, v, True, output_final_state=True)
    assert maxabs(s0, s1) == 0.0
    assert torch.isfinite(empty_state(1, 2, torch.bfloat16, "cpu")[:, 1:]).all()


def test_aft_simple_state_gradcheck_all_rows():
    q, k, v = (x.requires_grad_() for x in qkv(2, 4, 3))
    s = torch.stack([torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3) + 0.2], dim=1).double().requires_grad_()

    def f(q, k, v, s):
        return aft_simple(q, k, v, True, initial_state=s, output_final_state=True)

    assert torch.autograd.gradcheck(f, (q, k, v, s))
    # m has a real gradient: (m, num, den) stands for (num e^m, den e^m)
    y, _ = f(q, k, v, s)
    (gs,) = torch.autograd.grad(y.sum(), s)
    assert gs[:, 0].abs().max() > 1e-3


def test_aft_simple_truncated_bptt_gradients_equal_full():
    q, k, v = (x.requires_grad_() for x in qkv(2, 12, 4))
    g = torch.randn(2, 12, 4, dtype=torch.float64)
    full = torch.autograd.grad(oracles.aft_simple(q, k, v, True), (q, k, v), g)
    y, _ = _chunked_simple(q, k, v, [(0, 3), (3, 4), (4, 12)])
    chunked = torch.autograd.grad(y, (q, k, v), g)
    for a, b in zip(chunked, full):
        assert rel_err(a, b) <= 1e-12


def test_aft_simple_state_under_torch_compile():
    q, k, v = qkv(2, 7, 4, torch.float32)
    f = torch.compile(lambda q, k, v, s: aft_simple(q, k, v, True, initial_state=s, output_final_state=True))
    _, s = f(q, k, v, None)
    y, s2 = f(q, k, v, s)
    ey, es = aft_simple(q, k, v, True, initial_state=s, output_final_state=True)
    assert maxabs(y, ey) <= 1e-6 and maxabs(s2, es) <= 1e-6


def test_aft_simple_state_bad_arguments():
    q, k, v = qkv(2, 5, 3, torch.float32)
    s = empty_state(2, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="initial_state"):
        aft_simple(q, k, v, False, initial_state=s)
    with pytest.raises(ValueError, match="output_final_state"):
        aft_simple(q, k, v, False, output_final_state=True)
    with pytest.raises(TypeError, match="output_final_state"):
        aft_simple(q, k, v, True, output_final_state=1)
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, 3, D\)"):
        aft_simple(q, k, v, True, initial_state=torch.zeros(2, 2, 3))
    with pytest.raises(TypeError, match="initial_state must be torch.float32"):
        aft_simple(q, k, v, True, initial_state=s.double())
    with pytest.raises(TypeError, match="initial_state must be a torch.Tensor"):
        aft_simple(q, k, v, True, initial_state=[0.0])


def test_state_runs_on_the_compiled_kernels_and_says_so():
    """The state is one more chunk of the kernels' scan: backend_info selects the compiled path for it when _C is
    there, and forcing "compiled" runs it (equal to the Python path)."""
    q, k, v = qkv(1, 4, 2, torch.float32)
    s = empty_state(1, 2, torch.float32, "cpu")
    info = backend_info("aft_simple", q, k, v, initial_state=s)
    assert info == attnfree_ext.backend_info("aft_simple", q, k, v)
    assert backend_info("aft_simple", q, k, v) == attnfree_ext.backend_info("aft_simple", q, k, v)
    if info["selected"] != "compiled":
        assert info["reasons"]["compiled"], info
        return
    with attnfree_ext.force_backend("compiled"):
        y, st = aft_simple(q, k, v, True, output_final_state=True)
    with attnfree_ext.force_backend("python"):
        yp, stp = aft_simple(q, k, v, True, output_final_state=True)
    torch.testing.assert_close(y, yp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st, stp, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ chunk forms of aft_full / aft_local
@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("L", [1, 4, 9])
def test_aft_full_chunk_rows_equal_oracle(heads, L):
    T = 9
    q, k, v = qkv(2, T, 6)
    w = torch.randn(*(() if heads is None else (heads,)), T, T, dtype=torch.float64)
    ref = oracles.aft(q, k, v, w, True)
    y = aft_full(q[:, T - L :], k, v, w[..., T - L :, :], True)
    assert y.shape == (2, L, 6) and rel_err(y, ref[:, T - L :]) <= 1e-12


def test_aft_local_chunk_with_prefix_state_equals_oracle():
    T, W = 14, 4
    q, k, v = qkv(2, T, 6)
    w = torch.randn(3, T, T, dtype=torch.float64)
    ref = oracles.aft_local(q, k, v, w, W, True)
    for t0, L in [(0, 3), (2, 1), (5, 4), (10, 4), (13, 1)]:
        c = min(t0, W - 1)
        ks = t0 - c
        prefix = merge_keys(None, k[:, :ks], v[:, :ks])
        ks_, ke = ks, t0 + L
        y = aft_local(q[:, t0:ke], k[:, ks_:ke], v[:, ks_:ke], w[:, t0:ke, ks_:ke], W, True, initial_state=prefix)
        assert rel_err(y, ref[:, t0:ke]) <= 1e-12, (t0, L)


def test_chunk_forms_gradcheck():
    q, k, v = (x.requires_grad_() for x in qkv(1, 5, 2))
    w = torch.randn(2, 2, 5, dtype=torch.float64, requires_grad=True)
    s = torch.stack([torch.randn(1, 2), torch.randn(1, 2), torch.rand(1, 2) + 0.2], 1).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, w: aft_full(q[:, 3:], k, v, w, True), (q, k, v, w))
    assert torch.autograd.gradcheck(
        lambda q, k, v, w, s: aft_local(q[:, 3:], k, v, w, 2, True, initial_state=s), (q, k, v, w, s)
    )


def test_chunk_forms_bad_arguments():
    q, k, v = qkv(1, 6, 4, torch.float32)
    w = torch.randn(2, 6)
    with pytest.raises(ValueError, match="causal=True"):
        aft_full(q[:, 4:], k, v, w, False)
    with pytest.raises(ValueError, match=r"w must have shape \(L, S\)"):
        aft_full(q[:, 4:], k, v, torch.randn(3, 6), True)
    with pytest.raises(ValueError, match="k and v must be"):
        aft_full(q[:, 4:], k[:, :, :3], v[:, :, :3], w, True)
    with pytest.raises(ValueError, match="initial_state needs causal=True"):
        aft_local(q, k, v, torch.randn(6, 6), 2, False, initial_state=empty_state(1, 4, torch.float32, "cpu"))
    with pytest.raises(ValueError, match="initial_state must have shape"):
        aft_local(q, k, v, torch.randn(6, 6), 2, True, initial_state=torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="window must be >= 1"):
        aft_local(q[:, 4:], k, v, w, 0, True)


# ------------------------------------------------------------------------------------------------- the layers
def _layers(dtype):
    """Every causal layer kind, with parameters drawn so the bias matters."""
    out = [
        AFTSimple(8, 12, causal=True),
        AFTLocal(24, 8, 4, hidden_dim=12, heads=3, causal=True),
        AFTLocal(24, 8, 1, causal=True),
        AFTLocal(24, 8, 3, causal=True, bias_rank=2),
        AFTFull(24, 8, hidden_dim=12, heads=2, causal=True),
        AFTFull(24, 8, causal=True, bias_rank=3),
    ]
    for m in out:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.5)
        m.to(dtype)
    return out


def _chunked(m, x, bounds):
    state, ys = None, []
    for a, b in bounds:
        y, state = m(x[:, a:b], state, True)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.integers(1, 17), cuts=st.lists(st.integers(1, 16), max_size=5))
def test_layers_chunks_equal_full(dtype, T, cuts):
    torch.manual_seed(T)
    x = torch.randn(2, T, 8, dtype=torch.float64).to(dtype)
    for m in _layers(dtype):
        y, _ = _chunked(m, x, _splits(T, cuts))
        assert rel_err(y, m(x)) <= TOL[dtype], type(m).__name__


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layers_token_by_token_equal_full(dtype):
    x = torch.randn(3, 11, 8, dtype=torch.float64).to(dtype)
    for m in _layers(dtype):
        y, state = _chunked(m, x, [(t, t + 1) for t in range(11)])
        assert rel_err(y, m(x)) <= TOL[dtype], type(m).__name__
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert all(t.dtype == want for t in (state if isinstance(state, tuple) else (state,)) if torch.is_tensor(t))


def test_layer_state_sizes():
    x = torch.randn(2, 10, 8)
    s = _layers(torch.float32)
    _, st_simple = s[0](x, None, True)
    assert st_simple.shape == (2, 3, 12)
    _, st_local = s[1](x, None, True)
    assert isinstance(st_local, AFTLocalState) and st_local.offset == 10
    assert st_local.prefix.shape == (2, 3, 12) and st_local.k.shape == (2, 3, 12) and st_local.v.shape == (2, 3, 12)
    _, st_full = s[4](x, None, True)
    assert isinstance(st_full, AFTFullState) and st_full.k.shape == (2, 10, 12)


def test_layers_bf16_2x_rule():
    x64 = torch.randn(2, 15, 8, dtype=torch.float64)
    for m in _layers(torch.float64):
        ref = m(x64)
        mb = m.to(torch.bfloat16)
        xb = x64.to(torch.bfloat16)
        y, state = _chunked(mb, xb, [(0, 6), (6, 7), (7, 15)])
        tensors = state if isinstance(state, tuple) else (state,)
        assert all(t.dtype == torch.float32 for t in tensors if torch.is_tensor(t)), type(m).__name__
        # against the full-sequence bf16 forward, which meets the 2x rule in the op tests
        assert maxabs(y, ref) <= 2 * maxabs(mb(xb), ref) + 2e-2, type(m).__name__
        m.to(torch.float64)


def test_layers_gradients_through_state_equal_full():
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 9, 8, dtype=torch.float64)
    for m in _layers(torch.float64):
        params = [x] + list(m.parameters())
        full = torch.autograd.grad(m(x), params, g)
        y, _ = _chunked(m, x, [(0, 2), (2, 3), (3, 9)])
        chunked = torch.autograd.grad(y, params, g)
        for a, b in zip(chunked, full):
            assert err(a, b) <= 1e-11, type(m).__name__  # scaled: some gradients are 0 in truth (to_k.bias)


def test_layer_decoding_step_under_torch_compile():
    m = AFTLocal(16, 8, 3, causal=True)
    x = torch.randn(2, 7, 8)
    step = torch.compile(m, backend="aot_eager")
    y, _ = _chunked(step, x, [(0, 3)] + [(t, t + 1) for t in range(3, 7)])
    assert maxabs(y, m(x)) <= 1e-5


def test_layer_state_bad_arguments():
    x = torch.randn(2, 5, 8)
    for m in (AFTSimple(8), AFTLocal(8, 8, 2), AFTFull(8, 8)):  # non-causal
        with pytest.raises(ValueError, match="causal"):
            m(x, None, True)
    s, loc, full = AFTSimple(8, causal=True), AFTLocal(8, 8, 2, causal=True), AFTFull(8, 8, causal=True)
    _, sl = loc(x, None, True)
    _, sf = full(x, None, True)
    with pytest.raises(TypeError, match="return_state"):
        s(x, None, 1)
    with pytest.raises(ValueError, match="state must have shape"):
        s(x, torch.zeros(2, 3, 7), True)
    with pytest.raises(TypeError, match="AFTLocalState"):
        loc(x, sf, True)
    with pytest.raises(TypeError, match="AFTFullState"):
        full(x, sl, True)
    with pytest.raises(ValueError, match="max_seqlen=8"):
        loc(x, sl, True)  # positions 5..9
    with pytest.raises(ValueError, match="max_seqlen=8"):
        full(x, sf, True)
    with pytest.raises(ValueError, match="state.k"):
        loc(x[:, :2], sl._replace(k=sl.k[:, :0]), True)
    with pytest.raises(ValueError, match="state.offset"):
        loc(x[:, :2], sl._replace(offset=-1), True)
    with pytest.raises(ValueError, match="state.v"):
        full(x[:, :2], sf._replace(v=sf.v[:1]), True)


# ------------------------------------------------------------------------------ per-sequence states with cu_seqlens
@pytest.mark.parametrize("heads", [None, 2])
@pytest.mark.parametrize("banded", [False, True])
def test_aft_local_varlen_states_continue_each_sequence(heads, banded):
    """aft_local with cu_seqlens, initial_state (one AFTLocalState per sequence, the causal AFTLocal layer's) and
    output_final_state: two packed calls (a prompt, then a continuation of unequal lengths, some 0 or 1) equal each
    whole sequence alone (float64 oracle), forward and backward through the states."""
    window, D = 3, 4
    first, second = [5, 1, 0, 7], [3, 1, 4, 0]
    whole = [a + b for a, b in zip(first, second)]
    L = max(whole) + 1
    w = torch.randn(*(() if heads is None else (heads,)), L, L, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(1, sum(whole), D, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def cu(lengths):
        return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)

    def split(x):  # the packed whole sequences -> (prompts packed, continuations packed)
        parts1, parts2, a = [], [], 0
        for n1, n in zip(first, whole):
            parts1.append(x[:, a : a + n1])
            parts2.append(x[:, a + n1 : a + n])
            a += n
        return torch.cat(parts1, 1), torch.cat(parts2, 1)

    wl = full_to_band(w, window) if banded else w
    kw = {"w_layout": "band"} if banded else {}
    (q1, q2), (k1, k2), (v1, v2) = (split(x) for x in xs)
    y1, states = aft_local(q1, k1, v1, wl, window, True, output_final_state=True, cu_seqlens=cu(first), **kw)
    assert len(states) == 4 and all(isinstance(s, AFTLocalState) for s in states)
    assert [s.offset for s in states] == first and states[0].prefix.shape == (1, 3, D)
    y2, final = aft_local(
        q2, k2, v2, wl, window, True, initial_state=states, output_final_state=True, cu_seqlens=cu(second), **kw
    )
    assert [s.offset for s in final] == whole
    ref, a = [], 0
    for n in whole:
        ref.append(oracles.aft_local(*(x[:, a : a + n] for x in xs), w[..., :n, :n], window, True))
        a += n
    r1, r2 = split(torch.cat(ref, 1))
    assert err(y1, r1) <= 1e-12 and err(y2, r2) <= 1e-12
    dy1, dy2 = torch.randn_like(y1), torch.randn_like(y2)
    g = torch.autograd.grad((y1 * dy1).sum() + (y2 * dy2).sum(), [*xs, w])
    gr = torch.autograd.grad((r1 * dy1).sum() + (r2 * dy2).sum(), [*xs, w])
    for a_, b_ in zip(g, gr):
        assert err(a_, b_) <= 1e-11


def test_aft_local_varlen_states_bad_arguments():
    q, k, v = qkv(1, 5, 2, torch.float64)
    w = torch.randn(5, 5, dtype=torch.float64)
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match="a list of N = 2 AFTLocalState"):
        aft_local(q, k, v, w, 2, True, initial_state=empty_state(2, 2, torch.float64, "cpu"), cu_seqlens=cu)
    with pytest.raises(ValueError, match="need causal=True"):
        aft_local(q, k, v, w, 2, False, output_final_state=True, cu_seqlens=cu)
    with pytest.raises(ValueError, match="output_final_state needs cu_seqlens"):
        aft_local(q, k, v, w, 2, True, output_final_state=True)
    with pytest.raises(TypeError, match="state must be an AFTLocalState"):
        aft_local(q, k, v, w, 2, True, initial_state=[None, torch.zeros(1, 3, 2)], cu_seqlens=cu)
    _, states = aft_local(q, k, v, w, 2, True, output_final_state=True, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"covering every sequence's last position \(offset \+ length: L >= 6\)"):
        aft_local(q, k, v, w, 2, True, initial_state=states, cu_seqlens=cu)
