"""Re-creations of the public implementations the compat layers replace and the benchmark compares against,
written once for the tests and benchmarks/providers.py.

Neither External-Attention-pytorch (not on PyPI) nor timm (no CPU-only install) is installable here, so these
re-implement the originals' constructors and forward passes faithfully from reading their code, naive math
included: xmu-xiaoma666/External-Attention-pytorch model/attention/ExternalAttention.py and AFT.py;
huggingface/pytorch-image-models timm/models/cait.py (``TalkingHeadAttn``); MenghaoGuo/EANet
multi_head_attention_torch.py. (aft-pytorch 0.2.2 is installed and used as is.)

The benchmark uses timm's own TalkingHeadAttn when timm imports and this re-creation otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

__all__ = [
    "ea_pytorch_init",
    "ea_pytorch_double_norm",
    "ea_pytorch_aft_core",
    "OrigExternalAttention",
    "OrigAFT_FULL",
    "timm_talking_heads_core",
    "timm_talking_heads_forward",
    "OrigTalkingHeadAttn",
    "eanet_multihead_forward",
]


# ----------------------------------------------------------------------------------------- External-Attention-pytorch
def ea_pytorch_init(module: nn.Module) -> None:
    """The originals' ``init_weights`` on Linear layers: weight ~ N(0, 0.001), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init.normal_(m.weight, std=0.001)
            if m.bias is not None:
                init.constant_(m.bias, 0)


def ea_pytorch_double_norm(attn, softmax=None):
    """ExternalAttention.forward between mk and mv: softmax over the tokens (dim 1), then divide by the sum over
    the S memory units (no eps)."""
    attn = softmax(attn) if softmax is not None else torch.softmax(attn, dim=1)
    return attn / torch.sum(attn, dim=2, keepdim=True)


class OrigExternalAttention(nn.Module):
    def __init__(self, d_model, S=64):
        super().__init__()
        self.mk = nn.Linear(d_model, S, bias=False)
        self.mv = nn.Linear(S, d_model, bias=False)
        self.softmax = nn.Softmax(dim=1)
        ea_pytorch_init(self)

    def forward(self, queries):
        return self.mv(ea_pytorch_double_norm(self.mk(queries), self.softmax))


def ea_pytorch_aft_core(q, k, v, w):
    """AFT_FULL.forward after its projections: exp(k + w) built as an (n, bs, n, dim) tensor, no max subtraction."""
    bs, n, dim = q.shape
    k = k.view(1, bs, n, dim)
    v = v.view(1, bs, n, dim)
    e = torch.exp(k + w.view(n, 1, -1, 1))  # (n, bs, n, dim): w[t, t'] + k[b, t', c]
    out = torch.sum(e * v, dim=2) / torch.sum(e, dim=2)  # (n, bs, dim)
    return torch.sigmoid(q) * out.permute(1, 0, 2)


class OrigAFT_FULL(nn.Module):
    def __init__(self, d_model, n=49, simple=False):
        super().__init__()
        self.fc_q = nn.Linear(d_model, d_model)
        self.fc_k = nn.Linear(d_model, d_model)
        self.fc_v = nn.Linear(d_model, d_model)
        if simple:
            self.position_biases = torch.zeros((n, n))  # plain attribute: not in the state_dict
        else:
            self.position_biases = nn.Parameter(torch.ones((n, n)))
        self.d_model = d_model
        self.n = n
        self.sigmoid = nn.Sigmoid()
        ea_pytorch_init(self)

    def forward(self, input):
        return ea_pytorch_aft_core(self.fc_q(input), self.fc_k(input), self.fc_v(input), self.position_biases)


# ----------------------------------------------------------------------------------------- timm CaiT
def timm_talking_heads_core(
    q, k, v, pre_weight, post_weight, pre_bias=None, post_bias=None, scale=None, attn_drop=None
):
    """TalkingHeadAttn.forward between qkv and proj, in the inputs' dtype: (B, h, N, N) logits mixed over the heads
    by ``proj_l`` (a Linear over the head dim), softmax over keys, mixed by ``proj_w``, dropout, @ v."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = F.linear(attn.permute(0, 2, 3, 1), pre_weight, pre_bias).permute(0, 3, 1, 2)
    attn = attn.softmax(dim=-1)
    attn = F.linear(attn.permute(0, 2, 3, 1), post_weight, post_bias).permute(0, 3, 1, 2)
    if attn_drop is not None:
        attn = attn_drop(attn)
    return attn @ v


def timm_talking_heads_forward(m, x):
    """TalkingHeadAttn.forward on any module with timm's submodules (qkv, proj_l, proj_w, attn_drop, proj,
    proj_drop) and attributes (num_heads, scale): the original's, or ours for comparison."""
    B, N, C = x.shape
    qkv = m.qkv(x).reshape(B, N, 3, m.num_heads, C // m.num_heads).permute(2, 0, 3, 1, 4)
    y = timm_talking_heads_core(
        qkv[0], qkv[1], qkv[2], m.proj_l.weight, m.proj_w.weight, m.proj_l.bias, m.proj_w.bias, m.scale, m.attn_drop
    )
    return m.proj_drop(m.proj(y.transpose(1, 2).reshape(B, N, C)))


class OrigTalkingHeadAttn(nn.Module):
    # timm 1.0.31's signature (device / dtype factory kwargs)
    def __init__(self, dim, num_heads=8, qkv_bias=False, attn_drop=0.0, proj_drop=0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_l = nn.Linear(num_heads, num_heads, **dd)
        self.proj_w = nn.Linear(num_heads, num_heads, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        return timm_talking_heads_forward(self, x)


# ----------------------------------------------------------------------------------------- EANet
def eanet_multihead_forward(m, x):
    """The official EANet multi-head forward (multi_head_attention_torch.py), eager, on a module with its
    submodules (trans_dims, linear_0, linear_1, proj) and ``heads``; dropout left out."""
    B, N, C = x.shape
    x = m.trans_dims(x).view(B, N, m.heads, -1).permute(0, 2, 1, 3)
    attn = m.linear_0(x).softmax(dim=-2)
    attn = attn / (1e-9 + attn.sum(dim=-1, keepdim=True))
    x = m.linear_1(attn).permute(0, 2, 1, 3).reshape(B, N, -1)
    return m.proj(x)
