"""Continual-learning evaluation: does a spiking PC layer with gated Hebbian learning forget
less than plain fine-tuning when trained on one domain after another?

    python eval/continual.py --config configs/continual.yaml [section.key=value ...]
    python eval/continual.py --config configs/continual.yaml --checkpoint DIR   # one R row
    python eval/continual.py --config configs/continual.yaml --report-only      # rebuild report

Every method of `continual.methods` is trained through `continual.order` once per seed of
`continual.seeds`; every domain's TEST split is scored before training and after each stage
(only an explicit tuning run, `continual.eval_split=validation`, scores validation instead).
Writes to output_dir (files there are replaced): continual.json (matrices and metrics per
seed and aggregated), continual.md (the report), PNG plots, manifest.json, and (when
enabled) an offline W&B run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import hybridlm  # noqa: E402,F401  (registers the model with the Auto classes)
from hybridlm import cl_metrics as clm  # noqa: E402
from hybridlm import energy  # noqa: E402
from hybridlm.config import ConfigError, RunConfig, load_config  # noqa: E402
from hybridlm.continual import (  # noqa: E402
    SCORES,
    Stream,
    batches_per_stage,
    check_checkpoint_tokenizer,
    evaluate_row,
    method_model_config,
    model_kwargs,
    run_sequence,
)
from hybridlm.corpora import DataError  # noqa: E402
from hybridlm.data import build_corpora, format_report, subsample  # noqa: E402
from hybridlm.features import sample_states  # noqa: E402
from hybridlm.heads import SPIKING_HEADS, mlp_hidden  # noqa: E402
from hybridlm.io import write_json_atomic, write_text_atomic  # noqa: E402
from hybridlm.manifest import PACKAGES as MANIFEST_PACKAGES  # noqa: E402
from hybridlm.manifest import package_versions, run_manifest  # noqa: E402
from hybridlm.modeling import HybridConfig, HybridForCausalLM  # noqa: E402
from hybridlm.tracking import Tracker  # noqa: E402
from hybridlm.trunks import resolve_trunk  # noqa: E402

REFERENCE = "finetune"  # plain fine-tuning: every method is compared with it
HEADLINE = "spiking_hebbian_gated"  # the seed document's claim is about this one
PACKAGES = MANIFEST_PACKAGES + ("matplotlib", "pyyaml")  # the report plots and reads YAML


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/continual.yaml")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--checkpoint", default=None,
                   help="only score this saved model folder on every test split")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild report and plots from output_dir/continual.json (e.g. of an "
                        "interrupted run) without training")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


# ---- aggregation ----------------------------------------------------------------------------
def learning_gain(R, b) -> float:
    """mean_j (b[j] - R[j][j]) for a loss: how much each stage improved its own domain (not a
    GEM/Chaudhry metric; read forgetting against it: a head that learns little forgets little)."""
    return sum(b[j] - R[j][j] for j in range(len(R))) / len(R)


def aggregate_diagnostics(rs: list[dict], order: list[str]) -> dict | None:
    """PC diagnostics over every seed that has them: per T the test perplexity per domain
    and averaged over domains, and the firing rate; at the trained T the PC energy and
    firing rate per inner step (each averaged over domains per seed). Mean ± sample std."""
    rs = [r for r in rs if "diagnostics" in r]
    if not rs:
        return None
    trained = rs[0]["diagnostics"]["trained_time_steps"]
    ts = sorted({int(t) for r in rs for t in r["diagnostics"]["by_T"]})
    by_t = {}
    for t in ts:
        res = [r["diagnostics"]["by_T"][str(t)] for r in rs if str(t) in r["diagnostics"]["by_T"]]
        by_t[str(t)] = {
            "perplexity": {o: clm.mean_std([x[o]["perplexity"] for x in res]) for o in order},
            "perplexity_domain_mean": clm.mean_std(
                [float(np.mean([x[o]["perplexity"] for o in order])) for x in res]),
            "firing_rate": clm.mean_std(
                [float(np.mean([x[o]["firing_rate"] for o in order])) for x in res])}
    per_step = {}
    for key in ("energy_per_step", "rate_per_step"):
        curves = np.array([np.mean([r["diagnostics"]["by_T"][str(trained)][o][key]
                                    for o in order], 0) for r in rs])  # (seeds, T)
        per_step[key] = {"mean": curves.mean(0).tolist(),
                         "std": (curves.std(0, ddof=1) if len(rs) > 1
                                 else 0 * curves[0]).tolist()}
    return {"seeds": [r["seed"] for r in rs], "trained_time_steps": trained, "by_T": by_t,
            **per_step}


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """Per method: R mean/std per score, metrics mean/std over seeds, comparisons with the
    reference method (seeds paired)."""
    agg = {}
    for name, rs in runs.items():
        a = {"seeds": [r["seed"] for r in rs], "R_mean": {}, "R_std": {}, "metrics": {}}
        for k in SCORES:
            stack = np.array([r["R"][k] for r in rs])  # (seeds, T, T)
            a["R_mean"][k] = stack.mean(0).tolist()
            a["R_std"][k] = (stack.std(0, ddof=1) if len(rs) > 1 else 0 * stack[0]).tolist()
            a["baseline_mean"] = a.get("baseline_mean", {}) | {
                k: np.mean([r["baseline"][k] for r in rs], 0).tolist()}
            a["metrics"][k] = {m: clm.mean_std([r["metrics"][k][m] for r in rs])
                               for m in ("ACC", "BWT", "FWT", "forgetting")}
        a["metrics"]["loss"]["learning_gain"] = clm.mean_std(
            [learning_gain(r["R"]["loss"], r["baseline"]["loss"]) for r in rs])
        if "firing_rate" in rs[0]:
            a["firing_rate_mean"] = np.mean([r["firing_rate"] for r in rs], 0).tolist()
        a["stage_tokens"] = [[s["tokens"] for s in r["stages"]] for r in rs]  # non-padding
        a["stage_token_slots"] = [[s["token_slots"] for s in r["stages"]] for r in rs]
        a["trainable_parameters"] = rs[0]["trainable_parameters"]
        a["seconds"] = sum(sum(r["seconds"].values()) for r in rs)
        diag = aggregate_diagnostics(rs, rs[0]["order"])
        if diag is not None:
            a["diagnostics"] = diag
        agg[name] = a
    ref = REFERENCE if REFERENCE in runs else next(iter(runs))
    for name, rs in runs.items():
        by_seed = {r["seed"]: r for r in runs[ref]}
        paired = [(r, by_seed[r["seed"]]) for r in rs if r["seed"] in by_seed]
        agg[name]["vs_reference"] = {"reference": ref} | {
            f"{m}/{k}": clm.compare([x["metrics"][k][m] for x, _ in paired],
                                    [y["metrics"][k][m] for _, y in paired])
            for k in ("loss", "accuracy") for m in ("forgetting", "BWT")}
    if "spiking_bptt" in runs:
        by_seed = {r["seed"]: r for r in runs["spiking_bptt"]}
        for name, rs in runs.items():
            paired = [(r, by_seed[r["seed"]]) for r in rs if r["seed"] in by_seed]
            agg[name]["vs_spiking_bptt"] = {
                f"forgetting/{k}": clm.compare([x["metrics"][k]["forgetting"] for x, _ in paired],
                                               [y["metrics"][k]["forgetting"] for _, y in paired])
                for k in ("loss", "accuracy")}
    return agg


def energy_table(cfg: RunConfig, runs: dict, agg: dict, d_model: int, vocab: int) -> dict:
    """Per method, per domain (final stage, mean over seeds): ops and energy per token."""
    out = {"preset": cfg.continual.energy_preset, "caveat": energy.CAVEAT,
           "lm_head_mac_per_token": energy.lm_head_macs(d_model, vocab), "methods": {}}
    for i, m in enumerate(cfg.continual.methods):
        if m.name not in runs:
            continue
        mc = method_model_config(cfg, i)
        hidden = mlp_hidden(mc.head, d_model, HybridConfig(**model_kwargs(mc))) \
            if mc.head in ("mlp", "mlp_macs") else 0
        rates = agg[m.name].get("firing_rate_mean")
        per_domain = {}
        for j, dom in enumerate(runs[m.name][0]["order"]):
            rate = rates[-1][j] if rates else None
            ops = energy.head_ops(mc.head, d_model, mc.n_neurons, mc.time_steps, hidden, rate)
            per_domain[dom] = {"firing_rate": rate} | ops | energy.energy_pj(
                ops, cfg.continual.energy_preset)
        out["methods"][m.name] = {"head": mc.head, "time_steps": mc.time_steps,
                                  "n_neurons": mc.n_neurons, "mlp_hidden": hidden,
                                  "per_domain": per_domain}
    return out


# ---- report ---------------------------------------------------------------------------------
def pm(ms: dict, digits: int = 4) -> str:
    if ms["mean"] is None:
        return clm.NOT_DEFINED
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def verdict(agg: dict, order: list[str], split: str = "test") -> list[str]:
    lines = []
    if split != "test":
        return [f"**Tuning run on {split.upper()} splits: no verdict.** Claims are judged on "
                "the test split only; this run exists to choose a hyper-parameter."]
    if len(order) < 2:
        return ["With a single-domain sequence BWT, FWT and forgetting are **not defined** "
                "(no earlier stage to forget); only ACC is reported."]
    ref = agg[next(iter(agg))]["vs_reference"]["reference"]
    for name in [n for n in (HEADLINE, "spiking_bptt") if n in agg and n != ref]:
        for k, unit in (("loss", "nats"), ("accuracy", "accuracy points (fraction)")):
            c = agg[name]["vs_reference"][f"forgetting/{k}"]
            if not c["defined"]:
                lines.append(f"- {name} vs {ref} (forgetting, {k}): not defined.")
                continue
            less = c["method"]["mean"] < c["reference"]["mean"]
            if max(c["method"]["mean"], c["reference"]["mean"]) <= 0:
                outcome = ("neither forgets on average (F <= 0 for both: later stages kept "
                           f"improving earlier domains, {name} {'more' if less else 'less'} so)")
            else:
                outcome = f"{name} forgets **{'less' if less else 'more'}**"
            rel = c["relative_reduction"]
            rel_s = f"{100 * rel:.1f}%" if rel is not None else \
                f"{clm.NOT_DEFINED} ({ref} does not forget: F <= 0)"
            lines.append(
                f"- **{name} vs {ref}**, Chaudhry forgetting on test {k} ({unit}, positive = "
                f"forgetting): {pm(c['method'])} vs {pm(c['reference'])} → {outcome}; "
                f"relative reduction 1 − F_{name}/F_{ref} = "
                f"**{rel_s}** (positive = less forgetting). Paired per-seed difference "
                f"{pm(c['paired_difference'])}. The difference "
                f"**{'exceeds' if c['exceeds_seed_spread'] else 'does not exceed'}** the seed "
                "spread (mean ± std intervals "
                f"{'do not overlap' if c['exceeds_seed_spread'] else 'overlap'}).")
    if HEADLINE in agg and "vs_spiking_bptt" in agg[HEADLINE]:
        c = agg[HEADLINE]["vs_spiking_bptt"]["forgetting/loss"]
        if c["defined"]:
            lines.append(
                f"- Same spiking head, Hebbian gating on vs off ({HEADLINE} vs spiking_bptt), "
                f"Chaudhry forgetting on test loss: {pm(c['method'])} vs {pm(c['reference'])}; "
                f"paired difference {pm(c['paired_difference'])}, "
                f"{'exceeds' if c['exceeds_seed_spread'] else 'within'} the seed spread.")
    if HEADLINE in agg and ref in agg and HEADLINE != ref:
        c = agg[HEADLINE]["vs_reference"]["forgetting/loss"]
        if c["defined"] and c["relative_reduction"] is not None:
            rel = 100 * c["relative_reduction"]
            holds = rel >= 30 and c["exceeds_seed_spread"]
            lines.append(
                f"- The seed document claims a 30% reduction in forgetting. Measured here (test "
                f"loss, Chaudhry): {rel:.1f}%"
                f"{'' if c['exceeds_seed_spread'] else ' (within the seed spread)'}: the claim "
                f"is **{'supported' if holds else 'not supported'}** by this run.")
        elif c["defined"]:
            lines.append(
                f"- The seed document claims a 30% reduction in forgetting. Here {ref} itself "
                f"shows no forgetting (Chaudhry F on test loss = {pm(c['reference'])} <= 0: "
                "earlier domains' test loss did not rise above its best), so a relative "
                "reduction is **not defined** and the claim is **not tested** by this run; "
                "a longer per-stage budget (continual.tokens_per_stage) is needed for "
                "fine-tuning to forget.")
    return lines


def report(cfg: RunConfig, runs, agg, energy_info, cache_info, wall, manifest,
           plots: list[str]) -> str:
    c = cfg.continual
    sp = c.eval_split  # "test"; "validation" only in a tuning run
    order = next(iter(runs.values()))[0]["order"]
    first = next(iter(runs.values()))[0]
    L = ["# Continual learning: forgetting across domains", ""]
    if sp != "test":
        L = [f"# TUNING RUN on {sp.upper()} splits (continual.eval_split={sp}): not a result",
             "", f"Every score below is on the {sp} split, to choose hyper-parameters without "
             "looking at test data; results are reported from a normal run on the test "
             "split.", ""]
    L += [f"Domains in training order: {', '.join(order)}; seeds {c.seeds}; "
          f"{c.tokens_per_stage:,} training tokens budgeted per stage "
          f"({c.epochs_per_stage} epoch(s)); batch {cfg.train.batch_size} × "
          f"{cfg.data.block_size} tokens per process, {first.get('processes', 1)} "
          f"process(es); lr {cfg.train.lr}. Scores are on each domain's {sp.upper()} "
          f"split (at most {cfg.data.max_eval_tokens_per_domain} tokens per domain). "
          f"Wall time {wall:.0f} s.", ""]
    L += ["## Methods (equal data order, tokens per stage and seeds)", "",
          "| method | head | model overrides | EWC λ | replay buffer | trainable params | "
          "tokens per stage, first seed (non-padding) |", "|---" * 7 + "|"]
    for m in c.methods:
        if m.name in agg:
            a = agg[m.name]
            L.append(f"| {m.name} | {m.head} | {', '.join(m.model) or '-'} | {m.ewc_lambda} | "
                     f"{m.replay_size} | {a['trainable_parameters']:,} | "
                     f"{', '.join(str(t) for t in a['stage_tokens'][0])} |")
    L += ["", "## Metrics and their signs", ""]
    L += [f"- **{k}**: {v}" for k, v in clm.SIGN_CONVENTIONS.items()]
    L += ["- **learning gain** (loss only, not a GEM metric): mean_j (b[j] − R[j][j]), how "
          f"much each stage lowered its own domain's {sp} loss; forgetting is read against "
          "it.",
          "", "## Results (mean ± std over seeds)", ""]
    for k in ("loss", "accuracy", "perplexity"):
        L += [f"### {sp.capitalize()} {k}", "",
              "| method | ACC | BWT | FWT | forgetting (Chaudhry)"
              + (" | learning gain |" if k == "loss" else " |"),
              "|---" * (6 if k == "loss" else 5) + "|"]
        for name, a in agg.items():
            ms = a["metrics"][k]
            row = (f"| {name} | {pm(ms['ACC'])} | {pm(ms['BWT'])} | {pm(ms['FWT'])} | "
                   f"{pm(ms['forgetting'])} |")
            if k == "loss":
                row += f" {pm(ms['learning_gain'])} |"
            L.append(row)
        L.append("")
    L += ["## Verdict", ""] + verdict(agg, order, sp) + [""]
    L += [f"## R matrices ({sp} loss, mean over seeds; rows: after stage, columns: domain)", ""]
    for name, a in agg.items():
        L += [f"**{name}**", "", "| after | " + " | ".join(order) + " |",
              "|---" * (len(order) + 1) + "|",
              "| untrained | " + " | ".join(f"{v:.3f}" for v in a["baseline_mean"]["loss"])
              + " |"]
        for i, row in enumerate(a["R_mean"]["loss"]):
            L.append(f"| {i + 1}: {order[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        L.append("")
    L += ["## Sparsity and energy (head only)", "",
          "The encoder is the same frozen MiniLM for every method and the tied LM head is the "
          f"same too ({energy_info['lm_head_mac_per_token']:,} MACs per token), so both are "
          "left out; counts are per token, at the final stage, firing rates averaged over "
          f"seeds. Preset {energy_info['preset']}: E_MAC = "
          f"{energy.PRESETS_PJ[energy_info['preset']][0]} pJ, E_AC = "
          f"{energy.PRESETS_PJ[energy_info['preset']][1]} pJ. The spiking head's error path "
          "(W_e e_k) is real-valued, so it counts as MACs; only W_d s_k is spike-driven.", "",
          "| method | domain | firing rate | MACs | synaptic ops | energy (pJ) | all-dense "
          "energy (pJ) |", "|---" * 7 + "|"]
    for name, e in energy_info["methods"].items():
        for dom, v in e["per_domain"].items():
            rate = clm.fmt(v["firing_rate"]) if v["firing_rate"] is not None else "-"
            L.append(f"| {name} | {dom} | {rate} | {v['mac']:,.0f} | {v['sop']:,.0f} | "
                     f"{v['energy_pj']:,.0f} | {v['dense_energy_pj']:,.0f} |")
    L += ["", f"Caveat: {energy_info['caveat']}", ""]
    diag = {n: a["diagnostics"] for n, a in agg.items() if "diagnostics" in a}
    if diag:
        L += ["## PC diagnostics (after the last stage, mean ± std over seeds)", "",
              f"{sp.capitalize()} perplexity against the number of inner steps T used at "
              "evaluation (trained with T = " + ", ".join(
                  f"{n}: {d['trained_time_steps']} (seeds {d['seeds']})" for n, d in diag.items())
              + "); the firing rate is the mean over domains:", "",
              "| method | T | " + " | ".join(order) + " | mean over domains | firing rate |",
              "|---" * (len(order) + 4) + "|"]
        for n, d in diag.items():
            for t, res in sorted(d["by_T"].items(), key=lambda kv: int(kv[0])):
                L.append(f"| {n} | {t} | " + " | ".join(pm(res["perplexity"][o], 2)
                                                         for o in order)
                         + f" | {pm(res['perplexity_domain_mean'], 2)} | "
                         f"{pm(res['firing_rate'])} |")
        L += ["", "PC energy mean_tokens ||e_k||² per inner step k at the trained T (mean over "
              "domains, then mean ± std over seeds):", ""]
        for n, d in diag.items():
            e, sd = d["energy_per_step"]["mean"], d["energy_per_step"]["std"]
            falls = e[-1] < e[0]
            L.append(f"- {n}: " + ", ".join(f"{v:.3f} ± {w:.3f}" for v, w in zip(e, sd,
                                                                               strict=True))
                     + f" (the mean energy {'falls' if falls else 'rises'} from step 1 to "
                     f"step {len(e)}: the prediction error "
                     f"{'shrinks' if falls else 'grows'} over the inner steps)")
        L.append("")
    L += ["## Frozen-encoder feature cache", "",
          f"One cache per domain split, shared by every stage, method and seed: "
          f"{cache_info['blocks_encoded']:,} blocks encoded in "
          f"{cache_info['encoder_seconds']:.1f} s ({cache_info['seconds_per_block'] * 1e3:.1f} "
          f"ms per block, measured); {cache_info['blocks_served_from_cache']:,} more were served "
          f"from the cache. Recomputing every time would cost about "
          f"{cache_info['seconds_without_cache']:.0f} s of encoder time (measured cost per "
          f"block × blocks served): {cache_info['seconds_saved']:.0f} s saved.", ""]
    L += ["## Reproducibility", "",
          f"Commit {manifest['git']['commit']} (uncommitted changes: "
          f"{manifest['git']['dirty']}); "
          f"packages: " + ", ".join(f"{k} {v}" for k, v in manifest["packages"].items())
          + ". Full config and seeds in manifest.json.", ""]
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(L)


# ---- plots ----------------------------------------------------------------------------------
def make_plots(out: Path, runs: dict, agg: dict, order: list[str],
               split: str = "test") -> list[str]:
    names = list(agg)
    files = []
    for k in ("loss", "accuracy"):
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
        for ax, n in zip(axes[0], names, strict=True):
            R = np.array(agg[n]["R_mean"][k])
            ax.imshow(R, cmap="viridis_r" if k == "loss" else "viridis")
            for i in range(len(order)):
                for j in range(len(order)):
                    ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="w")
            ax.set_xticks(range(len(order)), order, rotation=45, fontsize=7)
            ax.set_yticks(range(len(order)), [f"after {o}" for o in order], fontsize=7)
            ax.set_title(n, fontsize=8)
        fig.suptitle(f"R[stage][domain]: {split} {k} (mean over seeds)")
        fig.tight_layout()
        fig.savefig(out / f"R_{k}.png", dpi=110)
        plt.close(fig)
        files.append(f"R_{k}.png")

        fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order), 3.2), squeeze=False)
        x = np.arange(len(order) + 1)
        for j, (ax, dom) in enumerate(zip(axes[0], order, strict=True)):
            for n in names:
                ys = np.array([[r["baseline"][k][j]] + [row[j] for row in r["R"][k]]
                               for r in runs[n]])  # (seeds, T + 1)
                m, s = ys.mean(0), ys.std(0)
                ax.plot(x, m, marker="o", label=n)
                ax.fill_between(x, m - s, m + s, alpha=0.15)
            ax.axvline(j + 1, color="grey", ls=":", lw=1)
            ax.set_xticks(x, ["init"] + [o[:6] for o in order], fontsize=7)
            ax.set_title(f"{dom} (trained at stage {j + 1})", fontsize=8)
            ax.set_ylabel(f"{split} {k}", fontsize=8)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"curves_{k}.png", dpi=110)
        plt.close(fig)
        files.append(f"curves_{k}.png")

    if len(order) >= 2:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, k in zip(axes, ("loss", "accuracy"), strict=True):
            ms = [agg[n]["metrics"][k]["forgetting"] for n in names]
            ax.bar(range(len(names)), [m["mean"] for m in ms], yerr=[m["std"] for m in ms],
                   capsize=4, color="tab:red", alpha=0.7)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
            ax.set_title(f"Chaudhry forgetting, {split} {k} (mean ± std over seeds)",
                         fontsize=8)
            ax.axhline(0, color="k", lw=0.5)
        fig.tight_layout()
        fig.savefig(out / "forgetting.png", dpi=110)
        plt.close(fig)
        files.append("forgetting.png")

    diag = {n: a["diagnostics"] for n, a in agg.items() if "diagnostics" in a}
    if diag:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for n, d in diag.items():
            e = np.array(d["energy_per_step"]["mean"])
            es = np.array(d["energy_per_step"]["std"])
            k = np.arange(1, len(e) + 1)
            axes[0].errorbar(k, e, yerr=es, marker="o", capsize=3,
                             label=f"{n} ({len(d['seeds'])} seeds)")
            ts = sorted(int(t) for t in d["by_T"])
            ppl = [d["by_T"][str(t)]["perplexity_domain_mean"] for t in ts]
            axes[1].errorbar(ts, [p["mean"] for p in ppl], yerr=[p["std"] for p in ppl],
                             marker="o", capsize=3, label=n)
        axes[0].set_xlabel("inner step k")
        axes[0].set_ylabel("PC energy mean ||e_k||²")
        axes[0].set_title(f"PC energy per inner step ({split}, mean over domains; "
                          "mean ± std over seeds)", fontsize=8)
        axes[1].set_xlabel("T (inner steps at evaluation)")
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_ylabel(f"{split} perplexity (mean over domains)")
        axes[1].set_title("perplexity against T (trained model, mean ± std over seeds)",
                          fontsize=8)
        for ax in axes:
            ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "pc_diagnostics.png", dpi=110)
        plt.close(fig)
        files.append("pc_diagnostics.png")
    return files


# ---- manifest -------------------------------------------------------------------------------
def manifest(cfg: RunConfig, argv, order) -> dict:
    """The shared run manifest (git, packages, machine) plus what this evaluation varied."""
    return run_manifest(seeds=cfg.continual.seeds, domain_order=order, argv=list(argv),
                        config=cfg.to_dict(), packages=package_versions(PACKAGES))


# ---- main -----------------------------------------------------------------------------------
def score_checkpoint(cfg, args, accelerator, stream, tokenizer) -> int:
    from transformers import AutoModelForCausalLM

    folder = Path(args.checkpoint)
    if not (folder / "config.json").is_file():
        raise DataError(f"--checkpoint '{folder}' is not a saved model folder (no config.json)")
    check_checkpoint_tokenizer(folder, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder)
    row = evaluate_row(model, stream, accelerator, cfg.train.batch_size)
    if accelerator.is_main_process:
        out = Path(cfg.output_dir) / "checkpoint_row.json"
        write_json_atomic(out, {"checkpoint": str(folder), "split": stream.eval_split,
                                "row": row})
        print(", ".join(f"{d} loss {r['loss']:.4f}" for d, r in row.items()), f"\nwrote {out}")
    return 0


def report_only(cfg: RunConfig, argv, order, encoder_path) -> int:
    import json

    path = Path(cfg.output_dir) / "continual.json"
    if not path.is_file():
        raise DataError(f"--report-only: '{path}' does not exist (config key 'output_dir')")
    data = json.loads(path.read_text())
    if not data.get("runs"):
        raise DataError(f"--report-only: '{path}' holds no finished run yet")
    # the split the run scored, whatever the config now says (older files: test)
    cfg = dataclasses.replace(cfg, continual=dataclasses.replace(
        cfg.continual, eval_split=data.get("eval_split", "test")))
    cache = data.get("feature_cache") or {
        "blocks_encoded": 0, "encoder_seconds": 0.0, "seconds_per_block": 0.0,
        "blocks_served_from_cache": 0, "seconds_without_cache": 0.0, "seconds_saved": 0.0}
    write_outputs(cfg, argv, Path(cfg.output_dir), data["runs"], cache,
                  data.get("test_train_overlap_blocks"), data.get("wall_seconds", 0.0),
                  bool(data.get("complete")), data["runs"][next(iter(data["runs"]))][0]["order"],
                  encoder_path)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        c = cfg.continual
        order = c.order or [d.name for d in cfg.data.domains]
        if not c.methods and args.checkpoint is None:
            raise ConfigError("config key 'continual.methods': list at least one method")
        method_models = [method_model_config(cfg, i) for i in range(len(c.methods))]
        encoder_path = resolve_trunk(cfg.model.encoder, cfg.data.cache_dir).path
        if args.report_only:
            return report_only(cfg, argv, order, encoder_path)
        tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        data_cfg = dataclasses.replace(
            cfg.data, domains=[d for d in cfg.data.domains if d.name in order])
        with accelerator.main_process_first():
            built = {d.name: d for d in build_corpora(data_cfg, tokenizer,
                                                      accelerator.is_local_main_process)}
        blk, d = cfg.data.block_size, cfg.data
        stream = Stream.build(
            order,
            {n: subsample(built[n].splits["train"], d.max_train_tokens_per_domain, blk,
                          d.subsample_seed)
             for n in order},
            {n: subsample(built[n].splits[c.eval_split], d.max_eval_tokens_per_domain, blk,
                          d.subsample_seed) for n in order},
            c.tokens_per_stage, cache=cfg.train.cache_features, eval_split=c.eval_split)
        if args.checkpoint is not None:
            return score_checkpoint(cfg, args, accelerator, stream, tokenizer)
        batches_per_stage(c, cfg.train.batch_size, blk, accelerator.num_processes)
    except (ConfigError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator.print(format_report([built[n] for n in order]))
    if len(order) < 2:
        accelerator.print("note: a single-domain sequence: BWT, FWT and forgetting are not "
                          "defined (reported as 'not defined')")
    if c.eval_split != "test":
        accelerator.print(f"note: TUNING RUN: every score is on the {c.eval_split.upper()} "
                          "split (continual.eval_split); report results from a test run")
    overlap = stream.overlap()
    tracker = Tracker(cfg, "continual", out, accelerator.is_main_process and not args.no_wandb)
    wb_step = 0
    runs: dict[str, list[dict]] = {}
    # seeds outer: an interrupted run still holds complete seeds of every method
    for seed in c.seeds:
        for method, mcfg in zip(c.methods, method_models, strict=True):
            set_seed(seed)
            model = HybridForCausalLM.from_encoder(cfg.model.encoder, cfg.data.cache_dir,
                                                   **model_kwargs(mcfg))
            if mcfg.head in SPIKING_HEADS and mcfg.dictionary_init == "data":
                first = order[0]  # the data the sequence starts with, as a fresh run would
                model.head.init_from_data(sample_states(
                    model, stream.train[first], (stream.train_caches or {}).get(first),
                    8 * mcfg.n_neurons, seed))

            def log(row, name=method.name, seed=seed):
                nonlocal wb_step
                wb_step += 1
                flat = {f"{name}/seed{seed}/{c.eval_split}_loss/{dom}": r["loss"]
                        for dom, r in row["row"].items()}
                flat |= {f"{name}/seed{seed}/train_loss": row["train_loss"],
                         f"{name}/seed{seed}/stage": row["stage"]}
                tracker.log({k: v for k, v in flat.items() if v is not None}, wb_step)

            res = run_sequence(model, method, stream, c, cfg.train, seed, accelerator,
                               diagnostics=True, log=log)
            runs.setdefault(method.name, []).append(res)
            accelerator.print(f"[{method.name} seed {seed}] done in "
                              f"{sum(res['seconds'].values()):.0f} s "
                              f"({time.perf_counter() - start:.0f} s since start)")
            del model
            if accelerator.is_main_process:  # partial results survive an interruption
                write_json_atomic(out / "continual.json", {
                    "complete": False, "eval_split": c.eval_split, "runs": runs,
                    "feature_cache": stream_cache_info(stream),
                    "test_train_overlap_blocks": overlap,
                    "wall_seconds": time.perf_counter() - start})

    write_outputs(cfg, argv, out, runs, stream_cache_info(stream, accelerator), overlap,
                  time.perf_counter() - start, True, order, encoder_path, accelerator, tracker,
                  wb_step)
    return 0


def stream_cache_info(stream: Stream, accelerator=None) -> dict:
    """The feature caches' accounting, summed over processes (each caches its own shard)."""
    if stream.train_caches:
        info = stream.cache_summary()
        if accelerator is not None and accelerator.num_processes > 1:
            keys = ("encoder_seconds", "blocks_encoded", "blocks_served_from_cache")
            tot = accelerator.reduce(torch.tensor([float(info[k]) for k in keys],
                                                  device=accelerator.device), "sum").tolist()
            spent, misses, hits = tot
            per_block = spent / misses if misses else 0.0
            info = {"encoder_seconds": spent, "blocks_encoded": int(misses),
                    "blocks_served_from_cache": int(hits), "seconds_per_block": per_block,
                    "seconds_without_cache": per_block * (hits + misses),
                    "seconds_saved": per_block * hits,
                    "processes": accelerator.num_processes}
        return info
    return {"blocks_encoded": 0, "encoder_seconds": 0.0, "seconds_per_block": 0.0,
            "blocks_served_from_cache": 0, "seconds_without_cache": 0.0, "seconds_saved": 0.0}


