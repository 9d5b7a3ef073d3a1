"""Build and run the project's CUDA kernels on the CPU with the attnfree_emu harness (csrc/common/emulation).

    import emu_runner as emu     # tests/emulation/emu_ops.py builds and calls the project's kernels this way
    lib = emu.build("attnfree_ops", sources=["csrc/aft_simple/aft_simple.cu", "csrc/aft_local/aft_local.cu",
                    "csrc/aft_full/aft_full.cu", "csrc/ea_double_norm/ea_double_norm.cu",
                    "tests/emulation/shims/ops_shim.cpp"], include_dirs=["csrc"], rewrite=False)
    nbytes = lib.raw("emu_aft_simple_fwd_ws", 0, B, T, D, 1)     # dtype 0 = float32 (csrc/common/dtype.h)
    r = lib.call("emu_aft_simple_fwd", 0, emu.In("q", q), emu.In("k", k), emu.In("v", v),
                 emu.Out("y", y), emu.Out("lse", lse), B, T, D, 1, emu.Scratch("workspace", nbytes))
    r.check()                    # raises EmuError (fault, rc != 0, stray write, modified input)
    y, lse = r.outputs["y"], r.outputs["lse"]
    r.counters["bytes_read"], r.counters["sfu_exp"], r.launches[0]["kernel"], ...

build(): every source is compiled as C++ (.cu too) with g++, after the one rewrite g++ needs
(csrc/common/emulation/tools/cu2cpp.py: <<<...>>> launches and `extern __shared__`) unless rewrite=False (the
project's kernels need none: they launch through ATTNFREE_LAUNCH), against the harness headers (shims for
cuda_runtime.h / mma.h) and the CUDA toolkit's own headers for the types (cuda_fp16.h, cuda_bf16.h, driver_types.h);
linked with the harness runtime into one shared library, cached by a content hash under tests/emulation/.build (or
$ATTNFREE_EMU_BUILD_DIR). The files under every include directory and source directory are mirrored (rewritten where
needed) so that relative includes see rewritten headers too.

call(): one launcher call. Arguments: In/Out/InOut(name, tensor) (CPU tensors, registered under `name` as checked
global buffers - In read-only - inside guard zones; Out tensors are poisoned with NaN (integers: 0xFF bytes)
before the call), Scratch(name, nbytes) (a 0xFF-poisoned workspace), Python int (int64_t), float (double),
bool (int), None (null pointer), or ctypes values. After the call: the fault message (kernel, block, thread,
buffer, index), rc, counters (cumulative over the call) and one record per launch; guard zones are checked
(raw-pointer writes out of bounds) and inputs compared with their originals.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EMU_DIR = os.path.join(REPO, "csrc", "common", "emulation")
EMU_INCLUDE = os.path.join(EMU_DIR, "include")
RUNTIME_SRC = os.path.join(EMU_DIR, "src", "runtime.cpp")

sys.path.insert(0, os.path.join(EMU_DIR, "tools"))
import cu2cpp  # noqa: E402

SOURCE_EXTS = (".cu", ".cuh", ".h", ".hpp", ".hh", ".inl", ".cpp", ".cc", ".cxx", ".c")
CXX = os.environ.get("ATTNFREE_EMU_CXX", "g++")
DEFAULT_OPT = os.environ.get("ATTNFREE_EMU_OPT", "-O1")


class EmuError(RuntimeError):
    """A launcher call under the harness failed (fault, error code, stray write, modified input)."""


class EmuUnavailable(RuntimeError):
    """The harness cannot build here (no C++ compiler or no CUDA toolkit headers)."""


# ----------------------------------------------------------------------------------------------- environment
def wrapped_functions() -> list[str]:
    with open(os.path.join(EMU_DIR, "wrapped_functions.txt"), encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def cuda_include_dir() -> Optional[str]:
    """The CUDA toolkit's include directory (only its host headers are used: cuda_fp16.h, cuda_bf16.h, ...)."""
    cands = []
    if os.environ.get("ATTNFREE_EMU_CUDA_INCLUDE"):
        cands.append(os.environ["ATTNFREE_EMU_CUDA_INCLUDE"])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
        try:  # a wrapper script (exec /path/to/cuda/bin/nvcc "$@")
            with open(nvcc, encoding="utf-8", errors="ignore") as f:
                m = re.search(r"(/\S+)/bin/nvcc", f.read(4096))
            if m:
                cands.append(os.path.join(m.group(1), "include"))
        except OSError:
            pass
    cands += ["/usr/local/cuda/include", "/opt/cuda/include", "/usr/include"]
    for c in cands:
        if os.path.isfile(os.path.join(c, "cuda_fp16.h")) and os.path.isfile(os.path.join(c, "driver_types.h")):
            return os.path.abspath(c)
    return None


