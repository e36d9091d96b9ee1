"""Typed run configuration: dataclasses mirrored 1:1 by the YAML files in `configs/`.

A run config has sections `data`, `model`, `train`, `wandb` and `continual` (read only by
`eval/continual.py`) plus `output_dir` and `seed`. YAML keys and command-line overrides
(`section.key=value`) are checked against the dataclass fields: an unknown key, a wrong type
or an out-of-range value raises `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridlm.heads import HEADS
from hybridlm.plasticity import GATES


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds an out-of-range value."""


@dataclass
class DomainConfig:
    """One text domain. `source` says where its documents come from:

    - `builtin:<name>`: an embedded offline corpus (see `hybridlm.corpora.BUILTIN`);
    - `files:<glob>[,<glob>...]`: local `.txt` files (one document each) or `.json`/`.jsonl`
      files (one document per record, text in `text_field`);
    - `hf:<dataset name>`: a `datasets` Hub dataset (needs the network), with `hf_config`,
      `hf_split` and `text_field`.
    """

    name: str = ""
    source: str = ""
    text_field: str = "text"
    hf_config: str | None = None
    hf_split: str = "train"


@dataclass
class DataConfig:
    domains: list[DomainConfig] = field(default_factory=list)
    block_size: int = 128  # tokens per packed block
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    passage_chars: int = 2000  # documents are cut into passages of about this size before splitting
    max_train_tokens_per_domain: int | None = None  # None: every training token
    max_eval_tokens_per_domain: int | None = None  # None: every validation/test token
    # Which blocks the two limits above keep. Fixed across run seeds, so runs of several seeds
    # differ only in initialisation and order, and share their cached trunk features.
    subsample_seed: int = 0
    cache_dir: str = ".cache/hybridlm"


@dataclass
class ModelConfig:
    # The trunk: "smollm2" (offline SmolLM2-135M-Instruct, a causal LM), "minilm" (offline
    # all-MiniLM-L6-v2, an encoder run causally), a .gguf file, a local folder or a Hub id.
    encoder: str = "smollm2"
    head: str = "spiking_pc"  # one of hybridlm.heads.HEADS
    # The spiking predictive-coding layer (hybridlm/spiking.py): N neurons, T inner steps,
    # energy F(r) = 1/2 ||x_c - D r||^2 + mu/2 ||r||^2 + nu sum r, spikes of size delta.
    n_neurons: int = 512
    time_steps: int = 8
    spike_quantum: float = 1.0  # delta: how much one spike adds to a neuron's code
    l2_cost: float = 0.0  # mu
    rate_cost: float = 0.1  # nu > 0: the cost of a spike; bounds spikes per token
    dictionary_init: str = "data"  # data (atoms = centred trunk states) | random
    surrogate: str = "atan"  # atan | fast_sigmoid
    surrogate_alpha: float = 2.0  # atan's alpha, or fast_sigmoid's slope
    pc_energy_weight: float = 0.0  # weight of the settled energy F(r_T) added to the loss
    # The k-WTA control (head kwta): the share of its hidden units that pass per token, set
    # to the spiking layer's measured code density (neurons with r > 0 after inference).
    kwta_fraction: float = 0.05
    trainable_encoder_layers: int = 0  # top-k trunk layers that train; the rest is frozen
    kernel_backend: str = "auto"  # auto | torch | compiled | cpu_shim | cuda (HYBRIDLM_BACKEND)
    # How the dictionary and mean learn (spiking_pc only; see hybridlm/plasticity.py):
    learning: str = "bptt"  # bptt | hebbian | hybrid
    hebbian_lr: float = 0.01  # eta of the local rule D <- normalise(D + eta g mean(e r^T))
    gate: str = "surprise"  # constant | surprise (batch loss) | energy (each token's F_T)
    gate_min: float = 0.0
    gate_max: float = 2.0
    gate_momentum: float = 0.9  # running means of the loss / energy, for the gates


@dataclass
class TrainConfig:
    # Trained in turn on the same blocks, order and seed ("trunk": scored, nothing trained).
    heads: list[str] = field(default_factory=lambda: ["trunk", "linear", "mlp", "mlp_macs",
                                                      "spiking_pc"])
    epochs: int = 2
    batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    eval_every: int = 0  # optimizer steps between validations; 0: once per epoch
    save_every: int = 0  # optimizer steps between checkpoints; 0: once per epoch
    keep_checkpoints: int = 2
    cache_features: bool = True  # frozen-trunk features computed once, kept on disk, reused
    save_model: bool = True  # write <head>/model (with the whole trunk: ~0.5 GB for SmolLM2)


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled; WANDB_MODE in the environment wins
    project: str = "hybridlm"


