"""Plain-torch reference of the neuron math: the single source of truth the kernels are
tested against, and the ``torch`` backend itself (loops over ``x.unbind(0)``, which keeps
autograd linear in T; indexing ``x[t]`` would make the backward quadratic).

Symbols: x [T, *] input current, v membrane (0 at start), h charged membrane, theta threshold,
u = h - theta, s = H(u) with H(u) = 1 if u > 0 else 0 (snntorch's convention; SpikingJelly
uses u >= 0, which differs only on exact ties).

Half precisions (bfloat16, float16) are storage, as in the kernels: the references compute in
float32 from the (already rounded) inputs and return their results in the inputs' dtype.
"""

from __future__ import annotations

import math

import torch

SURROGATES = ("atan", "fast_sigmoid")
RESETS = ("subtract", "zero")
DYNAMICS = ("standard", "snntorch")


HALF = (torch.bfloat16, torch.float16)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for the half types (what the kernels compute in), else t's own dtype."""
    return torch.float32 if t.dtype in HALF else t.dtype


def surrogate_constants(surrogate: str, alpha: float) -> tuple[float, float]:
    """(sa, sb) of the kernels: atan sa / (1 + (sb u)^2); fast_sigmoid 1 / (sb |u| + 1)^2."""
    if surrogate == "atan":
        return alpha / 2, math.pi / 2 * alpha
    if surrogate == "fast_sigmoid":
        return 0.0, float(alpha)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


class SpikeFn(torch.autograd.Function):
    """s = H(u) forward; surrogate derivative backward (snntorch.surrogate's formulas).

    atan(alpha):         dS/du = alpha / 2 / (1 + (pi / 2 * alpha * u)^2)
    fast_sigmoid(slope): dS/du = 1 / (slope * |u| + 1)^2       (alpha is the slope)
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (u,) = ctx.saved_tensors
        sa, sb = surrogate_constants(ctx.surrogate, ctx.alpha)
        if ctx.surrogate == "atan":
            return sa / (1 + (sb * u) ** 2) * g, None, None
        return g / (sb * u.abs() + 1) ** 2, None, None


def spike(u: torch.Tensor, surrogate: str = "atan", alpha: float = 2.0) -> torch.Tensor:
    return SpikeFn.apply(u, surrogate, alpha)


def lif_multistep_reference(x: torch.Tensor, beta: float, threshold: float = 1.0,
                            reset: str = "subtract", detach_reset: bool = False,
                            surrogate: str = "atan", alpha: float = 2.0,
                            dynamics: str = "standard") -> torch.Tensor:
    """Multi-step LIF over x [T, *] -> spikes [T, *]; see :func:`hybridlm.kernels.lif_multistep`.

    standard: h_t = beta v_{t-1} + x_t; s_t = H(h_t - theta);
              v_t = h_t - theta s_t (subtract) | h_t (1 - s_t) (zero)
    snntorch: U_t = beta U_{t-1} + x_t - S_{t-1} theta (subtract) |
              beta ((1 - S_{t-1}) U_{t-1}) + x_t (zero), S_{t-1} detached; S_t = H(U_t - theta)
    """
    dtype = x.dtype
    x = x.to(_compute_dtype(x))
    out = []
    if dynamics == "standard":
        v = torch.zeros_like(x[0])
        for xt in x.unbind(0):
            h = beta * v + xt
            s = spike(h - threshold, surrogate, alpha)
            sr = s.detach() if detach_reset else s
            v = h - threshold * sr if reset == "subtract" else h * (1 - sr)
            out.append(s)
    elif dynamics == "snntorch":
        u = torch.zeros_like(x[0])
        s_prev = torch.zeros_like(x[0])
        for xt in x.unbind(0):
            if reset == "subtract":
                u = beta * u + xt - s_prev * threshold
            else:
                u = beta * ((1 - s_prev) * u) + xt
            s = spike(u - threshold, surrogate, alpha)
            s_prev = s.detach()
            out.append(s)
    else:
        raise ValueError(f"dynamics must be one of {DYNAMICS}, got {dynamics!r}")
    return torch.stack(out).to(dtype)


def spike_matmul_reference(S: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Dense S [M, K] @ W [K, N] -> [M, N] in W's dtype (one-byte S is converted; half W is
    multiplied in float32 and the product rounded once, as the kernels do)."""
    acc = _compute_dtype(W)
    return (S.to(acc) @ W.to(acc)).to(W.dtype)


