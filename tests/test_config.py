import dataclasses
import importlib.util
import re
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm import config, continual, energy, heads, kernels, plasticity, spiking, tracking
from hybridlm.config import (
    ConfigError,
    ContinualConfig,
    DataConfig,
    DomainConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    keys_help,
    load_config,
    validate,
)
from hybridlm.kernels import reference

ROOT = Path(__file__).parent.parent
CONFIGS = sorted(ROOT.joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.domains


def test_default_has_four_real_domains():
    cfg = load_config("configs/default.yaml")
    assert len(cfg.data.domains) >= 4
    assert all(d.source.startswith("builtin:") for d in cfg.data.domains)
    assert cfg.model.encoder == "smollm2"  # the real causal LM underneath
    # the trunk alone and every baseline beside the spiking head
    assert set(cfg.train.heads) == {"trunk", "linear", "mlp", "mlp_macs", "spiking_pc"}


def test_overrides_apply_with_types():
    cfg = load_config("configs/default.yaml", ["model.time_steps=3", "train.lr=1e-4",
                                               "output_dir=/tmp/x", "train.heads=[mlp]"])
    assert cfg.model.time_steps == 3 and cfg.train.lr == 1e-4
    assert cfg.output_dir == "/tmp/x" and cfg.train.heads == ["mlp"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.n_neuron=3", "model.n_neuron"),  # unknown key
        ("trian.lr=1", "trian"),  # unknown section
        ("model.time_steps=2.5", "model.time_steps"),  # wrong type
        ("model.time_steps=abc", "model.time_steps"),
        ("model.detach_reset=3", "model.detach_reset"),
        ("model.time_steps=0", "model.time_steps"),  # out of range
        ("model.beta=0", "model.beta"),
        ("model.beta=1.5", "model.beta"),
        ("model.threshold=0", "model.threshold"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1", "train.lr"),
        ("model.head=transformer", "model.head"),
        ("model.surrogate=sigmoid", "model.surrogate"),
        ("data.block_size=1", "data.block_size"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("data.domains=[]", "data.domains"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        load_config("configs/default.yaml", [override])


def test_bad_domain_source_is_named():
    with pytest.raises(ConfigError, match=r"data.domains\[0\].source"):
        load_config(None, ["data.domains=[{name: a, source: nowhere}]"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_override_without_equals():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("configs/default.yaml", ["model.beta"])


def test_checkpoint_config_takes_the_model_section_fields():
    """HybridConfig (saved with every checkpoint) holds every `model` key but `encoder` with
    ModelConfig's types and defaults, and no hyper-parameter of its own: a key declared
    again in HybridConfig with another default, or added there only, fails here."""
    from transformers import PretrainedConfig

    from hybridlm.modeling import MODEL_KEYS, HybridConfig

    model = {f.name: f for f in dataclasses.fields(ModelConfig)}
    hybrid = {f.name: f for f in dataclasses.fields(HybridConfig)}
    assert set(MODEL_KEYS) == set(model) - {"encoder"}
    base = {f.name for f in dataclasses.fields(PretrainedConfig)}
    assert set(hybrid) - base - set(MODEL_KEYS) == {"encoder_config", "trunk_kind",
                                                      "tie_word_embeddings"}
    defaults = HybridConfig()
    for name in MODEL_KEYS:
        assert hybrid[name].type == model[name].type, name
        assert getattr(defaults, name) == model[name].default, name


def _keys(cls, prefix=""):
    """(key, field) of every key of a config dataclass: sections, list items, optionals."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        yield key, f
        if dataclasses.is_dataclass(tp):
            yield from _keys(tp, key + ".")
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                yield from _keys(arg, key + ("[i]." if typing.get_origin(tp) is list else "."))


KEYS = dict(_keys(RunConfig))


def test_help_names_every_key_with_its_meaning():
    text = keys_help()
    flat = " ".join(text.split())
    assert {"data.domains[i].source", "continual.methods[i].ewc_lambda",
            "continual.retention.name", "model.n_neurons", "wandb.mode"} <= set(KEYS)
    for key, f in KEYS.items():
        meaning = f.metadata.get("help", "")
        assert meaning and "\n" not in meaning, f"config key {key} has no one-line help"
        assert re.search(rf"^ *{re.escape(key)}[ :]", text, re.M), f"--help misses {key}"
        assert " ".join(meaning.split()) in flat, key
    for key in ("model.time_steps", "train.lr"):  # type and default beside the key
        f = KEYS[key]
        assert f"{key} ({type(f.default).__name__}, default {f.default}):" in text


OPTIONS = {  # key: the allowed values, from the module that implements the option
    "model.head": heads.HEADS,
    "model.surrogate": reference.SURROGATES,
    "model.kernel_backend": kernels.BACKENDS,
    "model.learning": plasticity.LEARNING_MODES,
    "model.gate": plasticity.GATES,
    "model.dictionary_init": spiking.DICTIONARY_INITS,
    "train.mixed_precision": config.MIXED_PRECISION,
    "wandb.mode": tracking.WANDB_MODES,
    "continual.energy_preset": tuple(energy.PRESETS_PJ),
    "continual.eval_split": config.EVAL_SPLITS,
}


@pytest.mark.parametrize("key", OPTIONS)
def test_options_accept_their_modules_values_and_help_names_them(key):
    values = OPTIONS[key]
    for v in values:
        path = "configs/continual_quick.yaml" if key.startswith("continual.") else \
            "configs/default.yaml"
        section, name = key.split(".")
        # half precision is refused with a spiking head (its kernels are float32 only)
        extra = ["train.heads=[trunk,mlp]"] if key == "train.mixed_precision" else []
        cfg = load_config(path, [f"{key}='{v}'", *extra])
        assert getattr(getattr(cfg, section), name) == v
        assert re.search(rf"\b{v}\b", KEYS[key].metadata["help"]), (key, v)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("configs/default.yaml", [f"{key}=nonsense"])


def test_allowed_values_are_not_repeated():
    assert config.HEADS is heads.HEADS and config.SURROGATES is reference.SURROGATES
    assert config.KERNEL_BACKENDS is kernels.ops.BACKENDS
    assert config.GATES is plasticity.GATES and config.LEARNING_MODES is plasticity.LEARNING_MODES
    assert config.DICTIONARY_INITS is spiking.DICTIONARY_INITS
    assert config.WANDB_MODES is tracking.WANDB_MODES
    assert continual.EVAL_SPLITS is config.EVAL_SPLITS
    assert config.ENERGY_PRESETS == tuple(energy.PRESETS_PJ)


SCRIPTS = ["train/train.py", "eval/continual.py", "eval/compare.py", "eval/evaluate.py",
           "data/build.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_lists_every_config_key(script, capsys):
    spec = importlib.util.spec_from_file_location(f"_help_{script.replace('/', '_')[:-3]}",
                                                  ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entry = getattr(module, "parse_args", None) or module.main  # main() parses first
    with pytest.raises(SystemExit) as e:
        entry(["--help"])
    assert e.value.code == 0
    assert keys_help() in capsys.readouterr().out


def test_each_section_checks_its_own_fields_naming_the_full_key():
    with pytest.raises(ConfigError, match=r"'model\.n_neurons'"):
        ModelConfig(n_neurons=0).check()
    with pytest.raises(ConfigError, match=r"'continual\.methods\[2\]\.ewc_lambda'"):
        MethodConfig(name="x", ewc_lambda=-1.0).check("continual.methods[2]")
    with pytest.raises(ConfigError, match=r"'data\.domains\[1\]\.source'"):
        DataConfig(domains=[DomainConfig("a", "builtin:x"), DomainConfig("b", "x")]).check()
    with pytest.raises(ConfigError, match=r"'continual\.retention\.source'"):
        ContinualConfig(retention=DomainConfig("news", "")).check()
    with pytest.raises(ConfigError, match=r"'train\.mixed_precision'"):
        TrainConfig(mixed_precision="fp8").check()
    ModelConfig().check()
    TrainConfig().check()


def test_replaced_sections_are_validated_with_the_same_errors():
    cfg = load_config("configs/continual_quick.yaml")
    validate(cfg)
    bad = [(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gate="reward")),
            "model.gate"),
           (dataclasses.replace(cfg, continual=dataclasses.replace(
               cfg.continual, tokens_per_stage=8)), "continual.tokens_per_stage"),
           (dataclasses.replace(cfg, continual=dataclasses.replace(
               cfg.continual, order=["nowhere"])), r"continual.order\[0\]"),
           (dataclasses.replace(cfg, continual=dataclasses.replace(
               cfg.continual, retention=cfg.data.domains[0])), "continual.retention.name")]
    for replaced, key in bad:
        with pytest.raises(ConfigError, match=key):
            validate(replaced)


_KEYS = ["model.time_steps", "model.beta", "model.threshold", "model.head", "train.lr",
         "train.heads", "data.block_size", "model.detach_reset", "model.gate_max", "nope.key",
         "model", "output_dir", "data.domains"]
_VALUES = ["0", "1", "-3", "2.5", "1e-4", ".nan", ".inf", "true", "abc", "[]", "[mlp]", "{a: 1}",
           "", "null", "[1, 2]", "'x'"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)), max_size=4))
def test_any_override_either_loads_or_raises_a_config_error(pairs):
    try:
        cfg = load_config("configs/default.yaml", [f"{k}={v}" for k, v in pairs])
    except ConfigError as e:
        assert "config" in str(e) or "override" in str(e)
    else:  # what loads is valid and survives the run folder's config.yaml (what --resume reads)
        with tempfile.TemporaryDirectory() as tmp:
            saved = Path(tmp) / "config.yaml"
            saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            assert load_config(saved).to_dict() == cfg.to_dict()
