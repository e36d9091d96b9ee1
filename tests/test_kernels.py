"""Kernel tests, CPU only: the .cu sources compile for GPUs (NVRTC, nvcc) and, through the CPU
shim, match the torch reference, snntorch and SpikingJelly. Each toolchain piece that is
missing skips its tests with the reason."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.kernels import _build, ops
from hybridlm.kernels import reference as ref
from hybridlm.kernels.ops import lif_multistep, spike_matmul

HAVE_CXX = _build.find_cxx() is not None
HAVE_NVRTC = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec(
    "cuda.bindings") is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler ($CXX or g++)")
SHIM_BACKENDS = ("cpu_shim", "cpu_shim_grid")
THETA = 0.7  # not 1.0: a threshold of exactly 1 hid a reset bug once


def _x(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 0.8 + 0.4).requires_grad_()


# ---------------------------------------------------------------------------------------
# GPU compilers (no GPU needed)
# ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_NVRTC, reason="cuda-bindings / nvidia-cuda-nvrtc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_every_kernel(arch):
    res = _build.nvrtc_compile(arch)
    assert res["cubin"][:4] == b"\x7fELF"
    # NVRTC once wrote its empty log into CPython's shared one-byte b" ", and every torch.load
    # in the process failed after it
    assert bytes([32])[0] == 32
    assert set(res["lowered"]) == set(_build.gpu_kernel_names())
    assert "warning" not in res["log"].lower(), res["log"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_no_register_spills(arch):
    report = _build.nvcc_resource_usage(arch)
    n_kernels = report.count("Compiling entry function")
    assert n_kernels == len(_build.gpu_kernel_names())
    assert report.count("0 bytes spill stores, 0 bytes spill loads") == n_kernels, report
    assert report.count("0 bytes stack frame") == n_kernels, report


@pytest.mark.skipif(not HAVE_NVRTC, reason="cuda-bindings / nvidia-cuda-nvrtc not installed")
def test_nvrtc_error_names_file_and_line(monkeypatch):
    src = _build.combined_source().replace("A v = A(0), sp = A(0);", "A v = A(0), sp = oops;", 1)
    monkeypatch.setattr(_build, "combined_source", lambda: src)
    with pytest.raises(_build.KernelCompileError, match=r"neuron\.cu\(\d+\).*oops"):
        _build.nvrtc_compile("sm_90")


# ---------------------------------------------------------------------------------------
# the CPU shim
# ---------------------------------------------------------------------------------------

@needs_cxx
def test_signature_table_matches_compiled_sources():
    shim = _build.load_shim()
    for name, sig in shim.signatures.items():
        assert sig == _build.kernel_signature(name), name


@needs_cxx
def test_shim_insists_on_exact_scalar_types():
    shim = _build.load_shim()
    x = torch.zeros(2, 5)
    s = torch.empty_like(x)
    name = "hl::lif_fwd<float,float,0,0>"
    good = (x, s, np.int32(2), np.int64(5), np.float32(0.9), np.float32(0.7))
    shim.launch(name, 1, 32, good)
    assert torch.equal(s, torch.zeros_like(x))
    for j, bad in ((2, 2), (2, np.int64(2)), (3, 5), (4, 0.9), (4, np.float64(0.9))):
        args = list(good)
        args[j] = bad
        with pytest.raises(TypeError, match=f"argument {j} .*expected numpy"):
            shim.launch(name, 1, 32, tuple(args))
        with pytest.raises(TypeError, match="expected numpy"):  # same check before CuPy
            _build.check_scalar_args(name, tuple(args))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        shim.launch(name, 1, 32, (x.double(), *good[1:]))
    with pytest.raises(TypeError, match="not contiguous"):
        shim.launch(name, 1, 32, (torch.zeros(5, 2).t(), *good[1:]))
    with pytest.raises(TypeError, match="takes 6 arguments"):
        shim.launch(name, 1, 32, good[:-1])


@needs_cxx
def test_shim_build_failure_is_clear(tmp_path, monkeypatch):
    kdir = tmp_path / "k"
    kdir.mkdir()
    for f in (*_build.CU_FILES, _build.SHIM_HEADER):
        shutil.copy(_build.KERNEL_DIR / f, kdir / f)
    text = (kdir / "neuron.cu").read_text()
    (kdir / "neuron.cu").write_text(text.replace("  A gv = A(0);\n",
                                                 "  A gv = A(0);\n  __syncthreads();\n", 1))
    monkeypatch.setattr(_build, "KERNEL_DIR", kdir)
    with pytest.raises(_build.KernelCompileError,
                       match=r"(?s)neuron\.cu:\d+.*HL_SHIM_UNSUPPORTED_syncthreads"):
        _build.build_shim(cache_dir=tmp_path)


@needs_cxx
def test_concurrent_builds_of_one_library_compile_once(tmp_path, monkeypatch):
    # make test's two pytest processes (and the ranks of a run) may ask for the same library
    # at once: the second waits for the first one's build instead of compiling it again.
    import threading
    import time

    compiles = []

    def fake_compiler(cmd, **kw):
        compiles.append(cmd)
        time.sleep(0.3)  # long enough for the other builder to arrive meanwhile
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"library")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(_build.subprocess, "run", fake_compiler)
    libs = []
    threads = [threading.Thread(target=lambda: libs.append(_build.build_shim(cache_dir=tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    links = [cmd for cmd in compiles if "-c" not in cmd]  # one per library built
    assert len(links) == 1 and len(compiles) == _build.SHIM_PARTS + 1
    assert len(libs) == 2 and libs[0] == libs[1] and libs[0].read_bytes() == b"library"


# ---------------------------------------------------------------------------------------
# LIF: kernels vs the torch reference
# ---------------------------------------------------------------------------------------

LIF_CASES = [(d, r, dt, sg) for d in ref.DYNAMICS for r in ref.RESETS for dt in (False, True)
             for sg in ref.SURROGATES if not (d == "snntorch" and dt)]


@needs_cxx
@pytest.mark.parametrize("backend", SHIM_BACKENDS)
@pytest.mark.parametrize("dynamics,reset,detach,surrogate", LIF_CASES)
def test_lif_shim_matches_reference(backend, dynamics, reset, detach, surrogate):
    alpha = 2.0 if surrogate == "atan" else 25.0
    x = _x((8, 3, 437), seed=1)  # N = 1311: not a multiple of the block or the tile
    kw = dict(reset=reset, detach_reset=detach, surrogate=surrogate, alpha=alpha,
              dynamics=dynamics)
    s_ref = ref.lif_multistep_reference(x, 0.9, THETA, **kw)
    s = lif_multistep(x, 0.9, THETA, backend=backend, **kw)
    assert torch.equal(s, s_ref)
    assert 0.1 < s.mean().item() < 0.9
    g = torch.randn_like(s)
    (gx_ref,) = torch.autograd.grad(s_ref, x, g)
    (gx,) = torch.autograd.grad(s, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-5)


@needs_cxx
def test_lif_large_multithreaded_tiles():
    x = _x((32, 100_003), seed=2)
    s_ref = ref.lif_multistep_reference(x, 0.95, 0.5)
    s = lif_multistep(x, 0.95, 0.5, backend="cpu_shim")
    assert torch.equal(s, s_ref)
    g = torch.randn_like(s)
    torch.testing.assert_close(torch.autograd.grad(s, x, g)[0],
                               torch.autograd.grad(s_ref, x, g)[0], rtol=0, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("backend", SHIM_BACKENDS)
@pytest.mark.parametrize("T", [1, 16, 17, 37, 100])
@pytest.mark.parametrize("dynamics,reset,detach", [("standard", "subtract", False),
                                                   ("standard", "zero", False),
                                                   ("standard", "zero", True),
                                                   ("snntorch", "subtract", False),
                                                   ("snntorch", "zero", False)])
def test_lif_backward_recompute_any_T(backend, T, dynamics, reset, detach):
    # The backward recomputes h from x: on the GPU kernels in segments of HL_SEG = 16 steps
    # (checkpoints in gx when T > 16; T = 17, 37 leave a partial last segment), on the CPU
    # tiles in sub-tiles narrower than the tile when T is large (T = 100: 640 of 1024 lanes).
    x = _x((T, 1311), seed=20 + T)
    kw = dict(reset=reset, detach_reset=detach, dynamics=dynamics)
    s_ref = ref.lif_multistep_reference(x, 0.9, THETA, **kw)
    s = lif_multistep(x, 0.9, THETA, backend=backend, **kw)
    assert torch.equal(s, s_ref)
    g = torch.randn_like(s)
    torch.testing.assert_close(torch.autograd.grad(s, x, g)[0],
                               torch.autograd.grad(s_ref, x, g)[0], rtol=0, atol=1e-5)


@needs_cxx
def test_lif_saves_only_x_and_checks_versions():
    # Nothing is allocated for the backward: autograd holds x itself (same storage).
    x = _x((4, 300))
    s = lif_multistep(x, 0.9, THETA, backend="cpu_shim")
    (saved,) = s.grad_fn.saved_tensors
    assert saved.data_ptr() == x.data_ptr() and saved.shape == x.shape
    y = x.detach().clone().requires_grad_()
    s = lif_multistep(y, 0.9, THETA, backend="cpu_shim")
    with torch.no_grad():
        y.add_(1.0)  # h can no longer be recomputed from y: autograd must refuse
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        s.sum().backward()


@needs_cxx
@pytest.mark.parametrize("backend", SHIM_BACKENDS)
@pytest.mark.parametrize("reset", ref.RESETS)
def test_lif_float64_gradients_exact(backend, reset):
    x = _x((37, 257), seed=3, dtype=torch.float64)  # 3 GPU segments, one partial
    s_ref = ref.lif_multistep_reference(x, 0.8, THETA, reset=reset)
    s = lif_multistep(x, 0.8, THETA, reset=reset, backend=backend)
    assert s.dtype == torch.float64 and torch.equal(s, s_ref)
    g = torch.randn_like(s)
    torch.testing.assert_close(torch.autograd.grad(s, x, g)[0],
                               torch.autograd.grad(s_ref, x, g)[0], rtol=0, atol=1e-12)


@needs_cxx
def test_lif_no_grad_and_shapes():
    x = _x((4, 2, 3, 5)).detach()
    s = lif_multistep(x, 0.9, THETA, backend="cpu_shim")
    assert s.shape == x.shape and not s.requires_grad
    assert torch.equal(s, ref.lif_multistep_reference(x, 0.9, THETA))
    e = lif_multistep(torch.zeros(3, 0), 0.9, backend="cpu_shim")
    assert e.shape == (3, 0)


# ---------------------------------------------------------------------------------------
# half precisions (bfloat16, float16) and one-byte spikes
# ---------------------------------------------------------------------------------------

HALF = [torch.bfloat16, torch.float16]
# One rounding of a float32 result to the storage type: half an ulp, relative.
HALF_RTOL = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@needs_cxx
@pytest.mark.parametrize("kind", ["bf16", "f16"])
def test_half_conversions_exact(kind):
    # Every bit pattern of the type loads exactly (W through an identity S comes back as it
    # went in), and float32 sums round to the nearest even (two spikes per row: w_a + w_b
    # is exact in float32, then rounded once), subnormals, overflow and NaN included.
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    bits = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16)
    W = bits.view(dtype).reshape(256, 256).contiguous()
    eye = torch.eye(256, dtype=torch.uint8)
    for backend in SHIM_BACKENDS:
        out = spike_matmul(eye, W, backend=backend, method="event")
        nan = W.isnan()
        assert torch.equal(out[~nan], W[~nan])  # values: the sum turns -0 into +0
        assert out[nan].isnan().all()
    g = torch.Generator().manual_seed(4)
    W = torch.randint(-2 ** 15, 2 ** 15, (512, 64), generator=g).to(torch.int16).view(dtype)
    S = torch.zeros(256, 512, dtype=torch.uint8)
    S[torch.arange(256), torch.arange(256)] = 1
    S[torch.arange(256), torch.arange(256, 512)] = 1
    want = (W[:256].float() + W[256:].float()).to(dtype)
    for backend in SHIM_BACKENDS:
        out = spike_matmul(S, W, backend=backend, method="event")
        ok = ~want.isnan()
        assert torch.equal(out[ok], want[ok])
        assert out[~ok].isnan().all()


@needs_cxx
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", SHIM_BACKENDS)
@pytest.mark.parametrize("dynamics,reset,detach,surrogate", LIF_CASES)
def test_lif_half_matches_float32(dtype, backend, dynamics, reset, detach, surrogate):
    # The kernels keep the membrane in float32: the spikes of a half x are those of the
    # float32 reference on x.float(), exactly; grad_x is the float32 kernel's, rounded once
    # (so within half an ulp of the float32 reference, plus float32's own 1e-5).
    alpha = 2.0 if surrogate == "atan" else 25.0
    x = _x((37, 131), seed=5).detach().to(dtype).requires_grad_()  # 3 segments, 131 = 2*64+3
    kw = dict(reset=reset, detach_reset=detach, surrogate=surrogate, alpha=alpha,
              dynamics=dynamics)
    x32 = x.detach().float().requires_grad_()
    s_ref = ref.lif_multistep_reference(x32, 0.9, THETA, **kw)
    s = lif_multistep(x, 0.9, THETA, backend=backend, **kw)
    assert s.dtype == dtype and torch.equal(s.float(), s_ref)
    g = torch.randn(s.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    (gx,) = torch.autograd.grad(s, x, g)
    (gx_ref,) = torch.autograd.grad(s_ref, x32, g.float())
    s32 = lif_multistep(x32, 0.9, THETA, backend=backend, **kw)
    (gx32,) = torch.autograd.grad(s32, x32, g.float())
    assert gx.dtype == dtype and torch.equal(gx, gx32.to(dtype))
    torch.testing.assert_close(gx.float(), gx_ref, rtol=HALF_RTOL[dtype], atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_lif_half_grad_keeps_subnormals(dtype):
    # The CPU bf16 store takes AVX512-BF16's conversion, which flushes subnormals to zero, and
    # falls back to the exact integer rounding for rows holding one: tiny gradients must come
    # out as the float32 kernel's, rounded once, subnormals included.
    x = _x((37, 131), seed=5).detach().to(dtype).requires_grad_()
    tiny = torch.finfo(dtype).tiny  # the smallest normal
    g = (torch.randn(x.shape, generator=torch.Generator().manual_seed(6)) * tiny).to(dtype)
    x32 = x.detach().float().requires_grad_()
    (gx,) = torch.autograd.grad(lif_multistep(x, 0.9, THETA, backend="cpu_shim"), x, g)
    (gx32,) = torch.autograd.grad(lif_multistep(x32, 0.9, THETA, backend="cpu_shim"), x32,
                                  g.float())
    want = gx32.to(dtype)
    assert ((want != 0) & (want.abs() < tiny)).sum() > want.numel() // 2  # mostly subnormal
    assert torch.equal(gx, want)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=["f32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", SHIM_BACKENDS)
def test_lif_one_byte_spikes(dtype, backend):
    x = _x((20, 3, 77), seed=9).detach().to(dtype)
    s8 = lif_multistep(x, 0.9, THETA, backend=backend, spike_dtype=torch.uint8)
    assert s8.dtype == torch.uint8 and s8.shape == x.shape
    assert torch.equal(s8, lif_multistep(x, 0.9, THETA, backend=backend).to(torch.uint8))
    with torch.no_grad():  # allowed without grad even when x requires it
        assert torch.equal(lif_multistep(x.requires_grad_(), 0.9, THETA, backend=backend,
                                         spike_dtype=torch.uint8), s8)


@needs_cxx
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", SHIM_BACKENDS)
def test_spike_matmul_half_and_one_byte_spikes(dtype, backend):
    # Summed in float32, rounded once: the float32 product of the same values, rounded.
    g = torch.Generator().manual_seed(10)
    S8 = (torch.rand(37, 300, generator=g) < 0.1).to(torch.uint8)
    W = torch.randn(300, 91, generator=g).to(dtype).requires_grad_()
    want = (S8.float() @ W.detach().float()).to(dtype)
    for S in (S8, S8.bool(), S8.to(dtype)):
        out = spike_matmul(S, W, backend=backend, method="event")
        assert out.dtype == dtype
        torch.testing.assert_close(out, want, rtol=HALF_RTOL[dtype], atol=1e-6)
    gout = torch.randn(out.shape, generator=g).to(dtype)
    (gW,) = torch.autograd.grad(spike_matmul(S8, W, backend=backend, method="event"), W, gout)
    torch.testing.assert_close(gW, (S8.float().t() @ gout.float()).to(dtype),
                               rtol=HALF_RTOL[dtype], atol=1e-6)
    # uint8 S float32 W: bit for bit the float S result
    W32 = W.detach().float()
    assert torch.equal(spike_matmul(S8, W32, backend=backend, method="event"),
                       spike_matmul(S8.float(), W32, backend=backend, method="event"))


# ---------------------------------------------------------------------------------------
# spike propagation
# ---------------------------------------------------------------------------------------

@needs_cxx
@pytest.mark.parametrize("backend", SHIM_BACKENDS)
@pytest.mark.parametrize("rate", [0.0, 0.01, 0.2, 1.0])
def test_spike_matmul_event_exact_with_integer_weights(backend, rate):
    g = torch.Generator().manual_seed(7)
    S = (torch.rand(37, 300, generator=g) < rate).float()
    W = torch.randint(-8, 9, (300, 91), generator=g).float().requires_grad_()
    S.requires_grad_()
    out = spike_matmul(S, W, backend=backend, method="event")
    dense = S.detach() @ W.detach()
    assert torch.equal(out, dense)
    gout = torch.randint(-4, 5, out.shape, generator=g).float()
    gS, gW = torch.autograd.grad(out, (S, W), gout)
    assert torch.equal(gW, S.detach().t() @ gout)
    assert torch.equal(gS, gout @ W.detach().t())


@needs_cxx
def test_spike_matmul_gradcheck():
    g = torch.Generator().manual_seed(8)
    S = (torch.rand(6, 11, generator=g) < 0.3).double().requires_grad_()
    W = torch.randn(11, 5, generator=g, dtype=torch.float64).requires_grad_()
    fn = lambda a, b: spike_matmul(a, b, backend="cpu_shim", method="event")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (S, W), fast_mode=True)


@needs_cxx
def test_spike_matmul_auto_uses_crossover(monkeypatch):
    calls = []
    orig = ops._SpikeMatmulEvent.apply
    monkeypatch.setattr(ops._SpikeMatmulEvent, "apply",
                        lambda *a: calls.append(1) or orig(*a))
    W = torch.randn(64, 8)
    sparse = torch.zeros(4, 64)
    sparse[0, 3] = 1
    dense = torch.ones(4, 64)
    torch.testing.assert_close(spike_matmul(sparse, W, backend="cpu_shim"), sparse @ W)
    assert calls == [1]  # 0.4% spikes: event-driven
    torch.testing.assert_close(spike_matmul(dense, W, backend="cpu_shim"), dense @ W)
    assert calls == [1]  # 100% spikes: dense


# ---------------------------------------------------------------------------------------
# parity with snntorch and SpikingJelly
# ---------------------------------------------------------------------------------------

@needs_cxx
@pytest.mark.parametrize("reset", ref.RESETS)
@pytest.mark.parametrize("surrogate", ref.SURROGATES)
def test_snntorch_leaky_parity_bit_for_bit(reset, surrogate):
    snn = pytest.importorskip("snntorch")
    from snntorch import surrogate as sg_mod

    alpha = 2.0 if surrogate == "atan" else 25.0
    spike_grad = sg_mod.atan(alpha) if surrogate == "atan" else sg_mod.fast_sigmoid(alpha)
    x = _x((16, 4, 300), seed=9)
    lif = snn.Leaky(beta=0.9, threshold=THETA, reset_mechanism=reset, spike_grad=spike_grad)
    mem = lif.reset_mem()
    spk = []
    for xt in x.unbind(0):
        s, mem = lif(xt, mem)
        spk.append(s)
    s_snn = torch.stack(spk)
    s = lif_multistep(x, 0.9, THETA, reset=reset, surrogate=surrogate, alpha=alpha,
                      dynamics="snntorch", backend="cpu_shim")
    assert torch.equal(s, s_snn)
    g = torch.randn_like(s)
    torch.testing.assert_close(torch.autograd.grad(s, x, g)[0],
                               torch.autograd.grad(s_snn, x, g)[0], rtol=0, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("reset", ref.RESETS)
def test_spikingjelly_lif_parity(reset):
    pytest.importorskip("loguru", reason="spikingjelly 2.0.0 needs loguru")
    sj = pytest.importorskip("spikingjelly.activation_based.neuron",
                             reason="spikingjelly not installed (pip install --no-deps)")
    from spikingjelly.activation_based import surrogate as sj_sg

    # H = V - V / tau + X with tau = 10 is the standard dynamics with beta = 0.9, computed
    # with different roundings (and SpikingJelly fires on u >= 0): spikes are compared
    # exactly, which holds unless a value lands within an ulp of the threshold.
    node = sj.LIFNode(tau=10.0, decay_input=False, v_threshold=THETA,
                      v_reset=None if reset == "subtract" else 0.0,
                      surrogate_function=sj_sg.ATan(alpha=2.0), step_mode="m")
    x = _x((16, 4, 500), seed=10)
    s_sj = node(x)
    s = lif_multistep(x, 0.9, THETA, reset=reset, backend="cpu_shim")
    assert torch.equal(s, s_sj)
    g = torch.randn_like(s)
    torch.testing.assert_close(torch.autograd.grad(s, x, g)[0],
                               torch.autograd.grad(s_sj, x, g)[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# dispatcher and input errors
# ---------------------------------------------------------------------------------------

def test_backend_selection(monkeypatch):
    x = torch.zeros(2, 3)
    monkeypatch.delenv("HYBRIDLM_BACKEND", raising=False)
    assert ops.resolve_backend(None, x) == ("cpu_shim" if HAVE_CXX else "torch")
    monkeypatch.setenv("HYBRIDLM_BACKEND", "torch")
    assert ops.resolve_backend(None, x) == "torch"
    assert ops.resolve_backend("compiled", x) == "compiled"  # the argument wins
    monkeypatch.setenv("HYBRIDLM_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend(None, x)
    with pytest.raises(ValueError, match="'cuda' needs CUDA tensors"):
        ops.resolve_backend("cuda", x)


def test_torch_backend_is_the_reference():
    x = _x((5, 40))
    s = lif_multistep(x, 0.9, THETA, backend="torch")
    assert torch.equal(s, ref.lif_multistep_reference(x, 0.9, THETA))


def test_cuda_tensor_without_cupy(monkeypatch):
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    monkeypatch.setattr(ops, "_device_type", lambda t: "cuda")
    with pytest.raises(ImportError, match=r"CuPy.*hybridlm\[cuda\]"):
        lif_multistep(torch.zeros(2, 3), 0.9, backend="cuda")
    with pytest.raises(ValueError, match="needs CPU tensors"):
        ops.resolve_backend("cpu_shim", torch.zeros(1))


def test_bad_inputs_name_the_tensor():
    x = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        lif_multistep(x.t(), 0.9)
    with pytest.raises(TypeError, match="x must be float32, float64, bfloat16 or float16, "
                                        "got torch.int32"):
        lif_multistep(x.int(), 0.9)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lif_multistep(np.zeros((4, 6)), 0.9)
    with pytest.raises(ValueError, match="T >= 1"):
        lif_multistep(torch.zeros(0, 6), 0.9)
    with pytest.raises(ValueError, match="reset must be one of"):
        lif_multistep(x, 0.9, reset="hard")
    with pytest.raises(ValueError, match="beta must be a finite number"):
        lif_multistep(x, float("nan"))
    with pytest.raises(ValueError, match="W is torch.float64"):
        spike_matmul(torch.zeros(2, 3), torch.zeros(3, 4, dtype=torch.float64))
    # mixed precisions are refused, never converted silently
    with pytest.raises(ValueError, match="W is torch.float32 on cpu but S is torch.bfloat16"):
        spike_matmul(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="W must be float32, float64, bfloat16 or float16"):
        spike_matmul(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(3, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="spike_dtype must be None"):
        lif_multistep(x, 0.9, spike_dtype=torch.int8)
    with pytest.raises(ValueError, match="spikes without a gradient, but x requires grad"):
        lif_multistep(x.clone().requires_grad_(), 0.9, spike_dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"S.shape\[1\] must equal W.shape\[0\]"):
        spike_matmul(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="W must be 2-D"):
        spike_matmul(torch.zeros(2, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="method must be"):
        spike_matmul(torch.zeros(2, 3), torch.zeros(3, 4), method="sparse")


# ---------------------------------------------------------------------------------------
# AddressSanitizer: the shim tests again, in a subprocess with an ASan build of the shim
# ---------------------------------------------------------------------------------------

def _libasan() -> str | None:
    cc = shutil.which("gcc")
    if cc is None:
        return None
    out = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = out.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _asan_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(HYBRIDLM_SHIM_SANITIZE="address", HYBRIDLM_KERNEL_CACHE=str(tmp_path),
               LD_PRELOAD=_libasan(), ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               HYBRIDLM_IN_ASAN="1", OMP_NUM_THREADS="2")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


asan = pytest.mark.skipif(not HAVE_CXX or _libasan() is None or os.environ.get(
    "HYBRIDLM_IN_ASAN") == "1", reason="needs gcc with libasan (and not already under ASan)")


@asan
def test_shim_under_address_sanitizer(asan_kernel_cache):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys",
           __file__, "-k", "shim_matches_reference or "
           "large_multithreaded or spike_matmul_event or float64 or "
           "recompute or half or one_byte"]
    res = subprocess.run(cmd, env=_asan_env(asan_kernel_cache), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 40, res.stdout[-2000:]
    assert "AddressSanitizer" not in res.stdout + res.stderr
    assert list(asan_kernel_cache.glob("hl_shim_*.so")), "the ASan build was not used"


def assert_asan_reports_overflow(tmp_path, code: str, source: str) -> None:
    """Run `code` (a kernel launch past its tensors) under ASan: it must fail, naming the
    overflow and the kernel's source file."""
    res = subprocess.run([sys.executable, "-c", code], env=_asan_env(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "heap-buffer-overflow" in res.stderr
    assert source in res.stderr


@asan
def test_address_sanitizer_catches_overflow(asan_kernel_cache):
    # A launch that claims more neurons than the tensors hold must be reported, with the line.
    assert_asan_reports_overflow(asan_kernel_cache, (
        "import numpy as np, torch\n"
        "from hybridlm.kernels import _build\n"
        "x = torch.zeros(2, 100); s = torch.empty_like(x)\n"
        "_build.load_shim().launch('hl::lif_fwd<float,float,0,0>', 1, 128,\n"
        "    (x, s, np.int32(2), np.int64(128), np.float32(0.9), np.float32(0.7)))\n"),
        "neuron.cu")


# ---------------------------------------------------------------------------------------
# CUDA (run by bench/gpu_check.py on a GPU machine; skipped here)
# ---------------------------------------------------------------------------------------

HAVE_CUDA = torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device and CuPy")


@needs_cuda
@needs_cxx
@pytest.mark.parametrize("dynamics,reset,detach,surrogate", LIF_CASES)
def test_cuda_lif_matches_cpu_shim(dynamics, reset, detach, surrogate):
    alpha = 2.0 if surrogate == "atan" else 25.0
    kw = dict(reset=reset, detach_reset=detach, surrogate=surrogate, alpha=alpha,
              dynamics=dynamics)
    x = _x((16, 4, 20_011), seed=11)
    xc = x.detach().cuda().requires_grad_()
    s = lif_multistep(x, 0.9, THETA, backend="cpu_shim", **kw)
    sc = lif_multistep(xc, 0.9, THETA, backend="cuda", **kw)
    # beta * v is __fmul_rn: never fused into an FMA, so spikes match whatever --fmad says.
    assert torch.equal(sc.cpu(), s)
    g = torch.randn_like(s)
    torch.testing.assert_close(torch.autograd.grad(sc, xc, g.cuda())[0].cpu(),
                               torch.autograd.grad(s, x, g)[0], rtol=0, atol=1e-5)


@needs_cuda
def test_cuda_runs_on_torch_current_stream():
    x = _x((8, 1 << 20), seed=12).detach().cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s = lif_multistep(x, 0.9, THETA, backend="cuda")
        total = s.sum()  # same stream: ordered after the kernel without a sync
    torch.cuda.current_stream().wait_stream(side)
    ref_s = ref.lif_multistep_reference(x, 0.9, THETA)
    assert torch.equal(s, ref_s) and total.item() == ref_s.sum().item()


@needs_cuda
def test_cuda_spike_matmul():
    g = torch.Generator().manual_seed(16)
    S = (torch.rand(64, 999, generator=g) < 0.05).float()
    W = torch.randint(-8, 9, (999, 257), generator=g).float()
    assert torch.equal(spike_matmul(S.cuda(), W.cuda(), backend="cuda", method="event").cpu(),
                       S @ W)
