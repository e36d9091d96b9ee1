"""Frozen-trunk features: computed once per (trunk, data, split), kept on disk, reused by every
head, seed, run and the continual evaluation.

An entry is `<label>-<trunk hash>-<data hash>.npy` (n_blocks, block_size, D) float32 under
`<cache_dir>/features/`, with a `.json` beside it written last (shape, dtype, SHA-256 of the
.npy, seconds it took to encode). Under mixed precision (`train.mixed_precision` bf16 or fp16)
the trunk runs under that autocast and the entry, `<...>-bf16.npy` or `<...>-fp16.npy`, holds
bfloat16 (as its raw 16 bits: numpy has no bfloat16) or float16: half the bytes. The mode is
in the name and the dtype in the metadata, so an entry is never read in another precision;
features are always handed out as float32 (the residual stream y = z + delta stays float32).
A missing, truncated, corrupt or mismatched entry is detected and rebuilt; a build in
progress lives in a temporary file, so a killed build leaves nothing that a later run would
trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hybridlm.precision import DTYPES
from hybridlm.trunks import sha256_file

_FINGERPRINTS: dict[int, str] = {}


def trunk_fingerprint(model) -> str:
    """SHA-256 of what the frozen features depend on: the trunk's config, its weights and
    how many top layers train (the features are the output below them)."""
    key = id(model.encoder)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        h.update(model.encoder.config.to_json_string(use_diff=False).encode())
        h.update(str(model.config.trainable_encoder_layers).encode())
        for name, t in model.encoder.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def data_fingerprint(ids: torch.Tensor, mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.numpy().astype(np.int64).tobytes())
    h.update(mask.numpy().astype(np.int8).tobytes())
    return h.hexdigest()


class FeatureCache:
    """Frozen-trunk features (n_blocks, block_size, D) of one dataset.

    `FeatureCache(n)` fills itself in memory on first sight of each block;
    `FeatureCache.on_disk(...)` loads or builds the whole split once, on disk. Rows are
    addressed by the block's index in its dataset. `hits`/`misses` count blocks served from /
    added to the cache; `encode_seconds` is time spent running the trunk here; `entry`
    describes the disk entry (reused or built, bytes, seconds its encoding took).
    """

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.store: torch.Tensor | None = None
        self.filled = torch.zeros(n_blocks, dtype=torch.bool)
        self.hits = self.misses = 0
        self.encode_seconds = 0.0
        self.entry: dict | None = None

    def features(self, model, index: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Features of the blocks `index` (B,) whose tokens are `input_ids` (B, L)."""
        index = index.cpu()
        missing = ~self.filled[index]
        if missing.any():
            start = time.perf_counter()
            new = model.encoder_features(input_ids[missing.to(input_ids.device)]).float().cpu()
            if self.store is None:
                self.store = torch.empty(self.n_blocks, *new.shape[1:], dtype=torch.float32)
            self.store[index[missing]] = new
            self.filled[index[missing]] = True
            self.encode_seconds += time.perf_counter() - start
        self.misses += int(missing.sum())
        self.hits += int((~missing).sum())
        return self.store[index].to(input_ids.device, torch.float32)

    @classmethod
    def on_disk(cls, model, ids: torch.Tensor, mask: torch.Tensor, cache_dir: str | Path,
                label: str, batch_size: int = 16, progress: bool = True,
                mixed_precision: str = "no") -> FeatureCache:
        """The features of blocks `ids`/`mask` (n, L) under `model`'s frozen trunk: loaded
        from `cache_dir/features` when an intact entry exists, else encoded and saved.
        `mixed_precision` (no | bf16 | fp16): the autocast the trunk runs under and the
        dtype the entry holds (`hybridlm.precision.DTYPES`)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
        root = Path(cache_dir) / "features"
        root.mkdir(parents=True, exist_ok=True)
        stem = f"{safe}-{trunk_fingerprint(model)[:16]}-{data_fingerprint(ids, mask)[:16]}"
        if mixed_precision != "no":  # float32 entries keep the names they always had
            stem += f"-{mixed_precision}"
        dtype = DTYPES[mixed_precision]
        npy, meta_file = root / f"{stem}.npy", root / f"{stem}.json"
        d = model.encoder.config.hidden_size
        shape = [len(ids), ids.shape[1], d]
        cache = cls(len(ids))
        problem = _check_entry(npy, meta_file, shape, dtype)
        if problem is None:
            meta = json.loads(meta_file.read_text())
            cache.store = _load(npy, dtype)
            cache.entry = {"file": npy.name, "reused": True, "bytes": npy.stat().st_size,
                           "encode_seconds": meta["seconds"]}
        else:
            if npy.exists() or meta_file.exists():
                print(f"feature cache entry {npy.name}: {problem}; encoding it again")
                meta_file.unlink(missing_ok=True)
            start = time.perf_counter()
            tmp = root / f".{stem}.{os.getpid()}.tmp.npy"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=_NUMPY[dtype],
                                            shape=tuple(shape))
            bar = tqdm(range(0, len(ids), batch_size), desc=f"encode {label}", unit="batch",
                       disable=not progress, leave=False,
                       mininterval=0.1 if sys.stderr.isatty() else 30)  # logs: a line per 30 s
            device = model.device.type
            for i in bar:
                with torch.autocast(device, dtype, enabled=mixed_precision != "no"):
                    z = model.encoder_features(ids[i : i + batch_size])
                out[i : i + batch_size] = _to_numpy(z.to("cpu", dtype))
            out.flush()
            del out
            os.replace(tmp, npy)
            seconds = time.perf_counter() - start
            meta = {"shape": shape, "dtype": str(dtype).removeprefix("torch."),
                    "sha256": sha256_file(npy), "seconds": round(seconds, 3),
                    "tokens": int(mask.sum())}
            meta_file.write_text(json.dumps(meta, indent=2))  # last: marks the entry complete
            cache.store = _load(npy, dtype)
            cache.encode_seconds = seconds
            cache.misses = len(ids)
            cache.entry = {"file": npy.name, "reused": False, "bytes": npy.stat().st_size,
                           "encode_seconds": seconds}
        cache.filled[:] = True
        return cache

    def summary(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "encode_seconds": self.encode_seconds}


# How each dtype lies in a .npy file: bfloat16 as its raw 16 bits (numpy has no bfloat16).
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _load(npy: Path, dtype: torch.dtype) -> torch.Tensor:
    """An entry's features, memory-mapped (copy on write), as a `dtype` tensor."""
    store = torch.from_numpy(np.load(npy, mmap_mode="c"))
    return store.view(torch.bfloat16) if dtype == torch.bfloat16 else store


