"""CUDA kernels without a GPU: nvcc compile checks, binding syntax checks, and a CPU emulation of the kernels.

1. Every csrc/<op>/*.cu compiles with nvcc for sm_80 and sm_90 (skipped only when nvcc is not on PATH), and no
   kernel source or header it includes pulls in a torch header.
2. Every CUDA binding csrc/<op>/<op>_cuda.cpp passes `g++ -fsyntax-only` against torch's headers + the CUDA
   headers (the CPU wheel ships c10/cuda and ATen/cuda headers but not the generated
   c10/cuda/impl/cuda_cmake_macros.h, which is stubbed in a temp dir; a binding needing a CUDA library header
   absent here, e.g. cusparse.h, is skipped).
3. CPU emulation: the .cu sources of AFT-simple, AFT-local and the EA double normalisation are rewritten
   mechanically (kernel<<<grid, block, smem, stream>>>(args) -> emu::launch(lambda, grid, block...), CUDA
   qualifiers removed, grid capped at 2 blocks of 64 threads so every grid-stride loop wraps), compiled with g++
   and called through ctypes on CPU tensors. Each block's threads run as std::threads; warp shuffles go through a
   per-warp slot array and std::barrier. This runs the kernels' own index math and numerics against the float64
   oracles (tests/common/oracles.py); it cannot find races, coalescing or launch-limit problems (a GPU run does).
Compile jobs run two at a time in a thread pool (2 cores); the whole file stays well under 3 minutes.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*/*.cu"))
GLUE_FILES = sorted(CSRC.glob("*/*_cuda.cpp"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
EMU_SOURCES = ("common/cuda_common.cuh", "aft_simple/aft_simple.cu", "aft_local/aft_local.cu",
               "ea_double_norm/ea_double_norm.cu")
_TMP = pathlib.Path(tempfile.mkdtemp(prefix="attnfree_cuda_compile_"))
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2)
_JOBS: dict[str, concurrent.futures.Future] = {}


def _cuda_include() -> pathlib.Path | None:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if NVCC:
        cands.append(str(pathlib.Path(NVCC).resolve().parent.parent))
    cands.append("/usr/local/cuda")
    for c in cands:
        if c and (pathlib.Path(c) / "include" / "cuda_runtime_api.h").exists():
            return pathlib.Path(c) / "include"
    return None


CUDA_INC = _cuda_include()


def _run(cmd: list[str], cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


# ---------------------------------------------------------------- job definitions
def _nvcc_cmd(cu: pathlib.Path) -> list[str]:
    out = _TMP / (cu.stem + ".o")
    return [NVCC, "-std=c++17", "-c", "-gencode", "arch=compute_80,code=sm_80", "-gencode",
            "arch=compute_90,code=sm_90", "-I", str(CSRC), str(cu), "-o", str(out)]


def _glue_cmd(cpp: pathlib.Path) -> list[str] | None:
    from torch.utils.cpp_extension import include_paths

    incs = include_paths()
    if not (pathlib.Path(incs[0]) / "c10" / "cuda" / "CUDAStream.h").exists() or CUDA_INC is None or GXX is None:
        return None
    stub = _TMP / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    macros = stub / "cuda_cmake_macros.h"
    if not macros.exists():
        macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [GXX, "-std=c++20", "-fsyntax-only", "-w"]
    for p in incs:
        cmd += ["-I", p]
    # the real generated header (CUDA wheels) wins over the stub
    cmd += ["-I", str(CUDA_INC), "-I", str(CSRC), "-idirafter", str(_TMP / "stub"), str(cpp)]
    return cmd


EMU_H = r'''
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
#undef cudaGetLastError
#define cudaGetLastError() cudaSuccess
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
namespace emu {
struct U3 { unsigned int x = 0, y = 0, z = 0; };
struct WarpCtx { std::barrier<> bar{32}; double slot[32]; };
struct BlockCtx { std::vector<std::unique_ptr<WarpCtx>> warps; };
inline thread_local U3 blockIdx_, threadIdx_, blockDim_, gridDim_;
inline thread_local BlockCtx* blk_ = nullptr;
template <class F> void launch(F f, unsigned int grid, int block, int = 0, cudaStream_t = nullptr) {
    for (unsigned int b = 0; b < grid; ++b) {
        BlockCtx ctx;
        for (int w = 0; w < (block + 31) / 32; ++w) ctx.warps.emplace_back(new WarpCtx());
        std::vector<std::thread> th;
        for (int t = 0; t < block; ++t)
            th.emplace_back([&, b, t] {
                blockIdx_.x = b; threadIdx_.x = t; blockDim_.x = block; gridDim_.x = grid; blk_ = &ctx;
                f();
            });
        for (auto& x : th) x.join();
    }
}
template <class T> T shfl(T x, bool xor_mode, int arg) {
    WarpCtx& w = *blk_->warps[threadIdx_.x / 32];
    const int lane = threadIdx_.x % 32;
    w.slot[lane] = static_cast<double>(x);
    w.bar.arrive_and_wait();
    const int src = xor_mode ? (lane ^ arg) : lane + arg;
    T y = (src < 32) ? static_cast<T>(w.slot[src]) : x;
    w.bar.arrive_and_wait();
    return y;
}
}  // namespace emu
#define blockIdx emu::blockIdx_
#define threadIdx emu::threadIdx_
#define blockDim emu::blockDim_
#define gridDim emu::gridDim_
template <class T> T __shfl_down_sync(unsigned, T x, int o) { return emu::shfl(x, false, o); }
template <class T> T __shfl_xor_sync(unsigned, T x, int o) { return emu::shfl(x, true, o); }
'''

EMU_CAPI = r'''
#include "aft_local/aft_local.h"
#include "aft_simple/aft_simple.h"
#include "ea_double_norm/ea_double_norm.h"
using namespace attnfree::cuda;
using attnfree::DType;
extern "C" {
int emu_simple_fwd(int dt, const void* q, const void* k, const void* v, void* y, void* lse, long B, long T, long D,
                   int causal, void* ws) { return aft_simple_fwd(DType(dt), q, k, v, y, lse, B, T, D, causal, ws, nullptr); }
long emu_simple_fwd_ws(int dt, long B, long T, long D, int causal) {
    return (long)aft_simple_fwd_workspace_bytes(DType(dt), B, T, D, causal); }
int emu_simple_bwd(int dt, const void* dy, const void* q, const void* k, const void* v, const void* y,
                   const void* lse, void* dq, void* dk, void* dv, long B, long T, long D, int causal, void* ws) {
    return aft_simple_bwd(DType(dt), dy, q, k, v, y, lse, dq, dk, dv, B, T, D, causal, ws, nullptr); }
long emu_simple_bwd_ws(int dt, long B, long T, long D, int causal) {
    return (long)aft_simple_bwd_workspace_bytes(DType(dt), B, T, D, causal); }
int emu_local_fwd(int dt, const void* q, const void* k, const void* v, const void* w, long heads, void* y, void* lse,
                  long B, long T, long D, long window, int causal, void* ws) {
    return aft_local_fwd(DType(dt), q, k, v, w, y, lse, B, T, D, heads, window, causal, ws, nullptr); }
long emu_local_fwd_ws(int dt, long B, long T, long D, long heads, long window, int causal) {
    return (long)aft_local_fwd_workspace_bytes(DType(dt), B, T, D, heads, window, causal); }
int emu_local_bwd(int dt, const void* dy, const void* q, const void* k, const void* v, const void* w, long heads,
                  const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, long B, long T, long D,
                  long window, int causal, void* ws) {
    return aft_local_bwd(DType(dt), dy, q, k, v, w, y, lse, dq, dk, dv, dw, B, T, D, heads, window, causal, ws,
                         nullptr); }
long emu_local_bwd_ws(int dt, long B, long T, long D, long heads, long window, int causal) {
    return (long)aft_local_bwd_workspace_bytes(DType(dt), B, T, D, heads, window, causal); }
int emu_ea_fwd(int dt, const void* l, void* out, void* lse, void* rowsum, double eps, long M, long N, long S,
               void* ws) { return ea_double_norm_fwd(DType(dt), l, out, lse, rowsum, M, N, S, eps, ws, nullptr); }
long emu_ea_fwd_ws(int dt, long M, long N, long S) { return (long)ea_double_norm_fwd_workspace_bytes(DType(dt), M, N, S); }
int emu_ea_bwd(int dt, const void* dout, const void* l, const void* out, const void* lse, const void* rowsum,
               void* dl, long M, long N, long S, void* ws) {
    return ea_double_norm_bwd(DType(dt), dout, l, out, lse, rowsum, dl, M, N, S, ws, nullptr); }
long emu_ea_bwd_ws(int dt, long M, long N, long S) { return (long)ea_double_norm_bwd_workspace_bytes(DType(dt), M, N, S); }
}
'''


def _to_emulation(src: str) -> str:
    """Rewrite CUDA launches `name<targs>\\n<<<cfg>>>(args)` as `emu::launch([=]() { name<targs>(args); }, cfg)`."""
    src = src.replace("#include <cuda_runtime.h>", '#include "emu.h"')
    src = src.replace("int64_t(1) << 22", "int64_t(2)").replace("constexpr int kThreads = 256;",
                                                                 "constexpr int kThreads = 64;")
    out, i = [], 0
    while True:
        j = src.find("<<<", i)
        if j < 0:
            out.append(src[i:])
            break
        p = j - 1
        while src[p].isspace():
            p -= 1
        if src[p] == ">":
            depth = 0
            while True:
                if src[p] == ">":
                    depth += 1
                elif src[p] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                p -= 1
            p -= 1
        while p >= 0 and (src[p].isalnum() or src[p] in "_:"):
            p -= 1
        start = p + 1
        name = src[start:j].strip()
        k = src.find(">>>", j)
        cfg = src[j + 3:k]
        q = src.find("(", k)
        depth, r = 0, q
        while True:
            if src[r] == "(":
                depth += 1
            elif src[r] == ")":
                depth -= 1
                if depth == 0:
                    break
            r += 1
        out.append(src[i:start])
        out.append(f"emu::launch([=]() {{ {name}({src[q + 1:r]}); }}, {cfg})")
        i = r + 1
    return "".join(out)


def _emu_cmd() -> list[str] | None:
    if GXX is None or CUDA_INC is None or not all((CSRC / f).exists() for f in EMU_SOURCES):
        return None
    d = _TMP / "emu"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(CSRC, d / "src")  # the torch-free headers keep their include paths
    (d / "emu.h").write_text(EMU_H)
    (d / "capi.cpp").write_text(EMU_CAPI)
    for f in EMU_SOURCES:
        (d / "src" / f).write_text(_to_emulation((CSRC / f).read_text()))
    srcs = [str(d / "src" / f) for f in EMU_SOURCES if f.endswith(".cu")]
    return [GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-x", "c++", *srcs, "-x", "none",
            str(d / "capi.cpp"), "-I", str(d), "-I", str(d / "src"), "-I", str(CUDA_INC), "-o",
            str(d / "libemu.so")]


@pytest.fixture(scope="module")
def jobs(request):
    """Start the compile jobs the selected tests need, all at once (two run at a time, the emulation library and
    the biggest .cu first); each test waits on its own."""
    if not _JOBS:
        needed = set()
        for item in request.session.items:
            if pathlib.Path(str(item.fspath)).resolve() != pathlib.Path(__file__).resolve():
                continue
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "cu" in params:
                needed.add("nvcc:" + params["cu"].name)
            if "cpp" in params:
                needed.add("glue:" + params["cpp"].name)
            if item.name.startswith("test_emulated"):
                needed.add("emu")
        if "emu" in needed:
            cmd = _emu_cmd()
            if cmd is not None:
                _JOBS["emu"] = _POOL.submit(_run, cmd)
        if NVCC:
            for cu in sorted(CU_FILES, key=lambda f: -f.stat().st_size):
                if "nvcc:" + cu.name in needed:
                    _JOBS["nvcc:" + cu.name] = _POOL.submit(_run, _nvcc_cmd(cu))
        for cpp in GLUE_FILES:
            cmd = _glue_cmd(cpp) if "glue:" + cpp.name in needed else None
            if cmd is not None:
                _JOBS["glue:" + cpp.name] = _POOL.submit(_run, cmd)
    return _JOBS


# ---------------------------------------------------------------- 1. nvcc
@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles_sm80_sm90(cu, jobs):
    res = jobs["nvcc:" + cu.name].result()
    assert res.returncode == 0, f"nvcc failed on {cu.name}:\n{res.stdout}\n{res.stderr}"
    assert (_TMP / (cu.stem + ".o")).stat().st_size > 0


def _local_includes(f: pathlib.Path, seen: set[pathlib.Path]) -> set[pathlib.Path]:
    """f and every csrc header it includes, transitively (#include "..." resolved against csrc/ or f's folder)."""
    if f in seen:
        return seen
    seen.add(f)
    for name in re.findall(r'#\s*include\s*"([^"]+)"', f.read_text()):
        for cand in (CSRC / name, f.parent / name):
            if cand.exists():
                _local_includes(cand.resolve(), seen)
                break
    return seen


def test_cuda_sources_have_no_torch_headers():
    assert CU_FILES, "no CUDA sources found under csrc/*/"
    files: set[pathlib.Path] = set()
    for cu in CU_FILES:
        _local_includes(cu.resolve(), files)
    assert any(f.suffix == ".cuh" for f in files) and any(f.suffix == ".h" for f in files)
    for f in sorted(files):
        bad = re.findall(r'#\s*include\s*[<"]((?:torch|ATen|c10)/[^>"]+)', f.read_text())
        assert not bad, f"{f.relative_to(CSRC)} includes torch headers {bad}"


# ---------------------------------------------------------------- 2. bindings
@pytest.mark.parametrize("cpp", GLUE_FILES, ids=[p.name for p in GLUE_FILES])
def test_glue_syntax(cpp, jobs):
    key = "glue:" + cpp.name
    if key not in jobs:
        pytest.skip("torch CUDA headers, CUDA include dir or g++ not available")
    res = jobs[key].result()
    missing = re.search(r"fatal error: ([\w/.]+): No such file", res.stderr)
    if res.returncode != 0 and missing and not (CSRC / missing.group(1)).exists() and "attnfree" not in missing.group(1):
        pytest.skip(f"system header {missing.group(1)} is not installed here")
    assert res.returncode == 0, f"g++ -fsyntax-only failed on {cpp.name}:\n{res.stderr[-6000:]}"


# ---------------------------------------------------------------- 3. CPU emulation of the kernels
def _dtype_codes() -> dict[torch.dtype, int]:
    """The launcher ABI's DType values, read from csrc/common/dtype.h (the one definition)."""
    body = re.search(r"enum\s+class\s+DType\s*:\s*int\s*\{([^}]*)\}", (CSRC / "common" / "dtype.h").read_text())
    assert body, "enum class DType not found in csrc/common/dtype.h"
    codes = {name: int(value) for name, value in re.findall(r"(\w+)\s*=\s*(\d+)", body.group(1))}
    names = {"Float32": torch.float32, "Float16": torch.float16, "BFloat16": torch.bfloat16, "Float64": torch.float64}
    assert set(codes) == set(names), codes
    return {names[n]: v for n, v in codes.items()}


_DT = _dtype_codes()


class _Emu:
    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))

    @staticmethod
    def _acc(dt):
        return torch.float64 if dt == torch.float64 else torch.float32

    @staticmethod
    def _p(t):
        return ctypes.c_void_p(t.data_ptr())

    @staticmethod
    def _ws(n):
        return torch.full((max(int(n), 1),), 255, dtype=torch.uint8)  # garbage workspace: 0xFF.. = NaN

    def simple_fwd(self, q, k, v, causal):
        L, d = ctypes.c_long, _DT[q.dtype]
        B, T, D = (L(s) for s in q.shape)
        y = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape, float("nan"), dtype=self._acc(q.dtype))
        self.lib.emu_simple_fwd_ws.restype = ctypes.c_long
        ws = self._ws(self.lib.emu_simple_fwd_ws(d, B, T, D, int(causal)))
        rc = self.lib.emu_simple_fwd(d, *map(self._p, (q, k, v, y, lse)), B, T, D, int(causal), self._p(ws))
        assert rc == 0
        return y, lse

    def simple_bwd(self, dy, q, k, v, y, lse, causal):
        L, d = ctypes.c_long, _DT[q.dtype]
        B, T, D = (L(s) for s in q.shape)
        outs = [torch.full_like(q, float("nan")) for _ in range(3)]
        self.lib.emu_simple_bwd_ws.restype = ctypes.c_long
        ws = self._ws(self.lib.emu_simple_bwd_ws(d, B, T, D, int(causal)))
        rc = self.lib.emu_simple_bwd(d, *map(self._p, (dy, q, k, v, y, lse, *outs)), B, T, D, int(causal),
                                     self._p(ws))
        assert rc == 0
        return outs

    def local_fwd(self, q, k, v, w, window, causal):
        L, d = ctypes.c_long, _DT[q.dtype]
        B, T, D = (L(s) for s in q.shape)
        heads = 1 if w.dim() == 2 else w.shape[0]
        y = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape, float("nan"), dtype=self._acc(q.dtype))
        self.lib.emu_local_fwd_ws.restype = ctypes.c_long
        ws = self._ws(self.lib.emu_local_fwd_ws(d, B, T, D, L(heads), L(window), int(causal)))
        rc = self.lib.emu_local_fwd(d, *map(self._p, (q, k, v, w)), L(heads), self._p(y), self._p(lse), B, T, D,
                                    L(window), int(causal), self._p(ws))
        assert rc == 0
        return y, lse

    def local_bwd(self, dy, q, k, v, w, y, lse, window, causal):
        L, d = ctypes.c_long, _DT[q.dtype]
        B, T, D = (L(s) for s in q.shape)
        heads = 1 if w.dim() == 2 else w.shape[0]
        outs = [torch.full_like(q, float("nan")) for _ in range(3)]
        dw = torch.zeros_like(w)  # the binding zero-fills dw (entries outside the band are not written)
        self.lib.emu_local_bwd_ws.restype = ctypes.c_long
        ws = self._ws(self.lib.emu_local_bwd_ws(d, B, T, D, L(heads), L(window), int(causal)))
        rc = self.lib.emu_local_bwd(d, *map(self._p, (dy, q, k, v, w)), L(heads), self._p(y), self._p(lse),
                                    *map(self._p, (*outs, dw)), B, T, D, L(window), int(causal), self._p(ws))
        assert rc == 0
        return (*outs, dw)

    def ea_fwd(self, logits, eps):
        L, d = ctypes.c_long, _DT[logits.dtype]
        *lead, N, S = logits.shape
        M = logits.numel() // (N * S)
        out = torch.full_like(logits, float("nan"))
        lse = torch.full((*lead, 1, S), float("nan"), dtype=self._acc(logits.dtype))
        rowsum = torch.full((*lead, N, 1), float("nan"), dtype=self._acc(logits.dtype))
        self.lib.emu_ea_fwd_ws.restype = ctypes.c_long
        ws = self._ws(self.lib.emu_ea_fwd_ws(d, L(M), L(N), L(S)))
        rc = self.lib.emu_ea_fwd(d, *map(self._p, (logits, out, lse, rowsum)), ctypes.c_double(eps), L(M), L(N),
                                 L(S), self._p(ws))
        assert rc == 0
        return out, lse, rowsum

    def ea_bwd(self, dout, logits, out, lse, rowsum):
        L, d = ctypes.c_long, _DT[logits.dtype]
        N, S = logits.shape[-2:]
        M = logits.numel() // (N * S)
        dl = torch.full_like(logits, float("nan"))
        self.lib.emu_ea_bwd_ws.restype = ctypes.c_long
        ws = self._ws(self.lib.emu_ea_bwd_ws(d, L(M), L(N), L(S)))
        rc = self.lib.emu_ea_bwd(d, *map(self._p, (dout, logits, out, lse, rowsum, dl)), L(M), L(N), L(S),
                                 self._p(ws))
        assert rc == 0
        return dl


