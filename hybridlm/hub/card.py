"""The model card: its metadata (`card_data`) and Markdown text (`card_text`), built only from
the metrics and configs train.py wrote, and writing it into model folders."""

from __future__ import annotations

from pathlib import Path

from hybridlm.hub.folder import CARD, CONFIG, WEIGHTS, WEIGHTS_INDEX, _read_json
from hybridlm.hub.publishing import REPO_ID
from hybridlm.io import CheckpointError
from hybridlm.rundir import RunDir

TAGS = ["hybridlm", "spiking-neural-network", "predictive-coding", "causal-lm", "text-generation"]
CONTINUAL_SUMMARY = "continual_summary.json"  # in a run folder: eval/continual.py's results


def _cfg_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg)


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:.2e}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def continual_method(config: dict, continual: dict | None) -> str | None:
    """The continual-learning method (of `eval/continual.py`'s card summary) that trained a
    head like this model's: same head and, for the spiking layer, same learning mode and
    gate; None when no method matches."""
    for name, m in ((continual or {}).get("methods") or {}).items():
        same = m["head"] == config.get("head") and not m.get("joint")
        if same and (m["head"] != "spiking_pc" or (m["learning"], m["gate"]) == (
                config.get("learning"), config.get("gate"))):
            return name
    return None


def card_data(config: dict, metrics: dict, cfg: dict, model_name: str,
              continual: dict | None = None):
    """`ModelCardData` with license, base model, datasets, tags and a model-index of the
    measured per-domain perplexities (test and validation) and, when given, the continual
    evaluation's metrics of the method that matches this head."""
    from huggingface_hub import EvalResult, ModelCardData

    base = (config.get("encoder_config") or {}).get("_name_or_path") or None
    if base and not REPO_ID.fullmatch(base):
        base = None  # a local folder's name, not a Hub id: the Hub would reject it
    sources = {d.get("name"): d.get("source", "") for d in (cfg.get("data") or {}).get("domains",
                                                                                      [])}
    datasets = sorted({s[3:] for s in sources.values() if s.startswith("hf:")}) or None
    results = []
    for split in ("test", "validation"):
        for domain, r in (metrics.get(split) or {}).items():
            src = sources.get(domain) or domain
            results.append(EvalResult(
                task_type="text-generation", task_name="Causal language modeling",
                dataset_type=src[3:] if src.startswith("hf:") else domain,
                dataset_name=f"{domain} ({src})" if src != domain else domain,
                dataset_split=split, metric_type="perplexity",
                metric_name=f"{split} perplexity", metric_value=round(r["perplexity"], 4),
            ))
            if "bits_per_char" in r:
                results.append(EvalResult(
                    task_type="text-generation", task_name="Causal language modeling",
                    dataset_type=src[3:] if src.startswith("hf:") else domain,
                    dataset_name=f"{domain} ({src})" if src != domain else domain,
                    dataset_split=split, metric_type="bits_per_character",
                    metric_name=f"{split} bits per character",
                    metric_value=round(r["bits_per_char"], 4)))
    method = continual_method(config, continual)
    if method is not None:
        m = continual["methods"][method]
        stream = " -> ".join(continual["order"])
        for key, label in (("forgetting", "Chaudhry forgetting"), ("ACC", "ACC"),
                           ("BWT", "backward transfer"), ("learning_gain", "learning gain"),
                           ("retention_change", "retention change")):
            if (m.get(key) or {}).get("mean") is not None:
                results.append(EvalResult(
                    task_type="text-generation", task_name="Continual language modeling",
                    dataset_type="continual", dataset_name=f"continual: {stream}",
                    dataset_split=continual.get("split", "test"),
                    metric_type=f"continual_{key.lower()}_bits_per_character",
                    metric_name=f"{label} (bits/char, mean over {len(m['seeds'])} seeds)",
                    metric_value=round(m[key]["mean"], 4)))
    head = config.get("head", metrics.get("head", ""))
    return ModelCardData(
        language="en", license="apache-2.0", library_name="transformers",
        pipeline_tag="text-generation", base_model=base, datasets=datasets,
        tags=TAGS + ([f"head-{head}"] if head else []),
        model_name=model_name, eval_results=results or None,
    )


