"""Model folders that Hugging Face clients accept: check, save, load, export, card, publish.

A model folder holds `config.json` (model_type "hybridlm"), `model.safetensors`,
`generation_config.json`, the tokenizer files and a model card (`README.md`). Importing
`hybridlm` registers the classes with `AutoConfig` / `AutoModelForCausalLM`, so
`AutoModelForCausalLM.from_pretrained(folder)` works without remote code. With
`export_remote_code(folder)` the folder also carries a self-contained `modeling_hybridlm.py`
(plain torch + transformers) and an `auto_map` in `config.json`, so people without hybridlm
installed can load it with `trust_remote_code=True`.

`check_model_folder` is the one validator: publishing and `load_model` call it first, and it
names the file or field that is wrong.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Any

from hybridlm.io import CheckpointError, safetensors_header  # noqa: F401  (re-exported)

MODEL_TYPE = "hybridlm"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CARD = "README.md"
REMOTE_CODE = "modeling_hybridlm.py"
AUTO_MAP = {
    "AutoConfig": "modeling_hybridlm.HybridConfig",
    "AutoModelForCausalLM": "modeling_hybridlm.HybridForCausalLM",
}
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
TAGS = ["hybridlm", "spiking-neural-network", "predictive-coding", "causal-lm", "text-generation"]
UPLOAD_IGNORE = [".*", "**/.*", "checkpoints/*", "__pycache__/*"]


class PublishError(ValueError):
    """Publishing can't start: no token, bad repo id, offline mode, or a bad folder."""


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
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if metrics is not None:
        write_model_card(folder, metrics, summary, cfg)
    if remote_code:
        export_remote_code(folder)
    return folder


# ---- remote code ---------------------------------------------------------------------------
def _is_registration(node: ast.AST) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "register")


def _module_file(name: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ModuleNotFoundError, ValueError):  # a name inside a module, not a module
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _rewrite(name: str, path: Path) -> tuple[str, set[str], set[str]]:
    """Source of module `name` with every `from hybridlm... import` turned into a lookup in
    the bundle and Auto registrations removed; returns (source, modules it needs, the names
    of `hybridlm.kernels` it uses: `kernels.<op>` or `from hybridlm.kernels import <name>`)."""
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text)
    edits: list[tuple[int, int, str]] = []  # (first line, last line, replacement)
    deps: set[str] = set()
    kernels_names: set[str] = set()
    imported: set[str] = set()  # names imported from the kernels namespace itself
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hybridlm"
                                                for a in node.names):
            raise CheckpointError(f"cannot export {path}: use 'from hybridlm... import' "
                                  f"instead of '{ast.unparse(node)}'")
        if not (isinstance(node, ast.ImportFrom) and node.level == 0
                and (node.module or "").split(".")[0] == "hybridlm"):
            continue
        parts = []
        for a in node.names:
            full = f"{node.module}.{a.name}"
            target = full if _module_file(full) or full == "hybridlm.kernels" else node.module
            if target == "hybridlm":
                raise CheckpointError(f"cannot export {path}: '{ast.unparse(node)}' imports "
                                      "from the hybridlm package itself, not a module")
            deps.add(target)
            if target == "hybridlm.kernels":
                kernels_names.add(a.asname or a.name)
                if full != target:
                    imported.add(a.name)
            value = f"_bundle({target!r})" + ("" if target == full else f".{a.name}")
            parts.append(f"{a.asname or a.name} = {value}")
        indent = " " * node.col_offset
        edits.append((node.lineno, node.end_lineno, indent + "; ".join(parts) + "\n"))
    for node in tree.body:
        if _is_registration(node):
            edits.append((node.lineno, node.end_lineno, "pass  # Auto registration: "
                          "the folder's auto_map does it\n"))
    ops = imported | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                      and isinstance(n.value, ast.Name) and n.value.id in kernels_names}
    for first, last, repl in sorted(edits, reverse=True):
        lines[first - 1 : last] = [repl]
    return "".join(lines), deps, ops


