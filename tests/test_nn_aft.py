"""attnfree_ext.nn AFT layers: shapes, length handling, causality, factorised bias, AFT-conv, state_dict, gradients,
and a float64 comparison with tests/common/oracles.py applied to the layers' own projections."""

import io

import pytest
import torch

from attnfree_ext.nn import AFTConv2d, AFTFull, AFTLocal, AFTSimple
from attnfree_ext.ops.aft_local import aft_local
from attnfree_ext.ops.aft_local.layout import band_to_full
from common import oracles

MAX_T = 13
DIM = 6

# (class, constructor kwargs); every token layer here maps (B, T, DIM) -> (B, T, DIM)
TOKEN_LAYERS = [
    pytest.param(AFTFull, dict(max_seqlen=MAX_T, dim=DIM), id="full"),
    pytest.param(AFTFull, dict(max_seqlen=MAX_T, dim=DIM, hidden_dim=8, heads=2), id="full-h2"),
    pytest.param(AFTFull, dict(max_seqlen=MAX_T, dim=DIM, causal=True), id="full-causal"),
    pytest.param(AFTFull, dict(max_seqlen=MAX_T, dim=DIM, bias_rank=3), id="full-rank3"),
    pytest.param(
        AFTFull,
        dict(max_seqlen=MAX_T, dim=DIM, hidden_dim=9, heads=3, causal=True, bias_rank=2),
        id="full-h3-causal-rank2",
    ),
    pytest.param(AFTLocal, dict(max_seqlen=MAX_T, dim=DIM, window=3), id="local"),
    pytest.param(AFTLocal, dict(max_seqlen=MAX_T, dim=DIM, window=1, hidden_dim=4, heads=2), id="local-w1-h2"),
    pytest.param(AFTLocal, dict(max_seqlen=MAX_T, dim=DIM, window=4, causal=True), id="local-causal"),
    pytest.param(AFTLocal, dict(max_seqlen=MAX_T, dim=DIM, window=20, bias_rank=2, heads=2), id="local-rank2"),
    pytest.param(AFTSimple, dict(dim=DIM), id="simple"),
    pytest.param(AFTSimple, dict(dim=DIM, hidden_dim=5, causal=True), id="simple-causal"),
]


def _randomise_bias(m, scale=1.0):
    """Replace the small initial biases with O(1) random values so the bias actually matters in comparisons."""
    with torch.no_grad():
        for name in ("w", "bias_u", "bias_v"):
            p = getattr(m, name, None)
            if p is not None:
                p.copy_(torch.randn_like(p) * scale)
    return m


@pytest.mark.parametrize("cls,kw", TOKEN_LAYERS)
@pytest.mark.parametrize("T", [1, 2, 7, MAX_T])
def test_token_layer_shapes(cls, kw, T):
    m = cls(**kw)
    x = torch.randn(2, T, DIM)
    y = m(x)
    assert y.shape == (2, T, DIM)
    assert y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("cls,kw", [p for p in TOKEN_LAYERS if p.values[0] is not AFTSimple])
def test_too_long_raises(cls, kw):
    m = cls(**kw)
    with pytest.raises(ValueError, match="max_seqlen"):
        m(torch.randn(1, MAX_T + 1, DIM))


def test_simple_has_no_length_limit():
    assert AFTSimple(DIM)(torch.randn(1, 100, DIM)).shape == (1, 100, DIM)


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match="dim"):
        AFTFull(MAX_T, DIM)(torch.randn(1, 4, DIM + 1))
    with pytest.raises(ValueError):
        AFTSimple(DIM)(torch.randn(4, DIM))


@pytest.mark.parametrize("window", [0, -2])
def test_window_lt_1_raises(window):
    with pytest.raises(ValueError, match="window"):
        AFTLocal(MAX_T, DIM, window)


@pytest.mark.parametrize(
    "ctor",
    [
        lambda: AFTFull(MAX_T, DIM, hidden_dim=7, heads=2),
        lambda: AFTLocal(MAX_T, DIM, 2, heads=4),  # hidden_dim defaults to DIM=6
        lambda: AFTFull(0, DIM),
        lambda: AFTFull(MAX_T, DIM, bias_rank=0),
        lambda: AFTConv2d(6, 4, 3),
    ],
)
def test_bad_constructor_raises(ctor):
    with pytest.raises(ValueError):
        ctor()


