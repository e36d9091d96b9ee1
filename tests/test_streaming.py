"""Streamed domains (hybridlm/streaming.py): content-hash splits per passage, whole shards per
rank, equal batch counts on every rank, and the stream position saved and restored exactly.
The local .jsonl shards go through `datasets`' streaming IterableDataset, as hf: sources do."""

import json
import re
import threading
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from hybridlm.config import ConfigError, DataConfig, DomainConfig, load_config
from hybridlm.corpora import DataError
from hybridlm.streaming import (
    DomainBlocks,
    TrainStream,
    check_world_size,
    held_out_domain,
    in_step,
    passage_split,
    texts,
)
from hybridlm.trunks import resolve_trunk

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_trunk("minilm").path)


def python_topics() -> list[str]:
    """Real text, offline: the Python language reference's topics."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def write_shards(folder: Path, sizes: list[int], chars: int = 1500, start: int = 0) -> str:
    """`len(sizes)` .jsonl shards of `sizes[i]` records (reference topics cut to `chars`);
    returns their `files:` source."""
    docs = python_topics()[start:]
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for k, n in enumerate(sizes):
        with (folder / f"shard{k}.jsonl").open("w") as f:
            for text in docs[i:i + n]:
                f.write(json.dumps({"text": text[:chars]}) + "\n")
        i += n
    return f"files:{folder}/*.jsonl"


def data_cfg(tmp_path, *domains, block_size=16) -> DataConfig:
    return DataConfig(domains=list(domains), block_size=block_size, passage_chars=300,
                      val_fraction=0.1, test_fraction=0.1, cache_dir=str(tmp_path / "cache"))


def digests(stream: TrainStream, n: int | None = None) -> list[int]:
    out = []
    for batch in stream.batches():
        out.append(int(batch["index"]))
        if len(out) == n:
            break
    return out


def test_passage_splits_follow_the_content_hash_alone():
    passages = [f"passage {i}: " + "some words " * (i % 7) for i in range(4000)]
    splits = [passage_split(p, 0.05, 0.1) for p in passages]
    share = {s: splits.count(s) / len(passages) for s in ("validation", "test", "train")}
    assert share["validation"] == pytest.approx(0.05, abs=0.015)
    assert share["test"] == pytest.approx(0.10, abs=0.02)
    # the text decides, not the order or the spacing; copies of a held-out passage stay out
    assert [passage_split(p, 0.05, 0.1) for p in reversed(passages)] == splits[::-1]
    assert all(passage_split(p.replace(" ", "\n  "), 0.05, 0.1) == s
               for p, s in zip(passages[:200], splits[:200], strict=True))


def test_training_stream_never_holds_held_out_text(tmp_path, tokenizer):
    dom = DomainConfig(name="docs", source=write_shards(tmp_path / "s", [10, 10]),
                       streaming=True)
    cfg = data_cfg(tmp_path, dom)
    held = held_out_domain(dom, cfg, tokenizer, tmp_path / "cache")
    assert held.stats["passages"]["validation"] > 0 and held.stats["passages"]["test"] > 0
    assert set(held.splits) == {"validation", "test"}
    train = torch.cat([b["input_ids"].flatten()
                       for b in TrainStream([dom], cfg, tokenizer, 1, 0, 1).batches()]).tolist()
    train_text = " ".join(map(str, train))
    # no 12-token run of held-out text (of 10 distinct tokens or more: not a line of "****")
    # is anywhere in the training stream
    n_checked = 0
    for split in ("validation", "test"):
        for ids in held.splits[split]["input_ids"]:
            for i in range(0, len(ids) - 12, 4):
                if len(set(ids[i:i + 12])) >= 10:
                    assert f" {' '.join(map(str, ids[i:i + 12]))} " not in f" {train_text} "
                    n_checked += 1
    assert n_checked > 30 and len(train) > 1000


def test_whole_shards_per_rank_and_a_world_size_that_does_not_divide_them(tmp_path,
                                                                           tokenizer):
    dom = DomainConfig(name="docs", source=write_shards(tmp_path / "s", [3, 4, 5, 6]),
                       streaming=True)
    cfg = data_cfg(tmp_path, dom)
    whole = list(texts(DomainBlocks(dom, cfg, tokenizer, 0, 1).ds, dom))
    ranks = [list(texts(DomainBlocks(dom, cfg, tokenizer, r, 2).ds, dom)) for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(whole) and not set(ranks[0]) & set(ranks[1])
    assert {len(r) for r in ranks} <= {3 + 5, 4 + 6, 3 + 4, 5 + 6}  # whole shards each
    with pytest.raises(DataError, match=r"streams 4 shard\(s\), which 3 ranks cannot share.*"
                                        r"divides 4 \(1, 2, 4\)"):
        TrainStream([dom], cfg, tokenizer, 2, 0, 3)


def test_the_position_restores_the_stream_exactly(tmp_path, tokenizer):
    """Two domains taken in turn; cut after k batches (mid-record too), the position through
    YAML (as in progress.yaml) into a fresh stream, then cut and restored again."""
    doms = [DomainConfig(name="a", source=write_shards(tmp_path / "a", [4, 3]), streaming=True),
            DomainConfig(name="b", source=write_shards(tmp_path / "b", [2, 2], start=30),
                         streaming=True)]
    cfg = data_cfg(tmp_path, *doms)
    whole = digests(TrainStream(doms, cfg, tokenizer, 3, 1, 2))
    assert len(whole) > 12 and len(set(whole)) == len(whole)
    for k in (1, 5, 9):
        first = TrainStream(doms, cfg, tokenizer, 3, 1, 2)
        head = digests(first, k)
        second = TrainStream(doms, cfg, tokenizer, 3, 1, 2)
        second.load_position(yaml.safe_load(yaml.safe_dump(first.position())))
        middle = digests(second, 2)
        third = TrainStream(doms, cfg, tokenizer, 3, 1, 2)
        third.load_position(yaml.safe_load(yaml.safe_dump(second.position())))
        assert head + middle + digests(third) == whole, k
    assert any(p["taken"] for p in first.position()["domains"].values())  # mid-record cuts


def test_ranks_with_unequal_text_yield_the_same_number_of_batches(tmp_path, tokenizer):
    """Two ranks (threads) with a summing all-reduce: the rank with less text runs out first
    and both stop at that batch."""
    dom = DomainConfig(name="docs", source=write_shards(tmp_path / "s", [1, 8]), streaming=True)
    cfg = data_cfg(tmp_path, dom)
    streams = [TrainStream([dom], cfg, tokenizer, 2, r, 2) for r in range(2)]
    alone = [len(digests(s)) for s in streams]
    assert alone[0] < alone[1]  # unequal text
    barrier, slots = threading.Barrier(2), [None, None]

    def rank(r: int, counts: list) -> None:
        def all_reduce_sum(t):
            slots[r] = t
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        streams[r].restart()
        counts[r] = sum(1 for _ in in_step(streams[r].batches(), all_reduce_sum, 2))

    counts = [None, None]
    threads = [threading.Thread(target=rank, args=(r, counts)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert counts == [alone[0], alone[0]]


def test_resume_with_another_world_size_is_refused():
    check_world_size({"world_size": 2, "ranks": [{}, {}]}, 2, "ckpt")
    with pytest.raises(ConfigError, match=r"streamed its shards over 2 rank\(s\), and this "
                                          r"launch has 1.*Resume with 2 processes"):
        check_world_size({"world_size": 2, "ranks": [{}, {}]}, 1, "ckpt")


@pytest.mark.parametrize("overrides, message", [
    (["data.domains=[{name: a, source: 'builtin:news', streaming: true}]",
      "train.max_steps=5"], "streams hf:<dataset> or files:<glob of .jsonl shards>"),
    (["data.domains=[{name: a, source: 'files:x/*.txt', streaming: true}]",
      "train.max_steps=5"], "streams hf:<dataset> or files:<glob of .jsonl shards>"),
    (["data.domains=[{name: a, source: 'files:x/*.jsonl', streaming: true}, "
      "{name: b, source: 'builtin:news'}]", "train.max_steps=5"],
     "stream every domain or none"),
    (["data.domains=[{name: a, source: 'files:x/*.jsonl', streaming: true}]"],
     "give the optimizer steps of a streamed run"),
    (["train.max_steps=5"], "is for streamed domains only"),
    (["data.domains=[{name: a, source: 'hf:x', streaming: true}]", "train.max_steps=5",
      "data.max_train_tokens_per_domain=4096"], "does not apply to streamed domains"),
])
def test_bad_streaming_configs_are_refused(overrides, message):
    limit = "data.max_train_tokens_per_domain"  # quick.yaml's, unless the case sets it
    base = [] if any(o.startswith(limit) for o in overrides) else [f"{limit}=null"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(str(ROOT / "configs" / "quick.yaml"), base + overrides)
