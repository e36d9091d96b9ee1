"""The spiking predictive-coding layer: spike-coding inference that descends an energy.

Per token the trunk gives its state z (dim D). The layer explains the centred input
x_c = LayerNorm(z) - m (no affine scale; m the data's mean, fixed) with a non-negative code r
of N neurons, built from spikes of size
delta over T inner steps (Boerlin, Machens & Deneve 2013; Brendel et al. 2020; an LCA with
spikes, Rozell et al. 2008). The code minimises the energy

    F(r) = 1/2 ||x_c - D r||^2 + mu/2 ||r||^2 + nu sum_i r_i          r >= 0

whose first term is the prediction error of the top-down prediction D r (D: D x N, unit-norm
columns d_i). Per step k = 1..T, for every token:

    e_k     = x_c - D r_{k-1}                      prediction-error units
    V_k     = D^T e_k - mu r_{k-1} = -dF/dr        membrane potential (bottom-up D^T: tied)
    theta_i = delta (||d_i||^2 + mu) / 2 + nu      threshold: a spike of i lowers F iff
                                                   V_i > theta_i
    P_k     = a set of suprathreshold neurons that lowers F (below)
    r_k     = r_{k-1} + delta 1_{P_k}             spike counts (no leak: a settled code stays)
    V_{k+1} = V_k - delta (D^T D + mu I) 1_{P_k}  lateral inhibition, driven by the spikes

Which spikes fire together: the proposal is every suprathreshold neuron; if that set would
raise F (aligned atoms overshoot), the level rises to the neurons within 1/2, 1/4, ... of the
best margin, and finally to the single best neuron, whose spike always lowers F by
delta (V_i - theta_i) > 0. So F never rises, and since every spike costs nu delta,

    spikes per token <= F(0) / (nu delta) = ||x_c||^2 / (2 nu delta)

whatever the weights (||x_c|| is set by the normalisation and the fixed mean, not learned):
the layer cannot saturate. A token whose neurons are all below threshold has settled and
stops spiking (its remaining steps cost nothing).

Readout: the settled code corrects the trunk's state, delta_z = W_o r_T + b_o, with W_o and
b_o zero at init (the model starts as the trunk). Learning: surrogate-gradient BPTT through
the T steps (the selection is a fixed mask in the backward), and/or the local rule, which is
minus the gradient of the same F at the settled state (`local_statistic`).

Symbols: delta `spike_quantum`, mu `l2_cost`, nu `rate_cost`, T `time_steps`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridlm import kernels
from hybridlm.kernels import reference
from hybridlm.outputs import HeadOutput

# How the dictionary starts (`model.dictionary_init`): "data" is `init_from_data` (the
# training scripts call it), "random" the constructor's own initialisation.
DICTIONARY_INITS = ("data", "random")


def spike(u: torch.Tensor, surrogate: str = "atan", alpha: float = 2.0) -> torch.Tensor:
    """H(u) with snntorch's surrogate derivative (`alpha`: atan's alpha or fast_sigmoid's
    slope); defined once, in `hybridlm.kernels.reference`."""
    return reference.spike(u, surrogate, alpha)


class SpikingPCLayer(nn.Module):
    """Spiking predictive-coding layer (equations in the module docstring).

    Input z: (B, L, D), the trunk's state. Output: a `HeadOutput` whose `delta` is the
    correction (B, L, D), zero at init (the model adds it to z); its `stats` are detached
    diagnostics over the real (non-padding) tokens: `energy_per_step` (T + 1,) mean F after
    0..T steps, `relative_energy` mean F_T / F_0, `rate` and `rate_per_step` (T,) (fraction of
    neurons spiking per step), `spikes_per_token`, `active_steps` (steps with a spike, per
    token), `max_neuron_rate`, `neuron_spikes` (N,), and `pc_energy_loss`, the differentiable
    settled energy; `local_statistic`, when asked for, is what the local rule needs.
    """

    def __init__(
        self,
        d_model: int,
        n_neurons: int,
        *,
        time_steps: int = 8,
        spike_quantum: float = 1.0,
        l2_cost: float = 0.0,
        rate_cost: float = 0.5,
        surrogate: str = "atan",
        surrogate_alpha: float = 2.0,
        backend: str | None = None,
    ):
        super().__init__()
        check_costs(time_steps, spike_quantum, l2_cost, rate_cost)
        # No affine scale: ||LayerNorm(z)||^2 = D for every token, so F(0) and with it the
        # spike budget per token are fixed whatever training does to the weights.
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False)
        # m: the code explains x around the data's mean (set by init_from_data, then fixed:
        # a learned m could move away from the data and make every token look alike)
        self.register_buffer("mean", torch.zeros(d_model))
        # W (D x N); the dictionary is D = W / ||W||_col, unit-norm columns for any W
        self.dictionary = nn.Parameter(torch.randn(d_model, n_neurons) / math.sqrt(d_model))
        self.readout = nn.Linear(n_neurons, d_model)  # W_o, b_o
        nn.init.zeros_(self.readout.weight)  # the correction starts at zero: identity model
        nn.init.zeros_(self.readout.bias)
        self.time_steps = time_steps
        self.delta, self.mu, self.nu = spike_quantum, l2_cost, rate_cost
        self.surrogate, self.surrogate_alpha = surrogate, surrogate_alpha
        self.backend = None if backend == "auto" else backend  # None: kernels decide

    # ---- the energy and its pieces ------------------------------------------------------
    def atoms(self) -> torch.Tensor:
        """D (D x N): the dictionary's columns normalised to unit length."""
        norms = self.dictionary.norm(dim=0)
        check_column_norms(norms)
        return self.dictionary / norms

    def thresholds(self) -> float:
        """theta = delta (||d_i||^2 + mu) / 2 + nu, the same for every unit-norm atom."""
        return self.delta * (1 + self.mu) / 2 + self.nu

    def centred(self, z: torch.Tensor) -> torch.Tensor:
        """x_c = LayerNorm(z) - m, (..., D)."""
        if not torch.isfinite(z).all():
            raise FloatingPointError("spiking layer: the trunk's features hold NaN or inf")
        return self.norm(z) - self.mean

    def energy(self, x_c: torch.Tensor, r: torch.Tensor, atoms: torch.Tensor | None = None
               ) -> torch.Tensor:
        """F(r) per token: 1/2 ||x_c - D r||^2 + mu/2 ||r||^2 + nu sum r. x_c (..., D),
        r (..., N) -> (...)."""
        atoms = self.atoms() if atoms is None else atoms
        e = x_c - r @ atoms.t()
        return 0.5 * e.pow(2).sum(-1) + 0.5 * self.mu * r.pow(2).sum(-1) + self.nu * r.sum(-1)

    # ---- inference -----------------------------------------------------------------------
    def infer(self, x_c: torch.Tensor, time_steps: int | None = None):
        """The code after T steps for tokens x_c (M, D): (r_T (M, N), spikes (T, M, N) bool,
        energy change per step (T, M)). Differentiable w.r.t. x_c and the dictionary."""
        t = self.time_steps if time_steps is None else time_steps
        check_costs(t, self.delta, self.mu, self.nu)
        atoms = self.atoms()
        lateral = atoms.t() @ atoms + self.mu * torch.eye(atoms.shape[1], dtype=atoms.dtype,
                                                          device=atoms.device)  # (N, N)
        v1 = x_c @ atoms  # (M, N): V_1 = D^T x_c, as r_0 = 0
        # Mixed precision: under autocast the two products above ran in bf16/fp16, and that is
        # what the layer hands the ops (lateral is float32 after adding mu I: rounded to v1's
        # dtype, as the ops take one dtype); the ops accumulate the membrane, the code and the
        # surrogate derivatives in float32 (a bf16 membrane near 16 would resolve only 0.125,
        # a fifth of the default threshold), never under the ambient autocast.
        with torch.autocast(v1.device.type, enabled=False):
            lateral = lateral.to(v1.dtype)
            return kernels.sc_inference(v1, lateral, self.thresholds(), self.delta, t,
                                        self.surrogate, self.surrogate_alpha,
                                        backend=self.backend)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None,
                time_steps: int | None = None, local_statistic: bool = False) -> HeadOutput:
        """z (B, L, D) -> HeadOutput(correction (B, L, D), diagnostics, local statistic).
        `mask` (B, L): real tokens (diagnostics and the local statistic skip padding);
        `time_steps` overrides T for this call; `local_statistic`: also return the local
        rule's statistic (computed without gradient)."""
        shape = z.shape
        x_c = self.centred(z).reshape(-1, shape[-1])  # (M, D)
        r, spikes, d_energy = self.infer(x_c, time_steps)
        valid = torch.ones(len(x_c), dtype=torch.bool, device=z.device) if mask is None \
            else mask.reshape(-1).bool()
        stats = self._diagnostics(x_c, r, spikes, d_energy, valid)
        local = self.local_statistic(x_c, r, valid) if local_statistic else None
        return HeadOutput(self.readout(r).reshape(shape), stats, local)

    @torch.no_grad()
    def local_statistic(self, x_c: torch.Tensor, r: torch.Tensor, valid: torch.Tensor) -> dict:
        """Sums over real tokens of what the local rule needs at the settled state: e_T r_T^T
        (D x N, = -dF/dD per token with r fixed; zero in the columns of silent neurons), e_T
        (D, = -dF/dm), F_T e_T r_T^T (for the energy-gated rule), F_T, and the token count.
        Computed in the weights' dtype (float32), outside any autocast: they sum over every
        token of a step's micro-batches, which bf16 would round (2,047 tokens read 2,048)."""
        with torch.autocast(x_c.device.type, enabled=False):
            atoms = self.atoms().detach()
            x_c, r = x_c[valid].detach().to(atoms.dtype), r[valid].detach().to(atoms.dtype)
            e = x_c - r @ atoms.t()  # (M, D) the settled prediction error
            f = self.energy(x_c, r, atoms)  # (M,)
            return {"error_code": e.t() @ r, "error": e.sum(0),
                    "weighted_error_code": (e * f[:, None]).t() @ r, "weighted_error":
                    (e * f[:, None]).sum(0), "energy": f.sum(), "tokens": torch.tensor(
                        float(len(r)), dtype=r.dtype, device=r.device)}

    def _diagnostics(self, x_c, r, spikes, d_energy, valid) -> dict:
        n_valid = valid.sum().clamp_min(1)
        with torch.no_grad():
            f0 = 0.5 * x_c.detach().pow(2).sum(-1)  # F(0)
            f = torch.cat([f0[None], f0[None] + d_energy.cumsum(0)])  # (T + 1, M)
            per_step = spikes.float()[:, valid].mean(-1)  # (T, M_valid) share of neurons
            per_token = spikes[:, valid].sum((0, 2)).float()  # spikes per token
            neuron = spikes[:, valid].float().mean((0, 1))  # (N,) per-neuron rate
        final = self.energy(x_c[valid], r[valid])  # differentiable settled energy
        return {
            "energy_per_step": f[:, valid].mean(1),
            "relative_energy": (f[-1, valid] / f0[valid].clamp_min(1e-12)).mean(),
            "rate": per_step.mean() if per_step.numel() else per_step.sum(),
            "rate_per_step": per_step.mean(1),
            "spikes_per_token": per_token.sum() / n_valid,
            "active_steps": (spikes[:, valid].any(-1)).float().sum(0).mean(),
            # code density: the share of neurons with r > 0 after inference, per token
            "active_fraction": (r.detach()[valid] > 0).float().mean(),
            "max_neuron_rate": neuron.max(),
            "neuron_spikes": spikes[:, valid].sum((0, 1)),  # (N,) spikes of each neuron
            "pc_energy_loss": final.mean(),  # differentiable: log it detached
        }

    def local_parameters(self) -> list[nn.Parameter]:
        """What the local rule learns: the dictionary."""
        return [self.dictionary]

    @torch.no_grad()
    def init_from_data(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data initialisation (as k-means is seeded): m = the mean of LayerNorm(z) over the
        sample (kept fixed after this), and each atom a distinct sampled token's centred
        state. z (K, D), K >= N."""
        n = self.dictionary.shape[1]
        if len(z) < n:
            raise ValueError(f"spiking layer: data initialisation needs at least {n} token "
                             f"states (one per atom), got {len(z)}")
        x = self.norm(z.to(self.mean.dtype))
        self.mean.copy_(x.mean(0))
        pick = torch.randperm(len(x), generator=generator)[:n]
        atoms = (x[pick] - self.mean).t()  # (D, N)
        norms = atoms.norm(dim=0, keepdim=True)
        if bool((norms == 0).any()):
            raise ValueError("spiking layer: a sampled token state equals the mean; sample more")
        self.dictionary.copy_(atoms / norms)


class ISTALayer(SpikingPCLayer):
    """The non-spiking control of `SpikingPCLayer`: the same energy F, parameters, readout and
    T, minimised by projected gradient descent (ISTA with a non-negative soft threshold, the
    discrete-time LCA of Rozell et al. 2008) instead of spikes:

        r_k = max(0, r_{k-1} + eta (D^T e_k - mu r_{k-1} - nu)),  eta = 1 / ||D^T D + mu I||_2

    F never rises (a gradient step of size 1 / L on an L-smooth function, then a proximal
    step). Every neuron's value is real and dense: its cost per step is a dense N x N product.
    """

    def infer(self, x_c: torch.Tensor, time_steps: int | None = None):
        t = self.time_steps if time_steps is None else time_steps
        check_costs(t, self.delta, self.mu, self.nu)
        atoms = self.atoms()
        lateral = atoms.t() @ atoms + self.mu * torch.eye(atoms.shape[1], dtype=atoms.dtype,
                                                          device=atoms.device)
        # the largest eigenvalue, by power iteration (step size only), in the weights' dtype:
        # the 1% margin must not be eaten by bf16's rounding
        with torch.no_grad(), torch.autocast(lateral.device.type, enabled=False):
            g = lateral.to(atoms.dtype)
            v = torch.ones(g.shape[0], dtype=g.dtype, device=g.device)
            for _ in range(30):
                v = g @ v
                v = v / v.norm()
            lipschitz = float(v @ g @ v) * 1.01  # a little margin over the estimate
        eta = 1.0 / lipschitz
        drive = x_c @ atoms  # D^T x_c
        # the iterate stays in the weights' dtype (float32) under autocast, as the spiking
        # layer's membrane; only its products run in bf16/fp16
        r = torch.zeros_like(drive, dtype=atoms.dtype)
        active, d_energy = [], []
        f_prev = self.energy(x_c.detach(), r.detach(), atoms.detach())
        for _ in range(t):
            r = torch.relu(r + eta * (drive - r @ lateral - self.nu))
            with torch.no_grad():
                f = self.energy(x_c.detach(), r.detach(), atoms.detach())
                d_energy.append(f - f_prev)
                f_prev = f
            active.append((r > 0).detach())
        return r, torch.stack(active), torch.stack(d_energy)


def check_column_norms(norms: torch.Tensor, first: int = 0) -> None:
    """Raise if a dictionary column (numbered from `first`) is zero or non-finite: its atom
    would have no direction."""
    if not torch.isfinite(norms).all() or bool((norms == 0).any()):
        bad = first + int(((norms == 0) | ~torch.isfinite(norms)).nonzero()[0])
        raise FloatingPointError(
            f"spiking layer: dictionary column {bad} is zero or non-finite, so its atom "
            "has no direction; reinitialise the layer or lower the learning rate")


def check_costs(time_steps: int, spike_quantum: float, l2_cost: float, rate_cost: float):
    """Refuse values for which the energy or its descent is not defined."""
    for name, v, ok, need in (("time_steps", time_steps, time_steps >= 1, ">= 1"),
                              ("spike_quantum", spike_quantum, spike_quantum > 0, "> 0"),
                              ("l2_cost", l2_cost, l2_cost >= 0, ">= 0"),
                              ("rate_cost", rate_cost, rate_cost > 0, "> 0 (it bounds the "
                               "spikes per token)")):
        if not (isinstance(v, int) or math.isfinite(v)) or not ok:
            raise ValueError(f"spiking layer: {name} must be finite and {need}, got {v}")