def write_outputs(cfg, argv, out, runs, cache_info, overlap, wall, complete, order,
                  encoder_path, accelerator=None, tracker=None, wb_step=0) -> None:
    """Aggregate, then write continual.json, manifest.json, continual.md and the plots."""
    from transformers import AutoConfig

    agg = aggregate(runs)
    tokens = {n: a["stage_token_slots"] for n, a in agg.items()}
    equal_tokens = len({str(v) for v in tokens.values()}) == 1
    enc = AutoConfig.from_pretrained(encoder_path)
    energy_info = energy_table(cfg, runs, agg, enc.hidden_size, enc.vocab_size)
    man = manifest(cfg, argv, order)
    if "--report-only" in argv and (out / "manifest.json").is_file():
        import json

        # the run's own manifest stays; only note that the report was rebuilt
        man = json.loads((out / "manifest.json").read_text()) | {"report_rebuilt_with": argv}
    result = {"complete": complete, "eval_split": cfg.continual.eval_split,
              "processes": next(iter(runs.values()))[0].get("processes", 1),
              "order": order, "seeds": cfg.continual.seeds,
              "sign_conventions": clm.SIGN_CONVENTIONS, "equal_tokens_across_methods":
              equal_tokens, "test_train_overlap_blocks": overlap,
              "runs": runs, "aggregate": agg, "energy": energy_info, "feature_cache": cache_info,
              "wall_seconds": wall}
    if accelerator is None or accelerator.is_main_process:
        plots = make_plots(out, runs, agg, order, cfg.continual.eval_split)
        write_json_atomic(out / "continual.json", result)
        write_json_atomic(out / "manifest.json", man)
        md = report(cfg, runs, agg, energy_info, cache_info, wall, man, plots)
        if not complete:
            done = ", ".join(f"{n}: {len(rs)}" for n, rs in runs.items())
            md = md.replace("\n", f"\n\n**PARTIAL RUN** (interrupted; seeds completed per "
                            f"method: {done}); numbers below cover those seeds only.\n", 1)
        if not equal_tokens:
            md += f"\n**Warning**: methods did not see equal tokens per stage: {tokens}\n"
        write_text_atomic(out / "continual.md", md)
        if tracker is not None and tracker.run is not None:
            import wandb

            summary = {f"{n}/{k}/{m}/{s}": v for n, a in agg.items()
                       for k, ms in a["metrics"].items() for m, st in ms.items()
                       for s, v in st.items() if v is not None and s != "n"}
            tracker.summary(summary)
            tracker.log({f"plots/{p[:-4]}": wandb.Image(str(out / p)) for p in plots},
                        wb_step + 1)
        print("\n".join(verdict(agg, order, cfg.continual.eval_split)))
        print(f"\nwrote {out / 'continual.md'}, continual.json, manifest.json and "
              f"{len(plots)} plots ({wall:.0f} s of run time)")
    if tracker is not None:
        tracker.finish()

if __name__ == "__main__":
    sys.exit(main())
