"""Local Hebbian learning of the generative weights, gated by a neuromodulatory signal.

The spiking PC layer explains x with predictions x_hat_k = W_d r_{k-1}. Its local energy is

    F = 1/2 * mean_tokens (1/T) sum_k ||x - W_d r_{k-1}||^2,

and, holding the activity r fixed, -dF/dW_d = mean_tokens (1/T) sum_k e_k r_{k-1}^T: the
post-synaptic prediction error times the pre-synaptic spike trace. The local rule is

    dW_d = eta * g * (mean(e r^T) - lambda * W_d)

with a neuromodulatory gate g (a bounded scalar, e.g. the surprise of the current batch) and
a weight decay lambda that keeps ||W_d|| bounded. Modes (`model.learning`):

- `bptt`: W_d learns from the next-token loss only (gradients through the T steps);
- `hebbian`: W_d learns only from the local rule (it gets no gradient);
- `hybrid`: both. The optimizer applies its gradient step first; the local step is then
  added to W_d directly, outside the optimizer, so eta keeps its plain meaning (Adam would
  otherwise rescale it).

Updates made outside autograd are not synchronised by DDP: `LocalLearning.step` averages the
Hebbian statistic and the gate's loss across processes itself, so every rank applies the
same update and stays bit-identical.
"""

from __future__ import annotations

import math

import torch

LEARNING_MODES = ("bptt", "hebbian", "hybrid")
GATES = ("constant", "surprise")


class NeuromodulatoryGate:
    """g in [g_min, g_max]. `constant`: g = g_max (so g_max = 0 switches learning off).
    `surprise`: g = loss / running mean of past losses (a dopamine-like "better or worse than
    expected" signal), clipped; the running mean is an exponential average with `momentum`."""

    def __init__(self, kind: str = "surprise", g_min: float = 0.0, g_max: float = 2.0,
                 momentum: float = 0.9):
        if kind not in GATES:
            raise ValueError(f"gate '{kind}' is not one of {GATES}")
        for name, v in (("g_min", g_min), ("g_max", g_max)):
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"gate bound {name} must be finite and >= 0, got {v}")
        if g_min > g_max:
            raise ValueError(f"gate bounds: g_min {g_min} > g_max {g_max}")
        self.kind, self.g_min, self.g_max, self.momentum = kind, g_min, g_max, momentum
        self.expected: float | None = None

    def __call__(self, loss: float) -> float:
        if self.kind == "constant":
            return self.g_max
        if self.expected is None:
            self.expected = loss
        g = loss / self.expected if self.expected > 0 else 1.0
        self.expected = self.momentum * self.expected + (1 - self.momentum) * loss
        return min(self.g_max, max(self.g_min, g))

    def state_dict(self) -> dict:
        return {"expected": self.expected}

    def load_state_dict(self, state: dict) -> None:
        self.expected = state["expected"]


class LocalLearning:
    """Applies the gated Hebbian step to a `SpikingPCLayer` after each optimizer step."""

    def __init__(self, layer, eta: float, decay: float, gate: NeuromodulatoryGate):
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"hebbian eta must be finite and >= 0, got {eta}")
        if not (math.isfinite(decay) and decay >= 0):
            raise ValueError(f"hebbian decay must be finite and >= 0, got {decay}")
        self.layer, self.eta, self.decay, self.gate = layer, eta, decay, gate
        self.skipped = 0

    @torch.no_grad()
    def step(self, loss: torch.Tensor, reduce=None) -> dict[str, float]:
        """Apply and clear the accumulated statistic. `reduce(tensor)` averages over
        processes (identity in one process). Returns the values to log."""
        reduce = reduce or (lambda t: t)
        stat, count = self.layer.take_hebbian_statistic()
        packed = torch.cat([stat.flatten(), torch.stack([count, loss.detach().float().cpu()
                                                         .to(stat.dtype)])])
        packed = reduce(packed)  # one collective for the statistic, its count and the loss
        stat, count, mean_loss = packed[:-2].view_as(stat), packed[-2], packed[-1]
        g = self.gate(float(mean_loss))
        w = self.layer.decode.weight
        delta = self.eta * g * (stat / count.clamp_min(1) - self.decay * w)
        if not torch.isfinite(delta).all():
            self.skipped += 1  # never write a non-finite update into the weights
            return {"plasticity/gate": g, "plasticity/hebbian_step_norm": float("nan"),
                    "plasticity/skipped": self.skipped}
        w.add_(delta)
        return {"plasticity/gate": g, "plasticity/hebbian_step_norm": float(delta.norm()),
                "plasticity/skipped": self.skipped}