def available() -> tuple[bool, str]:
    if shutil.which(CXX) is None:
        return False, f"no C++ compiler ({CXX})"
    if cuda_include_dir() is None:
        return False, "no CUDA toolkit headers (cuda_fp16.h); set ATTNFREE_EMU_CUDA_INCLUDE or CUDA_HOME"
    return True, ""


def build_dir() -> str:
    d = os.environ.get("ATTNFREE_EMU_BUILD_DIR") or os.path.join(HERE, ".build")
    os.makedirs(d, exist_ok=True)
    return d


def jobs() -> int:
    try:
        return max(1, int(os.environ.get("ATTNFREE_EMU_JOBS", "2")))
    except ValueError:
        return 2


_compiler_id_cache: Optional[str] = None


def _compiler_id() -> str:
    global _compiler_id_cache
    if _compiler_id_cache is None:
        out = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=False).stdout
        _compiler_id_cache = out.splitlines()[0] if out else CXX
    return _compiler_id_cache


def compile_flags(opt: str = DEFAULT_OPT, defines: Optional[dict] = None, extra: Sequence[str] = ()) -> list[str]:
    """The g++ flags of an emulation build (include dirs for the project sources come on top)."""
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise EmuUnavailable(available()[1])
    flags = [
        "-std=c++17",
        opt,
        "-g0",
        "-fPIC",
        "-x",
        "c++",
        "-DATTNFREE_EMULATION",
        "-Wall",
        "-Wno-unknown-pragmas",
        "-Wno-unused-function",
        "-Wno-unused-variable",
        "-I" + EMU_INCLUDE,
        "-isystem",
        cuda_inc,
        "-include",
        "attnfree_emu/cuda_emulation.h",
    ]
    flags += ["-fno-builtin-" + f for f in wrapped_functions() if not f.startswith("__")]
    for k, v in sorted((defines or {}).items()):
        flags.append(f"-D{k}" if v is None else f"-D{k}={v}")
    flags += list(extra)
    return flags


def link_flags() -> list[str]:
    return ["-shared", "-Wl,-Bsymbolic", "-Wl,-z,defs"] + ["-Wl,--wrap=" + f for f in wrapped_functions()] + ["-lm"]


# ----------------------------------------------------------------------------------------------- building
def _walk(root: str) -> Iterable[str]:
    skip = os.path.realpath(EMU_INCLUDE)
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.realpath(dirpath).startswith(skip):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for fn in filenames:
            if fn.endswith(SOURCE_EXTS):
                yield os.path.join(dirpath, fn)


def _abs(p: str) -> str:
    return os.path.abspath(p if os.path.isabs(p) else os.path.join(REPO, p))


def _harness_files() -> list[str]:
    files = [RUNTIME_SRC, os.path.join(EMU_DIR, "wrapped_functions.txt"), os.path.join(EMU_DIR, "tools", "cu2cpp.py")]
    for dirpath, _, filenames in os.walk(EMU_INCLUDE):
        files += [os.path.join(dirpath, f) for f in filenames]
    return sorted(files)