@pytest.fixture(scope="module")
def emu(jobs):
    if "emu" not in jobs:
        pytest.skip("g++ or the CUDA include dir not available for the CPU emulation")
    res = jobs["emu"].result()
    assert res.returncode == 0, f"emulation build failed:\n{res.stderr[-6000:]}"
    return _Emu(_TMP / "emu" / "libemu.so")


sys.path.insert(0, str(ROOT / "tests"))  # tests/common importable as `common`, as in conftest.py
from common import oracles  # noqa: E402


def _lse_oracle(k, wfull, causal):
    B, T, D = k.shape
    lg = oracles._bias_per_channel(wfull.double(), D)[None] + k.double()[:, None]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        lg = lg.masked_fill(mask[None, :, :, None], float("-inf"))
    return torch.logsumexp(lg, dim=2)


def _grads(fn, inputs, dy):
    xs = [x.detach().double().requires_grad_(True) for x in inputs]
    return torch.autograd.grad(fn(*xs), xs, dy.double())


def _err(a, b):
    """max-abs error relative to max(|reference|, 1) (inputs are O(1))."""
    assert torch.isfinite(a).all(), "non-finite output"
    return ((a.double() - b.double()).abs().max() / max(b.double().abs().max().item(), 1.0)).item()


_TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
_SHAPES = [(2, 13, 5), (1, 1, 1), (1, 37, 3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", _SHAPES)
def test_emulated_aft_simple(emu, dtype, causal, shape):
    g = torch.Generator().manual_seed(1)
    q, k, v, dy = (torch.randn(*shape, generator=g, dtype=dtype) for _ in range(4))
    k = k * 3
    y, lse = emu.simple_fwd(q, k, v, causal)
    tol = _TOL[dtype]
    assert _err(y, oracles.aft_simple(q, k, v, causal)) < tol
    assert _err(lse, _lse_oracle(k, torch.zeros(shape[1], shape[1], dtype=torch.float64), causal)) < tol
    grads = emu.simple_bwd(dy, q, k, v, y, lse, causal)
    ref = _grads(lambda a, b, c: oracles.aft_simple(a, b, c, causal), (q, k, v), dy)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref):
        assert _err(a, b) < tol, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape,window,heads", [((2, 13, 4), 1, 0), ((2, 13, 4), 3, 2), ((1, 37, 3), 5, 3),
                                                ((1, 7, 2), 100, 1), ((1, 1, 1), 2, 0), ((3, 9, 40), 2, 2)])
