"""attnfree_ext.compat: External-Attention-pytorch's ExternalAttention and AFT_FULL, timm's TalkingHeadAttn.

External-Attention-pytorch is not a package, so benchmarks/peers.py re-implements its layers (and timm's) faithfully
from their code, naive math included; timm's own CaiT is tested at the end (the [test] extra installs timm). Parity:
same init for one seed, state_dicts load with strict=True both ways, same outputs (and gradients) wherever the
original's are finite.
"""

import inspect

import pytest
import torch
from torch import nn

from attnfree_ext import compat
from benchmarks.peers import OrigAFT_FULL, OrigExternalAttention, OrigTalkingHeadAttn
from common import oracles

# ----------------------------------------------------------------------------------------- helpers
CASES = {  # name: (original, ours, constructor args, d_model, n or None)
    "ea": (OrigExternalAttention, compat.ExternalAttention, (12,), 12, None),
    "ea_S5": (OrigExternalAttention, compat.ExternalAttention, (6, 5), 6, None),
    "aft_full": (OrigAFT_FULL, compat.AFT_FULL, (8, 7), 8, 7),
    "aft_simple": (OrigAFT_FULL, compat.AFT_FULL, (8, 7, True), 8, 7),
    "timm": (OrigTalkingHeadAttn, compat.TalkingHeadAttn, (12, 3), 12, None),
    "timm_bias": (OrigTalkingHeadAttn, compat.TalkingHeadAttn, (12, 4, True), 12, None),
}


def _pair(name, dtype=torch.float64, std=0.5):
    """Original with random (not tiny) weights, ours loaded from its state_dict (strict)."""
    Orig, Ours, args, d, n = CASES[name]
    orig = Orig(*args)
    with torch.no_grad():
        for p in orig.parameters():
            p.normal_(0, std)
    ours = Ours(*args)
    ours.load_state_dict(orig.state_dict(), strict=True)
    return orig.to(dtype), ours.to(dtype), d, n


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(CASES))
def test_same_init_and_state_dict_keys(name):
    Orig, Ours, args, _, _ = CASES[name]
    torch.manual_seed(7)
    a = Orig(*args)
    torch.manual_seed(7)
    b = Ours(*args)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # strict loading both ways
    b.load_state_dict(sa, strict=True)
    a.load_state_dict(sb, strict=True)


@pytest.mark.parametrize("name", ["ea", "aft_full", "aft_simple", "timm"])
def test_same_constructor_signature(name):
    Orig, Ours, _, _, _ = CASES[name]
    po = inspect.signature(Orig.__init__).parameters
    pn = inspect.signature(Ours.__init__).parameters
    assert [(p.name, p.default) for p in po.values()] == [(p.name, p.default) for p in pn.values()]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_outputs_and_grads_match(name, dtype):
    orig, ours, d, n = _pair(name, dtype)
    N = n if n is not None else 9
    x = torch.randn(2, N, d, dtype=dtype)
    xo, xn = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yo, yn = orig(xo), ours(xn)
    assert torch.isfinite(yo).all()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yn, yo, **tol)
    dy = torch.randn_like(yo)
    yo.backward(dy)
    yn.backward(dy)
    torch.testing.assert_close(xn.grad, xo.grad, **tol)
    po, pn = dict(orig.named_parameters()), dict(ours.named_parameters())
    assert list(po) == list(pn)
    for k in po:
        torch.testing.assert_close(pn[k].grad, po[k].grad, **tol, msg=k)


def test_external_attention_original_nan_ours_finite():
    """A token far below the others in every memory unit: the original's row sum underflows to 0 (0/0 = NaN)."""
    orig, ours, d, _ = _pair("ea", torch.float32)
    x = torch.randn(2, 9, d)
    x[:, 4] = 0
    with torch.no_grad():
        orig.mk.weight.mul_(0)
        orig.mk.weight[:, 0] = 1.0
        ours.mk.weight.copy_(orig.mk.weight)
    x[:, :, 0] = torch.randn(2, 9) * 50
    x[:, 4, 0] = -200.0
    yo, yn = orig(x), ours(x)
    assert torch.isnan(yo).any()
    assert torch.isfinite(yn).all()
    finite = torch.isfinite(yo).all(dim=-1)
    torch.testing.assert_close(yn[finite], yo[finite], rtol=1e-4, atol=1e-5)
    # the exact value from the double-norm oracle in float64, eps = 0, computed in log space
    logits = x.double() @ ours.mk.weight.double().t()
    z = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    exact = torch.softmax(z, dim=-1) @ ours.mv.weight.double().t()
    torch.testing.assert_close(yn.double(), exact, rtol=1e-4, atol=1e-5)


