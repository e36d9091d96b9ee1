"""Publishing a checked model folder to the Hugging Face Hub as one commit.

Only the files a model folder is made of are sent (`upload_plan`: weights, configs, tokenizer,
card, the remote code when `config.json` names it); everything else in the folder (tokens,
keys, logs, stray files) is left out and listed, and a link that leads out of the folder stops
the upload. `--remote-code` and a card from a run (`card_from`) are applied to a staged copy
first: the folder changes only once the commit is made.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridlm.hub.folder import CARD, CONFIG, WEIGHTS, WEIGHTS_INDEX, _read_json, check_model_folder
from hybridlm.io import CheckpointError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}\Z")

# What `save_model` writes, by name: the model's own files and those the tokenizers of
# transformers save (tokenizer.json and its configs, or the vocabulary files of the slow
# tokenizers, chat templates). The weight shards named by the index and the remote code named
# by `auto_map` join them per folder (`model_files`).
MODEL_FILES = frozenset({
    CONFIG, "generation_config.json", WEIGHTS, WEIGHTS_INDEX, CARD,
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
})
CHAT_TEMPLATES = "additional_chat_templates"  # transformers: one <name>.jinja per extra template


class PublishError(ValueError):
    """Publishing can't start: no token, bad repo id, offline mode, or a bad folder."""


