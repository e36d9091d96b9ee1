"""The continual-learning results over seeds and their report: per method the R matrices,
metrics and retention as mean ± std, paired comparisons (with fine-tuning, with the k-WTA
control, gate on against off), the plain-language verdict on the 30% claim, the operations
and energy table, the report text, the plots, the manifest and the model-card summary, and
`write_outputs`, which writes them all to the output folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hybridlm import energy
from hybridlm.config import RunConfig
from hybridlm.continual import metrics as clm
from hybridlm.continual.loop import SCORES
from hybridlm.continual.methods import method_model_config
from hybridlm.continual.stream import Stream
from hybridlm.heads import mlp_hidden
from hybridlm.io import write_json_atomic, write_text_atomic
from hybridlm.manifest import PACKAGES as MANIFEST_PACKAGES
from hybridlm.manifest import package_versions, run_manifest
from hybridlm.modeling import HybridConfig, model_kwargs

REFERENCE = "finetune"  # plain fine-tuning: every method is compared with it
CONTROL = "kwta"  # the sparse, non-spiking control: every method is compared with it too
HEADLINE = "spiking_hybrid_gated"  # the default layer and learning mode: the claim's subject
CLAIM = 0.30  # the seed document: 30% less catastrophic forgetting from the gate
PACKAGES = MANIFEST_PACKAGES + ("matplotlib", "pyyaml")  # the report plots and reads YAML


# ---- aggregation ----------------------------------------------------------------------------
def learning_gain(R, b) -> float:
    """mean_j (b[j] - R[j][j]) for a loss: how much each stage improved its own domain (not a
    GEM/Chaudhry metric; read forgetting against it: a head that learns little forgets little)."""
    return sum(b[j] - R[j][j] for j in range(len(R))) / len(R)


def finished(rs: list[dict]) -> list[dict]:
    """The runs whose every stage finished (a run stopped by a non-finite loss is reported
    apart, with the rows it has)."""
    return [r for r in rs if "failed" not in r]


def per_run(r: dict, quantity: str) -> float | None:
    """One number of a run, by name: 'forgetting/<score>', 'ACC/<score>', 'BWT/<score>',
    'learning_gain/<score>' (lower-is-better scores), 'retention_change/<score>' (final minus
    untrained on the retention text; positive = worse for a loss)."""
    what, score = quantity.split("/")
    if what == "learning_gain":
        if r.get("joint"):  # its one stage trains every domain: the gain on all of them
            return float(np.mean(np.array(r["baseline"][score]) - np.array(r["final"][score])))
        return learning_gain(r["R"][score], r["baseline"][score])
    if what == "retention_change":
        ret = r.get("retention")
        return None if ret is None else ret[score][-1] - ret[score][0]
    return r["metrics"][score][what]


COMPARED = ("forgetting/bits_per_char", "forgetting/loss", "learning_gain/bits_per_char",
            "ACC/bits_per_char", "retention_change/bits_per_char")


def paired(runs: dict, name: str, ref: str) -> dict:
    """`name` against `ref` on every COMPARED quantity, seeds paired."""
    by_seed = {r["seed"]: r for r in finished(runs[ref])}
    pairs = [(r, by_seed[r["seed"]]) for r in finished(runs[name]) if r["seed"] in by_seed]
    return {"reference": ref} | {q: clm.compare([per_run(x, q) for x, _ in pairs],
                                                [per_run(y, q) for _, y in pairs])
                                 for q in COMPARED}


def gate_pairs(names) -> list[tuple[str, str]]:
    """(gated, ungated) method pairs: `<name>_gated` against `<name>`, the same head and
    learning mode with the neuromodulatory gate on and off."""
    return [(n, n[: -len("_gated")]) for n in names
            if n.endswith("_gated") and n[: -len("_gated")] in names]


def aggregate_diagnostics(rs: list[dict], order: list[str]) -> dict | None:
    """Energy-based heads, every seed that has them: per T (inner steps at evaluation, no
    retraining) the test bits per character, perplexity, firing rate, spikes per token,
    settled energy F_T / F_0 and code density, each averaged over domains, mean ± std."""
    rs = [r for r in rs if "diagnostics" in r]
    if not rs:
        return None
    ts = sorted({int(t) for r in rs for t in r["diagnostics"]["by_T"]})
    by_t = {}
    for t in ts:
        res = [r["diagnostics"]["by_T"][str(t)] for r in rs if str(t) in r["diagnostics"]["by_T"]]
        by_t[str(t)] = {key: clm.mean_std([float(np.mean([x[o][key] for o in order]))
                                           for x in res])
                        for key in ("bits_per_char", "perplexity", "firing_rate",
                                    "spikes_per_token", "relative_energy", "active_fraction")
                        if key in res[0][order[0]]}
    return {"seeds": [r["seed"] for r in rs],
            "trained_time_steps": rs[0]["diagnostics"]["trained_time_steps"], "by_T": by_t}


def aggregate(runs: dict[str, list[dict]]) -> dict:
    """Per method (finished runs only): R, the final row (joint) and the retention scores
    mean/std per score, metrics mean/std over seeds, layer statistics, and paired
    comparisons with fine-tuning, with the k-WTA control and (gated methods) with the same
    method without the gate."""
    agg = {}
    for name, all_rs in runs.items():
        rs = finished(all_rs)
        a = {"seeds": [r["seed"] for r in rs], "joint": bool(all_rs[0].get("joint")),
             "failed": [r["failed"] | {"seed": r["seed"]} for r in all_rs if "failed" in r],
             "trainable_parameters": all_rs[0]["trainable_parameters"]}
        agg[name] = a
        if not rs:
            continue
        a["baseline_mean"] = {k: np.mean([r["baseline"][k] for r in rs], 0).tolist()
                              for k in SCORES}
        a["metrics"] = {k: {m: clm.mean_std([r["metrics"][k][m] for r in rs])
                            for m in ("ACC", "BWT", "FWT", "forgetting")} for k in SCORES}
        for k in ("loss", "bits_per_char"):
            a["metrics"][k]["learning_gain"] = clm.mean_std(
                [per_run(r, f"learning_gain/{k}") for r in rs])
        if a["joint"]:
            a["final_mean"] = {k: np.mean([r["final"][k] for r in rs], 0).tolist()
                               for k in SCORES}
        else:
            a["R_mean"], a["R_std"] = {}, {}
            for k in SCORES:
                stack = np.array([r["R"][k] for r in rs])  # (seeds, T, T)
                a["R_mean"][k] = stack.mean(0).tolist()
                a["R_std"][k] = (stack.std(0, ddof=1) if len(rs) > 1 else 0 * stack[0]).tolist()
        if "retention" in rs[0]:
            a["retention"] = {}
            for k in SCORES:
                stack = np.array([r["retention"][k] for r in rs])  # (seeds, stages + 1)
                a["retention"][k] = {"mean": stack.mean(0).tolist(), "std": (
                    stack.std(0, ddof=1) if len(rs) > 1 else 0 * stack[0]).tolist()}
                a["metrics"][k]["retention_change"] = clm.mean_std(
                    [per_run(r, f"retention_change/{k}") for r in rs])
        for key in ("firing_rate", "active_fraction", "relative_energy", "spikes_per_token"):
            if key in rs[0]:  # final row, mean over domains
                a[f"{key}_final"] = clm.mean_std([float(np.mean(r[key][-1])) for r in rs])
        a["stage_tokens"] = [[s["tokens"] for s in r["stages"]] for r in rs]  # non-padding
        a["stage_token_slots"] = [[s["token_slots"] for s in r["stages"]] for r in rs]
        a["seconds"] = sum(sum(r["seconds"].values()) for r in rs)
        diag = aggregate_diagnostics(rs, rs[0]["order"])
        if diag is not None:
            a["diagnostics"] = diag
    done = [n for n in runs if finished(runs[n])]
    ref = REFERENCE if REFERENCE in done else (done[0] if done else None)
    for name in done:
        if ref is not None:
            agg[name]["vs_reference"] = paired(runs, name, ref)
        if CONTROL in done:
            agg[name]["vs_kwta"] = paired(runs, name, CONTROL)
    for gated, ungated in gate_pairs(done):
        agg[gated]["vs_ungated"] = paired(runs, gated, ungated)
    return agg


def energy_table(cfg: RunConfig, runs: dict, agg: dict, d_model: int, vocab: int) -> dict:
    """Per method, per domain (final stage, mean over seeds): ops and energy per token."""
    out = {"preset": cfg.continual.energy_preset, "caveat": energy.CAVEAT,
           "lm_head_mac_per_token": energy.lm_head_macs(d_model, vocab), "methods": {}}
    for i, m in enumerate(cfg.continual.methods):
        rs = finished(runs.get(m.name, []))
        if not rs:
            continue
        mc = method_model_config(cfg, i)
        hidden = mlp_hidden(mc.head, d_model, HybridConfig(**model_kwargs(mc)))
        key = energy.RATE_STAT.get(mc.head, "firing_rate")
        per_domain = {}
        for j, dom in enumerate(rs[0]["order"]):
            rate = float(np.mean([r[key][-1][j] for r in rs])) if key in rs[0] else None
            ops = energy.head_ops(mc.head, d_model, mc.n_neurons, mc.time_steps, hidden, rate)
            per_domain[dom] = {"rate": rate} | ops | energy.energy_pj(
                ops, cfg.continual.energy_preset)
        out["methods"][m.name] = {"head": mc.head, "time_steps": mc.time_steps,
                                  "n_neurons": mc.n_neurons, "mlp_hidden": hidden,
                                  "per_domain": per_domain}
    return out


# ---- report ---------------------------------------------------------------------------------
def pm(ms: dict, digits: int = 4) -> str:
    if ms is None or ms["mean"] is None:
        return clm.NOT_DEFINED
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


def rel_s(c: dict) -> str:
    """1 - a/b as '30.0% less' or '12.0% more' (forgetting), or 'not defined'."""
    r = c.get("relative_reduction")
    if r is None:
        return clm.NOT_DEFINED
    return f"{100 * r:.1f}% less" if r >= 0 else f"{-100 * r:.1f}% more"


def spread_s(c: dict) -> str:
    if c["method"]["n"] < 2:
        return "one seed, so no spread to judge it by"
    return "exceeds the seed spread" if c["exceeds_seed_spread"] else "within the seed spread"


def beyond_spread(c: dict | None) -> bool:
    """Defined, at least two seeds, and the mean ± std intervals do not overlap."""
    return bool(c and c["defined"] and c["method"]["n"] >= 2 and c["exceeds_seed_spread"])


def comparison_line(label: str, c: dict, unit: str) -> str:
    if not c["defined"]:
        return f"- {label}: {clm.NOT_DEFINED}."
    return (f"- {label}: {pm(c['method'])} vs {pm(c['reference'])} {unit}; paired difference "
            f"{pm(c['paired_difference'])}, {spread_s(c)}; 1 − a/b: **{rel_s(c)}**.")


def verdict(agg: dict, order: list[str], split: str = "test") -> list[str]:
    """The plain-language answers: does fine-tuning forget, does the spiking layer forget less
    than fine-tuning and than the k-WTA control (and learn as much), does the gate reduce
    forgetting, and does the 30% claim hold. Forgetting is Chaudhry's on bits per character."""
    if split != "test":
        return [f"**Tuning run on {split.upper()} splits: no verdict.** Claims are judged on "
                "the test split only; this run exists to choose a hyper-parameter."]
    if len(order) < 2:
        return ["With a single-domain sequence BWT, FWT and forgetting are **not defined** "
                "(no earlier stage to forget); only ACC is reported."]
    done = {n: a for n, a in agg.items() if a.get("metrics")}
    if REFERENCE not in done:
        return [f"No finished `{REFERENCE}` run: nothing to compare with."]
    f_ref = done[REFERENCE]["metrics"]["bits_per_char"]["forgetting"]
    lines = [f"- Fine-tuning (`{REFERENCE}`) forgets {pm(f_ref)} bits/char (Chaudhry, mean "
             "over earlier domains; positive = forgetting)"
             + (" — **it does not forget on this budget**, so a relative reduction means "
                "nothing here." if f_ref["mean"] is not None and f_ref["mean"] <= 0 else ".")]
    for name, a in done.items():
        if name == REFERENCE or a["joint"]:
            continue
        c = a["vs_reference"]["forgetting/bits_per_char"]
        g = a["vs_reference"]["learning_gain/bits_per_char"]
        if not c["defined"]:
            continue
        less = c["method"]["mean"] < c["reference"]["mean"]
        learns = ("learns less" if g["defined"] and g["method"]["mean"] < g["reference"]["mean"]
                  else "learns as much or more")
        lines.append(
            f"- `{name}` forgets **{'less' if less else 'more'}** than fine-tuning "
            f"({pm(c['method'])} vs {pm(c['reference'])}, {rel_s(c)}, "
            f"{spread_s(c)}) and {learns} (learning gain {pm(g['method'])} vs "
            f"{pm(g['reference'])} bits/char).")
    if HEADLINE in done and CONTROL in done:
        lines.append(comparison_line(
            f"`{HEADLINE}` vs the k-WTA control `{CONTROL}`, forgetting",
            done[HEADLINE]["vs_kwta"]["forgetting/bits_per_char"], "bits/char"))
    for gated, ungated in gate_pairs(list(done)):
        lines.append(comparison_line(f"Gate on vs off (`{gated}` vs `{ungated}`), forgetting",
                                     done[gated]["vs_ungated"]["forgetting/bits_per_char"],
                                     "bits/char"))
    if HEADLINE in done:
        vs_ft = done[HEADLINE]["vs_reference"]["forgetting/bits_per_char"]
        vs_gate = (done[HEADLINE].get("vs_ungated") or {}).get("forgetting/bits_per_char")
        ok_ft = beyond_spread(vs_ft) and (vs_ft["relative_reduction"] or -1) >= CLAIM
        ok_gate = beyond_spread(vs_gate) and (vs_gate["relative_reduction"] or -1) >= CLAIM

        def against(c, what):
            if not (c and c["defined"]):
                return f"against {what}: not measured"
            if c["relative_reduction"] is None:
                return (f"against {what}: no relative reduction is defined ({what} does not "
                        f"forget; paired difference {pm(c['paired_difference'])} bits/char)")
            return (f"against {what}: {rel_s(c)} forgetting ({spread_s(c)}; paired "
                    f"difference {pm(c['paired_difference'])} bits/char)")

        lines.append(
            f"- **The claim** (a {100 * CLAIM:.0f}% reduction in catastrophic forgetting from "
            "dopamine-like gating when fine-tuning across heterogeneous domains), measured "
            f"for `{HEADLINE}`: {against(vs_ft, 'fine-tuning')}; "
            f"{against(vs_gate, 'the same layer without the gate')}. It **"
            f"{'holds' if ok_ft and ok_gate else 'does not hold'}** here (it needs at least "
            f"{100 * CLAIM:.0f}% less forgetting, beyond the seed spread, in both).")
    joint = [n for n, a in done.items() if a["joint"]]
    if joint:
        j = done[joint[0]]["metrics"]["bits_per_char"]["ACC"]
        best = min((n for n, a in done.items() if not a["joint"]),
                   key=lambda n: done[n]["metrics"]["bits_per_char"]["ACC"]["mean"])
        lines.append(f"- Upper bound: joint training on every domain at once ends at ACC "
                     f"{pm(j)} bits/char; the best sequential method is `{best}` "
                     f"({pm(done[best]['metrics']['bits_per_char']['ACC'])}).")
    return lines