def modeling_source() -> str:
    """One self-contained modeling file (plain torch + transformers) for remote code.

    It bundles, verbatim except for their imports, `hybridlm.modeling` and every hybridlm
    module it needs (found by following `from hybridlm... import` statements, including those
    inside functions), each run as a private in-file module. `hybridlm.kernels` (compiled
    CPU/CUDA kernels) is replaced by its plain-torch reference: each `kernels.<op>` the model
    calls becomes `hybridlm.kernels.reference.<op>_reference`, the same function; a constant
    of `hybridlm.kernels` it uses (e.g. `BACKENDS`, which `hybridlm.config` checks against) is
    carried by value. Raises `CheckpointError` when the model uses something this can't carry.
    """
    import hybridlm
    import hybridlm.kernels

    sources: dict[str, str] = {}
    ops: set[str] = set()
    todo = ["hybridlm.modeling"]
    while todo:
        name = todo.pop()
        if name in sources or name == "hybridlm.kernels":
            continue
        path = _module_file(name)
        if path is None:
            raise CheckpointError(f"cannot export: module {name} has no Python source")
        sources[name], deps, used = _rewrite(name, path)
        ops |= used
        todo += sorted(deps)
    constants = {op: getattr(hybridlm.kernels, op) for op in ops
                 if isinstance(getattr(hybridlm.kernels, op, None), (tuple, dict, str, int, float))}
    ops -= set(constants)
    if ops:
        ref = "hybridlm.kernels.reference"
        if ref not in sources:
            sources[ref], _, _ = _rewrite(ref, _module_file(ref))
        ref_names = {n.name for n in ast.parse(sources[ref]).body
                     if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        missing = sorted(op for op in ops if op != "reference"
                         and f"{op}_reference" not in ref_names)
        if missing:
            raise CheckpointError(
                f"cannot export: the model calls kernels.{missing[0]}, which has no plain-torch "
                f"{missing[0]}_reference in hybridlm/kernels/reference.py"
            )
    for name in sources:
        mod = name.split(".")
        if mod[:2] == ["hybridlm", "kernels"] and name != "hybridlm.kernels.reference":
            raise CheckpointError(f"cannot export: {name} is a compiled-kernel module")
    kernel_ops = "".join(
        f"    {op} = _bundle('hybridlm.kernels.{op}')\n" if f"hybridlm.kernels.{op}" in sources
        else f"    {op} = staticmethod(_torch_backend(_bundle('hybridlm.kernels.reference')"
        f".{op}_reference))\n" for op in sorted(ops)
    ) + "".join(f"    {k} = {v!r}\n" for k, v in sorted(constants.items()))
    table = "".join(f"    {k!r}: {v!r},\n" for k, v in sorted(sources.items()))
    return f'''"""hybridlm {hybridlm.__version__}: HybridConfig and HybridForCausalLM as one
self-contained file (plain torch + transformers), for `trust_remote_code=True` where hybridlm
is not installed.

Generated by hybridlm.hub.export_remote_code. `_SOURCES` holds the hybridlm modules the model
needs, verbatim except that `from hybridlm... import x` became `x = _bundle(...).x`; each runs
as a private module. The compiled kernels are replaced by their plain-torch reference.
"""

from __future__ import annotations

import sys
import types

_SOURCES = {{
{table}}}
_MODULES: dict[str, types.ModuleType] = {{}}


def _torch_backend(fn):
    def call(*args, backend=None, method=None, **kwargs):
        return fn(*args, **kwargs)  # the plain-torch backend computes the same function

    return call


def _bundle(name: str):
    """The bundled module `name` (run on first use), or the kernels namespace."""
    if name == "hybridlm.kernels":
        return _Kernels
    if name not in _MODULES:
        module = types.ModuleType(f"{{__name__}}.{{name.replace('.', '_')}}")
        _MODULES[name] = module
        sys.modules[module.__name__] = module
        module._bundle = _bundle
        exec(compile(_SOURCES[name], name.replace(".", "/") + ".py", "exec"), module.__dict__)
    return _MODULES[name]


class _Kernels:
    """The `hybridlm.kernels` ops the model calls, on the plain-torch backend, and the
    constants it reads."""
{kernel_ops}

_modeling = _bundle("hybridlm.modeling")
HybridConfig = _modeling.HybridConfig
HybridForCausalLM = _modeling.HybridForCausalLM
for _cls in (HybridConfig, HybridForCausalLM):
    _cls.__module__ = __name__  # save_pretrained copies this file, not a bundled module
'''


def export_remote_code(folder: str | Path) -> Path:
    """Write `modeling_hybridlm.py` into `folder` and an `auto_map` into its `config.json`, so
    the folder loads with `trust_remote_code=True` where hybridlm is not installed."""
    from hybridlm.io import write_json_atomic, write_text_atomic

    folder = Path(folder)
    cfg = _read_json(folder / CONFIG)
    source = modeling_source()
    compile(source, REMOTE_CODE, "exec")  # a syntax error here, not on the user's machine
    write_text_atomic(folder / REMOTE_CODE, source)
    write_json_atomic(folder / CONFIG, cfg | {"auto_map": AUTO_MAP})
    return folder / REMOTE_CODE


# ---- model card ----------------------------------------------------------------------------
def _cfg_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg)


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def continual_method(config: dict, continual: dict | None) -> str | None:
    """The continual-learning method (of `eval/continual.py`'s card summary) that trained a
    head like this model's: same head and, for the spiking layer, same learning mode and
    gate; None when no method matches."""
    for name, m in ((continual or {}).get("methods") or {}).items():
        same = m["head"] == config.get("head") and not m.get("joint")
        if same and (m["head"] != "spiking_pc" or (m["learning"], m["gate"]) == (
                config.get("learning"), config.get("gate"))):
            return name
    return None


