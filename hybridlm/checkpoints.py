"""Training checkpoints: what one holds (`save`, `restore`), which ones are complete and intact.

A checkpoint folder holds what `Accelerator.save_state` wrote (model weights as safetensors,
optimizer and RNG states read back with `torch.load(weights_only=True)`) and `progress.yaml`,
written last: the step, the data position, the scheduler and gate states (plain numbers, so
nothing is unpickled), a SHA-256 of every other file and, on its last line, a SHA-256 of
itself. A folder without `progress.yaml` was cut off mid-save; one whose files don't match
their checksums is corrupt. The frozen trunk is not in it: the run identity names it
(`model.encoder`) and fingerprints it (`trunk_sha256`), and a resume on another is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import warnings
from pathlib import Path

import yaml

from hybridlm.config import ConfigError
from hybridlm.io import write_text_atomic

PROGRESS = "progress.yaml"
WEIGHTS = "model.safetensors"


def frozen_trunk_keys(model) -> set[str]:
    """State-dict keys of the frozen trunk (and an untied trunk LM head). Training checkpoints
    leave them out: they are the pretrained weights every run starts from (about 0.5 GB for
    SmolLM2), rebuilt on resume and identified by the trunk fingerprint in the run identity."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k for k in model.state_dict()
            if k.startswith(("encoder.", "lm_head.")) and k not in trainable}


def drop_keys(weights: list[dict], keys: set[str]) -> None:
    """Remove `keys` from state dicts in place (a DDP-wrapped model prefixes 'module.')."""
    for w in weights:
        for k in list(w):
            if k.removeprefix("module.") in keys:
                del w[k]


def check_saved_keys(folder: Path, model, frozen: set[str]) -> None:
    """Raise ConfigError unless the checkpoint's weights are exactly the model's non-frozen
    state (a resume loads them with strict=False, so a missing key must be caught here)."""
    from hybridlm.hub import safetensors_header

    saved = {k.removeprefix("module.") for k in safetensors_header(folder / WEIGHTS)}
    expected = set(model.state_dict()) - frozen
    if saved != expected:
        extra, missing = sorted(saved - expected), sorted(expected - saved)
        raise ConfigError(
            f"--resume: checkpoint {folder} holds other weights than this model trains "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the config it was "
            "made with, or choose another output_dir"
        )


def file_checksums(folder: Path) -> dict[str, str]:
    sums = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != PROGRESS and not path.name.startswith("."):
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            sums[path.name] = h.hexdigest()
    return sums


def write_progress(folder: Path, state: dict) -> None:
    """`progress.yaml`: `state` as YAML, then a line with the SHA-256 of that text."""
    text = yaml.safe_dump(state)
    digest = hashlib.sha256(text.encode()).hexdigest()
    write_text_atomic(folder / PROGRESS, f"{text}# sha256 {digest}\n")


def read_progress(folder: Path) -> dict:
    """The state `write_progress` wrote; ValueError saying what is wrong if the file is
    missing, edited or damaged."""
    path = folder / PROGRESS
    if not path.is_file():
        raise ValueError("no progress.yaml (the save was cut off)")
    try:
        text, _, last = path.read_text().rstrip("\n").rpartition("\n")
        text += "\n"
        if last != f"# sha256 {hashlib.sha256(text.encode()).hexdigest()}":
            raise ValueError("progress.yaml does not match its checksum")
        state = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError("progress.yaml is unreadable") from e
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
        raise ValueError("progress.yaml is unreadable")
    return state


def verify(folder: Path) -> str | None:
    """None if the checkpoint is complete and intact, else what is wrong with it."""
    try:
        expected = read_progress(folder)["files"]
    except ValueError as e:
        return str(e)
    actual = file_checksums(folder)
    for name, digest in expected.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its checksum"
    return None


def latest_intact(ckpt_dir: Path) -> Path | None:
    """The newest intact checkpoint; warns about each newer one it had to pass over."""
    for folder in sorted(ckpt_dir.glob("step_*"), reverse=True):
        problem = verify(folder)
        if problem is None:
            return folder
        warnings.warn(f"checkpoint {folder} skipped: {problem}; trying the previous one",
                      stacklevel=2)
    return None


def tokenizer_identity(tokenizer) -> dict:
    """A tokenizer's class, size and a SHA-256 of its vocabulary."""
    vocab = "\n".join(f"{t}\t{i}" for t, i in sorted(tokenizer.get_vocab().items()))
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}


def blocks_sha256(blocks: list) -> str:
    """A SHA-256 of the token ids of `blocks` (`evaluation.Blocks`), in order."""
    h = hashlib.sha256()
    for b in blocks:
        h.update(b.ids.numpy().tobytes())
    return h.hexdigest()


