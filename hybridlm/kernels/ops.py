"""Public kernel ops and the one dispatcher behind them.

Backends (argument ``backend=`` or env ``HYBRIDLM_BACKEND``; the argument wins):

- ``auto`` (default): CUDA tensors -> ``cuda``; CPU tensors -> ``cpu_shim`` when a C++
  compiler is present, else ``torch``. The CPU choice is the measured fastest
  (docs/kernels.md, bench/bench_kernels.py).
- ``cuda``: the .cu kernels through CuPy (NVRTC), on torch's current stream, zero-copy.
- ``cpu_shim``: the same .cu source compiled for the CPU with cuda_shim.h; the LIF runs the
  CPU tile schedule of the same step functions (1024-neuron tiles walked in 16-lane vector
  chunks, 16 time steps unrolled in registers).
- ``cpu_shim_grid``: the GPU kernels themselves run on the CPU, one loop iteration per CUDA
  thread (slow; it exists to test the exact GPU code paths without a GPU).
- ``torch``: the plain-torch reference loop over ``x.unbind(0)`` (any device).
- ``compiled``: that loop under ``torch.compile`` (3-20 s to compile per distinct shape).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import torch

from hybridlm.kernels import _build
from hybridlm.kernels import reference as ref
from hybridlm.kernels.pool import empty_output

BACKENDS = ("auto", "torch", "compiled", "cpu_shim", "cpu_shim_grid", "cuda")
_BLOCK = 256  # CUDA threads per block for the grid kernels

# Spike rate at or below which spike_matmul takes the event-driven kernel instead of the dense
# GEMM. CPU: bench/bench_kernels.py propagation table (M=1024, K=2048, N=1024, float32; 1 and
# 2 threads, docs/kernels.md): the event-driven row kernel beat dense torch matmul at every
# measured rate up to 20% (19 ms vs 38 ms at 20%, 1 thread); above 20% is unmeasured, so dense.
# CUDA: not measured (no GPU was lent when this was written); until bench/gpu_check.py
# measures it ("crossover_cuda"), CUDA uses dense cuBLAS (crossover 0).
SPIKE_MATMUL_CROSSOVER = {"cpu": 0.2, "cuda": 0.0}


@dataclasses.dataclass(frozen=True)
class _Neuron:
    beta: float
    threshold: float
    reset: str
    detach_reset: bool
    surrogate: str
    alpha: float
    dynamics: str = "standard"
    gamma: float = 0.0


# ------------------------------------------------------------------------------------------
# validation and dispatch
# ------------------------------------------------------------------------------------------

def _check_tensor(op: str, name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (shape {tuple(t.shape)}, strides "
                         f"{t.stride()}); call .contiguous() first")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_same(op: str, names: tuple[str, ...], ts: tuple[torch.Tensor, ...],
                shape: bool = True) -> None:
    for n, t in zip(names[1:], ts[1:]):
        if shape and t.shape != ts[0].shape:
            raise ValueError(f"{op}: {n} has shape {tuple(t.shape)} but {names[0]} has "
                             f"{tuple(ts[0].shape)}")
        if t.dtype != ts[0].dtype or t.device != ts[0].device:
            raise ValueError(f"{op}: {n} is {t.dtype} on {t.device} but {names[0]} is "
                             f"{ts[0].dtype} on {ts[0].device}")


def _check_neuron(op: str, cfg: _Neuron) -> None:
    for key, allowed in (("reset", ref.RESETS), ("surrogate", ref.SURROGATES),
                         ("dynamics", ref.DYNAMICS)):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{op}: {key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    for key in ("beta", "threshold", "alpha", "gamma"):
        val = getattr(cfg, key)
        if not isinstance(val, (int, float)) or not math.isfinite(val):
            raise ValueError(f"{op}: {key} must be a finite number, got {val!r}")


def _device_type(t: torch.Tensor) -> str:
    return t.device.type


def resolve_backend(backend: str | None, t: torch.Tensor, op: str = "kernel") -> str:
    """The concrete backend for tensor ``t``: the argument, else $HYBRIDLM_BACKEND, else auto."""
    b = backend if backend is not None else os.environ.get("HYBRIDLM_BACKEND", "auto")
    if b not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {b!r}")
    dev = _device_type(t)
    if dev == "cuda":
        if b in ("auto", "cuda"):
            from hybridlm.kernels._cuda import require_cupy
            require_cupy()
            return "cuda"
        if b in ("cpu_shim", "cpu_shim_grid"):
            raise ValueError(f"{op}: backend {b!r} needs CPU tensors, got a tensor on {t.device}")
        return b
    if dev != "cpu":
        raise ValueError(f"{op}: tensors on {t.device} are not supported")
    if b == "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got a tensor on {t.device}")
    if b == "auto":
        return "cpu_shim" if _build.find_cxx() is not None else "torch"
    return b


# Below this many elements of work a CPU launch runs on the calling thread: waking the OpenMP
# team costs more than the work (measured: a 32k-element pc_step took 0.37 ms on one thread,
# 8 ms on two on this loaded 2-core machine). Same order as torch's intra-op grain (32768).
_PARALLEL_MIN_WORK = 1 << 16


def _launch(backend: str, name: str, grid, block, args: tuple, device: torch.device,
            work: int) -> None:
    _build.check_scalar_args(name, args)
    if backend == "cuda":
        from hybridlm.kernels import _cuda
        _cuda.launch(name, grid, block, args, device)
    else:
        _build.load_shim().launch(name, grid, block, args,
                                  parallel=work >= _PARALLEL_MIN_WORK)


def _ctype(t: torch.Tensor) -> tuple[str, type]:
    return ("float", np.float32) if t.dtype == torch.float32 else ("double", np.float64)


def _grid(n: int, backend: str) -> tuple[int, int, bool]:
    """(grid, block, tile) for n neurons: tile kernels on cpu_shim, grid kernels otherwise."""
    if backend == "cpu_shim":
        return -(-n // _build.SHIM_TILE), 1, True
    return -(-n // _BLOCK), _BLOCK, False


_compiled_cache: dict = {}


def _compiled(fn):
    if fn not in _compiled_cache:
        _compiled_cache[fn] = torch.compile(fn, dynamic=False)
    return _compiled_cache[fn]


# ------------------------------------------------------------------------------------------
# LIF multi-step
# ------------------------------------------------------------------------------------------

def _lif_fwd(x: torch.Tensor, cfg: _Neuron, backend: str) -> torch.Tensor:
    T = x.shape[0]
    N = x.numel() // T
    c, F = _ctype(x)
    s = empty_output(x.shape, x)
    if N == 0:
        return s
    grid, block, tile = _grid(N, backend)
    dyn = int(cfg.dynamics == "snntorch")
    name = f"hl::lif_fwd{'_tile' if tile else ''}<{c},{dyn},{int(cfg.reset == 'zero')}>"
    _launch(backend, name, grid, block,
            (x, s, np.int32(T), np.int64(N), F(cfg.beta), F(cfg.threshold)), x.device, T * N)
    return s


def _lif_bwd(x: torch.Tensor, gs: torch.Tensor, cfg: _Neuron, backend: str) -> torch.Tensor:
    """grad_x from x itself: the kernels recompute h (nothing was saved by the forward)."""
    T = x.shape[0]
    N = x.numel() // T
    c, F = _ctype(x)
    gx = empty_output(x.shape, x)
    if N == 0:
        return gx
    grid, block, tile = _grid(N, backend)
    dyn = int(cfg.dynamics == "snntorch")
    # snntorch dynamics: the backward of the standard dynamics with a detached reset.
    detach = int(cfg.detach_reset or dyn)
    sa, sb = ref.surrogate_constants(cfg.surrogate, cfg.alpha)
    name = (f"hl::lif_bwd{'_tile' if tile else ''}<{c},{dyn},{int(cfg.reset == 'zero')},"
            f"{detach},{int(cfg.surrogate == 'fast_sigmoid')}>")
    _launch(backend, name, grid, block,
            (x, gs, gx, np.int32(T), np.int64(N), F(cfg.beta), F(cfg.threshold), F(sa), F(sb)),
            x.device, T * N)
    return gx


class _LIFMultistep(torch.autograd.Function):
    # Saves x itself (a reference the caller holds anyway, no copy); the backward recomputes
    # h from it. Modifying x in place between forward and backward is caught by autograd's
    # version check.
    @staticmethod
    def forward(ctx, x, cfg: _Neuron, backend: str):
        s = _lif_fwd(x, cfg, backend)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)
        ctx.cfg, ctx.backend = cfg, backend
        return s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gs):
        (x,) = ctx.saved_tensors
        return _lif_bwd(x, gs.contiguous(), ctx.cfg, ctx.backend), None, None


def lif_multistep(x: torch.Tensor, beta: float, threshold: float = 1.0,
                  reset: str = "subtract", detach_reset: bool = False,
                  surrogate: str = "atan", alpha: float = 2.0, dynamics: str = "standard",
                  backend: str | None = None) -> torch.Tensor:
    """Multi-step leaky integrate-and-fire neurons, fused over time.

    Args:
        x: input current, time first, shape (T, *), float32 (or float64), contiguous.
        beta: membrane decay. threshold: firing threshold theta.
        reset: "subtract" (v = h - theta s) or "zero" (v = h (1 - s)).
        detach_reset: the spike in the reset term carries no gradient.
        surrogate: "atan" (dS/du = alpha/2 / (1 + (pi/2 alpha u)^2)) or "fast_sigmoid"
            (dS/du = 1 / (alpha |u| + 1)^2, alpha is the slope, e.g. 25).
        dynamics: "standard": h_t = beta v_{t-1} + x_t, s_t = H(h_t - theta), v_t = reset;
            "snntorch": snntorch.Leaky's U_t = beta U_{t-1} + x_t - S_{t-1} theta (reset
            from the previous spike, undecayed, always detached), S_t = H(U_t - theta).
        backend: see the module docstring; None reads $HYBRIDLM_BACKEND (default "auto").

    Returns:
        spikes s, shape (T, *), same dtype, values in {0, 1}; H(u) = 1 iff u > 0. The membrane
        starts at 0. Memory: nothing is allocated for backward; when x needs grad, autograd
        keeps a reference to x (no copy) and the backward recomputes h from it.
    """
    op = "lif_multistep"
    _check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{op}: x must have a time dimension T >= 1, got shape {tuple(x.shape)}")
    cfg = _Neuron(float(beta), float(threshold), reset, bool(detach_reset), surrogate,
                  float(alpha), dynamics)
    _check_neuron(op, cfg)
    b = resolve_backend(backend, x, op)
    if b in ("torch", "compiled"):
        fn = ref.lif_multistep_reference if b == "torch" else _compiled(
            ref.lif_multistep_reference)
        return fn(x, cfg.beta, cfg.threshold, reset, cfg.detach_reset, surrogate, cfg.alpha,
                  dynamics)
    return _LIFMultistep.apply(x, cfg, b)


# ------------------------------------------------------------------------------------------
# predictive-coding step
# ------------------------------------------------------------------------------------------

class _PCStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, I, v, r, cfg: _Neuron, backend: str):  # noqa: E741
        n = I.numel()
        c, F = _ctype(I)
        s, v_new, r_new, h = (empty_output(I.shape, I) for _ in range(4))
        if n:
            grid, block, tile = _grid(n, backend)
            name = f"hl::pc_fwd{'_tile' if tile else ''}<{c},{int(cfg.reset == 'zero')}>"
            _launch(backend, name, grid, block,
                    (I, v, r, s, v_new, r_new, h, np.int64(n), F(cfg.beta), F(cfg.threshold),
                     F(cfg.gamma), F(1.0 - cfg.gamma)), I.device, n)
        ctx.save_for_backward(h)
        ctx.cfg, ctx.backend = cfg, backend
        return s, v_new, r_new

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gs, gv_new, gr_new):
        (h,) = ctx.saved_tensors
        cfg = ctx.cfg
        n = h.numel()
        c, F = _ctype(h)
        gI, gv, gr = (empty_output(h.shape, h) for _ in range(3))
        if n:
            sa, sb = ref.surrogate_constants(cfg.surrogate, cfg.alpha)
            grid, block, tile = _grid(n, ctx.backend)
            name = (f"hl::pc_bwd{'_tile' if tile else ''}<{c},{int(cfg.reset == 'zero')},"
                    f"{int(cfg.detach_reset)},{int(cfg.surrogate == 'fast_sigmoid')}>")
            _launch(ctx.backend, name, grid, block,
                    (gs.contiguous(), gv_new.contiguous(), gr_new.contiguous(), h, gI, gv, gr,
                     np.int64(n), F(cfg.beta), F(cfg.threshold), F(cfg.gamma),
                     F(1.0 - cfg.gamma), F(sa), F(sb)), h.device, n)
        return gI, gv, gr, None, None


def pc_step(I: torch.Tensor, v: torch.Tensor, r: torch.Tensor, beta: float,  # noqa: E741
            threshold: float = 1.0, gamma: float = 0.9, reset: str = "subtract",
            detach_reset: bool = False, surrogate: str = "atan", alpha: float = 2.0,
            backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One fused predictive-coding neuron step (standard LIF dynamics plus a spike trace).

    Shapes: I, v, r all (*) (any shape, same dtype/device, contiguous).
        h = beta v + I ; s = H(h - theta) ; v' = h - theta s (subtract) | h (1 - s) (zero)
        r' = gamma r + (1 - gamma) s
    Returns (s, v', r'), each shaped like I; differentiable w.r.t. I, v and r (through s with
    the surrogate; see :func:`lif_multistep` for ``surrogate``/``alpha``/``detach_reset``).
    """
    op = "pc_step"
    for name, t in (("I", I), ("v", v), ("r", r)):
        _check_tensor(op, name, t)
    _check_same(op, ("I", "v", "r"), (I, v, r))
    cfg = _Neuron(float(beta), float(threshold), reset, bool(detach_reset), surrogate,
                  float(alpha), "standard", float(gamma))
    _check_neuron(op, cfg)
    b = resolve_backend(backend, I, op)
    if b in ("torch", "compiled"):
        fn = ref.pc_step_reference if b == "torch" else _compiled(ref.pc_step_reference)
        return fn(I, v, r, cfg.beta, cfg.threshold, cfg.gamma, reset, cfg.detach_reset,
                  surrogate, cfg.alpha)
    return _PCStep.apply(I, v, r, cfg, b)