@dataclass
class MethodConfig:
    """One continual-learning method (`eval/continual.py`): a head, `model` overrides as
    `key=value` strings applied to the `model` section, and the classic baselines' knobs."""

    name: str = ""
    head: str = "mlp"
    model: list[str] = field(default_factory=list)  # e.g. ["learning=hybrid", "gate=surprise"]
    ewc_lambda: float = 0.0  # EWC penalty weight (Fisher diagonal after each stage); 0: off
    replay_size: int = 0  # reservoir buffer of earlier stages' blocks; 0: no replay
    # DER++ (Buzzega et al. 2020): with replay, also match the logits the model gave each
    # replayed block when it was stored, weight der_alpha (MSE); 0: plain replay.
    der_alpha: float = 0.0
    # The upper bound: one stage on every domain's stage blocks at once, shuffled (the same
    # blocks, tokens and steps as the sequence), scored once at the end.
    joint: bool = False


@dataclass
class ContinualConfig:
    """Train through `order` one domain after another; evaluate every test split after each."""

    order: list[str] = field(default_factory=list)  # domain names; []: data.domains in order
    methods: list[MethodConfig] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    tokens_per_stage: int = 32768  # training tokens per stage, equal for every method
    epochs_per_stage: int = 1
    replay_fraction: float = 0.25  # share of each batch drawn from the replay buffer
    fisher_batches: int = 4  # batches for EWC's Fisher diagonal after each stage
    eval_time_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # T sweep
    energy_preset: str = "fp32"  # fp32 | fp16 | int8 (45 nm E_MAC / E_AC)
    # The split every R row scores: "test" for every reported result; "validation" only in
    # an explicit hyper-parameter tuning run (e.g. the EWC lambda sweep, docs/continual.md).
    eval_split: str = "test"
    # A general text in none of the domains, scored before the first stage and after every
    # stage (its test split): does adapting to the domains break what the trunk knew?
    # null: no retention score.
    retention: DomainConfig | None = None
    # A `make train` run folder: when it holds trained models, the continual results are
    # added to their model cards (and model-index). null: no card is touched.
    card_run: str | None = None


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)