def card_data(config: dict, metrics: dict, cfg: dict, model_name: str,
              continual: dict | None = None):
    """`ModelCardData` with license, base model, datasets, tags and a model-index of the
    measured per-domain perplexities (test and validation) and, when given, the continual
    evaluation's metrics of the method that matches this head."""
    from huggingface_hub import EvalResult, ModelCardData

    base = (config.get("encoder_config") or {}).get("_name_or_path") or None
    if base and not REPO_ID.match(base):
        base = None  # a local folder's name, not a Hub id: the Hub would reject it
    sources = {d.get("name"): d.get("source", "") for d in (cfg.get("data") or {}).get("domains",
                                                                                      [])}
    datasets = sorted({s[3:] for s in sources.values() if s.startswith("hf:")}) or None
    results = []
    for split in ("test", "validation"):
        for domain, r in (metrics.get(split) or {}).items():
            src = sources.get(domain) or domain
            results.append(EvalResult(
                task_type="text-generation", task_name="Causal language modeling",
                dataset_type=src[3:] if src.startswith("hf:") else domain,
                dataset_name=f"{domain} ({src})" if src != domain else domain,
                dataset_split=split, metric_type="perplexity",
                metric_name=f"{split} perplexity", metric_value=round(r["perplexity"], 4),
            ))
            if "bits_per_char" in r:
                results.append(EvalResult(
                    task_type="text-generation", task_name="Causal language modeling",
                    dataset_type=src[3:] if src.startswith("hf:") else domain,
                    dataset_name=f"{domain} ({src})" if src != domain else domain,
                    dataset_split=split, metric_type="bits_per_character",
                    metric_name=f"{split} bits per character",
                    metric_value=round(r["bits_per_char"], 4)))
    method = continual_method(config, continual)
    if method is not None:
        m = continual["methods"][method]
        stream = " -> ".join(continual["order"])
        for key, label in (("forgetting", "Chaudhry forgetting"), ("ACC", "ACC"),
                           ("BWT", "backward transfer"), ("learning_gain", "learning gain"),
                           ("retention_change", "retention change")):
            if (m.get(key) or {}).get("mean") is not None:
                results.append(EvalResult(
                    task_type="text-generation", task_name="Continual language modeling",
                    dataset_type="continual", dataset_name=f"continual: {stream}",
                    dataset_split=continual.get("split", "test"),
                    metric_type=f"continual_{key.lower()}_bits_per_character",
                    metric_name=f"{label} (bits/char, mean over {len(m['seeds'])} seeds)",
                    metric_value=round(m[key]["mean"], 4)))
    head = config.get("head", metrics.get("head", ""))
    return ModelCardData(
        language="en", license="apache-2.0", library_name="transformers",
        pipeline_tag="text-generation", base_model=base, datasets=datasets,
        tags=TAGS + ([f"head-{head}"] if head else []),
        model_name=model_name, eval_results=results or None,
    )


