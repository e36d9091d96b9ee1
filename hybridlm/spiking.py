"""The spiking predictive-coding layer.

Per token the trunk gives its final hidden state z (dim D); the layer reads x = LayerNorm(z).
N leaky integrate-and-fire (LIF) neurons explain x
over T inner time steps with top-down predictions (Rao & Ballard inference, run with spikes):

    x_hat_k = W_d r_{k-1}                       prediction (W_d: D x N, generative weights)
    e_k     = x - x_hat_k                        prediction error units
    I_k     = W_e e_k + b                        input current (W_e: N x D)
    h_k     = beta v_{k-1} + I_k                 charge
    s_k     = H(h_k - theta)                     fire (surrogate gradient in backward)
    v_k     = h_k - theta s_k  | h_k (1 - s_k)   reset: subtract | zero
    r_k     = gamma r_{k-1} + (1 - gamma) s_k    spike trace (a running firing rate)
    delta   = W_o r_T + b_o                      readout: a correction added to the trunk's
                                                 state (W_o starts at zero: identity at init)

Because the prediction is linear in the trace, it is updated from the spikes alone:
x_hat_{k+1} = gamma x_hat_k + (1 - gamma) W_d s_k. That product is spike propagation, done by
`kernels.spike_matmul` (event-driven below the measured crossover rate, dense above it);
charge/fire/reset/trace is one fused kernel, `kernels.pc_step`.

Symbols: beta membrane decay, theta threshold, gamma trace decay, T `time_steps`.
The whole T-step loop is differentiable (BPTT through surrogate gradients).
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm import kernels
from hybridlm.kernels import reference


def spike(u: torch.Tensor, surrogate: str = "atan", alpha: float = 2.0) -> torch.Tensor:
    """H(u) with snntorch's surrogate derivative (`alpha`: atan's alpha or fast_sigmoid's
    slope); defined once, in `hybridlm.kernels.reference`."""
    return reference.spike(u, surrogate, alpha)


class SpikingPCLayer(nn.Module):
    """Spiking predictive-coding layer (equations in the module docstring).

    Input z: (B, L, D), the trunk's state. Output: the correction delta (B, L, D), zero at
    init (the model adds it to z). After each forward, `stats` holds detached
    diagnostics: `rate` (mean firing rate), `rate_per_step` (T,), `pc_energy` (mean over
    steps of the per-token ||e_k||^2), `energy_per_step` (T,), and `pc_energy_loss` keeps the
    differentiable energy for an optional auxiliary loss.
    """

    def __init__(
        self,
        d_model: int,
        n_neurons: int,
        time_steps: int = 8,
        beta: float = 0.9,
        threshold: float = 1.0,
        reset: str = "subtract",
        detach_reset: bool = False,
        surrogate: str = "atan",
        surrogate_alpha: float = 2.0,
        trace_decay: float = 0.5,
        backend: str | None = None,
    ):
        super().__init__()
        self.encode = nn.Linear(d_model, n_neurons)  # W_e, b: error -> current
        self.decode = nn.Linear(n_neurons, d_model, bias=False)  # W_d: trace -> prediction
        self.readout = nn.Linear(n_neurons, d_model)  # W_o
        self.norm = nn.LayerNorm(d_model)  # on the input: the trunk's scale is its own
        nn.init.normal_(self.decode.weight, std=0.02)
        nn.init.zeros_(self.readout.weight)  # the correction starts at zero: identity model
        nn.init.zeros_(self.readout.bias)
        self.time_steps = time_steps
        self.beta, self.threshold, self.trace_decay = beta, threshold, trace_decay
        self.reset, self.detach_reset = reset, detach_reset
        self.surrogate, self.surrogate_alpha = surrogate, surrogate_alpha
        self.backend = None if backend == "auto" else backend  # None: kernels decide
        self.stats: dict[str, torch.Tensor] = {}
        # Hebbian statistic sum_k e_k r_{k-1}^T over tokens (D, N), collected in training
        # forwards when `collect_hebbian` is on (see hybridlm.plasticity).
        self.collect_hebbian = False
        self._hebb: torch.Tensor | None = None
        self._hebb_count = 0

    def take_hebbian_statistic(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of e r^T, number of token-steps) since the last call; clears both."""
        w = self.decode.weight
        stat = self._hebb if self._hebb is not None else torch.zeros_like(w)
        count = torch.tensor(float(self._hebb_count), dtype=stat.dtype, device=stat.device)
        self._hebb, self._hebb_count = None, 0
        return stat, count

    def lif_step(self, current, v, r):
        """Charge, fire, reset, trace: one inner step for every neuron -> (s, v, r)."""
        return kernels.pc_step(
            current, v, r, self.beta, self.threshold, self.trace_decay, self.reset,
            self.detach_reset, self.surrogate, self.surrogate_alpha, backend=self.backend,
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.norm(z)
        n, d = self.encode.out_features, x.shape[-1]
        v = x.new_zeros(*x.shape[:-1], n)  # (B, L, N)
        r = torch.zeros_like(v)
        x_hat = torch.zeros_like(x)  # W_d r_0 = 0
        w_d = self.decode.weight.t().contiguous()  # (N, D), once per forward, not per step
        rates, energies = [], []
        collect = self.collect_hebbian and self.training
        for k in range(self.time_steps):
            e = x - x_hat  # (B, L, D) prediction error
            if collect and k > 0:  # e_k r_{k-1}^T; r_0 = 0 adds nothing
                hebb = e.detach().reshape(-1, d).t() @ r.detach().reshape(-1, n)  # (D, N)
                self._hebb = hebb if self._hebb is None else self._hebb + hebb
            if collect:
                self._hebb_count += e.shape[0] * e.shape[1]
            s, v, r = self.lif_step(self.encode(e).to(v.dtype), v, r)
            propagated = kernels.spike_matmul(s.reshape(-1, n), w_d,
                                              backend=self.backend).reshape(*x.shape[:-1], d)
            x_hat = self.trace_decay * x_hat + (1 - self.trace_decay) * propagated
            rates.append(s.detach().mean())
            energies.append(e.pow(2).sum(-1).mean())
        energy = torch.stack(energies)
        self.stats = {
            "rate": torch.stack(rates).mean(),
            "rate_per_step": torch.stack(rates),
            "pc_energy": energy.detach().mean(),
            "energy_per_step": energy.detach(),
            "pc_energy_loss": energy.mean(),
        }
        return self.readout(r)
