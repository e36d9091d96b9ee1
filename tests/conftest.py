"""Test setup: offline, no W&B traffic, datasets cache in a temporary folder, tiny models."""

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

# Read by huggingface_hub / datasets at import time: set before any HF import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="hybridlm-test-datasets-")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hybridlm.modeling import HybridConfig, HybridForCausalLM  # noqa: E402

TINY_ENCODER = dict(
    vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=64,
)


def tiny_model(head: str = "spiking_pc", **kwargs) -> HybridForCausalLM:
    """A randomly initialised hybrid model small enough for unit tests (no download)."""
    torch.manual_seed(0)
    enc = BertConfig(**TINY_ENCODER).to_dict()
    defaults = dict(n_neurons=16, time_steps=4, rate_cost=0.05)
    cfg = HybridConfig(encoder_config=enc, head=head, **(defaults | kwargs))
    return HybridForCausalLM(cfg).eval()


@pytest.fixture
def tiny():
    return tiny_model


TINY_LLAMA = dict(
    vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Folders of two tiny random Llama causal LMs (no download): tied and untied LM head.
    Returns {tied: folder}."""
    folders = {}
    for tied in (True, False):
        torch.manual_seed(3)
        folder = tmp_path_factory.mktemp(f"llama-{'tied' if tied else 'untied'}")
        LlamaForCausalLM(LlamaConfig(**TINY_LLAMA, tie_word_embeddings=tied)).save_pretrained(
            folder)
        folders[tied] = folder
    return folders


ROOT = Path(__file__).resolve().parent.parent


def command(path: str):
    """A command script (e.g. "train/train.py") as a module, to call its `main(argv)` in this
    process: no interpreter start and no second import of torch and transformers."""
    name = "cmd_" + path.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps precision and gradient accumulation in process-wide singletons; each
    test (and each in-process command) starts from none."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def asan_kernel_cache(tmp_path_factory) -> Path:
    """One folder for the AddressSanitizer build of the CPU kernels, shared by every ASan test
    (and by parallel test workers: the build is keyed by source and flags, written atomically):
    it is compiled once per test run, not once per test."""
    folder = tmp_path_factory.getbasetemp().parent / "hybridlm-asan-kernels"
    folder.mkdir(exist_ok=True)
    return folder
