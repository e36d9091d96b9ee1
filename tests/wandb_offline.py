"""Test helper: read back an offline W&B run (`wandb/offline-run-*/run-<id>.wandb`) without a
server, to prove that what train/train.py logs offline is readable.

wandb 0.31 ships no Python reader and `wandb.Api` can't see offline runs, so this decodes the
file itself. Format (LevelDB-style log, as written by wandb-core):

    header   ":W&B" (4 bytes) | magic 0xBEE1 (uint16 LE) | version (1 byte)
    blocks   32 KiB each; a block tail shorter than 7 bytes is zero padding
    chunk    crc32 (uint32 LE) | length (uint16 LE) | type (1 byte) | data
             type FULL=1, FIRST=2, MIDDLE=3, LAST=4; a record split across blocks is the
             concatenation FIRST + MIDDLE* + LAST
    record   a serialized `wandb.proto.wandb_internal_pb2.Record`

Only the parts the tests need are decoded: config (the run's initial config plus
`config` updates), history rows, summary updates, media files and whether the run finished.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

HEADER = b":W&B" + struct.pack("<H", 0xBEE1)
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbRunError(ValueError):
    """An offline run directory or `.wandb` file is missing, truncated or corrupt."""


@dataclass
class OfflineRun:
    """What an offline run recorded. `history` is one dict per logged step (with `_step`);
    media values (images, tables) are kept as the JSON W&B stored (`_type`, `path`, ...)."""

    path: Path
    run_id: str = ""
    name: str = ""
    project: str = ""
    group: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None
    finished: bool = False

    def row(self, step: int) -> dict:
        """The merged history row(s) logged at `step` (W&B may split one step in several)."""
        out: dict = {}
        for r in self.history:
            if r.get("_step") == step:
                out |= r
        return out


def _records(data: bytes, path: Path):
    """Yield the raw bytes of each record in a `.wandb` file."""
    if len(data) < 7 or data[:6] != HEADER:
        raise WandbRunError(f"{path}: not a W&B run file (bad header {data[:7]!r})")
    pos, pending = 7, b""
    while pos < len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # zero padding at the end of a block
            pos += left
            continue
        if pos + CHUNK_HEADER > len(data):
            raise WandbRunError(f"{path}: truncated chunk header at byte {pos}")
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if crc == 0 and length == 0 and kind == 0:  # preallocated / padded tail
            pos += left
            continue
        start = pos + CHUNK_HEADER
        chunk = data[start : start + length]
        if len(chunk) != length:
            raise WandbRunError(f"{path}: truncated record at byte {pos} (file incomplete)")
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise WandbRunError(f"{path}: checksum mismatch in the record at byte {pos}")
        pos = start + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise WandbRunError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _key(item) -> str:
    return item.nested_key[0] if item.nested_key else item.key


def _put(d: dict, item) -> None:
    """Store an item; a nested key (media: ["plots/loss", "path"]) becomes nested dicts."""
    _set_nested(d, list(item.nested_key) or [item.key], _value(item))


def _apply(d: dict, record) -> None:
    """A config or summary record: its `update` items set keys, its `remove` items drop them."""
    for item in record.update:
        _put(d, item)
    for item in record.remove:
        d.pop(_key(item), None)


def _value(item):
    return json.loads(item.value_json) if item.value_json else None


def _set_nested(d: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def find_run_file(path: str | Path) -> Path:
    """The `.wandb` file of a run given as the file, its `offline-run-*` folder, or a folder
    holding exactly one `wandb/offline-run-*` (or `offline-run-*`) folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise WandbRunError(f"{path}: no such W&B run file or folder")
    files = sorted(path.glob("run-*.wandb"))
    if not files:
        files = sorted(path.glob("offline-run-*/run-*.wandb")) + sorted(
            path.glob("wandb/offline-run-*/run-*.wandb")
        )
    if not files:
        raise WandbRunError(
            f"{path}: incomplete W&B run directory, no run-<id>.wandb file found "
            "(was the run finished with run.finish() and wandb.teardown()?)"
        )
    if len(files) > 1:
        names = ", ".join(str(f.relative_to(path)) for f in files)
        raise WandbRunError(f"{path}: holds {len(files)} runs ({names}); name one of them")
    return files[0]


def read_run(path: str | Path, require_finished: bool = True) -> OfflineRun:
    """Decode an offline run. Raises `WandbRunError` naming the file when it is missing,
    corrupt, or (with `require_finished`) was never finished (no exit record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    file = find_run_file(path)
    run = OfflineRun(path=file)
    for raw in _records(file.read_bytes(), file):
        rec = pb.Record()
        try:
            rec.ParseFromString(raw)
        except Exception as e:  # protobuf's DecodeError
            raise WandbRunError(f"{file}: undecodable record ({e})") from e
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.name, run.project, run.group = (
                r.run_id, r.display_name, r.project, r.run_group)
            for item in r.config.update:
                _put(run.config, item)
        elif kind == "config":
            _apply(run.config, rec.config)
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "summary":
            _apply(run.summary, rec.summary)
        elif kind == "files":
            run.files += [f.path for f in rec.files.files]
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
            run.finished = True
    # W&B stores config values as {"value": v, "desc": ...}; give the plain values back.
    run.config = {k: v["value"] if isinstance(v, dict) and "value" in v else v
                  for k, v in run.config.items() if k != "_wandb"}
    if require_finished and not run.finished:
        raise WandbRunError(
            f"{file}: incomplete W&B run, no exit record (the run was killed or not finished; "
            "call run.finish() then wandb.teardown())"
        )
    return run


def find_runs(folder: str | Path) -> list[Path]:
    """Every `offline-run-*/run-*.wandb` file under `folder` (e.g. a training output_dir)."""
    return sorted(Path(folder).rglob("offline-run-*/run-*.wandb"))
