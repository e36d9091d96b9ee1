"""Mixed precision: the default training step per precision, and what each costs in quality.

    python bench/bench_precision.py [--out bench/results/bench_precision.json]
        [--processes 3] [--steps 5] [--skip-quality | --skip-speed] [--seeds 0,1,2]

Speed: one training step of the default config (the spiking_pc head, hybrid learning with the
energy gate, N = 512, T = 8; a batch of 16 x 128 tokens on cached trunk features; SmolLM2's
geometry, D = 576 and the tied 49,152-word LM head) under `train.mixed_precision` no, bf16
and fp16, through the engine of `make train`. accelerate keeps the precision in
process-wide state, so each precision runs in its own process; the three alternate, process
after process, `--processes` times, so machine noise hits them alike. Each process reports
its median step time after two warm-up steps; the result is the median over processes, and
the ratios float32 / bf16 are taken per round (adjacent processes), then their median.
Target (issue 18): bf16 at least 1.4x faster than float32.

Membrane: the spiking layer's spikes and settled energy with half-precision inputs, with a
float32 and with a half-precision membrane (docs/precision.md).

Quality: `train/train.py --config configs/default.yaml train.heads=[trunk,spiking_pc]` per
precision and per seed (`--seeds`, default 0,1,2; a few minutes each; the bf16 and fp16 runs
first encode their own feature-cache entries), scored by the validation perplexity of every
domain, with the trunk alone (in the same precision) and the n-gram models beside it. Per
seed the three precisions see the same tokens in the same order from the same
initialisation, so the cost of a precision is the paired difference, reported as mean and
std over seeds; target: bf16 within 1% of float32. The runs live in
`<out folder>/precision_runs_<config>/<mode>/seed<k>` and are resumed, not redone, by a
second call; `--config configs/quick.yaml` is the short version.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_heads import SMOLLM2_GEOMETRY, features  # the same batch as the per-head bench
from transformers import LlamaConfig, get_constant_schedule

from hybridlm.rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent
MODES = ("no", "bf16", "fp16")
SPEED_TARGET = 1.4  # float32 step / bf16 step
QUALITY_TARGET = 0.01  # |bf16 perplexity / float32 perplexity - 1|


def one_process(mode: str, steps: int) -> dict:
    """Median seconds of `steps` training steps in `mode` (after two warm-up steps)."""
    from hybridlm.engine import Engine, make_optimizer
    from hybridlm.modeling import HybridConfig, HybridForCausalLM
    from hybridlm.precision import make_accelerator

    feats, source = features(16, 128)
    ids = torch.randint(1000, 40000, (16, 128), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    cfg = HybridConfig(encoder_config=LlamaConfig(**SMOLLM2_GEOMETRY).to_dict(),
                       trunk_kind="causal_lm", head="spiking_pc", n_neurons=512, time_steps=8,
                       rate_cost=0.1, learning="hybrid", gate="energy", hebbian_lr=0.01)
    model = HybridForCausalLM(cfg).train()
    model.head.init_from_data(feats.reshape(-1, 576)[:4096])
    torch.nn.init.normal_(model.head.readout.weight, std=0.02)
    accelerator = make_accelerator(mode, cpu=True)
    model, opt = accelerator.prepare(model, make_optimizer(model, lr=1e-3, weight_decay=0.01))
    engine = Engine(accelerator, model, opt, get_constant_schedule(opt), max_grad_norm=1.0,
                    local=accelerator.unwrap_model(model).local_learning())
    times, losses = [], []
    for i in range(steps + 2):
        start = time.perf_counter()
        with accelerator.autocast():
            out = engine.model(input_ids=ids, labels=ids, features=feats)
        engine.step(out.loss, out.local_statistic)
        if i >= 2:
            times.append(time.perf_counter() - start)
        losses.append(out.loss.item())
    return {"mode": mode, "median_step_seconds": statistics.median(times), "losses": losses,
            "firing_rate": float(out.head_stats["rate"]), "features": source,
            "threads": torch.get_num_threads()}


def speed(processes: int, steps: int) -> dict:
    runs = {m: [] for m in MODES}
    ratios = []  # float32 / bf16 of each round
    for i in range(processes):
        for m in MODES:
            out = subprocess.run([sys.executable, __file__, "--child", m, "--steps", str(steps)],
                                 capture_output=True, text=True, check=True)
            runs[m].append(json.loads(out.stdout.strip().splitlines()[-1]))
        ratios.append(runs["no"][-1]["median_step_seconds"]
                      / runs["bf16"][-1]["median_step_seconds"])
        print(f"round {i + 1}/{processes}: " + ", ".join(
            f"{m} {runs[m][-1]['median_step_seconds']:.2f} s" for m in MODES), flush=True)
    median = {m: statistics.median(r["median_step_seconds"] for r in runs[m]) for m in MODES}
    ratio = statistics.median(ratios)
    return {"batch_tokens": 16 * 128, "steps": steps, "processes": processes,
            "features": runs["no"][0]["features"], "threads": runs["no"][0]["threads"],
            "median_step_seconds": median,
            "speedup_over_float32": {m: median["no"] / median[m] for m in MODES},
            "bf16_speedup_per_round": ratios, "bf16_speedup": ratio,
            "target_bf16_speedup_min": SPEED_TARGET, "speed_target_met": ratio >= SPEED_TARGET,
            "per_process": runs}


def _geomean(values) -> float:
    values = list(values)
    return math.exp(statistics.mean(math.log(v) for v in values))


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def quality(folder: Path, config: str, seeds: list[int]) -> dict:
    """The spiking_pc head of `config` trained in each precision from each seed (the trunk
    scored beside it, in that precision), scored by validation perplexity per domain. Per
    seed the three precisions see the same tokens in the same order from the same
    initialisation; the spread is over seeds, the cost of a precision is paired per seed."""
    runs = {m: [] for m in MODES}
    baselines = None
    for seed in seeds:
        for m in MODES:
            out = folder / m / f"seed{seed}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "train/train.py", "--config", config,
                            "--no-wandb", "--resume", f"output_dir={out}", f"seed={seed}",
                            "train.heads=[trunk,spiking_pc]", f"train.mixed_precision='{m}'",
                            "train.save_model=false"], cwd=ROOT, check=True)
            summary = json.loads(RunDir(out).summary.read_text())
            heads = summary["heads"]
            metrics = json.loads(RunDir(out).metrics("spiking_pc").read_text())
            ppl = {name: {d: r["perplexity"] for d, r in heads[name]["validation"].items()}
                   for name in ("spiking_pc", "trunk")}
            runs[m].append({
                "seed": seed, "validation_perplexity": ppl["spiking_pc"],
                "geometric_mean": _geomean(ppl["spiking_pc"].values()),
                "trunk_validation_perplexity": ppl["trunk"],
                "trunk_geometric_mean": _geomean(ppl["trunk"].values()),
                "feature_cache_bytes": summary["feature_cache"]["bytes"],
                "loss_scale_final": next((r["train/loss_scale"] for r in reversed(
                    metrics["history"]) if "train/loss_scale" in r), None),
                "seconds": round(time.perf_counter() - start, 1)})
            if baselines is None:  # the n-gram models do not depend on the precision
                baselines = {name: {"validation_perplexity": {
                    d: r["perplexity"] for d, r in heads[name]["validation"].items()}}
                    for name in ("unigram", "kn_bigram")}
                for b in baselines.values():
                    b["geometric_mean"] = _geomean(b["validation_perplexity"].values())
            r = runs[m][-1]
            print(f"seed {seed}, {m}: spiking_pc validation perplexity {r['geometric_mean']:.3f}"
                  f" (geometric mean over domains), trunk {r['trunk_geometric_mean']:.3f}, "
                  f"{r['seconds']:.0f} s", flush=True)
    result = {"config": config, "seeds": seeds, "runs": runs, "baselines": baselines,
              "target_bf16_within": QUALITY_TARGET}
    result["geometric_mean"] = {m: _spread([r["geometric_mean"] for r in runs[m]])
                                for m in MODES}
    result["trunk_geometric_mean"] = {m: _spread([r["trunk_geometric_mean"] for r in runs[m]])
                                      for m in MODES}
    def paired(key: str) -> dict:  # each seed against the same seed in float32
        return {m: _spread([r[key] / f[key] - 1 for r, f in zip(runs[m], runs["no"])])
                for m in MODES}
    result["relative_to_float32"] = paired("geometric_mean")
    result["trunk_relative_to_float32"] = paired("trunk_geometric_mean")
    result["quality_target_met"] = abs(result["relative_to_float32"]["bf16"]["mean"]) \
        <= QUALITY_TARGET
    return result


def quality_markdown(q: dict) -> list[str]:
    n = len(q["seeds"])
    out = [f"Validation perplexity, geometric mean over domains, mean ± std over {n} seed(s) "
           f"({q['config']}):", "",
           "| model | float32 | bf16 | fp16 | bf16 vs float32 (paired) | fp16 vs float32 |",
           "|---|---|---|---|---|---|"]
    for name, b in q["baselines"].items():
        out.append(f"| {name} | {b['geometric_mean']:.2f} | (same) | (same) | - | - |")

    def row(name, table, rel):
        cells = [f"{table[m]['mean']:.3f} ± {table[m]['std']:.3f}" for m in MODES]
        diffs = [f"{100 * rel[m]['mean']:+.2f}% ± {100 * rel[m]['std']:.2f}" for m in MODES[1:]]
        return f"| {name} | " + " | ".join(cells + diffs) + " |"
    out.append(row("trunk", q["trunk_geometric_mean"], q["trunk_relative_to_float32"]))
    out.append(row("spiking_pc", q["geometric_mean"], q["relative_to_float32"]))
    met = "met" if q["quality_target_met"] else "NOT met"
    out += ["", f"bf16 within {100 * QUALITY_TARGET:.0f}% of float32 (mean of the paired "
            f"differences): {met}"]
    return out


def membrane() -> dict:
    """The spiking layer's inference on 2,048 trunk states (the default layer, data
    initialised) in float32, against bf16/fp16 inputs V_1 and G with a float32 membrane (what
    the layer does under autocast) and with the whole inference in bf16/fp16: spikes that
    differ (over step, token, neuron; a share of float32's spikes), tokens with any
    difference, and the mean settled energy F_T relative to float32's."""
    from hybridlm.kernels.reference import sc_inference_reference
    from hybridlm.spiking import SpikingPCLayer

    feats, source = features(64, 128)
    z = feats.reshape(-1, 576)
    torch.manual_seed(0)
    layer = SpikingPCLayer(576, 512, time_steps=8, rate_cost=0.1)
    layer.init_from_data(z[4096:], torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = layer.centred(z[:2048])
        atoms = layer.atoms()
        v1, g = x @ atoms, atoms.t() @ atoms

        def run(v, w):
            return sc_inference_reference(v, w, layer.thresholds(), layer.delta, 8)

        r0, s0, _ = run(v1, g)
        f0 = layer.energy(x, r0, atoms).mean()
        out = {"features": source, "spikes_per_token": float(s0.sum((0, 2)).float().mean()),
               "settled_energy": float(f0)}
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            for membrane_dtype, (r, s, _) in (
                    ("float32", run(v1.to(dtype).float(), g.to(dtype).float())),
                    (name, run(v1.to(dtype), g.to(dtype)))):
                out[f"{name} inputs, {membrane_dtype} membrane"] = {
                    "spikes_differing": float((s != s0).sum() / s0.sum()),
                    "tokens_differing": float((s != s0).any(0).any(1).float().mean()),
                    "settled_energy_change": float(layer.energy(x, r.float(), atoms).mean()
                                                   / f0 - 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="bench/results/bench_precision.json")
    p.add_argument("--processes", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-quality", action="store_true", help="the step times only")
    p.add_argument("--skip-speed", action="store_true", help="the quality runs only")
    p.add_argument("--config", default="configs/default.yaml", help="the quality runs' config")
    p.add_argument("--seeds", default="0,1,2", help="the quality runs' seeds")
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_process(args.child, args.steps)))
        return
    out = Path(args.out)
    result = {"membrane": membrane()}
    print(json.dumps(result["membrane"], indent=1))
    if not args.skip_speed:
        result["speed"] = s = speed(args.processes, args.steps)
        print(f"features: {s['features']}, {s['threads']} threads")
        print("| precision | median step (s) | speed-up over float32 |\n|---|---|---|")
        for m in MODES:
            print(f"| {m} | {s['median_step_seconds'][m]:.3f} | "
                  f"{s['speedup_over_float32'][m]:.2f}x |")
        print(f"bf16 {s['bf16_speedup']:.2f}x float32 (median of the rounds' ratios), target >= "
              f"{SPEED_TARGET}x: {'met' if s['speed_target_met'] else 'NOT met'}")
    if not args.skip_quality:
        folder = out.parent / f"precision_runs_{Path(args.config).stem}"
        seeds = [int(x) for x in args.seeds.split(",")]
        result["quality"] = q = quality(folder, args.config, seeds)
        print("\n".join(quality_markdown(q)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
