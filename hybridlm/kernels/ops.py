"""Public kernel ops and the one dispatcher behind them.

Backends (argument ``backend=`` or env ``HYBRIDLM_BACKEND``; the argument wins):

- ``auto`` (default): CUDA tensors -> ``cuda``; CPU tensors -> ``cpu_shim`` when a C++
  compiler is present, else ``torch``. The CPU choice is the measured fastest
  (docs/kernels.md, bench/bench_kernels.py).
- ``cuda``: the .cu kernels through CuPy (NVRTC), on torch's current stream, zero-copy.
- ``cpu_shim``: the same .cu source compiled for the CPU with cuda_shim.h; the LIF runs the
  CPU tile schedule of the same step functions (1024-neuron tiles walked in 16-lane vector
  chunks, 16 time steps unrolled in registers), sc_inference its CPU twin (one token per
  task, the same sums in the same order as the GPU kernel, vectorised).
- ``cpu_shim_grid``: the GPU kernels themselves run on the CPU, one loop iteration per CUDA
  thread (slow; it exists to test the exact GPU code paths without a GPU).
- ``torch``: the plain-torch reference loop over ``x.unbind(0)`` (any device).
- ``compiled``: that loop under ``torch.compile`` (3-20 s to compile per distinct shape);
  sc_inference runs its reference eagerly (torch.compile cannot trace its selection).

Precisions (every op, every backend): float32, float64, bfloat16 and float16 tensors. The
inputs and weights of one call share one dtype (a mix is a ``ValueError`` naming both; cast
first, nothing is converted silently). Half precisions are storage only: the kernels load
them, compute and accumulate in float32 (float64 for float64), and round once what they
store, so a bf16/fp16 call computes what the float32 call computes from the same rounded
inputs. Outputs and gradients come back in the inputs' dtype; the exceptions, spikes stored
as one byte, are said where they occur (``lif_multistep(spike_dtype=torch.uint8)``,
``sc_inference``'s spikes, ``spike_matmul``'s uint8/bool S).
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
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SPIKE_DTYPES = (torch.uint8, torch.bool)  # one-byte spikes (bool is read as uint8)
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


# ------------------------------------------------------------------------------------------
# validation and dispatch
# ------------------------------------------------------------------------------------------

def _check_tensor(op: str, name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float64, bfloat16 or float16, got "
                        f"{t.dtype}")
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
    for key in ("beta", "threshold", "alpha"):
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
# team costs more than the work (measured on a former elementwise op: 32k elements took
# 0.37 ms on one thread, 8 ms on two on this loaded 2-core machine). Same order as torch's
# intra-op grain (32768).
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
    """The kernels' storage type of ``t`` and the numpy type of its accumulation scalars."""
    name = str(t.dtype).removeprefix("torch.")
    return _build.CTYPES[name], np.float64 if t.dtype == torch.float64 else np.float32


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

