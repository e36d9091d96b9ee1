"""Train hybrid language models on the configured text domains.

    python train/train.py --config configs/default.yaml [section.key=value ...] [--resume]

Each head in `train.heads` is trained in turn on the same blocks, in the same order, from the
same seed, so the spiking head and its parameter-matched baseline see exactly the same tokens
(`hybridlm.training`). This script is the recipe: config, trunk, data, cached trunk features,
baselines, each head, then the results table, figure and model cards, written once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from accelerate.utils import broadcast_object_list
from transformers.utils import logging as hf_logging

from hybridlm import hub
from hybridlm.checkpoints import blocks_sha256, resume_point, run_identity, tokenizer_identity
from hybridlm.config import ConfigError, load_config
from hybridlm.corpora import DataError
from hybridlm.data import build_corpora, format_report, subsample
from hybridlm.evaluation import Blocks
from hybridlm.features import cache_report, trunk_fingerprint
from hybridlm.io import write_json_atomic, write_text_atomic
from hybridlm.launch import launch_identity
from hybridlm.modeling import HybridForCausalLM, model_kwargs
from hybridlm.results import results_figure, results_table, worse_than_trunk
from hybridlm.rundir import RunDir, config_differences
from hybridlm.streaming import TrainStream, check_first_batch
from hybridlm.training import (
    IndexedBlocks,
    feature_caches,
    make_accelerator,
    ngram_baselines,
    score_trunk,
    train_head,
)
from hybridlm.trunks import TrunkError, load_tokenizer, resolve_trunk

hf_logging.disable_progress_bar()  # a bar per weight load would drown the training log


def parse_args(argv=None):
    from hybridlm.config import keys_help

    p = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_intermixed_args(argv)  # overrides before and after flags


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, until the run ends
            return run_training(args, held)
    except KeyboardInterrupt:
        print("\nerror: interrupted; the run's checkpoints are kept: run the same command "
              "with --resume to continue", file=sys.stderr)
        return 130
    except OSError as e:  # a write failed (disk full, folder made read-only, ...)
        print(f"error: {e}; the run's checkpoints are kept: fix the cause (free disk space, "
              "permissions), then run the same command with --resume", file=sys.stderr)
        return 2


def check_output_dir(run: RunDir, cfg, resume: bool) -> None:
    """Refuse a folder that holds another run's results (without --resume), or results made
    with another config (with it), naming the keys that differ."""
    run.check_place()
    if not run.holds_results():
        return  # empty, or left by a run that stopped before its first checkpoint
    if not resume:
        raise ConfigError(
            f"output_dir '{run.root}' already holds files: pass --resume to continue that run, "
            "or choose another output_dir (nothing was changed)"
        )
    if not run.config.is_file():
        return
    try:
        saved = yaml.safe_load(run.config.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--resume: {run.config} is unreadable ({str(e).splitlines()[0][:200]}): restore "
            "it, or delete it to resume with the config given now (the checkpoints still "
            "check the model, tokenizer, trunk and data)") from e
    differ = config_differences(saved if isinstance(saved, dict) else {}, cfg.to_dict())
    if differ:
        raise ConfigError(
            f"--resume: output_dir '{run.root}' holds a run with another config "
            f"({run.config}: {'; '.join(differ)}); resume with that config or choose another "
            "output_dir")


def lock_output_dir(run: RunDir, cfg, resume: bool, accelerator, held: contextlib.ExitStack
                    ) -> None:
    """Take the run folder's lock for the rest of the run (the main process) and check the
    folder again under it: two runs started at once on one folder cannot both pass."""
    problem = None
    if accelerator.is_main_process:
        try:
            held.enter_context(run.lock())
            check_output_dir(run, cfg, resume)
        except ConfigError as e:
            problem = str(e)
    if accelerator.num_processes > 1:  # every process exits on the main process's refusal
        problem = broadcast_object_list([problem])[0]
    if problem:
        raise ConfigError(problem)


def run_training(args, held: contextlib.ExitStack) -> int:
    run_start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        run = RunDir(Path(cfg.output_dir))
        out = run.root
        check_output_dir(run, cfg, args.resume)  # early, before minutes of work; again below
        accelerator = make_accelerator(cfg)
        start = time.perf_counter()
        with accelerator.main_process_first():  # one process converts a GGUF trunk
            trunk = resolve_trunk(cfg.model.encoder, cfg.data.cache_dir)
        convert_seconds = time.perf_counter() - start
        accelerator.print(f"trunk: {trunk.note} ({trunk.kind}; ready in {convert_seconds:.1f} s)")
        tokenizer = load_tokenizer(trunk, cfg.data.block_size)
        # the zero-shot trunk: its checks run here, before anything is written
        trunk_model = HybridForCausalLM.from_encoder(cfg.model.encoder, cfg.data.cache_dir,
                                                     **model_kwargs(cfg.model) | {"head": "trunk"})
        with accelerator.main_process_first():
            domains = build_corpora(cfg.data, tokenizer, accelerator.is_local_main_process)
        accelerator.print(format_report(domains))
        d = cfg.data
        streamed = any(dom.streaming for dom in d.domains)  # all or none (config.py)
        if streamed:  # this rank's shards (hybridlm/streaming.py), checked here
            train_parts = []
            splits = {"train": TrainStream(d.domains, d, tokenizer, cfg.train.batch_size,
                                           accelerator.process_index, accelerator.num_processes),
                      "train_tokens": None}
            check_first_batch(splits["train"], accelerator)
        else:
            train_parts = [Blocks(subsample(dom.splits["train"], d.max_train_tokens_per_domain,
                                            d.block_size, d.subsample_seed)) for dom in domains]
            splits = {"train": IndexedBlocks(train_parts),
                      "train_tokens": sum(p.tokens() for p in train_parts)}
        for split in ("validation", "test"):
            splits[split] = {dom.name: Blocks(subsample(
                dom.splits[split], d.max_eval_tokens_per_domain, d.block_size, d.subsample_seed))
                for dom in domains}
        # a stream is identified by a SHA-256 of its whole text (its held-out pass reads it)
        data_id = {dom.name: blocks_sha256(
            ([] if streamed else [train_parts[i]])
            + [splits["validation"][dom.name], splits["test"][dom.name]])
            + dom.stats.get("stream_sha256", "") for i, dom in enumerate(domains)}
        tokenizer_id = tokenizer_identity(tokenizer)
        identities = {h: run_identity(HybridForCausalLM.config_class.model_type, h,
                                      asdict(cfg.model), tokenizer_id,
                                      trunk_fingerprint(trunk_model), data_id,
                                      launch_identity(accelerator), cfg.train.mixed_precision)
                      for h in cfg.train.heads}
        lock_output_dir(run, cfg, args.resume, accelerator, held)  # the first write
        resume_from = {h: resume_point(run.checkpoints(h), identities[h])
                       if args.resume else None
                       for h in cfg.train.heads}
    except (ConfigError, DataError, TrunkError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    caches = {}
    if cfg.train.cache_features:
        start = time.perf_counter()
        caches = feature_caches(trunk_model, splits, cfg, accelerator)
        report = cache_report(list(caches.values()))
        report["seconds"] = round(time.perf_counter() - start, 1)
        tokens = sum(b.tokens() for b in train_parts) + sum(
            b.tokens() for s in ("validation", "test") for b in splits[s].values())
        if report["entries_built"]:
            report["trunk_tokens_per_second"] = round(tokens / max(report["encode_seconds"], 1e-9))
        accelerator.print(
            f"trunk features: {report['entries_built']} split(s) encoded in "
            f"{report['encode_seconds']:.1f} s, {report['entries_reused']} reused from the disk "
            f"cache (saving {report['seconds_saved']:.1f} s); {report['bytes'] / 2**20:.0f} MiB")

    if accelerator.is_main_process:
        write_text_atomic(run.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    results = {}
    if accelerator.is_main_process and not streamed:  # n-grams count the whole training set
        results |= ngram_baselines(splits, trunk_model.config.encoder_config.vocab_size)
    for head in cfg.train.heads:
        done = run.metrics(head)
        if args.resume and done.is_file():
            try:
                results[head] = json.loads(done.read_text())
                accelerator.print(f"[{head}] already finished: {done}")
                continue
            except (ValueError, OSError) as e:  # damaged: its checkpoints finish it again
                accelerator.print(f"[{head}] {done} is unreadable ({type(e).__name__}): "
                                  "resuming the head from its newest checkpoint instead")
        if head == "trunk":
            results[head] = score_trunk(trunk_model, splits, caches, cfg, accelerator)
            accelerator.print("[trunk] zero-shot val ppl: " + ", ".join(
                f"{n} {r['perplexity']:.2f}" for n, r in results[head]["validation"].items()))
            if accelerator.is_main_process:
                write_json_atomic(done, results[head])
            continue
        try:
            results[head] = train_head(head, cfg, splits, caches, tokenizer, run,
                                       identities[head], resume_from[head], results.get("trunk"),
                                       use_wandb=not args.no_wandb)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
            if accelerator.is_main_process:  # the heads that did finish keep a card
                for h, r in results.items():
                    if (run.model(h) / "config.json").is_file():
                        hub.write_model_card(run.model(h), r, None, cfg)
            return 3

    names = [dom.name for dom in domains]
    models = {h: {k: r.get(k) for k in ("trainable_parameters", "head_parameters", "learning",
                                        "validation", "test", "epoch_seconds",
                                        "ranks_identical", "time_sweep",
                                        "operations_per_token") if k in r}
              for h, r in results.items()}
    summary = {
        "trunk": {"name": trunk.name, "kind": trunk.kind, "note": trunk.note,
                  "ready_seconds": round(convert_seconds, 1)},
        "heads": models,
        "data": {dom.name: {k: v for k, v in dom.stats.items() if k != "cached"}
                 for dom in domains},
        "train_tokens_per_epoch": splits["train_tokens"],
        "seconds": time.perf_counter() - run_start,
        "processes": accelerator.num_processes,
        "worse_than_trunk": worse_than_trunk(models),
    }
    if caches:
        summary["feature_cache"] = report
    if accelerator.is_main_process:
        tables = {s: results_table(models, names, s) for s in ("validation", "test")}
        summary["results_table"] = tables["validation"]
        write_json_atomic(run.summary, summary)
        for h, r in results.items():  # each model's card, with the run's results table
            if (run.model(h) / "config.json").is_file():
                hub.write_model_card(run.model(h), r, summary, cfg)
        note = ("SmolLM2's web pretraining may already contain these public-domain and "
                "open-source texts (Shakespeare, the Python standard library and docs, common "
                "licences): read the trunk's zero-shot row with that in mind."
                if "smollm2" in trunk.name.lower() else "")
        worse = ("Heads that ended worse than the trunk they started from (validation mean "
                 f"bits/char): {', '.join(summary['worse_than_trunk'])}."
                 if summary["worse_than_trunk"] else "")
        tokens = f"Training tokens: {splits['train_tokens']:,} (one pass per epoch, " \
            f"{cfg.train.epochs} epoch(s))" if not streamed else \
            f"Training text streamed: {cfg.train.max_steps} optimizer steps"
        text = (f"Trunk: {trunk.note}. {tokens}, seed {cfg.seed}.\n\n"
                f"## Validation\n\n{tables['validation']}\n\n## Test\n\n{tables['test']}\n\n"
                f"{note}\n\n{worse}\n")
        write_text_atomic(run.results_md, text)
        run.results_png.write_bytes(results_figure(models, names, "validation"))
        print(f"\nValidation: perplexity / bits per character per domain\n{tables['validation']}")
        if worse:
            print(worse)
        print(f"\nWrote {run.results_md}, {run.summary} and the model folders "
              f"{out}/<head>/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
