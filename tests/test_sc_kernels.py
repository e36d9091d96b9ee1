"""The fused spike-coding kernel (spike_coding.cu, ops.sc_inference), CPU only: against the
plain-torch reference (reference.sc_inference_reference) on problems built as the layer builds
them, the energy guarantees recomputed from the spikes, gradients against the reference's
autograd, the GPU compilers, and AddressSanitizer."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

from hybridlm.kernels import _build, ops
from hybridlm.kernels import reference as ref
from hybridlm.kernels.ops import sc_inference
from tests.test_kernels import (
    HAVE_NVRTC,
    _asan_env,
    asan,
    assert_asan_reports_overflow,
    needs_cuda,
    needs_cxx,
)

FUSED = ("cpu_shim", "cpu_shim_grid")


def problem(M, N, D, delta=1.0, mu=0.0, nu=0.1, dtype=torch.float64, seed=0, sq_norm=300.0,
            dup=0, silent=0):
    """As hybridlm.spiking builds it: unit-norm random atoms D (D x N), G = D^T D + mu I,
    v1 = x @ D, theta = delta (1 + mu) / 2 + nu, tokens x with ||x||^2 = sq_norm. ``dup``
    atoms are copies of others (aligned atoms: their joint proposals overshoot and are
    rejected); the last ``silent`` tokens are tiny (no neuron above threshold at all).
    Returns (v1, G, theta, x, atoms)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(D, N, generator=g, dtype=dtype)
    for j in range(dup):  # column N-1-j copies column j
        atoms[:, N - 1 - j] = atoms[:, j]
    atoms = atoms / atoms.norm(dim=0)
    G = atoms.t() @ atoms + mu * torch.eye(N, dtype=dtype)
    x = torch.randn(M, D, generator=g, dtype=dtype)
    x = x / x.norm(dim=1, keepdim=True) * sq_norm ** 0.5
    if silent:
        x[M - silent:] *= 1e-3
    v1 = x @ atoms
    return v1.contiguous(), G.contiguous(), delta * (1 + mu) / 2 + nu, x, atoms


# (M, N, D, T, delta, mu, nu, dup, silent); N = 77, 130, 33, 200 are not multiples of any
# vector width or tile (the CPU update walks 64 floats / 32 doubles at a time).
CASES = [
    (257, 77, 40, 8, 1.0, 0.0, 0.1, 0, 5),
    (300, 130, 64, 5, 0.5, 0.2, 0.05, 0, 0),
    (64, 33, 20, 12, 2.0, 0.1, 0.3, 4, 3),
    (200, 200, 100, 8, 1.0, 0.0, 0.1, 40, 2),  # many aligned pairs: rejected proposals
]


def _ids(c):
    return f"M{c[0]}-N{c[1]}-T{c[3]}-d{c[4]}-mu{c[5]}-dup{c[7]}"


def energy(x, atoms, r, mu, nu):
    """F(r) per token, from scratch: 1/2 ||x - D r||^2 + mu/2 ||r||^2 + nu sum r."""
    e = x - r @ atoms.t()
    return 0.5 * e.pow(2).sum(-1) + 0.5 * mu * r.pow(2).sum(-1) + nu * r.sum(-1)


def replay(v1, G, theta, delta, spikes):
    """Margins u_k (T, M, N) from the spikes alone: V_{k+1} = V_k - delta s_k @ G."""
    v, us = v1, []
    for s in spikes.to(v1.dtype).unbind(0):
        us.append(v - theta)
        v = v - delta * (s @ G)
    return torch.stack(us)


# ---------------------------------------------------------------------------------------
# forward: against the reference, and the energy guarantees
# ---------------------------------------------------------------------------------------

@needs_cxx
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_float64_equals_reference(backend, case):
    M, N, D, T, delta, mu, nu, dup, silent = case
    v1, G, theta, x, atoms = problem(M, N, D, delta, mu, nu, dup=dup, silent=silent)
    r_ref, s_ref, d_ref = ref.sc_inference_reference(v1, G, theta, delta, T)
    r, s, d = sc_inference(v1, G, theta, delta, T, backend=backend)
    assert s.dtype == torch.bool and s.shape == (T, M, N) and d.shape == (T, M)
    assert torch.equal(s, s_ref)
    assert torch.equal(r, r_ref)  # r adds delta per spike in the same order: exact
    torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-12)
    # the case exercises what it claims to
    u = replay(v1, G, theta, delta, s)
    cand = u > 0
    assert not cand[:, M - silent:].any() and (d[:, M - silent:] == 0).all()
    assert cand.any()
    if dup:
        rejected = (cand & ~s).any(-1)  # token-steps where some candidate did not spike
        assert rejected.sum() >= 5
        single = (s.sum(-1) == 1) & (cand.sum(-1) > 1)  # fell through to the best neuron
        assert single.any()


