"""attnfree_ext.nn: ExternalAttention, MultiHeadExternalAttention, TalkingHeadAttention."""

import io

import pytest
import torch
from torch import nn

from attnfree_ext.nn import ExternalAttention, MultiHeadExternalAttention, TalkingHeadAttention
from benchmarks.peers import eanet_multihead_forward as _eanet_forward
from benchmarks.peers import timm_talking_heads_forward as _cait_forward
from common import oracles


def _roundtrip(m, make):
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = make()
    m2.load_state_dict(torch.load(buf), strict=True)
    return m2


MAKERS = {
    "ea": lambda: ExternalAttention(12, S=5),
    "mhea": lambda: MultiHeadExternalAttention(12, num_heads=3, coef=4),
    "mhea_coef2": lambda: MultiHeadExternalAttention(8, num_heads=2, coef=2),
    "th": lambda: TalkingHeadAttention(12, num_heads=3, qkv_bias=True),
}


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("N", [1, 7, 13])
def test_shapes_variable_n_and_roundtrip(name, N):
    m = MAKERS[name]().double()
    dim = m.dim
    x = torch.randn(2, N, dim, dtype=torch.float64)
    y = m(x)
    assert y.shape == (2, N, dim) and torch.isfinite(y).all()
    m2 = _roundtrip(m, MAKERS[name]).double()
    torch.testing.assert_close(m2(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_backward_reaches_every_parameter(name):
    m = MAKERS[name]()
    x = torch.randn(2, 9, m.dim, requires_grad=True)
    m(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_external_attention_formula():
    m = ExternalAttention(10, S=6).double()
    x = torch.randn(3, 11, 10, dtype=torch.float64)
    ref = m.mv(oracles.ea_double_norm(m.mk(x), 1e-9))
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-12)
    assert list(m.state_dict()) == ["mk.weight", "mv.weight"]


@pytest.mark.parametrize("dims", [(12, 3, 4), (8, 2, 2), (16, 8, 4), (6, 1, 1)])
def test_multihead_matches_official_eanet(dims):
    dim, heads, coef = dims
    m = MultiHeadExternalAttention(dim, num_heads=heads, coef=coef).double().eval()
    assert m.S == 256 // coef and m.heads == heads * coef
    assert m.linear_0.in_features == dim * coef // (heads * coef)
    assert m.k is m.linear_0 and m.v is m.linear_1
    x = torch.randn(2, 7, dim, dtype=torch.float64, requires_grad=True)
    y = m(x)
    yr = _eanet_forward(m, x)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(y.sum(), x)
    (gr,) = torch.autograd.grad(yr.sum(), x)
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-11)
    assert set(m.state_dict()) == {
        "trans_dims.weight",
        "trans_dims.bias",
        "linear_0.weight",
        "linear_0.bias",
        "linear_1.weight",
        "linear_1.bias",
        "proj.weight",
        "proj.bias",
    }


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("N", [1, 5, 16])
def test_talking_heads_module_matches_eager(qkv_bias, N):
    m = TalkingHeadAttention(16, num_heads=4, qkv_bias=qkv_bias).double()
    x = torch.randn(2, N, 16, dtype=torch.float64, requires_grad=True)
    y = m(x)
    yr = _cait_forward(m, x)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (gr,) = torch.autograd.grad(yr.square().sum(), x)
    torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-11)


def test_dropout_train_vs_eval():
    for m in (
        TalkingHeadAttention(8, 2, attn_drop=0.5, proj_drop=0.1),
        MultiHeadExternalAttention(8, 2, attn_drop=0.5, proj_drop=0.1),
    ):
        x = torch.randn(2, 6, 8)
        m.eval()
        y1, y2 = m(x), m(x)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # eval: deterministic
        m.train()
        assert not torch.allclose(m(x), m(x))  # train: dropout active
        assert torch.isfinite(m(x)).all()


def test_talking_heads_eval_equals_train_without_dropout():
    m = TalkingHeadAttention(8, 2)
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(m.train()(x), m.eval()(x), rtol=0, atol=0)


def test_float32_and_autocast_bfloat16():
    for m in (ExternalAttention(16, 8), MultiHeadExternalAttention(16, 4), TalkingHeadAttention(16, 4)):
        x = torch.randn(2, 9, 16)
        y = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = m(x)
        assert yb.dtype == torch.bfloat16 and torch.isfinite(yb).all()
        assert (yb.float() - y).abs().max().item() < 0.1 * max(y.abs().max().item(), 1e-3) + 1e-2


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_heads"):
        MultiHeadExternalAttention(10, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        TalkingHeadAttention(10, num_heads=4)
    with pytest.raises(ValueError, match="dim"):
        ExternalAttention(0)
    with pytest.raises(ValueError, match="S"):
        ExternalAttention(8, S=0)
    with pytest.raises(ValueError, match="coef"):
        MultiHeadExternalAttention(8, 2, coef=512)
    with pytest.raises(ValueError, match="attn_drop"):
        TalkingHeadAttention(8, 2, attn_drop=2.0)
    with pytest.raises(TypeError, match="dim"):
        ExternalAttention(8.0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_bad_inputs(name):
    m = MAKERS[name]()
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(9, m.dim))  # rank 2
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 2, 9, m.dim))  # rank 4
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 9, m.dim + 1))  # wrong channels
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 0, m.dim))  # no tokens
    with pytest.raises(TypeError, match="x"):
        m([[1.0]])


def test_module_params_same_names_as_timm():
    m = TalkingHeadAttention(8, 2, qkv_bias=False)
    assert list(m.state_dict()) == [
        "qkv.weight",
        "proj.weight",
        "proj.bias",
        "proj_l.weight",
        "proj_l.bias",
        "proj_w.weight",
        "proj_w.bias",
    ]
    assert isinstance(m.attn_drop, nn.Dropout) and isinstance(m.proj_drop, nn.Dropout)
