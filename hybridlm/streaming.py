"""Streamed domains: training text read as a stream, sharded by rank, never cached.

A domain with `streaming: true` (`hf:<dataset>`, or `files:` globs of `.jsonl` shards) is
opened as a `datasets.IterableDataset` (the same code path for both: a local shard is read by
`load_dataset("json", data_files=..., streaming=True)`), one shard per file or per Hub shard.

    record --split_passages--> passages --passage_split (content hash)--> train | held out
    train passages (this rank's shards) --tokenize, + sep--> tokens --cut--> full blocks (L,)
    blocks of every domain, one each in turn --> batches (B, L) --all ranks agree--> training

- **Splits.** Each passage's split is decided alone, from the SHA-256 of its whitespace-
  normalised text read as a number u in [0, 1): validation when u < val_fraction, test when
  u < val_fraction + test_fraction, else train (`passage_split`). It is `assign_splits`'
  rule (the lowest hashes are held out) with a fixed threshold instead of a rank, so the
  training stream decides it per passage and never yields a held-out passage (nor any copy of
  one: equal text, equal hash). The held-out splits are finite and small: one pass over the
  whole stream keeps only them and builds them like a cached domain (`held_out_domain`).
- **Sharding.** Rank r of W reads whole shards (`split_dataset_by_node`). A shard count that
  W does not divide is refused (`shard_for_rank`): `datasets`' fallback would make every rank
  read every record and keep 1/W of them, so each rank reads the whole corpus.
- **Equal batch counts.** Ranks hold different amounts of text, so a rank may run out first;
  the per-step all-reduces would then wait forever. Every batch, all ranks agree whether all
  of them still have one (`all_have`, one all-reduce of one number) and the pass ends on all
  of them at the first batch some rank lacks. A rank's leftover text of that pass and its
  last partial block or batch are not trained on.
- **Position.** `TrainStream.position()` is plain data (YAML): per domain, the dataset's
  `state_dict()` before the record being cut into blocks, the tokens carried over from
  earlier records (fewer than one block) and how many of that record's blocks were taken;
  plus whose block comes next. A checkpoint stores every rank's (`gather_positions`), with
  the world size; a resume with another world size is refused (`check_world_size`).
- **No feature cache** for streamed training: the frozen trunk's features are computed per
  batch (the held-out splits keep theirs).
"""

from __future__ import annotations

import copy
import glob
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from hybridlm.config import ConfigError, DataConfig, DomainConfig
from hybridlm.corpora import DataError
from hybridlm.data import DomainData, cached_domain, passage_tokens, split_passages

HASH_SCALE = 2.0 ** 64  # u = first 64 bits of the SHA-256 / 2^64


def passage_split(passage: str, val_fraction: float, test_fraction: float) -> str:
    """The split of one passage, decided from its text alone (see the module docstring)."""
    key = " ".join(passage.split())
    u = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / HASH_SCALE
    return "validation" if u < val_fraction else \
        "test" if u < val_fraction + test_fraction else "train"