@needs_cxx
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_float32_matches_reference_and_descends(backend, case):
    M, N, D, T, delta, mu, nu, dup, silent = case
    v1, G, theta, x, atoms = problem(M, N, D, delta, mu, nu, dtype=torch.float32, dup=dup,
                                     silent=silent)
    r_ref, s_ref, _ = ref.sc_inference_reference(v1, G, theta, delta, T)
    r, s, d = sc_inference(v1, G, theta, delta, T, backend=backend)
    # Summation orders differ from BLAS: a spike may flip where a dF or a margin is within
    # rounding of 0 (and the token then follows its own path).
    same = (s == s_ref).all(-1).float().mean().item()
    assert same >= 0.999, same
    # The guarantees, recomputed in float64 from the spikes alone: F never rises, each step
    # lowers it by the reported dF, and r_T = delta * (spike count).
    x64, a64 = x.double(), atoms.double()
    counts = s.double().cumsum(0)
    f = [energy(x64, a64, torch.zeros_like(r, dtype=torch.float64), mu, nu)]
    f += [energy(x64, a64, delta * c, mu, nu) for c in counts.unbind(0)]
    f = torch.stack(f)  # (T + 1, M)
    scale = f[0].abs().max().item()
    assert (f[1:] - f[:-1]).max().item() <= 1e-5 * scale
    torch.testing.assert_close((f[1:] - f[:-1]).float(), d, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(r.double(), delta * counts[-1], rtol=1e-6, atol=0)


@needs_cxx
@pytest.mark.parametrize("backend", ("torch", *FUSED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_levels_by_hand(backend, dtype):
    # Three neurons whose atoms overlap by 0.9 (G_ij = 0.9, G_ii = 1), theta = 0.5, delta = 1:
    # dF(P) = -sum_P u + 0.9 * (pairs in P).
    G = torch.full((3, 3), 0.9, dtype=dtype)
    G.fill_diagonal_(1.0)
    u = torch.tensor([[1.0, 0.5, 0.1],     # level 0 rejected (-1.6 + 2.7); level 1 keeps
                                           # u >= 0.5 * 1.0: {0, 1}, dF = -1.5 + 0.9
                      [0.3, 0.3, 0.3],     # every level rejected (-0.9 + 2.7, ...): the single
                                           # best, lowest index on the tie: {0}, dF = -0.3
                      [0.1, 2.0, -0.2],    # level 0 {0, 1}: -2.1 + 0.9 < 0, accepted
                      [-0.1, -0.5, -0.0]],  # nobody above threshold
                     dtype=dtype)
    r, s, d = sc_inference((u + 0.5).contiguous(), G, 0.5, 1.0, 1, backend=backend)
    assert s[0].tolist() == [[True, True, False], [True, False, False], [True, True, False],
                             [False, False, False]]
    torch.testing.assert_close(d[0], torch.tensor([-0.6, -0.3, -1.2, 0.0], dtype=dtype))
    assert torch.equal(r, s[0].to(dtype))


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_kernel_and_cpu_twin_agree_bit_for_bit(dtype):
    # Same sums in the same order on both schedules (and so on the GPU): equal, not close.
    v1, G, theta, *_ = problem(300, 133, 60, 1.0, 0.05, 0.1, dtype=dtype, dup=10, silent=4)
    a = sc_inference(v1, G, theta, 1.0, 8, backend="cpu_shim")
    b = sc_inference(v1, G, theta, 1.0, 8, backend="cpu_shim_grid")
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@needs_cxx
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", FUSED)
def test_half_precisions_run_the_float32_kernel(dtype, backend):
    # Half inputs are storage: the membrane and every sum stay in float32, so spikes equal
    # the float32 call on the same rounded inputs and r, dF are its results rounded once.
    # The gradients are summed in float32 from three roundings to the storage type (the
    # incoming dL/dr, which autograd hands over in r's dtype; the saved surrogate factor
    # dsdu; the result): within 3 u of the float32 ones, relative to the gradient's scale
    # (u = 2^-8 for bf16, 2^-11 for fp16).
    M, N, D, T, delta, mu, nu, dup, silent = CASES[0]
    v1, G, theta, *_ = problem(M, N, D, delta, mu, nu, dtype=torch.float32, dup=dup,
                               silent=silent, seed=1)
    v1, G = v1.to(dtype), G.to(dtype)
    w = torch.randn(M, N, generator=torch.Generator().manual_seed(3))
    outs = []
    for a, b in ((v1, G), (v1.float(), G.float())):
        v, g = a.clone().requires_grad_(), b.clone().requires_grad_()
        r, s, d = sc_inference(v, g, theta, delta, T, backend=backend)
        outs.append((r, s, d, *torch.autograd.grad((r.float() * w).sum(), (v, g))))
    (r, s, d, gv, gg), (r32, s32, d32, gv32, gg32) = outs
    assert r.dtype == d.dtype == gv.dtype == gg.dtype == dtype and s.dtype == torch.bool
    assert torch.equal(s, s32) and s.any()
    assert torch.equal(r, r32.to(dtype)) and torch.equal(d, d32.to(dtype))
    tol = 3 * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11)
    for a, b in ((gv, gv32), (gg, gg32)):
        torch.testing.assert_close(a.float(), b, rtol=0, atol=tol * b.abs().max().item())
    # mixed precisions are refused, not converted
    with pytest.raises(ValueError, match="lateral is torch.float32 on cpu but v1 is"):
        sc_inference(v1, G.float(), theta, delta, T, backend=backend)


@needs_cxx
def test_no_candidates_and_empty_batch():
    v1, G, theta, *_ = problem(6, 20, 10, silent=6)
    r, s, d = sc_inference(v1, G, theta, 1.0, 4, backend="cpu_shim")
    assert not s.any() and (r == 0).all() and (d == 0).all()
    r, s, d = sc_inference(v1[:0], G, theta, 1.0, 4, backend="cpu_shim")
    assert r.shape == (0, 20) and s.shape == (4, 0, 20) and d.shape == (4, 0)


# ---------------------------------------------------------------------------------------
# gradients: against the reference's autograd
# ---------------------------------------------------------------------------------------

GRAD_CASES = [c for c in CASES if c[1] != 200] + [(120, 200, 100, 6, 1.0, 0.0, 0.1, 40, 2)]


@needs_cxx
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("surrogate,alpha", [("atan", 2.0), ("fast_sigmoid", 25.0)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=_ids)
def test_gradients_equal_reference_autograd(backend, surrogate, alpha, dtype, tol, case):
    M, N, D, T, delta, mu, nu, dup, silent = case
    v1, G, theta, *_ = problem(M, N, D, delta, mu, nu, dtype=dtype, dup=dup, silent=silent,
                               seed=1)
    # G need not be symmetric for the gradient formulas: make it not quite so.
    G = G + 1e-3 * torch.randn(N, N, dtype=dtype, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (ref.sc_inference_reference,
               lambda *a: sc_inference(*a, backend=backend)):
        v, g = v1.clone().requires_grad_(), G.clone().requires_grad_()
        r, s, _ = fn(v, g, theta, delta, T, surrogate, alpha)
        w = torch.randn(r.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
        grads.append((s, *torch.autograd.grad((r * w).sum(), (v, g))))
    (s_ref, gv_ref, gg_ref), (s, gv, gg) = grads
    assert torch.equal(s, s_ref)  # these seeded cases have no rounding flips
    # tolerance relative to the gradient's scale (float32: about 100 ulps of the largest)
    for a, b in ((gv, gv_ref), (gg, gg_ref)):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())


@needs_cxx
@pytest.mark.parametrize("which", [0, 1])
def test_gradient_of_one_input_alone_and_no_grad(which):
    # The backward takes a shorter path when only v1 needs a gradient.
    v1, G, theta, *_ = problem(50, 40, 20, dup=5)
    w = torch.randn(50, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = []
    for fn in (ref.sc_inference_reference, lambda *a: sc_inference(*a, backend="cpu_shim")):
        args = [v1.clone(), G.clone()]
        args[which].requires_grad_()
        r = fn(*args, theta, 1.0, 6)[0]
        grads.append(torch.autograd.grad((r * w).sum(), args[which])[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=1e-10)
    with torch.no_grad():
        out = sc_inference(v1, G, theta, 1.0, 6, backend="cpu_shim")
    assert not out[0].requires_grad
    for a, b in zip(out, ref.sc_inference_reference(v1, G, theta, 1.0, 6)):
        assert a.shape == b.shape


@needs_cxx
def test_saves_lateral_and_checks_versions():
    v1, G, theta, *_ = problem(20, 16, 10)
    v, g = v1.clone().requires_grad_(), G.clone().requires_grad_()
    r, _, _ = sc_inference(v, g, theta, 1.0, 4, backend="cpu_shim")
    assert any(t.data_ptr() == g.data_ptr() for t in r.grad_fn.saved_tensors)
    with torch.no_grad():
        g.mul_(2.0)  # the backward would use a different G: autograd must refuse
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        r.sum().backward()


# ---------------------------------------------------------------------------------------
# dispatch and input errors
# ---------------------------------------------------------------------------------------

@needs_cxx
def test_auto_takes_the_fused_kernel_on_cpu(monkeypatch):
    monkeypatch.delenv("HYBRIDLM_BACKEND", raising=False)
    calls = []
    orig = ops._SCInference.apply
    monkeypatch.setattr(ops._SCInference, "apply", lambda *a: calls.append(a[-1]) or orig(*a))
    v1, G, theta, *_ = problem(10, 12, 8)
    sc_inference(v1, G, theta, 1.0, 3)
    assert calls == ["cpu_shim"]
    sc_inference(v1, G, theta, 1.0, 3, backend="torch")
    sc_inference(v1, G, theta, 1.0, 3, backend="compiled")
    assert calls == ["cpu_shim"]


def test_torch_and_compiled_backends_are_the_reference():
    # `compiled` runs the reference eagerly: torch.compile skips its frames (data-dependent
    # selection inside loops), so compiling it only added overhead.
    v1, G, theta, *_ = problem(30, 17, 9, dup=3)
    expected = ref.sc_inference_reference(v1, G, theta, 1.0, 5)
    for b in ("torch", "compiled"):
        for a, e in zip(sc_inference(v1, G, theta, 1.0, 5, backend=b), expected):
            assert torch.equal(a, e)


def test_bad_inputs_name_the_argument():
    v1, G = torch.zeros(4, 6), torch.zeros(6, 6)
    with pytest.raises(ValueError, match=r"lateral is \(5, 5\), expected \(6, 6\)"):
        sc_inference(v1, torch.zeros(5, 5), 0.6, 1.0, 3)
    with pytest.raises(ValueError, match="lateral is torch.float64"):
        sc_inference(v1, G.double(), 0.6, 1.0, 3)
    with pytest.raises(ValueError, match="v1 must be contiguous"):
        sc_inference(torch.zeros(6, 4).t(), G, 0.6, 1.0, 3)
    with pytest.raises(ValueError, match="time_steps must be an integer >= 1"):
        sc_inference(v1, G, 0.6, 1.0, 0)
    with pytest.raises(ValueError, match="delta must be finite and > 0"):
        sc_inference(v1, G, 0.6, 0.0, 3)
    with pytest.raises(ValueError, match="theta must be finite and > 0"):
        sc_inference(v1, G, float("nan"), 1.0, 3)
    with pytest.raises(ValueError, match="surrogate must be one of"):
        sc_inference(v1, G, 0.6, 1.0, 3, surrogate="relu")
    with pytest.raises(ValueError, match="at least one neuron"):
        sc_inference(torch.zeros(4, 0), torch.zeros(0, 0), 0.6, 1.0, 3)


# ---------------------------------------------------------------------------------------
# GPU compilers (no GPU needed) and AddressSanitizer
# ---------------------------------------------------------------------------------------

SC_GPU = [n for n in _build.gpu_kernel_names() if n.startswith("hl::sc_fwd<")]


def test_every_variant_is_registered():
    assert len(SC_GPU) == 8  # float/double/bf16/fp16 x atan/fast_sigmoid
    cpu = [n for n in _build.cpu_kernel_names() if n.startswith("hl::sc_fwd_rows<")]
    assert len(cpu) == 8 and "spike_coding.cu" in _build.CU_FILES


@pytest.mark.skipif(not HAVE_NVRTC, reason="cuda-bindings / nvidia-cuda-nvrtc not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvrtc_compiles_the_kernel(arch):
    res = _build.nvrtc_compile(arch)
    assert set(SC_GPU) <= set(res["lowered"])
    assert "warning" not in res["log"].lower(), res["log"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_no_spills_no_stack(arch):
    report = _build.nvcc_resource_usage(arch)
    # ptxas: "Compiling entry function '<mangled>'" then "Function properties for <mangled>"
    # then "N bytes stack frame, N bytes spill stores, N bytes spill loads"
    props = re.findall(r"Function properties for (\S*sc_fwd\S*)\s*\n\s*(.*)", report)
    assert len({name for name, _ in props}) == len(SC_GPU), report
    for name, line in props:
        assert line.strip() == ("0 bytes stack frame, 0 bytes spill stores, "
                                "0 bytes spill loads"), (name, line)


@asan
def test_kernel_under_address_sanitizer(asan_kernel_cache):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--capture=sys",
           __file__, "-k", "equals_reference or matches_reference or bit_for_bit or "
           "no_candidates or (gradients_equal and float64) or half"]
    res = subprocess.run(cmd, env=_asan_env(asan_kernel_cache), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    passed = re.search(r"(\d+) passed", res.stdout)
    assert passed and int(passed.group(1)) >= 35, res.stdout[-2000:]
    assert "AddressSanitizer" not in res.stdout + res.stderr
    assert list(asan_kernel_cache.glob("hl_shim_*.so")), "the ASan build was not used"


@asan
def test_address_sanitizer_catches_overflow_in_the_kernel(asan_kernel_cache):
    # A launch that claims more neurons than the tensors hold must be reported, with the file.
    assert_asan_reports_overflow(asan_kernel_cache, (
        "import numpy as np, torch\n"
        "from hybridlm.kernels import _build\n"
        "M, N, T = 3, 8, 2\n"
        "v1 = torch.ones(M, N); G = torch.eye(N); V = torch.empty(M, N)\n"
        "P = torch.empty(M, N, dtype=torch.int32); r = torch.empty(M, N)\n"
        "s = torch.empty(T, M, N, dtype=torch.uint8); d = torch.empty(T, M)\n"
        "f = np.float32\n"
        "_build.load_shim().launch('hl::sc_fwd_rows<float,0>', M, 1, (v1, G, V, P, r, r, s,\n"
        "    d, torch.empty(T, M, N), np.int32(M), np.int32(N + 3), np.int32(T), f(0.6), f(1.0),\n"
        "    f(-1.0), f(0.5), f(1.0), f(3.14), np.int32(1)))\n"), "spike_coding.cu")


# ---------------------------------------------------------------------------------------
# CUDA (run by bench/gpu_check.py on a GPU machine; skipped here)
# ---------------------------------------------------------------------------------------



@needs_cuda
@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("surrogate,alpha", [("atan", 2.0), ("fast_sigmoid", 25.0)])
def test_cuda_matches_cpu_shim(dtype, surrogate, alpha):
    # Sums in the same order and every product mul_rn: spikes, r and dF equal bit for bit
    # whatever NVRTC's --fmad; gradients (the surrogate may be fused, cuBLAS sums its own
    # way) within a tolerance.
    v1, G, theta, *_ = problem(1500, 301, 128, 1.0, 0.05, 0.1, dtype=dtype, dup=20, silent=7)
    outs, grads = [], []
    for dev, b in (("cpu", "cpu_shim"), ("cuda", "cuda")):
        v, g = v1.to(dev).requires_grad_(), G.to(dev).requires_grad_()
        out = sc_inference(v, g, theta, 1.0, 8, surrogate, alpha, backend=b)
        w = torch.randn(out[0].shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
        grads.append([t.cpu() for t in torch.autograd.grad((out[0] * w.to(dev)).sum(), (v, g))])
        outs.append([t.detach().cpu() for t in out])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=tol * b.abs().max().item())


@needs_cuda
def test_cuda_matches_reference_float64():
    v1, G, theta, *_ = problem(700, 130, 64, 0.5, 0.2, 0.05, dup=10, silent=3)
    expected = ref.sc_inference_reference(v1, G, theta, 0.5, 6)
    got = sc_inference(v1.cuda(), G.cuda(), theta, 0.5, 6, backend="cuda")
    assert torch.equal(got[1].cpu(), expected[1])
    torch.testing.assert_close(got[0].cpu(), expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[2].cpu(), expected[2], rtol=1e-12, atol=1e-12)
