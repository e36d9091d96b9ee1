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

YAML is read bounded (`_ConfigLoader`: no aliases, limited nesting and size, a key given twice
is an error) and error messages print values cut to `SHOW_CHARS` (`_show`): a hostile config
of a few hundred bytes can neither exhaust memory nor flood the terminal.
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
import types
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridlm.energy import PRESETS_PJ
from hybridlm.heads import HEADS
from hybridlm.kernels import BACKENDS as KERNEL_BACKENDS
from hybridlm.kernels.reference import SURROGATES
from hybridlm.plasticity import GATES, LEARNING_MODES
from hybridlm.spiking import DICTIONARY_INITS
from hybridlm.tracking import WANDB_MODES

# Values passed to accelerate's Accelerator(mixed_precision=...) by train/train.py and
# eval/continual.py (accelerate implements them; its fp8 is not offered).
MIXED_PRECISION = ("no", "bf16", "fp16")
# YAML 1.1 reads a bare `no` as false: a string key whose choices include "no" takes false as
# that choice (`train.mixed_precision=no` on a command line, `mixed_precision: no` in a file).
FALSE_MEANS = {"mixed_precision": "no"}
# The splits a continual run may score (hybridlm.continual guards them): validation only in
# an explicit tuning run.
EVAL_SPLITS = ("test", "validation")
ENERGY_PRESETS = tuple(PRESETS_PJ)  # hybridlm.energy: 45 nm (E_MAC, E_AC) per precision

# Upper bounds far beyond any sensible run: an absurd value (a typo, digits too many) is
# refused before anything is written, not found out by exhausting memory mid-run.
MAX_BLOCK_SIZE = 1 << 16  # tokens per block: more positions than any trunk here reads
MAX_BATCH_SIZE = 1 << 14  # blocks per batch
MAX_NEURONS = 1 << 16  # the layer keeps batch x block x n_neurons codes per inner step
MAX_TIME_STEPS = 1 << 10  # backpropagation keeps every inner step
MAX_TOKENS = 1 << 40  # token limits: far more than a corpus held in memory
MAX_PASSAGE_CHARS = 1 << 24
MAX_LAYERS = 1 << 10  # trunk layers (the trunk's own count is checked when it is loaded)
MAX_COUNT = 2**31 - 1  # epochs, steps, checkpoints, batches, replayed blocks
SEED_MAX = 2**32 - 1  # numpy and torch take seeds in 0..2**32-1
# A user string that becomes a file or folder name (a domain's data cache, a method's
# results): no separators, and a first letter or digit, so never "." or "..".
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = "1-64 letters, digits, '_', '.' or '-', the first a letter or digit (it names files)"
SHOW_CHARS = 80  # an error message prints at most about this much of a value


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
        _fail(key, message)


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"config key '{key}': {message}")


def _finite(v: float, ok: bool) -> bool:
    return math.isfinite(v) and ok


# The checks below print the value only when it fails (`_show` of a string parses it).
def _in_range(v: float, low: float, high: float, key: str, why: str = "") -> None:
    """`low <= v <= high` (so a float is also finite); `why`: where the upper bound comes
    from."""
    if not low <= v <= high:
        _fail(key, f"must be in [{low}, {high}]{why}, got {_show(v)}")


def _member(v: str, allowed: tuple[str, ...], key: str, note: str = "") -> None:
    if v not in allowed:
        _fail(key, f"must be {_one_of(allowed)}{note}, got {_show(v)}")


def _unique(values: list, key: str, what: str) -> None:
    repeated = [v for v, n in Counter(values).items() if n > 1]
    if repeated:
        _fail(key, f"{what} repeat: {_show(repeated)}")


def _name(v: str, key: str) -> None:
    if NAME.fullmatch(v) is None:
        _fail(key, f"must be {NAME_RULE}, got {_show(v)}")


