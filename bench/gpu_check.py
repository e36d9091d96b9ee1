"""The GPU check: everything the CPU machines cannot verify, in one run under 8 minutes on one
GPU. Writes all results as JSON (and logs) under $OUT (default ./gpu_check_out).

    OUT=/path python bench/gpu_check.py            # everything
    python bench/gpu_check.py --skip-sanitizer    # without compute-sanitizer

Steps (each one's outcome is recorded even when an earlier one failed):
1. env: GPU, driver, torch/CuPy versions.
2. tests: pytest tests/test_kernels.py (the CUDA tests run here; CPU ones too) and the CUDA
   tests of tests/test_sc_kernels.py -> junit XML.
3. parity: every LIF variant, spike_matmul and sc_inference on the GPU vs the CPU shim on the
   same inputs: LIF spikes bit for bit with NVRTC --fmad=false, and the fraction of flipped
   spikes with the default --fmad=true (bound 1e-4; expected 0 since beta * v is __fmul_rn);
   sc_inference spikes, r_T and dF bit for bit under both settings (every product in the
   kernel is mul_rn and its sums run in the same order as on the CPU); gradients max abs
   difference.
4. sanitizer: compute-sanitizer --tool memcheck on a small run of every kernel.
5. bench: LIF forward+backward (T = 16, 32; N = 1.57M, 16.8M) ours vs torch loop, the loop
   under torch.compile, snntorch; effective GB/s (20*T*N bytes: forward reads x, writes s;
   backward reads x and grad_s, writes grad_x) vs device copy bandwidth; peak extra memory
   (torch.cuda.max_memory_allocated over the timed steps, from x.grad = None);
   spike propagation event vs dense cuBLAS vs CSR over spike rates -> the CUDA crossover to
   store in hybridlm/kernels/ops.py SPIKE_MATMUL_CROSSOVER["cuda"];
   sc_inference forward and forward+backward (T = 8, N = 512, M = 2048 and 16384, random
   and data-like atoms as in bench/bench_kernels.py) fused kernel vs the plain-torch
   reference on the GPU, in tokens per second.
6. precision: bf16/fp16 parity (every LIF variant, sc_inference, spike_matmul with one-byte
   spikes: GPU vs CPU shim on the same rounded inputs) and timings at SpikingJelly's own
   LIF benchmark shape (its Triton-backend tutorial: x [T, 64, 64*32*32], fp16, T = 4..32,
   forward + sum().backward(); 41.87 / 5.19 / 3.37 ms torch / CuPy / Triton at T = 32 on an
   RTX 4090): ours against SpikingJelly's torch, CuPy and Triton backends where importable,
   with the device copy bandwidth and ours' share of it (byte model 5 b T N, b = 2).
   ``--precision-only --cpu`` runs this step's code on the CPU (cpu_shim_grid standing in
   for the GPU, a small shape, SpikingJelly's torch backend), to check it before a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("OUT", ROOT / "gpu_check_out"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _save(name: str, obj) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(obj, indent=2, default=str))


def step_env() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import cupy

        info["cupy"] = cupy.__version__
        info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
    except Exception as e:  # noqa: BLE001
        info["cupy_error"] = repr(e)
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = subprocess.run([smi], capture_output=True, text=True).stdout
    return info


def step_tests() -> dict:
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_kernels.py"),
                          f"--junitxml={OUT / 'tests_junit.xml'}"],
                         capture_output=True, text=True, env=_env(), timeout=300)
    (OUT / "tests.log").write_text(res.stdout + res.stderr)
    sc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                         str(ROOT / "tests" / "test_sc_kernels.py"), "-k", "cuda",
                         f"--junitxml={OUT / 'tests_sc_junit.xml'}"],
                        capture_output=True, text=True, env=_env(), timeout=300)
    (OUT / "tests_sc.log").write_text(sc.stdout + sc.stderr)
    return {"returncode": res.returncode or sc.returncode, "seconds": time.time() - t0,
            "summary": res.stdout.strip().splitlines()[-1:] + sc.stdout.strip().splitlines()[-1:]}


def step_parity() -> dict:
    import torch

    from hybridlm.kernels import _build, _cuda, lif_multistep, spike_matmul
    from hybridlm.kernels import reference as ref

    # The CPU side: the shim when a C++ compiler is here, else the torch reference (also
    # bit-exact for spikes on CPU).
    cpu = "cpu_shim" if _build.find_cxx() else "torch"

    rows, sc_rows = [], []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1 << 18, generator=g) * 0.8 + 0.4
    gs = torch.randn(x.shape, generator=g)
    for fmad in ("true", "false"):
        os.environ["HYBRIDLM_NVRTC_FMAD"] = fmad
        _cuda._modules.clear()
        for dyn in ref.DYNAMICS:
            for reset in ref.RESETS:
                for detach in (False, True):
                    for sg, alpha in (("atan", 2.0), ("fast_sigmoid", 25.0)):
                        if dyn == "snntorch" and detach:
                            continue
                        kw = dict(reset=reset, detach_reset=detach, surrogate=sg, alpha=alpha,
                                  dynamics=dyn)
                        xc = x.clone().requires_grad_()
                        xg = x.cuda().requires_grad_()
                        s = lif_multistep(xc, 0.9, 0.7, backend=cpu, **kw)
                        sg_ = lif_multistep(xg, 0.9, 0.7, backend="cuda", **kw)
                        s.backward(gs)
                        sg_.backward(gs.cuda())
                        flips = (sg_.cpu() != s).float().mean().item()
                        gdiff = (xg.grad.cpu() - xc.grad).abs().max().item()
                        rows.append({"fmad": fmad, **kw, "flipped_fraction": flips,
                                     "grad_max_abs_diff": gdiff})
        sc_rows += _sc_parity(cpu, fmad)
    os.environ.pop("HYBRIDLM_NVRTC_FMAD")
    _cuda._modules.clear()
    S = (torch.rand(512, 2048, generator=g) < 0.05).float()
    W = torch.randint(-8, 9, (2048, 1024), generator=g).float()
    sm_equal = torch.equal(spike_matmul(S.cuda(), W.cuda(), backend="cuda",
                                        method="event").cpu(), S @ W)
    exact = all(r["flipped_fraction"] == 0 for r in rows if r["fmad"] == "false")
    bounded = all(r["flipped_fraction"] <= 1e-4 for r in rows if r["fmad"] == "true")
    grads = max(r["grad_max_abs_diff"] for r in rows)
    sc_ok = all(r["bit_exact"] and r["grad_rel_diff"] < (1e-4 if r["dtype"] == "float32"
                                                          else 1e-9) for r in sc_rows)
    return {"lif": rows, "sc_inference": sc_rows, "spike_matmul_exact": sm_equal,
            "lif_bit_exact_fmad_false": exact, "lif_flips_bounded_fmad_true": bounded,
            "grad_max_abs_diff": grads, "sc_inference_ok": sc_ok,
            "ok": exact and bounded and sm_equal and grads < 1e-5 and sc_ok}


def _sc_parity(cpu: str, fmad: str) -> list[dict]:
    """sc_inference on the GPU against `cpu` (the shim) on the same problems: spikes, r_T and
    dF bit for bit (fraction of differing token-steps recorded), gradients' largest
    difference relative to their largest value."""
    import torch
    from bench_kernels import sc_problem

    from hybridlm.kernels import sc_inference

    rows = []
    for kind in ("random", "data"):
        for dtype in (torch.float32, torch.float64):
            for sg, alpha in (("atan", 2.0), ("fast_sigmoid", 25.0)):
                v1, G, theta = sc_problem(kind, 4096, 512, 384, seed=2)
                v1, G = v1.to(dtype), G.to(dtype)
                w = torch.randn(v1.shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
                outs, grads = [], []
                for dev, b in (("cpu", cpu), ("cuda", "cuda")):
                    v, gl = v1.to(dev).requires_grad_(), G.to(dev).requires_grad_()
                    out = sc_inference(v, gl, theta, 1.0, 8, sg, alpha, backend=b)
                    grads.append([t.cpu() for t in torch.autograd.grad(
                        (out[0] * w.to(dev)).sum(), (v, gl))])
                    outs.append([t.detach().cpu() for t in out])
                (r0, s0, d0), (r1, s1, d1) = outs
                rows.append({
                    "fmad": fmad, "kind": kind, "dtype": str(dtype).split(".")[-1],
                    "surrogate": sg, "spike_rate": s0.float().mean().item(),
                    "bit_exact": torch.equal(s0, s1) and torch.equal(r0, r1)
                    and torch.equal(d0, d1),
                    "token_steps_differing": (s0 != s1).any(-1).float().mean().item(),
                    "grad_rel_diff": max(((a - c).abs().max() / c.abs().max()).item()
                                         for a, c in zip(grads[1], grads[0]))})
    return rows


def sanitizer_subset() -> None:
    """A small run of every kernel (run under compute-sanitizer by step_sanitizer)."""
    import torch

    from hybridlm.kernels import lif_multistep, sc_inference, spike_matmul

    for dyn in ("standard", "snntorch"):
        for reset in ("subtract", "zero"):
            for T in (5, 37):  # 37: the backward's checkpoint pass and a partial segment
                x = torch.randn(T, 3, 1001, device="cuda", requires_grad=True)
                lif_multistep(x, 0.9, 0.7, reset=reset, dynamics=dyn,
                              backend="cuda").sum().backward()
    from bench_kernels import sc_problem

    for kind in ("random", "data"):  # both the gathered and the dense pair sums
        v1, G, theta = sc_problem(kind, 301, 133, 64, device="cuda")
        v1.requires_grad_()
        G.requires_grad_()
        sc_inference(v1, G, theta, 1.0, 5, backend="cuda")[0].sum().backward()
    S = (torch.rand(33, 300, device="cuda") < 0.1).float().requires_grad_()
    W = torch.randn(300, 70, device="cuda", requires_grad=True)
    spike_matmul(S, W, backend="cuda", method="event").sum().backward()
    torch.cuda.synchronize()
    print("sanitizer subset done")


def step_sanitizer() -> dict:
    cs = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(cs):
        return {"skipped": "compute-sanitizer not found"}
    cmd = [cs, "--tool", "memcheck", "--error-exitcode", "9", sys.executable, __file__,
           "--sanitizer-subset"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240)
    (OUT / "sanitizer.log").write_text(res.stdout + res.stderr)
    summary = [ln for ln in (res.stdout + res.stderr).splitlines() if "ERROR SUMMARY" in ln]
    return {"returncode": res.returncode, "summary": summary,
            "ok": res.returncode == 0 and "sanitizer subset done" in res.stdout}


def _cuda_time(fn, repeats: int = 10) -> float:
    import torch

    fn()
    fn()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def _copy_gbps() -> float:
    import torch

    n = 1 << 28
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    return 2 * 4 * n / _cuda_time(lambda: dst.copy_(src)) / 1e6


def _bench_lif(T: int, N: int, copy_gbps: float) -> list[dict]:
    import torch

    from hybridlm.kernels import lif_multistep

    x = torch.randn(T, N, device="cuda", requires_grad=True)
    g = torch.randn(T, N, device="cuda")
    rows = []

    def ours(backend):
        x.grad = None
        lif_multistep(x, 0.9, 1.0, backend=backend).backward(g)

    def snn_loop(lif):
        x.grad = None
        mem = lif.reset_mem()
        spk = []
        for t in range(T):
            s, mem = lif(x[t], mem)
            spk.append(s)
        torch.stack(spk).backward(g)

    fns = {"ours": lambda: ours(None), "torch_loop": lambda: ours("torch"),
           "compiled": lambda: ours("compiled")}
    try:
        import snntorch as snn

        lif = snn.Leaky(beta=0.9, threshold=1.0)
        fns["snntorch"] = lambda: snn_loop(lif)
    except ImportError:
        pass
    for name, fn in fns.items():
        try:
            x.grad = None  # every peer starts from the same live set
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = _cuda_time(fn, 3 if name == "snntorch" else 10)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            gbps = 20 * T * N / ms / 1e6
            rows.append({"T": T, "N": N, "peer": name, "median_ms": ms, "gbps": gbps,
                         "pct_copy": 100 * gbps / copy_gbps, "peak_extra_mib": peak})
        except Exception as e:  # noqa: BLE001
            rows.append({"T": T, "N": N, "peer": name, "error": repr(e)})
    return rows


def _bench_propagation() -> list[dict]:
    import torch

    from hybridlm.kernels import spike_matmul

    M, K, N = 4096, 4096, 4096
    W = torch.randn(K, N, device="cuda")
    rows = []
    for rate in (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2):
        S = (torch.rand(M, K, device="cuda") < rate).float()
        rows.append({
            "rate": rate, "M": M, "K": K, "N": N,
            "event_ms": _cuda_time(lambda S=S: spike_matmul(S, W, backend="cuda",
                                                            method="event")),
            "dense_ms": _cuda_time(lambda S=S: S @ W),
            "csr_ms": _cuda_time(lambda S=S: S.to_sparse_csr() @ W)})
    return rows


def _sc_steps(v1, G, theta: float, w, backend: str):
    """(forward, forward+backward) closures of sc_inference on one problem."""
    import torch
    from bench_kernels import SC_DELTA

    from hybridlm.kernels import sc_inference

    def fwd():
        with torch.no_grad():
            return sc_inference(v1, G, theta, SC_DELTA, 8, backend=backend)

    def fwd_bwd():
        v1.grad = G.grad = None
        (sc_inference(v1, G, theta, SC_DELTA, 8, backend=backend)[0] * w).sum().backward()
    return fwd, fwd_bwd


def _bench_sc(quick: bool) -> list[dict]:
    """sc_inference on the GPU: the fused kernel against the reference (backend "torch" on
    the GPU), forward and forward+backward, float32."""
    import torch
    from bench_kernels import sc_problem

    rows = []
    for kind in ("random", "data"):
        for M in ((2048,) if quick else (2048, 16384)):
            v1, G, theta = sc_problem(kind, M, 512, 384, device="cuda")
            v1.requires_grad_()
            G.requires_grad_()
            w = torch.randn(v1.shape, device="cuda")
            for impl, backend in (("ours", "cuda"), ("torch", "torch")):
                fwd, fwd_bwd = _sc_steps(v1, G, theta, w, backend)
                try:
                    n = 10 if impl == "ours" else 3
                    f, fb = _cuda_time(fwd, n), _cuda_time(fwd_bwd, n)
                    rows.append({"kind": kind, "M": M, "N": 512, "T": 8, "impl": impl,
                                 "fwd_ms": f, "fwd_bwd_ms": fb, "tokens_per_s": M / fb * 1e3,
                                 "spike_rate": fwd()[1].float().mean().item()})
                except Exception as e:  # noqa: BLE001
                    rows.append({"kind": kind, "M": M, "impl": impl, "error": repr(e)})
    return rows


SJ_SHAPE = (64, 64 * 32 * 32)  # SpikingJelly's benchmark: x [T, 64, 65536]
SJ_T = tuple(range(4, 33, 4))


def _precision_parity(dev: str) -> dict:
    """bf16/fp16 on ``dev`` ("cuda", or "cpu": cpu_shim_grid, the GPU kernels run on the CPU)
    against the CPU shim on the same rounded inputs: LIF spikes (flipped fraction; 0 expected,
    beta * v is mul_rn) and grad_x (max difference in ulps of the type: at most 1 expected,
    the float32 results rounded once), sc_inference bit for bit, spike_matmul with uint8
    spikes within one rounding."""
    import torch

    from hybridlm.kernels import lif_multistep, sc_inference, spike_matmul
    from hybridlm.kernels import reference as ref

    backend = "cuda" if dev == "cuda" else "cpu_shim_grid"
    n = 1 << 18 if dev == "cuda" else 1 << 12
    g = torch.Generator().manual_seed(0)
    rows, ok = [], True
    for dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        x = (torch.randn(20, n, generator=g) * 0.8 + 0.4).to(dtype)
        gs = torch.randn(x.shape, generator=g).to(dtype)
        for dyn in ref.DYNAMICS:
            for reset in ref.RESETS:
                for detach in (False, True):
                    if dyn == "snntorch" and detach:
                        continue
                    kw = dict(reset=reset, detach_reset=detach, dynamics=dyn)
                    xc = x.clone().requires_grad_()
                    xd = x.clone().to(dev).requires_grad_()
                    s = lif_multistep(xc, 0.9, 0.7, backend="cpu_shim", **kw)
                    sd = lif_multistep(xd, 0.9, 0.7, backend=backend, **kw)
                    s.backward(gs)
                    sd.backward(gs.to(dev))
                    flips = (sd.cpu() != s).float().mean().item()
                    a, b = xd.grad.cpu().float(), xc.grad.float()
                    ulps = ((a - b).abs() / (b.abs().clamp_min(1e-30) * eps)).max().item()
                    rows.append({"op": "lif", "dtype": str(dtype), **kw,
                                 "flipped_fraction": flips, "grad_max_ulps": ulps})
                    ok &= flips <= 1e-4 and ulps <= 1.0
        from bench_kernels import SC_DELTA, sc_problem

        v1, G, theta = sc_problem("data", 512 if dev == "cuda" else 64, 128, 96)
        v1, G = v1.to(dtype), G.to(dtype)
        a = sc_inference(v1, G, theta, SC_DELTA, 8, backend="cpu_shim")
        b = sc_inference(v1.to(dev), G.to(dev), theta, SC_DELTA, 8, backend=backend)
        exact = all(torch.equal(p, q.cpu()) for p, q in zip(a, b))
        rows.append({"op": "sc_inference", "dtype": str(dtype), "bit_exact": exact})
        S = (torch.rand(256, 1024, generator=g) < 0.05).to(torch.uint8)
        W = torch.randn(1024, 512, generator=g).to(dtype)
        out = spike_matmul(S.to(dev), W.to(dev), backend=backend, method="event").cpu()
        want = (S.float() @ W.float()).to(dtype)
        err = ((out.float() - want.float()).abs() / (want.float().abs() * eps + 1e-6)).max()
        rows.append({"op": "spike_matmul_uint8", "dtype": str(dtype), "max_ulps": err.item()})
        ok &= exact and err.item() <= 1.0
    return {"rows": rows, "ok": ok}


def _sj_shape_bench(dev: str, Ts, shape) -> list[dict]:
    """LIF forward + s.sum().backward() at SpikingJelly's benchmark shape, fp16 and bf16:
    ours vs SpikingJelly's torch / cupy / triton backends (LIFNode defaults, as its
    benchmark: tau = 2, hard reset; ours: beta = 0.5, reset "zero", the same bytes). On the
    CPU: cpu times, SpikingJelly's torch backend only."""
    import torch

    from hybridlm.kernels import lif_multistep

    timer = _cuda_time if dev == "cuda" else _cpu_time
    rows = []
    try:
        from spikingjelly.activation_based import functional, neuron
    except ImportError as e:
        neuron = None
        rows.append({"peer": "spikingjelly", "error": repr(e)})
    for dtype in (torch.float16, torch.bfloat16):
        for T in Ts:
            x = torch.rand(T, *shape, device=dev, dtype=dtype, requires_grad=True)

            def ours(x=x):
                x.grad = None
                lif_multistep(x, 0.5, 1.0, reset="zero").sum().backward()

            peers = {"ours": ours}
            for backend in (("torch", "cupy", "triton") if dev == "cuda" else ("torch",)):
                if neuron is None:
                    break
                try:
                    try:
                        net = neuron.LIFNode(backend=backend, step_mode="m")
                    except TypeError:  # SpikingJelly 2.0: no backend argument, its own op
                        if backend != "torch":
                            raise
                        net = neuron.LIFNode(step_mode="m")
                    net = net.to(device=dev, dtype=dtype)
                except Exception as e:  # noqa: BLE001 - a backend that is not importable
                    rows.append({"peer": f"sj_{backend}", "dtype": str(dtype), "T": T,
                                 "error": repr(e)[:300]})
                    continue

                def sj(net=net, x=x):
                    x.grad = None
                    net(x).sum().backward()
                    functional.reset_net(net)
                peers[f"sj_{backend}"] = sj
            for name, fn in peers.items():
                try:
                    ms = timer(fn, 5)
                    gbps = 5 * x.element_size() * x.numel() / ms / 1e6
                    rows.append({"peer": name, "dtype": str(dtype), "T": T,
                                 "shape": [T, *shape], "median_ms": ms, "gbps": gbps})
                except Exception as e:  # noqa: BLE001
                    rows.append({"peer": name, "dtype": str(dtype), "T": T,
                                 "error": repr(e)[:300]})
    return rows


