from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridlm.config import ConfigError, RunConfig, load_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


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


def test_model_section_mirrors_the_checkpoint_config():
    """ModelConfig (YAML) and HybridConfig (saved with every checkpoint) list the same
    hyper-parameters with the same defaults; `encoder` is where the weights come from."""
    import dataclasses

    from hybridlm.config import ModelConfig
    from hybridlm.modeling import HybridConfig

    hybrid = HybridConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name == "encoder":
            continue
        assert hasattr(hybrid, f.name), f.name
        assert getattr(hybrid, f.name) == f.default, f.name


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
    else:
        assert isinstance(cfg, RunConfig)
