"""Benchmark cases and presets.

A case is one op (functional API) or one module (drop-in compat layer) at one shape. ``x`` is the sequence
length (tokens) used as the x axis of the plots.

Op cases (``kind == "op"``):
  aft_full / aft_local / aft_simple      B, T, D, causal (+ window for aft_local)
  aft_conv2d                             B, D, H, W, heads, s          (T = H*W)
  ea_double_norm                         B, N, S   logits (B, N, S)    (T = N)
  talking_heads_attention                B, h, N, dh                   (T = N, C = h*dh)
Module cases (``kind == "module"``), constructor arguments of the public code they replace:
  mod_aft_full / mod_aft_simple / mod_aft_local   aft-pytorch (max_seqlen=T, dim, hidden_dim[, s])
  mod_ea_aft_full                                 External-Attention-pytorch AFT_FULL(d_model, n=T)
  mod_external_attention                          External-Attention-pytorch ExternalAttention(d_model, S)
  mod_talking_heads                               timm CaiT TalkingHeadAttn(dim, num_heads)
"""

from __future__ import annotations

import dataclasses

OPS = ("aft_full", "aft_local", "aft_simple", "aft_conv2d", "ea_double_norm", "talking_heads_attention")
MODULES = (
    "mod_aft_full",
    "mod_aft_simple",
    "mod_aft_local",
    "mod_ea_aft_full",
    "mod_external_attention",
    "mod_talking_heads",
)
ALL = OPS + MODULES


@dataclasses.dataclass(frozen=True)
class Case:
    name: str  # one of ALL
    params: tuple  # sorted (key, value) pairs

    @property
    def p(self) -> dict:
        return dict(self.params)

    @property
    def kind(self) -> str:
        return "module" if self.name.startswith("mod_") else "op"

    @property
    def x(self) -> int:
        p = self.p
        if "T" in p:
            return p["T"]
        if "N" in p:
            return p["N"]
        return p["H"] * p["W"]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_fmt(v)}" for k, v in self.params)


def _fmt(v):
    if isinstance(v, bool):
        return "T" if v else "F"
    return str(v)


def case(name: str, **params) -> Case:
    assert name in ALL, name
    return Case(name, tuple(sorted(params.items())))


def _token_ops(B, Ts, D, window, causals=(False, True)):
    out = []
    for T in Ts:
        for c in causals:
            out.append(case("aft_full", B=B, T=T, D=D, causal=c))
            out.append(case("aft_local", B=B, T=T, D=D, window=window, causal=c))
            out.append(case("aft_simple", B=B, T=T, D=D, causal=c))
    return out


def preset_quick():
    """Tiny shapes: every op and module once, for tests (seconds)."""
    return [
        case("aft_full", B=2, T=32, D=16, causal=False),
        case("aft_full", B=2, T=64, D=16, causal=True),
        case("aft_local", B=2, T=64, D=16, window=8, causal=True),
        case("aft_simple", B=2, T=64, D=16, causal=True),
        case("aft_conv2d", B=2, D=16, H=8, W=8, heads=4, s=3),
        case("ea_double_norm", B=2, N=64, S=16),
        case("talking_heads_attention", B=2, h=4, N=32, dh=8),
        case("mod_aft_full", B=2, T=32, dim=16, hidden_dim=16),
        case("mod_aft_simple", B=2, T=32, dim=16, hidden_dim=16),
        case("mod_aft_local", B=2, T=32, dim=16, hidden_dim=16, s=8),
        case("mod_ea_aft_full", B=2, T=16, d_model=16),
        case("mod_external_attention", B=2, N=32, d_model=16, S=8),
        case("mod_talking_heads", B=2, N=32, dim=32, num_heads=4),
    ]


def preset_cpu_default():
    """Every op and module at small realistic shapes (B=2, D=128), three sequence lengths each for the plots.

    Sized for < 3 min on 2 cores. torch.compile compiles every shape anew (seconds per shape and mode on 2 cores),
    so the CPU default runs torch.compile(python) on three op cases (CPU_DEFAULT_COMPILE_CASES) and plain+compile
    at T = 256 only (CPU_DEFAULT_PLAIN_COMPILE_CASES); add them everywhere with --providers.
    """
    out = []
    B, D = 2, 128
    for T in (128, 256, 512):
        out += [
            case("aft_full", B=B, T=T, D=D, causal=False),
            case("aft_full", B=B, T=T, D=D, causal=True),
            case("aft_local", B=B, T=T, D=D, window=32, causal=True),
            case("aft_simple", B=B, T=T, D=D, causal=True),
            case("aft_simple", B=B, T=T, D=D, causal=False),
            case("ea_double_norm", B=B, N=T, S=64),
            case("mod_aft_full", B=B, T=T, dim=D, hidden_dim=D),
            case("mod_aft_simple", B=B, T=T, dim=D, hidden_dim=D),
            case("mod_external_attention", B=B, N=T, d_model=D, S=64),
        ]
    for side in (8, 14, 24):  # ViT-like token grids: N = 64, 196 and 576
        out.append(case("aft_conv2d", B=B, D=64, H=side, W=side, heads=8, s=7))
        out.append(case("talking_heads_attention", B=B, h=4, N=side * side, dh=32))
        out.append(case("mod_talking_heads", B=B, N=side * side, dim=128, num_heads=4))  # CaiT-XXS-like
    for T in (64, 128, 256):
        out.append(case("mod_aft_local", B=B, T=T, dim=D, hidden_dim=D, s=32))  # aft-pytorch: a T^2 Python loop
    for T in (64, 128, 196):
        out.append(case("mod_ea_aft_full", B=B, T=T, d_model=D))  # its (T, B, T, D) tensor grows as T^2
    return out


