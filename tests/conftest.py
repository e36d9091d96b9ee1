"""Test setup: offline, no W&B traffic, datasets cache in a temporary folder, tiny models."""

import os
import tempfile

# Read by huggingface_hub / datasets at import time: set before any HF import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hybridlm-test-datasets-")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig  # noqa: E402

from hybridlm.modeling import HybridConfig, HybridForCausalLM  # noqa: E402

TINY_ENCODER = dict(
    vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=64,
)


def tiny_model(head: str = "spiking_pc", **kwargs) -> HybridForCausalLM:
    """A randomly initialised hybrid model small enough for unit tests (no download)."""
    torch.manual_seed(0)
    enc = BertConfig(**TINY_ENCODER).to_dict()
    defaults = dict(n_neurons=16, time_steps=4, threshold=0.7)
    cfg = HybridConfig(encoder_config=enc, head=head, **(defaults | kwargs))
    return HybridForCausalLM(cfg).eval()


@pytest.fixture
def tiny():
    return tiny_model
