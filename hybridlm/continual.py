"""Continual learning: train one model through a sequence of domains, scoring every domain's
TEST split before any training and after each stage (the matrices R of `hybridlm.cl_metrics`).

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

Every method sees the same number of optimizer steps and tokens per stage, the same stage
blocks in the same order, from the same seed; with replay, part of each batch is replayed
blocks instead of new ones (same tokens, fewer new-domain tokens). Each stage starts a fresh
AdamW with a warmup + cosine schedule (fine-tuning on each domain in turn); the Hebbian
learner and its gate persist across stages (the gate sees the loss jump at a domain switch).

The trunk's features come from the feature caches of the `Stream` (on disk in a normal run,
shared with `make train`), shared by all stages, methods and seeds. A general text in none
of the domains (`continual.retention`) is scored with every row: it shows a head that adapts
to the domains by breaking what the trunk knew.
"""

from __future__ import annotations

import dataclasses
import random
import time
import typing
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import get_cosine_schedule_with_warmup

from hybridlm.cl_metrics import HIGHER_IS_BETTER, all_metrics
from hybridlm.config import (
    EVAL_SPLITS,
    ConfigError,
    ContinualConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    _coerce,
    validate,
)
from hybridlm.corpora import DataError
from hybridlm.evaluation import Blocks, evaluate, ranks_agree
from hybridlm.features import FeatureCache

SCORES = tuple(HIGHER_IS_BETTER)  # accuracy, loss, perplexity
# Model keys a method may not change: they would change the shared frozen encoder's
# features (and so the cache) or contradict the method's own `head` field.
FIXED_MODEL_KEYS = ("encoder", "trainable_encoder_layers", "head")


class TaggedBlocks(Blocks):
    """`Blocks` that know their domain and split, so evaluation can refuse a non-test split."""

    def __init__(self, hf_dataset, domain: str, split: str):
        super().__init__(hf_dataset)
        self.domain, self.split = domain, split


def require_test(blocks) -> None:
    """Raise unless `blocks` is a test split (an explicit raise: survives `python -O`)."""
    if getattr(blocks, "split", None) != "test":
        raise AssertionError(
            f"continual evaluation must use TEST splits, got split "
            f"'{getattr(blocks, 'split', None)}' of domain '{getattr(blocks, 'domain', None)}'"
        )


def require_split(blocks, split: str) -> None:
    """The guard every scored block passes: `require_test` in a normal run; in an explicit
    tuning run (`continual.eval_split=validation`) the blocks must be validation blocks, so
    a tuning run can never see test data (nor a normal run validation or train data)."""
    if split == "test":
        require_test(blocks)
    elif split == "validation":
        if getattr(blocks, "split", None) != "validation":
            raise AssertionError(
                f"a tuning run (continual.eval_split=validation) must score VALIDATION splits "
                f"only, got split '{getattr(blocks, 'split', None)}' of domain "
                f"'{getattr(blocks, 'domain', None)}'")
    else:
        raise AssertionError(f"unknown evaluation split '{split}' (known: {EVAL_SPLITS})")


# ---- methods ---------------------------------------------------------------------------------
def method_model_config(cfg: RunConfig, index: int) -> ModelConfig:
    """The `model` section with method `index`'s head and overrides applied, type- and
    range-checked; a bad override raises ConfigError naming `continual.methods[i].model`."""
    method = cfg.continual.methods[index]
    key = f"continual.methods[{index}].model"
    hints = typing.get_type_hints(ModelConfig)
    changes: dict[str, typing.Any] = {"head": method.head}
    import yaml

    for ov in method.model:
        name, raw = (s.strip() for s in ov.split("=", 1))
        if name.startswith("model."):
            name = name[len("model."):]
        if name not in hints:
            raise ConfigError(f"config key '{key}': unknown model key '{name}' in '{ov}' "
                              f"(known: {', '.join(hints)})")
        if name in FIXED_MODEL_KEYS:
            raise ConfigError(f"config key '{key}': '{name}' cannot differ between methods "
                              f"(the encoder and its cached features are shared; set the head "
                              f"with continual.methods[{index}].head)")
        changes[name] = _coerce(yaml.safe_load(raw), hints[name], f"{key}:{name}")
    model = dataclasses.replace(cfg.model, **changes)
    try:
        validate(dataclasses.replace(cfg, model=model, continual=ContinualConfig()))
    except ConfigError as e:
        raise ConfigError(f"config key '{key}' (method '{method.name}'): {e}") from e
    return model


