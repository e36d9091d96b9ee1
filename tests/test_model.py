import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hybridlm.config import ModelConfig
from hybridlm.heads import HEADS
from hybridlm.hub import CheckpointError, check_model_folder
from hybridlm.modeling import MODEL_KEYS, HybridConfig, HybridForCausalLM, check_causal
from hybridlm.trunks import TrunkError, load_tokenizer, resolve_trunk


def _llama(folder, head, **kw):
    defaults = dict(n_neurons=16, time_steps=4, threshold=0.7)
    return HybridForCausalLM.from_encoder(str(folder), head=head, **(defaults | kw)).eval()


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("head", ["spiking_pc", "mlp", "linear"])
@pytest.mark.parametrize("top", [0, 1])
def test_no_future_token_leaks_into_a_prediction(tiny, tiny_llama, family, head, top):
    model = tiny(head, trainable_encoder_layers=top) if family == "bert" else \
        _llama(tiny_llama[True], head, trainable_encoder_layers=top)
    for p in model.head.parameters():  # a head that does something
        torch.nn.init.normal_(p, std=0.3)
    torch.manual_seed(1)
    ids = torch.randint(5, 120, (2, 20))
    logits = model(input_ids=ids).logits
    for t in (0, 7, 18):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(5, 120, changed[:, t + 1 :].shape)
        other = model(input_ids=changed).logits
        torch.testing.assert_close(logits[:, : t + 1], other[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, t + 1 :], other[:, t + 1 :])


def test_bidirectional_encoder_is_refused(tiny):
    model = tiny()
    for module in model.encoder.modules():  # undo the causal mask the model asked for
        if hasattr(module, "is_causal"):
            module.is_causal = False
    model.encoder.config.is_decoder = False
    with pytest.raises(ValueError, match="not causal"):
        check_causal(model)


@pytest.mark.parametrize("head", ["spiking_pc", "mlp", "linear"])
def test_save_then_load_gives_identical_logits(tiny, head, tmp_path):
    model = tiny(head, beta=0.8, time_steps=3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HybridForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), HybridConfig)
    assert loaded.config.beta == 0.8 and loaded.config.time_steps == 3
    ids = torch.randint(5, 120, (2, 12))
    assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


# A value other than ModelConfig's default for every key a checkpoint saves (MODEL_KEYS).
NON_DEFAULT = dict(head="ista", n_neurons=12, time_steps=3, spike_quantum=0.5, l2_cost=0.1,
                   rate_cost=0.2, dictionary_init="random", surrogate="fast_sigmoid",
                   surrogate_alpha=5.0, pc_energy_weight=0.1, kwta_fraction=0.2,
                   trainable_encoder_layers=1, kernel_backend="torch", learning="hybrid",
                   hebbian_lr=0.05, gate="energy", gate_min=0.1, gate_max=1.5,
                   gate_momentum=0.5)


def test_every_model_key_survives_save_and_load(tiny, tmp_path):
    assert set(NON_DEFAULT) == set(MODEL_KEYS)  # a new model key needs a value here
    ModelConfig(**NON_DEFAULT).check()
    default = ModelConfig()
    assert all(getattr(default, k) != v for k, v in NON_DEFAULT.items())
    model = tiny(**NON_DEFAULT)
    model.save_pretrained(tmp_path)
    saved = json_load(tmp_path / "config.json")
    assert "encoder" not in saved and saved["trunk_kind"] == "encoder"
    assert {k: saved[k] for k in MODEL_KEYS} == NON_DEFAULT
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {k: getattr(loaded.config, k) for k in MODEL_KEYS} == NON_DEFAULT
    assert (loaded.head.time_steps, loaded.head.backend) == (3, "torch")


# config.json of a tiny spiking model as checkpoints wrote it before HybridConfig took its
# fields from ModelConfig (every key written out, and an unknown one, `beta`).
OLD_CONFIG_JSON = {
    "architectures": ["HybridForCausalLM"],
    "beta": 0.8,
    "dictionary_init": "data",
    "dtype": "float32",
    "gate": "energy",
    "gate_max": 2.0,
    "gate_min": 0.0,
    "gate_momentum": 0.9,
    "head": "spiking_pc",
    "hebbian_lr": 0.01,
    "kernel_backend": "auto",
    "kwta_fraction": 0.05,
    'l2_cost': 0.0,
    "learning": "hybrid",
    "model_type": "hybridlm",
    "n_neurons": 16,
    "pc_energy_weight": 0.0,
    "rate_cost": 0.05,
    "spike_quantum": 1.0,
    "surrogate": "atan",
    "surrogate_alpha": 2.0,
    "tie_word_embeddings": False,
    "time_steps": 4,
    "trainable_encoder_layers": 0,
    "transformers_version": "5.24.0",
    "trunk_kind": "encoder",
}