# ------------------------------------------------------------------------------------------
# spike propagation
# ------------------------------------------------------------------------------------------

def _spike_matmul_launch(kind: str, a: torch.Tensor, b: torch.Tensor, M: int, K: int, N: int,
                         backend: str) -> torch.Tensor:
    """kind "fwd": out [M, N] = S [M, K] @ W [K, N]; "grad_w": gW [K, N] = S^T @ gout [M, N]."""
    c, _ = _ctype(a)
    rows = K if kind == "grad_w" else M
    out = empty_output((rows, N), a)
    if out.numel() == 0:
        return out.zero_()
    if backend == "cpu_shim":
        name, grid, block = f"hl::spike_matmul_{kind}_rows<{c}>", rows, 1
    else:
        name, grid, block = f"hl::spike_matmul_{kind}<{c}>", (-(-N // _BLOCK), rows), _BLOCK
    _launch(backend, name, grid, block, (a, b, out, np.int32(M), np.int32(K), np.int32(N)),
            a.device, M * N * K // 16)
    return out


class _SpikeMatmulEvent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, S, W, backend: str):
        M, K = S.shape
        N = W.shape[1]
        ctx.save_for_backward(S, W)
        ctx.backend = backend
        return _spike_matmul_launch("fwd", S, W, M, K, N, backend)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        S, W = ctx.saved_tensors
        g = g.contiguous()
        gS = g @ W.t() if ctx.needs_input_grad[0] else None
        gW = None
        if ctx.needs_input_grad[1]:
            M, K = S.shape
            gW = _spike_matmul_launch("grad_w", S, g, M, K, W.shape[1], ctx.backend)
        return gS, gW, None


def spike_rate(S: torch.Tensor) -> float:
    """Fraction of nonzero entries of S (one pass over S; a host sync on CUDA)."""
    return float(torch.count_nonzero(S)) / max(1, S.numel())


def spike_matmul(S: torch.Tensor, W: torch.Tensor, backend: str | None = None,
                 method: str = "auto") -> torch.Tensor:
    """Spike propagation out = S @ W, event-driven for sparse spikes.

    Shapes: S (M, K), normally binary spikes, W (K, N) -> out (M, N); same dtype and device,
    contiguous. ``method``: "event" accumulates only W's rows of nonzero spikes, scaled by
    the spike value (exact for binary spikes), in increasing k (deterministic); "dense" is a
    GEMM; "auto" takes "event" when the measured spike rate is
    at most ``SPIKE_MATMUL_CROSSOVER[device]``. Backward: grad_S = grad_out @ W^T (dense),
    grad_W = S^T @ grad_out (event-driven on the event path).
    """
    op = "spike_matmul"
    _check_tensor(op, "S", S, ndim=2)
    _check_tensor(op, "W", W, ndim=2)
    _check_same(op, ("S", "W"), (S, W), shape=False)
    if S.shape[1] != W.shape[0]:
        raise ValueError(f"{op}: S is {tuple(S.shape)} and W is {tuple(W.shape)}: S.shape[1] "
                         f"must equal W.shape[0]")
    if method not in ("auto", "event", "dense"):
        raise ValueError(f"{op}: method must be 'auto', 'event' or 'dense', got {method!r}")
    b = resolve_backend(backend, S, op)
    if b in ("torch", "compiled") or method == "dense":
        return S @ W
    if method == "auto":
        if spike_rate(S) > SPIKE_MATMUL_CROSSOVER.get(_device_type(S), 0.0):
            return S @ W
    return _SpikeMatmulEvent.apply(S, W, b)
