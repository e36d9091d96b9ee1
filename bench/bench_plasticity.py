"""Cost of local Hebbian learning: time per training step in bptt vs hybrid vs hebbian mode.

    python bench/bench_plasticity.py --out bench/results/bench_plasticity.json

One training step of the default model on cached features (batch 16 x 128 tokens, the real
MiniLM geometry: D=384, vocab 30,522): forward, backward, AdamW step and, in the local modes,
the gated Hebbian update. The modes are interleaved round by round so machine noise hits them
alike; the median step time per mode and the ratio to bptt are reported (target: hybrid at most
1.10x bptt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig

from hybridlm.modeling import HybridConfig, HybridForCausalLM

MINILM_GEOMETRY = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=1,
                       num_attention_heads=12, intermediate_size=1536)


def build(mode: str):
    torch.manual_seed(0)
    cfg = HybridConfig(encoder_config=BertConfig(**MINILM_GEOMETRY).to_dict(), head="spiking_pc",
                       n_neurons=512, time_steps=8, learning=mode)
    model = HybridForCausalLM(cfg).train()
    torch.nn.init.normal_(model.head.readout.weight, std=0.02)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt, model.local_learning()


def step(model, opt, local, feats, ids) -> None:
    loss = model(input_ids=ids, labels=ids, features=feats).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if local is not None:
        local.step(loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/results/bench_plasticity.json")
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(16, 128, 384, generator=g)
    ids = torch.randint(1000, 30000, (16, 128), generator=g)
    modes = ("bptt", "hybrid", "hebbian")
    setups = {m: build(m) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds + 2):
        for m in modes:
            start = time.perf_counter()
            step(*setups[m], feats, ids)
            if r >= 2:  # two warm-up rounds
                times[m].append(time.perf_counter() - start)
    median = {m: statistics.median(t) for m, t in times.items()}
    result = {
        "batch_tokens": 16 * 128,
        "rounds": args.rounds,
        "median_step_seconds": median,
        "ratio_to_bptt": {m: median[m] / median["bptt"] for m in modes},
        "target_hybrid_ratio_max": 1.10,
    }
    result["hybrid_target_met"] = result["ratio_to_bptt"]["hybrid"] <= 1.10
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("| mode | median step (s) | ratio to bptt |\n|---|---|---|")
    for m in modes:
        print(f"| {m} | {median[m]:.3f} | {result['ratio_to_bptt'][m]:.3f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
