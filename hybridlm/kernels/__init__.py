"""Fused spiking-neuron kernels: one CUDA source, run on GPUs through CuPy and on CPUs
through a small CUDA-to-C++ shim, with a plain-torch reference as the source of truth.

Public API (time-first tensors, float32):

- :func:`lif_multistep` (x [T, *]) -> spikes [T, *]
- :func:`pc_step` (I, v, r) -> (s, v', r')
- :func:`spike_matmul` (S [M, K], W [K, N]) -> [M, N]

Backends and their selection: see :mod:`hybridlm.kernels.ops`; design and measurements:
docs/kernels.md.
"""

from hybridlm.kernels.ops import (
    BACKENDS,
    SPIKE_MATMUL_CROSSOVER,
    lif_multistep,
    pc_step,
    resolve_backend,
    spike_matmul,
)
from hybridlm.kernels.reference import (
    lif_multistep_reference,
    pc_step_reference,
    spike_matmul_reference,
)

__all__ = [
    "BACKENDS",
    "SPIKE_MATMUL_CROSSOVER",
    "lif_multistep",
    "lif_multistep_reference",
    "pc_step",
    "pc_step_reference",
    "resolve_backend",
    "spike_matmul",
    "spike_matmul_reference",
]
