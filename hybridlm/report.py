"""Reports of a training run (`<output_dir>` of train/train.py), from its metrics.json files
and, where the run wrote them, its `<head>/history.jsonl` files (every logged step).

`build_report(run_dir)` makes a W&B Report (wandb-workspaces) only when a W&B key, online
mode and the network are all there; otherwise a self-contained local HTML file (tables plus
PNG plots embedded as data URIs). It says which one it made and why. The same plots can be
logged to a W&B run as `wandb.Image`s (`log_plots`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from hybridlm.results import mean_bpc
from hybridlm.rundir import RunDir


class ReportError(ValueError):
    """The run folder lacks the files a report is made from."""


@dataclass
class Run:
    """A training run folder: `summary` (metrics.json), `heads` ({head: <head>/metrics.json}),
    `config` (config.yaml)."""

    path: Path
    summary: dict
    heads: dict
    config: dict
    history: dict | None = None  # {head: every logged row}, from <head>/history.jsonl


RESUME = "finish the run with `make train CONFIG=<its config> ARGS=--resume`"


def _read_mapping(path: Path, parse, errors: tuple, language: str, kind: str,
                  missing: str) -> dict:
    """A mapping parsed from a run's file; `ReportError` naming the file and what to do."""
    try:
        data = parse(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing: {missing}") from None
    except (OSError, UnicodeDecodeError, *errors) as e:
        raise ReportError(f"{path}: not valid {language} ({str(e)[:200]}): delete it and "
                          f"{RESUME}, which writes it again") from e
    if not isinstance(data, dict):
        raise ReportError(f"{path}: not {kind}: delete it and {RESUME}, which writes it again")
    return data


def _read_json_object(path: Path) -> dict:
    data = _read_mapping(path, json.loads, (json.JSONDecodeError,), "JSON", "a JSON object",
                         f"the run is incomplete; {RESUME}")
    for key in ("validation", "test"):
        if not isinstance(data.get(key, {}), dict) or not all(
                isinstance(v, dict) for v in data.get(key, {}).values()):
            raise ReportError(f"{path}: field '{key}' is not an object of per-domain results: "
                              f"delete the file and {RESUME}")
    return data


def _read_config(path: Path) -> dict:
    return _read_mapping(path, yaml.safe_load, (yaml.YAMLError,), "YAML",
                         "a mapping of config sections",
                         f"not a complete run folder of train/train.py; {RESUME} (it writes the "
                         "file again)")


def load_run(run_dir: str | Path) -> Run:
    """The run's files, checked: its config.yaml, the metrics.json of every head of its
    `train.heads` and its summary metrics.json; `ReportError` names a file that is missing
    or damaged, and what to do."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    run = RunDir(run_dir)
    if not run.finished_heads():
        raise ReportError(f"{run_dir}: no <head>/metrics.json (did train/train.py finish?); "
                          f"{RESUME}, or pass the output_dir of a finished run")
    config = _read_config(run.config)
    train = config.get("train")
    planned = train.get("heads") if isinstance(train, dict) else None
    names = [str(h) for h in planned] if isinstance(planned, list) else []
    heads = {h: _read_json_object(run.metrics(h))
             for h in dict.fromkeys(names + run.finished_heads())}
    summary = _read_json_object(run.summary)
    order = list((summary.get("heads") or {}).keys())
    heads = {h: heads[h] for h in order if h in heads} | heads
    return Run(run_dir, summary, heads, config, _logged_history(run, heads))


def _logged_history(run: RunDir, heads: dict) -> dict:
    """Per-step history of every head that wrote `<head>/history.jsonl` (metrics.json keeps
    only every 10th training step); a file that can't be read is skipped."""
    out = {}
    for head in heads:
        f = run.history(head)
        if not f.is_file():
            continue
        try:
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        rows = [r for r in rows if isinstance(r, dict) and "step" in r]
        if rows:
            out[head] = rows
    return out


def training_history(run: Run, head: str) -> list[dict]:
    """The rows a head's training curves are drawn from: its `history.jsonl` (every logged
    step) when the run wrote one, else the `history` of its metrics.json."""
    return (run.history or {}).get(head) or run.heads[head].get("history") or []


# ---- plots -------------------------------------------------------------------------------
def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _series(history: list[dict], key: str) -> tuple[list, list]:
    rows = [(r["step"], r[key]) for r in history
            if isinstance(r.get(key), (int, float)) and "step" in r]
    return [s for s, _ in rows], [v for _, v in rows]


def figures(run: Run) -> dict[str, bytes]:
    """PNG plots: loss curves, validation perplexity over steps, per-domain perplexity bars,
    firing rate over steps (spiking heads). Keys are plot names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for head in run.heads:
        x, y = _series(training_history(run, head), "train/loss")
        if x:
            ax.plot(x, y, marker=".", label=head)
    if ax.lines:
        ax.set(xlabel="optimizer step", ylabel="training loss (nats/token)",
               title="Training loss")
        ax.legend()
        ax.grid(alpha=0.3)
        out["train_loss"] = _png(fig)
    else:
        plt.close(fig)

    domains = list(dict.fromkeys(d for m in run.heads.values() for d in m.get("validation", {})))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for head, m in run.heads.items():
        for d in domains:
            x, y = _series(m.get("history") or [], f"eval/{d}/perplexity")
            if x:
                ax.plot(x, y, marker="o", label=f"{head} / {d}")
    if ax.lines:
        ax.set(xlabel="optimizer step", ylabel="validation perplexity", yscale="log",
               title="Validation perplexity")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        out["eval_perplexity"] = _png(fig)
    else:
        plt.close(fig)

    if domains:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / max(1, len(run.heads))
        for i, (head, m) in enumerate(run.heads.items()):
            vals = [m.get("validation", {}).get(d, {}).get("perplexity", float("nan"))
                    for d in domains]
            xs = [j + i * width for j in range(len(domains))]
            bars = ax.bar(xs, vals, width, label=head)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks([j + width * (len(run.heads) - 1) / 2 for j in range(len(domains))],
                      domains)
        ax.set(ylabel="validation perplexity (final)", title="Perplexity per domain")
        ax.legend()
        out["domain_perplexity"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for head in run.heads:
        x, y = _series(training_history(run, head), "snn/firing_rate")
        if x:
            ax.plot(x, y, marker=".", label=head)
    if ax.lines:
        ax.set(xlabel="optimizer step", ylabel="mean firing rate", title="Firing rate")
        ax.legend()
        ax.grid(alpha=0.3)
        out["firing_rate"] = _png(fig)
    else:
        plt.close(fig)
    return out


def log_plots(wandb_run, run: Run | str | Path, step: int | None = None) -> list[str]:
    """Log `figures(run)` to a W&B run as `plots/<name>` wandb.Images; returns the keys."""
    import wandb
    from PIL import Image

    if wandb_run is None:
        return []
    run = run if isinstance(run, Run) else load_run(run)
    images = {f"plots/{k}": wandb.Image(Image.open(io.BytesIO(v)), caption=k)
              for k, v in figures(run).items()}
    if images:
        wandb_run.log(images, step=step)
    return list(images)


# ---- local HTML ----------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.4f}" if abs(v) < 10 else f"{v:,.2f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return html.escape("" if v is None else str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;
padding:4px 10px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{
text-align:left}.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{width:520px;
border:1px solid #ddd}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}
.note{color:#666}"""


def html_report(run: Run, reason: str = "") -> str:
    """A self-contained HTML page (no external resources) of the run's results."""
    name = run.path.name
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hybridlm run {name}"
             f"</title><style>{CSS}</style></head><body><h1>hybridlm run <code>"
             f"{html.escape(name)}</code></h1>",
             f"<p class='note'>Local report made from {html.escape(str(run.path))}/"
             f"metrics.json and &lt;head&gt;/metrics.json"
             + (" (training curves: every logged step, from &lt;head&gt;/history.jsonl)"
                if run.history else "") + f". {html.escape(reason)}</p>"]
    heads = run.heads
    rows = []
    for head, m in heads.items():
        for split in ("validation", "test"):
            for d, r in (m.get(split) or {}).items():
                rows.append([head, split, d, r.get("perplexity"), r.get("bits_per_char"),
                             r.get("accuracy"), r.get("firing_rate"), r.get("tokens")])
    parts += ["<h2>Results per domain</h2>",
              _table(["model", "split", "domain", "perplexity", "bits per char", "accuracy",
                      "firing rate", "tokens"], rows)]
    ref = (heads.get("trunk") or {}).get("validation")
    if ref and all("bits_per_char" in r for r in ref.values()):
        ref_bpc = mean_bpc(ref)
        bpc = {h: mean_bpc(m["validation"]) for h, m in heads.items() if m.get("validation")}
        parts += ["<h2>Every model against the trunk alone (validation, mean bits/char)</h2>",
                  _table(["model", "mean bits per char", "relative change"],
                         [[h, b, f"{b / ref_bpc - 1:+.1%}"] for h, b in bpc.items()])]
    parts += ["<h2>Training</h2>", _table(
        ["head", "trainable parameters", "head parameters", "optimizer steps", "skipped steps",
         "seconds per epoch"],
        [[h, m.get("trainable_parameters"), m.get("head_parameters"), m.get("optimizer_steps"),
          m.get("skipped_steps"), ", ".join(f"{s:.1f}" for s in m.get("epoch_seconds") or [])]
         for h, m in heads.items()])]
    data = run.summary.get("data") or {}
    if data:
        keys = sorted({k for s in data.values() for k, v in s.items()
                       if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
        parts += ["<h2>Data</h2>", _table(["domain"] + keys,
                                          [[d] + [s.get(k) for k in keys]
                                           for d, s in data.items()])]
    figs = figures(run)
    if figs:
        parts.append("<h2>Plots</h2><div class='plots'>")
        for k, png in figs.items():
            b64 = base64.b64encode(png).decode()
            parts.append(f"<img alt='{k}' title='{k}' src='data:image/png;base64,{b64}'>")
        parts.append("</div>")
    if run.config:
        parts += ["<h2>Configuration</h2><pre>",
                  html.escape(yaml.safe_dump(run.config, sort_keys=False)), "</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


# ---- W&B Report ----------------------------------------------------------------------------
def wandb_available() -> tuple[bool, str]:
    """(True, "") when a W&B Report can be saved: online mode, a key, wandb-workspaces and
    a reachable server; else (False, why not). Checks the network last, only with a key."""
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "disabled", "dryrun"):
        return False, f"WANDB_MODE={mode}"
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            import netrc

            key = (netrc.netrc().authenticators("api.wandb.ai") or (None, None, None))[2]
        except (OSError, netrc.NetrcParseError):
            key = None
    if not key:
        return False, "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        return False, "wandb-workspaces is not installed"
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        socket.create_connection((host.split("/")[0].split(":")[0], 443), timeout=3).close()
    except OSError:
        return False, f"no network connection to {host}"
    return True, ""


def wandb_report(run: Run, entity: str | None = None, project: str | None = None) -> str:
    """Save a W&B Report of the run's group (its synced runs); returns its URL."""
    import wandb_workspaces.reports.v2 as wr

    project = project or (run.config.get("wandb") or {}).get("project", "hybridlm")
    group = run.path.name
    runset = wr.Runset(entity=entity or "", project=project, name=group,
                       filters=f"Metric('Group') == '{group}'")
    domains = list(dict.fromkeys(d for m in run.heads.values() for d in m.get("validation", {})))
    panels = [wr.LinePlot(title="Training loss", x="Step", y=["train/loss"]),
              wr.LinePlot(title="Firing rate", x="Step", y=["snn/firing_rate"])]
    panels += [wr.LinePlot(title=f"{d} validation perplexity", x="Step",
                           y=[f"eval/{d}/perplexity"]) for d in domains]
    report = wr.Report(project=project, entity=entity or "", title=f"hybridlm run {group}",
                       description="Generated by hybridlm.report from metrics.json and the "
                                   "synced W&B runs.",
                       blocks=[wr.H1(f"hybridlm run {group}"),
                               wr.PanelGrid(runsets=[runset], panels=panels)])
    report.save()
    return report.url


def build_report(run_dir: str | Path, out: str | Path | None = None,
                 kind: str = "auto") -> tuple[str, str, str]:
    """Make the report: kind "auto" (W&B when possible), "wandb" or "html".
    Returns (kind made, where: URL or file, why that kind)."""
    run = load_run(run_dir)
    ok, why = (False, "local HTML requested") if kind == "html" else wandb_available()
    if kind == "wandb" and not ok:
        raise ReportError(f"cannot make a W&B Report: {why}")
    if ok:
        return "wandb", wandb_report(run), "W&B key, online mode and network available"
    target = Path(out) if out else run.path / "report.html"
    from hybridlm.io import write_text_atomic

    write_text_atomic(target, html_report(run, f"Not a W&B Report: {why}."))
    return "html", str(target), why
