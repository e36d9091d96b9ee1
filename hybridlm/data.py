"""Build the per-domain corpora: passages -> train/validation/test -> tokens -> packed blocks.

Each domain's documents are cut into passages of about `passage_chars` characters at
paragraph boundaries, duplicates dropped, and passages assigned to a split by the rank of
their content hash (deterministic, no passage in two splits). Each split is tokenized with
the trunk's tokenizer through `datasets`, every passage followed by the separator token,
and the token stream cut into blocks of `block_size`. Every token is kept: the last block is
padded and its padding masked out. Each token also records how many characters of the text
it covers (`chars`), so that scores can be given in bits per character, which do not depend
on the tokenizer. Built splits are saved with `save_to_disk` under
`cache_dir` and reused while sources, tokenizer and settings are unchanged: an entry is
locked while it is built or checked (a second run waits, then reuses it), and its files'
checksums, written with it, are checked on every reuse (a changed entry is built again).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from hybridlm.config import DataConfig, DomainConfig
from hybridlm.corpora import DataError, documents
from hybridlm.trunks import sha256_file

SPLITS = ("train", "validation", "test")
FORMAT_VERSION = 2  # bump when the passage/packing rules change: invalidates caches


def split_passages(text: str, max_chars: int) -> list[str]:
    """Cut a document into passages of at most about `max_chars`, at blank lines when
    possible, else at line ends. A line of up to twice `max_chars` stays whole (an article
    written as one line); a longer one is cut at spaces (mid-word where `max_chars` characters
    hold none), so one huge line becomes many passages. Time and memory are linear in the
    text's length."""
    out: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        lines = [para] if len(para) <= max_chars else para.splitlines()
        for line in lines:
            for piece in _cut_line(line, max_chars) if len(line) > 2 * max_chars else [line]:
                if not piece.strip():
                    continue
                if current and size + len(piece) > max_chars:
                    out.append("\n\n".join(current))
                    current, size = [], 0
                current.append(piece.strip("\n"))
                size += len(piece) + 2
    if current:
        out.append("\n\n".join(current))
    return out


def _cut_line(line: str, max_chars: int) -> list[str]:
    """`line` in pieces of at most `max_chars`, each ending after its last space."""
    pieces, start = [], 0
    while len(line) - start > max_chars:
        space = line.rfind(" ", start + 1, start + max_chars)
        stop = space + 1 if space > 0 else start + max_chars
        pieces.append(line[start:stop])
        start = stop
    pieces.append(line[start:])
    return pieces


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(passages: list[str], val_fraction: float, test_fraction: float):
    """Rank passages by content hash: the first `val_fraction` go to validation, the next
    `test_fraction` to test, the rest to train. Returns {split: [passages in source order]}."""
    n = len(passages)
    order = sorted(range(n), key=lambda i: _hash(passages[i]))
    n_val = max(1, math.ceil(val_fraction * n))
    n_test = max(1, math.ceil(test_fraction * n))
    which = {}
    for rank, i in enumerate(order):
        which[i] = "validation" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return {s: [passages[i] for i in range(n) if which[i] == s] for s in SPLITS}


def token_chars(offsets: list[tuple[int, int]], text_length: int) -> list[int]:
    """Characters of the text each token covers: from the end of the previous token to the
    end of this one (so skipped whitespace counts for the token after it); the text's tail
    counts for the last token. The counts sum to `text_length`."""
    chars, end = [], 0
    for _, stop in offsets:
        stop = max(stop, end)  # byte-level pieces of one character share their offsets
        chars.append(stop - end)
        end = stop
    if chars:
        chars[-1] += text_length - end
    return chars


def pack(token_lists, block_size: int, pad_id: int, char_lists=None):
    """Concatenate token lists and cut them into blocks; linear in the number of tokens.

    Returns input_ids (n_blocks, block_size) and attention_mask of the same shape, where the
    padding of the last block is 0, and (when `char_lists` is given) the characters per
    token, 0 on padding. No token is dropped.
    """
    arrays = [np.asarray(t, dtype=np.int64) for t in token_lists]
    stream = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    n_blocks = math.ceil(len(stream) / block_size)
    ids = np.full(n_blocks * block_size, pad_id, dtype=np.int64)
    ids[: len(stream)] = stream
    mask = np.zeros(n_blocks * block_size, dtype=np.int8)
    mask[: len(stream)] = 1
    shape = (n_blocks, block_size)
    if char_lists is None:
        return ids.reshape(shape), mask.reshape(shape)
    chars = np.zeros(n_blocks * block_size, dtype=np.int32)
    if arrays:
        chars[: len(stream)] = np.concatenate([np.asarray(c, dtype=np.int32) for c in char_lists])
    return ids.reshape(shape), mask.reshape(shape), chars.reshape(shape)