def test_aft_full_original_overflows_ours_finite():
    orig, ours, d, n = _pair("aft_full", torch.float32, std=0.5)
    with torch.no_grad():
        orig.position_biases.mul_(200.0)
        ours.position_biases.copy_(orig.position_biases)
    x = torch.randn(2, n, d)
    yo, yn = orig(x), ours(x)
    assert not torch.isfinite(yo).all()
    assert torch.isfinite(yn).all()
    q, k, v = ours.fc_q(x), ours.fc_k(x), ours.fc_v(x)
    ref = oracles.aft(q, k, v, ours.position_biases)
    torch.testing.assert_close(yn.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T", [1, 3, 6])
def test_aft_full_shorter_sequences(T):
    """Ours accepts T <= n using position_biases[:T, :T]; the original needs T == n (compare with one built at T)."""
    orig, ours, d, n = _pair("aft_full", torch.float64)
    x = torch.randn(2, T, d, dtype=torch.float64)
    short = OrigAFT_FULL(d, T).double()
    sd = {k: (v[:T, :T] if k == "position_biases" else v) for k, v in orig.state_dict().items()}
    short.load_state_dict(sd, strict=True)
    torch.testing.assert_close(ours(x), short(x), rtol=1e-10, atol=1e-12)
    simple = compat.AFT_FULL(d, n, simple=True).double()
    assert torch.isfinite(simple(x)).all()


def test_aft_full_too_long_and_bad_input():
    _, ours, d, n = _pair("aft_full")
    with pytest.raises(ValueError, match="n="):
        ours(torch.randn(1, n + 1, d, dtype=torch.float64))
    with pytest.raises(ValueError, match="input"):
        ours(torch.randn(n, d, dtype=torch.float64))
    with pytest.raises(ValueError, match="input"):
        compat.ExternalAttention(8)(torch.randn(2, 3, 9))


def test_aft_simple_has_no_position_bias_state():
    m = compat.AFT_FULL(8, 5, simple=True)
    assert "position_biases" not in m.state_dict()
    assert not any(name == "position_biases" for name, _ in m.named_parameters())
    assert m.position_biases.shape == (5, 5)  # still an attribute, as in the original
    full = compat.AFT_FULL(8, 5)
    assert isinstance(full.position_biases, nn.Parameter) and torch.equal(full.position_biases, torch.ones(5, 5))


def test_talking_head_attn_train_with_dropout_and_proj_l_bias_grad():
    orig, ours, d, _ = _pair("timm", torch.float32)
    x = torch.randn(2, 5, d)
    ours.train()
    ours(x).sum().backward()
    assert ours.proj_l.bias.grad is not None and ours.proj_l.bias.grad.abs().max().item() == 0.0
    m = compat.TalkingHeadAttn(12, 3, attn_drop=0.3).train()
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    m.eval()
    o = OrigTalkingHeadAttn(12, 3, attn_drop=0.3).eval()
    o.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(m(x), o(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------- timm itself
def _timm():
    from benchmarks.providers import import_timm

    try:
        return import_timm()
    except ImportError as e:
        pytest.skip(f"timm is not installed ({e}); the [test] extra installs it")


def test_timm_cait_with_our_talking_head_attn_matches_timms_own():
    """timm.create_model's CaiT with attn_block=compat.TalkingHeadAttn: every attention layer is ours, timm's own
    CaiT's state_dict loads with strict=True, and both give the same logits and input gradient."""
    timm = _timm()
    from timm.models.cait import TalkingHeadAttn as TimmTalkingHeadAttn

    torch.manual_seed(0)
    kw = dict(pretrained=False, num_classes=10, img_size=64)  # CaiT-XXS-24 on 4 x 4 patches: seconds on a CPU
    ref = timm.create_model("cait_xxs24_224", **kw).eval()
    ours = timm.create_model("cait_xxs24_224", attn_block=compat.TalkingHeadAttn, **kw).eval()
    layers = [m for m in ours.modules() if isinstance(m, compat.TalkingHeadAttn)]
    assert len(layers) == 24 and not any(type(m) is TimmTalkingHeadAttn for m in ours.modules())
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert torch.isfinite(yr).all()
    torch.testing.assert_close(yo, yr, rtol=1e-4, atol=1e-5)
    (gr,), (go,) = torch.autograd.grad(yr.square().sum(), xr), torch.autograd.grad(yo.square().sum(), xo)
    torch.testing.assert_close(go, gr, rtol=1e-3, atol=1e-6)
