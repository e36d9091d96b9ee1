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

from accelerate.utils import set_seed
from transformers import AutoTokenizer

import hybridlm  # noqa: F401  (registers the model with the Auto classes)
from hybridlm.config import ConfigError, RunConfig, keys_help, load_config
from hybridlm.continual import (
    Stream,
    batches_per_stage,
    check_checkpoint_tokenizer,
    check_replay_sizes,
    evaluate_row,
    method_model_config,
    run_sequence,
    stream_cache_info,
    write_outputs,
)
from hybridlm.corpora import DataError
from hybridlm.data import build_corpora, format_report, subsample
from hybridlm.features import sample_states
from hybridlm.heads import SPIKING_HEADS
from hybridlm.io import write_json_atomic
from hybridlm.modeling import HybridForCausalLM, model_kwargs
from hybridlm.precision import make_accelerator
from hybridlm.tracking import Tracker
from hybridlm.trunks import resolve_trunk


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/continual.yaml")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("--checkpoint", default=None,
                   help="only score this saved model folder on every test split")
    p.add_argument("--methods", default=None,
                   help="run only these methods of continual.methods (comma-separated names)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild report and plots from output_dir/continual.json (e.g. of an "
                        "interrupted run) without training")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)  # overrides before and after flags


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


def select_methods(c, wanted: str | None) -> list[int]:
    """Indices of the methods named in `--methods a,b` (all when None); an unknown name is
    an error naming the known ones."""
    names = [m.name for m in c.methods]
    if wanted is None:
        return list(range(len(names)))
    picked = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [w for w in picked if w not in names]
    if unknown or not picked:
        raise ConfigError(f"--methods: unknown method(s) {unknown or picked} (known: "
                          f"{', '.join(names)})")
    return [names.index(w) for w in picked]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        c = cfg.continual
        order = c.order or [d.name for d in cfg.data.domains]
        streamed = [d.name for d in cfg.data.domains if d.streaming]
        if streamed:  # a stage trains on a fixed slice of its domain's cached blocks
            raise ConfigError(f"config key 'data.domains': the continual evaluation reads "
                              f"cached domains; {streamed} stream: set streaming: false")
        if not c.methods and args.checkpoint is None:
            raise ConfigError("config key 'continual.methods': list at least one method")
        chosen = select_methods(c, args.methods)
        cfg = dataclasses.replace(cfg, continual=dataclasses.replace(
            c, methods=[c.methods[i] for i in chosen]))
        c = cfg.continual
        method_models = [method_model_config(cfg, i) for i in range(len(c.methods))]
        encoder_path = resolve_trunk(cfg.model.encoder, cfg.data.cache_dir).path
        if args.report_only:
            return report_only(cfg, argv, order, encoder_path)
        check_replay_sizes(c, order, cfg.data.block_size)
        tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        accelerator = make_accelerator(cfg.train.mixed_precision)
        data_cfg = dataclasses.replace(
            cfg.data, domains=[d for d in cfg.data.domains if d.name in order]
            + ([c.retention] if c.retention is not None else []))
        with accelerator.main_process_first():
            built = {d.name: d for d in build_corpora(data_cfg, tokenizer,
                                                      accelerator.is_local_main_process)}
        blk, d = cfg.data.block_size, cfg.data

        def scored(name):
            return subsample(built[name].splits[c.eval_split], d.max_eval_tokens_per_domain,
                             blk, d.subsample_seed)

        stream = Stream.build(
            order,
            {n: subsample(built[n].splits["train"], d.max_train_tokens_per_domain, blk,
                          d.subsample_seed)
             for n in order},
            {n: scored(n) for n in order},
            c.tokens_per_stage, cache=cfg.train.cache_features, eval_split=c.eval_split,
            retention=(c.retention.name, scored(c.retention.name)) if c.retention else None)
        if args.checkpoint is not None:
            return score_checkpoint(cfg, args, accelerator, stream, tokenizer)
        batches_per_stage(c, cfg.train.batch_size, blk, accelerator.num_processes)
    except (ConfigError, DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    accelerator.print(format_report([built[n] for n in built]))
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
            if cfg.train.cache_features and not runs:  # once: every model shares the trunk
                with accelerator.main_process_first():
                    stream.cache_on_disk(model, cfg.data.cache_dir, cfg.train.batch_size,
                                         [x.name for x in cfg.data.domains],
                                         accelerator.is_local_main_process)
            if mcfg.head in SPIKING_HEADS and mcfg.dictionary_init == "data":
                first = order[0]  # the data the sequence starts with, as a fresh run would
                model.head.init_from_data(sample_states(
                    model, stream.train[first], (stream.train_caches or {}).get(first),
                    8 * mcfg.n_neurons, seed))

            def log(row, name=method.name, seed=seed):
                nonlocal wb_step
                wb_step += 1
                flat = {f"{name}/seed{seed}/{c.eval_split}_bits_per_char/{dom}":
                        r.get("bits_per_char") for dom, r in row["row"].items()}
                if row.get("retention"):
                    flat[f"{name}/seed{seed}/retention_bits_per_char"] = \
                        row["retention"].get("bits_per_char")
                flat |= {f"{name}/seed{seed}/train_loss": row["train_loss"],
                         f"{name}/seed{seed}/stage": row["stage"]}
                tracker.log({k: v for k, v in flat.items() if v is not None}, wb_step)

            res = run_sequence(model, method, stream, c, cfg.train, seed, accelerator,
                               diagnostics=True, log=log)
            runs.setdefault(method.name, []).append(res)
            accelerator.print(f"[{method.name} seed {seed}] "
                              f"{'STOPPED' if 'failed' in res else 'done'} in "
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


if __name__ == "__main__":
    sys.exit(main())