def model_kwargs(model: ModelConfig) -> dict:
    kw = dataclasses.asdict(model)
    kw.pop("encoder")
    return kw


# ---- data ------------------------------------------------------------------------------------
class PoolRows:
    """One domain's rows of a feature cache that holds several domains' training pools (rows
    offset .. offset + n): the training pools share one disk entry, as in `make train`."""

    def __init__(self, cache: FeatureCache, offset: int):
        self.cache, self.offset = cache, offset

    def features(self, model, index: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.cache.features(model, index + self.offset, input_ids)


@dataclass
class Stream:
    """The domain sequence: per domain a training pool and the scored split (TaggedBlocks),
    the retention text's scored split, and the feature caches (None: no caching). The scored
    split is the test split; only an explicit tuning run (`eval_split="validation"`) puts
    validation blocks in `test`, tagged as such, and `require_split` checks the tag on every
    evaluation."""

    order: list[str]
    train: dict[str, TaggedBlocks]
    test: dict[str, TaggedBlocks]
    train_caches: dict[str, FeatureCache | PoolRows] | None = None
    test_caches: dict[str, FeatureCache] | None = None
    eval_split: str = "test"
    retention: TaggedBlocks | None = None
    retention_cache: FeatureCache | None = None

    @classmethod
    def build(cls, order: list[str], train: dict, test: dict, tokens_per_stage: int,
              cache: bool = True, eval_split: str = "test",
              retention: tuple[str, typing.Any] | None = None) -> Stream:
        """Check the sequence and wrap the splits. `train`/`test`: domain -> HF dataset;
        `test` holds the `eval_split` split ("validation" only for tuning runs);
        `retention`: (name, HF dataset of that split) of the general text, or None."""
        if eval_split not in EVAL_SPLITS:
            raise ConfigError(f"config key 'continual.eval_split': '{eval_split}' is not one "
                              f"of {EVAL_SPLITS}")
        if not order:
            raise ConfigError("config key 'continual.order': the sequence has no domain")
        for i, d in enumerate(order):
            if d not in train or d not in test:
                raise ConfigError(f"config key 'continual.order[{i}]': unknown domain '{d}' "
                                  f"(known: {sorted(train)})")
        tr = {d: TaggedBlocks(train[d], d, "train") for d in order}
        te = {d: TaggedBlocks(test[d], d, eval_split) for d in order}
        for i, d in enumerate(order):
            if len(tr[d]) == 0 or tr[d].tokens() == 0:
                raise DataError(f"continual.order[{i}]: stage {i} (domain '{d}') has no "
                                "training data")
            if len(te[d]) == 0 or te[d].tokens() == 0:
                raise DataError(f"continual.order[{i}]: domain '{d}' has no {eval_split} "
                                "data")
            block = tr[d].ids.shape[1]
            need = max(1, tokens_per_stage // block)
            if len(tr[d]) < need:
                raise ConfigError(
                    f"config key 'continual.tokens_per_stage': {tokens_per_stage} tokens need "
                    f"{need} blocks but domain '{d}' has a training pool of {len(tr[d])}; "
                    "lower it or raise data.max_train_tokens_per_domain")
        ret = None
        if retention is not None:
            ret = TaggedBlocks(retention[1], retention[0], eval_split)
            if len(ret) == 0 or ret.tokens() == 0:
                raise DataError(f"continual.retention: '{retention[0]}' has no {eval_split} "
                                "data")
        caches = (lambda sets: {d: FeatureCache(len(b)) for d, b in sets.items()}) if cache \
            else (lambda sets: None)
        return cls(list(order), tr, te, caches(tr), caches(te), eval_split, ret,
                   FeatureCache(len(ret)) if cache and ret is not None else None)

    def cache_on_disk(self, model, cache_dir: str, batch_size: int, domains: list[str],
                      progress: bool = True) -> None:
        """Replace the in-memory caches by disk entries (`FeatureCache.on_disk`): the trunk's
        features are then computed once per (trunk, data, split) and shared with `make train`
        (same label and layout: the training pools concatenated in `domains` order, one
        entry per scored split) and with every later run."""
        names = [d for d in domains if d in self.order]
        pool = FeatureCache.on_disk(model, torch.cat([self.train[d].ids for d in names]),
                                    torch.cat([self.train[d].mask for d in names]), cache_dir,
                                    "train", batch_size, progress)
        offsets = [0]
        for d in names:
            offsets.append(offsets[-1] + len(self.train[d]))
        self.train_caches = {d: PoolRows(pool, off) for d, off in zip(names, offsets,
                                                                       strict=False)}
        split = self.eval_split
        self.test_caches = {d: FeatureCache.on_disk(model, b.ids, b.mask, cache_dir,
                                                    f"{split}-{d}", batch_size, progress)
                            for d, b in self.test.items()}
        if self.retention is not None:
            self.retention_cache = FeatureCache.on_disk(
                model, self.retention.ids, self.retention.mask, cache_dir,
                f"{split}-{self.retention.domain}", batch_size, progress)

    def overlap(self) -> dict[str, int]:
        """Per domain, test blocks whose tokens equal a training-pool block (should be 0)."""
        out = {}
        for d in self.order:
            seen = {bytes(row.numpy()) for row in self.train[d].ids}
            out[d] = sum(bytes(row.numpy()) in seen for row in self.test[d].ids)
        return out

    def caches(self) -> list[FeatureCache]:
        """Every distinct feature cache of the stream."""
        found = list((self.train_caches or {}).values()) + list((self.test_caches or {})
                                                                 .values())
        found += [self.retention_cache] if self.retention_cache is not None else []
        unique = {id(c): c for c in (getattr(c, "cache", c) for c in found)}
        return list(unique.values())

    def cache_summary(self) -> dict:
        """Trunk seconds spent here, blocks served, and what recomputing would have cost (each
        entry's measured encoding time per block, from when it was built)."""
        caches = self.caches()
        hits = sum(c.hits for c in caches)
        misses = sum(c.misses for c in caches)
        spent = sum(c.encode_seconds for c in caches)
        without = 0.0
        for c in caches:
            built = c.entry["encode_seconds"] if c.entry else c.encode_seconds
            per_block = built / (c.n_blocks if c.entry else max(1, c.misses))
            without += per_block * (c.hits + c.misses)
        blocks = hits + misses
        return {"encoder_seconds": spent, "blocks_encoded": misses, "blocks_served_from_cache":
                hits, "seconds_per_block": without / blocks if blocks else 0.0,
                "seconds_without_cache": without, "seconds_saved": without - spent,
                "disk_entries_reused": sum(bool(c.entry and c.entry["reused"]) for c in caches),
                "disk_entries": sum(c.entry is not None for c in caches)}


def batches_per_stage(cc: ContinualConfig, batch_size: int, block: int,
                      processes: int = 1) -> int:
    """Batches in a stage's plan (whole multiples of `processes` are trained); raises
    ConfigError when there are fewer than `processes` (a rank would have nothing to do)."""
    n_stage_blocks = max(1, cc.tokens_per_stage // block)
    n = cc.epochs_per_stage * max(1, n_stage_blocks // min(batch_size, n_stage_blocks))
    if n < processes:
        raise ConfigError(
            f"config key 'continual.tokens_per_stage': {cc.tokens_per_stage} tokens make {n} "
            f"batch(es) of {min(batch_size, n_stage_blocks)} blocks per stage, fewer than the "
            f"{processes} processes; raise it or lower train.batch_size")
    return n


def stage_blocks(pool_size: int, n: int, seed: int, stage: int) -> list[int]:
    """The `n` pool rows stage `stage` trains on, in a seeded order (same for every method)."""
    rng = random.Random(seed * 1_000_003 + stage)
    return rng.sample(range(pool_size), min(n, pool_size))


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


# ---- processes --------------------------------------------------------------------------------
def head_state(base) -> torch.Tensor:
    """The head's weights and buffers and any other trainable parameter, flattened: what
    training changes (the frozen encoder is the same everywhere)."""
    parts = [t.detach().flatten().double().cpu() for t in base.head.state_dict().values()]
    parts += [p.detach().flatten().double().cpu() for n, p in base.named_parameters()
              if p.requires_grad and not n.startswith("head.")]
    return torch.cat(parts)


# ---- evaluation -----------------------------------------------------------------------------
def evaluate_row(model, stream: Stream, accelerator, batch_size: int) -> dict[str, dict]:
    """Every domain's TEST split (validation in a tuning run) scored by `evaluate`
    (gather_for_metrics inside)."""
    row = {}
    for d in stream.order:
        blocks = stream.test[d]
        require_split(blocks, stream.eval_split)
        cache = stream.test_caches[d] if stream.test_caches else None
        row[d] = evaluate(model, blocks, accelerator, batch_size, cache)
    return row


def evaluate_retention(model, stream: Stream, accelerator, batch_size: int) -> dict | None:
    """The general text's scores (None when the stream has none)."""
    if stream.retention is None:
        return None
    require_split(stream.retention, stream.eval_split)
    return evaluate(model, stream.retention, accelerator, batch_size, stream.retention_cache)


def layer_diagnostics(model, stream: Stream, accelerator, batch_size: int,
                      time_steps: list[int]) -> dict[int, dict]:
    """Energy-based heads: every domain's scores and layer statistics (firing rate, spikes
    per token, settled energy F_T / F_0, code density) with T inner steps at evaluation,
    without retraining, per T."""
    out = {}
    for t in time_steps:
        out[t] = {}
        for d in stream.order:
            require_split(stream.test[d], stream.eval_split)
            cache = stream.test_caches[d] if stream.test_caches else None
            out[t][d] = evaluate(model, stream.test[d], accelerator, batch_size, cache,
                                 time_steps=t)
    return out


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


# ---- training -------------------------------------------------------------------------------
def run_sequence(model, method: MethodConfig, stream: Stream, cc: ContinualConfig,
                 tc: TrainConfig, seed: int, accelerator, diagnostics: bool = False,
                 log: Callable[[dict], None] | None = None) -> dict:
    """Train `model` through `stream.order` with `method`; returns the matrices R (rows:
    stages, columns: domains in training order) of every score, the untrained row b, the
    retention text's scores before and after every stage, per-stage tokens, steps and
    timings, and the metrics of each score. A joint method trains one stage on every
    domain's stage blocks at once and has a final row instead of R. A stage whose loss stays
    non-finite ends the sequence: the result then says so (`failed`) and keeps the rows of
    the stages before it."""
    model = accelerator.prepare(model)
    base = accelerator.unwrap_model(model)
    device = accelerator.device
    order = stream.order
    block = stream.train[order[0]].ids.shape[1]
    n_stage_blocks = max(1, cc.tokens_per_stage // block)
    b = min(tc.batch_size, n_stage_blocks)
    steps_per_epoch = max(1, n_stage_blocks // b)
    world, rank = accelerator.num_processes, accelerator.process_index
    local = base.local_learning()
    ewc = EWC(method.ewc_lambda) if method.ewc_lambda > 0 else None
    reservoir = Reservoir(method.replay_size, seed) if method.replay_size > 0 else None
    # DER++: (corrected state y (L, D), LM bias of that moment) of every buffered block
    stored: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reduce_mean(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, "mean") if world > 1 else t

    def make_batch(items: list[tuple[str, int]]):
        ids = torch.stack([stream.train[d].ids[i] for d, i in items])  # (B, L)
        mask = torch.stack([stream.train[d].mask[i] for d, i in items])
        labels = ids.masked_fill(~mask, -100)
        feats = None
        if stream.train_caches is not None:
            parts: dict[str, list[tuple[int, int]]] = {}
            for pos, (d, i) in enumerate(items):
                parts.setdefault(d, []).append((pos, i))
            rows: list[torch.Tensor | None] = [None] * len(items)
            for d, lst in parts.items():
                pos, idx = zip(*lst, strict=True)
                f = stream.train_caches[d].features(base, torch.tensor(idx), ids[list(pos)])
                for k, p in enumerate(pos):
                    rows[p] = f[k]
            feats = torch.stack(rows).to(device)  # (B, L, D)
        return ids.to(device), labels.to(device), feats, int(mask.sum())

    def batches(items: list, s: int) -> list[tuple[list, int]]:
        """The stage's plan: (blocks, how many of them are replayed) per batch, seeded."""
        n_replay = round(cc.replay_fraction * b) if reservoir and reservoir.items else 0
        per_epoch = steps_per_epoch * (len(order) if method.joint else 1)
        plan = []
        for epoch in range(cc.epochs_per_stage):
            perm = random.Random(seed * 7919 + s * 31 + epoch).sample(items, len(items))
            cursor = 0
            for _ in range(per_epoch):
                new = [perm[(cursor + k) % len(perm)] for k in range(b - n_replay)]
                cursor += b - n_replay
                plan.append((new + reservoir.draw(n_replay) if n_replay else new, n_replay))
        return plan

    def train_stage(plan: list[tuple[list, int]], s: int, label: str) -> dict:
        """Optimizer steps over this process's share of `plan`. The plan is the same for
        every process (the reservoir is too: same seed, same offers, same draws); each takes
        its share of whole batches, and one optimizer step averages the ranks' batches
        (DDP), so W processes of batch b step like one process of batch W * b."""
        batches_per_stage(cc, tc.batch_size, block, world)  # raises if len(plan) < world
        plan = plan[: len(plan) // world * world]
        mine = plan[rank::world]
        params = [p for p in base.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = accelerator.prepare(torch.optim.AdamW(groups, lr=tc.lr))
        total_steps = len(mine)  # optimizer steps this stage, the same on every process
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(tc.warmup_fraction * total_steps), total_steps)
        model.train()
        tokens = bad_in_a_row = 0
        losses, gates, penalties, distill, skipped = [], [], [], [], 0
        for items, n_rep in mine:
            ids, labels, feats, n_tok = make_batch(items)
            tokens += n_tok
            with accelerator.autocast():
                out = model(input_ids=ids, labels=labels, features=feats)
            loss = total = out.loss
            penalty = ewc.penalty(base) if ewc else None
            if penalty is not None:
                total = total + penalty
                penalties.append(penalty.item())
            if method.der_alpha > 0 and n_rep:
                rep = items[-n_rep:]
                with torch.no_grad():
                    target = torch.stack([replay_logits(base, stored[it][0].to(device),
                                                        stored[it][1]) for it in rep])
                real = labels[-n_rep:] != -100  # (R, L): real tokens only
                der = (out.logits[-n_rep:][real].float() - target[real].float()).pow(2).mean()
                total = total + method.der_alpha * der
                distill.append(der.item())
            # every rank must take the step or none (accelerate's reduce knows sum/mean only)
            ok = torch.isfinite(total.detach()).float().reshape(1)
            finite = (float(accelerator.reduce(ok, "sum")) if world > 1 else float(ok)) == world
            if not finite:
                optimizer.zero_grad()
                skipped += 1
                bad_in_a_row += 1
                if bad_in_a_row >= min(10, len(mine)):  # short stages: every step failed
                    raise NonFiniteStage(
                        f"[{method.name} seed {seed}] loss NaN/inf for {bad_in_a_row} steps in "
                        f"a row in stage {s + 1} ({label}); the stages before it are kept; "
                        "lower train.lr")
                continue
            bad_in_a_row = 0
            accelerator.backward(total)
            accelerator.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            if local is not None:
                local.collect(base.head.stats["local_statistic"])
                gates.append(local.step(loss, reduce_mean)["plasticity/gate"])
            losses.append(loss.item())
        train_loss = sum(losses) / len(losses) if losses else None
        der = sum(distill) / len(distill) if distill else None
        if world > 1:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=device), "sum").item())
            if train_loss is not None:  # every rank takes the same (non-skipped) steps
                train_loss = float(reduce_mean(torch.tensor(train_loss, device=device)))
            if der is not None:  # each rank distils its own replayed blocks
                der = float(reduce_mean(torch.tensor(der, device=device)))
        return {"domain": label, "steps": len(mine), "batches": len(plan), "tokens": tokens,
                "token_slots": len(plan) * b * block,  # equal for every method by design
                "replayed_per_batch": plan[0][1] if plan else 0, "skipped_steps": skipped,
                "train_loss": train_loss,
                "gate_mean": sum(gates) / len(gates) if gates else None,
                "ewc_penalty_mean": sum(penalties) / len(penalties) if penalties else None,
                "der_distillation_mean": der,
                "_mine": mine}

    @torch.no_grad()
    def store_outputs() -> None:
        """DER++: the corrected states of newly buffered blocks under the current model."""
        buffered = set(reservoir.items)
        for key in [k for k in stored if k not in buffered]:
            del stored[key]
        new = [it for it in reservoir.items if it not in stored]
        bias = None if base.lm_bias is None else base.lm_bias.detach().clone()
        was_training = base.training
        base.eval()
        for k in range(0, len(new), b):
            chunk = new[k: k + b]
            ids, labels, feats, _ = make_batch(chunk)
            y = base.corrected_state(ids, feats, token_mask=labels != -100)
            for it, row in zip(chunk, y, strict=True):
                stored[it] = (row.cpu(), bias)
        base.train(was_training)

    def score(rows: list, retained: list) -> None:
        t0 = time.perf_counter()
        rows.append(evaluate_row(model, stream, accelerator, tc.batch_size))
        retained.append(evaluate_retention(model, stream, accelerator, tc.batch_size))
        timings["eval"] += time.perf_counter() - t0

    timings = {"train": 0.0, "eval": 0.0, "fisher": 0.0, "diagnostics": 0.0}
    rows: list[dict] = []
    retained: list[dict | None] = []
    score(rows, retained)  # b: untrained
    stages = []
    sync: list[dict] = []  # with several processes: do the ranks hold identical state?
    failed = None
    sequence = [(0, "joint")] if method.joint else list(enumerate(order))
    for s, dom in sequence:
        t0 = time.perf_counter()
        if method.joint:  # the sequence's own blocks, every stage's at once
            items = [(d, i) for k, d in enumerate(order)
                     for i in stage_blocks(len(stream.train[d]), n_stage_blocks, seed, k)]
        else:
            items = [(dom, i) for i in stage_blocks(len(stream.train[dom]), n_stage_blocks,
                                                   seed, s)]
        try:
            stage = train_stage(batches(items, s), s, dom)
        except NonFiniteStage as e:
            failed = {"stage": s + 1, "domain": dom, "message": str(e)}
            accelerator.print(f"error: {e}")
            break
        mine = stage.pop("_mine")
        timings["train"] += time.perf_counter() - t0
        if ewc is not None and s < len(order) - 1:  # no later stage uses the last Fisher
            t0 = time.perf_counter()
            # each rank's share of the first fisher_batches global batches; consolidate
            # averages each batch's gradient over ranks before squaring (global-batch Fisher)
            ewc.consolidate(base, [make_batch(it)[:3] for it, _ in mine[: cc.fisher_batches]],
                            reduce_mean)
            timings["fisher"] += time.perf_counter() - t0
        if reservoir is not None:
            for item in items:
                reservoir.add(item)
            if method.der_alpha > 0:
                store_outputs()
        if world > 1:  # local updates, Fisher and buffer are made outside DDP: check them
            sync.append({"stage": s, "weights": ranks_agree(accelerator, head_state(base))}
                        | ({"fisher": ranks_agree(accelerator, ewc.flat_fisher())} if ewc else {})
                        | ({"replay": ranks_agree(accelerator, reservoir.fingerprint())}
                           if reservoir else {}))
        score(rows, retained)
        row = rows[-1]
        stages.append(stage)
        if log is not None:
            log({"stage": s, "domain": dom, "row": row, "retention": retained[-1]} | stage)
        accelerator.print(f"[{method.name} seed {seed}] stage {s + 1}/{len(sequence)} ({dom}): "
                          + ", ".join(f"{d} {r['loss']:.3f}" for d, r in row.items())
                          + (f", retention {retained[-1]['loss']:.3f}" if retained[-1] else ""))

    scores = [k for k in SCORES if k in rows[0][order[0]]]  # bits/char needs `chars` data
    result = {"method": method.name, "seed": seed, "order": order, "joint": method.joint,
              "trainable_parameters": base.trainable_parameters(),
              "head_parameters": base.head_parameters(),
              "baseline": {k: [rows[0][d][k] for d in order] for k in scores},
              "rows": [{k: [r[d][k] for d in order] for k in scores} for r in rows[1:]],
              "stages": stages, "processes": world}
    if retained[0] is not None:
        result["retention"] = {k: [r[k] for r in retained] for k in scores}  # [b, stages...]
    if sync:
        result["ranks_identical"] = sync
    for key in ("firing_rate", "active_fraction", "relative_energy", "spikes_per_token"):
        if key in rows[0][order[0]]:  # row 0: untrained
            result[key] = [[r[d][key] for d in order] for r in rows]
    if failed is not None:
        result["failed"] = failed
    elif method.joint:
        result["final"] = result["rows"][0]
        result["metrics"] = {k: {"ACC": sum(result["final"][k]) / len(order), "BWT": None,
                                 "FWT": None, "forgetting": None} for k in scores}
    else:
        result["R"] = {k: [r[k] for r in result["rows"]] for k in scores}
        result["metrics"] = {k: all_metrics(result["R"][k], result["baseline"][k], k)
                             for k in scores}
    if diagnostics and failed is None and "relative_energy" in rows[0][order[0]]:
        t0 = time.perf_counter()
        trained = base.config.time_steps
        by_t = layer_diagnostics(model, stream, accelerator, tc.batch_size,
                                 sorted(set(cc.eval_time_steps) - {trained}))
        by_t[trained] = rows[-1]  # the last row is already scored at the trained T
        result["diagnostics"] = {"trained_time_steps": trained,  # keys: str(T), as in JSON
                                 "by_T": {str(t): by_t[t] for t in sorted(by_t)}}
        timings["diagnostics"] += time.perf_counter() - t0
    result["seconds"] = timings
    accelerator.free_memory()  # drop the references prepare() kept to this run's objects
    return result


def check_checkpoint_tokenizer(folder, data_tokenizer) -> None:
    """Raise DataError when a saved model folder's tokenizer differs from the data's."""
    from transformers import AutoTokenizer

    from hybridlm.data import tokenizer_fingerprint

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise DataError(f"checkpoint '{folder}' has no readable tokenizer: {e}") from e
    if tokenizer_fingerprint(tok) != tokenizer_fingerprint(data_tokenizer):
        raise DataError(
            f"checkpoint '{folder}' was saved with a different tokenizer than the one of "
            "config key 'model.encoder' that builds this config's data: its token ids would "
            "mean other words; evaluate it with the config it was trained with")
