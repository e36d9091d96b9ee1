"""hybridlm: hybrid transformer-spiking language models.

Importing the package registers `HybridConfig` / `HybridForCausalLM` with transformers'
`AutoConfig` and `AutoModelForCausalLM`.
"""

from hybridlm.config import ConfigError, RunConfig, load_config
from hybridlm.modeling import HybridConfig, HybridForCausalLM
from hybridlm.spiking import SpikingPCLayer

__all__ = [
    "ConfigError",
    "HybridConfig",
    "HybridForCausalLM",
    "RunConfig",
    "SpikingPCLayer",
    "load_config",
]
__version__ = "0.1.0"