HEADS = {
    "spiking_pc": "a spiking predictive-coding layer ({n} neurons, {t} inner steps of "
                  "spike-coding inference that descends an energy; surrogate-gradient training)",
    "ista": "the non-spiking control of the spiking layer (the same energy minimised by ISTA "
            "for {t} steps, {n} units)",
    "mlp": "a non-spiking MLP head (the parameter-matched baseline of the spiking layer)",
    "mlp_macs": "a non-spiking MLP head (multiply-adds per token matched to the spiking layer)",
    "kwta": "a k-winners-take-all MLP head (the parameter-matched MLP whose hidden layer keeps "
            "only its k largest units per token: sparse, not spiking)",
    "linear": "a linear residual head",
    "trunk": "no head (the trunk alone)",
}


def claim_sentence(heads: dict) -> str:
    """The design's 22% claim, checked on this run's validation perplexities (one seed)."""
    def rel(a: str, b: str) -> float | None:
        va, vb = (heads.get(a) or {}).get("validation"), (heads.get(b) or {}).get("validation")
        if not va or not vb:
            return None
        return sum(va[d]["perplexity"] / vb[d]["perplexity"] - 1 for d in va) / len(va)

    parts = [f"{rel('spiking_pc', ref):+.1%} against {what}"
             for ref, what in (("trunk", "the trunk alone"),
                               ("mlp", "the parameter-matched MLP head"),
                               ("mlp_macs", "the MAC-matched MLP head"))
             if rel("spiking_pc", ref) is not None]
    if not parts:
        return ""
    return ("The claim this design comes from, a 22% lower perplexity when a spiking "
            "predictive-coding layer sits atop a pretrained model: in this run (one seed; "
            "`make compare` gives the spread over seeds) the spiking head's validation "
            "perplexity, mean over domains, changed by " + ", ".join(parts) + ".")


def continual_section(config: dict, continual: dict | None) -> list[str]:
    """The card's continual-learning section: this head's method and fine-tuning, in bits
    per character, and the evaluation's verdict, copied from its card summary."""
    if not continual or not continual.get("methods"):
        return []
    method = continual_method(config, continual)
    lines = ["", "## Continual learning", "",
             f"`eval/continual.py` trained heads on the trunk `{continual.get('trunk')}` "
             f"through {' -> '.join(continual['order'])}, "
             f"{continual.get('tokens_per_stage', 0):,} tokens per stage, and scored every "
             f"domain's {continual.get('split', 'test')} split after each stage (bits per "
             "character, mean ± std over seeds; forgetting positive = forgetting; retention: "
             "a general news text's change, positive = worse).", "",
             "| method | ACC | BWT | forgetting | learning gain | retention change |",
             "|---|---|---|---|---|---|"]

    def cell(m, key):
        v = m.get(key) or {}
        return "-" if v.get("mean") is None else f"{v['mean']:.4f} ± {v['std']:.4f}"

    for name in dict.fromkeys([n for n in (method, "finetune") if n]):
        m = continual["methods"].get(name)
        if m:
            lines.append(f"| {name}{' (this head)' if name == method else ''} | "
                         + " | ".join(cell(m, k) for k in ("ACC", "BWT", "forgetting",
                                                            "learning_gain",
                                                            "retention_change")) + " |")
    if method is None:
        lines += ["", "No method of that evaluation trained a head configured like this one."]
    lines += [""] + list(continual.get("verdict") or [])
    return lines