def test_emulated_aft_local(emu, dtype, causal, shape, window, heads):
    g = torch.Generator().manual_seed(2)
    q, k, v, dy = (torch.randn(*shape, generator=g, dtype=dtype) for _ in range(4))
    T = shape[1]
    w = torch.randn(T, T, generator=g, dtype=dtype) if heads == 0 else torch.randn(heads, T, T, generator=g,
                                                                                   dtype=dtype)
    tol = _TOL[dtype]
    y, lse = emu.local_fwd(q, k, v, w, window, causal)
    assert _err(y, oracles.aft_local(q, k, v, w, window, causal)) < tol
    assert _err(lse, _lse_oracle(k, oracles.local_bias(w.double(), window), causal)) < tol
    grads = emu.local_bwd(dy, q, k, v, w, y, lse, window, causal)
    ref = _grads(lambda a, b, c, ww: oracles.aft_local(a, b, c, ww, window, causal), (q, k, v, w), dy)
    for name, a, b in zip(("dq", "dk", "dv", "dw"), grads, ref):
        assert _err(a, b) < tol, name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [1e-9, 0.0])
@pytest.mark.parametrize("shape", [(3, 7, 5), (1, 1), (2, 40, 33), (130, 3)])
def test_emulated_ea_double_norm(emu, dtype, shape, eps):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*shape, generator=g, dtype=dtype) * 3
    dout = torch.randn(*shape, generator=g, dtype=dtype)
    out, lse, rowsum = emu.ea_fwd(logits, eps)
    tol = _TOL[dtype]
    assert _err(out, oracles.ea_double_norm(logits, eps)) < tol
    assert _err(lse, torch.logsumexp(logits.double(), dim=-2, keepdim=True)) < tol
    p = torch.softmax(logits.double(), dim=-2)
    assert _err(rowsum, p.sum(-1, keepdim=True) + eps) < tol
    dl = emu.ea_bwd(dout, logits, out, lse, rowsum)
    (ref,) = _grads(lambda a: oracles.ea_double_norm(a, eps), (logits,), dout)
    assert _err(dl, ref) < tol


