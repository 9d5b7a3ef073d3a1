"""The implementations compared, built for one case on one device/dtype.

``build(case, provider, device, dtype)`` returns a :class:`Runnable`: ``fn()`` runs the forward pass and returns
one tensor; ``grad_targets`` are the tensors a forward+backward pass differentiates (inputs, and parameters for
modules). It raises :class:`Unavailable` when a provider does not apply, is not installed / not compiled, or would
need more memory than the machine has (predicted from the shapes, so the run never dies on it).

Providers:
  python                  attnfree_ext under force_backend("python")
  compiled                attnfree_ext under force_backend("compiled") -- only when attnfree_ext._C defines the op
                          with a kernel for this device
  torch.compile(python)   torch.compile of the same python-path call
  aft-pytorch             aft-pytorch 0.2.2 modules (AFTFull / AFTSimple / AFTLocal)
  ea-pytorch              eager re-creations of External-Attention-pytorch's AFT_FULL (exp(k + w) built as a
                          (T, B, T, D) tensor) and ExternalAttention, as that repository writes them
  timm                    timm's own CaiT TalkingHeadAttn (timm.models.cait; materialises the (B, h, N, N) logits)
                          when timm imports, else a re-creation of it, labelled "timm (re-created)"
  fla                     flash-linear-attention's fused_recurrent_rwkv4 (Triton, CUDA only) with zero decay and
                          zero bonus, times sigmoid(q): that is causal AFT-simple (see fla_rwkv4_as_aft_simple)
  sdpa                    standard multi-head attention, F.scaled_dot_product_attention at the same (B, T, D),
                          heads = D // 64: what a user would pick instead. It computes another function, so its
                          rows have times but no speed-up or fraction of floor
  plain, plain+compile    the plain PyTorch formulations of benchmarks/plain.py (split max + GEMMs, cumsum,
                          softmax), eager and torch.compile'd
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .peers import OrigAFT_FULL as EAPytorchAFTFull
from .peers import OrigExternalAttention as EAPytorchExternalAttention
from .peers import OrigTalkingHeadAttn as TimmTalkingHeadAttn
from .peers import ea_pytorch_aft_core, ea_pytorch_double_norm, timm_talking_heads_core
from .shapes import Case

PROVIDERS = (
    "python",
    "compiled",
    "torch.compile(python)",
    "aft-pytorch",
    "ea-pytorch",
    "timm",
    "fla",
    "sdpa",
    "plain",
    "plain+compile",
)

# providers that compute another function than the case (a speed-up or a fraction of floor would mean nothing)
OTHER_FUNCTION = frozenset({"sdpa"})

# Which compiled op (torch.ops.attnfree.<name>) each case runs on when the compiled path is taken.
COMPILED_OP = {
    "aft_full": "aft_full_fwd",
    "aft_local": "aft_local_fwd",
    "aft_simple": "aft_simple_fwd",
    "ea_double_norm": "ea_double_norm_fwd",
    "mod_aft_full": "aft_full_fwd",
    "mod_aft_simple": "aft_simple_fwd",
    "mod_aft_local": "aft_local_fwd",
    "mod_ea_aft_full": "aft_full_fwd",
    "mod_external_attention": "ea_double_norm_fwd",
}

# Which providers apply to which case (the others are simply not listed for it).
APPLIES = {
    "aft_full": ("python", "compiled", "torch.compile(python)", "ea-pytorch", "sdpa", "plain", "plain+compile"),
    "aft_local": ("python", "compiled", "torch.compile(python)", "sdpa", "plain", "plain+compile"),
    "aft_simple": (
        "python",
        "compiled",
        "torch.compile(python)",
        "ea-pytorch",
        "fla",
        "sdpa",
        "plain",
        "plain+compile",
    ),
    "aft_conv2d": ("python", "compiled", "torch.compile(python)", "sdpa"),
    "ea_double_norm": ("python", "compiled", "torch.compile(python)", "ea-pytorch", "plain", "plain+compile"),
    "talking_heads_attention": ("python", "compiled", "torch.compile(python)", "timm", "sdpa"),
    "mod_aft_full": ("python", "compiled", "torch.compile(python)", "aft-pytorch", "sdpa"),
    "mod_aft_simple": ("python", "compiled", "torch.compile(python)", "aft-pytorch", "sdpa"),
    "mod_aft_local": ("python", "compiled", "torch.compile(python)", "aft-pytorch", "sdpa"),
    "mod_ea_aft_full": ("python", "compiled", "torch.compile(python)", "ea-pytorch", "sdpa"),
    "mod_external_attention": ("python", "compiled", "torch.compile(python)", "ea-pytorch", "sdpa"),
    "mod_talking_heads": ("python", "compiled", "torch.compile(python)", "timm", "sdpa"),
}

# aft-pytorch's AFTLocal rebuilds its bias in a Python loop of max_seqlen^2 steps on every call.
AFT_PYTORCH_LOCAL_MAX_T = int(os.environ.get("BENCH_AFTLOCAL_MAX_T", "512"))


class Unavailable(Exception):
    """The provider does not apply / is not installed / would not fit; the message says which."""


@dataclasses.dataclass
class Runnable:
    fn: Callable[[], torch.Tensor]
    grad_targets: list
    impl: str | None = None  # what exactly runs, when the provider name alone does not say it (e.g. a re-creation)


def providers_for(case: Case, wanted=None) -> list[str]:
    names = APPLIES[case.name]
    return [p for p in names if wanted is None or p in wanted]


# ----------------------------------------------------------------------------------------------- availability
def compiled_status(op_name: str | None, device: torch.device) -> str | None:
    """None when torch.ops.attnfree.<op_name> has a kernel for ``device``; otherwise the reason it does not."""
    if op_name is None:
        return "no compiled op for this function"
    try:
        import attnfree_ext  # noqa: F401  (loads attnfree_ext._C when it is built)
    except Exception as e:  # pragma: no cover - the library itself failed to import
        return f"attnfree_ext import failed: {e}"
    try:
        importlib.import_module("attnfree_ext._C")
    except Exception:
        if not hasattr(torch.ops, "attnfree"):
            return "attnfree_ext._C not built"
    try:
        getattr(torch.ops.attnfree, op_name)
    except (AttributeError, RuntimeError):
        return f"attnfree_ext._C has no op {op_name}"
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"attnfree::{op_name}", key):
            return f"op {op_name} has no {key} kernel"
    except Exception:
        pass
    return None


def _memory_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.9)
    avail = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    limit = int(os.environ.get("BENCH_CPU_MEM_LIMIT_GB", "2")) << 30
    return min(limit, avail // 2) if avail else limit


def _guard(nbytes: float, device, what: str):
    lim = _memory_limit(device)
    if nbytes > lim:
        raise Unavailable(f"oom (predicted): {what} needs ~{nbytes / 2**30:.1f} GiB > {lim / 2**30:.1f} GiB")


# ----------------------------------------------------------------------------------------------- inputs
def _randn(*shape, device, dtype, scale=1.0, grad=True):
    t = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return t.requires_grad_(grad)


def make_inputs(case: Case, device, dtype):
    """The functional op's positional tensor inputs and its extra (non-tensor) arguments."""
    p = case.p
    r = lambda *s, scale=1.0: _randn(*s, device=device, dtype=dtype, scale=scale)  # noqa: E731
    if case.name in ("aft_full", "aft_local", "aft_simple"):
        B, T, D = p["B"], p["T"], p["D"]
        qkv = [r(B, T, D) for _ in range(3)]
        if case.name == "aft_simple":
            return qkv, dict(causal=p["causal"])
        w = r(T, T, scale=0.1)
        if case.name == "aft_local":
            return qkv + [w], dict(window=p["window"], causal=p["causal"])
        return qkv + [w], dict(causal=p["causal"])
    if case.name == "aft_conv2d":
        B, D, H, W, h, s = p["B"], p["D"], p["H"], p["W"], p["heads"], p["s"]
        return [r(B, D, H, W), r(B, h, H, W), r(B, D, H, W), r(h, s, s, scale=0.1)], {}
    if case.name == "ea_double_norm":
        return [r(p["B"], p["N"], p["S"])], {}
    if case.name == "talking_heads_attention":
        B, h, N, dh = p["B"], p["h"], p["N"], p["dh"]
        qkv = [r(B, h, N, dh) for _ in range(3)]
        return qkv + [r(h, h, scale=h**-0.5), r(h, h, scale=h**-0.5), r(h, scale=0.1), r(h, scale=0.1)], {}
    raise KeyError(case.name)


