"""Save/load time of the default model folder (MiniLM encoder + spiking head of
configs/default.yaml): save_pretrained + tokenizer + card, and from_pretrained in this process.

    python bench/bench_checkpoint.py [--out bench/results/bench_checkpoint.json] [--repeats 3]

Target: save < 2 s and load < 2 s. Writes JSON (median and all times, folder size).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="bench/results/bench_checkpoint.json")
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridlm import hub
    from hybridlm.config import load_config
    from hybridlm.modeling import HybridForCausalLM
    from hybridlm.trunks import resolve_trunk

    cfg = load_config(args.config, [])
    kw = asdict(cfg.model)
    encoder = kw.pop("encoder")
    model = HybridForCausalLM.from_encoder(encoder, **kw).eval()
    tok = AutoTokenizer.from_pretrained(resolve_trunk(encoder).path)
    ids = torch.randint(1000, 30000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    save_s, load_s, check_s = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            folder = Path(tmp) / f"m{i}"
            t = time.perf_counter()
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            save_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            hub.check_model_folder(folder)
            check_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            back = AutoModelForCausalLM.from_pretrained(folder).eval()
            load_s.append(time.perf_counter() - t)
        with torch.no_grad():
            same = torch.equal(back(ids).logits, ref)
        size = sum(f.stat().st_size for f in folder.iterdir())
    result = {
        "model": f"{encoder} + {cfg.model.head} (n_neurons={cfg.model.n_neurons}, "
                 f"time_steps={cfg.model.time_steps})",
        "parameters": sum(p.numel() for p in model.parameters()),
        "folder_bytes": size,
        "save_seconds_median": statistics.median(save_s), "save_seconds": save_s,
        "load_seconds_median": statistics.median(load_s), "load_seconds": load_s,
        "check_model_folder_seconds_median": statistics.median(check_s),
        "target_seconds": 2.0,
        "save_under_target": statistics.median(save_s) < 2.0,
        "load_under_target": statistics.median(load_s) < 2.0,
        "reloaded_logits_identical": same,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