def shard_files(dom: DomainConfig) -> list[str]:
    """The `.jsonl` shards of a `files:` stream, in order; each glob must match a file."""
    shards: dict[str, None] = {}
    for pattern in (p.strip() for p in dom.source.partition(":")[2].split(",")):
        matched = [m for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
        if not matched:
            raise DataError(f"domain '{dom.name}': no file matches '{pattern}': check the path "
                            "of its .jsonl shards in the config")
        shards.update(dict.fromkeys(matched))
    return list(shards)


def open_stream(dom: DomainConfig) -> datasets.IterableDataset:
    """The whole stream of a domain (every shard), from its start."""
    scheme, _, rest = dom.source.partition(":")
    if scheme == "files":
        return datasets.load_dataset("json", data_files=shard_files(dom), split="train",
                                     streaming=True)
    return datasets.load_dataset(rest, dom.hf_config, split=dom.hf_split, streaming=True)


def shard_for_rank(ds: datasets.IterableDataset, name: str, rank: int, world: int
                   ) -> datasets.IterableDataset:
    """Rank `rank`'s whole shards of `ds`; DataError when `world` does not divide them."""
    if ds.n_shards % world:
        divisors = [k for k in range(1, ds.n_shards + 1) if ds.n_shards % k == 0]
        raise DataError(
            f"domain '{name}' streams {ds.n_shards} shard(s), which {world} ranks cannot share "
            f"as whole shards: launch a number of processes that divides {ds.n_shards} "
            f"({', '.join(map(str, divisors[:8]))}), or cut the corpus into a multiple of "
            f"{world} shards")
    return split_dataset_by_node(ds, rank, world) if world > 1 else ds


def texts(ds: datasets.IterableDataset, dom: DomainConfig) -> Iterator[str]:
    """The `text_field` of every record of `ds`, checked."""
    try:
        for i, rec in enumerate(ds):
            value = rec.get(dom.text_field)
            if not isinstance(value, str):
                what = f"has no '{dom.text_field}'" if value is None else \
                    f"has a value of type {type(value).__name__} in '{dom.text_field}'"
                raise DataError(f"domain '{dom.name}': record {i} of its stream {what}, not a "
                                "string: fix the record, or name the text's field in "
                                "text_field")
            yield value
    except (ValueError, OSError) as e:  # unreadable JSON, a shard gone since it was listed
        if isinstance(e, DataError):
            raise
        raise DataError(f"domain '{dom.name}': its stream cannot be read "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


# ---- the held-out splits: one pass over the whole stream ----------------------------------
def held_out_domain(dom: DomainConfig, cfg: DataConfig, tokenizer, cache_root: Path
                    ) -> DomainData:
    """The validation and test splits of a streamed domain, packed like a cached domain's
    (`DomainData` without a train split). One pass over every shard keeps the held-out
    passages (each once) and a SHA-256 of the whole stream's text, which keys the cache entry
    and identifies the data a checkpoint was trained on (`stats["stream_sha256"]`)."""
    held: dict[str, dict[str, None]] = {"validation": {}, "test": {}}  # ordered, each once
    n_docs, n_train, digest = 0, 0, hashlib.sha256()
    for text in texts(open_stream(dom), dom):
        n_docs += 1
        digest.update(text.encode("utf-8") + b"\0")
        for p in split_passages(text, cfg.passage_chars):
            if not p.strip():
                continue
            split = passage_split(p, cfg.val_fraction, cfg.test_fraction)
            if split == "train":
                n_train += 1
            else:
                held[split].setdefault(p)
    for split, passages in held.items():
        if not passages:
            share = cfg.val_fraction if split == "validation" else cfg.test_fraction
            raise DataError(
                f"domain '{dom.name}' streams {n_docs} record(s), and none of their "
                f"{n_train} passage(s) falls in its {split} split (a share of about {share} "
                "does): give it more text or raise data.val_fraction / data.test_fraction")
    by_split = {s: list(p) for s, p in held.items()}
    stream_sha = digest.hexdigest()
    data = cached_domain(dom, cfg, tokenizer, cache_root, f"stream\0{stream_sha}", by_split,
                         n_docs)
    data.stats |= {"streamed": True, "stream_sha256": stream_sha}
    data.stats["passages"]["train"] = n_train
    return data


# ---- the training stream of one rank -------------------------------------------------------
class DomainBlocks:
    """One domain's training blocks (L,) on one rank, in order, with their position.

    `position` is where the next block starts: `dataset` (the shard's `state_dict()` before
    the record being cut), `carry` (tokens of earlier records not yet in a block, fewer than
    L), `taken` (blocks of that record already yielded)."""

    def __init__(self, dom: DomainConfig, cfg: DataConfig, tokenizer, rank: int, world: int,
                 opener: Callable[[DomainConfig], datasets.IterableDataset] = open_stream):
        self.dom, self.cfg, self.tokenizer = dom, cfg, tokenizer
        self.rank, self.world, self.opener = rank, world, opener
        self.sep = passage_tokens(tokenizer)[0]
        self.ds = shard_for_rank(opener(dom), dom.name, rank, world)  # checks the shards now
        self.position: dict | None = None  # None: from the start

    def train_tokens(self, text: str) -> list[int]:
        """The tokens of a record's training passages, each ended by the separator."""
        passages = [p for p in split_passages(text, self.cfg.passage_chars) if p.strip()
                    and passage_split(p, self.cfg.val_fraction, self.cfg.test_fraction)
                    == "train"]
        if not passages:
            return []
        ids = self.tokenizer(passages, add_special_tokens=False, verbose=False)["input_ids"]
        return [t for x in ids for t in x + [self.sep]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Blocks from `position` on; `position` is updated before each block is yielded, so
        it always says where the block after the last one yielded starts."""
        L = self.cfg.block_size
        start = self.position or {"dataset": None, "carry": [], "taken": 0}
        ds = shard_for_rank(self.opener(self.dom), self.dom.name, self.rank, self.world)
        if start["dataset"] is not None:
            ds.load_state_dict(start["dataset"])
        carry, skip = list(start["carry"]), start["taken"]
        # (a loaded state shows in state_dict() only once iteration has begun)
        before = copy.deepcopy(start["dataset"] or ds.state_dict())
        for text in texts(ds, self.dom):
            tokens = carry + self.train_tokens(text)
            n = len(tokens) // L
            for j in range(skip, n):
                self.position = {"dataset": before, "carry": carry, "taken": j + 1}
                yield torch.tensor(tokens[j * L:(j + 1) * L], dtype=torch.long)
            skip, carry = 0, tokens[n * L:]
            before = copy.deepcopy(ds.state_dict())
            self.position = {"dataset": before, "carry": carry, "taken": 0}


class TrainStream:
    """This rank's training batches of every streamed domain: blocks taken from the domains
    in turn (one each; a domain that ran out is passed over), `batch_size` a batch.

    A batch is {"input_ids": (B, L), "labels": (B, L) (full blocks: no padding),
    "index": (1,) int64}: `index` is a 64-bit digest of the batch's tokens, which the training
    loop chains into `data_sha256` in place of the block indices of a map-style batch."""

    def __init__(self, domains: list[DomainConfig], cfg: DataConfig, tokenizer, batch_size: int,
                 rank: int, world: int, opener=open_stream):
        self.parts = [DomainBlocks(d, cfg, tokenizer, rank, world, opener) for d in domains]
        self.batch_size, self.world = batch_size, world
        self.next, self.done = 0, set()  # whose block comes next; domains run out this pass
        self.cfg, self.tokenizer, self.domains, self.opener = cfg, tokenizer, domains, opener

    def restart(self) -> None:
        """Back to the start of every domain (a new pass)."""
        for p in self.parts:
            p.position = None
        self.next, self.done = 0, set()

    def position(self) -> dict:
        """Where the next batch starts, as plain data (YAML)."""
        return {"next": self.next, "done": sorted(self.done),
                "domains": {p.dom.name: copy.deepcopy(p.position) for p in self.parts}}

    def load_position(self, position: dict) -> None:
        self.next, self.done = position["next"], set(position["done"])
        for p in self.parts:
            p.position = copy.deepcopy(position["domains"][p.dom.name])

    def batches(self) -> Iterator[dict]:
        """This rank's batches from the current position to the end of its text."""
        its = [iter(p) for p in self.parts]
        n = len(its)
        while True:
            blocks = []
            while len(blocks) < self.batch_size and len(self.done) < n:
                i, self.next = self.next, (self.next + 1) % n
                if i in self.done:
                    continue
                block = next(its[i], None)
                if block is None:
                    self.done.add(i)
                else:
                    blocks.append(block)
            if len(blocks) < self.batch_size:
                return  # the last partial batch is not trained on
            ids = torch.stack(blocks)  # (B, L)
            yield {"input_ids": ids, "labels": ids.clone(), "index": batch_digest(ids)}

    def first_blocks(self, n: int) -> list[dict]:
        """The first `n` training blocks of the whole stream (every shard, as one rank of one
        would read it): the same on every rank, for a data-initialised dictionary. Items as
        `evaluation.Blocks` gives them."""
        whole = TrainStream(self.domains, self.cfg, self.tokenizer, 1, 0, 1, self.opener)
        out = []
        for batch in whole.batches():
            out.append({"input_ids": batch["input_ids"][0], "labels": batch["labels"][0],
                        "index": torch.tensor(len(out))})
            if len(out) == n:
                break
        return out


def batch_digest(ids: torch.Tensor) -> torch.Tensor:
    """The first 64 bits of the SHA-256 of a batch's token ids, as a (1,) int64 tensor."""
    digest = hashlib.sha256(ids.numpy().tobytes()).digest()
    return torch.tensor([int.from_bytes(digest[:8], "little", signed=True)])


def all_have(has: bool, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None,
             world: int) -> bool:
    """True when every rank has a batch (`has` on each); `all_reduce_sum` sums a tensor over
    the ranks (None with one rank). Every rank gets the same answer, so all stop together."""
    if all_reduce_sum is None:
        return has
    return int(all_reduce_sum(torch.tensor([int(has)]))[0]) == world


def in_step(batches: Iterator[dict], all_reduce_sum, world: int) -> Iterator[dict]:
    """`batches` while every rank still has one: the same number of batches on every rank."""
    while True:
        batch = next(batches, None)
        if not all_have(batch is not None, all_reduce_sum, world):
            return
        yield batch


def sum_over_ranks(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The all-reduce (sum) `all_have` takes, or None with one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t, "sum")


def check_first_batch(stream: TrainStream, accelerator) -> None:
    """Refuse, on every rank at once and before training, a stream that gives some rank no
    full batch (its passes would train on nothing)."""
    has = next(stream.batches(), None) is not None
    stream.restart()
    if not all_have(has, sum_over_ranks(accelerator), accelerator.num_processes):
        who = "some rank" if accelerator.num_processes > 1 else "the run"
        raise DataError(
            f"the streamed training text gives {who} no full batch of {stream.batch_size} "
            f"blocks of {stream.cfg.block_size} tokens: "
            "give each shard more text, or lower train.batch_size or data.block_size")


def gather_positions(stream: TrainStream, accelerator) -> dict:
    """Every rank's stream position, for the checkpoint (a collective: call on all ranks)."""
    from accelerate.utils import gather_object

    mine = stream.position()
    ranks = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    return {"world_size": accelerator.num_processes, "ranks": ranks}


def check_world_size(saved: dict, world: int, folder) -> None:
    """Refuse to resume a stream sharded over another number of ranks than `world`."""
    if saved["world_size"] != world:
        raise ConfigError(
            f"--resume: checkpoint {folder} streamed its shards over {saved['world_size']} "
            f"rank(s), and this launch has {world}: each rank's shards and position belong to "
            f"that layout. Resume with {saved['world_size']} processes, or start a new "
            "output_dir")
