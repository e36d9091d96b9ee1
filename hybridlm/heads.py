"""The heads that sit on the trunk, and how their sizes are matched.

Every head reads the trunk's final hidden state z (B, L, D) and returns a correction delta
(B, L, D); the model computes y = z + delta and feeds y to the trunk's own LM head. Every
head's last layer starts at zero, so an untrained model is exactly the trunk's language model.

| head         | delta                                   | sized to                               |
|--------------|-----------------------------------------|----------------------------------------|
| `trunk`      | 0 (nothing trains: the zero-shot trunk) | -                                      |
| `linear`     | W LN(z) + b                             | D x D                                  |
| `mlp`        | W2 GELU(W1 LN(z) + b1) + b2             | the spiking layer's parameter count    |
| `mlp_macs`   | the same MLP                            | the spiking layer's dense-equivalent   |
|              |                                         | multiply-adds per token                |
| `kwta`       | W2 kWTA(ReLU(W1 LN(z) + b1)) + b2: only | the `mlp` head; k = `kwta_fraction` of |
|              | the k largest hidden units pass         | H, the spiking layer's measured code   |
|              |                                         | density (sparse, not spiking, not PC)  |
| `spiking_pc` | the spiking predictive-coding layer     | `n_neurons`, `time_steps`              |
| `ista`       | the same energy minimised without spikes| the spiking layer (same parameters, T) |

Every head takes an optional `mask` (B, L) of real tokens (diagnostics skip padding) and
returns a `HeadOutput` (the correction, its diagnostics, and the spiking layers' local
statistic when asked for).
"""

from __future__ import annotations

import torch
from torch import nn

from hybridlm.energy import head_ops
from hybridlm.outputs import HeadOutput
from hybridlm.spiking import ISTALayer, SpikingPCLayer

HEADS = ("trunk", "linear", "mlp", "mlp_macs", "kwta", "spiking_pc", "ista")
SPIKING_HEADS = ("spiking_pc", "ista")  # the energy-based layers (same parameters)


class TrunkHead(nn.Module):
    """No correction: the model is the trunk alone (its zero-shot baseline)."""

    def __init__(self):
        super().__init__()

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> HeadOutput:
        return HeadOutput(torch.zeros((), dtype=z.dtype, device=z.device), {})  # y = z


class LinearHead(nn.Module):
    """delta = W LN(z) + b, W and b zero at init. z, delta: (B, L, D)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> HeadOutput:
        return HeadOutput(self.proj(self.norm(z)), {})


class MLPHead(nn.Module):
    """delta = W2 GELU(W1 LN(z) + b1) + b2, W2 and b2 zero at init. z, delta: (B, L, D)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> HeadOutput:
        return HeadOutput(self.down(nn.functional.gelu(self.up(self.norm(z)))), {})


class KWTAHead(MLPHead):
    """The `mlp` head with a k-winners-take-all hidden layer: per token only the k largest
    ReLU units pass (the others are zero, and get no gradient). It separates "a sparse code
    with local structure" from "spiking predictive coding": same parameters as `mlp`, the
    spiking layer's code density, no spikes and no inference loop."""

    def __init__(self, d_model: int, hidden: int, k: int):
        super().__init__(d_model=d_model, hidden=hidden)
        if not 1 <= k <= hidden:
            raise ValueError(f"k-WTA: k = {k} must lie in [1, {hidden}] (model.kwta_fraction)")
        self.k = k

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> HeadOutput:
        h = torch.relu(self.up(self.norm(z)))  # (B, L, H)
        top = h.topk(self.k, dim=-1)
        sparse = torch.zeros_like(h).scatter(-1, top.indices, top.values)
        with torch.no_grad():  # share of hidden units that pass, over real tokens
            active = (sparse > 0).float().mean(-1)
            fraction = active[mask.bool()].mean() if mask is not None else active.mean()
        return HeadOutput(self.down(sparse), {"active_fraction": fraction})


def spiking_layer(d_model: int, config, head: str = "spiking_pc") -> SpikingPCLayer:
    """The spiking PC layer (or its non-spiking `ista` control) with the hyper-parameters of
    `config` (a HybridConfig)."""
    cls = ISTALayer if head == "ista" else SpikingPCLayer
    return cls(d_model=d_model, n_neurons=config.n_neurons, time_steps=config.time_steps,
               spike_quantum=config.spike_quantum, l2_cost=config.l2_cost,
               rate_cost=config.rate_cost, surrogate=config.surrogate,
               surrogate_alpha=config.surrogate_alpha, backend=config.kernel_backend)


def mlp_parameters(d_model: int, hidden: int) -> int:
    """LayerNorm 2D, W1 and b1 H (D + 1), W2 and b2 D (H + 1)."""
    return 2 * d_model + hidden * (d_model + 1) + d_model * (hidden + 1)


MLP_HEADS = ("mlp", "mlp_macs", "kwta")  # the heads with a hidden layer of size mlp_hidden


def mlp_hidden(head: str, d_model: int, config) -> int:
    """The MLP hidden size H that matches the spiking layer of `config`: in trainable
    parameters (`mlp`, and `kwta`, which is that MLP made sparse; the counts then differ by
    at most D + 1) or in multiply-adds per token (`mlp_macs`: 2 D H against the layer's
    dense-equivalent MACs, i.e. with its spike-driven lateral propagation counted as a dense
    product every step; see `hybridlm.energy`). 0 for a head without a hidden layer."""
    if head not in MLP_HEADS:
        return 0
    if head in ("mlp", "kwta"):
        with torch.device("meta"):
            target = sum(p.numel() for p in spiking_layer(d_model, config).parameters())
        return max(1, round((target - 3 * d_model) / (2 * d_model + 1)))
    macs = head_ops("spiking_pc", d_model, config.n_neurons, config.time_steps, 0, rate=0.0)
    return max(1, round(macs["dense_equivalent_mac"] / (2 * d_model)))


def build_head(head: str, *, d_model: int, config) -> nn.Module:
    """A head by name (see `HEADS`) on a trunk of width `d_model`, sized from `config` (a
    HybridConfig)."""
    if head == "trunk":
        return TrunkHead()
    if head == "linear":
        return LinearHead(d_model=d_model)
    if head in ("mlp", "mlp_macs"):
        return MLPHead(d_model=d_model, hidden=mlp_hidden(head, d_model, config))
    if head == "kwta":
        hidden = mlp_hidden(head, d_model, config)
        return KWTAHead(d_model=d_model, hidden=hidden,
                        k=max(1, round(config.kwta_fraction * hidden)))
    if head in SPIKING_HEADS:
        return spiking_layer(d_model, config, head)
    raise ValueError(f"unknown head '{head}' (one of {', '.join(HEADS)})")