def _path(v: str, key: str) -> None:
    if not v.strip() or "\0" in v or len(v) > 4096:
        _fail(key, f"must be a path (not blank, no NUL, at most 4096 characters), got {_show(v)}")


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
    streaming: bool = _field(False, "read the training text as a stream, sharded by rank, never "
                             "cached (hf:, or files: of .jsonl shards; hybridlm/streaming.py)")

    def check(self, key: str) -> None:
        """`key`: where this domain sits in the config, e.g. `data.domains[0]`."""
        _name(self.name, f"{key}.name")  # its data cache folder is named after it
        scheme = self.source.split(":", 1)[0]
        if scheme not in ("builtin", "files", "hf") or ":" not in self.source \
                or "\0" in self.source:
            _fail(f"{key}.source", "must look like builtin:<name>, files:<glob> or hf:<dataset>, "
                  f"got {_show(self.source)}")
        if self.streaming:  # the shards of a stream: a Hub dataset's, or one .jsonl file each
            globs = self.source.partition(":")[2].split(",")
            _check(scheme == "hf" or scheme == "files" and all(
                g.strip().endswith(".jsonl") for g in globs), f"{key}.streaming",
                "streams hf:<dataset> or files:<glob of .jsonl shards>, got "
                f"{_show(self.source)}: use one of those, or streaming: false")


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
        for i, dom in enumerate(self.domains):
            dom.check(f"{key}.domains[{i}]")
        _unique([dom.name for dom in self.domains], f"{key}.domains", "domain names")
        _in_range(self.block_size, 2, MAX_BLOCK_SIZE, f"{key}.block_size")
        for name in ("val_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0 < v < 0.5, f"{key}.{name}", f"must be in (0, 0.5), got {_show(v)}")
        _in_range(self.passage_chars, 100, MAX_PASSAGE_CHARS, f"{key}.passage_chars")
        for name in ("max_train_tokens_per_domain", "max_eval_tokens_per_domain"):
            v = getattr(self, name)
            if v is not None:
                _in_range(v, self.block_size, MAX_TOKENS, f"{key}.{name}",
                          " (at least data.block_size)")
        _in_range(self.subsample_seed, 0, SEED_MAX, f"{key}.subsample_seed")
        _path(self.cache_dir, f"{key}.cache_dir")
        # one training set is either map-style blocks or a stream (hybridlm/streaming.py)
        streamed = [dom.name for dom in self.domains if dom.streaming]
        if streamed and len(streamed) < len(self.domains):
            _fail(f"{key}.domains", f"stream every domain or none: {_show(streamed)} stream, "
                  f"{_show([d.name for d in self.domains if not d.streaming])} do not")
        _check(not streamed or self.max_train_tokens_per_domain is None,
               f"{key}.max_train_tokens_per_domain", "does not apply to streamed domains "
               "(train.max_steps decides how far they are read): set it to null")


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
        _member(self.head, HEADS, f"{key}.head")
        _in_range(self.n_neurons, 1, MAX_NEURONS, f"{key}.n_neurons",
                  " (the layer keeps batch x block x n_neurons codes per step)")
        _in_range(self.time_steps, 1, MAX_TIME_STEPS, f"{key}.time_steps",
                  " (backpropagation keeps every step)")
        for name, ok, need in (("spike_quantum", self.spike_quantum > 0, "> 0"),
                               ("l2_cost", self.l2_cost >= 0, ">= 0"),
                               ("rate_cost", self.rate_cost > 0,
                                "> 0 (it bounds the spikes per token)")):
            v = getattr(self, name)
            _check(_finite(v, ok), f"{key}.{name}", f"must be finite and {need}, got {_show(v)}")
        _check(0 < self.kwta_fraction <= 1, f"{key}.kwta_fraction",
               f"must be in (0, 1], got {_show(self.kwta_fraction)}")
        _member(self.dictionary_init, DICTIONARY_INITS, f"{key}.dictionary_init")
        _member(self.surrogate, SURROGATES, f"{key}.surrogate")
        _check(_finite(self.surrogate_alpha, self.surrogate_alpha > 0),
               f"{key}.surrogate_alpha",
               f"must be finite and > 0, got {_show(self.surrogate_alpha)}")
        _check(_finite(self.pc_energy_weight, self.pc_energy_weight >= 0),
               f"{key}.pc_energy_weight",
               f"must be finite and >= 0, got {_show(self.pc_energy_weight)}")
        _member(self.kernel_backend, KERNEL_BACKENDS, f"{key}.kernel_backend")
        _member(self.learning, LEARNING_MODES, f"{key}.learning")
        _check(_finite(self.hebbian_lr, self.hebbian_lr >= 0), f"{key}.hebbian_lr",
               f"must be finite and >= 0, got {_show(self.hebbian_lr)}")
        _member(self.gate, GATES, f"{key}.gate")
        for name in ("gate_min", "gate_max"):
            v = getattr(self, name)
            _check(_finite(v, v >= 0), f"{key}.{name}", f"must be finite and >= 0, got {_show(v)}")
        _check(self.gate_min <= self.gate_max, f"{key}.gate_min", f"must be <= {key}.gate_max")
        _check(0 <= self.gate_momentum < 1, f"{key}.gate_momentum",
               f"must be in [0, 1), got {_show(self.gate_momentum)}")
        _in_range(self.trainable_encoder_layers, 0, MAX_LAYERS, f"{key}.trainable_encoder_layers")


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
    max_steps: int = _field(0, "optimizer steps of a run whose domains stream (its schedule's "
                            "length; the stream starts again when it ends first); 0: not "
                            "streamed, epochs decide")

    def check(self, key: str = "train") -> None:
        _check(len(self.heads) > 0, f"{key}.heads", "list at least one head")
        for h in self.heads:
            _member(h, HEADS, f"{key}.heads")
        _unique(self.heads, f"{key}.heads", "heads")  # each head writes its own folder
        _in_range(self.epochs, 1, MAX_COUNT, f"{key}.epochs")
        _in_range(self.batch_size, 1, MAX_BATCH_SIZE, f"{key}.batch_size")
        _in_range(self.grad_accum_steps, 1, MAX_COUNT, f"{key}.grad_accum_steps")
        _check(_finite(self.lr, self.lr > 0), f"{key}.lr",
               f"must be finite and > 0, got {_show(self.lr)}")
        _check(_finite(self.weight_decay, self.weight_decay >= 0), f"{key}.weight_decay",
               f"must be finite and >= 0, got {_show(self.weight_decay)}")
        _check(0 <= self.warmup_fraction < 1, f"{key}.warmup_fraction",
               f"must be in [0, 1), got {_show(self.warmup_fraction)}")
        _check(_finite(self.max_grad_norm, self.max_grad_norm > 0), f"{key}.max_grad_norm",
               f"must be finite and > 0, got {_show(self.max_grad_norm)}")
        _member(self.mixed_precision, MIXED_PRECISION, f"{key}.mixed_precision")
        _in_range(self.eval_every, 0, MAX_COUNT, f"{key}.eval_every")
        _in_range(self.save_every, 0, MAX_COUNT, f"{key}.save_every")
        _in_range(self.keep_checkpoints, 1, MAX_COUNT, f"{key}.keep_checkpoints")
        _in_range(self.max_steps, 0, MAX_COUNT, f"{key}.max_steps")


@dataclass
class WandbConfig:
    """Weights & Biases logging (`hybridlm/tracking.py`)."""

    enabled: bool = _field(True, "log to W&B (--no-wandb turns it off for one run)")
    mode: str = _field("offline", f"{' | '.join(WANDB_MODES)}; WANDB_MODE in the environment "
                       "wins")
    project: str = _field("hybridlm", "the W&B project")

    def check(self, key: str = "wandb") -> None:
        _member(self.mode, WANDB_MODES, f"{key}.mode")
        # W&B's own rule, which it would apply only when the first head starts
        if not 0 < len(self.project) <= 128 or set(self.project) & set("/\\#?%:"):
            _fail(f"{key}.project",
                  f"must be 1-128 characters, none of / \\ # ? % :, got {_show(self.project)}")


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
        _name(self.name, f"{key}.name")
        _member(self.head, HEADS, f"{key}.head")
        for ov in self.model:
            if "=" not in ov:
                _fail(f"{key}.model", f"must list key=value items, got {_show(ov)}")
        _check(_finite(self.ewc_lambda, self.ewc_lambda >= 0), f"{key}.ewc_lambda",
               f"must be finite and >= 0, got {_show(self.ewc_lambda)}")
        _in_range(self.replay_size, 0, MAX_COUNT, f"{key}.replay_size")
        _check(_finite(self.der_alpha, self.der_alpha >= 0), f"{key}.der_alpha",
               f"must be finite and >= 0, got {_show(self.der_alpha)}")
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
        _unique(self.order, f"{key}.order", "domains")
        for i, mt in enumerate(self.methods):
            mt.check(f"{key}.methods[{i}]")
        _unique([mt.name for mt in self.methods], f"{key}.methods", "names")
        if self.retention is not None:
            self.retention.check(f"{key}.retention")
        _check(len(self.seeds) > 0, f"{key}.seeds", "list at least one seed")
        for i, seed in enumerate(self.seeds):
            _in_range(seed, 0, SEED_MAX, f"{key}.seeds[{i}]")
        _unique(self.seeds, f"{key}.seeds", "seeds")
        _in_range(self.tokens_per_stage, 1, MAX_TOKENS, f"{key}.tokens_per_stage")
        _in_range(self.epochs_per_stage, 1, MAX_COUNT, f"{key}.epochs_per_stage")
        _check(0 <= self.replay_fraction < 1, f"{key}.replay_fraction",
               f"must be in [0, 1), got {_show(self.replay_fraction)}")
        _in_range(self.fisher_batches, 1, MAX_COUNT, f"{key}.fisher_batches")
        for i, t in enumerate(self.eval_time_steps):
            _in_range(t, 1, MAX_TIME_STEPS, f"{key}.eval_time_steps[{i}]")
        _member(self.energy_preset, ENERGY_PRESETS, f"{key}.energy_preset")
        _member(self.eval_split, EVAL_SPLITS, f"{key}.eval_split",
                " (validation: tuning runs only)")
        if self.card_run is not None:
            _path(self.card_run, f"{key}.card_run")


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
    _path(cfg.output_dir, "output_dir")
    _in_range(cfg.seed, 0, SEED_MAX, "seed")
    for name in SECTIONS:
        getattr(cfg, name).check(name)
    names = [dom.name for dom in cfg.data.domains]
    c = cfg.continual
    for i, name in enumerate(c.order):
        if name not in names:
            _fail(f"continual.order[{i}]",
                  f"must be a name in data.domains {_show(names)}, got {_show(name)}")
    if c.retention is not None:
        if c.retention.name in names:
            _fail("continual.retention.name", f"{_show(c.retention.name)} is a training domain; "
                  "the retention text must be in none")
    _check(c.tokens_per_stage >= cfg.data.block_size, "continual.tokens_per_stage",
           f"must be >= data.block_size ({cfg.data.block_size}), got {c.tokens_per_stage}")
    streamed = any(dom.streaming for dom in cfg.data.domains)
    _check(streamed == (cfg.train.max_steps > 0), "train.max_steps",
           "give the optimizer steps of a streamed run (a stream has no length to count epochs "
           "by)" if streamed else "is for streamed domains only (data.domains[*].streaming); "
           "set it to 0, epochs decide")


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
    """`value` as YAML (and a command-line override) writes it, cut to about SHOW_CHARS
    characters: an error message never prints a whole huge value."""
    if isinstance(value, list):  # at most SHOW_CHARS items are looked at
        text = "[" + ", ".join(_show(v) for v in value[:SHOW_CHARS]) + "]"
    elif isinstance(value, str):
        cut = value[:SHOW_CHARS]
        try:
            plain = cut != "" and _load_yaml(cut) == cut
        except yaml.YAMLError:
            plain = False
        text = cut if plain else repr(cut)  # e.g. 'no', which YAML reads as false
        text += "..." if len(value) > len(cut) else ""
    elif value is None or isinstance(value, bool):
        text = yaml.safe_dump(value).split("\n")[0]  # null, true, false
    elif isinstance(value, int) and value.bit_length() > 128:  # Python refuses to print some
        text = f"an integer of {value.bit_length()} bits"
    else:
        text = repr(value)
    return _cut(text)


def _cut(text: str) -> str:
    return text if len(text) <= SHOW_CHARS else text[:SHOW_CHARS - 3] + "..."


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def keys_help(width: int = 100) -> str:
    """Every config key with its type, default and one-line meaning (the fields' help): the
    `--help` epilog of every script that reads a config with `section.key=value` overrides."""
    lines = ["config keys: YAML sections as below; override any key on the command line as",
             "section.key=value (YAML values, e.g. model.time_steps=4 'train.heads=[mlp, "
             "spiking_pc]').",
             "A default is the value when neither the config file nor an override sets the key.",
             "Give each key once: a key twice, in the file or among the overrides, is an error."]

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
        if not ok:
            _fail(key, f"expected a number, got {_show(value)}")
        try:
            return float(value)
        except OverflowError:  # an int beyond any float
            raise ConfigError(f"config key '{key}': {_show(value)} is too large") from None
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            _fail(key, f"expected an integer, got {_show(value)}")
        return value
    if tp is str and value is False and key.rpartition(".")[2] in FALSE_MEANS:
        return FALSE_MEANS[key.rpartition(".")[2]]
    if not isinstance(value, tp):
        _fail(key, f"expected {tp.__name__}, got {_show(value)}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            allowed = ", ".join(hints)
            raise ConfigError(f"unknown config key {_show(key)} (known keys here: {allowed})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


# ---- reading YAML ------------------------------------------------------------------------
# The shipped configs are a few KiB; pure-Python YAML (which the checks below need) reads
# 64 KiB in about a second.
MAX_CONFIG_BYTES = 64 * 1024
MAX_DEPTH = 16  # the deepest key, continual.methods[i].model[j], is 5 levels down


def _marked(problem: str, mark: yaml.Mark) -> yaml.MarkedYAMLError:
    return yaml.MarkedYAMLError(problem=problem, problem_mark=mark)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: no aliases (a few hundred bytes of nested aliases expand
    to gigabytes wherever the value is copied or printed), at most MAX_DEPTH levels of
    nesting, and a key given twice in one mapping is an error (YAML keeps the later one)."""

    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _marked("aliases (*name) are not allowed in a config: write the value out",
                          self.peek_event().start_mark)
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _marked(f"nested more than {MAX_DEPTH} levels deep",
                              self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in first_line:
                    raise _marked(f"key {_show(key)} is given twice (first on line "
                                  f"{first_line[key]}); give each key once", key_node.start_mark)
                first_line[key] = line
        return super().construct_mapping(node, deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as e:  # PyYAML's constructors raise ValueError, KeyError, IndexError...
            # on a malformed explicit tag (!!int x, !!bool x, !!int with no value)
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            raise _marked(f"cannot read this value as {_cut(tag)}", node.start_mark) from e


def _load_yaml(text: str) -> Any:
    """`text` read by `_ConfigLoader`; every way it can fail is a `yaml.YAMLError`."""
    return yaml.load(text, _ConfigLoader)  # noqa: S506 (a SafeLoader)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """', line N: what is wrong' for a YAML error (its line, when it has one)."""
    if isinstance(e, yaml.reader.ReaderError) and isinstance(e.character, int):
        return f", character {e.position + 1}: #x{e.character:04x} is not allowed in YAML"
    mark = getattr(e, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    text = f"{problem} ({context})" if context else problem
    return f"{where}: {text[:4 * SHOW_CHARS]}"


def _read_config_file(p: Path) -> dict[str, Any]:
    if not p.exists():
        raise ConfigError(f"config file '{p}' does not exist")
    if not p.is_file():
        raise ConfigError(f"config file '{p}' is not a file (a folder?): pass a .yaml file")
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"config file '{p}' cannot be read: {e.strerror or e}") from e
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file '{p}' is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                          "a config is a few KiB: is it the right file?")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.start}): save it as "
                          "UTF-8") from e
    try:
        tree = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}'{_yaml_problem(e)}") from e
    if tree is None:
        raise ConfigError(f"config file '{p}' is empty: give at least one key")
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping (key: value lines) at the top "
                          f"level, not a {type(tree).__name__}")
    return tree


def _set_override(tree: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override (the value read as YAML) to `tree`."""
    dotted, raw = item.split("=", 1)
    node = tree
    parts = dotted.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {_show(item)}: {_show(p)} is not a section")
    node[parts[-1]] = parse_value(raw, f"override {_show(item)}")


def parse_value(raw: str, where: str) -> Any:
    """A command-line value (`key=value`'s value) read as YAML, as bounded as a config file;
    `where` names it in the ConfigError when it is not valid YAML."""
    if raw == "":
        return ""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is longer than {MAX_CONFIG_BYTES // 1024} KiB, like no "
                          "config value: is it the right value?")
    try:
        return _load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not a valid YAML value{_yaml_problem(e)}") from e


def _overrides_once(overrides: list[str]) -> None:
    """Refuse overrides that set one key twice (`a.b=1 a.b=2`, or `a={b: 1} a.b=2`): which
    one should win is a guess, so neither does."""
    seen: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {_show(item)} must look like section.key=value")
        key = item.split("=", 1)[0].strip()
        if key in seen:
            raise ConfigError(f"override {_show(key)} is given twice: give each key once")
        for other in seen:
            if key.startswith(other + ".") or other.startswith(key + "."):
                raise ConfigError(f"overrides {_show(other)} and {_show(key)} both set "
                                  f"{_show(max(key, other, key=len))}: give each key once")
        seen.append(key)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `section.key=value` overrides, check types and ranges.
    Every way a file or an override can be wrong raises `ConfigError` naming the file (and
    line), the override or the key."""
    tree: dict[str, Any] = {} if path is None else _read_config_file(Path(path))
    overrides = overrides or []
    _overrides_once(overrides)
    for item in overrides:
        _set_override(tree, item)
    cfg = _build(RunConfig, tree)
    validate(cfg)
    return cfg