def method_table(c, agg) -> list[str]:
    L = ["| method | head | model overrides | EWC λ | replay buffer | DER++ α | joint | "
         "trainable params | tokens per sequence, first seed (non-padding) |", "|---" * 9 + "|"]
    for m in c.methods:
        if m.name in agg and agg[m.name].get("stage_tokens"):
            a = agg[m.name]
            L.append(f"| {m.name} | {m.head} | {', '.join(m.model) or '-'} | {m.ewc_lambda} | "
                     f"{m.replay_size} | {m.der_alpha} | {'yes' if m.joint else '-'} | "
                     f"{a['trainable_parameters']:,} | {sum(a['stage_tokens'][0]):,} |")
    return L


def report(cfg: RunConfig, runs, agg, energy_info, cache_info, wall, manifest,
           plots: list[str]) -> str:
    c = cfg.continual
    sp = c.eval_split  # "test"; "validation" only in a tuning run
    first = next(iter(runs.values()))[0]
    order = first["order"]
    done = {n: a for n, a in agg.items() if a.get("metrics")}
    L = ["# Continual learning: forgetting across domains", ""]
    if sp != "test":
        L = [f"# TUNING RUN on {sp.upper()} splits (continual.eval_split={sp}): not a result",
             "", f"Every score below is on the {sp} split, to choose hyper-parameters without "
             "looking at test data; results are reported from a normal run on the test "
             "split.", ""]
    L += [f"Trunk `{cfg.model.encoder}` (frozen; every head starts as the identity, so the "
          "untrained row is the trunk alone). Domains in training order: "
          f"{', '.join(order)}; seeds {c.seeds}; {c.tokens_per_stage:,} training tokens "
          f"budgeted per stage ({c.epochs_per_stage} epoch(s)); batch "
          f"{cfg.train.batch_size} × {cfg.data.block_size} tokens per process, "
          f"{first.get('processes', 1)} process(es); lr {cfg.train.lr}. Scores are on each "
          f"domain's {sp.upper()} split (at most {cfg.data.max_eval_tokens_per_domain} tokens "
          f"per domain). Wall time {wall:.0f} s.", ""]
    if c.retention is not None:
        L += [f"Retention text: `{c.retention.name}` ({c.retention.source}), its {sp} split, "
              "scored before the first stage and after every stage. It is in none of the "
              "training domains: a head that adapts to the domains by breaking what the "
              "trunk knew about ordinary text shows here.", ""]
    L += ["## Methods (equal data order, tokens per sequence and seeds)", ""] + \
        method_table(c, agg)
    L += ["", "## Metrics and their signs", ""]
    L += [f"- **{k}**: {v}" for k, v in clm.SIGN_CONVENTIONS.items()]
    L += ["- **learning gain**: mean_j (b[j] − R[j][j]), how much each stage lowered its own "
          f"domain's {sp} score (joint: the mean gain at the end); forgetting is read "
          "against it: a head that learns little forgets little.",
          "- **retention Δ**: the retention text's score after the last stage minus before "
          "the first (positive = the trunk's general ability got worse).",
          "- **code density**: the share of units with a non-zero code after inference "
          "(spiking layer: neurons with r > 0; k-WTA: units that pass).", "",
          "## Verdict", ""] + verdict(agg, order, sp) + [""]
    L += ["## Results (bits per character, mean ± std over seeds)", "",
          "| method | ACC | BWT | FWT | forgetting | learning gain | retention Δ | code "
          "density |", "|---" * 8 + "|"]
    for name, a in done.items():
        ms = a["metrics"]["bits_per_char"]
        dens = pm(a["active_fraction_final"]) if "active_fraction_final" in a else "-"
        L.append(f"| {name} | {pm(ms['ACC'])} | {pm(ms['BWT'])} | {pm(ms['FWT'])} | "
                 f"{pm(ms['forgetting'])} | {pm(ms['learning_gain'])} | "
                 f"{pm(ms.get('retention_change'))} | {dens} |")
    L.append("")
    for k in ("loss", "accuracy", "perplexity"):
        L += [f"### {sp.capitalize()} {k}", "",
              "| method | ACC | BWT | FWT | forgetting (Chaudhry) |", "|---" * 5 + "|"]
        for name, a in done.items():
            ms = a["metrics"][k]
            L.append(f"| {name} | {pm(ms['ACC'])} | {pm(ms['BWT'])} | {pm(ms['FWT'])} | "
                     f"{pm(ms['forgetting'])} |")
        L.append("")
    for key, title in (("vs_reference", f"against fine-tuning (`{REFERENCE}`)"),
                       ("vs_kwta", f"against the k-WTA control (`{CONTROL}`)"),
                       ("vs_ungated", "gate on against gate off (same head and mode)")):
        rows = [(n, a[key]) for n, a in done.items() if key in a and a[key]["reference"] != n]
        if not rows:
            continue
        L += [f"## Paired differences {title}", "",
              "Per seed, method minus reference (bits/char); **bold** where the two "
              "mean ± std intervals do not overlap.", "",
              "| method | reference | forgetting | learning gain | ACC | retention Δ |",
              "|---" * 6 + "|"]
        for n, v in rows:
            cells = []
            for q in ("forgetting/bits_per_char", "learning_gain/bits_per_char",
                      "ACC/bits_per_char", "retention_change/bits_per_char"):
                x = v[q]
                s = pm(x["paired_difference"]) if x["defined"] else clm.NOT_DEFINED
                cells.append(f"**{s}**" if beyond_spread(x) else s)
            L.append(f"| {n} | {v['reference']} | " + " | ".join(cells) + " |")
        L.append("")
    L += [f"## R matrices ({sp} bits per character, mean over seeds; rows: after stage, "
          "columns: domain)", ""]
    for name, a in done.items():
        L += [f"**{name}**", "", "| after | " + " | ".join(order) + " | retention |",
              "|---" * (len(order) + 2) + "|"]
        ret = a.get("retention", {}).get("bits_per_char")
        rv = [f"{v:.4f}" for v in ret["mean"]] if ret else ["-"] * (len(order) + 1)
        L.append("| untrained | " + " | ".join(
            f"{v:.4f}" for v in a["baseline_mean"]["bits_per_char"]) + f" | {rv[0]} |")
        rows = [a["final_mean"]["bits_per_char"]] if a["joint"] else a["R_mean"]["bits_per_char"]
        labels = ["all domains at once"] if a["joint"] else [f"{i + 1}: {o}"
                                                             for i, o in enumerate(order)]
        for i, row in enumerate(rows):
            L.append(f"| {labels[i]} | " + " | ".join(f"{v:.4f}" for v in row)
                     + f" | {rv[i + 1]} |")
        L.append("")
    failed = [(n, f) for n, a in agg.items() for f in a["failed"]]
    if failed:
        L += ["## Runs stopped by a non-finite loss", "",
              "Their finished stages are in continual.json (`rows`); they are left out of "
              "every mean above.", ""]
        L += [f"- {n}, seed {f['seed']}: stage {f['stage']} ({f['domain']}): {f['message']}"
              for n, f in failed]
        L.append("")
    L += ["## Operations and energy per token (head only, final stage)", "",
          f"The trunk and its LM head are the same for every method "
          f"({energy_info['lm_head_mac_per_token']:,} MACs per token in the LM head), so "
          f"they are left out. Preset {energy_info['preset']}: E_MAC = "
          f"{energy.PRESETS_PJ[energy_info['preset']][0]} pJ, E_AC = "
          f"{energy.PRESETS_PJ[energy_info['preset']][1]} pJ. Rate: the spiking layer's "
          "firing rate per neuron and step, or the k-WTA head's share of passing units.", "",
          "| method | domain | rate | MACs | synaptic ops | energy (pJ) | all-dense energy "
          "(pJ) |", "|---" * 7 + "|"]
    for name, e in energy_info["methods"].items():
        for dom, v in e["per_domain"].items():
            rate = clm.fmt(v["rate"]) if v["rate"] is not None else "-"
            L.append(f"| {name} | {dom} | {rate} | {v['mac']:,.0f} | {v['sop']:,.0f} | "
                     f"{v['energy_pj']:,.0f} | {v['dense_energy_pj']:,.0f} |")
    L += ["", f"Caveat: {energy_info['caveat']}", ""]
    diag = {n: a["diagnostics"] for n, a in done.items() if "diagnostics" in a}
    if diag:
        L += ["## The layer after the last stage, against T (mean over domains, mean ± std "
              "over seeds)", "",
              f"Scored with T inner steps at evaluation, without retraining ({sp} split).", "",
              "| method | T | bits/char | firing rate | spikes per token | F_T / F_0 | code "
              "density |", "|---" * 7 + "|"]
        for n, d in diag.items():
            for t, res in sorted(d["by_T"].items(), key=lambda kv: int(kv[0])):
                trained = " (trained)" if int(t) == d["trained_time_steps"] else ""
                L.append(f"| {n} | {t}{trained} | {pm(res['bits_per_char'])} | "
                         f"{pm(res.get('firing_rate'))} | {pm(res.get('spikes_per_token'), 1)} "
                         f"| {pm(res.get('relative_energy'), 3)} | "
                         f"{pm(res.get('active_fraction'), 3)} |")
        L.append("")
    L += ["## Trunk feature cache", "",
          f"The trunk's features are computed once per (trunk, data, split) and kept on disk "
          f"(shared with `make train`): {cache_info.get('disk_entries_reused', 0)} of "
          f"{cache_info.get('disk_entries', 0)} entries were reused from earlier runs; "
          f"{cache_info['blocks_encoded']:,} blocks were encoded here in "
          f"{cache_info['encoder_seconds']:.1f} s and {cache_info['blocks_served_from_cache']:,} "
          f"served from the cache. Recomputing the features every time would have cost about "
          f"{cache_info['seconds_without_cache']:.0f} s of trunk time (each entry's measured "
          f"cost per block × blocks served): {cache_info['seconds_saved']:.0f} s saved.", ""]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = {n: a for n, a in agg.items() if a.get("metrics")}
    seq = [n for n, a in done.items() if not a["joint"]]
    joint = [n for n, a in done.items() if a["joint"]]
    files = []
    for k in ("bits_per_char", "accuracy"):
        fig, axes = plt.subplots(1, len(seq), figsize=(3.2 * len(seq), 3.2), squeeze=False)
        for ax, n in zip(axes[0], seq, strict=True):
            R = np.array(done[n]["R_mean"][k])
            ax.imshow(R, cmap="viridis_r" if k != "accuracy" else "viridis")
            for i in range(len(order)):
                for j in range(len(order)):
                    ax.text(j, i, f"{R[i, j]:.3f}", ha="center", va="center", fontsize=6,
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
        for n in seq:
            ys = np.array([[r["baseline"]["bits_per_char"][j]]
                           + [row[j] for row in r["R"]["bits_per_char"]]
                           for r in finished(runs[n])])  # (seeds, T + 1)
            m, s = ys.mean(0), ys.std(0)
            ax.plot(x, m, marker="o", label=n, lw=1)
            ax.fill_between(x, m - s, m + s, alpha=0.12)
        for n in joint:
            ax.axhline(done[n]["final_mean"]["bits_per_char"][j], color="k", ls="--", lw=1,
                       label=f"{n} (end)")
        ax.axvline(j + 1, color="grey", ls=":", lw=1)
        ax.set_xticks(x, ["init"] + [o[:6] for o in order], fontsize=7)
        ax.set_title(f"{dom} (trained at stage {j + 1})", fontsize=8)
        ax.set_ylabel(f"{split} bits/char", fontsize=8)
    axes[0][0].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "curves_bits_per_char.png", dpi=110)
    plt.close(fig)
    files.append("curves_bits_per_char.png")

    if len(order) >= 2 and seq:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, (key, title) in zip(axes, (("forgetting", "Chaudhry forgetting"),
                                           ("learning_gain", "learning gain")), strict=True):
            ms = [done[n]["metrics"]["bits_per_char"][key] for n in seq]
            ax.bar(range(len(seq)), [m["mean"] for m in ms], yerr=[m["std"] for m in ms],
                   capsize=4, color="tab:red" if key == "forgetting" else "tab:green",
                   alpha=0.7)
            ax.set_xticks(range(len(seq)), seq, rotation=35, ha="right", fontsize=7)
            ax.set_title(f"{title}, {split} bits/char (mean ± std over seeds)", fontsize=8)
            ax.axhline(0, color="k", lw=0.5)
        fig.tight_layout()
        fig.savefig(out / "forgetting.png", dpi=110)
        plt.close(fig)
        files.append("forgetting.png")

    ret = [n for n in done if "retention" in done[n]]
    if ret:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for n in ret:
            r = done[n]["retention"]["bits_per_char"]
            xs = np.arange(len(r["mean"]))
            ax.errorbar(xs, r["mean"], yerr=r["std"], marker="o", capsize=3, lw=1, label=n,
                        ls="--" if done[n]["joint"] else "-")
        ax.set_xticks(np.arange(len(order) + 1), ["init"] + [f"after {o[:6]}" for o in order],
                      fontsize=7)
        ax.set_ylabel(f"retention text, {split} bits/char")
        ax.set_title("What the trunk knew: general text after each stage (joint: after its "
                     "one stage)", fontsize=8)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "retention.png", dpi=110)
        plt.close(fig)
        files.append("retention.png")

    diag = {n: a["diagnostics"] for n, a in done.items() if "diagnostics" in a}
    if diag:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for n, d in diag.items():
            ts = sorted(int(t) for t in d["by_T"])
            for ax, key in zip(axes, ("bits_per_char", "relative_energy"), strict=True):
                v = [d["by_T"][str(t)][key] for t in ts]
                ax.errorbar(ts, [p["mean"] for p in v], yerr=[p["std"] for p in v],
                            marker="o", capsize=3, label=n)
        axes[0].set_ylabel(f"{split} bits/char (mean over domains)")
        axes[1].set_ylabel("settled energy F_T / F_0")
        for ax in axes:
            ax.set_xlabel("T (inner steps at evaluation, no retraining)")
            ax.set_xscale("log", base=2)
            ax.legend(fontsize=6)
        fig.suptitle("The layer after the last stage against T (mean ± std over seeds)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "layer_vs_T.png", dpi=110)
        plt.close(fig)
        files.append("layer_vs_T.png")
    return files


# ---- manifest -------------------------------------------------------------------------------
def manifest(cfg: RunConfig, argv, order) -> dict:
    """The shared run manifest (git, packages, machine) plus what this evaluation varied."""
    return run_manifest(seeds=cfg.continual.seeds, domain_order=order, argv=list(argv),
                        config=cfg.to_dict(), packages=package_versions(PACKAGES))


# ---- outputs --------------------------------------------------------------------------------
def stream_cache_info(stream: Stream, accelerator=None) -> dict:
    """The feature caches' accounting, summed over processes (each reads its own shard)."""
    info = stream.cache_summary()
    if accelerator is not None and accelerator.num_processes > 1:
        keys = ("encoder_seconds", "blocks_encoded", "blocks_served_from_cache",
                "seconds_without_cache")
        tot = accelerator.reduce(torch.tensor([float(info[k]) for k in keys],
                                              device=accelerator.device), "sum").tolist()
        spent, misses, hits, without = tot
        info |= {"encoder_seconds": spent, "blocks_encoded": int(misses),
                 "blocks_served_from_cache": int(hits),
                 "seconds_per_block": without / max(1, hits + misses),
                 "seconds_without_cache": without, "seconds_saved": without - spent,
                 "processes": accelerator.num_processes}
    return info


def card_summary(cfg: RunConfig, agg: dict, order: list[str]) -> dict:
    """What a model card says about continual learning: per finished method its head and
    overrides and the bits/char metrics, plus the verdict lines."""
    methods = {}
    for i, m in enumerate(cfg.continual.methods):
        a = agg.get(m.name, {})
        if not a.get("metrics"):
            continue
        mc = method_model_config(cfg, i)
        ms = a["metrics"]["bits_per_char"]
        methods[m.name] = {"head": m.head, "learning": mc.learning, "gate": mc.gate,
                           "joint": m.joint, "seeds": a["seeds"]} | {
            key: ms[key] for key in ("ACC", "BWT", "forgetting", "learning_gain",
                                     "retention_change") if key in ms}
    return {"order": order, "trunk": cfg.model.encoder, "split": cfg.continual.eval_split,
            "tokens_per_stage": cfg.continual.tokens_per_stage, "methods": methods,
            "verdict": verdict(agg, order, cfg.continual.eval_split)}


def write_outputs(cfg, argv, out, runs, cache_info, overlap, wall, complete, order,
                  encoder_path, accelerator=None, tracker=None, wb_step=0) -> None:
    """Aggregate, then write continual.json, manifest.json, continual.md and the plots, and
    (when `continual.card_run` holds a trained model) add the results to its model card."""
    from transformers import AutoConfig

    agg = aggregate(runs)
    tokens = {n: sum(a["stage_token_slots"][0]) for n, a in agg.items()
              if a.get("stage_token_slots")}
    equal_tokens = len(set(tokens.values())) <= 1
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
            md += f"\n**Warning**: methods did not see equal tokens per sequence: {tokens}\n"
        write_text_atomic(out / "continual.md", md)
        summary = card_summary(cfg, agg, order)
        write_json_atomic(out / "card_summary.json", summary)
        card_run = Path(cfg.continual.card_run) if cfg.continual.card_run else None
        if card_run is not None and complete and cfg.continual.eval_split == "test":
            from hybridlm.hub import add_continual_to_cards

            for folder in add_continual_to_cards(card_run, summary):
                print(f"added the continual results to the model card in {folder}")
        if tracker is not None and tracker.run is not None:
            import wandb

            flat = {f"{n}/{k}/{m}/{s}": v for n, a in agg.items()
                    for k, ms in (a.get("metrics") or {}).items() for m, st in ms.items()
                    for s, v in st.items() if v is not None and s != "n"}
            tracker.summary(flat)
            tables = {}
            for n, a in agg.items():
                if a.get("R_mean"):
                    rows = [["untrained"] + a["baseline_mean"]["bits_per_char"]]
                    rows += [[f"after {o}"] + r for o, r in zip(order, a["R_mean"][
                        "bits_per_char"], strict=True)]
                    tables[f"R/{n}"] = wandb.Table(columns=["row"] + order, data=rows)
            tracker.log(tables | {f"plots/{p[:-4]}": wandb.Image(str(out / p)) for p in plots},
                        wb_step + 1)
        print("\n".join(verdict(agg, order, cfg.continual.eval_split)))
        print(f"\nwrote {out / 'continual.md'}, continual.json, manifest.json and "
              f"{len(plots)} plots ({wall:.0f} s of run time)")
    if tracker is not None:
        tracker.finish()
