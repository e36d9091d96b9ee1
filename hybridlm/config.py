"""Typed run configuration: dataclasses mirrored 1:1 by the YAML files in `configs/`.

A run config has sections `data`, `model`, `train`, `wandb` and `continual` (read only by
`eval/continual.py`) plus `output_dir` and `seed`. YAML keys and command-line overrides
(`section.key=value`) are checked against the dataclass fields: an unknown key, a wrong type
or an out-of-range value raises `ConfigError` naming the key.

Every field is declared once, with its one-line meaning (`_field(default, help)`, kept in
the field's `metadata["help"]`); `keys_help()` lists every key with its type, default and
meaning, and is the `--help` epilog of every script that takes `section.key=value`. Each
section checks its own fields (`check(key)`, `key` the section's place in the config, so
errors name the full key); `validate` runs them all, then the checks that need two sections.
The allowed values of an option come from the module that implements it.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridlm.energy import PRESETS_PJ
from hybridlm.heads import HEADS, SPIKING_HEADS
from hybridlm.kernels import BACKENDS as KERNEL_BACKENDS
from hybridlm.kernels.reference import SURROGATES
from hybridlm.plasticity import GATES, LEARNING_MODES
from hybridlm.spiking import DICTIONARY_INITS
from hybridlm.tracking import WANDB_MODES

# Values passed to accelerate's Accelerator(mixed_precision=...) by train/train.py and
# eval/continual.py (accelerate implements them; its fp8 is not offered).
MIXED_PRECISION = ("no", "bf16", "fp16")
# The splits a continual run may score (hybridlm.continual guards them): validation only in
# an explicit tuning run.
EVAL_SPLITS = ("test", "validation")
ENERGY_PRESETS = tuple(PRESETS_PJ)  # hybridlm.energy: 45 nm (E_MAC, E_AC) per precision


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds an out-of-range value."""


def _field(default: Any = MISSING, help: str = "", *,
           factory: Callable[[], Any] | None = None) -> Any:
    """A config field and its one-line meaning (`metadata["help"]`, printed by `keys_help`);
    `factory` instead of `default` for a mutable default."""
    if not help:
        raise TypeError("every config field needs a one-line help")
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _finite(v: float, ok: bool) -> bool:
    return math.isfinite(v) and ok


@dataclass
class DomainConfig:
    """One text domain. `source` says where its documents come from:

    - `builtin:<name>`: an embedded offline corpus (see `hybridlm.corpora.BUILTIN`);
    - `files:<glob>[,<glob>...]`: local `.txt` files (one document each) or `.json`/`.jsonl`
      files (one document per record, text in `text_field`);
    - `hf:<dataset name>`: a `datasets` Hub dataset (needs the network), with `hf_config`,
      `hf_split` and `text_field`.
    """

    name: str = _field("", "the domain's name (results and continual.order use it)")
    source: str = _field("", "where its documents come from: builtin:<name> (an embedded "
                         "corpus), files:<glob>[,<glob>...] (local .txt/.json/.jsonl files) or "
                         "hf:<dataset name> (a datasets Hub dataset)")
    text_field: str = _field("text", "the text's field in .json/.jsonl records and hf: "
                             "datasets")
    hf_config: str | None = _field(None, "hf: the dataset's config name (null: its default)")
    hf_split: str = _field("train", "hf: the dataset split to read")

    def check(self, key: str) -> None:
        """`key`: where this domain sits in the config, e.g. `data.domains[0]`."""
        _check(bool(self.name), f"{key}.name", "must not be empty")
        scheme = self.source.split(":", 1)[0]
        _check(
            scheme in ("builtin", "files", "hf") and ":" in self.source,
            f"{key}.source",
            f"'{self.source}' must look like builtin:<name>, files:<glob> or hf:<dataset>",
        )