def _lif_fwd(x: torch.Tensor, cfg: _Neuron, backend: str, one_byte: bool) -> torch.Tensor:
    T = x.shape[0]
    N = x.numel() // T
    c, F = _ctype(x)
    s = empty_output(x.shape, x.new_empty(0, dtype=torch.uint8) if one_byte else x)
    if N == 0:
        return s
    grid, block, tile = _grid(N, backend)
    dyn = int(cfg.dynamics == "snntorch")
    o = _build.SPIKE_BYTE if one_byte else c
    name = f"hl::lif_fwd{'_tile' if tile else ''}<{c},{o},{dyn},{int(cfg.reset == 'zero')}>"
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
    # the state entering each 16-step segment after the first, in the accumulation type
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    ck = empty_output((max(1, (T - 1) // 16), N), x.new_empty(0, dtype=acc))
    grid, block, tile = _grid(N, backend)
    dyn = int(cfg.dynamics == "snntorch")
    # snntorch dynamics: the backward of the standard dynamics with a detached reset.
    detach = int(cfg.detach_reset or dyn)
    sa, sb = ref.surrogate_constants(cfg.surrogate, cfg.alpha)
    name = (f"hl::lif_bwd{'_tile' if tile else ''}<{c},{dyn},{int(cfg.reset == 'zero')},"
            f"{detach},{int(cfg.surrogate == 'fast_sigmoid')}>")
    _launch(backend, name, grid, block,
            (x, gs, gx, ck, np.int32(T), np.int64(N), F(cfg.beta), F(cfg.threshold), F(sa),
             F(sb)),
            x.device, T * N)
    return gx


class _LIFMultistep(torch.autograd.Function):
    # Saves x itself (a reference the caller holds anyway, no copy); the backward recomputes
    # h from it. Modifying x in place between forward and backward is caught by autograd's
    # version check.
    @staticmethod
    def forward(ctx, x, cfg: _Neuron, backend: str):
        s = _lif_fwd(x, cfg, backend, one_byte=False)
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
                  backend: str | None = None,
                  spike_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Multi-step leaky integrate-and-fire neurons, fused over time.

    Args:
        x: input current, time first, shape (T, *), float32, float64, bfloat16 or float16,
            contiguous. The membrane is kept and computed in float32 (float64 for float64):
            a half-precision x gives exactly the spikes of x.float().
        beta: membrane decay. threshold: firing threshold theta.
        reset: "subtract" (v = h - theta s) or "zero" (v = h (1 - s)).
        detach_reset: the spike in the reset term carries no gradient.
        surrogate: "atan" (dS/du = alpha/2 / (1 + (pi/2 alpha u)^2)) or "fast_sigmoid"
            (dS/du = 1 / (alpha |u| + 1)^2, alpha is the slope, e.g. 25).
        dynamics: "standard": h_t = beta v_{t-1} + x_t, s_t = H(h_t - theta), v_t = reset;
            "snntorch": snntorch.Leaky's U_t = beta U_{t-1} + x_t - S_{t-1} theta (reset
            from the previous spike, undecayed, always detached), S_t = H(U_t - theta).
        backend: see the module docstring; None reads $HYBRIDLM_BACKEND (default "auto").
        spike_dtype: None (x's dtype, differentiable) or torch.uint8: spikes in one byte
            (4x fewer bytes written than float32, 2x fewer than bf16), for consumers that read
            bytes (``spike_matmul``'s S) and carry no gradient: an integer tensor cannot, so
            it is refused while x requires grad.

    Returns:
        spikes s, shape (T, *), values in {0, 1}, dtype x.dtype (or spike_dtype); H(u) = 1
        iff u > 0. The membrane starts at 0. Backward: grad_x in x's dtype (computed in
        float32 from the incoming gradient, rounded once). Memory: nothing is allocated for
        backward; when x needs grad, autograd keeps a reference to x (no copy) and the
        backward recomputes h from it.
    """
    op = "lif_multistep"
    _check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{op}: x must have a time dimension T >= 1, got shape {tuple(x.shape)}")
    cfg = _Neuron(beta=float(beta), threshold=float(threshold), reset=reset,
                  detach_reset=bool(detach_reset), surrogate=surrogate, alpha=float(alpha),
                  dynamics=dynamics)
    _check_neuron(op, cfg)
    one_byte = spike_dtype is not None and spike_dtype != x.dtype
    if one_byte and spike_dtype != torch.uint8:
        raise ValueError(f"{op}: spike_dtype must be None (x's dtype) or torch.uint8, got "
                         f"{spike_dtype}")
    if one_byte and x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: spike_dtype=torch.uint8 gives spikes without a gradient, but "
                         f"x requires grad; leave spike_dtype=None to train through the "
                         f"spikes (or call under torch.no_grad())")
    b = resolve_backend(backend, x, op)
    if b in ("torch", "compiled"):
        fn = ref.lif_multistep_reference if b == "torch" else _compiled(
            ref.lif_multistep_reference)
        s = fn(x, beta=cfg.beta, threshold=cfg.threshold, reset=cfg.reset,
               detach_reset=cfg.detach_reset, surrogate=cfg.surrogate, alpha=cfg.alpha,
               dynamics=cfg.dynamics)
        return s.to(torch.uint8) if one_byte else s
    if one_byte:
        return _lif_fwd(x, cfg, b, one_byte=True)
    return _LIFMultistep.apply(x, cfg, b)


# ------------------------------------------------------------------------------------------
# spike propagation
# ------------------------------------------------------------------------------------------

def _spike_matmul_launch(kind: str, a: torch.Tensor, b: torch.Tensor, M: int, K: int, N: int,
                         backend: str) -> torch.Tensor:
    """kind "fwd": out [M, N] = S [M, K] @ W [K, N]; "grad_w": gW [K, N] = S^T @ gout [M, N]."""
    c, _ = _ctype(b)
    p = _build.SPIKE_BYTE if a.dtype == torch.uint8 else c
    rows = K if kind == "grad_w" else M
    out = empty_output((rows, N), b)
    if out.numel() == 0:
        return out.zero_()
    if backend == "cpu_shim":
        name, grid, block = f"hl::spike_matmul_{kind}_rows<{c},{p}>", rows, 1
    else:
        name = f"hl::spike_matmul_{kind}<{c},{p}>"
        grid, block = (-(-N // _BLOCK), rows), _BLOCK
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
        gS = g @ W.t() if ctx.needs_input_grad[0] else None  # S float: it may need one
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

    Shapes: S (M, K), normally binary spikes, W (K, N) -> out (M, N); contiguous, on one
    device. W is float32, float64, bfloat16 or float16 and out has W's dtype (summed in
    float32, or float64, rounded once). S has W's dtype, or is one byte per spike (uint8 or
    bool, read directly by the event kernel: no float copy; such S has no gradient, W
    still does). ``method``: "event" accumulates only W's rows of nonzero spikes, scaled by
    the spike value (exact for binary spikes), in increasing k (deterministic); "dense" is a
    GEMM; "auto" takes "event" when the measured spike rate is
    at most ``SPIKE_MATMUL_CROSSOVER[device]``. Backward: grad_S = grad_out @ W^T (dense),
    grad_W = S^T @ grad_out (event-driven on the event path).
    """
    op = "spike_matmul"
    _check_tensor(op, "W", W, ndim=2)
    if isinstance(S, torch.Tensor) and S.dtype in SPIKE_DTYPES:
        if S.dim() != 2 or not S.is_contiguous():
            raise ValueError(f"{op}: S must be 2-D and contiguous, got shape "
                             f"{tuple(S.shape)}, strides {S.stride()}")
        if S.device != W.device:
            raise ValueError(f"{op}: S is on {S.device} but W is on {W.device}")
        S = S.view(torch.uint8)  # bool is one byte, 0 or 1: the same kernel reads it
    else:
        _check_tensor(op, "S", S, ndim=2)
        _check_same(op, ("S", "W"), (S, W), shape=False)
    if S.shape[1] != W.shape[0]:
        raise ValueError(f"{op}: S is {tuple(S.shape)} and W is {tuple(W.shape)}: S.shape[1] "
                         f"must equal W.shape[0]")
    if method not in ("auto", "event", "dense"):
        raise ValueError(f"{op}: method must be 'auto', 'event' or 'dense', got {method!r}")
    b = resolve_backend(backend, W, op)
    if b in ("torch", "compiled") or method == "dense":
        return ref.spike_matmul_reference(S, W)
    if method == "auto":
        if spike_rate(S) > SPIKE_MATMUL_CROSSOVER.get(_device_type(S), 0.0):
            return ref.spike_matmul_reference(S, W)
    return _SpikeMatmulEvent.apply(S, W, b)


# ------------------------------------------------------------------------------------------
# spike-coding inference (the spiking predictive-coding layer)
# ------------------------------------------------------------------------------------------

_SC_BLOCK = 64  # tokens per block on the GPU: one thread per token, so M = 2048 makes 32 blocks


@dataclasses.dataclass(frozen=True)
class _SC:
    theta: float
    delta: float
    time_steps: int
    surrogate: str
    alpha: float


def _sc_forward(v1: torch.Tensor, lateral: torch.Tensor, cfg: _SC, backend: str, save: bool):
    """Launch the fused kernel: (r_T (M, N), spikes (T, M, N) uint8, dF (T, M), dsdu
    (T, M, N) = surrogate'(u_t) * keep_t, or None unless ``save``); r, dF and dsdu in v1's
    dtype."""
    M, N = v1.shape
    T = cfg.time_steps
    c, F = _ctype(v1)
    u8, i32 = v1.new_empty(0, dtype=torch.uint8), v1.new_empty(0, dtype=torch.int32)
    r = empty_output((M, N), v1)
    spk = empty_output((T, M, N), u8)
    dF = empty_output((T, M), v1)
    dsdu = empty_output((T, M, N), v1) if save else None
    if M == 0:
        return r, spk, dF, dsdu
    # scratch: the membrane (and on the CPU twin a float membership mask), the member lists
    acc = v1.new_empty(0, dtype=torch.float64 if v1.dtype == torch.float64 else torch.float32)
    V = empty_output((M, 2 * N if backend == "cpu_shim" else N), acc)
    P = empty_output((M, N), i32)
    R = r if r.dtype == acc.dtype else empty_output((M, N), acc)  # r's running sum
    sa, sb = ref.surrogate_constants(cfg.surrogate, cfg.alpha)
    sg = int(cfg.surrogate == "fast_sigmoid")
    if backend == "cpu_shim":
        name, grid, block = f"hl::sc_fwd_rows<{c},{sg}>", M, 1
    else:
        name, grid, block = f"hl::sc_fwd<{c},{sg}>", -(-M // _SC_BLOCK), _SC_BLOCK
    d = cfg.delta
    _launch(backend, name, grid, block,
            (v1, lateral, V, P, R, r, spk, dF, dsdu if save else v1.new_empty(1), np.int32(M),
             np.int32(N), np.int32(T), F(cfg.theta), F(d), F(-d), F(d * d / 2), F(sa), F(sb),
             np.int32(save)), v1.device, T * M * N)
    return r, spk, dF, dsdu


class _SCInference(torch.autograd.Function):
    """Forward: the fused kernel. Backward, dense torch, as the reference's autograd: the
    inhibition a spike sends to later steps is detached (V_{k+1} = V_k - delta s_k.detach() G),
    so V's gradient passes through a step unchanged and only G learns through the update.
    With 0-based steps k = T-1..0, gV_T = 0, s_k the spikes and dsdu_k = surrogate'(u_k)
    keep_k (the kernel's saved factor):

        gG  -= delta s_k^T @ gV_{k+1}                  (V_{k+1} = V_k - delta s_k @ G)
        gV_k = gV_{k+1} + delta g_r * dsdu_k           (r_T = delta sum_k s_k, u_k = V_k - theta)

    and grad v1 = gV_0. The selection is a fixed mask (the reference selects on detached
    tensors). Saves G itself, the spikes as uint8 and dsdu (in v1's dtype). The sums run in
    float32 for the half types (float64 for float64); the gradients come back in the
    inputs' dtype."""

    @staticmethod
    def forward(ctx, v1, lateral, cfg: _SC, backend: str):
        save = any(ctx.needs_input_grad[:2])
        r, spk, dF, dsdu = _sc_forward(v1, lateral, cfg, backend, save)
        spikes = spk.view(torch.bool)
        ctx.mark_non_differentiable(spikes, dF)
        if save:
            ctx.save_for_backward(lateral, spk, dsdu)
        ctx.cfg = cfg
        return r, spikes, dF

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_r, _g_spikes, _g_dF):
        lateral, spk, dsdu = ctx.saved_tensors
        delta = ctx.cfg.delta
        acc = torch.float64 if lateral.dtype == torch.float64 else torch.float32
        g_rd = g_r.contiguous().to(acc) * delta  # dL/ds_k from r_T, the same at every step
        if not ctx.needs_input_grad[1]:
            return (g_rd * dsdu.sum(0, dtype=acc)).to(lateral.dtype), None, None, None
        gG = torch.zeros_like(lateral, dtype=acc)
        s = torch.empty_like(g_rd)  # one step's spikes as floats
        gV = None  # dL/dV_{k+1}; 0 after the last step
        for k in reversed(range(spk.shape[0])):
            if gV is not None:
                gG.addmm_(s.copy_(spk[k]).t(), gV, alpha=-delta)
            g_u = g_rd * dsdu[k]  # promoted to acc: dsdu is in v1's dtype
            gV = g_u if gV is None else gV.add_(g_u)
        return gV.to(lateral.dtype), gG.to(lateral.dtype), None, None


def sc_inference(v1: torch.Tensor, lateral: torch.Tensor, theta: float, delta: float,
                 time_steps: int, surrogate: str = "atan", alpha: float = 2.0,
                 backend: str | None = None):
    """T steps of spike-coding inference; the math is :func:`reference.sc_inference_reference`.

    Shapes: v1 (M, N) = D^T x_c per token, lateral (N, N) = D^T D + mu I (symmetric), same
    dtype (float32, float64, bfloat16, float16) and device, contiguous. Returns (r_T (M, N),
    spikes (T, M, N) bool (one byte each), dF (T, M)), r_T and dF in v1's dtype, r_T
    differentiable w.r.t. v1 and lateral (surrogate gradient through the accepted spikes).
    Half precisions: the membrane and every sum in float32 (the spikes are those of the
    float32 call on the same rounded inputs); the backward sums in float32 and returns the
    gradients in the inputs' dtype.

    Backends ``cpu_shim``, ``cpu_shim_grid`` and ``cuda`` run the fused kernel
    (spike_coding.cu: one thread per token, all T steps, event-driven selection and update)
    with a dense-torch backward; ``torch`` runs the reference. ``compiled`` runs the reference
    eagerly too: torch.compile (2.13) skips both of its frames (``nonzero`` and
    ``if len(rows) == 0`` are data-dependent, and a graph break inside a loop skips the whole
    frame, even with ``capture_dynamic_output_shape_ops``), so compiling it only added
    overhead (0.90 against 0.68 s at M = 256, N = 128).
    """
    op = "sc_inference"
    _check_tensor(op, "v1", v1, ndim=2)
    _check_tensor(op, "lateral", lateral, ndim=2)
    _check_same(op, ("v1", "lateral"), (v1, lateral), shape=False)
    n = v1.shape[1]
    if n == 0:
        raise ValueError(f"{op}: v1 must have at least one neuron, got shape {tuple(v1.shape)}")
    if lateral.shape != (n, n):
        raise ValueError(f"{op}: lateral is {tuple(lateral.shape)}, expected ({n}, {n})")
    if int(time_steps) != time_steps or time_steps < 1:
        raise ValueError(f"{op}: time_steps must be an integer >= 1, got {time_steps}")
    for name, v in (("theta", theta), ("delta", delta)):
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{op}: {name} must be finite and > 0, got {v}")
    if surrogate not in ref.SURROGATES:
        raise ValueError(f"{op}: surrogate must be one of {ref.SURROGATES}, got {surrogate!r}")
    if not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha must be a finite number, got {alpha!r}")
    cfg = _SC(theta=float(theta), delta=float(delta), time_steps=int(time_steps),
              surrogate=surrogate, alpha=float(alpha))
    b = resolve_backend(backend, v1, op)
    if b in ("torch", "compiled"):
        return ref.sc_inference_reference(v1, lateral, theta=cfg.theta, delta=cfg.delta,
                                          time_steps=cfg.time_steps, surrogate=cfg.surrogate,
                                          alpha=cfg.alpha)
    return _SCInference.apply(v1, lateral, cfg, b)