# ----------------------------------------------------------------------------------------------- public code
# torchvision's C++ operators that its Python package registers fake kernels for even when its _C did not load
_TORCHVISION_FAKE_ONLY_OPS = ("nms", "qnms")


def import_timm():
    """Import and return timm; ImportError when it is not installed.

    timm imports torchvision. A torchvision whose C++ library (torchvision/_C.so) does not load beside the installed
    torch -- PyPI's torchvision, a CUDA build, beside a CPU build of torch -- stops at import with "operator
    torchvision::nms does not exist": torchvision/_meta_registrations.py registers fake kernels for nms and qnms
    even when _C is missing, and torch refuses a fake kernel for an undeclared operator. Then the two operators'
    schemas are declared here, without any kernel, and the import is retried: torchvision's Python code loads, and
    any call of a torchvision C++ operator still fails ("no kernel"). timm's models that do not call them -- CaiT
    among them: timm imports torchvision for FrozenBatchNorm2d and its data transforms -- build and run."""
    import sys

    try:
        import timm

        return timm
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
    for name in [n for n in sys.modules if n.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]  # the half-imported packages
    for op in _TORCHVISION_FAKE_ONLY_OPS:
        try:
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already declared
            pass
    import timm

    return timm


def timm_talking_head_attn_class():
    """(timm.models.cait.TalkingHeadAttn, None) when timm imports (through :func:`import_timm`), else (None, the
    reason): any exception means "not usable"."""
    try:
        import_timm()
        from timm.models.cait import TalkingHeadAttn
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [""])[0][:120]
        return None, f"timm not importable ({type(e).__name__}: {first})" if first else "timm not installed"
    return TalkingHeadAttn, None