def test_an_old_config_json_still_loads(tmp_path):
    import json

    from transformers import BertConfig

    from tests.conftest import TINY_ENCODER

    encoder = BertConfig(**TINY_ENCODER, is_decoder=True).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(OLD_CONFIG_JSON | {"encoder_config":
                                                                         encoder}))
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, HybridConfig)
    for key, value in OLD_CONFIG_JSON.items():
        if key not in ("architectures", "dtype", "transformers_version"):
            assert getattr(cfg, key) == value, key
    model = HybridForCausalLM(cfg)
    assert (model.head.time_steps, model.head.nu) == (4, 0.05)
    assert model.local_learning().gate.kind == "energy"


def test_cached_features_give_the_same_loss(tiny):
    model = tiny(trainable_encoder_layers=1)
    ids = torch.randint(5, 120, (3, 10))
    full = model(input_ids=ids, labels=ids)
    feats = model.encoder_features(ids)
    cached = model(input_ids=ids, labels=ids, features=feats)
    torch.testing.assert_close(full.loss, cached.loss, rtol=0, atol=0)


def test_frozen_encoder_features_ignore_dropout(tiny):
    model = tiny().train()
    ids = torch.randint(5, 120, (2, 10))
    assert torch.equal(model.encoder_features(ids), model.encoder_features(ids))


def test_freezing_policy(tiny):
    frozen = tiny()
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    top1 = tiny(trainable_encoder_layers=1)
    trainable = {n for n, p in top1.encoder.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.layer.1.") for n in trainable)
    head_and_bias = frozen.head_parameters() + frozen.lm_bias.numel()
    assert frozen.trainable_parameters() == head_and_bias
    with pytest.raises(ValueError, match="trainable_encoder_layers"):
        tiny(trainable_encoder_layers=5)


def test_encoder_readout_is_tied_to_the_word_embeddings(tiny):
    model = tiny("linear")
    ids = torch.randint(5, 120, (1, 6))
    with torch.no_grad():
        model.encoder.get_input_embeddings().weight[7] += 3.0
        torch.nn.init.normal_(model.head.proj.weight)
    z = model.encoder_features(ids)
    y = z + model.head(z).delta
    expected = y @ model.encoder.get_input_embeddings().weight.T + model.lm_bias
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_generate_runs(tiny):
    model = tiny()
    out = model.generate(torch.randint(5, 120, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("top", [0, 1])
def test_every_head_starts_as_the_trunks_own_language_model(tiny_llama, tied, head, top):
    """At step 0 the hybrid model is the trunk's causal LM: its final norm and its own LM head
    (tied or untied) are kept and every head's correction starts at zero."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama[tied]).eval()
    model = _llama(tiny_llama[tied], head, trainable_encoder_layers=top)
    assert model.config.trunk_kind == "causal_lm"
    assert (model.lm_head is None) == tied and model.lm_bias is None
    ids = torch.randint(0, 120, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(ids).logits,
                                   rtol=0, atol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith("lm_head") or n.startswith("encoder.embed"))


def test_a_trained_head_moves_the_logits_and_saves_and_loads(tiny_llama, tmp_path):
    model = _llama(tiny_llama[False], "mlp")
    torch.nn.init.normal_(model.head.down.weight, std=0.1)
    model.save_pretrained(tmp_path)
    check_model_folder(tmp_path, require_tokenizer=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 120, (1, 9))
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama[False]).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits, reference(ids).logits)


def test_trunk_kinds(tiny_llama):
    assert resolve_trunk(str(tiny_llama[True])).kind == "causal_lm"
    assert resolve_trunk("minilm").kind == "encoder"


def test_a_head_saved_for_another_trunk_is_refused(tiny_llama, tmp_path):
    """A folder whose head was trained on a trunk of another hidden size names the tensor."""
    import json

    from safetensors.torch import load_file, save_file

    model = _llama(tiny_llama[True], "mlp")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["head.up.weight"] = torch.zeros(weights["head.up.weight"].shape[0], 48)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="head.up.weight.*another trunk or head"):
        check_model_folder(tmp_path, require_tokenizer=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["encoder_config"]["hidden_size"] = 48  # the config lies about the trunk instead
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        check_model_folder(tmp_path, require_tokenizer=False)


def test_a_tokenizer_from_another_model_is_refused(tiny_llama, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "trunk"
    shutil.copytree(tiny_llama[True], folder)
    AutoTokenizer.from_pretrained(resolve_trunk("minilm").path).save_pretrained(folder)
    with pytest.raises(TrunkError, match="ids up to 30521.*120 rows"):
        load_tokenizer(resolve_trunk(str(folder)))


def test_block_size_above_the_trunks_positions_is_refused(tiny_llama, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from hybridlm.config import ConfigError

    folder = tmp_path / "trunk"
    shutil.copytree(tiny_llama[True], folder)
    tok = AutoTokenizer.from_pretrained(resolve_trunk("minilm").path)
    tok.save_pretrained(folder)
    cfg = json_load(folder / "config.json") | {"vocab_size": len(tok)}
    (folder / "config.json").write_text(__import__("json").dumps(cfg))
    with pytest.raises(ConfigError, match="data.block_size.*64 positions"):
        load_tokenizer(resolve_trunk(str(folder)), block_size=65)


def json_load(path):
    import json

    return json.loads(path.read_text())
