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
    open_stream,
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


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": 5}'], "record 1 of its stream has a value of type int in 'text'"),
    (['{"text": "ok"}', '{broken'], "its stream cannot be read (ArrowInvalid: JSON parse"),
    (['{"body": "ok"}'], "record 0 of its stream has no 'text'"),
])
def test_bad_records_are_named(tmp_path, lines, message):
    (tmp_path / "shard.jsonl").write_text("\n".join(lines) + "\n")
    dom = DomainConfig(name="x", source=f"files:{tmp_path}/*.jsonl", streaming=True)
    with pytest.raises(DataError, match=re.escape("domain 'x'")) as e:
        list(texts(open_stream(dom), dom))
    assert message in str(e.value)


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


# ---- make train on a stream: kill, resume, same data -----------------------------------------
# Four shards of unequal length (1, 4, 1, 4 records): with two ranks, one rank holds 5 batches
# of 4 blocks of 16 tokens a pass, the other 20, so each pass ends at the fifth batch and
# 8 steps cross a pass boundary; one process at 16 blocks a batch crosses one too.
E2E_SHARDS = [1, 4, 1, 4]


def train_args(out: Path, source: str, *extra: str) -> list[str]:
    return ["--config", "configs/quick.yaml", f"output_dir={out}",
            f"data.cache_dir={ROOT / '.cache' / 'hybridlm'}",
            f"data.domains=[{{name: docs, source: '{source}', streaming: true}}]",
            "data.max_train_tokens_per_domain=null", "data.max_eval_tokens_per_domain=256",
            "data.block_size=16", "data.passage_chars=100", "data.val_fraction=0.1",
            "data.test_fraction=0.1", "train.heads=[spiking_pc]", "train.max_steps=8",
            "train.save_every=3", "train.keep_checkpoints=10", "model.n_neurons=32",
            "model.learning=hybrid", "--no-wandb", *extra]


def expected_sha256(source: str, batch_size: int, world: int, steps: int, tokenizer) -> str:
    """data_sha256 of an uninterrupted run, from the streams alone: per pass, the ranks train
    as many batches as the shortest of them holds; each step chains every rank's digest."""
    import hashlib

    from hybridlm.config import load_config

    cfg = load_config(str(ROOT / "configs" / "quick.yaml"),
                      [a for a in train_args(Path("x"), source) if "=" in a])
    ranks = [digests(TrainStream(cfg.data.domains, cfg.data, tokenizer, batch_size, r, world))
             for r in range(world)]
    per_pass = min(len(r) for r in ranks)
    chain = ""
    for step in range(steps):
        row = [r[step % per_pass] for r in ranks]
        chain = hashlib.sha256((chain + str(row)).encode()).hexdigest()
    return chain


def keep_until(run: Path, step: int) -> None:
    """The run folder as a kill right after checkpoint `step` leaves it: newer checkpoints
    and every result removed (the kill may have come later)."""
    import shutil

    for ckpt in (run / "spiking_pc" / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    shutil.rmtree(run / "spiking_pc" / "model", ignore_errors=True)
    for done in (run / "spiking_pc" / "metrics.json", run / "metrics.json"):
        done.unlink(missing_ok=True)


@pytest.mark.slow
def test_one_process_resume_of_a_stream_is_bit_exact(tmp_path, tokenizer, capsys):
    from safetensors.torch import load_file

    from tests.conftest import command

    source = write_shards(tmp_path / "shards", E2E_SHARDS, chars=800)
    train = command("train/train.py").main
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert train(train_args(whole, source, "train.batch_size=16")) == 0, capsys.readouterr().err
    import shutil
    shutil.copytree(whole, part)
    keep_until(part, 3)
    assert train(train_args(part, source, "train.batch_size=16", "--resume")) == 0
    a, b = (load_file(r / "spiking_pc" / "model" / "model.safetensors") for r in (whole, part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (json.loads((r / "spiking_pc" / "metrics.json").read_text()) for r in (whole, part))
    for key in a.keys() - {"epoch_seconds", "resumes"}:
        assert a[key] == b[key], key
    assert [r["from_step"] for r in b["resumes"]] == [3]
    assert a["data_sha256"] == expected_sha256(source, 16, 1, 8, tokenizer)
    assert a["train_tokens_per_epoch"] is None and "kn_bigram" not in json.loads(
        (whole / "metrics.json").read_text())["heads"]  # n-grams need the whole training set


@pytest.mark.slow
@pytest.mark.scale  # make test-scale (CI runs it after make test)
def test_two_ranks_stream_unequal_shards_killed_and_resumed(tmp_path, tokenizer, capsys):
    """accelerate launch, 2 CPU ranks: killed after its step-3 checkpoint, refused a resume on
    one process, resumed on two; the batches trained on are those of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import command

    source = write_shards(tmp_path / "shards", E2E_SHARDS, chars=800)
    run = tmp_path / "ddp"
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "train/train.py"]
    env = os.environ | {"ACCELERATE_USE_CPU": "1"}
    proc = subprocess.Popen(launch + train_args(run, source, "train.batch_size=4"), cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ckpt = run / "spiking_pc" / "checkpoints" / "step_0000003" / "progress.yaml"
    deadline = time.time() + 180
    while time.time() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    err = proc.communicate()[1]
    assert ckpt.exists(), err[-3000:]
    keep_until(run, 3)
    # one process cannot take over two ranks' shards and positions: the run identity's launch
    # refuses it first (the stream's own world-size check is unit-tested above)
    rc = command("train/train.py").main(train_args(run, source, "train.batch_size=4",
                                                   "--resume"))
    assert rc == 2
    assert "made by 2 processes under DDP, this launch is 1 process" in capsys.readouterr().err
    done = subprocess.run(launch + train_args(run, source, "train.batch_size=4", "--resume"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads((run / "spiking_pc" / "metrics.json").read_text())
    assert m["optimizer_steps"] == 8 and m["ranks_identical"] is True
    assert [r["from_step"] for r in m["resumes"]] == [3]
    assert m["data_sha256"] == expected_sha256(source, 4, 2, 8, tokenizer)
    saved = yaml.safe_load((run / "spiking_pc" / "checkpoints" / "step_0000006" /
                            "progress.yaml").read_text())
    assert saved["epoch"] == 1 and saved["stream"]["world_size"] == 2  # in its second pass


def test_a_stream_without_one_full_batch_is_refused_before_training(tmp_path, capsys):
    """In-process, before anything is written: 2 records cannot fill a batch of 64 blocks."""
    from tests.conftest import command

    source = write_shards(tmp_path / "shards", [2], chars=800)
    out = tmp_path / "run"
    rc = command("train/train.py").main(train_args(out, source, "train.batch_size=64"))
    assert rc == 2
    assert "gives the run no full batch of 64 blocks of 16 tokens" in capsys.readouterr().err
    assert not out.exists()
