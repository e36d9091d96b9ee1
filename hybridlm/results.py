"""Results tables and plots: every head beside the trunk alone and the n-gram baselines.

A run's models are a dict name -> {"trainable_parameters", "validation", "test"}, where each
split maps domain -> scores (`perplexity`, `bits_per_char`, ...). Rows are printed in the
order given; the `trunk` row (the pretrained LM with no head) is the reference for the
"vs trunk" column.
"""

from __future__ import annotations

import math

BASELINE_NOTES = {
    "unigram": "add-one unigram fitted on the training blocks",
    "kn_bigram": "interpolated Kneser-Ney bigram fitted on the training blocks",
    "trunk": "the pretrained trunk alone (zero-shot, nothing trained)",
    "linear": "linear residual head",
    "mlp": "MLP head, parameters matched to the spiking layer",
    "mlp_macs": "MLP head, multiply-adds per token matched to the spiking layer's dense "
                "equivalent",
    "spiking_pc": "spiking predictive-coding head",
    "ista": "the same energy minimised without spikes (ISTA), same parameters and T",
}


def mean_bpc(split: dict) -> float:
    """Mean bits per character over domains (each domain counts once)."""
    values = [r["bits_per_char"] for r in split.values()]
    return sum(values) / len(values) if values else math.nan


def results_table(models: dict[str, dict], domains: list[str], split: str) -> str:
    """Markdown table: per model, perplexity and bits/char per domain on `split`, the mean
    bits/char and its relative change against the trunk alone."""
    ref = models.get("trunk", {}).get(split)
    ref_bpc = mean_bpc(ref) if ref else None
    head = ["model", "trainable params"] + [f"{d} ppl / bpc" for d in domains] + ["mean bpc"]
    if ref_bpc:
        head.append("vs trunk")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in models.items():
        res = m.get(split) or {}
        if not res:
            continue
        params = m.get("trainable_parameters")
        cells = [name, "-" if params is None else f"{params:,}"]
        cells += [f"{res[d]['perplexity']:.2f} / {res[d]['bits_per_char']:.4f}" for d in domains]
        bpc = mean_bpc(res)
        cells.append(f"{bpc:.4f}")
        if ref_bpc:
            cells.append("-" if name == "trunk" else f"{bpc / ref_bpc - 1:+.2%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def worse_than_trunk(models: dict[str, dict], split: str = "validation") -> list[str]:
    """Trained heads whose mean bits/char ended above the trunk they started from."""
    ref = models.get("trunk", {}).get(split)
    if not ref:
        return []
    skip = {"trunk", "unigram", "kn_bigram"}
    return [n for n, m in models.items() if n not in skip and m.get(split)
            and mean_bpc(m[split]) > mean_bpc(ref)]


def results_figure(models: dict[str, dict], domains: list[str], split: str) -> bytes:
    """PNG: bits per character per domain, one bar per model."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in models.items() if m.get(split)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(domains), 3.6))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [models[n][split][d]["bits_per_char"] for d in domains], width, label=n)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel(f"{split} bits per character (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
