"""Kernel sources, their template instantiations, and the two compilers that consume them.

- :func:`load_shim` builds the ``.cu`` files as C++ for the CPU (``cuda_shim.h`` + g++), caches
  the shared library, loads it with ctypes and returns a :class:`ShimModule` whose ``launch``
  takes the same ``(name, grid, block, args)`` as a ``cupy.RawKernel`` call and insists on
  exactly typed scalars.
- :func:`nvrtc_compile` compiles the same source with NVRTC (``cuda.bindings.nvrtc``) for a
  GPU architecture without needing a GPU (used by the tests and the GPU check).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import itertools
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

KERNEL_DIR = Path(__file__).resolve().parent
# One translation unit, in this order: spike_coding.cu uses neuron.cu's helpers.
CU_FILES = ("neuron.cu", "propagate.cu", "spike_coding.cu")
SHIM_HEADER = "cuda_shim.h"
# Storage types: torch dtype name -> the kernels' C type. Half precisions compute in float
# (ACC), double in double; spikes may also be stored as one byte (SPIKE_BYTE).
CTYPES = {"float32": "float", "float64": "double", "bfloat16": "hl::bf16", "float16": "hl::f16"}
ACC = {"float32": "float32", "float64": "float64", "bfloat16": "float32", "float16": "float32"}
SPIKE_BYTE = "unsigned char"
_DTYPE_OF_C = {**{c: d for d, c in CTYPES.items()}, SPIKE_BYTE: "uint8"}

# Compiler flags for the CPU build. -ffp-contract=off keeps a * b + c as two roundings, as in
# torch's eager CPU kernels, so spikes match a torch loop bit for bit.
# SHIM_TILE: neurons per CPU tile (lif_*_tile kernels); 1024 floats = 4 KiB per row segment.
SHIM_TILE = 1024
# The kernels' instantiations are split over this many translation units, compiled side by
# side and linked into one library: a cold build (about a minute of CPU) then uses both cores
# of a 2-core machine, where make test's other process would only wait for it.
SHIM_PARTS = 2
SHIM_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fopenmp",
              "-std=c++17", "-fPIC", "-shared", f"-DHL_TILE={SHIM_TILE}")
# The AddressSanitizer build (tests only): -O0 -g1 compiles the 208 instantiations in about
# 8 s instead of 110 s at -O1 -g (2-core machine); -O0 drops no memory access ASan checks,
# and -g1 keeps the line tables its reports need to name the file and line.
ASAN_FLAGS = ("-O0", "-g1", "-fsanitize=address", "-fno-omit-frame-pointer",
              "-ffp-contract=off", "-fopenmp", "-std=c++17", "-fPIC", "-shared",
              f"-DHL_TILE={SHIM_TILE}")


class KernelCompileError(RuntimeError):
    """A kernel source failed to compile; the message carries the compiler's log."""


def _bits(n: int) -> list[tuple[int, ...]]:
    return list(itertools.product((0, 1), repeat=n))


def _lif_bwd_bits() -> list[tuple[int, ...]]:
    """(DYN, RESET, DETACH, SURR) of the LIF backward: the snntorch dynamics (DYN = 1) are
    always detached, so only DETACH = 1 is instantiated for them."""
    return [b for b in _bits(4) if not (b[0] == 1 and b[2] == 0)]


def gpu_kernel_names() -> list[str]:
    """Name expressions of every GPU kernel instantiation (as NVRTC/CuPy spell them)."""
    names = []
    for c in CTYPES.values():
        names += [f"hl::lif_fwd<{c},{o},{d},{r}>" for o in (c, SPIKE_BYTE) for d, r in _bits(2)]
        names += [f"hl::lif_bwd<{c},{d},{r},{dt},{sg}>" for d, r, dt, sg in _lif_bwd_bits()]
        names += [f"hl::spike_matmul_{k}<{c},{p}>" for k in ("fwd", "grad_w")
                  for p in (c, SPIKE_BYTE)]
        names += [f"hl::sc_fwd<{c},{sg}>" for (sg,) in _bits(1)]
    return names


