import contextlib
import dataclasses
import importlib.util
import io
import json
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
    SECTIONS,
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


def test_bare_no_is_mixed_precision_no(tmp_path):
    # YAML 1.1 reads a bare `no` as false; for train.mixed_precision it means "no". Other
    # booleans stay errors naming the key.
    assert load_config("configs/quick.yaml",
                       ["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text(Path("configs/quick.yaml").read_text().replace(
        "train:\n", "train:\n  mixed_precision: no\n"))
    assert load_config(f).train.mixed_precision == "no"
    for bad in ("train.mixed_precision=yes", "wandb.mode=no"):
        with pytest.raises(ConfigError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config("configs/quick.yaml", [bad])


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
        cfg = load_config(path, [f"{key}='{v}'"])
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


# ---- hostile configs: bounded YAML, names used as paths, ranges before any write -----------
MESSAGE_CHARS = 400  # an error message prints bounded values: never longer than this


def _config_error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    message = str(e.value)
    assert len(message) <= MESSAGE_CHARS, message[:MESSAGE_CHARS]
    return message


def test_yaml_aliases_and_deep_nesting_cannot_blow_up_a_config(tmp_path):
    """A few hundred bytes of nested aliases expand to 9**5 items wherever the value is copied
    or printed (the real bomb, 9**9, exhausts memory); deep nesting overflows the stack."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n"
        for a, b in zip("abcd", "bcde", strict=True)) + "model: {time_steps: *e}\n")
    assert "line 2" in _config_error(bomb) and "alias" in _config_error(bomb)
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: {time_steps: " + "[" * 5000 + "]" * 5000 + "}\n")
    assert "deep.yaml', line 1" in _config_error(deep)
    assert "alias" in _config_error(None, ["model.time_steps=*a"])


def test_duplicate_keys_and_sections_are_errors_naming_key_and_line(tmp_path):
    text = CONFIGS[0].read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "model:\n  time_steps: 3\n")
    line = len(text.splitlines()) + 1
    assert re.search(rf"line {line}\b.*key model is given twice", _config_error(twice))
    key_twice = tmp_path / "key_twice.yaml"
    key_twice.write_text("seed: 1\nmodel:\n  time_steps: 3\n  n_neurons: 8\n  time_steps: 4\n")
    assert re.search(r"line 5\b.*time_steps is given twice \(first on line 3\)",
                     _config_error(key_twice))
    # on the command line which one should win is a guess too
    message = _config_error("configs/quick.yaml", ["model.time_steps=3", "model.time_steps=4"])
    assert "override model.time_steps is given twice" in message
    message = _config_error("configs/quick.yaml", ["model={time_steps: 3}", "model.time_steps=4"])
    assert "both set model.time_steps" in message


@pytest.mark.parametrize("content, expected", [
    ("model:\n  time_steps: [3\n", r"bad.yaml', line 3, column 1: expected ',' or ']'"),
    ("model: {time_steps: 3}\n  head: mlp\n", r"bad.yaml', line 2"),
    ("", r"bad.yaml' is empty"),
    ("# nothing but a comment\n", r"bad.yaml' is empty"),
    ("- model\n- train\n", r"bad.yaml' must hold a mapping .* not a list"),
    ("model: {time_steps: !!int x}\n", r"bad.yaml', line 1, column 21: cannot read .* !!int"),
    ("seed: " + "9" * 5000 + "\n", r"bad.yaml', line 1"),  # Python refuses to read it
    ("seed: !!python/object/apply:os.getcwd []\n", r"bad.yaml', line 1"),
    ("seed: 1\x00\n", r"bad.yaml', character 8"),
    ("a: b: c\n", r"bad.yaml', line 1"),
    ("a: 1\n---\nb: 2\n", r"bad.yaml', line 2"),
    (b"model: {head: '\xe9'}\n", r"bad.yaml' is not UTF-8 text \(byte 15\)"),
    ("seed: 1\n" + "#" * 64 * 1024, r"bad.yaml' is larger than 64 KiB"),
], ids=["unclosed", "indent", "empty", "comment", "list", "tag", "digits", "python",
        "nul", "colon", "documents", "latin1", "huge"])
def test_unreadable_config_files_name_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert re.search(expected, _config_error(path))


def test_a_config_path_that_is_a_folder_is_named(tmp_path):
    assert "is not a file" in _config_error(tmp_path)


@pytest.mark.parametrize("override, expected", [
    ("model.time_steps=[3", r"override model.time_steps=\[3 is not a valid YAML value, line 1"),
    ("model.time_steps=!!int x", r"override .* cannot read this value as !!int"),
    ("model.head={a: 1, a: 2}", r"override .* key a is given twice"),
])
def test_unreadable_override_values_name_the_override(override, expected):
    assert re.search(expected, _config_error("configs/quick.yaml", [override]))


@pytest.mark.parametrize("override, key", [
    ("model.head=" + "x" * 20_000, "model.head"),
    ("data.domains=[{name: a, source: '" + "y" * 20_000 + "'}]", r"data.domains\[0\].source"),
    ("data.domains=[" + ", ".join(["{name: a, source: 'builtin:news'}"] * 2_000) + "]",
     "data.domains"),
    ("continual.seeds=[" + ", ".join(map(str, range(2_000))) + ", 1]", "continual.seeds"),
    ("model.time_steps=[" + ", ".join(["1"] * 2_000) + "]", "model.time_steps"),
    ("seed=0x" + "f" * 5000, "seed"),  # no decimal form: Python refuses to print such an int
    ("train.lr=0x" + "f" * 5000, "train.lr"),  # beyond any float
    ("model." + "k" * 20_000 + "=1", "model.kkk"),
    ("model.head=" + "x" * (64 * 1024 + 1), "override model.head=xxx"),
])
def test_error_messages_print_bounded_values(override, key):
    assert re.search(key, _config_error("configs/quick.yaml", [override]))


NAME_KEYS = {  # every user string that becomes a file or folder name
    "data.domains[0].name": "data.domains=[{{name: {!r}, source: 'builtin:news'}}]",
    "continual.retention.name": "continual.retention={{name: {!r}, source: 'builtin:news'}}",
    "continual.methods[0].name": "continual.methods=[{{name: {!r}, head: mlp}}]",
}


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "..", ".", "", ".hidden",
                                  "a\\b", "x" * 65, "new\nline", "naïve"])
@pytest.mark.parametrize("key", NAME_KEYS)
def test_names_used_as_paths_are_refused_naming_the_key_and_rule(key, name):
    message = _config_error("configs/quick.yaml", [NAME_KEYS[key].format(name)])
    assert f"config key '{key}'" in message and config.NAME_RULE in message


@pytest.mark.parametrize("key", NAME_KEYS)
def test_plain_names_are_accepted(key):
    for name in ("news2", "Wiki-en_v1.2", "x" * 64):
        load_config("configs/quick.yaml", [NAME_KEYS[key].format(name)])


@pytest.mark.parametrize("override, key", [
    ("seed=-1", "seed"),
    (f"seed={2**32}", "seed"),  # numpy and torch take 0..2**32-1
    ("data.subsample_seed=-1", "data.subsample_seed"),
    ("continual.seeds=[0, -1]", r"continual.seeds\[1\]"),
    ("train.weight_decay=.inf", "train.weight_decay"),
    ("train.max_grad_norm=.inf", "train.max_grad_norm"),
    ("train.max_grad_norm=.nan", "train.max_grad_norm"),
    ("data.block_size=1000000", "data.block_size"),
    ("train.batch_size=1000000", "train.batch_size"),
    ("model.n_neurons=100000000", "model.n_neurons"),
    ("model.time_steps=1000000", "model.time_steps"),
    ("continual.eval_time_steps=[1, 1000000]", r"continual.eval_time_steps\[1\]"),
    (f"data.max_train_tokens_per_domain={10**20}", "data.max_train_tokens_per_domain"),
    (f"data.max_eval_tokens_per_domain={10**15}", "data.max_eval_tokens_per_domain"),
    (f"continual.tokens_per_stage={10**15}", "continual.tokens_per_stage"),
    ("data.passage_chars=100000000000", "data.passage_chars"),
    (f"train.epochs={2**63}", "train.epochs"),
    (f"train.eval_every={2**63}", "train.eval_every"),
    (f"continual.methods=[{{name: r, replay_size: {2**63}}}]",
     r"continual.methods\[0\].replay_size"),
    ("model.trainable_encoder_layers=1000000", "model.trainable_encoder_layers"),
    ("data.cache_dir=''", "data.cache_dir"),
    ('output_dir="a\\0b"', "output_dir"),  # YAML's \0: a NUL
    ("train.heads=[mlp, mlp]", "train.heads"),  # both would write mlp/
    ("wandb.project=team/runs", "wandb.project"),  # W&B refuses it only when a head starts
])
def test_every_numeric_and_path_key_is_checked_before_any_write(override, key):
    assert re.search(rf"config key '{key}'", _config_error("configs/quick.yaml", [override]))


# Hostile YAML values (each one also a whole override value): aliases, deep nesting,
# malformed tags, huge numbers and strings, path-like names.
_HOSTILE = ["*a", "&a [1, 2]", "[&a x, *a]", "[" * 40 + "]" * 40, "{a: 1, a: 2}", "!!int x",
            "!!bool x", "!!timestamp x", "!!python/object:os.system {}", "9" * 5000,
            "0x" + "f" * 3000, "1" + ":59" * 300, "x" * 20_000, "'../../etc'", "a/b", "..",
            "[", "{", "a: b: c", "'\\x00'", ".nan", "-.inf", "1e999", "- a\n- b"]
_SCALARS = st.one_of(st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(), st.text(max_size=20), st.booleans(), st.none(),
                     st.sampled_from(["mlp", "spiking_pc", "builtin:news", "../x", "a/b", "."]))
_VALUES_ANY = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(["name", "source", "head", "x"]),
                                             inner, max_size=3), max_leaves=8)

# a value as one line of YAML (JSON is YAML's flow style)
_RAW = st.one_of(st.sampled_from(_VALUES + _HOSTILE), _VALUES_ANY.map(json.dumps))
_FUZZ_KEYS = sorted(k for k in KEYS if "[i]" not in k) + ["nope.key", "model.nope", "a.b.c"]


def _key_and_raw(keys: list[str]) -> st.SearchStrategy[tuple[str, str]]:
    """A key and a YAML value for it: any value, or now and then the key's default."""
    def raws(key):
        value = config._default(KEYS[key]) if key in KEYS else "x"
        value = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        return st.tuples(st.just(key), st.one_of(_RAW, st.just(json.dumps(value))))
    return st.sampled_from(keys).flatmap(raws)
DOMAINS = "[{name: a, source: 'builtin:news'}, {name: b, source: 'builtin:shakespeare'}]"


_RARELY = st.sampled_from([False] * 9 + [True])  # hypothesis draws the first ones more often


@st.composite
def _documents(draw) -> str:
    """A YAML config text: random keys of random sections (a key or a section now and then
    given twice) with random values, usually with valid domains, now and then raw junk."""
    sections: dict[str, list[str]] = {}
    if draw(_RARELY) is False:
        sections["data"] = [f"domains: {DOMAINS}"]
    keys = [k for k in _FUZZ_KEYS if k not in SECTIONS]
    for key, raw in draw(st.lists(_key_and_raw(keys), max_size=5)):
        section, _, name = key.rpartition(".")
        sections.setdefault(section, []).append(f"{name}: {raw}")
    lines = []
    for section, items in sections.items():
        if not section:
            lines += items
        else:
            lines += [f"{section}:"] + [f"  {item}" for item in items]
            if draw(_RARELY):
                lines += [f"{section}:", f"  {items[0]}"]  # the section again
    if draw(_RARELY):
        lines.append(draw(st.sampled_from(_HOSTILE)))
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(_documents(), st.lists(_key_and_raw(_FUZZ_KEYS).map("=".join), max_size=3))
def test_any_config_file_and_overrides_load_or_raise_a_bounded_config_error(text, overrides):
    """Every input loads (and survives its config.yaml round trip) or raises a ConfigError
    naming the file, the override or the key, in a bounded message; when it raises,
    train/train.py exits 2 with an error: line and writes nothing."""
    from tests.conftest import command

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(text)
        try:
            cfg = load_config(path, overrides)
        except ConfigError as e:
            message = str(e)
            assert len(message) <= MESSAGE_CHARS, message[:MESSAGE_CHARS]
            assert str(path) in message or "override" in message or "config key" in message
            if message.startswith("config key 'output_dir'"):
                return  # the output_dir given to train.py below would mend it: a real run
        else:
            saved = Path(tmp) / "config.yaml"
            saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            assert load_config(saved).to_dict() == cfg.to_dict()
            return
        out = Path(tmp) / "run"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            rc = command("train/train.py").main(["--config", str(path), *overrides,
                                                 f"output_dir={out}"])
        assert rc == 2 and stderr.getvalue().startswith("error: ")
        assert "Traceback" not in stderr.getvalue() and not out.exists()


@pytest.mark.parametrize("content", [
    "data: {domains: [{name: ../../escape, source: 'builtin:news'}]}\n",
    f"data: {{domains: {DOMAINS}}}\nmodel: {{time_steps: &t 2, n_neurons: *t}}\n",
    f"data: {{domains: {DOMAINS}}}\nseed: 1\nseed: 2\n",
    f"data: {{domains: {DOMAINS}}}\nmodel: {{time_steps: 2\n",
    f"data: {{domains: {DOMAINS}}}\ntrain: {{weight_decay: .inf}}\n",
])
def test_train_refuses_a_bad_config_before_writing_anything(tmp_path, capsys, content):
    from tests.conftest import command

    path, out = tmp_path / "bad.yaml", tmp_path / "run"
    path.write_text(content)
    # no trunk: were the config taken, the run would stop at the trunk, not train
    argv = ["--config", str(path), f"output_dir={out}", f"model.encoder={tmp_path}/no-trunk"]
    assert command("train/train.py").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file '{path}'") or err.startswith("error: config key")
    assert not out.exists() and not (tmp_path / "escape").exists()


@pytest.mark.parametrize("path", ["train/train.py", "eval/compare.py", "eval/continual.py"])
def test_overrides_may_come_before_and_after_flags(path):
    from tests.conftest import command

    args = command(path).parse_args(["data.seed=1", "--config", "x.yaml", "--no-wandb",
                                     "train.lr=0.1"])
    assert args.overrides == ["data.seed=1", "train.lr=0.1"] and args.config == "x.yaml"