def test_bias_init_is_small_and_defined():
    for m in (AFTFull(MAX_T, DIM), AFTLocal(MAX_T, DIM, 2, hidden_dim=4, heads=2), AFTFull(MAX_T, DIM, bias_rank=4)):
        w = m.position_bias()
        assert torch.isfinite(w).all()
        assert w.abs().max() < 0.1
        assert w.std() > 0  # random, not a constant fill


def test_parameter_shapes():
    m = AFTFull(MAX_T, DIM, hidden_dim=8, heads=2)
    assert m.w.shape == (2, MAX_T, MAX_T)
    assert AFTFull(MAX_T, DIM).w.shape == (MAX_T, MAX_T)
    m = AFTLocal(MAX_T, DIM, 3, heads=3, bias_rank=5)
    assert m.bias_u.shape == m.bias_v.shape == (3, MAX_T, 5)
    assert "w" not in dict(m.named_parameters())
    m = AFTFull(MAX_T, DIM, bias_rank=5)
    assert m.bias_u.shape == (MAX_T, 5)
    for m in (AFTFull(MAX_T, DIM, hidden_dim=8), AFTSimple(DIM, hidden_dim=8)):
        assert m.to_q.weight.shape == m.to_k.weight.shape == m.to_v.weight.shape == (8, DIM)
        assert m.project.weight.shape == (DIM, 8)


