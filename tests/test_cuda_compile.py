"""CUDA kernels without a GPU: nvcc compile checks, binding syntax checks, and a CPU emulation of the kernels.

1. Every csrc/<op>/*.cu compiles with nvcc for sm_80 and sm_90, and for sm_75 (skipped only when nvcc is not on
   PATH), and no kernel source or header it includes pulls in a torch header.
2. Every CUDA binding csrc/<op>/<op>_cuda.cpp passes `g++ -fsyntax-only` against torch's headers + the CUDA
   headers (the CPU wheel ships c10/cuda and ATen/cuda headers but not the generated
   c10/cuda/impl/cuda_cmake_macros.h, which is stubbed in a temp dir; a binding needing a CUDA library header
   absent here, e.g. cusparse.h, is skipped).
3. The kernels themselves run on the CPU under the emulation harness (csrc/common/emulation, the `emulation`
   path of tests/common/paths.py): no source rewriting here.
Compile jobs run two at a time in a thread pool (2 cores); the whole file stays well under 3 minutes.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*/*.cu"))
GLUE_FILES = sorted(CSRC.glob("*/*_cuda.cpp"))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
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
def _nvcc_cmd(cu: pathlib.Path, archs: tuple[int, ...] = (80, 90)) -> list[str]:
    out = _TMP / (cu.stem + "".join(f"_sm{a}" for a in archs) + ".o")
    cmd = [NVCC, "-std=c++17", "-c", "-Xptxas", "-v"]  # -v: per-function resource lines (test_no_local_memory)
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return cmd + ["-I", str(CSRC), str(cu), "-o", str(out)]


# nvcc job kinds: test function -> (job key prefix, architectures)
_NVCC_KINDS = {
    "test_nvcc_compiles_sm80_sm90": ("nvcc:", (80, 90)),
    "test_no_local_memory": ("nvcc:", (80, 90)),  # reads the ptxas lines of the same job
    "test_nvcc_compiles_sm75": ("nvcc75:", (75,)),
}


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


@pytest.fixture(scope="module")
def jobs(request):
    """Start the compile jobs the selected tests need, all at once (two run at a time, the biggest .cu first);
    each test waits on its own."""
    if not _JOBS:
        needed = set()
        for item in request.session.items:
            if pathlib.Path(str(item.fspath)).resolve() != pathlib.Path(__file__).resolve():
                continue
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "cu" in params and item.originalname in _NVCC_KINDS:
                needed.add(_NVCC_KINDS[item.originalname][0] + params["cu"].name)
            if "cpp" in params:
                needed.add("glue:" + params["cpp"].name)
        if NVCC:
            for prefix, archs in _NVCC_KINDS.values():
                for cu in sorted(CU_FILES, key=lambda f: -f.stat().st_size):
                    if prefix + cu.name in needed and prefix + cu.name not in _JOBS:
                        _JOBS[prefix + cu.name] = _POOL.submit(_run, _nvcc_cmd(cu, archs))
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
    assert (_TMP / (cu.stem + "_sm80_sm90.o")).stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles_sm75(cu, jobs):
    """Below sm_80 the architecture-specific code (bf16 / tf32 wmma) is compiled out (`__CUDA_ARCH__ >= 800`
    guards; the launchers fall back to the per-element kernels), so every .cu still builds for sm_75."""
    res = jobs["nvcc75:" + cu.name].result()
    assert res.returncode == 0, f"nvcc -arch=sm_75 failed on {cu.name}:\n{res.stdout}\n{res.stderr}"
    assert (_TMP / (cu.stem + "_sm75.o")).stat().st_size > 0


CLUSTER_CU = ROOT / "tests" / "emulation" / "kernels" / "cluster.cu"


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_nvcc_compiles_cluster_helpers():
    """device_compat.cuh's thread-block cluster helpers (ATTNFREE_LAUNCH_CLUSTER, cluster_ctarank, cluster_num_ctas,
    cluster_sync, cluster_map_shared), used by the harness's cluster self-test kernels, compile for sm_80 and sm_90:
    to the cluster instructions on sm_90, to a trap on sm_80; the launch goes through cudaLaunchKernelEx."""
    res = _run(_nvcc_cmd(CLUSTER_CU))
    assert res.returncode == 0, f"nvcc failed on {CLUSTER_CU.name}:\n{res.stdout}\n{res.stderr}"
    obj = _TMP / (CLUSTER_CU.stem + "_sm80_sm90.o")
    syms = _run(["nm", "-C", str(obj)])
    assert syms.returncode != 0 or "cudaLaunchKernelExC" in syms.stdout
    sm90 = ["barrier.cluster.arrive.release", "barrier.cluster.wait.acquire", "mapa.u64", "%cluster_ctarank"]
    for arch, present, absent in ((90, sm90 + ["%cluster_nctarank"], ["trap;"]), (80, ["trap;"], sm90)):
        ptx = _TMP / f"{CLUSTER_CU.stem}_sm{arch}.ptx"
        cmd = [NVCC, "-std=c++17", "-ptx", f"-arch=sm_{arch}", "-I", str(CSRC), str(CLUSTER_CU), "-o", str(ptx)]
        res = _run(cmd)
        assert res.returncode == 0, f"nvcc -ptx -arch=sm_{arch} failed:\n{res.stderr}"
        text = ptx.read_text()
        assert all(p in text for p in present), (arch, [p for p in present if p not in text])
        assert not any(a in text for a in absent), (arch, [a for a in absent if a in text])


# Kernels whose per-thread state must live in registers: ptxas must give them a 0-byte stack frame (no local
# memory: no spills, no address-taken arrays) on every architecture of test_nvcc_compiles_sm80_sm90.
NO_STACK_KERNELS = {
    "aft_full.cu": (
        "fwd_tc_kernel",
        "fwd_tc_cluster_kernel",
        "bwd_kv_tc_kernel",
        "bwd_w_tc_kernel",
        "bwd_kv_kernel",
        "bwd_w_kernel",
        "bwd_uv_kernel",
    ),
    "aft_local_tc.cu": ("local_fwd_tc_kernel", "tile_stats_kernel"),
    "ea_double_norm.cu": ("ea_fwd_cluster_kernel",),
}


def ptxas_stack_frames(text: str) -> list[tuple[str, str, int]]:
    """(architecture, mangled function, stack-frame bytes) for every function of `nvcc -Xptxas -v` output."""
    out, arch, pending = [], "?", None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            arch = m.group(2)
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            pending = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame", line)
        if m and pending is not None:
            out.append((arch, pending, int(m.group(1))))
            pending = None
    return out


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("cu", [c for c in CU_FILES if c.name in NO_STACK_KERNELS], ids=lambda c: c.name)
def test_no_local_memory(cu, jobs):
    """ptxas reports "0 bytes stack frame" for every instantiation of the listed kernels, on sm_80 and sm_90."""
    res = jobs["nvcc:" + cu.name].result()
    assert res.returncode == 0, f"nvcc failed on {cu.name}:\n{res.stderr[-4000:]}"
    frames = ptxas_stack_frames(res.stdout + res.stderr)
    bad = []
    for name in NO_STACK_KERNELS[cu.name]:
        tag = f"{len(name)}{name}I"  # Itanium mangling of the template's name
        for arch in ("sm_80", "sm_90"):
            mine = [(f, n) for a, f, n in frames if a == arch and tag in f]
            assert mine, f"ptxas printed no {name} for {arch}"
            bad += [(arch, f, n) for f, n in mine if n != 0]
    assert not bad, "kernels with a stack frame (local memory):\n" + "\n".join(f"{a} {n} B {f}" for a, f, n in bad)


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
    if (
        res.returncode != 0
        and missing
        and not (CSRC / missing.group(1)).exists()
        and "attnfree" not in missing.group(1)
    ):
        pytest.skip(f"system header {missing.group(1)} is not installed here")
    assert res.returncode == 0, f"g++ -fsyntax-only failed on {cpp.name}:\n{res.stderr[-6000:]}"
