"""Compare the heads of a config over several seeds, paired: `make compare`.

    python eval/compare.py --config configs/default.yaml --seeds 0,1,2 [section.key=value ...]

Each seed is one `train/train.py` run (same blocks, same cached trunk features; the seed
changes initialisation and data order only) in `<out>/seed_<s>/`, without model folders.
A seed that already finished is reused; an interrupted one is resumed. Then, per model, the
mean and spread over seeds of perplexity and bits per character per domain, and paired
differences (same seed) of every trained head against the trunk alone and of the spiking head
against every other head, with whether each difference exceeds the seed spread. Writes
`compare.json`, `compare.md` and `compare.png` in `<out>`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridlm.config import ConfigError, keys_help, load_config  # noqa: E402
from hybridlm.continual.metrics import mean_std  # noqa: E402
from hybridlm.io import write_json_atomic, write_text_atomic  # noqa: E402
from hybridlm.results import BASELINE_NOTES, mean_bpc  # noqa: E402
from hybridlm.rundir import RunDir  # noqa: E402

SPLITS = ("validation", "test")
UNTRAINED = ("unigram", "kn_bigram", "trunk")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default="runs/compare", help="folder of the seeds' runs and results")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every seed")
    return p.parse_intermixed_args(argv)  # overrides before and after flags


def run_seed(args, seed: int, out: Path) -> dict:
    """Train every head for one seed (or reuse/resume that seed's run); its metrics.json."""
    folder = out / f"seed_{seed}"
    summary = RunDir(folder).summary
    if summary.is_file():
        print(f"[seed {seed}] already finished: {summary}")
        return json.loads(summary.read_text())
    cmd = [sys.executable, str(ROOT / "train" / "train.py"), "--config", args.config]
    if RunDir(folder).config.is_file():
        cmd.append("--resume")
    if args.no_wandb:
        cmd.append("--no-wandb")
    cmd += [*args.overrides, f"seed={seed}", f"output_dir={folder}", "train.save_model=false"]
    print(f"[seed {seed}] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed}: train/train.py exited with {proc.returncode}; "
                           f"rerun make compare to resume it")
    return json.loads(summary.read_text())


def paired(runs: list[dict], a: str, b: str, split: str, domains: list[str]) -> dict:
    """a - b over seeds (same seed paired): mean bits/char, per domain, and relative
    perplexity. Negative: a is better."""
    def per_seed(fn):
        return [fn(r["heads"][a][split]) - fn(r["heads"][b][split]) for r in runs]

    out = {"mean_bpc": _diff(per_seed(mean_bpc))}
    for d in domains:
        out[d] = _diff(per_seed(lambda s, d=d: s[d]["bits_per_char"]))
    rel = [[r["heads"][a][split][d]["perplexity"] / r["heads"][b][split][d]["perplexity"] - 1
            for d in domains] for r in runs]
    out["relative_perplexity"] = _diff([sum(x) / len(x) for x in rel])
    return out


def _diff(values: list[float]) -> dict:
    """Mean and std of paired differences; `beats_spread`: |mean| > std (the difference is
    larger than its own seed-to-seed spread); `same_sign`: every seed agrees."""
    ms = mean_std(values)
    return ms | {"values": values, "beats_spread": abs(ms["mean"]) > ms["std"],
                 "same_sign": all(v < 0 for v in values) or all(v > 0 for v in values)}


def aggregate(runs: list[dict]) -> dict:
    domains = list(next(iter(runs[0]["heads"].values()))["validation"])
    models = [m for m in runs[0]["heads"] if all(m in r["heads"] for r in runs)]
    agg = {"domains": domains, "seeds": [r.get("seed") for r in runs], "models": {}}
    for m in models:
        heads = [r["heads"][m] for r in runs]
        entry = {"trainable_parameters": heads[0].get("trainable_parameters"),
                 "note": BASELINE_NOTES.get(m, "")}
        for split in SPLITS:
            entry[split] = {"mean_bpc": mean_std([mean_bpc(h[split]) for h in heads])}
            for d in domains:
                entry[split][d] = {k: mean_std([h[split][d][k] for h in heads])
                                   for k in ("perplexity", "bits_per_char")}
        agg["models"][m] = entry
    trained = [m for m in models if m not in UNTRAINED]
    pairs = [(m, "trunk") for m in trained if "trunk" in models]
    if "spiking_pc" in trained:
        pairs += [("spiking_pc", m) for m in trained if m != "spiking_pc"]
    agg["paired"] = {f"{a} - {b}": {s: paired(runs, a, b, s, domains) for s in SPLITS}
                     for a, b in pairs}
    agg["layers"] = {m: layer_summary(runs, m, domains) for m in trained
                     if all(r["heads"][m].get("time_sweep") for r in runs)}
    if "spiking_pc" in trained and "trunk" in models:
        agg["claim"] = claim(agg)
    return agg


LAYER_KEYS = ("firing_rate", "spikes_per_token", "active_steps", "relative_energy",
              "max_neuron_rate")


def layer_summary(runs: list[dict], m: str, domains: list[str]) -> dict:
    """The energy-based layer's behaviour over seeds: validation diagnostics (mean over
    domains), operations per token, and the T sweep (scored at other T, not retrained)."""
    heads = [r["heads"][m] for r in runs]
    out = {k: mean_std([sum(h["validation"][d][k] for d in domains) / len(domains)
                        for h in heads]) for k in LAYER_KEYS}
    ops = [h["operations_per_token"] for h in heads if h.get("operations_per_token")]
    if ops:
        out["operations_per_token"] = {k: mean_std([o[k] for o in ops]) for k in
                                       ("mac", "sop", "dense_equivalent_mac", "energy_pj",
                                        "dense_energy_pj")}
        out["caveat"] = ops[0]["caveat"]
    sweep = {}
    for t in heads[0]["time_sweep"]:
        sweep[t] = {"mean_bpc": mean_std([mean_bpc(h["time_sweep"][t]) for h in heads])}
        sweep[t] |= {k: mean_std([sum(h["time_sweep"][t][d][k] for d in domains)
                                  / len(domains) for h in heads])
                     for k in ("firing_rate", "spikes_per_token", "relative_energy")}
    out["time_sweep"] = sweep
    return out


def claim(agg: dict) -> dict:
    """The claim this project's design comes from: 'a 22% perplexity improvement when a
    spiking PC layer sits atop a conventional encoder', read literally (trunk + layer vs the
    trunk alone) and fairly (vs the matched non-spiking heads): validation perplexity
    change, mean over domains, paired over seeds."""
    out = {"claimed_relative_perplexity": -0.22}
    for ref in ("trunk", "mlp", "mlp_macs", "ista", "linear"):
        key = f"spiking_pc - {ref}"
        if key in agg["paired"]:
            r = agg["paired"][key]["validation"]["relative_perplexity"]
            out[ref] = {"relative_perplexity": r,
                        "holds": r["mean"] <= -0.22 and r["mean"] + r["std"] < 0}
    return out


def _pm(ms: dict, digits: int = 4) -> str:
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def markdown(agg: dict, config: str, seconds: float) -> str:
    domains = agg["domains"]
    lines = [f"# Heads compared over seeds {agg['seeds']}", "",
             f"`{config}`, every seed on the same blocks and cached trunk features; mean ± std "
             f"over seeds (sample std). {seconds / 60:.1f} minutes in this invocation; "
             "each seed's training run (`train/train.py`; a resumed or reused seed counts "
             "its last invocation): " + ", ".join(
                 f"{s / 60:.1f}" for s in agg.get("seed_seconds", []) if s is not None)
             + " minutes.", ""]
    for split in SPLITS:
        head = ["model", "trainable params"] + [f"{d} bpc" for d in domains] + \
            [f"{d} ppl" for d in domains] + ["mean bpc"]
        lines += [f"## {split.capitalize()}", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for m, e in agg["models"].items():
            p = e["trainable_parameters"]
            cells = [m, "-" if p is None else f"{p:,}"]
            cells += [_pm(e[split][d]["bits_per_char"]) for d in domains]
            cells += [_pm(e[split][d]["perplexity"], 2) for d in domains]
            cells.append(_pm(e[split]["mean_bpc"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Paired differences ({split}, same seed; negative = the first is "
                  "better). 'beats spread': |mean| > std of the paired difference; 'same sign': "
                  "every seed agrees.", "",
                  "| pair | mean bpc diff | relative perplexity | beats spread | same sign |",
                  "|---|---|---|---|---|"]
        for name, p in agg["paired"].items():
            d, r = p[split]["mean_bpc"], p[split]["relative_perplexity"]
            yes = {True: "yes", False: "no"}
            lines.append(f"| {name} | {d['mean']:+.4f} ± {d['std']:.4f} | "
                         f"{r['mean']:+.2%} ± {r['std']:.2%} | {yes[d['beats_spread']]} | "
                         f"{yes[d['same_sign']]} |")
        lines.append("")
    for m, lay in agg.get("layers", {}).items():
        lines += [f"## The `{m}` layer", ""]
        if m == "ista":  # no spikes: its "rate" is the share of non-zero units per step
            lines += ["Its units carry real values, not spikes: 'firing rate' below is the "
                      "share of units with a non-zero value per step, and 'spikes per token' "
                      "counts non-zero unit-steps.", ""]
        lines += ["Validation, mean over domains, mean ± std over seeds: firing rate "
                  f"{_pm(lay['firing_rate'])}, spikes per token {_pm(lay['spikes_per_token'], 1)}"
                  f", inner steps with a spike per token {_pm(lay['active_steps'], 2)}, settled "
                  f"energy F_T / F_0 {_pm(lay['relative_energy'], 3)}, largest per-neuron rate "
                  f"{_pm(lay['max_neuron_rate'], 3)}.", ""]
        ops = lay.get("operations_per_token")
        if ops:
            lines += [f"Per token: {ops['mac']['mean']:,.0f} multiply-adds and "
                      f"{ops['sop']['mean']:,.0f} synaptic operations (dense equivalent "
                      f"{ops['dense_equivalent_mac']['mean']:,.0f} multiply-adds); estimated "
                      f"{ops['energy_pj']['mean'] / 1e6:.3f} µJ per token at 45 nm against "
                      f"{ops['dense_energy_pj']['mean'] / 1e6:.3f} µJ dense. {lay['caveat']}", ""]
        lines += ["Scored at other numbers of inner steps T (not retrained):", "",
                  "| T | mean bpc | firing rate | spikes per token | F_T / F_0 |",
                  "|---|---|---|---|---|"]
        for t, r in lay["time_sweep"].items():
            lines.append(f"| {t} | {_pm(r['mean_bpc'])} | {_pm(r['firing_rate'])} | "
                         f"{_pm(r['spikes_per_token'], 1)} | {_pm(r['relative_energy'], 3)} |")
        lines.append("")
    if "claim" in agg:
        lines += ["## The 22% claim", "",
                  "'A 22% perplexity improvement when a spiking predictive-coding layer sits "
                  "atop a conventional encoder': validation perplexity of the trunk with the "
                  "spiking layer, relative to each reference (mean over domains, paired over "
                  "seeds):", "", "| against | relative perplexity | 22% reached |", "|---|---|---|"]
        for ref, r in agg["claim"].items():
            if ref == "claimed_relative_perplexity":
                continue
            rp = r["relative_perplexity"]
            lines.append(f"| {ref} | {rp['mean']:+.2%} ± {rp['std']:.2%} | "
                         f"{'yes' if r['holds'] else 'no'} |")
        lines.append("")
    lines += ["Models: " + "; ".join(f"`{m}`: {e['note']}" for m, e in agg["models"].items()
                                     if e["note"]) + "."]
    return "\n".join(lines) + "\n"


def figure(agg: dict, split: str = "validation") -> bytes:
    """PNG: bits per character per domain, mean ± std over seeds, one bar per model."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains, models = agg["domains"], list(agg["models"])
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(domains), 3.8))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        e = agg["models"][m][split]
        ax.bar(xs, [e[d]["bits_per_char"]["mean"] for d in domains], width,
               yerr=[e[d]["bits_per_char"]["std"] for d in domains], capsize=2, label=m)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel(f"{split} bits per character (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        load_config(args.config, args.overrides)  # refuse a bad config before any run
        try:
            args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, got "
                              f"'{args.seeds}'") from None
        if not args.seeds or len(set(args.seeds)) != len(args.seeds):
            raise ConfigError(f"--seeds: give distinct seeds, got {args.seeds}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        runs = [run_seed(args, s, out) | {"seed": s} for s in args.seeds]
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    agg = aggregate(runs) | {"seconds": seconds, "seed_seconds": [r.get("seconds") for r in runs],
                             "config": args.config,
                             "overrides": args.overrides}
    write_json_atomic(out / "compare.json", agg)
    text = markdown(agg, args.config, seconds)
    write_text_atomic(out / "compare.md", text)
    (out / "compare.png").write_bytes(figure(agg))
    print(text)
    print(f"wrote {out / 'compare.md'}, compare.json and compare.png")
    if any(math.isnan(e["validation"]["mean_bpc"]["mean"]) for e in agg["models"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