def cpu_kernel_names() -> list[str]:
    """Name expressions of the CPU-only tile kernels (compiled only by the shim)."""
    names = []
    for c in CTYPES.values():
        names += [f"hl::lif_fwd_tile<{c},{o},{d},{r}>" for o in (c, SPIKE_BYTE)
                  for d, r in _bits(2)]
        names += [f"hl::lif_bwd_tile<{c},{d},{r},{dt},{sg}>"
                  for d, r, dt, sg in _lif_bwd_bits()]
        names += [f"hl::spike_matmul_{k}_rows<{c},{p}>" for k in ("fwd", "grad_w")
                  for p in (c, SPIKE_BYTE)]
        names += [f"hl::sc_fwd_rows<{c},{sg}>" for (sg,) in _bits(1)]
    return names


# Parameters of each kernel, mirrored from the .cu files: F = the storage type (the first
# template argument), A = its accumulation type (float32 for the half types), O = the second
# template argument (the spike storage of lif_fwd and spike_matmul). The launchers check
# scalars against this table on every backend; a test checks it against the signatures the
# C++ compiler derives from the sources, so the two cannot drift apart.
_PARAMS = {
    "lif_fwd": "F*,O*,int32,int64,A,A",  # x, s, T, N, beta, theta
    # x, gs, gx, checkpoints ((T - 1) // 16 rows of N, in A), T, N, beta, theta, sa, sb
    "lif_bwd": "F*,F*,F*,A*,int32,int64,A,A,A,A",
    "spike_matmul_fwd": "O*,F*,F*,int32,int32,int32",  # S, W, out, M, K, N
    "spike_matmul_grad_w": "O*,F*,F*,int32,int32,int32",  # S, grad_out, grad_W, M, K, N
    # v1, G, V, P, R, r, spk, dF, dsdu, M, N, T, theta, delta, -delta, delta^2/2, sa, sb, save
    "sc_fwd": "F*,F*,A*,int32*,A*,F*,uint8*,F*,F*,int32,int32,int32,A,A,A,A,A,A,int32",
}
_PARAMS["lif_fwd_tile"] = _PARAMS["lif_fwd"]
_PARAMS["lif_bwd_tile"] = _PARAMS["lif_bwd"]
_PARAMS["spike_matmul_fwd_rows"] = _PARAMS["spike_matmul_fwd"]
_PARAMS["spike_matmul_grad_w_rows"] = _PARAMS["spike_matmul_grad_w"]
_PARAMS["sc_fwd_rows"] = _PARAMS["sc_fwd"]


def kernel_signature(name: str) -> tuple[str, ...]:
    """Parameter types of kernel ``name``, e.g. ('float32*', ..., 'int32', 'int64', ...)."""
    base = name.split("<")[0].removeprefix("hl::")
    targs = name[name.index("<") + 1:-1].split(",")
    f = _DTYPE_OF_C[targs[0]]
    o = _DTYPE_OF_C.get(targs[1], "") if len(targs) > 1 else ""
    types = {"F": f, "A": ACC[f], "O": o}
    return tuple(types.get(p.rstrip("*"), p.rstrip("*")) + "*" * p.endswith("*")
                 for p in _PARAMS[base].split(","))


def check_scalar_args(name: str, args: tuple) -> None:
    """Raise TypeError unless every scalar in ``args`` has exactly the C type of its parameter
    (numpy.int32 for int, numpy.int64 for long long, numpy.float32 for float...)."""
    sig = kernel_signature(name)
    if len(args) != len(sig):
        raise TypeError(f"{name} takes {len(sig)} arguments ({', '.join(sig)}), got {len(args)}")
    for j, (a, p) in enumerate(zip(args, sig)):
        if not p.endswith("*") and type(a) is not _SCALARS[p][0]:
            raise TypeError(
                f"{name} argument {j} (declared {p}): expected numpy.{_SCALARS[p][0].__name__}, "
                f"got {type(a).__name__} (CuPy would pass a Python int as int64)")