def _cpu_time(fn, repeats: int = 5) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def step_precision(cpu: bool = False) -> dict:
    """Step 6 (module docstring); ``cpu``: the same code on the CPU, a small shape."""
    dev = "cpu" if cpu else "cuda"
    out = {"device": dev, "parity": _precision_parity(dev)}
    if cpu:
        out["sj_shape"] = _sj_shape_bench(dev, (4, 8), (4, 4096))
    else:
        out["copy_gbps"] = _copy_gbps()
        out["sj_shape"] = _sj_shape_bench(dev, SJ_T, SJ_SHAPE)
        for r in out["sj_shape"]:
            if "gbps" in r:
                r["pct_copy"] = 100 * r["gbps"] / out["copy_gbps"]
    rows = {(r["peer"], r["dtype"], r["T"]): r for r in out["sj_shape"] if "median_ms" in r}
    out["ratios_T32_fp16"] = {
        peer: rows[(peer, "torch.float16", 32)]["median_ms"]
        / rows[("ours", "torch.float16", 32)]["median_ms"]
        for peer in ("sj_torch", "sj_cupy", "sj_triton")
        if (peer, "torch.float16", 32) in rows and ("ours", "torch.float16", 32) in rows}
    out["ok"] = out["parity"]["ok"]
    return out