@dataclass
class DomainData:
    """One domain's packed splits (`datasets.Dataset` with input_ids and attention_mask)."""

    name: str
    splits: dict[str, datasets.Dataset]
    stats: dict


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a tokenizer by class, vocabulary and special tokens (not by its mutable
    padding/truncation state)."""
    desc = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
            tokenizer.all_special_tokens, getattr(tokenizer, "do_lower_case", None)]
    return _hash(json.dumps(desc))[:16]


def build_domain(dom: DomainConfig, cfg: DataConfig, tokenizer, cache_root: Path) -> DomainData:
    """Read, split, tokenize and pack one domain, or load it from the cache."""
    docs = list(documents(dom.source, dom.text_field, dom.hf_config, dom.hf_split))
    passages, seen = [], set()
    for _, text in docs:
        for p in split_passages(text, cfg.passage_chars):
            key = " ".join(p.split())
            if key and key not in seen:
                seen.add(key)
                passages.append(p)
    if not passages:
        raise DataError(
            f"domain '{dom.name}' ({dom.source}) has no text: "
            f"{len(docs)} document(s), none with text. Point it at files that hold text."
        )
    if len(passages) < 3:
        raise DataError(
            f"domain '{dom.name}' has {len(passages)} passage(s); train, validation and test "
            "need at least 3: give it more text or lower data.passage_chars"
        )
    by_split = assign_splits(passages, cfg.val_fraction, cfg.test_fraction)
    return cached_domain(dom, cfg, tokenizer, cache_root, "\0".join(passages), by_split,
                         len(docs))


def cached_domain(dom: DomainConfig, cfg: DataConfig, tokenizer, cache_root: Path,
                  content: str, by_split: dict[str, list[str]], n_docs: int) -> DomainData:
    """The packed splits `by_split` ({split: passages}) of one domain, from the cache entry
    keyed by the settings and `content` (the text that decides them), or built into it."""
    settings = [FORMAT_VERSION, cfg.block_size, cfg.val_fraction, cfg.test_fraction,
                cfg.passage_chars, tokenizer_fingerprint(tokenizer)]
    key = _hash(json.dumps(settings) + content)[:16]
    folder = cache_root / f"{dom.name}-{key}"
    with _locked(folder):
        _remove_stale_builds(folder)  # ours to remove: their builder held this lock
        if folder.exists():
            problem = _check_entry(folder)
            if problem is None:
                stats = json.loads((folder / "stats.json").read_text())
                splits = {s: datasets.load_from_disk(str(folder / s)) for s in by_split}
                return DomainData(dom.name, splits, stats | {"cached": True})
            print(f"data cache entry {folder}: {problem}; building it again")
            shutil.rmtree(folder)
        stats = _build_entry(folder, dom, cfg, tokenizer, by_split, n_docs)
        splits = {s: datasets.load_from_disk(str(folder / s)) for s in by_split}
    return DomainData(dom.name, splits, stats | {"cached": False})


def passage_tokens(tokenizer) -> tuple[int, int]:
    """(sep, pad): the token that ends every passage and the one that pads the last block;
    DataError if the tokenizer has neither a sep nor an eos token, or is not a fast one."""
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    if sep is None:
        raise DataError("the tokenizer has neither a sep nor an eos token to end passages with")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the tokenizer {type(tokenizer).__name__} is not a fast tokenizer: "
                        "character offsets (for bits per character) need one")
    return sep, pad


def _build_entry(folder: Path, dom: DomainConfig, cfg: DataConfig, tokenizer,
                 by_split: dict[str, list[str]], n_docs: int) -> dict:
    """Tokenize and pack the passages of each split into the cache entry `folder`; returns
    its stats."""
    sep, pad = passage_tokens(tokenizer)

    def tokenize(batch):
        enc = tokenizer(batch["text"], add_special_tokens=False, verbose=False,
                        return_offsets_mapping=True)
        # the separator stands for the break between passages: one character
        return {"input_ids": [x + [sep] for x in enc["input_ids"]],
                "chars": [token_chars(o, len(t)) + [1]
                          for o, t in zip(enc["offset_mapping"], batch["text"], strict=True)]}

    stats = {"documents": n_docs, "passages": {}, "tokens": {}, "blocks": {}, "chars": {}}
    splits = {}
    for split, texts in by_split.items():
        # a fingerprint of our own: datasets would otherwise hash `tokenize`, pickling the
        # whole tokenizer (most of a small domain's build time)
        tokenized = datasets.Dataset.from_dict({"text": texts}).map(
            tokenize, batched=True, remove_columns=["text"], desc=f"tokenize {dom.name}/{split}",
            new_fingerprint=f"{folder.name}-{split}")
        ids, mask, chars = pack(tokenized["input_ids"], cfg.block_size, pad, tokenized["chars"])
        splits[split] = datasets.Dataset.from_dict(
            {"input_ids": ids, "attention_mask": mask, "chars": chars})
        stats["passages"][split] = len(texts)
        stats["chars"][split] = int(chars.sum())
        stats["tokens"][split] = int(mask.sum())
        stats["blocks"][split] = len(ids)
    # written aside and renamed: a build killed midway leaves only a .tmp folder, which the
    # next build of this entry (or of any entry) removes
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    try:
        for split, ds in splits.items():
            ds.save_to_disk(str(tmp / split))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
        (tmp / CHECKSUMS).write_text(json.dumps(_checksums(tmp), indent=2))
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


# The cache entry's file of SHA-256 checksums (path in the entry: hex digest), written with it
# and checked whenever it is reused: a file changed or replaced since (e.g. one split's
# folder copied over another's) makes the entry be built again.
CHECKSUMS = "checksums.json"
_STALE_BUILD = re.compile(r"(.+-[0-9a-f]{16})\.tmp\d+")


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


def _check_entry(folder: Path) -> str | None:
    """None if the cache entry `folder` is complete and every file written with it is
    unchanged, else what is wrong with it."""
    sums = folder / CHECKSUMS
    if not (folder / "stats.json").is_file() or not sums.is_file():
        return "incomplete (written without checksums by an older version, or cut short)"
    try:
        expected = json.loads(sums.read_text())
        for name, digest in expected.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if sha256_file(path) != digest:
                return f"{name} does not match its checksum (changed since it was written)"
    except (OSError, ValueError, AttributeError, TypeError) as e:
        return f"{CHECKSUMS} is unreadable ({type(e).__name__})"
    return None


@contextlib.contextmanager
def _locked(folder: Path, wait: bool = True):
    """Hold an exclusive lock on the cache entry `folder` (on `<folder>.lock` beside it),
    waiting, with a message, while another process builds it. With `wait=False`, yields
    False at once instead of waiting."""
    lock = folder.with_name(f"{folder.name}.lock")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        f = lock.open("a")
    except OSError:
        try:  # a read-only cache whose entries are only read: flock needs no write access
            f = lock.open("r")
        except OSError as e:
            raise DataError(f"cannot lock the data cache entry {lock} ({e.strerror or e}): "
                            "check that data.cache_dir is writable") from e
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            print(f"data cache entry {folder} is being built by another process (it holds "
                  f"{lock}); waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield True  # the lock goes with the file's closing


def _remove_stale_builds(folder: Path) -> None:
    """Remove the temporary folders of killed builds of the entry `folder` (whose lock the
    caller holds, so no live build of it can own one)."""
    for tmp in folder.parent.glob(f"{glob.escape(folder.name)}.tmp*"):
        if _STALE_BUILD.fullmatch(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)


def build_corpora(cfg: DataConfig, tokenizer, progress: bool = True) -> list[DomainData]:
    """Every configured domain, built or loaded from the cache."""
    if not cfg.cache_dir.strip():  # "" would put the cache in the current folder
        raise DataError("data.cache_dir is empty: give the cache folder (e.g. .cache/hybridlm)")
    cache_root = Path(cfg.cache_dir) / "data"
    cache_root.mkdir(parents=True, exist_ok=True)
    # temporary folders of killed builds of any entry, e.g. of data since changed; a folder
    # whose entry is locked belongs to a live build
    for tmp in cache_root.glob("*.tmp*"):
        match = _STALE_BUILD.fullmatch(tmp.name)
        if match:
            with _locked(cache_root / match[1], wait=False) as free:
                if free:
                    _remove_stale_builds(cache_root / match[1])
    if not progress:
        datasets.disable_progress_bars()
    from hybridlm.streaming import held_out_domain  # (it builds on this module)

    # a streamed domain: only its held-out splits are built here (hybridlm/streaming.py)
    return [held_out_domain(dom, cfg, tokenizer, cache_root) if dom.streaming
            else build_domain(dom, cfg, tokenizer, cache_root) for dom in cfg.domains]


def subsample(ds: datasets.Dataset, max_tokens: int | None, block_size: int, seed: int):
    """A fixed, seeded subset of blocks holding at most `max_tokens` tokens (all if None)."""
    if max_tokens is None or max_tokens >= len(ds) * block_size:
        return ds
    n = max(1, max_tokens // block_size)
    idx = sorted(random.Random(seed).sample(range(len(ds)), n))
    return ds.select(idx)


def format_report(domains: list[DomainData]) -> str:
    """A table of documents, passages, tokens and blocks per domain and split."""
    rows = ["| domain | documents | train tokens | val tokens | test tokens | train blocks |"
            " val blocks | test blocks | cache |", "|---" * 9 + "|"]
    for d in domains:
        # a streamed domain's training text is not counted before training reads it
        t = {"train": "stream"} | {k: f"{v:,}" for k, v in d.stats["tokens"].items()}
        b = {"train": "stream"} | {k: f"{v:,}" for k, v in d.stats["blocks"].items()}
        rows.append(
            f"| {d.name} | {d.stats['documents']} | {t['train']} | {t['validation']} | "
            f"{t['test']} | {b['train']} | {b['validation']} | {b['test']} | "
            f"{'reused' if d.stats['cached'] else 'built'} |"
        )
    return "\n".join(rows)