def combined_source() -> str:
    """All .cu files as one translation unit, with #line markers so errors name the file."""
    parts = []
    for name in CU_FILES:
        text = (KERNEL_DIR / name).read_text()
        parts.append(f'#line 1 "{name}"\n{text}')
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------
# CPU shim
# ----------------------------------------------------------------------------------------

_SCALARS = {
    "float32": (np.float32, ctypes.c_float),
    "float64": (np.float64, ctypes.c_double),
    "int32": (np.int32, ctypes.c_int32),
    "uint32": (np.uint32, ctypes.c_uint32),
    "int64": (np.int64, ctypes.c_int64),
}
_POINTEE = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
            "float16": torch.float16, "int32": torch.int32, "uint8": torch.uint8,
            "int64": torch.int64}


def find_cxx() -> str | None:
    """The C++ compiler the shim uses: $CXX, else g++ on PATH, else None."""
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _cache_dir() -> Path:
    root = os.environ.get("HYBRIDLM_KERNEL_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "hybridlm" / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stub_source(names: list[str], part: int = 0, parts: int = 1) -> str:
    """The C++ stubs of every `parts`-th kernel from `part` on (each part one translation
    unit, compiled side by side); part 0 also says how many kernels there are."""
    lines = [f'#include "{SHIM_HEADER}"'] + [f'#include "{f}"' for f in CU_FILES]
    if part == 0:
        lines.append(f'extern "C" int hl_num_kernels() {{ return {len(names)}; }}')
    for i in range(part, len(names), parts):
        name = names[i]
        lines.append(
            f'extern "C" const char* hl_sig_{i}() {{ static const std::string s = '
            f"hl_shim::signature(&{name}); return s.c_str(); }}")
        lines.append(
            f'extern "C" void hl_launch_{i}(const unsigned* g, const unsigned* b, void** a, '
            f"int par) {{ hl_shim::launch(&{name}, g, b, a, par); }}")
    return "\n".join(lines) + "\n"


def _run_compiler(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise KernelCompileError(
            f"CPU shim build failed ({' '.join(cmd)}):\n{res.stderr[-8000:]}")


def build_shim(flags: tuple[str, ...] = SHIM_FLAGS, cache_dir: Path | None = None,
               parts: int = SHIM_PARTS) -> Path:
    """Compile every kernel (GPU and CPU schedules) into one shared library, from `parts`
    translation units compiled side by side; return its path.

    The library is cached under ``$HYBRIDLM_KERNEL_CACHE`` (default ``~/.cache/hybridlm/
    kernels``) by a hash of the sources, flags and compiler.
    """
    cxx = find_cxx()
    if cxx is None:
        raise KernelCompileError("no C++ compiler found (set $CXX or install g++)")
    names = gpu_kernel_names() + cpu_kernel_names()
    stubs = [_stub_source(names, k, parts) for k in range(parts)]
    h = hashlib.sha256()
    for f in (*CU_FILES, SHIM_HEADER):
        h.update((KERNEL_DIR / f).read_bytes())
    for stub in stubs:
        h.update(stub.encode())
    h.update(" ".join((cxx, *flags)).encode())
    h.update(str(os.path.getmtime(cxx)).encode())
    out_dir = cache_dir or _cache_dir()
    lib = out_dir / f"hl_shim_{h.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    # One builder per library: a second process (make test's other pytest worker, a rank of
    # a multi-process run) waits for the first one's library instead of compiling it again.
    with open(out_dir / f"{lib.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.exists():
            return lib
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            objs = [Path(tmp) / f"hl_shim_{k}.o" for k in range(parts)]
            cmds = []
            for k, (stub, obj) in enumerate(zip(stubs, objs)):
                src = Path(tmp) / f"hl_shim_{k}.cpp"
                src.write_text(stub)
                cmds.append([cxx, *flags, "-c", f"-I{KERNEL_DIR}", str(src), "-o", str(obj)])
            with ThreadPoolExecutor(parts) as pool:
                for done in [pool.submit(_run_compiler, cmd) for cmd in cmds]:
                    done.result()
            tmp_lib = Path(tmp) / lib.name
            _run_compiler([cxx, *flags, *map(str, objs), "-o", str(tmp_lib)])
            os.replace(tmp_lib, lib)  # atomic: a reader never sees a partial file
    return lib


class ShimModule:
    """The kernels compiled for the CPU, launched like ``cupy.RawKernel``.

    ``launch(name, grid, block, args)``: ``grid``/``block`` are int or tuples of up to 3;
    ``args`` follow the kernel's parameters: CPU contiguous torch tensors (or numpy arrays) of
    the exact element type for pointers, and numpy scalars of the exact C type for values
    (``numpy.int32`` for ``int``, ``numpy.int64`` for ``long long``, ``numpy.float32`` for
    ``float``). Anything else raises ``TypeError`` naming the parameter. ``parallel=False``
    runs the blocks on the calling thread (for small launches, where waking OpenMP threads
    costs more than the work).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(path))
        names = gpu_kernel_names() + cpu_kernel_names()
        if self._lib.hl_num_kernels() != len(names):
            raise KernelCompileError(f"{path} does not match the kernel list")
        self.signatures: dict[str, tuple[str, ...]] = {}
        self._fns = {}
        for i, name in enumerate(names):
            sig_fn = getattr(self._lib, f"hl_sig_{i}")
            sig_fn.restype = ctypes.c_char_p
            self.signatures[name] = tuple(sig_fn().decode().split(","))
            fn = getattr(self._lib, f"hl_launch_{i}")
            fn.restype = None
            fn.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [ctypes.c_void_p, ctypes.c_int]
            self._fns[name] = fn

    def launch(self, name: str, grid, block, args: tuple, parallel: bool = True) -> None:
        if name not in self._fns:
            raise KeyError(f"unknown kernel {name!r}")
        sig = self.signatures[name]
        if len(args) != len(sig):
            raise TypeError(f"{name} takes {len(sig)} arguments ({', '.join(sig)}), "
                            f"got {len(args)}")
        holders = []
        for j, (a, p) in enumerate(zip(args, sig)):
            holders.append(_shim_arg(name, j, a, p))
        ptrs = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.addressof(hd) for hd in holders])
        g, b = _dim3(grid), _dim3(block)
        self._fns[name]((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), ptrs, int(parallel))


def _dim3(v) -> tuple[int, int, int]:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or any(int(x) < 1 for x in t):
        raise ValueError(f"bad grid/block dimensions {v!r}")
    return tuple(int(x) for x in t) + (1,) * (3 - len(t))


def _shim_arg(name: str, j: int, a, p: str):
    where = f"{name} argument {j} (declared {p})"
    if p.endswith("*"):
        elem = p[:-1]
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                raise TypeError(f"{where}: tensor is on {a.device}, the shim needs CPU")
            if a.dtype != _POINTEE[elem]:
                raise TypeError(f"{where}: tensor dtype {a.dtype}, expected {_POINTEE[elem]}")
            if not a.is_contiguous():
                raise TypeError(f"{where}: tensor is not contiguous")
            return ctypes.c_void_p(a.data_ptr())
        if isinstance(a, np.ndarray):
            if a.dtype != np.dtype(elem) or not a.flags.c_contiguous:
                raise TypeError(f"{where}: array dtype {a.dtype} / contiguity mismatch")
            return ctypes.c_void_p(a.ctypes.data)
        raise TypeError(f"{where}: expected a tensor, got {type(a).__name__}")
    np_type, c_type = _SCALARS[p]
    if type(a) is not np_type:
        raise TypeError(
            f"{where}: expected numpy.{np_type.__name__}, got {type(a).__name__} "
            f"(scalars must have the exact C type; CuPy would pass a Python int as int64 "
            f"and a Python float as double)")
    return c_type(a.item())


_shim_lock = threading.Lock()
_shim: ShimModule | None = None


def load_shim() -> ShimModule:
    """The process-wide CPU shim module (built on first use, then cached on disk)."""
    global _shim
    with _shim_lock:
        if _shim is None:
            if os.environ.get("HYBRIDLM_SHIM_SANITIZE") == "address":
                # One unit: from a library linked of several objects GCC 12's ASan reports
                # name the function but not the file and line (8 s to compile at -O0 anyway).
                _shim = ShimModule(build_shim(ASAN_FLAGS, parts=1))
            else:
                _shim = ShimModule(build_shim())
        return _shim


# ----------------------------------------------------------------------------------------
# NVRTC (no GPU needed) and nvcc
# ----------------------------------------------------------------------------------------

NVRTC_OPTIONS = ("--std=c++17",)
# Results of nvrtc_compile / nvcc_resource_usage in this process, by (source, arch, options):
# the kernel and PC-step tests check the same compile (each is 10-30 s of CPU).
_compiled_once: dict[tuple, object] = {}


def nvrtc_compile(arch: str = "sm_90", extra_options: tuple[str, ...] = ()) -> dict:
    """Compile every GPU kernel with NVRTC; return {"cubin", "log", "lowered"} (remembered
    for this process: the same source, arch and options compile once).

    Raises :class:`KernelCompileError` with NVRTC's log (file and line) on failure and
    ``ImportError`` when ``cuda.bindings`` is missing.
    """
    key = ("nvrtc", combined_source(), arch, tuple(extra_options))
    if key not in _compiled_once:
        _compiled_once[key] = _nvrtc_compile(arch, extra_options)
    return _compiled_once[key]


def _nvrtc_compile(arch: str, extra_options: tuple[str, ...]) -> dict:
    from cuda.bindings import nvrtc

    def check(res, what):
        err = res[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"{what}: {err}")
        return res[1:] if len(res) > 2 else (res[1] if len(res) == 2 else None)

    src = combined_source().encode()
    prog = check(nvrtc.nvrtcCreateProgram(src, b"hybridlm_kernels.cu", 0, [], []), "create")
    names = gpu_kernel_names()
    try:
        for n in names:
            check(nvrtc.nvrtcAddNameExpression(prog, n.encode()), f"name {n}")
        opts = [f"--gpu-architecture={arch}".encode()]
        opts += [o.encode() for o in (*NVRTC_OPTIONS, *extra_options)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        # NVRTC writes into the buffer: a bytearray, never bytes (an empty log is 1 byte, and
        # b" " * 1 is CPython's shared one-byte object: writing into it broke torch.load)
        log = bytearray(size)
        check(nvrtc.nvrtcGetProgramLog(prog, log), "log")
        log_text = log.decode(errors="replace").rstrip("\x00 \n")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"NVRTC compile for {arch} failed:\n{log_text}")
        size = check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = bytearray(size)
        check(nvrtc.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = {}
        for n in names:
            low = check(nvrtc.nvrtcGetLoweredName(prog, n.encode()), f"lowered {n}")
            lowered[n] = low.decode() if isinstance(low, bytes) else str(low)
        return {"cubin": bytes(cubin), "log": log_text, "lowered": lowered}
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def nvcc_resource_usage(arch: str = "sm_90", nvcc: str | None = None) -> str:
    """Compile every GPU kernel with ``nvcc -cubin -Xptxas -v,-warn-spills``; return ptxas'
    report (registers, spills per kernel; remembered for this process). Raises
    FileNotFoundError without nvcc."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not on PATH")
    key = ("nvcc", combined_source(), arch, nvcc)
    if key not in _compiled_once:
        _compiled_once[key] = _nvcc_resource_usage(arch, nvcc)
    return _compiled_once[key]


def _nvcc_resource_usage(arch: str, nvcc: str) -> str:
    # Taking each instantiation's address in host code makes nvcc emit its device code.
    force = ",\n".join(f"  (void*)&{n}" for n in gpu_kernel_names())
    src = combined_source() + f"\nvoid* hl_force_instantiation[] = {{\n{force}\n}};\n"
    with tempfile.TemporaryDirectory() as tmp:
        cu = Path(tmp) / "hybridlm_kernels.cu"
        cu.write_text(src)
        cmd = [nvcc, "-cubin", f"-arch={arch}", "--std=c++17", "-Xptxas", "-v,-warn-spills",
               str(cu), "-o", str(Path(tmp) / "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise KernelCompileError(f"nvcc failed:\n{res.stderr[-8000:]}")
        return res.stdout + res.stderr