def card_text(config: dict, metrics: dict, summary: dict | None, cfg: dict,
              model_name: str, repo_id: str | None, remote_code: bool,
              lower_case: bool | None = None, continual: dict | None = None) -> str:
    """The card's Markdown body, built only from the measured metrics and the configs."""
    import yaml

    summary = summary or {}
    head = config.get("head", metrics.get("head", "?"))
    enc = config.get("encoder_config") or {}
    causal = config.get("trunk_kind") == "causal_lm"
    base = enc.get("_name_or_path") or "a pretrained trunk"
    n_top = config.get("trainable_encoder_layers", 0)
    desc = HEADS.get(head, f"a '{head}' head").format(n=config.get("n_neurons"),
                                                      t=config.get("time_steps"))
    where = repo_id or "path/to/model"
    lines = [
        f"# {model_name}", "",
        f"A hybrid transformer + spiking language model built with hybridlm: the pretrained "
        f"trunk `{base}` ({enc.get('num_hidden_layers', '?')} layers, hidden size "
        f"{enc.get('hidden_size', '?')}), "
        + ("frozen" if not n_top else f"frozen except its top {n_top} layer(s)")
        + f", topped with {desc}, whose output corrects the trunk's final hidden state "
        + ("before the trunk's own LM head (the correction starts at zero, so the untrained "
           "model is the trunk's language model)." if causal else
           "before a readout tied to the encoder's word embeddings (the encoder runs with a "
           "causal mask)."),
        "", "All numbers below were measured by `train/train.py` and copied from its "
        "`metrics.json`; nothing is estimated.", "",
        "## Results", "",
    ]
    val, test = metrics.get("validation") or {}, metrics.get("test") or {}
    if val or test:
        spiking = any("firing_rate" in r for r in list(val.values()) + list(test.values()))
        cols = ["domain", "val perplexity", "val accuracy", "test perplexity", "test accuracy",
                "test tokens"] + (["val firing rate", "test firing rate"] if spiking else [])
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for d in dict.fromkeys(list(val) + list(test)):
            v, t = val.get(d, {}), test.get(d, {})
            cells = [d, _fmt(v.get("perplexity")), _fmt(v.get("accuracy"), 4),
                     _fmt(t.get("perplexity")), _fmt(t.get("accuracy"), 4), _fmt(t.get("tokens"))]
            if spiking:
                cells += [_fmt(v.get("firing_rate"), 4), _fmt(t.get("firing_rate"), 4)]
            lines.append("| " + " | ".join(cells) + " |")
    else:
        lines.append("No evaluation results were recorded.")
    table = summary.get("results_table")
    if table:
        lines += ["", "Every model of the run on the same blocks, order and seed (validation "
                  "perplexity / bits per character; the `trunk` row is the pretrained trunk "
                  "alone, the n-gram rows are fitted on the same training blocks):", "", table]
    heads = summary.get("heads") or {}
    if head == "spiking_pc" and "spiking_pc" in heads:
        lines += ["", claim_sentence(heads)]
    facts = [("trainable parameters", metrics.get("trainable_parameters")),
             ("head parameters", metrics.get("head_parameters")),
             ("optimizer steps", metrics.get("optimizer_steps")),
             ("skipped (non-finite) steps", metrics.get("skipped_steps")),
             ("training tokens per epoch", metrics.get("train_tokens_per_epoch")),
             ("seconds per epoch", ", ".join(f"{s:.1f}" for s in metrics.get("epoch_seconds")
                                               or []) or None),
             ("training processes", summary.get("processes"))]
    lines += ["", "| training fact | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in facts if v is not None]

    rates = [(r["step"], r["snn/firing_rate"]) for r in metrics.get("history") or []
             if "snn/firing_rate" in r]
    if head in ("spiking_pc", "ista"):
        lines += ["", "## Firing rates", "",
                  "Mean fraction of neurons spiking per inner time step (0 = silent, 1 = every "
                  "neuron every step), measured on the evaluation sets above."]
        if rates:
            lines += ["", "During training (`snn/firing_rate`, training batches): "
                      + ", ".join(f"step {s}: {r:.4f}" for s, r in rates[:: max(1, len(rates)
                                                                            // 8)]) + "."]
        ops = metrics.get("operations_per_token") or {}
        if ops:
            lines += ["", f"Operations per token (`hybridlm.energy`): {_fmt(ops.get('mac'))} "
                      f"multiply-adds and {_fmt(ops.get('sop'))} synaptic operations at the "
                      f"measured validation rate {_fmt(ops.get('firing_rate'), 4)} "
                      f"({_fmt(ops.get('dense_equivalent_mac'))} multiply-adds if the spike "
                      f"propagation ran densely); estimated {_fmt(ops.get('energy_pj'))} pJ "
                      f"per token at 45 nm, against {_fmt(ops.get('dense_energy_pj'))} dense. "
                      f"{ops.get('caveat', '')}"]
        sweep = metrics.get("time_sweep") or {}
        if sweep:
            lines += ["", "The trained layer evaluated with other numbers of inner steps T "
                      "(validation bits per character, mean over domains; not retrained):", "",
                      "| T | mean bits/char | firing rate | spikes per token |",
                      "|---|---|---|---|"]
            for k, res in sweep.items():
                vals = list(res.values())
                mean = lambda key, vals=vals: sum(v[key] for v in vals) / len(vals)  # noqa: E731
                lines.append(f"| {k} | {mean('bits_per_char'):.4f} | {mean('firing_rate'):.4f} "
                             f"| {mean('spikes_per_token'):.1f} |")

    lines += continual_section(config, continual)
    if cfg:
        lines += ["", "## Training configuration", "", "```yaml",
                  yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```"]
    data = summary.get("data") or {}
    if data:
        lines += ["", "Data (per domain, as built by `hybridlm.data`):", ""]
        keys = sorted({k for s in data.values() for k, v in s.items()
                       if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
        lines += ["| domain | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for d, s in data.items():
            lines.append(f"| {d} | " + " | ".join(_fmt(s.get(k)) for k in keys) + " |")

    lines += [
        "", "## How to use", "", "```python",
        "import hybridlm  # registers the model with the Auto classes",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
        f'model = AutoModelForCausalLM.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
        'print(generate("the king said", max_new_tokens=20)[0]["generated_text"])', "```",
    ]
    if remote_code:
        lines += ["", "Without hybridlm installed, the folder's own `modeling_hybridlm.py` "
                  "(plain torch) is used:", "", "```python",
                  f'model = AutoModelForCausalLM.from_pretrained("{where}", '
                  "trust_remote_code=True)", "```"]
    lines += [
        "", "## Intended use", "",
        "Research on hybrid transformer / spiking networks: comparing a spiking "
        "predictive-coding head with matched non-spiking baselines on top of the same frozen "
        "trunk, and studying firing rates and predictive-coding energy. It is not a "
        "general-purpose or production text generator.", "",
        "## Limitations", "",
        (f"- The trunk `{base}` was pretrained on web text that may contain the evaluation "
         "texts (public-domain literature, open-source code and documentation, common "
         "licences); read the trunk's own scores with that in mind." if causal else
         f"- The encoder `{base}` was pretrained bidirectionally for sentence embeddings; it "
         "is run here with a causal mask it was not trained with, so its features are weaker "
         "than a causal LM's."),
        "- The results hold for the domains and the evaluation slices listed above only (see "
        "the token counts); other text may behave differently.",
        "- The vocabulary is the trunk's"
        + (" (lower-cased input)" if lower_case else "")
        + "; generation recomputes the whole prefix at every step (no key/value cache), so it "
        f"is slow, and the context is limited to {enc.get('max_position_embeddings', '?')} "
        "tokens.",
        "- No safety filtering or alignment: generated text may be wrong, offensive or "
        "reproduce training text.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(
    folder: str | Path,
    metrics: dict,
    summary: dict | None = None,
    cfg=None,
    repo_id: str | None = None,
    continual: dict | None = None,
):
    """Write `folder/README.md` from a head's `metrics.json` dict, the run's summary
    (`<output_dir>/metrics.json`), the run config and (optional) the continual evaluation's
    card summary; returns the `ModelCard`."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    config = _read_json(folder / CONFIG)
    cfg_d = _cfg_dict(cfg)
    tok_cfg = folder / "tokenizer_config.json"
    lower = _read_json(tok_cfg).get("do_lower_case") if tok_cfg.is_file() else None
    head = config.get("head", metrics.get("head", "model"))
    name = repo_id.split("/")[-1] if repo_id else f"hybridlm-{head}"
    data = card_data(config, metrics, cfg_d, name, continual)
    body = card_text(config, metrics, summary, cfg_d, name, repo_id,
                     remote_code="auto_map" in config, lower_case=lower, continual=continual)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    card.save(folder / CARD)
    return card


def write_card_for_run(run_dir: str | Path, head: str, repo_id: str | None = None,
                       folder: str | Path | None = None):
    """Card for `folder` (default `<run_dir>/<head>/model`) from the files train.py wrote in
    `run_dir`: `<head>/metrics.json`, `metrics.json` and `config.yaml`."""
    import yaml

    run = RunDir(run_dir)
    metrics = _read_json(run.metrics(head))
    summary = _read_json(run.summary) if run.summary.is_file() else {}
    cfg = yaml.safe_load(run.config.read_text()) if run.config.is_file() else None
    cont = run.root / CONTINUAL_SUMMARY
    continual = _read_json(cont) if cont.is_file() else None
    return write_model_card(folder or run.model(head), metrics, summary, cfg, repo_id,
                            continual)


def _weights_sha256(folder: Path) -> str:
    """One SHA-256 over the weight files of a model folder (the file, or the index's shards)."""
    import hashlib

    names = [WEIGHTS] if (folder / WEIGHTS).is_file() else sorted(set(
        (_read_json(folder / WEIGHTS_INDEX).get("weight_map") or {}).values()))
    h = hashlib.sha256()
    for name in names:
        with (folder / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def check_card_run(run_dir: str | Path, folder: str | Path) -> str:
    """The head whose results in `run_dir` (a run folder of train/train.py) describe the
    model in `folder`; raises `CheckpointError` naming what differs when they are another
    model's: no results of the folder's head, another value of a key of the run's model
    section (config.yaml), or other weights than the run's own `<head>/model` holds (a run
    of another seed has the same config)."""
    import yaml

    from hybridlm.modeling import MODEL_KEYS

    folder, run = Path(folder), RunDir(run_dir)
    config = _read_json(folder / CONFIG)
    head = config.get("head")
    fix = f"pass --card-from the run folder that trained {folder}"
    if not run.metrics(head).is_file():
        raise CheckpointError(f"{run.metrics(head)}: missing: {run.root} holds no results of "
                              f"head '{head}', the head of {folder}; {fix}")
    try:
        cfg = yaml.safe_load(run.config.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run.config}: missing: {run.root} is not a run folder of "
                              f"train/train.py; {fix}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{run.config}: not valid YAML ({str(e)[:200]})") from e
    section = (cfg.get("model") if isinstance(cfg, dict) else None) or {}
    differ = [f"model.{k} is {section[k]!r:.60} in {run.config} but {config.get(k)!r:.60} in "
              f"{folder / CONFIG}" for k in MODEL_KEYS
              if k != "head" and k in section and section[k] != config.get(k)]
    own = run.model(head)
    if not own.is_dir():
        differ.append(f"{own} is missing, so nothing shows {folder} holds that run's weights")
    elif not own.samefile(folder) and _weights_sha256(own) != _weights_sha256(folder):
        differ.append(f"{folder / WEIGHTS} holds other weights than {own} (another seed, "
                      "step or run)")
    if differ:
        raise CheckpointError(f"--card-from {run.root}: its results are not of this model: "
                              + "; ".join(differ) + f"; {fix}")
    return head


def add_continual_to_cards(run_dir: str | Path, continual: dict) -> list[Path]:
    """Keep the continual evaluation's card summary in `run_dir` and rewrite the card of
    every trained model there with it; returns the folders whose card was rewritten (none
    when `run_dir` holds no model)."""
    from hybridlm.io import write_json_atomic

    run_dir = Path(run_dir)
    folders = sorted(p.parent for p in run_dir.glob(f"*/model/{CONFIG}"))
    if not folders:
        return []
    write_json_atomic(run_dir / CONTINUAL_SUMMARY, continual)
    for folder in folders:
        write_card_for_run(run_dir, folder.parent.name)
    return folders
