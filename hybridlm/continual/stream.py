"""The domain sequence and its guards: each domain's training pool and scored split, tagged
with their split so evaluation can refuse anything but the test split (validation only in an
explicit tuning run), the trunk's feature caches, and the seeded plan of stage blocks."""

from __future__ import annotations

import random
import typing
from dataclasses import dataclass

import torch

from hybridlm.config import EVAL_SPLITS, ConfigError, ContinualConfig
from hybridlm.corpora import DataError
from hybridlm.evaluation import Blocks
from hybridlm.features import FeatureCache


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