def _check_entry(npy: Path, meta_file: Path, shape: list[int], dtype: torch.dtype
                 ) -> str | None:
    """None if the entry is complete and intact, else what is wrong with it."""
    if not meta_file.is_file():
        return "missing" if not npy.exists() else "incomplete (no metadata)"
    try:
        meta = json.loads(meta_file.read_text())
        if meta["shape"] != shape:
            return f"shape {meta['shape']} does not match the data's {shape}"
        if meta["dtype"] != str(dtype).removeprefix("torch."):
            return f"dtype {meta['dtype']} is not the {str(dtype).removeprefix('torch.')} asked for"
        if not npy.is_file():
            return "the .npy file is missing"
        if sha256_file(npy) != meta["sha256"]:
            return "its content does not match its checksum (corrupt)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable metadata ({type(e).__name__})"
    return None


def cache_report(caches: list[FeatureCache]) -> dict:
    """What the disk cache did in this run: entries reused and built, bytes, seconds spent
    encoding, and seconds saved (the recorded encoding time of every reused entry)."""
    entries = [c.entry for c in caches if c.entry is not None]
    reused = [e for e in entries if e["reused"]]
    built = [e for e in entries if not e["reused"]]
    return {"entries_reused": len(reused), "entries_built": len(built),
            "bytes": sum(e["bytes"] for e in entries),
            "encode_seconds": round(sum(e["encode_seconds"] for e in built), 1),
            "seconds_saved": round(sum(e["encode_seconds"] for e in reused), 1)}


def sample_states(model, train, cache: FeatureCache | None, n_tokens: int, seed: int
                  ) -> torch.Tensor:
    """The trunk's states (n_tokens, D) of real tokens drawn (seeded) from the blocks of
    `train` (a dataset of input_ids/labels/index items; `cache` its features, if any): what a
    data-initialised dictionary is built from."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(len(train), generator=g)[: max(1, n_tokens // 16)]
    items = [train[int(i)] for i in blocks]
    ids = torch.stack([it["input_ids"] for it in items])
    real = torch.stack([it["labels"] for it in items]) != -100
    index = torch.stack([it["index"] for it in items])
    feats = cache.features(model, index, ids) if cache is not None \
        else model.encoder_features(ids)
    states = feats[real]  # (tokens, D)
    return states[torch.randperm(len(states), generator=g)[:n_tokens]]