def check_repo_id(repo_id: str) -> str:
    """`user/name` with letters, digits, '-', '_', '.'; raises `PublishError` otherwise (also
    for any whitespace or control character, a trailing newline included)."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id) or ".." in repo_id \
            or "--" in repo_id or repo_id.endswith((".", "-")) or repo_id.endswith(".git"):
        shown = repr(repo_id[:120]) + ("..." if len(repo_id) > 120 else "") \
            if isinstance(repo_id, str) else type(repo_id).__name__
        raise PublishError(
            f"malformed Hub repo id {shown}: expected 'user/name' (letters, digits, "
            "'-', '_', '.'; at most 96 characters each; no '--' or '..'; no spaces)"
        )
    return repo_id


def model_files(folder: Path) -> set[str]:
    """The names (relative to `folder`) a model folder may publish: `MODEL_FILES`, the weight
    shards its index names and the remote-code module its `auto_map` names."""
    names = set(MODEL_FILES)
    if (folder / WEIGHTS_INDEX).is_file():
        names |= set((_read_json(folder / WEIGHTS_INDEX).get("weight_map") or {}).values())
    for ref in (_read_json(folder / CONFIG).get("auto_map") or {}).values():
        names.add(ref.split("--")[-1].split(".")[0] + ".py")
    return names


@dataclass(frozen=True)
class UploadPlan:
    """What `publish` sends from `folder`: `files` (relative paths) and what it leaves out,
    as (path, why) pairs."""

    folder: Path
    files: tuple[str, ...]
    left_out: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        size = sum((self.folder / f).stat().st_size for f in self.files)
        lines = [f"uploading {len(self.files)} files ({size / 2**20:.1f} MiB):"]
        lines += [f"  {f}" for f in self.files]
        if self.left_out:
            lines.append("leaving out (not files of a model folder):")
            lines += [f"  {name}: {why}" for name, why in self.left_out]
        return "\n".join(lines)


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def upload_plan(folder: str | Path) -> UploadPlan:
    """The files of `folder` that `publish` uploads (`model_files`) and those it leaves out,
    with why. Raises `PublishError` naming any link in the folder that resolves outside it:
    whatever it points at would be read and maybe sent."""
    folder = Path(folder)
    root = folder.resolve()
    wanted = model_files(folder)
    files, left_out = [], {}
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders: not entered
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            if path.is_symlink() and not _inside(path.resolve(), root):
                raise PublishError(
                    f"{path}: a link to {path.resolve()}, outside the model folder: refusing "
                    "to publish (nothing was uploaded); copy what it points at into the "
                    "folder, or remove the link"
                )
            if name not in filenames:
                continue
            rel = path.relative_to(folder).as_posix()
            top = rel.split("/")[0]
            in_templates = top == CHAT_TEMPLATES and rel.count("/") == 1 and name.endswith(
                ".jinja")
            if (rel in wanted or in_templates) and path.is_file():
                files.append(rel)
            elif top.startswith("."):
                left_out[top] = "hidden"
            elif "/" in rel:
                left_out[top + "/"] = "a folder, not part of a model folder"
            else:
                left_out[rel] = ("not a regular file" if rel in wanted else
                                 "not a file of a model folder")
    return UploadPlan(folder, tuple(sorted(files)), tuple(sorted(left_out.items())))


def _hub_api(token: str | None, endpoint: str | None):
    """An `HfApi` with a token; raises `PublishError` in offline mode or without a token.
    Makes no request."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE=1 is set: publishing needs the network; "
                           "run with HF_HUB_OFFLINE=0 (nothing was uploaded)")
    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login` "
            "(nothing was uploaded)"
        )
    return HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)


def _stage(plan: UploadPlan, into: Path) -> Path:
    """The plan's files copied into `into`, to change there. The weights are hard-linked where
    the file system allows: nothing writes them (the card and the remote code are written to
    new files, config.json replaced)."""
    for rel in plan.files:
        src, dst = plan.folder / rel, into / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".safetensors"):
            try:
                os.link(src, dst)
                continue
            except OSError:
                pass
        shutil.copy2(src, dst)
    return into


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    remote_code: bool = False,
    card_from: str | Path | None = None,
    log: Callable[[str], None] = print,
):
    """Upload a checked model folder (with its card) to the Hub as ONE commit of exactly the
    files of `upload_plan`, which it logs first.

    `remote_code` exports the self-contained modeling source; `card_from` (a run folder of
    train/train.py that trained this model: `check_card_run`) writes the card from that run's
    results. Both are applied to a staged copy, and written into `folder` once the commit is
    made. Creates the repo if needed; the endpoint is `endpoint`, else `HF_ENDPOINT`. Returns
    the `CommitInfo`. Raises `PublishError` before any request, with `folder` unchanged, when
    the repo id, the token, the folder or the run is wrong.
    """
    from hybridlm.hub.card import check_card_run, write_card_for_run
    from hybridlm.hub.remote_code import export_remote_code

    check_repo_id(repo_id)
    folder = Path(folder)
    try:
        config = check_model_folder(folder, require_card=card_from is None)
        if card_from is not None:
            check_card_run(card_from, folder)
    except CheckpointError as e:
        raise PublishError(f"refusing to publish: {e}") from e
    plan = upload_plan(folder)
    api = _hub_api(token, endpoint)
    message = commit_message or f"Upload hybridlm model from {folder.resolve().name}"
    if not remote_code and card_from is None:
        return _commit(api, plan, repo_id, private, message, log)
    root = folder.resolve()
    try:  # beside the folder: the weights can be hard-linked, the changes moved in
        tmp = tempfile.TemporaryDirectory(prefix=f".{root.name}.publish-", dir=root.parent)
    except OSError as e:
        raise PublishError(f"cannot stage the changes beside {folder} ({e}); nothing was "
                           "changed or uploaded") from e
    with tmp:
        try:
            staged = _stage(plan, Path(tmp.name))
            if remote_code:
                export_remote_code(staged)
            if card_from is not None:
                write_card_for_run(card_from, config.get("head"), repo_id, staged)
            check_model_folder(staged, require_card=True)
        except (CheckpointError, OSError) as e:  # OSError: e.g. a full disk while staging
            raise PublishError(f"refusing to publish: {e}") from e
        plan = UploadPlan(staged, upload_plan(staged).files, plan.left_out)
        info = _commit(api, plan, repo_id, private, message, log)
        for rel in plan.files:  # the folder now holds what was published
            new, old = staged / rel, folder / rel
            if rel.endswith(".safetensors"):  # the weights: never changed
                continue
            if old.is_file() and new.read_bytes() == old.read_bytes():
                continue
            try:
                shutil.move(new, old)
            except OSError as e:
                log(f"warning: published, but {old} could not be updated ({e})")
    return info


def _commit(api, plan: UploadPlan, repo_id: str, private: bool, message: str,
            log: Callable[[str], None]):
    """Log the plan, create the repo if needed and upload the plan's files in one commit."""
    from huggingface_hub import CommitOperationAdd

    log(plan.describe())
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    # create_commit, not upload_folder: that one splits a large folder into several commits
    return api.create_commit(
        repo_id, repo_type="model",
        operations=[CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(plan.folder / f))
                    for f in plan.files],
        commit_message=message,
    )