@dataclass
class DataConfig:
    """The text domains and how each becomes packed train/validation/test blocks
    (`hybridlm/data.py`)."""

    domains: list[DomainConfig] = _field(factory=list, help="the text domains, each a "
                                         "mapping with the keys below")
    block_size: int = _field(128, "tokens per packed block")
    val_fraction: float = _field(0.05, "share of each domain's passages in its validation "
                                 "split")
    test_fraction: float = _field(0.05, "share of each domain's passages in its test split")
    passage_chars: int = _field(2000, "documents are cut into passages of about this size "
                                "before splitting")
    max_train_tokens_per_domain: int | None = _field(
        None, "training tokens kept per domain (a subsample of its blocks); null: every "
        "training token")
    max_eval_tokens_per_domain: int | None = _field(
        None, "validation/test tokens kept per domain and split; null: every validation/test "
        "token")
    # Fixed across run seeds, so runs of several seeds differ only in initialisation and
    # order, and share their cached trunk features.
    subsample_seed: int = _field(0, "which blocks the two limits above keep (fixed across run "
                                 "seeds, so their trunk features are shared)")
    cache_dir: str = _field(".cache/hybridlm", "cache folder: built corpora, trunk features "
                            "and converted trunks")

    def check(self, key: str = "data") -> None:
        _check(len(self.domains) > 0, f"{key}.domains", "list at least one domain")
        names = [dom.name for dom in self.domains]
        _check(len(set(names)) == len(names), f"{key}.domains", f"domain names repeat: {names}")
        for i, dom in enumerate(self.domains):
            dom.check(f"{key}.domains[{i}]")
        _check(self.block_size >= 2, f"{key}.block_size", f"must be >= 2, got {self.block_size}")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0 < v < 0.5, f"{key}.{name}", f"must be in (0, 0.5), got {v}")
        _check(self.passage_chars >= 100, f"{key}.passage_chars",
               f"must be >= 100, got {self.passage_chars}")
        for name in ("max_train_tokens_per_domain", "max_eval_tokens_per_domain"):
            v = getattr(self, name)
            _check(v is None or v >= self.block_size, f"{key}.{name}",
                   f"must be >= block_size, got {v}")


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + f" or {values[-1]}"


