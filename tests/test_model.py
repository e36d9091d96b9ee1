import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hybridlm.modeling import HybridConfig, HybridForCausalLM, check_causal


@pytest.mark.parametrize("head", ["spiking_pc", "mlp", "linear"])
@pytest.mark.parametrize("top", [0, 1])
def test_no_future_token_leaks_into_a_prediction(tiny, head, top):
    model = tiny(head, trainable_encoder_layers=top)
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


def test_lm_head_is_tied_to_the_word_embeddings(tiny):
    model = tiny("linear")
    ids = torch.randint(5, 120, (1, 6))
    with torch.no_grad():
        model.encoder.get_input_embeddings().weight[7] += 3.0
    y = model.head(model.encoder_features(ids))
    expected = y @ model.encoder.get_input_embeddings().weight.T + model.lm_bias
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_generate_runs(tiny):
    model = tiny()
    out = model.generate(torch.randint(5, 120, (1, 4)), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
