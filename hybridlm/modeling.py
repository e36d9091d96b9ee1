"""`HybridConfig` and `HybridForCausalLM`: a pretrained trunk topped with a head (spiking
predictive-coding, or a non-spiking baseline) whose output feeds the trunk's LM head.

    input ids -> trunk (frozen bottom, then `trainable_encoder_layers` top layers) -> z (B, L, D)
              -> y = z + head(z)          (every head's correction starts at zero)
              -> logits = LM head(y)      (B, L, V)

A decoder-only trunk (`trunk_kind="causal_lm"`) keeps its own final norm and LM head, so the
untrained model *is* the trunk's language model. A bidirectional encoder (`"encoder"`) runs
with a causal mask and gets a readout tied to its word embeddings plus a trained bias.
The frozen bottom's outputs ("features") can be computed once and cached.
"""

from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.masking_utils import create_causal_mask

from hybridlm.config import ModelConfig
from hybridlm.heads import SPIKING_HEADS, build_head
from hybridlm.outputs import HeadOutput, HybridLMOutput
from hybridlm.trunks import resolve_trunk

# The hyper-parameters a checkpoint saves: every field of `ModelConfig` but `encoder` (where
# the trunk comes from; a checkpoint holds the trunk's own config instead).
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "encoder")


def model_kwargs(model: ModelConfig) -> dict:
    """The `model` section as `HybridConfig` keyword arguments (all but `encoder`)."""
    return {k: getattr(model, k) for k in MODEL_KEYS}


def _model_keys_config() -> type:
    """A `PretrainedConfig` whose fields are `MODEL_KEYS`, with ModelConfig's types, defaults
    and help: each hyper-parameter is declared once, in `hybridlm.config.ModelConfig`."""
    fields = [f for f in dataclasses.fields(ModelConfig) if f.name in MODEL_KEYS]

    def body(namespace: dict) -> None:
        namespace["__module__"] = __name__
        namespace["__annotations__"] = {f.name: f.type for f in fields}
        for f in fields:
            namespace[f.name] = dataclasses.field(
                default=f.default, default_factory=f.default_factory, metadata=f.metadata)

    return types.new_class("ModelKeysConfig", (PretrainedConfig,), exec_body=body)


class HybridConfig(_model_keys_config()):
    """Architecture of a hybrid model; saved in `config.json` with the checkpoint.

    `encoder_config` is the trunk's own config; `trunk_kind` is `causal_lm` (decoder-only LM:
    its final norm and LM head are kept) or `encoder` (run with `is_decoder=True`, readout tied
    to its word embeddings). The other fields are `MODEL_KEYS`, the hyper-parameters of the
    `model` section, inherited with their types and defaults from `hybridlm.config.ModelConfig`.
    """

    model_type = "hybridlm"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(
            config_class=AutoConfig, model_type="bert", init_kwargs={"is_decoder": True}
        )
    }
    encoder_config: PretrainedConfig | dict | None = None
    trunk_kind: str = "encoder"
    tie_word_embeddings: bool = False  # the LM head reads the trunk's own weights directly