def _hash_files(h, files: Iterable[str]) -> None:
    for p in files:
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise EmuError(f"{what} failed ({r.returncode}):\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    if (r.stdout or r.stderr) and os.environ.get("ATTNFREE_EMU_VERBOSE", "0") not in ("", "0"):
        sys.stderr.write(f"{what}:\n{r.stdout}{r.stderr}")


def _mirror_path(mirror: str, p: str) -> str:
    return os.path.join(mirror, os.path.abspath(p).lstrip(os.sep))


def _runtime_object(opt: str) -> str:
    flags = compile_flags(opt)
    h = hashlib.sha256()
    h.update(_compiler_id().encode())
    h.update(" ".join(flags).encode())
    _hash_files(h, _harness_files())
    out = os.path.join(build_dir(), f"runtime-{h.hexdigest()[:16]}.o")
    if not os.path.exists(out):
        tmp = out + f".tmp{os.getpid()}"
        _run([CXX] + flags + ["-c", RUNTIME_SRC, "-o", tmp], "compiling the harness runtime")
        os.replace(tmp, out)
    return out


_lib_cache: dict[str, "Library"] = {}
_build_lock = threading.Lock()


def build(
    name: str,
    sources: Sequence[str],
    include_dirs: Sequence[str] = (),
    defines: Optional[dict] = None,
    extra_flags: Sequence[str] = (),
    opt: str = DEFAULT_OPT,
    rewrite: bool = True,
) -> "Library":
    """Compile `sources` (paths relative to the repository root or absolute) into an emulation library.

    rewrite=False compiles the files as they are (no cu2cpp pass): for sources written with ATTNFREE_LAUNCH /
    ATTNFREE_DYNAMIC_SHARED / ATTNFREE_STATIC_SHARED (the project's kernels, csrc/<op>/*.cu); a `<<<` or
    `__shared__` left in them is then a compile error."""
    ok, why = available()
    if not ok:
        raise EmuUnavailable(why)
    srcs = [_abs(s) for s in sources]
    incs = [_abs(d) for d in include_dirs]
    roots = sorted(set(incs) | {os.path.dirname(s) for s in srcs})
    files = sorted({p for r in roots for p in _walk(r)} | set(srcs))
    flags = compile_flags(opt, defines, extra_flags)
    h = hashlib.sha256()
    h.update(_compiler_id().encode())
    h.update(repr((flags, srcs, incs, link_flags(), rewrite)).encode())
    _hash_files(h, _harness_files())
    _hash_files(h, files)
    key = h.hexdigest()[:16]
    with _build_lock:
        if key in _lib_cache:
            return _lib_cache[key]
        out_dir = os.path.join(build_dir(), f"{name}-{key}")
        so = os.path.join(out_dir, f"lib{name}.so")
        if not os.path.exists(so):
            mirror = os.path.join(out_dir, "src")
            os.makedirs(out_dir, exist_ok=True)
            for p in files if rewrite else ():  # mirror every source-like file of the roots, rewritten where needed
                dst = _mirror_path(mirror, p)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                with open(p, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
                new, _, _ = cu2cpp.rewrite(text, p)
                with open(dst, "w", encoding="utf-8", errors="surrogateescape") as f:
                    f.write(new)
            inc_flags = []
            for d in incs:
                inc_flags += ["-I" + (_mirror_path(mirror, d) if rewrite else d)]
            objs = []
            cmds = []
            for s in srcs:
                o = os.path.join(out_dir, os.path.basename(s) + ".o")
                objs.append(o)
                cmds.append([CXX] + flags + inc_flags + ["-c", _mirror_path(mirror, s) if rewrite else s, "-o", o])
            runtime = _runtime_object(opt)
            with ThreadPoolExecutor(max_workers=min(jobs(), len(cmds))) as ex:
                list(ex.map(lambda c: _run(c, f"compiling {c[-3]}"), cmds))
            tmp = so + f".tmp{os.getpid()}"
            _run([CXX] + objs + [runtime, "-o", tmp] + link_flags(), f"linking {name}")
            os.replace(tmp, so)
        lib = Library(so)
        _lib_cache[key] = lib
        return lib


# ----------------------------------------------------------------------------------------------- C API mirror
class Counters(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "launches",
            "blocks",
            "threads",
            "bytes_read",
            "bytes_written",
            "sfu_exp",
            "sfu_log",
            "sfu_rcp",
            "sfu_rsqrt",
            "sfu_sqrt",
            "sfu_trig",
            "sfu_total",
            "mma_ops",
            "mma_flops",
            "barriers",
            "warp_collectives",
            "atomics",
            "memset_bytes",
            "memcpy_bytes",
            "cluster_barriers",
        )
    ]

    def as_dict(self) -> dict:
        return {n: int(getattr(self, n)) for n, _ in self._fields_}


class LaunchRecord(ctypes.Structure):
    _fields_ = [
        ("kernel", ctypes.c_char * 256),
        ("file", ctypes.c_char * 256),
        ("caller", ctypes.c_char * 512),
        ("line", ctypes.c_int32),
        ("grid", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32 * 3),
        ("grid_run", ctypes.c_uint32 * 3),
        ("cluster", ctypes.c_uint32 * 3),
        ("smem_dynamic", ctypes.c_uint64),
        ("error", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("counters", Counters),
    ]

    def as_dict(self) -> dict:
        return {
            "kernel": self.kernel.decode(),
            "file": self.file.decode(),
            "caller": self.caller.decode(),
            "line": int(self.line),
            "grid": tuple(self.grid),
            "block": tuple(self.block),
            "grid_run": tuple(self.grid_run),
            "cluster": tuple(self.cluster),
            "smem": int(self.smem_dynamic),
            "error": int(self.error),
            "counters": self.counters.as_dict(),
        }


ABI_VERSION = 2


# ----------------------------------------------------------------------------------------------- arguments
@dataclasses.dataclass
class In:
    """A read-only input tensor (CPU); a write through gptr faults, a raw write is detected after the call."""

    name: str
    tensor: torch.Tensor


@dataclasses.dataclass
class Out:
    """An output tensor (CPU), poisoned with NaN (0xFF bytes for integers) before the call; the result is
    returned in Result.outputs[name] (the tensor passed in is not modified)."""

    name: str
    tensor: torch.Tensor


@dataclasses.dataclass
class InOut:
    """A tensor read and written by the call (its content is kept); result in Result.outputs[name]."""

    name: str
    tensor: torch.Tensor


@dataclasses.dataclass
class Scratch:
    """A workspace of nbytes bytes (0xFF-poisoned); result bytes in Result.outputs[name] (uint8)."""

    name: str
    nbytes: int


@dataclasses.dataclass
class Result:
    rc: int
    fault: Optional[str]
    fault_code: int
    problems: list
    counters: dict
    launches: list
    outputs: dict

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.fault and not self.problems

    def error_text(self) -> str:
        parts = []
        if self.rc != 0:
            parts.append(f"launcher returned {self.rc}")
        if self.fault:
            parts.append(self.fault)
        parts += self.problems
        return "; ".join(parts)

    def check(self) -> "Result":
        if not self.ok:
            raise EmuError(self.error_text())
        return self


_GUARD_BYTE = 0xA5


class _Buf:
    def __init__(self, name: str, nbytes: int, guard: int):
        self.name = name
        self.nbytes = nbytes
        self.guard = guard
        self.flat = torch.empty(guard + max(nbytes, 1) + guard, dtype=torch.uint8)
        self.flat[:guard] = _GUARD_BYTE
        self.flat[guard + nbytes :] = _GUARD_BYTE
        self.body = self.flat[guard : guard + nbytes]

    def ptr(self) -> int:
        return self.flat.data_ptr() + self.guard

    def guards_intact(self) -> bool:
        g = self.guard
        return bool((self.flat[:g] == _GUARD_BYTE).all()) and bool((self.flat[g + self.nbytes :] == _GUARD_BYTE).all())


def _view(buf: _Buf, like: torch.Tensor) -> torch.Tensor:
    if buf.nbytes == 0:
        return torch.empty(like.shape, dtype=like.dtype)
    return buf.body.view(like.dtype).view(like.shape)


def _poison(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    else:
        t.view(torch.uint8).fill_(0xFF) if t.numel() else None


class Library:
    """A built emulation library: the project's launchers / shims plus the harness C API."""

    def __init__(self, path: str):
        self.path = path
        self._lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2))
        self._lock = threading.Lock()
        L = self._lib
        L.attnfree_emu_abi_version.restype = ctypes.c_int
        if L.attnfree_emu_abi_version() != ABI_VERSION:
            raise EmuError(f"{path}: harness ABI {L.attnfree_emu_abi_version()}, runner expects {ABI_VERSION}")
        L.attnfree_emu_register.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_int]
        L.attnfree_emu_register.restype = ctypes.c_int
        L.attnfree_emu_get_counters.argtypes = [ctypes.POINTER(Counters)]
        L.attnfree_emu_num_launches.restype = ctypes.c_int
        L.attnfree_emu_get_launch.argtypes = [ctypes.c_int, ctypes.POINTER(LaunchRecord)]
        L.attnfree_emu_fault_message.restype = ctypes.c_char_p
        L.attnfree_emu_fault_code.restype = ctypes.c_int
        L.attnfree_emu_set_seed.argtypes = [ctypes.c_uint64]
        L.attnfree_emu_get_seed.restype = ctypes.c_uint64
        L.attnfree_emu_set_schedule.argtypes = [ctypes.c_int]
        L.attnfree_emu_set_grid_cap.argtypes = [ctypes.c_uint64]
        L.attnfree_emu_set_poison.argtypes = [ctypes.c_int]
        L.attnfree_emu_set_allow_unregistered.argtypes = [ctypes.c_int]
        self._sigs: dict[str, tuple] = {}

    def has(self, symbol: str) -> bool:
        return hasattr(self._lib, symbol)

    def signature(self, fn: str, argtypes: Sequence, restype=ctypes.c_int) -> None:
        """Declare the exact C signature of `fn` (otherwise ints go as int64_t, floats as double)."""
        self._sigs[fn] = (list(argtypes), restype)

    # options
    def set_seed(self, seed: int) -> None:
        self._lib.attnfree_emu_set_seed(seed)

    def set_schedule(self, mode: str) -> None:
        self._lib.attnfree_emu_set_schedule(1 if mode == "inorder" else 0)

    def set_grid_cap(self, cap: int) -> None:
        self._lib.attnfree_emu_set_grid_cap(cap)

    def set_poison(self, on: bool) -> None:
        self._lib.attnfree_emu_set_poison(int(on))

    def raw(self, fn: str, *args, restype=ctypes.c_uint64):
        """Call a plain C function (e.g. a workspace-size query) without the harness bookkeeping."""
        f = getattr(self._lib, fn)
        f.restype = restype
        f.argtypes = None
        with self._lock:
            return f(*[self._scalar(a) for a in args])

    @staticmethod
    def _scalar(a):
        if isinstance(a, bool):
            return ctypes.c_int(int(a))
        if isinstance(a, int):
            return ctypes.c_int64(a)
        if isinstance(a, float):
            return ctypes.c_double(a)
        if a is None:
            return ctypes.c_void_p(None)
        return a

    def call(
        self, fn: str, *args: Any, seed: Optional[int] = None, guard_bytes: int = 4096, check_inputs: bool = True
    ) -> Result:
        f = getattr(self._lib, fn)
        sig = self._sigs.get(fn)
        if sig:
            f.argtypes, f.restype = sig
        else:
            f.argtypes = None
            f.restype = ctypes.c_int
        guard = max(256, (guard_bytes + 255) // 256 * 256)
        with self._lock:
            L = self._lib
            old_seed = None
            if seed is not None:
                old_seed = L.attnfree_emu_get_seed()
                L.attnfree_emu_set_seed(seed)
            L.attnfree_emu_reset()
            cargs = []
            bufs = []  # (kind, name, _Buf, original tensor or None, view)
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor):
                    a = In(f"arg{i}", a)
                if isinstance(a, (In, Out, InOut)):
                    t = a.tensor
                    if t.device.type != "cpu":
                        raise ValueError(f"{a.name}: CPU tensors only")
                    t = t.contiguous()
                    nbytes = t.numel() * t.element_size()
                    b = _Buf(a.name, nbytes, guard)
                    v = _view(b, t)
                    if isinstance(a, Out):
                        _poison(v)
                    elif nbytes:
                        v.copy_(t)
                    L.attnfree_emu_register(
                        ctypes.c_void_p(b.ptr()), nbytes, a.name.encode(), 0 if isinstance(a, In) else 1
                    )
                    bufs.append((type(a).__name__, a.name, b, t if isinstance(a, In) else None, v))
                    cargs.append(ctypes.c_void_p(b.ptr()))
                elif isinstance(a, Scratch):
                    b = _Buf(a.name, int(a.nbytes), guard)
                    b.body.fill_(0xFF)
                    L.attnfree_emu_register(ctypes.c_void_p(b.ptr()), int(a.nbytes), a.name.encode(), 1)
                    bufs.append(("Scratch", a.name, b, None, b.body))
                    cargs.append(ctypes.c_void_p(b.ptr()))
                else:
                    cargs.append(self._scalar(a))
            rc = int(f(*cargs))
            msg = L.attnfree_emu_fault_message().decode(errors="replace")
            code = int(L.attnfree_emu_fault_code())
            c = Counters()
            L.attnfree_emu_get_counters(ctypes.byref(c))
            launches = []
            for i in range(L.attnfree_emu_num_launches()):
                rec = LaunchRecord()
                L.attnfree_emu_get_launch(i, ctypes.byref(rec))
                launches.append(rec.as_dict())
            if old_seed is not None:
                L.attnfree_emu_set_seed(old_seed)
        problems = []
        outputs = {}
        for kind, name, b, orig, v in bufs:
            if not b.guards_intact():
                problems.append(
                    f"write out of bounds of buffer '{name}' (its guard bytes were modified: a "
                    f"raw-pointer store past the buffer)"
                )
            if kind == "In" and check_inputs and orig is not None and orig.numel():
                if not torch.equal(v.reshape(-1).view(torch.uint8), orig.reshape(-1).view(torch.uint8)):
                    problems.append(f"input buffer '{name}' was modified by the call")
            if kind != "In":
                outputs[name] = v.clone()
        return Result(
            rc=rc,
            fault=msg or None,
            fault_code=code,
            problems=problems,
            counters=c.as_dict(),
            launches=launches,
            outputs=outputs,
        )


# ----------------------------------------------------------------------------------------------- numerics helpers
def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """wmma::__float_to_tf32 (cvt.rna.tf32.f32) on a float32 tensor, bit-exact."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    u = torch.where(finite, u + 0x1000, u) & 0xFFFFE000
    u = torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)
    return u.view(torch.float32)


def truncate_tf32(x: torch.Tensor) -> torch.Tensor:
    """What the tensor core reads from an unconverted fp32 operand: the low 13 bits cleared."""
    u = x.contiguous().view(torch.int32) & ~0x1FFF
    return u.view(torch.float32)


def fp32_gemm_tolerance(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Bound for fp32 accumulation of exact products in k order: k * 2^-24 * (|a| @ |b|) (+ tiny)."""
    return k * 2.0**-24 * (a.abs().double() @ b.abs().double()) + 1e-30


__all__ = [
    "build",
    "available",
    "Library",
    "Result",
    "In",
    "Out",
    "InOut",
    "Scratch",
    "EmuError",
    "EmuUnavailable",
    "compile_flags",
    "link_flags",
    "cuda_include_dir",
    "round_tf32",
    "truncate_tf32",
    "fp32_gemm_tolerance",
    "wrapped_functions",
]
