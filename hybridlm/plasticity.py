"""The local learning rule of the spiking PC layer, gated by a neuromodulatory signal.

The layer's inference settles each token at a code r_T that (locally) minimises its energy

    F(r; D, m) = 1/2 ||x - m - D r||^2 + mu/2 ||r||^2 + nu sum r.

With the code held at r_T, the gradient of the same F with respect to the generative weights
is local, the prediction error times the presynaptic code, and the rule descends it:

    -dF/dD = e_T r_T^T                    (e_T = x - m - D r_T, the settled error)
    D <- normalise_columns(D + eta g mean_tokens(e_T r_T^T))

Only the atoms of neurons that spiked change (r_i = 0 leaves column i untouched), and the
atoms stay unit-norm. g is the neuromodulatory gate (`NeuromodulatoryGate`). Modes
(`model.learning`):

- `bptt`: D learns from the next-token loss only (gradients through the T steps);
- `hebbian`: D learns only from the local rule (it gets no gradient);
- `hybrid`: both. The optimizer steps first; the local step is then applied directly,
  outside the optimizer, so eta keeps its plain meaning (Adam would otherwise rescale it).

The statistic is summed over micro-batches (`collect`) and applied when the optimizer steps
(`step`). Updates made outside autograd are not synchronised by DDP: `step` averages the
statistic and the gate's inputs across processes itself, so every rank applies the same
update and stays bit-identical. Under FSDP2 the dictionary is a DTensor whose rows are split
across ranks: each rank applies the same averaged update to its own rows, and a column's norm
sums its squares over the ranks (`writable_part`, `column_norms`). Under DeepSpeed ZeRO the
optimizer keeps its own fp32 copy of the dictionary and would overwrite a plain in-place edit
at its next step: every rank edits the whole fp32 matrix and writes it to both copies
(`zero_write`). Engines that would lose the update are refused at start
(`hybridlm.engine.check_local_learning`; docs/scaling.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from hybridlm.spiking import check_column_norms

if dist.is_available():
    from torch.distributed.tensor import DTensor, Replicate, Shard
else:  # a build of torch without torch.distributed: every weight is a plain tensor
    DTensor = Replicate = Shard = ()

LEARNING_MODES = ("bptt", "hebbian", "hybrid")
GATES = ("constant", "surprise", "energy")


class NeuromodulatoryGate:
    """g in [g_min, g_max], a dopamine-like signal of how unexpected the data is.

    - `constant`: g = g_max (so g_max = 0 switches learning off);
    - `surprise`: g = batch loss / running mean of past batch losses;
    - `energy`: per token, g_t = F_T(t) / running mean of the settled energy: tokens the code
      explains badly learn more (the rule uses the energy-weighted statistic); the reported g
      is its mean over the batch, and it is clipped as a whole to [g_min, g_max].
    Running means are exponential averages with `momentum`.
    """

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

    def __call__(self, signal: float) -> float:
        """The gate for a batch whose loss (surprise) or mean settled energy (energy) is
        `signal`; for `energy` the value returned is the factor 1 / expected energy."""
        if self.kind == "constant":
            return self.g_max
        if self.expected is None:
            self.expected = signal
        expected = self.expected
        self.expected = self.momentum * self.expected + (1 - self.momentum) * signal
        if self.kind == "energy":
            return 1.0 / expected if expected > 0 else 0.0
        g = signal / expected if expected > 0 else 1.0
        return min(self.g_max, max(self.g_min, g))

    def state_dict(self) -> dict:
        return {"expected": self.expected}

    def load_state_dict(self, state: dict) -> None:
        self.expected = state["expected"]


STAT_KEYS = ("error_code", "error", "weighted_error_code", "weighted_error", "energy", "tokens")


class LocalLearning:
    """Applies the gated local rule to a `SpikingPCLayer` when the optimizer steps."""

    def __init__(self, layer, eta: float, gate: NeuromodulatoryGate):
        if not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"hebbian eta must be finite and >= 0, got {eta}")
        self.layer, self.eta, self.gate = layer, eta, gate
        self.skipped = 0
        self.pending: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def collect(self, statistic: dict[str, torch.Tensor]) -> None:
        """Add one forward's statistic (the layer's `stats["local_statistic"]`)."""
        if self.pending is None:
            self.pending = {k: statistic[k].detach().clone() for k in STAT_KEYS}
        else:
            for k in STAT_KEYS:
                self.pending[k] += statistic[k].detach()

    @torch.no_grad()
    def step(self, loss: torch.Tensor, reduce=None) -> dict[str, float]:
        """Apply and clear the collected statistic. `reduce(tensor)` averages over processes
        (identity in one process). Returns the values to log."""
        reduce = reduce or (lambda t: t)
        if self.pending is None:
            raise RuntimeError("LocalLearning.step: no statistic was collected since the last "
                               "step (collect() the layer's stats after each forward)")
        stat, self.pending = self.pending, None
        flat = torch.cat([stat[k].flatten() for k in STAT_KEYS]
                         + [loss.detach().float().reshape(1).to(stat["tokens"])])
        flat = reduce(flat)  # one collective for everything the update depends on
        parts, i = {}, 0
        for k in STAT_KEYS:
            parts[k] = flat[i : i + stat[k].numel()].view_as(stat[k])
            i += stat[k].numel()
        tokens = parts["tokens"].clamp_min(1)
        if self.gate.kind == "energy":
            mean_energy = float(parts["energy"] / tokens)
            inv_expected = self.gate(mean_energy)  # 1 / running mean of F_T before this batch
            g_raw = mean_energy * inv_expected  # the batch mean of g_t = F_t / expected
            g = min(self.gate.g_max, max(self.gate.g_min, g_raw))
            scale = inv_expected * (g / g_raw if g_raw > 0 else 0.0)
            code = parts["weighted_error_code"] * scale
        else:
            g = self.gate(float(flat[-1]))
            code = parts["error_code"] * g
        d_atoms = self.eta * code / tokens  # (D, N): eta g mean(e r^T)
        if not torch.isfinite(d_atoms).all():
            self.skipped += 1  # never write a non-finite update into the weights
            return {"plasticity/gate": g, "plasticity/step_norm": float("nan"),
                    "plasticity/skipped": self.skipped}
        touched = d_atoms.abs().sum(0) > 0  # the atoms of neurons that spiked
        # Each process edits the part of the dictionary it holds (all of it, but under FSDP2);
        # a column's norm sums over every process that holds some of its rows.
        with editing(self.layer.dictionary) as (part, (rows, cols), groups):
            norms = column_norms(part, groups)
            check_column_norms(norms, first=cols.start or 0)
            hit = touched[cols]
            new = part[:, hit] / norms[hit] + d_atoms[rows, cols][:, hit]
            part[:, hit] = new / column_norms(new, groups).clamp_min(1e-12)
        return {"plasticity/gate": g, "plasticity/step_norm": float(d_atoms.norm()),
                "plasticity/atoms_updated": int(touched.sum()),
                "plasticity/skipped": self.skipped}


@contextmanager
def editing(weight: torch.nn.Parameter) -> Iterator[tuple[torch.Tensor, tuple[slice, slice], list]]:
    """`writable_part(weight)` to edit in place; under DeepSpeed ZeRO, where the edit must
    reach the optimizer's own copy, the whole fp32 matrix, written back by `zero_write` when
    the block ends without an error."""
    if not is_zero_parameter(weight):
        yield writable_part(weight)
        return
    whole = zero_read(weight)
    yield whole, (slice(None), slice(None)), []
    zero_write(weight, whole)


def is_zero_parameter(weight: torch.Tensor) -> bool:
    """True for a parameter DeepSpeed ZeRO manages: partitioned (stage 3: `ds_id`), or with
    an fp32 master copy in the optimizer (stages 1 and 2, bf16: `_hp_mapping`, None on the
    ranks that hold none of it; the same answer on every rank, as the collectives need)."""
    return hasattr(weight, "ds_id") or hasattr(weight, "_hp_mapping")


def zero_read(weight: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 value of a ZeRO parameter on every rank (a collective): the
    optimizer's master copy, or the parameter itself when the optimizer has none (a weight
    without gradient, as the dictionary in `hebbian` mode)."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(weight)
    if master is not None:
        return master.float().clone()
    with GatheredParameters([weight]):  # ZeRO-3 holds 1/world of it outside a forward
        return weight.data.float().clone()


def zero_write(weight: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set a ZeRO parameter to `value` (its whole shape; the same on every rank) where
    DeepSpeed keeps it: the optimizer's fp32 master copy, which its next step starts from
    (written in place alone it would be overwritten there), and the parameter the next
    forward reads (ZeRO-3 re-partitions it on leaving the gathered block)."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(weight, value)
    with GatheredParameters([weight], modifier_rank=0):
        weight.data.copy_(value)


def writable_part(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, slice], list]:
    """The part of the matrix `weight` this process holds, to edit in place: (that tensor,
    the (rows, columns) slices of the whole matrix it is, the process groups across which its
    rows are split). A plain tensor (one process, DDP) is whole. A DTensor (FSDP2's
    `fully_shard`) holds one torch.chunk of each sharded dim (13 rows on 2 ranks: 7 + 6) and
    all of a replicated one; any other layout is refused rather than edited wrongly."""
    if not isinstance(weight, DTensor):
        return weight.data, (slice(None), slice(None)), []
    part, mesh = weight.to_local(), weight.device_mesh
    coordinate = mesh.get_coordinate()
    spans = [slice(0, n) for n in weight.shape]
    groups = []
    for mesh_dim, placement in enumerate(weight.placements):
        if isinstance(placement, Replicate):
            continue
        dim = placement.dim if type(placement) is Shard else None
        if dim is None or spans[dim] != slice(0, weight.shape[dim]) or coordinate is None:
            raise NotImplementedError(
                f"local learning: cannot edit a parameter laid out as {weight.placements} in "
                "place (only Shard and Replicate placements, one mesh dim per tensor dim, are "
                "supported); shard the spiking layer with plain fully_shard or use DDP")
        n, chunk = weight.shape[dim], -(-weight.shape[dim] // mesh.size(mesh_dim))
        start = min(coordinate[mesh_dim] * chunk, n)
        spans[dim] = slice(start, min(start + chunk, n))
        if dim == 0:
            groups.append(mesh.get_group(mesh_dim))
    if tuple(part.shape) != tuple(s.stop - s.start for s in spans):  # never guess a layout
        raise NotImplementedError(
            f"local learning: this process's part of a {tuple(weight.shape)} parameter is "
            f"{tuple(part.shape)}, not the torch.chunk rows {spans}; it cannot be edited exactly")
    return part, tuple(spans), groups


def column_norms(part: torch.Tensor, groups: list) -> torch.Tensor:
    """The norms of the whole matrix's columns from this process's rows `part`, summing the
    squares across `groups` (the processes that hold the other rows)."""
    if not groups:
        return part.norm(dim=0)
    squares = part.pow(2).sum(0)
    for group in groups:
        dist.all_reduce(squares, group=group)
    return squares.sqrt()