class _Packed(nn.Module):
    """Stands in for timm's qkv Linear: returns the (B, N, 3 * C) tensor given to the benchmark as input."""

    def __init__(self, packed):
        super().__init__()
        self.packed = packed

    def forward(self, x):
        return self.packed


def timm_talking_heads_op(q, k, v, pre_w, post_w, pre_b, post_b, cls):
    """timm's own TalkingHeadAttn.forward between its qkv and proj Linears, on the benchmark's q, k, v: returns
    (fn, grad targets). qkv is replaced by the packed q, k, v (timm's layout) and proj by Identity."""
    B, h, N, dh = q.shape
    mod = cls(h * dh, num_heads=h).to(device=q.device, dtype=q.dtype)
    with torch.no_grad():
        mod.proj_l.weight.copy_(pre_w)
        mod.proj_l.bias.copy_(pre_b)
        mod.proj_w.weight.copy_(post_w)
        mod.proj_w.bias.copy_(post_b)
    packed = torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * h * dh).detach().requires_grad_(True)
    mod.qkv = _Packed(packed)
    mod.proj = nn.Identity()
    x = torch.empty(B, N, h * dh, device=q.device, dtype=q.dtype)
    params = [mod.proj_l.weight, mod.proj_l.bias, mod.proj_w.weight, mod.proj_w.bias]
    return (lambda: mod(x)), [packed] + params