def step_bench(quick: bool) -> dict:
    copy_gbps = _copy_gbps()
    out = {"copy_gbps": copy_gbps, "byte_model": "20*T*N bytes (LIF fwd+bwd, fp32)", "lif": []}
    sizes = [(16, 1_572_864), (32, 16_777_216)] if not quick else [(16, 1_572_864)]
    for T, N in sizes:
        out["lif"] += _bench_lif(T, N, copy_gbps)
    out["propagation"] = _bench_propagation()
    faster = [r["rate"] for r in out["propagation"] if r["event_ms"] < r["dense_ms"]]
    out["crossover_cuda"] = max(faster) if faster else 0.0
    out["sc_inference"] = _bench_sc(quick)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-sanitizer", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smaller benchmark")
    ap.add_argument("--sanitizer-subset", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision-only", action="store_true",
                    help="only step 6 (bf16/fp16 parity and SpikingJelly-shape timings)")
    ap.add_argument("--cpu", action="store_true",
                    help="with --precision-only: run that step's code on the CPU (no GPU)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))  # bench_kernels.sc_problem
    if a.sanitizer_subset:
        sys.path.insert(0, str(ROOT))
        sanitizer_subset()
        return
    sys.path.insert(0, str(ROOT))
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = {}
    steps = [("env", step_env), ("tests", step_tests), ("parity", step_parity)]
    if not a.skip_sanitizer:
        steps.append(("sanitizer", step_sanitizer))
    steps.append(("bench", lambda: step_bench(a.quick)))
    steps.append(("precision", lambda: step_precision(a.cpu)))
    if a.precision_only:
        steps = steps[-1:]
    for name, fn in steps:
        t = time.time()
        try:
            res = fn()
        except Exception:  # noqa: BLE001
            res = {"error": traceback.format_exc()}
        res_seconds = time.time() - t
        _save(f"{name}.json", res)
        summary[name] = {"seconds": res_seconds,
                         "ok": res.get("ok", res.get("returncode", 0) == 0 and "error" not in res)}
        print(f"[gpu_check] {name}: {summary[name]}", flush=True)
    summary["total_seconds"] = time.time() - t0
    _save("summary.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