@dataclass
class ModelConfig:
    """The trunk and its head. Saved with every model: `hybridlm.modeling.HybridConfig` takes
    every field but `encoder` (types, defaults) from here."""

    encoder: str = _field("smollm2", "the trunk: smollm2 (offline SmolLM2-135M-Instruct, a "
                          "causal LM), minilm (offline all-MiniLM-L6-v2, an encoder run "
                          "causally), a .gguf file, a local folder or a Hub id")
    head: str = _field("spiking_pc", f"the head on the trunk: {_one_of(HEADS)} "
                       "(hybridlm/heads.py)")
    # The spiking predictive-coding layer (hybridlm/spiking.py): N neurons, T inner steps,
    # energy F(r) = 1/2 ||x_c - D r||^2 + mu/2 ||r||^2 + nu sum r, spikes of size delta.
    n_neurons: int = _field(512, "N: the spiking PC layer's neurons (the mlp heads are sized "
                            "to match that layer)")
    time_steps: int = _field(8, "T: the spiking layer's inner inference steps")
    spike_quantum: float = _field(1.0, "delta: how much one spike adds to a neuron's code")
    l2_cost: float = _field(0.0, "mu: weight of mu/2 ||r||^2 in the layer's energy F(r)")
    rate_cost: float = _field(0.1, "nu > 0: the cost of a spike; bounds spikes per token")
    dictionary_init: str = _field("data", "how the dictionary starts: data (atoms = centred "
                                  "trunk states) | random")
    surrogate: str = _field("atan", f"the spike's surrogate gradient: {_one_of(SURROGATES)}")
    surrogate_alpha: float = _field(2.0, "atan's alpha, or fast_sigmoid's slope")
    pc_energy_weight: float = _field(0.0, "weight of the settled energy F(r_T) added to the "
                                     "loss")
    # The k-WTA control (head kwta): the share of its hidden units that pass per token, set
    # to the spiking layer's measured code density (neurons with r > 0 after inference).
    kwta_fraction: float = _field(0.05, "head kwta: the share of its hidden units that pass "
                                  "per token (set to the spiking layer's code density)")
    trainable_encoder_layers: int = _field(0, "top-k trunk layers that train; the rest is "
                                           "frozen")
    kernel_backend: str = _field("auto", f"the spiking kernels' backend: "
                                 f"{_one_of(KERNEL_BACKENDS)} (auto: $HYBRIDLM_BACKEND, else "
                                 "chosen per device)")
    # How the dictionary and mean learn (spiking_pc only; see hybridlm/plasticity.py):
    learning: str = _field("bptt", "how the spiking layer's dictionary learns: bptt (next-"
                           "token loss), hebbian (local rule only) or hybrid (both)")
    hebbian_lr: float = _field(0.01, "eta of the local rule D <- normalise(D + eta g "
                               "mean(e r^T))")
    gate: str = _field("surprise", "the local rule's gate g: constant | surprise (batch "
                       "loss) | energy (each token's F_T)")
    gate_min: float = _field(0.0, "lower bound of the gate g")
    gate_max: float = _field(2.0, "upper bound of the gate g (the constant gate's value)")
    gate_momentum: float = _field(0.9, "momentum of the running means of the loss / energy, "
                                  "for the gates")

    def check(self, key: str = "model") -> None:
        _check(self.head in HEADS, f"{key}.head", f"'{self.head}' is not one of {HEADS}")
        _check(self.n_neurons >= 1, f"{key}.n_neurons", f"must be >= 1, got {self.n_neurons}")
        _check(self.time_steps >= 1, f"{key}.time_steps",
               f"must be >= 1, got {self.time_steps}")
        for name, ok, need in (("spike_quantum", self.spike_quantum > 0, "> 0"),
                               ("l2_cost", self.l2_cost >= 0, ">= 0"),
                               ("rate_cost", self.rate_cost > 0,
                                "> 0 (it bounds the spikes per token)")):
            v = getattr(self, name)
            _check(_finite(v, ok), f"{key}.{name}", f"must be finite and {need}, got {v}")
        _check(0 < self.kwta_fraction <= 1, f"{key}.kwta_fraction",
               f"must be in (0, 1], got {self.kwta_fraction}")
        _check(self.dictionary_init in DICTIONARY_INITS, f"{key}.dictionary_init",
               f"'{self.dictionary_init}' is not {'|'.join(DICTIONARY_INITS)}")
        _check(self.surrogate in SURROGATES, f"{key}.surrogate",
               f"'{self.surrogate}' is not {'|'.join(SURROGATES)}")
        _check(_finite(self.surrogate_alpha, self.surrogate_alpha > 0),
               f"{key}.surrogate_alpha", "must be finite and > 0")
        _check(_finite(self.pc_energy_weight, self.pc_energy_weight >= 0),
               f"{key}.pc_energy_weight", "must be finite and >= 0")
        _check(self.kernel_backend in KERNEL_BACKENDS, f"{key}.kernel_backend",
               f"'{self.kernel_backend}' is not one of {KERNEL_BACKENDS}")
        _check(self.learning in LEARNING_MODES, f"{key}.learning",
               f"'{self.learning}' is not {'|'.join(LEARNING_MODES)}")
        _check(_finite(self.hebbian_lr, self.hebbian_lr >= 0), f"{key}.hebbian_lr",
               f"must be finite and >= 0, got {self.hebbian_lr}")
        _check(self.gate in GATES, f"{key}.gate", f"'{self.gate}' is not one of {GATES}")
        for name in ("gate_min", "gate_max"):
            v = getattr(self, name)
            _check(_finite(v, v >= 0), f"{key}.{name}", f"must be finite and >= 0, got {v}")
        _check(self.gate_min <= self.gate_max, f"{key}.gate_min", f"must be <= {key}.gate_max")
        _check(0 <= self.gate_momentum < 1, f"{key}.gate_momentum", "must be in [0, 1)")
        _check(self.trainable_encoder_layers >= 0, f"{key}.trainable_encoder_layers",
               "must be >= 0")


