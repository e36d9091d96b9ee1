"""Plain-torch reference of the neuron math: the single source of truth the kernels are
tested against, and the ``torch`` backend itself (loops over ``x.unbind(0)``, which keeps
autograd linear in T; indexing ``x[t]`` would make the backward quadratic).

Symbols: x [T, *] input current, v membrane (0 at start), h charged membrane, theta threshold,
u = h - theta, s = H(u) with H(u) = 1 if u > 0 else 0 (snntorch's convention; SpikingJelly
uses u >= 0, which differs only on exact ties).
"""

from __future__ import annotations

import math

import torch

SURROGATES = ("atan", "fast_sigmoid")
RESETS = ("subtract", "zero")
DYNAMICS = ("standard", "snntorch")


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
    return torch.stack(out)


def pc_step_reference(I: torch.Tensor, v: torch.Tensor, r: torch.Tensor, beta: float,  # noqa: E741
                      threshold: float = 1.0, gamma: float = 0.9, reset: str = "subtract",
                      detach_reset: bool = False, surrogate: str = "atan",
                      alpha: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One predictive-coding step; see :func:`hybridlm.kernels.pc_step`."""
    h = beta * v + I
    s = spike(h - threshold, surrogate, alpha)
    sr = s.detach() if detach_reset else s
    v_new = h - threshold * sr if reset == "subtract" else h * (1 - sr)
    r_new = gamma * r + (1 - gamma) * s
    return s, v_new, r_new


def spike_matmul_reference(S: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Dense S [M, K] @ W [K, N] -> [M, N]."""
    return S @ W