@pytest.mark.parametrize("cls,kw", [p for p in TOKEN_LAYERS if p.values[1].get("causal")])
@pytest.mark.parametrize("t", [0, 4, MAX_T - 2])
def test_causal_ignores_future(cls, kw, t):
    m = _randomise_bias(cls(**kw))
    x = torch.randn(2, MAX_T, DIM)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
    y, y2 = m(x), m(x2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@pytest.mark.parametrize("cls,kw", [p for p in TOKEN_LAYERS if not p.values[1].get("causal")][:3])
def test_non_causal_sees_future(cls, kw):
    m = _randomise_bias(cls(**kw))
    x = torch.randn(1, MAX_T, DIM)
    x2 = x.clone()
    x2[:, -1] += 3.0
    assert not torch.allclose(m(x)[:, 0], m(x2)[:, 0])


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("T", [1, 5, MAX_T])
def test_bias_rank_equals_dense(heads, causal, local, T):
    """A factorised layer equals the dense layer with w = U V^T copied in (same projections)."""
    extra = dict(window=3) if local else {}
    cls = AFTLocal if local else AFTFull
    lr = _randomise_bias(cls(MAX_T, DIM, hidden_dim=8, heads=heads, causal=causal, bias_rank=3, **extra), 0.7)
    dense = cls(MAX_T, DIM, hidden_dim=8, heads=heads, causal=causal, **extra)
    state = {k: v for k, v in lr.state_dict().items() if not k.startswith("bias_")}
    with torch.no_grad():
        state["w"] = lr.bias_u @ lr.bias_v.transpose(-1, -2)
    dense.load_state_dict(state, strict=True)
    x = torch.randn(2, T, DIM)
    torch.testing.assert_close(lr(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lr.position_bias(T), state["w"][..., :T, :T])


# ---------------------------------------------------------------------------------------------- float64 vs oracle


@pytest.mark.parametrize("cls,kw", TOKEN_LAYERS)
@pytest.mark.parametrize("T", [1, 7, MAX_T])
def test_float64_matches_oracle(cls, kw, T):
    m = _randomise_bias(cls(**kw)).double()
    x = torch.randn(2, T, DIM, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = m.to_q(x), m.to_k(x), m.to_v(x)
        causal = kw.get("causal", False)
        if cls is AFTSimple:
            z = oracles.aft_simple(q, k, v, causal)
        elif cls is AFTLocal:
            w = m.position_bias(T)
            w = w if m.bias_rank else band_to_full(w, kw["window"])  # the dense layer's bias is banded
            z = oracles.aft_local(q, k, v, w, kw["window"], causal)
        else:
            z = oracles.aft(q, k, v, m.position_bias(T), causal)
        expected = m.project(z)
        y = m(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls,kw", [TOKEN_LAYERS[1], TOKEN_LAYERS[3], TOKEN_LAYERS[7], TOKEN_LAYERS[10]])
def test_low_precision_module(cls, kw, dtype):
    """A module converted to bf16/fp16 runs, keeps the dtype and stays near its float32 self."""
    m = _randomise_bias(cls(**kw))
    x = torch.randn(2, 9, DIM)
    ref = m(x)
    y = m.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("cls,kw", [TOKEN_LAYERS[0], TOKEN_LAYERS[3], TOKEN_LAYERS[5], TOKEN_LAYERS[9]])
def test_autocast_bfloat16(cls, kw):
    """Under CPU autocast Q/K/V are bf16 while the bias parameter is float32: the layer casts the bias."""
    m = _randomise_bias(cls(**kw))
    x = torch.randn(2, 9, DIM)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_large_inputs_stay_finite():
    """Bias and keys far past exp's float32 range: finite, and equal to the float64 oracle."""
    m = _randomise_bias(AFTFull(MAX_T, DIM, causal=False), 1e3)
    x = torch.randn(2, MAX_T, DIM) * 50
    y = m(x)
    assert torch.isfinite(y).all()
    with torch.no_grad():
        md = m.double()
        xd = x.double()
        expected = md.project(oracles.aft(md.to_q(xd), md.to_k(xd), md.to_v(xd), md.w, False))
    torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- state_dict, grads


def _conv_with_active_kernel(dim=4, heads=2, s=3):
    m = AFTConv2d(dim, heads, s)
    with torch.no_grad():
        m.gamma.copy_(torch.rand(heads) + 0.5)
        m.beta.copy_(torch.randn(heads) * 0.3)
    return m


ALL_LAYERS = TOKEN_LAYERS + [pytest.param(AFTConv2d, dict(dim=4, heads=2, kernel_size=3), id="conv")]


def _input_for(m):
    if isinstance(m, AFTConv2d):
        return torch.randn(2, m.dim, 5, 4)
    return torch.randn(2, 9, DIM)


@pytest.mark.parametrize("cls,kw", ALL_LAYERS)
def test_state_dict_round_trip(cls, kw):
    m = _randomise_bias(cls(**kw))
    if cls is AFTConv2d:
        m = _conv_with_active_kernel()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    m2 = cls(**kw)
    m2.load_state_dict(torch.load(buf), strict=True)
    x = _input_for(m)
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("cls,kw", ALL_LAYERS)
def test_gradients_reach_every_parameter(cls, kw):
    m = _randomise_bias(cls(**kw))
    if cls is AFTConv2d:
        m = _conv_with_active_kernel()
    x = _input_for(m).requires_grad_()
    (m(x) * torch.randn_like(x)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_local_bias_gradient_only_in_band():
    """The banded w (max_seqlen, 2W - 1): gradient at every band entry, 0 at entries whose key is outside [0, T)."""
    m = _randomise_bias(AFTLocal(MAX_T, DIM, window=2))
    assert m.w.shape == (MAX_T, 3)
    m(torch.randn(2, MAX_T, DIM)).sum().backward()
    key = torch.arange(MAX_T)[:, None] + torch.arange(3)[None, :] - 1
    used = (key >= 0) & (key < MAX_T)
    assert (m.w.grad[~used] == 0).all()
    assert (m.w.grad[used] != 0).all()


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("window", [1, 3, 100])
def test_local_bias_parameter_count(heads, window):
    """The dense AFTLocal stores only the band: heads * max_seqlen * (2 min(window, max_seqlen) - 1) numbers."""
    m = AFTLocal(MAX_T, DIM, window, hidden_dim=4, heads=heads)
    W = min(window, MAX_T)
    lead = (heads,) if heads > 1 else ()
    assert m.w.shape == (*lead, MAX_T, 2 * W - 1)
    assert m.w.numel() == heads * MAX_T * (2 * W - 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,window", [(1, 3), (2, 7), (1, 100)])
def test_local_loads_full_layout_state_dict(heads, window, causal):
    """A state_dict with the full (heads?, max_seqlen, max_seqlen) w of earlier versions loads (strict) and gives
    the layer of that full bias; the saved state_dict is then banded."""
    torch.manual_seed(0)
    m = AFTLocal(MAX_T, DIM, window, hidden_dim=4, heads=heads, causal=causal)
    state = m.state_dict()
    lead = (heads,) if heads > 1 else ()
    w_full = torch.randn(*lead, MAX_T, MAX_T)
    state["w"] = w_full
    state._metadata[""]["version"] = 1  # as saved before the banded layout
    fresh = AFTLocal(MAX_T, DIM, window, hidden_dim=4, heads=heads, causal=causal)
    fresh.load_state_dict(state, strict=True)
    assert fresh.state_dict()["w"].shape == m.w.shape
    for T in (1, 5, MAX_T):
        x = torch.randn(2, T, DIM)
        with torch.no_grad():
            q, k, v = fresh.to_q(x), fresh.to_k(x), fresh.to_v(x)
            want = fresh.project(aft_local(q, k, v, w_full[..., :T, :T], window, causal, w_layout="full"))
            torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-6)
    # an unambiguously full w loads without the version too; the banded state_dict round-trips
    state2 = dict(m.state_dict())
    state2["w"] = w_full
    other = AFTLocal(MAX_T, DIM, window, hidden_dim=4, heads=heads, causal=causal)
    if MAX_T != 2 * min(window, MAX_T) - 1:
        other.load_state_dict(state2, strict=True)
        torch.testing.assert_close(other.w, fresh.w)
    other.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(other.w, m.w)


def test_shorter_input_leaves_rest_of_bias_without_gradient():
    m = AFTFull(MAX_T, DIM)
    m(torch.randn(1, 5, DIM)).sum().backward()
    assert (m.w.grad[5:] == 0).all() and (m.w.grad[:, 5:] == 0).all()
    assert (m.w.grad[:5, :5] != 0).any()


# ---------------------------------------------------------------------------------------------- AFT-conv


@pytest.mark.parametrize("dim,heads,s,H,W", [(4, 2, 3, 5, 4), (3, 1, 1, 3, 3), (6, 3, 5, 4, 7), (2, 2, 7, 2, 3)])
def test_conv_shapes(dim, heads, s, H, W):
    m = AFTConv2d(dim, heads, s)
    x = torch.randn(2, dim, H, W)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert m.weight.shape == (heads, s, s)
    assert m.gamma.shape == m.beta.shape == (heads,)


@pytest.mark.parametrize("s", [0, 2, 4])
def test_conv_even_kernel_raises(s):
    with pytest.raises(ValueError, match="kernel_size"):
        AFTConv2d(4, 2, s)


def test_conv_bad_input_raises():
    with pytest.raises(ValueError):
        AFTConv2d(4, 2, 3)(torch.randn(2, 3, 4, 4))


def test_conv_reparameterisation():
    m = _conv_with_active_kernel(dim=4, heads=2, s=5)
    w = m.kernel()
    assert w.shape == (2, 5, 5)
    torch.testing.assert_close(w.mean(dim=(1, 2)), m.beta.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.std(dim=(1, 2), unbiased=False), m.gamma.detach().abs(), rtol=1e-4, atol=1e-4)
    # gamma = beta = 0 at init: the kernel is 0 and the layer starts as AFT-simple over the image
    fresh = AFTConv2d(4, 2, 5)
    assert (fresh.kernel() == 0).all()
    assert torch.isfinite(AFTConv2d(4, 2, 1).kernel()).all()  # 1x1 kernel: zero variance, eps keeps it finite


@pytest.mark.parametrize("dim,heads,s,H,W", [(4, 2, 3, 5, 4), (6, 3, 5, 3, 6), (2, 1, 3, 1, 1)])
def test_conv_float64_matches_oracle(dim, heads, s, H, W):
    m = _conv_with_active_kernel(dim, heads, s).double()
    x = torch.randn(2, dim, H, W, dtype=torch.float64)
    with torch.no_grad():
        expected = m.project(oracles.aft_conv2d(m.to_q(x), m.to_k(x), m.to_v(x), m.kernel()))
        y = m(x)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)


def test_conv_float32_matches_oracle():
    m = _conv_with_active_kernel(4, 2, 3)
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        y = m(x)
        md = m.double()
        xd = x.double()
        expected = md.project(oracles.aft_conv2d(md.to_q(xd), md.to_k(xd), md.to_v(xd), md.kernel()))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