def run_identity(model_type: str, head: str, model_config: dict, tokenizer: dict,
                 trunk: str = "", data: dict | None = None, launch: dict | None = None,
                 mixed_precision: str = "no") -> dict:
    """What a checkpoint must have been trained as for a run to resume it: model type, head,
    model config, tokenizer (`tokenizer_identity`), the frozen trunk's fingerprint (its
    weights are not in the checkpoint), the data ({domain: `blocks_sha256` of its
    splits}: a `files:` corpus edited after the kill is other data), the launch
    (`hybridlm.launch.launch_identity`: processes and engine; each rank's batches and the
    state's sharding depend on them) and the mixed precision (`train.mixed_precision`: the
    weights are float32 in every mode, but a run resumed in another precision would not
    continue the same computation, and an fp16 checkpoint holds the loss scaler's state that
    the other modes lack)."""
    return {"model_type": model_type, "head": head, "model": dict(model_config),
            "tokenizer": tokenizer, "trunk_sha256": trunk, "data": dict(data or {}),
            "launch": dict(launch or {"processes": 1, "engine": "one process"}),
            "mixed_precision": mixed_precision}


def resume_point(ckpt_dir: Path, identity: dict) -> Path | None:
    """The newest intact checkpoint in `ckpt_dir`, or None. A checkpoint trained as something
    else than `identity` (see run_identity) is refused with a ConfigError naming what differs."""
    folder = latest_intact(ckpt_dir)
    if folder is None:
        return None
    saved = read_progress(folder).get("identity")
    if isinstance(saved, dict):  # saved before the precision was recorded: a float32 run
        saved = {"mixed_precision": "no"} | saved
    if saved == identity:
        return folder
    launch = saved.get("launch") if isinstance(saved, dict) else None
    if isinstance(launch, dict) and launch != identity["launch"]:
        from hybridlm.launch import describe

        raise ConfigError(
            f"--resume: checkpoint {folder} was made by {describe(launch)}, this "
            f"launch is {describe(identity['launch'])}: resume with the launch it was made "
            "with (the same number of processes and engine: NPROC, LAUNCH_CONFIG, torchrun's "
            "--nnodes and --nproc-per-node), or choose another output_dir (nothing was "
            "changed)")
    if not isinstance(saved, dict):
        what = "records no model identity (saved by another program or an older version)"
    else:
        differ = []
        for k, v in identity.items():  # model and data: name the key or domain that differs
            if k in ("model", "data") and isinstance(saved.get(k), dict):
                differ += [f"{k}.{n}" for n in sorted(v.keys() | saved[k].keys())
                           if saved[k].get(n) != v.get(n)]
            elif saved.get(k) != v:
                differ.append(k)
        what = f"was trained with another {', '.join(differ[:5]) or 'setup'} than this run"
    raise ConfigError(
        f"--resume: checkpoint {folder} {what}; resume with the config, tokenizer and data "
        "it was made with, or choose another output_dir (nothing was changed)"
    )


# ---- the checkpoint schema: what a save writes and a resume reads back -----------------------
def save(accelerator, folder: Path, progress: dict, scheduler, local, identity: dict,
         keep: int) -> None:
    """`Accelerator.save_state` into `folder` (the frozen trunk left out by the pre-hook the
    caller registered), then `progress.yaml`, written last: `progress` (step, data position,
    history, ...), the scheduler's and the local learner's state, the run identity and the
    checksums of every other file. Keeps the newest `keep` checkpoints of the folder's parent."""
    from safetensors import SafetensorError

    try:
        accelerator.save_state(str(folder))
    except (RuntimeError, SafetensorError) as e:
        if isinstance(e, RuntimeError) and "writ" not in str(e):  # torch's failed write says so
            raise
        raise OSError(f"saving checkpoint {folder} failed "
                      f"({str(e).strip().splitlines()[0][:200]})") from e
    accelerator.wait_for_everyone()  # save_state writes on rank 0 without waiting
    if accelerator.is_main_process:
        state = progress | {"scheduler": scheduler.state_dict(), "identity": identity,
                            "files": file_checksums(folder)}
        if local is not None:
            state["gate"] = local.gate.state_dict()
            state["hebbian_skipped"] = local.skipped
        write_progress(folder, state)
        for old in sorted(folder.parent.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def restore(accelerator, folder: Path, model, frozen: set[str], scheduler, local) -> dict:
    """Load the checkpoint `folder` (written by `save`) into the prepared objects, the
    scheduler and the local learner; returns its progress. A checkpoint that does not fit
    the model raises ConfigError saying what to do."""
    try:
        check_saved_keys(folder, model, frozen)
        accelerator.load_state(str(folder), strict=False)  # the trunk is not in it
    except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0][:300]
        if isinstance(e, pickle.UnpicklingError):  # from torch.load(weights_only=True)
            reason = "a state file holds objects that would run code when unpickled; refused"
        raise ConfigError(
            f"--resume: checkpoint {folder} cannot be loaded into this model "
            f"({type(e).__name__}: {reason}); resume with the config it was made with, "
            "or choose another output_dir"
        ) from e
    progress = read_progress(folder)
    progress.pop("identity")
    progress.pop("files")
    scheduler.load_state_dict(progress.pop("scheduler"))
    if local is not None:
        local.gate.load_state_dict(progress.pop("gate"))
        local.skipped = progress.pop("hebbian_skipped")
    return progress
