"""The model folder: what it must hold (`check_model_folder`, the one validator, which names
the file or field that is wrong), and saving / loading it.

A model folder holds `config.json` (model_type "hybridlm"), `model.safetensors`,
`generation_config.json`, the tokenizer files and a model card (`README.md`). Importing
`hybridlm` registers the classes with `AutoConfig` / `AutoModelForCausalLM`, so
`AutoModelForCausalLM.from_pretrained(folder)` works without remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridlm.io import CheckpointError, safetensors_header

MODEL_TYPE = "hybridlm"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CARD = "README.md"


# ---- validation ----------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _tokenizer_max_id(folder: Path) -> tuple[int, str] | None:
    """(largest token id, file it came from) of the tokenizer in `folder`, or None."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        data = _read_json(tj)
        vocab = (data.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [t["id"] for t in data.get("added_tokens") or []]
        return (max(ids) if ids else -1), "tokenizer.json"
    vt = folder / "vocab.txt"
    if vt.is_file():
        return len(vt.read_text(encoding="utf-8").splitlines()) - 1, "vocab.txt"
    return None


def check_model_folder(
    folder: str | Path, *, require_card: bool = False, require_tokenizer: bool = True
) -> dict:
    """Check a hybridlm model folder before loading or publishing it; returns `config.json`.

    Checks: the folder exists; `config.json` is JSON with model_type "hybridlm" and an
    encoder_config; `model.safetensors` (or its index and shards) is complete and holds the
    word embeddings with the config's vocab_size x hidden_size; the tokenizer's ids fit in
    the embeddings; the remote code named by `auto_map` is there; the card parses.
    Raises `CheckpointError` naming the file or field.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a model folder (no such directory)")
    cfg = _read_json(folder / CONFIG)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{folder / CONFIG}: not a JSON object")
    mt = cfg.get("model_type")
    if mt != MODEL_TYPE:
        raise CheckpointError(
            f"{folder / CONFIG}: field 'model_type' is {mt!r}, expected '{MODEL_TYPE}' "
            "(this is not a hybridlm model folder)"
        )
    enc = cfg.get("encoder_config")
    if not isinstance(enc, dict):
        raise CheckpointError(f"{folder / CONFIG}: field 'encoder_config' is missing")
    for key in ("vocab_size", "hidden_size"):
        if not isinstance(enc.get(key), int) or enc[key] <= 0:
            raise CheckpointError(
                f"{folder / CONFIG}: field 'encoder_config.{key}' is {enc.get(key)!r}"
            )
    vocab, hidden = enc["vocab_size"], enc["hidden_size"]

    # weights: a single file, or an index and its shards
    if (folder / WEIGHTS).exists():
        tensors = safetensors_header(folder / WEIGHTS)
        where = {name: folder / WEIGHTS for name in tensors}
    elif (folder / WEIGHTS_INDEX).exists():
        index = _read_json(folder / WEIGHTS_INDEX).get("weight_map") or {}
        tensors, where = {}, {}
        for shard in sorted(set(index.values())):
            header = safetensors_header(folder / shard)
            tensors |= header
            where |= {name: folder / shard for name in header}
    else:
        raise CheckpointError(f"{folder / WEIGHTS}: missing (no weights in {folder})")
    for name, shape in expected_shapes(cfg, folder).items():
        if name not in tensors:
            raise CheckpointError(f"{folder / WEIGHTS}: tensor '{name}' is missing")
        if tensors[name]["shape"] != shape:
            raise CheckpointError(
                f"{where[name]}: tensor '{name}' has shape {tensors[name]['shape']}, but "
                f"{CONFIG} (trunk hidden size {hidden}, vocabulary {vocab}, head "
                f"'{cfg.get('head')}') makes it {shape}: the weights were saved for another "
                "trunk or head; load them with the config.json saved beside them"
            )

    if require_tokenizer:
        found = _tokenizer_max_id(folder)
        if found is None:
            raise CheckpointError(
                f"{folder}: no tokenizer (tokenizer.json or vocab.txt); save it with "
                "tokenizer.save_pretrained(folder)"
            )
        max_id, file = found
        if max_id >= vocab:
            raise CheckpointError(
                f"{folder / file}: the tokenizer has ids up to {max_id}, but the embeddings "
                f"have {vocab} rows ({CONFIG} field 'encoder_config.vocab_size'): the "
                "tokenizer does not belong to this model"
            )

    for name, ref in (cfg.get("auto_map") or {}).items():
        module = ref.split("--")[-1].split(".")[0] + ".py"
        if not (folder / module).is_file():
            raise CheckpointError(
                f"{folder / CONFIG}: field 'auto_map.{name}' names {module}, which is missing"
            )

    if require_card:
        if not (folder / CARD).is_file():
            raise CheckpointError(
                f"{folder / CARD}: missing model card; write it with "
                "hybridlm.hub.write_model_card (train/train.py does)"
            )
        from huggingface_hub import ModelCard

        try:
            card = ModelCard.load(folder / CARD)
        except Exception as e:  # yaml errors, bad metadata
            raise CheckpointError(f"{folder / CARD}: unreadable model card ({e})") from e
        if not card.data.to_dict().get("license"):
            raise CheckpointError(f"{folder / CARD}: metadata field 'license' is missing")
    return cfg


def expected_shapes(cfg: dict, folder: Path) -> dict[str, list[int]]:
    """Every tensor the model of `cfg` (a config.json dict) saves, with its shape: the model
    is built on the meta device, so nothing is allocated."""
    import torch

    from hybridlm.modeling import HybridConfig, HybridForCausalLM

    try:
        config = HybridConfig.from_dict(dict(cfg))
        with torch.device("meta"):
            model = HybridForCausalLM(config)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{folder / CONFIG}: cannot build the model it describes "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    # the trunk's tensors first: a config that lies about the trunk is named by them
    return dict(sorted(shapes.items(), key=lambda kv: not kv[0].startswith("encoder.")))


# ---- save / load ---------------------------------------------------------------------------
def full_state_dict(model) -> dict | None:
    """What `model.save_pretrained(folder, state_dict=...)` must write for a complete folder.

    None (save_pretrained then reads the model's own `state_dict()`) unless some parameter is
    sharded across ranks (FSDP2's `fully_shard` makes parameters DTensors holding a slice
    each; saving those fails or writes slices): then the whole tensors, gathered to CPU on
    rank 0 ({} on the other ranks). A collective in that case: every rank must call it.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model(folder: str | Path, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(folder)` after `check_model_folder`."""
    check_model_folder(folder, require_tokenizer=False)
    from transformers import AutoModelForCausalLM

    import hybridlm.modeling  # noqa: F401  (registers the Auto classes)

    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def save_model(
    model,
    folder: str | Path,
    tokenizer=None,
    *,
    metrics: dict | None = None,
    summary: dict | None = None,
    cfg=None,
    remote_code: bool = False,
) -> Path:
    """Write a complete model folder: weights, config, generation config, tokenizer, a card
    (when `metrics` is given) and, with `remote_code`, the self-contained modeling source."""
    from hybridlm.hub.card import write_model_card
    from hybridlm.hub.remote_code import export_remote_code

    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if metrics is not None:
        write_model_card(folder, metrics, summary, cfg)
    if remote_code:
        export_remote_code(folder)
    return folder

