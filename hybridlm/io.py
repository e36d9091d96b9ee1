"""Small file helpers: atomic writes of files and folders, so a crash never leaves a
half-written result, and the check that a safetensors file is whole."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_json_atomic(path: str | Path, data) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextmanager
def folder_atomic(path: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `path` to write into; when the block ends without an
    error it replaces `path` (renamed into place), so `path` is never half-written."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for stale in (tmp, old):  # left by a process killed here
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointError(ValueError):
    """A model folder is incomplete or inconsistent; the message names the file or field."""


def safetensors_header(path: Path) -> dict:
    """The tensor table of a safetensors file ({name: {dtype, shape, data_offsets}}), after
    checking that the file is complete (its size matches the header's last offset)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: corrupt safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path}: corrupt safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if size != 8 + n + end:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file ({size} bytes, the header "
            f"describes {8 + n + end})"
        )
    return header