@pytest.mark.parametrize("eps", [1e-9, 0.0])
def test_emulated_ea_adversarial(emu, eps):
    """|logits| up to 1e4 (a row whose every p underflows): finite, matches the python reference path."""
    from attnfree_ext.ops.ea_double_norm.reference import ea_double_norm_bwd_ref, ea_double_norm_fwd_ref

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 9, 6, generator=g) * 1e4
    logits[0, 3] = -1e4  # this row's p all underflow
    dout = torch.randn(2, 9, 6, generator=g)
    out, lse, rowsum = emu.ea_fwd(logits, eps)
    ro, rl, rr = ea_double_norm_fwd_ref(logits, eps)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and torch.isfinite(rowsum).all()
    assert (out - ro).abs().max() < 1e-5 and (lse - rl).abs().max() <= 1e-6 * rl.abs().max()
    dl = emu.ea_bwd(dout, logits, out, lse, rowsum)
    ref = ea_double_norm_bwd_ref(dout, logits, ro, rl, rr)
    assert torch.isfinite(dl).all() and (dl - ref).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_low_precision_two_x_rule(emu, dtype):
    """fp16/bf16 kernels (fp32 math) vs the float64 oracle: at most 2x the error of eager PyTorch in that dtype."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 29, 6, generator=g).to(dtype) for _ in range(3))
    w = torch.randn(29, 29, generator=g).to(dtype)

    def eager_local(q, k, v, w, window, causal):  # plain PyTorch in the low dtype
        lg = oracles.local_bias(w, window)[None, :, :, None] + k[:, None]
        if causal:
            lg = lg.masked_fill(torch.ones(29, 29, dtype=torch.bool).triu(1)[None, :, :, None], float("-inf"))
        return torch.sigmoid(q) * (torch.softmax(lg.float(), dim=2).to(dtype) * v[:, None]).sum(2)

    for causal in (False, True):
        ref = oracles.aft_local(q, k, v, w, 4, causal)
        y, _ = emu.local_fwd(q, k, v, w, 4, causal)
        e_ours = (y.double() - ref).abs().max().item()
        e_eager = (eager_local(q, k, v, w, 4, causal).double() - ref).abs().max().item()
        assert e_ours <= 2 * e_eager + 1e-3, (e_ours, e_eager)
        ref = oracles.aft_simple(q, k, v, causal)
        y, _ = emu.simple_fwd(q, k, v, causal)
        e_eager = (eager_local(q, k, v, torch.zeros_like(w), 1, causal).double() - ref).abs().max().item()
        assert (y.double() - ref).abs().max().item() <= 2 * e_eager + 1e-3


@pytest.mark.parametrize("causal", [False, True])
def test_emulated_adversarial_numerics(emu, causal):
    """|k| and |w| up to 1e4 and a causal late spike (> 88 above every earlier key): finite outputs and grads."""
    T = 40
    g = torch.Generator().manual_seed(5)
    q, v, dy = (torch.randn(1, T, 3, generator=g) for _ in range(3))
    k = torch.randn(1, T, 3, generator=g)
    k[0, :, 0] = torch.linspace(-1e4, 1e4, T)
    k[0, 30, 1] = 500.0  # late spike
    k[0, :, 2] = -1e4
    y, lse = emu.simple_fwd(q, k, v, causal)
    assert _err(y, oracles.aft_simple(q, k, v, causal)) < 1e-5
    for a in emu.simple_bwd(dy, q, k, v, y, lse, causal):
        assert torch.isfinite(a).all()
    w = torch.randn(T, T, generator=g) * 1e4
    y, lse = emu.local_fwd(q, k, v, w, 3, causal)
    assert _err(y, oracles.aft_local(q, k, v, w, 3, causal)) < 1e-5
    for a in emu.local_bwd(dy, q, k, v, w, y, lse, 3, causal):
        assert torch.isfinite(a).all()