def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def validate(cfg: RunConfig) -> None:
    """Range checks; each failure names the key and the allowed values."""
    d, m, t = cfg.data, cfg.model, cfg.train
    _check(bool(cfg.output_dir), "output_dir", "must not be empty")
    _check(len(d.domains) > 0, "data.domains", "list at least one domain")
    names = [dom.name for dom in d.domains]
    _check(len(set(names)) == len(names), "data.domains", f"domain names repeat: {names}")
    for i, dom in enumerate(d.domains):
        _check(bool(dom.name), f"data.domains[{i}].name", "must not be empty")
        scheme = dom.source.split(":", 1)[0]
        _check(
            scheme in ("builtin", "files", "hf") and ":" in dom.source,
            f"data.domains[{i}].source",
            f"'{dom.source}' must look like builtin:<name>, files:<glob> or hf:<dataset>",
        )
    _check(d.block_size >= 2, "data.block_size", f"must be >= 2, got {d.block_size}")
    for key in ("val_fraction", "test_fraction"):
        v = getattr(d, key)
        _check(0 < v < 0.5, f"data.{key}", f"must be in (0, 0.5), got {v}")
    _check(d.passage_chars >= 100, "data.passage_chars", f"must be >= 100, got {d.passage_chars}")
    for key in ("max_train_tokens_per_domain", "max_eval_tokens_per_domain"):
        v = getattr(d, key)
        _check(v is None or v >= d.block_size, f"data.{key}", f"must be >= block_size, got {v}")
    _check(m.head in HEADS, "model.head", f"'{m.head}' is not one of {HEADS}")
    _check(m.n_neurons >= 1, "model.n_neurons", f"must be >= 1, got {m.n_neurons}")
    _check(m.time_steps >= 1, "model.time_steps", f"must be >= 1, got {m.time_steps}")
    for key, ok, need in (("spike_quantum", m.spike_quantum > 0, "> 0"),
                          ("l2_cost", m.l2_cost >= 0, ">= 0"),
                          ("rate_cost", m.rate_cost > 0, "> 0 (it bounds the spikes per token)")):
        v = getattr(m, key)
        _check(math.isfinite(v) and ok, f"model.{key}", f"must be finite and {need}, got {v}")
    _check(0 < m.kwta_fraction <= 1, "model.kwta_fraction",
           f"must be in (0, 1], got {m.kwta_fraction}")
    _check(m.dictionary_init in ("data", "random"), "model.dictionary_init",
           f"'{m.dictionary_init}' is not data|random")
    _check(m.surrogate in ("atan", "fast_sigmoid"), "model.surrogate",
           f"'{m.surrogate}' is not atan|fast_sigmoid")
    _check(math.isfinite(m.surrogate_alpha) and m.surrogate_alpha > 0, "model.surrogate_alpha",
           "must be finite and > 0")
    _check(math.isfinite(m.pc_energy_weight) and m.pc_energy_weight >= 0,
           "model.pc_energy_weight", "must be finite and >= 0")
    backends = ("auto", "torch", "compiled", "cpu_shim", "cpu_shim_grid", "cuda")
    _check(m.kernel_backend in backends, "model.kernel_backend",
           f"'{m.kernel_backend}' is not one of {backends}")
    _check(m.learning in ("bptt", "hebbian", "hybrid"), "model.learning",
           f"'{m.learning}' is not bptt|hebbian|hybrid")
    _check(math.isfinite(m.hebbian_lr) and m.hebbian_lr >= 0, "model.hebbian_lr",
           f"must be finite and >= 0, got {m.hebbian_lr}")
    _check(m.gate in GATES, "model.gate", f"'{m.gate}' is not one of {GATES}")
    for key in ("gate_min", "gate_max"):
        v = getattr(m, key)
        _check(math.isfinite(v) and v >= 0, f"model.{key}", f"must be finite and >= 0, got {v}")
    _check(m.gate_min <= m.gate_max, "model.gate_min", "must be <= model.gate_max")
    _check(0 <= m.gate_momentum < 1, "model.gate_momentum", "must be in [0, 1)")
    _check(m.trainable_encoder_layers >= 0, "model.trainable_encoder_layers", "must be >= 0")
    _check(len(t.heads) > 0, "train.heads", "list at least one head")
    for h in t.heads:
        _check(h in HEADS, "train.heads", f"'{h}' is not one of {HEADS}")
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be >= 1")
    _check(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _check(0 <= t.warmup_fraction < 1, "train.warmup_fraction", "must be in [0, 1)")
    _check(t.max_grad_norm > 0, "train.max_grad_norm", "must be > 0")
    _check(
        t.mixed_precision in ("no", "bf16", "fp16"),
        "train.mixed_precision",
        f"'{t.mixed_precision}' is not no|bf16|fp16",
    )
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    _check(t.save_every >= 0, "train.save_every", "must be >= 0")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(
        cfg.wandb.mode in ("offline", "online", "disabled"),
        "wandb.mode",
        f"'{cfg.wandb.mode}' is not offline|online|disabled",
    )
    c = cfg.continual
    for i, name in enumerate(c.order):
        _check(name in names, f"continual.order[{i}]",
               f"'{name}' is not a domain of data.domains {names}")
    _check(len(set(c.order)) == len(c.order), "continual.order", f"domains repeat: {c.order}")
    methods = [mt.name for mt in c.methods]
    _check(len(set(methods)) == len(methods), "continual.methods", f"names repeat: {methods}")
    for i, mt in enumerate(c.methods):
        key = f"continual.methods[{i}]"
        _check(bool(mt.name), f"{key}.name", "must not be empty")
        _check(mt.head in HEADS, f"{key}.head", f"'{mt.head}' is not one of {HEADS}")
        for ov in mt.model:
            _check("=" in ov, f"{key}.model", f"'{ov}' must look like key=value")
        _check(math.isfinite(mt.ewc_lambda) and mt.ewc_lambda >= 0, f"{key}.ewc_lambda",
               f"must be finite and >= 0, got {mt.ewc_lambda}")
        _check(mt.replay_size >= 0, f"{key}.replay_size", f"must be >= 0, got {mt.replay_size}")
        _check(math.isfinite(mt.der_alpha) and mt.der_alpha >= 0, f"{key}.der_alpha",
               f"must be finite and >= 0, got {mt.der_alpha}")
        _check(mt.der_alpha == 0 or mt.replay_size > 0, f"{key}.der_alpha",
               "DER++ replays stored logits: set replay_size > 0 too")
        _check(not mt.joint or (mt.replay_size == 0 and mt.ewc_lambda == 0), f"{key}.joint",
               "the joint upper bound sees every domain at once: no replay or EWC")
    if c.retention is not None:
        _check(c.retention.name not in names, "continual.retention.name",
               f"'{c.retention.name}' is a training domain; the retention text must be in none")
        _check(bool(c.retention.source), "continual.retention.source", "must not be empty")
    _check(len(c.seeds) > 0, "continual.seeds", "list at least one seed")
    _check(len(set(c.seeds)) == len(c.seeds), "continual.seeds", f"seeds repeat: {c.seeds}")
    _check(c.tokens_per_stage >= d.block_size, "continual.tokens_per_stage",
           f"must be >= data.block_size ({d.block_size}), got {c.tokens_per_stage}")
    _check(c.epochs_per_stage >= 1, "continual.epochs_per_stage", "must be >= 1")
    _check(0 <= c.replay_fraction < 1, "continual.replay_fraction", "must be in [0, 1)")
    _check(c.fisher_batches >= 1, "continual.fisher_batches", "must be >= 1")
    _check(all(t >= 1 for t in c.eval_time_steps), "continual.eval_time_steps",
           f"every T must be >= 1, got {c.eval_time_steps}")
    _check(c.energy_preset in ("fp32", "fp16", "int8"), "continual.energy_preset",
           f"'{c.energy_preset}' is not fp32|fp16|int8")
    _check(c.eval_split in ("test", "validation"), "continual.eval_split",
           f"'{c.eval_split}' is not test|validation (validation: tuning runs only)")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"expected an integer, got {value!r}")
        return value
    _check(isinstance(value, tp), key, f"expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            allowed = ", ".join(hints)
            raise ConfigError(f"unknown config key '{key}' (known keys here: {allowed})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _set_override(tree: dict[str, Any], dotted: str, raw: str) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, check types and ranges."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping at the top level")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_override(tree, key.strip(), raw)
    cfg = _build(RunConfig, tree)
    validate(cfg)
    return cfg