@dataclass
class TrainConfig:
    """How `train/train.py` trains each head (AdamW, linear warmup then cosine decay)."""

    heads: list[str] = _field(
        factory=lambda: ["trunk", "linear", "mlp", "mlp_macs", "spiking_pc"],
        help="heads trained in turn on the same blocks, order and seed (trunk: scored, "
        "nothing trained)")
    epochs: int = _field(2, "passes over the training blocks, per head")
    batch_size: int = _field(16, "blocks per batch and process (evaluation too)")
    grad_accum_steps: int = _field(1, "batches per optimizer step")
    lr: float = _field(2e-3, "AdamW's peak learning rate")
    weight_decay: float = _field(0.01, "AdamW weight decay of the parameters with >= 2 "
                                 "dimensions (none for biases and norms)")
    warmup_fraction: float = _field(0.05, "share of the optimizer steps with a linear "
                                    "learning-rate warmup")
    max_grad_norm: float = _field(1.0, "gradients are clipped to this norm")
    mixed_precision: str = _field("no", f"accelerate's mixed precision: "
                                  f"{' | '.join(MIXED_PRECISION)}")
    eval_every: int = _field(0, "optimizer steps between validations; 0: once per epoch")
    save_every: int = _field(0, "optimizer steps between checkpoints; 0: once per epoch")
    keep_checkpoints: int = _field(2, "checkpoints kept per head (older ones are deleted)")
    cache_features: bool = _field(True, "frozen-trunk features computed once, kept on disk, "
                                  "reused")
    save_model: bool = _field(True, "write <head>/model (with the whole trunk: ~0.5 GB for "
                              "SmolLM2)")

    def check(self, key: str = "train") -> None:
        _check(len(self.heads) > 0, f"{key}.heads", "list at least one head")
        for h in self.heads:
            _check(h in HEADS, f"{key}.heads", f"'{h}' is not one of {HEADS}")
        _check(self.epochs >= 1, f"{key}.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.grad_accum_steps >= 1, f"{key}.grad_accum_steps", "must be >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_fraction < 1, f"{key}.warmup_fraction", "must be in [0, 1)")
        _check(self.max_grad_norm > 0, f"{key}.max_grad_norm", "must be > 0")
        _check(self.mixed_precision in MIXED_PRECISION, f"{key}.mixed_precision",
               f"'{self.mixed_precision}' is not {'|'.join(MIXED_PRECISION)}")
        _check(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0")
        _check(self.save_every >= 0, f"{key}.save_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be >= 1")


@dataclass
class WandbConfig:
    """Weights & Biases logging (`hybridlm/tracking.py`)."""

    enabled: bool = _field(True, "log to W&B (--no-wandb turns it off for one run)")
    mode: str = _field("offline", f"{' | '.join(WANDB_MODES)}; WANDB_MODE in the environment "
                       "wins")
    project: str = _field("hybridlm", "the W&B project")

    def check(self, key: str = "wandb") -> None:
        _check(self.mode in WANDB_MODES, f"{key}.mode",
               f"'{self.mode}' is not {'|'.join(WANDB_MODES)}")


@dataclass
class MethodConfig:
    """One continual-learning method (`eval/continual.py`): a head, `model` overrides as
    `key=value` strings applied to the `model` section, and the classic baselines' knobs."""

    name: str = _field("", "the method's name (results; --methods)")
    head: str = _field("mlp", "its head (one of the model.head values)")
    model: list[str] = _field(factory=list, help="model-section overrides as key=value, "
                              "e.g. [learning=hybrid, gate=surprise]")
    ewc_lambda: float = _field(0.0, "EWC penalty weight (Fisher diagonal after each stage); "
                               "0: off")
    replay_size: int = _field(0, "reservoir buffer of earlier stages' blocks; 0: no replay")
    # DER++ (Buzzega et al. 2020): with replay, also match the logits the model gave each
    # replayed block when it was stored, weight der_alpha (MSE); 0: plain replay.
    der_alpha: float = _field(0.0, "DER++: weight of the MSE to the logits stored with each "
                              "replayed block; 0: plain replay")
    # The upper bound: one stage on every domain's stage blocks at once, shuffled (the same
    # blocks, tokens and steps as the sequence), scored once at the end.
    joint: bool = _field(False, "the upper bound: one stage on every domain's stage blocks at "
                         "once, scored once at the end")

    def check(self, key: str) -> None:
        """`key`: where this method sits, e.g. `continual.methods[2]`."""
        _check(bool(self.name), f"{key}.name", "must not be empty")
        _check(self.head in HEADS, f"{key}.head", f"'{self.head}' is not one of {HEADS}")
        for ov in self.model:
            _check("=" in ov, f"{key}.model", f"'{ov}' must look like key=value")
        _check(_finite(self.ewc_lambda, self.ewc_lambda >= 0), f"{key}.ewc_lambda",
               f"must be finite and >= 0, got {self.ewc_lambda}")
        _check(self.replay_size >= 0, f"{key}.replay_size",
               f"must be >= 0, got {self.replay_size}")
        _check(_finite(self.der_alpha, self.der_alpha >= 0), f"{key}.der_alpha",
               f"must be finite and >= 0, got {self.der_alpha}")
        _check(self.der_alpha == 0 or self.replay_size > 0, f"{key}.der_alpha",
               "DER++ replays stored logits: set replay_size > 0 too")
        _check(not self.joint or (self.replay_size == 0 and self.ewc_lambda == 0),
               f"{key}.joint", "the joint upper bound sees every domain at once: no replay or EWC")


@dataclass
class ContinualConfig:
    """Train through `order` one domain after another; evaluate every test split after each."""

    order: list[str] = _field(factory=list, help="domain names; []: data.domains in order")
    methods: list[MethodConfig] = _field(factory=list, help="the methods compared, each a "
                                         "mapping with the keys below")
    seeds: list[int] = _field(factory=lambda: [0, 1, 2], help="every method runs the whole "
                              "sequence once per seed")
    tokens_per_stage: int = _field(32768, "training tokens per stage, equal for every method")
    epochs_per_stage: int = _field(1, "passes over each stage's blocks")
    replay_fraction: float = _field(0.25, "share of each batch drawn from the replay buffer")
    fisher_batches: int = _field(4, "batches for EWC's Fisher diagonal after each stage")
    eval_time_steps: list[int] = _field(factory=lambda: [1, 2, 4, 8], help="T sweep: the "
                                        "energy-based heads scored again with these T")
    energy_preset: str = _field("fp32", f"{' | '.join(ENERGY_PRESETS)} (45 nm E_MAC / E_AC)")
    # The split every R row scores: "test" for every reported result; "validation" only in
    # an explicit hyper-parameter tuning run (e.g. the EWC lambda sweep, docs/continual.md).
    eval_split: str = _field("test", "the split every row scores: test; validation only in an "
                             "explicit tuning run")
    # A general text in none of the domains, scored before the first stage and after every
    # stage (its test split): does adapting to the domains break what the trunk knew?
    retention: DomainConfig | None = _field(None, "a general text in none of the domains "
                                            "(keys as a domain's), scored before and after "
                                            "every stage; null: no retention score")
    # A `make train` run folder: when it holds trained models, the continual results are
    # added to their model cards (and model-index).
    card_run: str | None = _field(None, "a make train run folder whose models' cards get the "
                                  "continual results; null: no card is touched")

    def check(self, key: str = "continual") -> None:
        """The checks that need only this section (`validate` checks `order`, `retention`
        and `tokens_per_stage` against `data`)."""
        _check(len(set(self.order)) == len(self.order), f"{key}.order",
               f"domains repeat: {self.order}")
        names = [mt.name for mt in self.methods]
        _check(len(set(names)) == len(names), f"{key}.methods", f"names repeat: {names}")
        for i, mt in enumerate(self.methods):
            mt.check(f"{key}.methods[{i}]")
        if self.retention is not None:
            self.retention.check(f"{key}.retention")
        _check(len(self.seeds) > 0, f"{key}.seeds", "list at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), f"{key}.seeds",
               f"seeds repeat: {self.seeds}")
        _check(self.epochs_per_stage >= 1, f"{key}.epochs_per_stage", "must be >= 1")
        _check(0 <= self.replay_fraction < 1, f"{key}.replay_fraction", "must be in [0, 1)")
        _check(self.fisher_batches >= 1, f"{key}.fisher_batches", "must be >= 1")
        _check(all(t >= 1 for t in self.eval_time_steps), f"{key}.eval_time_steps",
               f"every T must be >= 1, got {self.eval_time_steps}")
        _check(self.energy_preset in ENERGY_PRESETS, f"{key}.energy_preset",
               f"'{self.energy_preset}' is not {'|'.join(ENERGY_PRESETS)}")
        _check(self.eval_split in EVAL_SPLITS, f"{key}.eval_split",
               f"'{self.eval_split}' is not {'|'.join(EVAL_SPLITS)} (validation: tuning runs "
               "only)")


@dataclass
class RunConfig:
    """One run: where it writes, its seed, and the sections below."""

    output_dir: str = _field("runs/default", "the run's folder: everything it writes")
    seed: int = _field(0, "the run's seed (initialisation and data order)")
    data: DataConfig = _field(factory=DataConfig, help="the domains and their blocks")
    model: ModelConfig = _field(factory=ModelConfig, help="the trunk and its head")
    train: TrainConfig = _field(factory=TrainConfig, help="how each head is trained")
    wandb: WandbConfig = _field(factory=WandbConfig, help="Weights & Biases logging")
    continual: ContinualConfig = _field(factory=ContinualConfig, help="continual learning "
                                        "(eval/continual.py only)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# data, model, train, wandb, continual: the fields of RunConfig that are sections
SECTIONS = tuple(k for k, tp in typing.get_type_hints(RunConfig).items()
                 if dataclasses.is_dataclass(tp))


def validate(cfg: RunConfig) -> None:
    """Range checks; each failure names the key and the allowed values. Every section checks
    its own fields; the checks below need two sections."""
    _check(bool(cfg.output_dir), "output_dir", "must not be empty")
    for name in SECTIONS:
        getattr(cfg, name).check(name)
    names = [dom.name for dom in cfg.data.domains]
    c = cfg.continual
    for i, name in enumerate(c.order):
        _check(name in names, f"continual.order[{i}]",
               f"'{name}' is not a domain of data.domains {names}")
    if c.retention is not None:
        _check(c.retention.name not in names, "continual.retention.name",
               f"'{c.retention.name}' is a training domain; the retention text must be in none")
    _check(c.tokens_per_stage >= cfg.data.block_size, "continual.tokens_per_stage",
           f"must be >= data.block_size ({cfg.data.block_size}), got {c.tokens_per_stage}")
    # the energy-based layers' kernels take float32/float64 only: refuse before any work
    spiking = [h for h in cfg.train.heads + [m.head for m in c.methods] if h in SPIKING_HEADS]
    _check(cfg.train.mixed_precision == "no" or not spiking, "train.mixed_precision",
           f"'{cfg.train.mixed_precision}' is not supported by the {spiking[0] if spiking else ''}"
           " head yet (its kernels run in float32); use 'no', or only non-spiking heads")


# ---- help --------------------------------------------------------------------------------
def _item_class(tp: Any) -> type | None:
    """The dataclass a field holds (list[X], X | None): its keys are listed under the field."""
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return "mapping" if dataclasses.is_dataclass(tp) else tp.__name__


def _show(value: Any) -> str:
    """`value` as YAML (and a command-line override) writes it."""
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, str):
        try:
            plain = value != "" and yaml.safe_load(value) == value
        except yaml.YAMLError:
            plain = False
        return value if plain else repr(value)  # e.g. 'no', which YAML reads as false
    if value is None or isinstance(value, bool):
        return yaml.safe_dump(value).split("\n")[0]  # null, true, false
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def keys_help(width: int = 100) -> str:
    """Every config key with its type, default and one-line meaning (the fields' help): the
    `--help` epilog of every script that reads a config with `section.key=value` overrides."""
    lines = ["config keys: YAML sections as below; override any key on the command line as",
             "section.key=value (YAML values, e.g. model.time_steps=4 'train.heads=[mlp, "
             "spiking_pc]').",
             "A default is the value when neither the config file nor an override sets the key."]

    def add(cls: type, prefix: str, indent: int) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp, meaning = prefix + f.name, hints[f.name], f.metadata["help"]
            if dataclasses.is_dataclass(tp):  # a section
                lines.extend(["", f"{key}: {meaning}"])
                add(tp, f"{key}.", indent)
                continue
            text = f"{key} ({_type_name(tp)}, default {_show(_default(f))}): {meaning}"
            lines.extend(textwrap.wrap(text, width, initial_indent=" " * indent,
                                       subsequent_indent=" " * (indent + 4),
                                       break_on_hyphens=False))
            item = _item_class(tp)
            if item is not None:  # list[X]: each item's keys; X | None: X's keys
                sub = f"{key}[i]." if typing.get_origin(tp) is list else f"{key}."
                add(item, sub, indent + 2)

    lines.append("")
    add(RunConfig, "", 2)
    return "\n".join(lines)


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