# ------------------------------------------------------------------------------------------
# spike-coding inference (the spiking predictive-coding layer, hybridlm.spiking)
# ------------------------------------------------------------------------------------------
SELECTION_LEVELS = 8  # proposals per step: all suprathreshold, then within 1/2, 1/4, ... of
# the best margin (levels 0..6), then the single best neuron (level 7)


@torch.no_grad()
def sc_select_reference(u: torch.Tensor, lateral: torch.Tensor, delta: float,
                        levels: int = SELECTION_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Which suprathreshold neurons spike this step, and the energy change they cause.

    u (M, N): margins V - theta; lateral (N, N): G = D^T D + mu I. For a set P,
        dF(P) = -delta sum_{i in P} u_i + delta^2 / 2 sum_{i in P} ((G 1_P)_i - G_ii),
    which is -delta u_i < 0 for a single neuron. Level j < levels - 1 proposes
    {i : u_i > 0, u_i >= (1 - 2^-j) max u}; the first proposal with dF < 0 is accepted; the
    last level is the single best neuron (ties: the lowest index). Returns (accepted (M, N)
    bool, dF (M,) of the accepted set, 0 where no neuron is above threshold).
    """
    m, n = u.shape
    cand = u > 0
    best, best_i = u.max(1)
    pending = cand.any(1)
    accepted = torch.zeros_like(cand)
    d_energy = u.new_zeros(m)
    diag = lateral.diagonal()
    for j in range(levels):
        rows = pending.nonzero().squeeze(1)
        if len(rows) == 0:
            break
        ur = u[rows]
        if j < levels - 1:
            proposal = cand[rows] & (ur >= best[rows, None] * (1 - 0.5 ** j))
        else:
            proposal = torch.zeros_like(cand[rows])
            proposal[torch.arange(len(rows)), best_i[rows]] = True
        p = proposal.to(u.dtype)
        q = p @ lateral  # (rows, N): G 1_P
        d = -delta * (ur * p).sum(1) + delta * delta / 2 * ((q - diag) * p).sum(1)
        ok = d < 0 if j < levels - 1 else torch.ones_like(d, dtype=torch.bool)
        accepted[rows[ok]] = proposal[ok]
        d_energy[rows[ok]] = d[ok]
        pending[rows[ok]] = False
    return accepted, d_energy


def sc_inference_reference(v1: torch.Tensor, lateral: torch.Tensor, theta: float,
                           delta: float, time_steps: int, surrogate: str = "atan",
                           alpha: float = 2.0, levels: int = SELECTION_LEVELS):
    """T steps of spike-coding inference from V_1 = D^T x_c; see hybridlm.spiking.

    v1 (M, N), lateral (N, N) = D^T D + mu I. Per step: u = V - theta; the accepted spikes
    s = sc_select(u); V <- V - delta G s; r <- r + delta s. Returns (r_T (M, N), spikes
    (T, M, N) bool, dF (T, M)). Differentiable w.r.t. v1 and lateral: s has the surrogate
    derivative of H(u) except at rejected candidates (a fixed selection mask: they get none).
    The backward treats the inhibition a spike sends to later steps as fixed (s is detached
    in the V update, as spiking nets detach their reset): through the lateral weights the
    surrogate derivatives compound by (I - delta G diag(sigma')) per step, whose eigenvalues
    reach delta * lambda_max(G) (about 137 for data-initialised atoms), and the gradient
    explodes (measured on SmolLM2 states at T = 8: 3.4e9 against 841 with the detach).
    """
    dtype = v1.dtype
    v1, lateral = v1.to(_compute_dtype(v1)), lateral.to(_compute_dtype(lateral))
    v, r = v1, torch.zeros_like(v1)
    spikes, d_energy = [], []
    for _ in range(time_steps):
        u = v - theta
        accepted, d = sc_select_reference(u.detach(), lateral.detach(), delta, levels)
        keep = (accepted | (u.detach() <= 0)).to(u.dtype)  # rejected candidates: no gradient
        s = spike(u, surrogate, alpha) * keep  # equals `accepted` in the forward
        v = v - delta * (s.detach() @ lateral)  # lateral weights still learn through V
        r = r + delta * s
        spikes.append(accepted)
        d_energy.append(d)
    return r.to(dtype), torch.stack(spikes), torch.stack(d_energy).to(dtype)