HEADS = {
    "spiking_pc": "a spiking predictive-coding layer ({n} neurons, {t} inner steps of "
                  "spike-coding inference that descends an energy; surrogate-gradient training)",
    "ista": "the non-spiking control of the spiking layer (the same energy minimised by ISTA "
            "for {t} steps, {n} units)",
    "mlp": "a non-spiking MLP head (the parameter-matched baseline of the spiking layer)",
    "mlp_macs": "a non-spiking MLP head (multiply-adds per token matched to the spiking layer)",
    "kwta": "a k-winners-take-all MLP head (the parameter-matched MLP whose hidden layer keeps "
            "only its k largest units per token: sparse, not spiking)",
    "linear": "a linear residual head",
    "trunk": "no head (the trunk alone)",
}


def claim_sentence(heads: dict) -> str:
    """The design's 22% claim, checked on this run's validation perplexities (one seed)."""
    def rel(a: str, b: str) -> float | None:
        va, vb = (heads.get(a) or {}).get("validation"), (heads.get(b) or {}).get("validation")
        if not va or not vb:
            return None
        return sum(va[d]["perplexity"] / vb[d]["perplexity"] - 1 for d in va) / len(va)

    parts = [f"{rel('spiking_pc', ref):+.1%} against {what}"
             for ref, what in (("trunk", "the trunk alone"),
                               ("mlp", "the parameter-matched MLP head"),
                               ("mlp_macs", "the MAC-matched MLP head"))
             if rel("spiking_pc", ref) is not None]
    if not parts:
        return ""
    return ("The claim this design comes from, a 22% lower perplexity when a spiking "
            "predictive-coding layer sits atop a pretrained model: in this run (one seed; "
            "`make compare` gives the spread over seeds) the spiking head's validation "
            "perplexity, mean over domains, changed by " + ", ".join(parts) + ".")


def continual_section(config: dict, continual: dict | None) -> list[str]:
    """The card's continual-learning section: this head's method and fine-tuning, in bits
    per character, and the evaluation's verdict, copied from its card summary."""
    if not continual or not continual.get("methods"):
        return []
    method = continual_method(config, continual)
    lines = ["", "## Continual learning", "",
             f"`eval/continual.py` trained heads on the trunk `{continual.get('trunk')}` "
             f"through {' -> '.join(continual['order'])}, "
             f"{continual.get('tokens_per_stage', 0):,} tokens per stage, and scored every "
             f"domain's {continual.get('split', 'test')} split after each stage (bits per "
             "character, mean ± std over seeds; forgetting positive = forgetting; retention: "
             "a general news text's change, positive = worse).", "",
             "| method | ACC | BWT | forgetting | learning gain | retention change |",
             "|---|---|---|---|---|---|"]

    def cell(m, key):
        v = m.get(key) or {}
        return "-" if v.get("mean") is None else f"{v['mean']:.4f} ± {v['std']:.4f}"

    for name in dict.fromkeys([n for n in (method, "finetune") if n]):
        m = continual["methods"].get(name)
        if m:
            lines.append(f"| {name}{' (this head)' if name == method else ''} | "
                         + " | ".join(cell(m, k) for k in ("ACC", "BWT", "forgetting",
                                                            "learning_gain",
                                                            "retention_change")) + " |")
    if method is None:
        lines += ["", "No method of that evaluation trained a head configured like this one."]
    lines += [""] + list(continual.get("verdict") or [])
    return lines