class HybridForCausalLM(PreTrainedModel, GenerationMixin):
    """Next-token language model. input_ids (B, L) -> logits (B, L, V); position t predicts
    token t + 1. The output carries the head's statistics (firing rates, PC energy) and, when
    training with local learning, the local rule's statistic (`HybridLMOutput`)."""

    config_class = HybridConfig
    base_model_prefix = "hybrid"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        trunk_cfg = config.encoder_config
        self.lm_head = None  # an untied causal LM's own output layer
        self.lm_bias = None  # the trained bias of an encoder's tied readout
        if config.trunk_kind == "causal_lm":
            lm = AutoModelForCausalLM.from_config(trunk_cfg)
            self.encoder = lm.base_model
            if not getattr(trunk_cfg, "tie_word_embeddings", False):
                self.lm_head = lm.get_output_embeddings()
        elif config.trunk_kind == "encoder":
            trunk_cfg.is_decoder = True  # causal self-attention: no future token leaks in
            trunk_cfg.add_cross_attention = False
            self.encoder = AutoModel.from_config(trunk_cfg)
            self.lm_bias = nn.Parameter(torch.zeros(trunk_cfg.vocab_size))
        else:
            raise ValueError(f"trunk_kind '{config.trunk_kind}' is not causal_lm | encoder")
        self.head = build_head(config.head, d_model=trunk_cfg.hidden_size, config=config)
        if config.head in SPIKING_HEADS:
            # hebbian: the dictionary and mean learn only from the local rule; hybrid: both
            for p in self.head.local_parameters():
                p.requires_grad_(config.learning != "hebbian")
        self.post_init()
        self.freeze_encoder()

    def _init_weights(self, module):
        pass  # the trunk initialises itself; the heads set their own init in __init__

    # ---- trunk split -----------------------------------------------------------------------
    @property
    def n_top(self) -> int:
        return self.config.trainable_encoder_layers

    def _layers(self) -> nn.ModuleList:
        """The trunk's transformer layers: BERT family (`.encoder.layer`) or Llama family
        (`.layers` with `.rotary_emb` and a final `.norm`)."""
        enc = self.encoder
        if self.config.trunk_kind == "encoder":
            layers = getattr(getattr(enc, "encoder", None), "layer", None)
        elif all(hasattr(enc, a) for a in ("layers", "rotary_emb", "norm")):
            layers = enc.layers
        else:
            layers = None
        if layers is None:
            raise ValueError(
                f"trainable_encoder_layers > 0 needs a BERT- or Llama-family trunk; "
                f"{type(enc).__name__} is neither: use trainable_encoder_layers=0"
            )
        return layers

    def freeze_encoder(self) -> None:
        """Freeze the trunk (and an untied LM head) except its top `trainable_encoder_layers`
        layers."""
        self.encoder.requires_grad_(False)
        if self.lm_head is not None:
            self.lm_head.requires_grad_(False)
        if self.n_top > 0:
            layers = self._layers()
            if self.n_top > len(layers):
                raise ValueError(
                    f"trainable_encoder_layers={self.n_top} but the trunk has {len(layers)}"
                )
            for layer in layers[len(layers) - self.n_top :]:
                layer.requires_grad_(True)

    @torch.no_grad()
    def encoder_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Output of the frozen part of the trunk, (B, L, D): what the feature cache holds.
        With no trainable layer it is the trunk's final (normed) hidden state. Always computed
        in eval mode (no dropout), so a cached value equals a fresh one."""
        was_training = self.encoder.training
        self.encoder.eval()
        out = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.n_top > 0
        )
        self.encoder.train(was_training)
        # hidden_states[-1 - k] is the input of the k-th layer from the top
        return out.last_hidden_state if self.n_top == 0 else out.hidden_states[-1 - self.n_top]

    def top_layers(self, h: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """The trainable top layers (and a causal LM's final norm): features -> z (B, L, D)."""
        if self.n_top == 0:
            return h
        layers = self._layers()[-self.n_top :]
        cfg = self.encoder.config
        if self.config.trunk_kind == "encoder":
            mask = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=attention_mask,
                                      cache=None)
            for layer in layers:
                h = layer(h, mask)
            return h
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # (1, L)
        mask = create_causal_mask(config=cfg, inputs_embeds=h, attention_mask=attention_mask,
                                  cache=None, position_ids=pos)
        rotary = self.encoder.rotary_emb(h, position_ids=pos)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=pos)
        return self.encoder.norm(h)

    def lm_logits(self, y: torch.Tensor) -> torch.Tensor:
        """The trunk's LM head on y (B, L, D) -> (B, L, V): its own output layer, or the word
        embeddings it is tied to (plus the trained bias for an encoder)."""
        if self.lm_head is not None:
            return self.lm_head(y)
        emb = self.encoder.get_input_embeddings().weight
        bias = None if self.lm_bias is None else self.lm_bias.to(y.dtype)
        return F.linear(y, emb.to(y.dtype), bias)

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters this model's forward reads from a submodule without calling it: the
        word embeddings a tied LM head multiplies by (`lm_logits`). DeepSpeed ZeRO-3 must be
        told (`hybridlm.engine.register_zero3_external_parameters`)."""
        return [] if self.lm_head is not None else [self.encoder.get_input_embeddings().weight]

    # ---- forward -------------------------------------------------------------------------
    def run_head(self, input_ids=None, features=None, attention_mask=None, token_mask=None,
                 time_steps: int | None = None) -> tuple[torch.Tensor, HeadOutput]:
        """y = z + head(z) (B, L, D), what the LM head reads, and the head's output (its
        diagnostics; the local statistic in training with local learning). `features` as in
        `forward`."""
        if features is None:
            features = self.encoder_features(input_ids, attention_mask)
        z = self.top_layers(features, attention_mask)  # (B, L, D)
        extra = {}
        if self.config.head in SPIKING_HEADS:  # only the energy-based layers have T
            extra = {"time_steps": time_steps,
                     "local_statistic": self.training and self.config.learning != "bptt"}
        out = self.head(z, token_mask, **extra)
        return z + out.delta, out

    def corrected_state(self, input_ids=None, features=None, attention_mask=None,
                        token_mask=None, time_steps: int | None = None) -> torch.Tensor:
        """y = z + head(z) (B, L, D), what the LM head reads; `features` as in `forward`."""
        return self.run_head(input_ids, features, attention_mask, token_mask, time_steps)[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        features: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        time_steps: int | None = None,
        **kwargs,
    ) -> HybridLMOutput:
        """`features` (B, L, D), when given, replaces the frozen trunk's output (cache hit).
        `labels` (B, L) are the input ids with -100 where no loss is taken; shifted inside.
        `token_mask` (B, L) marks real tokens for the head's diagnostics (default: the labels
        that are not -100, else the attention mask, else every token). `time_steps` overrides
        the spiking layer's T for this call. Returns the logits, the loss (with `labels`),
        the head's detached diagnostics and, in training with local learning, the local
        rule's statistic."""
        # real tokens, for the head's diagnostics: padding has no label (or no attention)
        mask = token_mask
        if mask is None:
            mask = labels != -100 if labels is not None else attention_mask
        y, head = self.run_head(input_ids, features, attention_mask, mask, time_steps)
        logits = self.lm_logits(y)  # (B, L, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
            if self.config.pc_energy_weight > 0 and "pc_energy_loss" in head.stats:
                loss = loss + self.config.pc_energy_weight * head.stats["pc_energy_loss"]
        return HybridLMOutput(loss=loss, logits=logits,
                              head_stats={k: v.detach() for k, v in head.stats.items()},
                              local_statistic=head.local_statistic)

    # The spiking head re-runs its T inner steps on every position, so generation recomputes
    # the whole prefix each step instead of keeping a key/value cache.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_encoder(cls, encoder: str, cache_dir: str = ".cache/hybridlm",
                     **head_kwargs) -> HybridForCausalLM:
        """A new model on the pretrained trunk `encoder` (see `hybridlm.trunks.resolve_trunk`:
        "smollm2", "minilm", a .gguf file, a folder or a Hub id)."""
        trunk = resolve_trunk(encoder, cache_dir)
        try:
            if trunk.kind == "causal_lm":
                # never is_decoder=True here: Llama's constructor rejects it
                pretrained = AutoModelForCausalLM.from_pretrained(trunk.path, dtype=torch.float32)
                base = pretrained.base_model
            else:
                pretrained = base = AutoModel.from_pretrained(
                    trunk.path, is_decoder=True, dtype=torch.float32)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(
                f"cannot load trunk '{encoder}': {str(e).splitlines()[0][:300]}. Give a local "
                "model folder, a .gguf file, a Hub id available offline, 'smollm2' or 'minilm'."
            ) from e
        trunk_cfg = pretrained.config
        trunk_cfg._name_or_path = trunk.name  # a portable name, not this machine's path
        model = cls(HybridConfig(encoder_config=trunk_cfg.to_dict(), trunk_kind=trunk.kind,
                                 **head_kwargs))
        model.encoder.load_state_dict(base.state_dict())
        if model.lm_head is not None:
            model.lm_head.load_state_dict(pretrained.get_output_embeddings().state_dict())
        check_causal(model)
        return model

    def local_learning(self):
        """The gated Hebbian learner of the spiking head, or None (bptt mode, other heads)."""
        from hybridlm.plasticity import LocalLearning, NeuromodulatoryGate

        c = self.config
        if c.head not in SPIKING_HEADS or c.learning == "bptt":
            return None
        gate = NeuromodulatoryGate(kind=c.gate, g_min=c.gate_min, g_max=c.gate_max,
                                   momentum=c.gate_momentum)
        return LocalLearning(layer=self.head, eta=c.hebbian_lr, gate=gate)

    def trainable_parameters(self) -> int:
        """Parameters that learn: by gradient, or (hebbian mode) by the local rule."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if self.config.head in SPIKING_HEADS and self.config.learning == "hebbian":
            n += sum(p.numel() for p in self.head.local_parameters())
        return n

    def head_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters())


@torch.no_grad()
def check_causal(model: HybridForCausalLM, length: int = 12) -> None:
    """Raise if the encoder lets a later token change an earlier position's output."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.encoder_config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (1, length), generator=g)
    changed = ids.clone()
    changed[0, length // 2 :] = torch.randint(1, vocab, (length - length // 2,), generator=g)
    a = model.encoder_features(ids)[0, : length // 2]
    b = model.encoder_features(changed)[0, : length // 2]
    model.train(was_training)
    if not torch.allclose(a, b, atol=1e-5):
        raise ValueError(
            f"trunk {type(model.encoder).__name__} is not causal (even with is_decoder=True): "
            "future tokens change earlier outputs, so next-token training would leak them; "
            "use a decoder-only LM or an encoder that supports is_decoder=True"
        )


AutoConfig.register("hybridlm", HybridConfig)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM)
