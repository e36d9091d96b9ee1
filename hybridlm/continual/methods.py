"""Continual-learning methods and the baselines' machinery.

A method is data, not code (`continual.methods` in the config): a head, `model` overrides
(e.g. `learning=hybrid`, `gate=energy`) and the classic baselines that work with any head:

- EWC (Kirkpatrick et al. 2017): after each stage, the diagonal of the empirical Fisher on
  that stage's blocks (squared gradients of batch losses) and the weights are stored; later
  stages add (lambda / 2) sum_t sum_i F_t,i (w_i - w*_t,i)^2 to the loss.
- Experience replay: a reservoir buffer (Vitter's algorithm R) of earlier stages' blocks;
  a fraction `replay_fraction` of every batch is drawn from it once it holds any.
- DER++ (Buzzega et al. 2020): replay as above (the replayed blocks' next-token loss is
  DER++'s beta term) plus der_alpha times the mean squared difference between the model's
  logits on the replayed blocks and the logits it gave them when they were buffered (at the
  end of their stage; stored as the corrected state y, since the LM head is frozen).
- Joint training (the upper bound): every stage's blocks in one shuffled stage.

Here: a method's `model` section (its head and checked overrides), the replay reservoir, EWC's
Fisher and penalty, DER++'s stored logits, and the replay buffer's size check.
"""

from __future__ import annotations

import dataclasses
import random
import typing
import zlib
from collections.abc import Callable

import torch

from hybridlm.config import (
    ConfigError,
    ContinualConfig,
    ModelConfig,
    RunConfig,
    _coerce,
    parse_value,
    validate,
)

# Model keys a method may not change: they would change the shared frozen encoder's
# features (and so the cache) or contradict the method's own `head` field.
FIXED_MODEL_KEYS = ("encoder", "trainable_encoder_layers", "head")


# ---- methods ---------------------------------------------------------------------------------
def method_model_config(cfg: RunConfig, index: int) -> ModelConfig:
    """The `model` section with method `index`'s head and overrides applied, type- and
    range-checked; a bad override raises ConfigError naming `continual.methods[i].model`."""
    method = cfg.continual.methods[index]
    key = f"continual.methods[{index}].model"
    hints = typing.get_type_hints(ModelConfig)
    changes: dict[str, typing.Any] = {"head": method.head}
    for ov in method.model:
        name, raw = (s.strip() for s in ov.split("=", 1))
        if name.startswith("model."):
            name = name[len("model."):]
        if name not in hints:
            raise ConfigError(f"config key '{key}': unknown model key {name[:80]!r} "
                              f"(known: {', '.join(hints)})")
        if name in FIXED_MODEL_KEYS:
            raise ConfigError(f"config key '{key}': '{name}' cannot differ between methods "
                              f"(the encoder and its cached features are shared; set the head "
                              f"with continual.methods[{index}].head)")
        changes[name] = _coerce(parse_value(raw, f"config key '{key}' ({name}=...)"),
                                hints[name], f"{key}:{name}")
    model = dataclasses.replace(cfg.model, **changes)
    try:
        validate(dataclasses.replace(cfg, model=model, continual=ContinualConfig()))
    except ConfigError as e:
        raise ConfigError(f"config key '{key}' (method '{method.name}'): {e}") from e
    return model


def check_replay_sizes(c: ContinualConfig, order: list[str], block: int) -> None:
    """A buffer larger than everything the earlier stages offer is a mistake: say so."""
    offered = max(1, c.tokens_per_stage // block) * (len(order) - 1)
    for i, m in enumerate(c.methods):
        if m.replay_size > offered:
            raise ConfigError(
                f"config key 'continual.methods[{i}].replay_size': {m.replay_size} blocks, but "
                f"the stages before the last offer only {offered} ({len(order) - 1} stage(s) × "
                f"{max(1, c.tokens_per_stage // block)} blocks): the buffer would never fill; "
                f"lower it to at most {offered}")


# ---- baselines -------------------------------------------------------------------------------
class Reservoir:
    """Reservoir sample (algorithm R) of at most `size` items from everything offered."""

    def __init__(self, size: int, seed: int):
        self.size, self.items, self.seen = size, [], 0
        self.rng = random.Random(seed + 7)

    def add(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = item

    def draw(self, k: int) -> list:
        return self.rng.choices(self.items, k=k) if self.items and k > 0 else []

    def fingerprint(self) -> torch.Tensor:
        """The buffer's contents as numbers (domain name hashed stably, row index), so
        processes can check they hold the same buffer."""
        rows = [[zlib.crc32(d.encode()), i] for d, i in self.items] or [[0, -1]]
        return torch.tensor(rows + [[self.seen, len(self.items)]], dtype=torch.float64)


class EWC:
    """Elastic weight consolidation over the parameters that get gradients."""

    def __init__(self, lam: float):
        self.lam = lam
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def consolidate(self, base, batches: list[tuple], reduce: Callable) -> None:
        """Store (Fisher diagonal, weights) from `batches` of (ids, labels, features).

        With several processes each holds its share of every global batch (the same number
        of batches on every rank); `reduce` averages each batch's gradient over processes
        before it is squared, so the Fisher is that of the global batch mean loss, the same
        as one process with the whole batch, and identical on every rank."""
        named = [(n, p) for n, p in base.named_parameters() if p.requires_grad]
        fisher = {n: torch.zeros_like(p) for n, p in named}
        was_training = base.training
        base.eval()
        for ids, labels, feats in batches:
            loss = base(input_ids=ids, labels=labels, features=feats).loss
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            flat = torch.cat([(torch.zeros_like(p) if g is None else g.detach()).flatten()
                              for (_, p), g in zip(named, grads, strict=True)])
            flat = reduce(flat)  # one collective per batch
            for (n, p), g in zip(named, flat.split([p.numel() for _, p in named]),
                                 strict=True):
                fisher[n] += g.view_as(p) ** 2 / len(batches)
        base.train(was_training)
        self.terms.append((fisher, {n: p.detach().clone() for n, p in named}))

    def flat_fisher(self) -> torch.Tensor:
        """Every stored Fisher diagonal, flattened (to compare processes); (1,) zeros if none."""
        parts = [f.flatten().double().cpu() for fisher, _ in self.terms for f in fisher.values()]
        return torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)

    def penalty(self, base) -> torch.Tensor | None:
        if not self.terms or self.lam == 0:
            return None
        params = dict(base.named_parameters())
        total = 0.0
        for fisher, anchor in self.terms:
            for n, f in fisher.items():
                total = total + (f * (params[n] - anchor[n]) ** 2).sum()
        return 0.5 * self.lam * total


def replay_logits(base, y: torch.Tensor, lm_bias: torch.Tensor | None) -> torch.Tensor:
    """DER++'s stored logits from a stored corrected state y (R, L, D): the trunk's LM head is
    frozen, so y and (for an encoder trunk) the LM bias of that moment give them exactly;
    storing y instead of logits costs D instead of V floats per token."""
    if base.lm_head is not None:
        return base.lm_head(y)
    emb = base.encoder.get_input_embeddings().weight
    return torch.nn.functional.linear(y, emb.to(y.dtype), lm_bias)


class NonFiniteStage(FloatingPointError):
    """A stage whose loss stayed non-finite: the sequence stops, finished stages are kept."""