def card_text(config: dict, metrics: dict, summary: dict | None, cfg: dict,
              model_name: str, repo_id: str | None, remote_code: bool,
              lower_case: bool | None = None, continual: dict | None = None) -> str:
    """The card's Markdown body, built only from the measured metrics and the configs."""
    import yaml

    summary = summary or {}
    head = config.get("head", metrics.get("head", "?"))
    enc = config.get("encoder_config") or {}
    causal = config.get("trunk_kind") == "causal_lm"
    base = enc.get("_name_or_path") or "a pretrained trunk"
    n_top = config.get("trainable_encoder_layers", 0)
    desc = HEADS.get(head, f"a '{head}' head").format(n=config.get("n_neurons"),
                                                      t=config.get("time_steps"))
    where = repo_id or "path/to/model"
    lines = [
        f"# {model_name}", "",
        f"A hybrid transformer + spiking language model built with hybridlm: the pretrained "
        f"trunk `{base}` ({enc.get('num_hidden_layers', '?')} layers, hidden size "
        f"{enc.get('hidden_size', '?')}), "
        + ("frozen" if not n_top else f"frozen except its top {n_top} layer(s)")
        + f", topped with {desc}, whose output corrects the trunk's final hidden state "
        + ("before the trunk's own LM head (the correction starts at zero, so the untrained "
           "model is the trunk's language model)." if causal else
           "before a readout tied to the encoder's word embeddings (the encoder runs with a "
           "causal mask)."),
        "", "All numbers below were measured by `train/train.py` and copied from its "
        "`metrics.json`; nothing is estimated.", "",
        "## Results", "",
    ]
    val, test = metrics.get("validation") or {}, metrics.get("test") or {}
    if val or test:
        spiking = any("firing_rate" in r for r in list(val.values()) + list(test.values()))
        cols = ["domain", "val perplexity", "val accuracy", "test perplexity", "test accuracy",
                "test tokens"] + (["val firing rate", "test firing rate"] if spiking else [])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for d in dict.fromkeys(list(val) + list(test)):
            v, t = val.get(d, {}), test.get(d, {})
            cells = [d, _fmt(v.get("perplexity")), _fmt(v.get("accuracy"), 4),
                     _fmt(t.get("perplexity")), _fmt(t.get("accuracy"), 4), _fmt(t.get("tokens"))]
            if spiking:
                cells += [_fmt(v.get("firing_rate"), 4), _fmt(t.get("firing_rate"), 4)]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No evaluation results were recorded.")
    table = summary.get("results_table")
    if table:
        lines += ["", "Every model of the run on the same blocks, order and seed (validation "
                  "perplexity / bits per character; the `trunk` row is the pretrained trunk "
                  "alone, the n-gram rows are fitted on the same training blocks):", "", table]
    heads = summary.get("heads") or {}
    if head == "spiking_pc" and "spiking_pc" in heads:
        lines += ["", claim_sentence(heads)]
    facts = [("trainable parameters", metrics.get("trainable_parameters")),
             ("head parameters", metrics.get("head_parameters")),
             ("optimizer steps", metrics.get("optimizer_steps")),
             ("skipped (non-finite) steps", metrics.get("skipped_steps")),
             ("training tokens per epoch", metrics.get("train_tokens_per_epoch")),
             ("seconds per epoch", ", ".join(f"{s:.1f}" for s in metrics.get("epoch_seconds")
                                               or []) or None),
             ("training processes", summary.get("processes"))]
    lines += ["", "| training fact | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts if v is not None]

    rates = [(r["step"], r["snn/firing_rate"]) for r in metrics.get("history") or []
             if "snn/firing_rate" in r]
    if head in ("spiking_pc", "ista"):
        lines += ["", "## Firing rates", "",
                  "Mean fraction of neurons spiking per inner time step (0 = silent, 1 = every "
                  "neuron every step), measured on the evaluation sets above."]
        if rates:
            lines += ["", "During training (`snn/firing_rate`, training batches): "
                      + ", ".join(f"step {s}: {r:.4f}" for s, r in rates[:: max(1, len(rates)
                                                                            // 8)]) + "."]
        ops = metrics.get("operations_per_token") or {}
        if ops:
            lines += ["", f"Operations per token (`hybridlm.energy`): {_fmt(ops.get('mac'))} "
                      f"multiply-adds and {_fmt(ops.get('sop'))} synaptic operations at the "
                      f"measured validation rate {_fmt(ops.get('firing_rate'), 4)} "
                      f"({_fmt(ops.get('dense_equivalent_mac'))} multiply-adds if the spike "
                      f"propagation ran densely); estimated {_fmt(ops.get('energy_pj'))} pJ "
                      f"per token at 45 nm, against {_fmt(ops.get('dense_energy_pj'))} dense. "
                      f"{ops.get('caveat', '')}"]
        sweep = metrics.get("time_sweep") or {}
        if sweep:
            lines += ["", "The trained layer evaluated with other numbers of inner steps T "
                      "(validation bits per character, mean over domains; not retrained):", "",
                      "| T | mean bits/char | firing rate | spikes per token |",
                      "|---|---|---|---|"]
            for k, res in sweep.items():
                vals = list(res.values())
                mean = lambda key, vals=vals: sum(v[key] for v in vals) / len(vals)  # noqa: E731
                lines.append(f"| {k} | {mean('bits_per_char'):.4f} | {mean('firing_rate'):.4f} "
                             f"| {mean('spikes_per_token'):.1f} |")

    lines += continual_section(config, continual)
    if cfg:
        lines += ["", "## Training configuration", "", "```yaml",
                  yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```"]
    data = summary.get("data") or {}
    if data:
        lines += ["", "Data (per domain, as built by `hybridlm.data`):", ""]
        keys = sorted({k for s in data.values() for k, v in s.items()
                       if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
        lines += ["| domain | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for d, s in data.items():
            lines.append(f"| {d} | " + " | ".join(_fmt(s.get(k)) for k in keys) + " |")

    lines += [
        "", "## How to use", "", "```python",
        "import hybridlm  # registers the model with the Auto classes",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
        'print(generate("the king said", max_new_tokens=20)[0]["generated_text"])', "```",
    ]
    if remote_code:
        lines += ["", "Without hybridlm installed, the folder's own `modeling_hybridlm.py` "
                  "(plain torch) is used:", "", "```python",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}", '
                  "trust_remote_code=True)", "```"]
    lines += [
        "", "## Intended use", "",
        "Research on hybrid transformer / spiking networks: comparing a spiking "
        "predictive-coding head with matched non-spiking baselines on top of the same frozen "
        "trunk, and studying firing rates and predictive-coding energy. It is not a "
        "general-purpose or production text generator.", "",
        "## Limitations", "",
        (f"- The trunk `{base}` was pretrained on web text that may contain the evaluation "
         "texts (public-domain literature, open-source code and documentation, common "
         "licences); read the trunk's own scores with that in mind." if causal else
         f"- The encoder `{base}` was pretrained bidirectionally for sentence embeddings; it "
         "is run here with a causal mask it was not trained with, so its features are weaker "
         "than a causal LM's."),
        "- The results hold for the domains and the evaluation slices listed above only (see "
        "the token counts); other text may behave differently.",
        "- The vocabulary is the trunk's"
        + (" (lower-cased input)" if lower_case else "")
        + "; generation recomputes the whole prefix at every step (no key/value cache), so it "
        f"is slow, and the context is limited to {enc.get('max_position_embeddings', '?')} "
        "tokens.",
        "- No safety filtering or alignment: generated text may be wrong, offensive or "
        "reproduce training text.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(
    folder: str | Path,
    metrics: dict,
    summary: dict | None = None,
    cfg=None,
    repo_id: str | None = None,
    continual: dict | None = None,
):
    """Write `folder/README.md` from a head's `metrics.json` dict, the run's summary
    (`<output_dir>/metrics.json`), the run config and (optional) the continual evaluation's
    card summary; returns the `ModelCard`."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    config = _read_json(folder / CONFIG)
    cfg_d = _cfg_dict(cfg)
    tok_cfg = folder / "tokenizer_config.json"
    lower = _read_json(tok_cfg).get("do_lower_case") if tok_cfg.is_file() else None
    head = config.get("head", metrics.get("head", "model"))
    name = repo_id.split("/")[-1] if repo_id else f"hybridlm-{head}"
    data = card_data(config, metrics, cfg_d, name, continual)
    body = card_text(config, metrics, summary, cfg_d, name, repo_id,
                     remote_code="auto_map" in config, lower_case=lower, continual=continual)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card.save(folder / CARD)
    return card


def write_card_for_run(run_dir: str | Path, head: str, repo_id: str | None = None,
                       folder: str | Path | None = None):
    """Card for `folder` (default `<run_dir>/<head>/model`) from the files train.py wrote in
    `run_dir`: `<head>/metrics.json`, `metrics.json` and `config.yaml`."""
    import yaml

    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / head / "metrics.json")
    summary = _read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    cfg_file = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else None
    cont = run_dir / CONTINUAL_SUMMARY
    continual = _read_json(cont) if cont.is_file() else None
    return write_model_card(folder or run_dir / head / "model", metrics, summary, cfg, repo_id,
                            continual)


CONTINUAL_SUMMARY = "continual_summary.json"  # in a run folder: eval/continual.py's results


def add_continual_to_cards(run_dir: str | Path, continual: dict) -> list[Path]:
    """Keep the continual evaluation's card summary in `run_dir` and rewrite the card of
    every trained model there with it; returns the folders whose card was rewritten (none
    when `run_dir` holds no model)."""
    from hybridlm.io import write_json_atomic

    run_dir = Path(run_dir)
    folders = sorted(p.parent for p in run_dir.glob(f"*/model/{CONFIG}"))
    if not folders:
        return []
    write_json_atomic(run_dir / CONTINUAL_SUMMARY, continual)
    for folder in folders:
        write_card_for_run(run_dir, folder.parent.name)
    return folders


# ---- publish -------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> str:
    """`user/name` with letters, digits, '-', '_', '.'; raises `PublishError` otherwise."""
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id \
            or "--" in repo_id or repo_id.endswith((".", "-")) or repo_id.endswith(".git"):
        raise PublishError(
            f"malformed Hub repo id {repo_id!r}: expected 'user/name' (letters, digits, "
            "'-', '_', '.'; at most 96 characters each; no '--' or '..')"
        )
    return repo_id


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
):
    """Upload a checked model folder (with its card) to the Hub as ONE commit.

    Creates the repo if needed. The endpoint is `endpoint`, else `HF_ENDPOINT`. Returns the
    `CommitInfo` of the commit. Raises `PublishError` / `CheckpointError` before any upload
    when the repo id, the token or the folder is wrong.
    """
    check_repo_id(repo_id)
    try:
        check_model_folder(folder, require_card=True)
    except CheckpointError as e:
        raise PublishError(f"refusing to publish: {e}") from e
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE=1 is set: publishing needs the network; "
                           "run with HF_HUB_OFFLINE=0")
    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN to a write token, or run `hf auth login` "
            "(nothing was uploaded)"
        )
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model",
        commit_message=commit_message or f"Upload hybridlm model from {Path(folder).name}",
        ignore_patterns=UPLOAD_IGNORE,
    )