def sdpa_tokens(q, k, v, causal=False):
    """Standard multi-head attention on (B, T, D) tensors, heads = D // 64 (at least 1)."""
    B, T, D = q.shape
    h = max(1, D // 64)
    while D % h:
        h -= 1
    split = lambda t: t.reshape(B, T, h, D // h).transpose(1, 2)  # noqa: E731
    y = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
    return y.transpose(1, 2).reshape(B, T, D)


class SDPABlock(nn.Module):
    """Multi-head self-attention (qkv Linear, SDPA, output Linear): the usual layer the AFT/EA modules replace."""

    def __init__(self, dim, inner=None, causal=False):
        super().__init__()
        inner = inner or dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)
        self.causal = causal

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(sdpa_tokens(q, k, v, self.causal))


def fla_rwkv4_as_aft_simple(rwkv4, q, k, v):
    """Causal AFT-simple through an RWKV-4 WKV kernel with ``rwkv4(w, u, k, v, state) -> (wkv, state_out)``, as
    flash-linear-attention's fla.ops.rwkv4.fused_recurrent_rwkv4 defines it: with per-channel log-decay -exp(w) and
    bonus u, wkv_t = (sum_{i<t} e^{-(t-1-i) exp(w) + k_i} v_i + e^{u + k_t} v_t) / (same without v), the state
    (B, 3, 1, D) holding (alpha, beta, eps) = (0, 0, -inf) at the start. exp(w) = 0 (w = -1e4: no decay) and u = 0
    make it sum_{i<=t} e^{k_i} v_i / sum_{i<=t} e^{k_i}; AFT-simple multiplies that by sigmoid(q)."""
    B, T, D = k.shape
    w = torch.full((D,), -1e4, device=k.device, dtype=torch.float32)
    u = torch.zeros(D, device=k.device, dtype=torch.float32)
    sdt = torch.float32 if k.dtype in (torch.float16, torch.float32) else k.dtype
    state = torch.zeros(B, 3, 1, D, device=k.device, dtype=sdt)
    state[:, 2] = -1e38
    wkv, _ = rwkv4(w, u, k, v, state)
    return torch.sigmoid(q) * wkv.to(q.dtype)


# ----------------------------------------------------------------------------------------------- building
def _ours_op(case: Case):
    import attnfree_ext

    return getattr(attnfree_ext, case.name)


def _ours_module(case: Case):
    from attnfree_ext import compat

    p = case.p
    if case.name == "mod_aft_full":
        return compat.AFTFull(p["T"], p["dim"], p["hidden_dim"])
    if case.name == "mod_aft_simple":
        return compat.AFTSimple(p["T"], p["dim"], p["hidden_dim"])
    if case.name == "mod_aft_local":
        return compat.AFTLocal(p["T"], p["dim"], p["hidden_dim"], s=p["s"])
    if case.name == "mod_ea_aft_full":
        return compat.AFT_FULL(p["d_model"], n=p["T"])
    if case.name == "mod_external_attention":
        return compat.ExternalAttention(p["d_model"], S=p["S"])
    if case.name == "mod_talking_heads":
        return compat.TalkingHeadAttn(p["dim"], num_heads=p["num_heads"])
    raise KeyError(case.name)


def _module_input(case: Case, device, dtype):
    p = case.p
    B, T = p["B"], case.x
    dim = p.get("dim", p.get("d_model"))
    return _randn(B, T, dim, device=device, dtype=dtype)


def _ref_module(case: Case, provider: str):
    p = case.p
    if provider == "aft-pytorch":
        try:
            import aft_pytorch
        except ImportError:
            raise Unavailable("aft-pytorch not installed") from None
        if case.name == "mod_aft_full":
            return aft_pytorch.AFTFull(p["T"], p["dim"], p["hidden_dim"])
        if case.name == "mod_aft_simple":
            return aft_pytorch.AFTSimple(p["T"], p["dim"], p["hidden_dim"])
        if case.name == "mod_aft_local":
            if p["T"] > AFT_PYTORCH_LOCAL_MAX_T:
                raise Unavailable(
                    f"skip: AFTLocal rebuilds its bias in a Python loop of T^2 = {p['T'] ** 2} steps per call "
                    f"(capped at T <= {AFT_PYTORCH_LOCAL_MAX_T}; BENCH_AFTLOCAL_MAX_T)"
                )
            return aft_pytorch.AFTLocal(p["T"], p["dim"], p["hidden_dim"], s=p["s"])
    if provider == "ea-pytorch":
        if case.name == "mod_ea_aft_full":
            return EAPytorchAFTFull(p["d_model"], n=p["T"])
        if case.name == "mod_external_attention":
            return EAPytorchExternalAttention(p["d_model"], S=p["S"])
    if provider == "timm" and case.name == "mod_talking_heads":
        cls, _ = timm_talking_head_attn_class()
        return (cls or TimmTalkingHeadAttn)(p["dim"], num_heads=p["num_heads"])
    if provider == "sdpa":
        dim = p.get("dim", p.get("d_model"))
        return SDPABlock(dim, p.get("hidden_dim", dim))
    raise Unavailable(f"{provider} has no {case.name}")


def _predicted_bytes(case: Case, provider: str, es: int) -> float:
    """Peak working set of the naive public implementations (forward + what autograd keeps for backward)."""
    p = case.p
    if provider == "ea-pytorch" and case.name in ("aft_full", "aft_simple", "mod_ea_aft_full"):
        D = p.get("D", p.get("d_model"))
        return 4.0 * p["T"] * p["B"] * p["T"] * D * es
    if provider == "timm" and case.name in ("talking_heads_attention", "mod_talking_heads"):
        h = p.get("h", p.get("num_heads"))
        return 6.0 * p["B"] * h * case.x**2 * es
    if provider == "aft-pytorch":
        return 3.0 * p["T"] ** 2 * es
    return 0.0


@contextlib.contextmanager
def _nullctx():
    yield


def build(case: Case, provider: str, device: torch.device, dtype: torch.dtype) -> Runnable:
    if provider not in APPLIES[case.name]:
        raise Unavailable(f"{provider} does not implement {case.name}")
    es = torch.empty((), dtype=dtype).element_size()
    _guard(_predicted_bytes(case, provider, es), device, provider)

    ours = provider in ("python", "compiled", "torch.compile(python)")
    if provider == "compiled":
        reason = compiled_status(COMPILED_OP.get(case.name), device)
        if reason:
            raise Unavailable(f"unavailable: {reason}")
    if ours:
        import attnfree_ext

        backend = "compiled" if provider == "compiled" else "python"
        force = lambda: attnfree_ext.force_backend(backend)  # noqa: E731
    else:
        force = _nullctx

    p = case.p
    impl = None
    if case.kind == "op":
        inputs, kw = make_inputs(case, device, dtype)
        if ours:
            f = _ours_op(case)
            if provider == "torch.compile(python)":
                f = torch.compile(f)
        elif provider == "sdpa":
            if case.name in ("aft_full", "aft_local", "aft_simple"):
                f = lambda q, k, v, *w, **kw_: sdpa_tokens(q, k, v, kw_.get("causal", False))  # noqa: E731
            elif case.name == "aft_conv2d":

                def f(q, k, v, w):
                    t = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
                    y = sdpa_tokens(t(q), t(k.repeat_interleave(q.shape[1] // k.shape[1], 1)), t(v))
                    return y.transpose(1, 2).reshape(q.shape)
            else:  # talking heads: plain multi-head attention, same q, k, v
                f = lambda q, k, v, *rest: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        elif provider == "ea-pytorch":
            if p.get("causal"):
                raise Unavailable("n/a: External-Attention-pytorch AFT_FULL has no causal mode")
            if case.name == "aft_full":
                f = ea_pytorch_aft_core
            elif case.name == "aft_simple":
                T = p["T"]
                zeros = torch.zeros(T, T, device=device, dtype=dtype)
                f = lambda q, k, v, **kw_: ea_pytorch_aft_core(q, k, v, zeros)  # noqa: E731
            else:
                f = ea_pytorch_double_norm
            kw = {}
        elif provider == "timm":
            cls, why = timm_talking_head_attn_class()
            if cls is None:
                f, impl = timm_talking_heads_core, f"re-created: {why}"
            else:
                fn, targets = timm_talking_heads_op(*inputs, cls)
                return Runnable(fn, targets, "timm.models.cait.TalkingHeadAttn")
        elif provider == "fla":
            if not p["causal"]:
                raise Unavailable("n/a: fla's fused_recurrent_rwkv4 is causal only")
            if device.type != "cuda":
                raise Unavailable("unavailable: fla's fused_recurrent_rwkv4 is a Triton kernel, CUDA only")
            try:
                from fla.ops.rwkv4 import fused_recurrent_rwkv4
            except Exception as e:  # noqa: BLE001
                why = f"unavailable: flash-linear-attention (fla) not importable ({type(e).__name__})"
                raise Unavailable(why) from e
            f = lambda q, k, v, **kw_: fla_rwkv4_as_aft_simple(fused_recurrent_rwkv4, q, k, v)  # noqa: E731
            kw = {}
        elif provider in ("plain", "plain+compile"):
            from .plain import plain_fn

            f = plain_fn(case.name, compiled=provider == "plain+compile")
        else:
            raise Unavailable(f"{provider} has no {case.name}")

        def fn(f=f, inputs=inputs, kw=kw):
            with force():
                return f(*inputs, **kw)

        return Runnable(fn, [t for t in inputs if t.requires_grad], impl)

    # modules
    if ours:
        mod = _ours_module(case)
    else:
        mod = _ref_module(case, provider)
        if isinstance(mod, TimmTalkingHeadAttn):
            impl = f"re-created: {timm_talking_head_attn_class()[1]}"
        elif provider == "timm":
            impl = "timm.models.cait.TalkingHeadAttn"
    mod = mod.to(device=device, dtype=dtype)
    if provider == "torch.compile(python)":
        mod = torch.compile(mod)
    x = _module_input(case, device, dtype)

    def fn(mod=mod, x=x):
        with force():
            return mod(x)

    return Runnable(fn, [x] + [q for q in mod.parameters() if q.requires_grad], impl)
