"""Operation counts and energy estimates of the heads, per token, as spiking papers report them.

    E = E_MAC * ops(real-valued products) + E_AC * sum_l rate_l * T * ops_l

with 45 nm presets (pJ per operation; Horowitz 2014, as used by SpikeGPT and others). One
multiply-accumulate (MAC) of a real-valued input counts as one op at E_MAC; a spike reaching a
synapse is one accumulate (AC, a synaptic operation) at E_AC.

Counts per token (D model width, N neurons, T inner steps, H MLP hidden size):
- spiking_pc: the bottom-up drive V_1 = D^T x_c is real-valued, N*D MACs; every later step
  only propagates spikes through the lateral weights D^T D (+ mu I): each spike adds one row
  of N values, spikes_per_token * N ACs (synaptic operations); the readout W_o r_T is N*D
  MACs. Its dense equivalent (the lateral product done densely every step, as on a GPU
  without event-driven kernels) adds T*N*N MACs. The Gram matrix D^T D (N*N*D per batch,
  not per token), the proposal checks and LayerNorm are left out, as is usual.
- ista (the non-spiking control): N*D + T*N*N + N*D MACs, all dense.
- mlp, mlp_macs: 2*D*H MACs. linear: D*D MACs. trunk: none.
The LM head (D x vocabulary) and the trunk are identical for every method and left out;
`lm_head_macs` gives the former for scale.

Caveat: this ignores memory traffic (weights and membrane state read every step), which
often dominates; one analysis finds spike rates must fall below about 6% before a spiking
layer beats an equivalent quantised one once data movement is counted.
"""

from __future__ import annotations

# The measured statistic each head's `rate` in head_ops stands for (evaluate() reports it).
RATE_STAT = {"spiking_pc": "firing_rate", "kwta": "active_fraction"}

PRESETS_PJ = {"fp32": (4.6, 0.9), "fp16": (1.5, 0.4), "int8": (0.23, 0.03)}  # (E_MAC, E_AC)

CAVEAT = (
    "Estimate from operation counts only (45 nm presets): memory traffic is ignored, and it "
    "often dominates; one analysis finds spike rates must fall below about 6% before a "
    "spiking layer beats an equivalent quantised one once data movement is counted."
)


def head_ops(head: str, d_model: int, n_neurons: int, time_steps: int, mlp_hidden: int,
             rate: float | None = None) -> dict[str, float]:
    """Per-token operation counts of a head: `mac` (real-valued), `sop` (spike-driven) and
    `dense_equivalent_mac` (every operation done densely). `rate` is the spiking layer's
    measured firing rate (fraction of neurons spiking per step)."""
    lateral = time_steps * n_neurons * n_neurons
    if head == "spiking_pc":
        if rate is None:
            raise ValueError("a spiking head's operation count needs its firing rate")
        mac = 2 * n_neurons * d_model
        return {"mac": float(mac), "sop": float(rate * lateral),
                "dense_equivalent_mac": float(mac + lateral)}
    if head == "ista":
        mac = 2 * n_neurons * d_model + lateral
        return {"mac": float(mac), "sop": 0.0, "dense_equivalent_mac": float(mac)}
    if head in ("mlp", "mlp_macs"):
        mac = 2 * d_model * mlp_hidden
        return {"mac": float(mac), "sop": 0.0, "dense_equivalent_mac": float(mac)}
    if head == "kwta":  # W1 dense; W2 only for the k units that pass (k = rate * H)
        if rate is None:
            raise ValueError("a k-WTA head's operation count needs its active fraction")
        return {"mac": float(d_model * mlp_hidden * (1 + rate)), "sop": 0.0,
                "dense_equivalent_mac": float(2 * d_model * mlp_hidden)}
    if head == "linear":
        return {"mac": float(d_model * d_model), "sop": 0.0,
                "dense_equivalent_mac": float(d_model * d_model)}
    if head == "trunk":
        return {"mac": 0.0, "sop": 0.0, "dense_equivalent_mac": 0.0}
    raise ValueError(f"unknown head '{head}'")


def energy_pj(ops: dict[str, float], preset: str = "fp32") -> dict[str, float]:
    """Energy per token in pJ: E_MAC * mac + E_AC * sop, and the all-dense figure."""
    if preset not in PRESETS_PJ:
        raise ValueError(f"unknown energy preset '{preset}'; known: {sorted(PRESETS_PJ)}")
    e_mac, e_ac = PRESETS_PJ[preset]
    return {"energy_pj": e_mac * ops["mac"] + e_ac * ops["sop"],
            "dense_energy_pj": e_mac * ops["dense_equivalent_mac"],
            "e_mac_pj": e_mac, "e_ac_pj": e_ac}


def lm_head_macs(d_model: int, vocab_size: int) -> int:
    """MACs per token of the tied LM head (the same for every method)."""
    return d_model * vocab_size