def preset_cpu_ops():
    """The compiled CPU kernels' table: fp32, B=4, T=2048, D=256, window 64, 2 threads; the four op families."""
    B, T, D = 4, 2048, 256
    return [
        case("aft_full", B=B, T=T, D=D, causal=False),
        case("aft_full", B=B, T=T, D=D, causal=True),
        case("aft_local", B=B, T=T, D=D, window=64, causal=False),
        case("aft_local", B=B, T=T, D=D, window=64, causal=True),
        case("aft_simple", B=B, T=T, D=D, causal=False),
        case("aft_simple", B=B, T=T, D=D, causal=True),
        case("ea_double_norm", B=B, N=T, S=D),
    ]


def preset_gpu_paper():
    """The papers' shapes: enwik8-like (B=8, T=1024-4096, D=512), CIFAR-10 pixels (T=3072), ViT-like (N=196-4096)."""
    out = []
    for T in (1024, 2048, 4096):
        out += [
            case("aft_full", B=8, T=T, D=512, causal=True),
            case("aft_full", B=8, T=T, D=512, causal=False),
            case("aft_local", B=8, T=T, D=512, window=32, causal=True),
            case("aft_simple", B=8, T=T, D=512, causal=True),
            case("aft_simple", B=8, T=T, D=512, causal=False),
            case("ea_double_norm", B=8, N=T, S=64),
            case("mod_aft_full", B=8, T=T, dim=512, hidden_dim=512),
            case("mod_aft_simple", B=8, T=T, dim=512, hidden_dim=512),
        ]
    # CIFAR-10 pixels (paper: AFT-local-256, T = 3072)
    out += [
        case("aft_local", B=8, T=3072, D=512, window=256, causal=True),
        case("aft_full", B=8, T=3072, D=512, causal=True),
    ]
    # ViT-like token grids
    for side in (14, 32, 64):
        N = side * side
        out += [
            case("aft_conv2d", B=32, D=384, H=side, W=side, heads=8, s=7),
            case("talking_heads_attention", B=32 if N <= 1024 else 4, h=8, N=N, dh=48),
            case("mod_talking_heads", B=32 if N <= 1024 else 4, N=N, dim=384, num_heads=8),
            case("mod_external_attention", B=32, N=N, d_model=384, S=64),
        ]
    out += [
        case("mod_aft_local", B=8, T=1024, dim=512, hidden_dim=512, s=32),
        case("mod_ea_aft_full", B=8, T=196, d_model=384),
        case("mod_ea_aft_full", B=8, T=1024, d_model=384),
    ]
    return out


# cases of the CPU default that also run torch.compile(python) (when --providers is not given)
CPU_DEFAULT_COMPILE_CASES = frozenset(
    {
        # not aft_local: its Python path unrolls one block per chunk of query rows, and compiling it (fwd and
        # fwd+bwd, T = 256) took 99 s of the default's 178 s on 2 cores; --providers adds it back
        case("ea_double_norm", B=2, N=256, S=64),
        case("aft_simple", B=2, T=256, D=128, causal=True),
        case("aft_simple", B=2, T=256, D=128, causal=False),
    }
)

# cases of the CPU default that also run plain+compile (when --providers is not given): one length (T = 256) of
# every configuration with a plain formulation, since each compiles anew (seconds on 2 cores); plain runs on all
CPU_DEFAULT_PLAIN_COMPILE_CASES = frozenset(
    c
    for c in preset_cpu_default()
    if c.name in ("aft_full", "aft_local", "aft_simple", "ea_double_norm") and c.x == 256
)

# providers each preset runs when --providers is not given (None: all that apply)
DEFAULT_PROVIDERS = {
    "quick": None,
    "cpu-default": ("python", "compiled", "aft-pytorch", "ea-pytorch", "timm", "fla", "sdpa", "plain"),
    "cpu-ops": ("python", "compiled", "plain", "plain+compile"),
    "gpu-paper": None,
}

PRESETS = {
    "quick": preset_quick,
    "cpu-default": preset_cpu_default,
    "cpu-ops": preset_cpu_ops,
    "gpu-paper": preset_gpu_paper,
}
