"""Train hybrid language models on the configured text domains.

    python train/train.py --config configs/default.yaml [section.key=value ...] [--resume]

The shape follows transformers' `run_clm_no_trainer.py`: Accelerate, AdamW, warmup + cosine
schedule, clipping and accumulation, validation at intervals, `save_state` checkpoints, a
final `save_pretrained` folder and `metrics.json`. Each head in `train.heads` is trained in
turn on the same blocks, in the same order, from the same seed, so the spiking head and its
parameter-matched baseline see exactly the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from hybridlm import hub
from hybridlm.checkpoints import (
    PROGRESS,
    check_saved_keys,
    drop_keys,
    file_checksums,
    frozen_trunk_keys,
    latest_intact,
    resume_point,
    run_identity,
    tokenizer_identity,
)
from hybridlm.config import ConfigError, RunConfig, load_config
from hybridlm.corpora import DataError
from hybridlm.data import build_corpora, format_report, subsample
from hybridlm.evaluation import Blocks, evaluate, ranks_agree
from hybridlm.features import FeatureCache, cache_report, sample_states, trunk_fingerprint
from hybridlm.heads import SPIKING_HEADS
from hybridlm.io import write_json_atomic, write_text_atomic
from hybridlm.modeling import HybridForCausalLM
from hybridlm.report import Run, log_plots
from hybridlm.results import results_figure, results_table, worse_than_trunk
from hybridlm.tracking import Tracker
from hybridlm.trunks import TrunkError, load_tokenizer, resolve_trunk

hf_logging.disable_progress_bar()  # a bar per weight load would drown the training log


class IndexedBlocks(torch.utils.data.Dataset):
    """Several domains' blocks as one training set; `index` is the row in the feature cache."""

    def __init__(self, parts: list[Blocks]):
        self.data = ConcatDataset(parts)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return self.data[i] | {"index": torch.tensor(i)}


def parse_args(argv=None):
    from hybridlm.config import keys_help

    p = argparse.ArgumentParser(description=__doc__, epilog=keys_help(),
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    p.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p.parse_args(argv)


def model_kwargs(cfg: RunConfig, head: str) -> dict:
    kw = asdict(cfg.model)
    kw.pop("encoder")
    return kw | {"head": head}


def operations(head: str, model, validation: dict) -> dict:
    """Multiply-adds and synaptic operations per token of a head (hybridlm.energy), with the
    spiking layer's measured validation firing rate, and the 45 nm energy estimate."""
    from hybridlm.energy import CAVEAT, RATE_STAT, energy_pj, head_ops
    from hybridlm.heads import mlp_hidden

    c = model.config
    d = c.encoder_config.hidden_size
    key = RATE_STAT.get(head, "firing_rate")
    rates = [r[key] for r in validation.values() if key in r]
    rate = sum(rates) / len(rates) if rates else None
    hidden = mlp_hidden(head, d, c)
    ops = head_ops(head, d, c.n_neurons, c.time_steps, hidden, rate)
    return ops | energy_pj(ops) | {"firing_rate": rate, "caveat": CAVEAT}


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """A fresh Accelerator: it tracks the objects it prepared, and `save_state` writes all of
    them, so each head gets its own. The seedable sampler makes each epoch's order a function
    of (seed, epoch) alone, which a resumed run must reproduce."""
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def ranks_identical(accelerator: Accelerator, model) -> bool:
    """True when every process holds bit-identical parameters and buffers (trivially with one
    process). DDP keeps gradient updates in step; local Hebbian updates are reduced by hand."""
    if accelerator.num_processes == 1:
        return True
    return ranks_agree(accelerator, torch.cat(
        [t.detach().flatten().double() for t in model.state_dict().values()]))


def train_head(head, cfg, args, splits, caches, tokenizer, out: Path, identity: dict,
               resume_from: Path | None, initial: dict | None = None) -> dict:
    """Train one head on the pretrained trunk, or continue it from the checkpoint
    `resume_from`; returns its metrics. `initial`: the trunk's own scores (what every
    untrained head scores), if already measured."""
    head_dir = out / head
    ckpt_dir = head_dir / "checkpoints"
    t = cfg.train
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    model = HybridForCausalLM.from_encoder(cfg.model.encoder, cfg.data.cache_dir,
                                           **model_kwargs(cfg, head))
    if head in SPIKING_HEADS and cfg.model.dictionary_init == "data":
        model.head.init_from_data(sample_states(model, splits["train"], caches.get("train"),
                                                8 * cfg.model.n_neurons, cfg.seed))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    train_loader = DataLoader(splits["train"], batch_size=t.batch_size, shuffle=True)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    base = accelerator.unwrap_model(model)
    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum_steps)
    total_steps = t.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(t.warmup_fraction * total_steps), total_steps
    )
    local = base.local_learning()  # the gated local rule (None in bptt mode, other heads)
    frozen = frozen_trunk_keys(base)  # left out of checkpoints: the pretrained trunk
    accelerator.register_save_state_pre_hook(lambda models, weights, _: drop_keys(weights, frozen))

    def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, "mean") if accelerator.num_processes > 1 else t
    eval_every = t.eval_every or steps_per_epoch
    save_every = t.save_every or steps_per_epoch

    # data_sha256 chains the block indices of every batch trained on, in order (all ranks'):
    # equal digests mean a resumed run saw exactly the batches of an uninterrupted one.
    progress = {"step": 0, "epoch": 0, "batches_done": 0, "history": [], "epoch_seconds": [],
                "skipped_steps": 0, "data_sha256": "", "resumes": []}
    if resume_from is not None:
        try:
            check_saved_keys(resume_from, base, frozen)
            accelerator.load_state(str(resume_from), strict=False)  # the trunk is not in it
        except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError) as e:
            reason = str(e).strip().splitlines()[0][:300]
            if isinstance(e, pickle.UnpicklingError):  # from torch.load(weights_only=True)
                reason = "a state file holds objects that would run code when unpickled; refused"
            raise ConfigError(
                f"--resume: checkpoint {resume_from} cannot be loaded into this model "
                f"({type(e).__name__}: {reason}); resume with the config it was made with, "
                "or choose another output_dir"
            ) from e
        progress = yaml.safe_load((resume_from / PROGRESS).read_text())
        progress.pop("identity")
        scheduler.load_state_dict(progress.pop("scheduler"))
        if local is not None:
            local.gate.load_state_dict(progress.pop("gate"))
            local.skipped = progress.pop("hebbian_skipped")
        progress.pop("files")
        accelerator.print(f"[{head}] resumed from {resume_from} (step {progress['step']})")

    tracker = Tracker(cfg, head, out, accelerator.is_main_process and not args.no_wandb)
    train_cache = caches.get("train")

    def validate(step: int) -> dict:
        res = {d: evaluate(model, b, accelerator, t.batch_size, caches.get(("validation", d)))
               for d, b in splits["validation"].items()}
        row = {f"eval/{d}/perplexity": r["perplexity"] for d, r in res.items()}
        row |= {f"snn/{d}/firing_rate": r["firing_rate"] for d, r in res.items()
                if "firing_rate" in r}
        tracker.log(row, step)
        # a run resumed from its final checkpoint validates that step again: record it once
        if {"step": step} | row not in progress["history"]:
            progress["history"].append({"step": step} | row)
        return res

    def save_checkpoint() -> None:
        folder = ckpt_dir / f"step_{progress['step']:07d}"
        accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()  # save_state writes on rank 0 without waiting
        if accelerator.is_main_process:
            # written last: its presence marks the checkpoint complete
            state = progress | {"scheduler": scheduler.state_dict(), "identity": identity,
                                "files": file_checksums(folder)}
            if local is not None:
                state["gate"] = local.gate.state_dict()
                state["hebbian_skipped"] = local.skipped
            write_text_atomic(folder / PROGRESS, yaml.safe_dump(state))
            for old in sorted(ckpt_dir.glob("step_*"))[: -t.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    if progress["step"] == 0 and not progress["history"]:
        # the untrained model is the trunk alone (every head starts at zero): score it once
        if initial is not None:
            row = {f"eval/{d}/perplexity": r["perplexity"]
                   for d, r in initial["validation"].items()}
            tracker.log(row, 0)
            progress["history"].append({"step": 0} | row)
        else:
            res = validate(0)
            accelerator.print(f"[{head}] before training, val ppl: "
                              + ", ".join(f"{d} {r['perplexity']:.1f}" for d, r in res.items()))
    model.train()
    resuming = resume_from is not None
    bad_in_a_row = 0
    last_validation = None  # reused as the final validation when training ends on one
    for epoch in range(progress["epoch"], t.epochs):
        train_loader.set_epoch(epoch)
        loader = train_loader
        if progress["batches_done"]:
            loader = accelerator.skip_first_batches(train_loader, progress["batches_done"])
        start = time.perf_counter()
        eval_seconds = 0.0
        bar = tqdm(loader, desc=f"{head} epoch {epoch + 1}/{t.epochs}",
                   disable=not accelerator.is_local_main_process, leave=False,
                   initial=progress["batches_done"], total=len(train_loader),
                   mininterval=0.1 if sys.stderr.isatty() else 30)  # logs: a line per 30 s
        for batch in bar:
            index = batch["index"]
            if accelerator.num_processes > 1:
                index = accelerator.gather(index)
            progress["data_sha256"] = hashlib.sha256(
                (progress["data_sha256"] + str(index.tolist())).encode()).hexdigest()
            with accelerator.accumulate(model):
                feats = None
                if train_cache is not None:
                    feats = train_cache.features(base, batch["index"], batch["input_ids"])
                with accelerator.autocast():
                    loss = model(input_ids=batch["input_ids"], labels=batch["labels"],
                                 features=feats).loss
                # every rank must agree to skip, or the gradient all-reduce would hang
                bad = (~torch.isfinite(loss.detach())).float()
                finite = accelerator.reduce(bad, "sum").item() == 0
                if finite:
                    if local is not None:  # the local rule's statistic, summed over micro-batches
                        local.collect(base.head.stats["local_statistic"])
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    if local is not None and accelerator.sync_gradients:
                        plasticity = local.step(loss, mean_over_processes)
                optimizer.zero_grad()
            progress["batches_done"] += 1
            if not finite:
                progress["skipped_steps"] += 1
                bad_in_a_row += 1
                if bad_in_a_row >= 10:
                    last = latest_intact(ckpt_dir)
                    kept = f"the last good checkpoint is {last}" if last else "no checkpoint yet"
                    raise FloatingPointError(
                        f"[{head}] loss was NaN/inf for 10 steps in a row (step {progress['step']})"
                        f"; {kept}. Lower train.lr or check the data, then rerun (--resume)."
                    )
                continue
            bad_in_a_row = 0
            last_validation = None
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            progress["step"] += 1
            step = progress["step"]
            row = {"train/loss": loss.item(), "train/lr": scheduler.get_last_lr()[0],
                   "train/grad_norm": float(grad_norm), "train/epoch": epoch}
            hs = base.head.stats
            if "rate" in hs:  # the spiking layer on this batch
                row |= {"snn/firing_rate": float(hs["rate"]),
                        "snn/spikes_per_token": float(hs["spikes_per_token"]),
                        "snn/energy_settled_over_initial": float(hs["relative_energy"]),
                        "snn/max_neuron_rate": float(hs["max_neuron_rate"]),
                        "snn/pc_energy": float(hs["pc_energy_loss"].detach())}
            if local is not None:
                row |= plasticity
            tracker.log(row, step)
            # refresh=False: in a log file the bar is redrawn every 30 s, not at every step
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", refresh=False)
            if resuming:  # restart to first new step: the cost of a crash, besides lost steps
                resuming = False
                seconds = time.time() - psutil.Process().create_time()
                progress["resumes"].append({"from_step": step - 1,
                                            "seconds_to_first_step": round(seconds, 2)})
                accelerator.print(f"[{head}] resumed: first new step {step} done {seconds:.1f} s "
                                  "after the process started")
            if step % 10 == 0:
                progress["history"].append({"step": step} | row)
            if step % eval_every == 0 or step == total_steps:
                e0 = time.perf_counter()
                res = last_validation = validate(step)
                eval_seconds += time.perf_counter() - e0
                ppl = ", ".join(f"{d} {r['perplexity']:.1f}" for d, r in res.items())
                accelerator.print(f"[{head}] step {step}/{total_steps} val ppl: {ppl}")
            if step % save_every == 0 or step == total_steps:
                if progress["batches_done"] == len(train_loader):
                    progress["epoch"], progress["batches_done"] = epoch + 1, 0
                save_checkpoint()
        progress["epoch_seconds"].append(time.perf_counter() - start - eval_seconds)
        progress["epoch"], progress["batches_done"] = epoch + 1, 0

    final = {"validation": last_validation or validate(progress["step"]),
             "test": {d: evaluate(model, b, accelerator, t.batch_size, caches.get(("test", d)))
                      for d, b in splits["test"].items()}}
    if head in SPIKING_HEADS:
        # does iterative inference help? the trained layer scored at other T, not retrained
        trained_t = cfg.model.time_steps
        final["time_sweep"] = {
            str(k): final["validation"] if k == trained_t else  # already scored
            {d: evaluate(model, b, accelerator, t.batch_size, caches.get(("validation", d)),
                         time_steps=k) for d, b in splits["validation"].items()}
            for k in sorted({1, 2, 4, trained_t, 2 * trained_t})}
    metrics = {
        "head": head,
        "ranks_identical": ranks_identical(accelerator, base),
        "trainable_parameters": base.trainable_parameters(),
        "head_parameters": base.head_parameters(),
        "optimizer_steps": progress["step"],
        "skipped_steps": progress["skipped_steps"],
        "learning": cfg.model.learning if head in SPIKING_HEADS else "bptt",
        "operations_per_token": operations(head, base, final["validation"]),
        "skipped_hebbian_updates": local.skipped if local is not None else 0,
        "train_tokens_per_epoch": splits["train_tokens"],
        "epoch_seconds": progress["epoch_seconds"],
        "validation": final["validation"],
        "test": final["test"],
        "time_sweep": final.get("time_sweep"),
        "history": progress["history"],
        "data_sha256": progress["data_sha256"],
        "resumes": progress["resumes"],
    }
    log_plots(tracker.run, Run(out, {}, {head: metrics}, cfg.to_dict()), step=progress["step"])
    tracker.summary({f"final/{s}/{d}/perplexity": r["perplexity"]
                     for s in ("validation", "test") for d, r in final[s].items()})
    tracker.finish()
    if accelerator.is_main_process:
        if t.save_model:
            base.save_pretrained(head_dir / "model")
            tokenizer.save_pretrained(head_dir / "model")
            hub.write_model_card(head_dir / "model", metrics, None, cfg)
        write_json_atomic(head_dir / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    return metrics


def ngram_baselines(splits: dict, vocab_size: int) -> dict:
    """Unigram and Kneser-Ney bigram models fitted on the training blocks (all domains
    pooled), scored on exactly the tokens the heads predict."""
    from hybridlm.ngram import KneserNeyBigramLM, UnigramLM, score

    parts = splits["train"].data.datasets
    ids = torch.cat([p.ids for p in parts]).numpy()
    mask = torch.cat([p.mask for p in parts]).numpy()
    out = {}
    for name, model in (("unigram", UnigramLM.fit(ids, mask, vocab_size)),
                        ("kn_bigram", KneserNeyBigramLM.fit(ids, mask, vocab_size))):
        out[name] = {"trainable_parameters": None, "head": name}
        for split in ("validation", "test"):
            out[name][split] = {d: score(model, b.ids.numpy(), b.mask.numpy(), b.chars.numpy())
                                for d, b in splits[split].items()}
    return out


def feature_caches(model, splits: dict, cfg: RunConfig, accelerator) -> dict:
    """The frozen trunk's features of every split, from the disk cache or encoded now (the
    main process encodes, the others then read its entries)."""
    caches = {}
    with accelerator.main_process_first():
        show = accelerator.is_local_main_process
        train = splits["train"].data.datasets
        caches["train"] = FeatureCache.on_disk(
            model, torch.cat([p.ids for p in train]), torch.cat([p.mask for p in train]),
            cfg.data.cache_dir, "train", cfg.train.batch_size, show)
        for s in ("validation", "test"):
            for n, b in splits[s].items():
                caches[(s, n)] = FeatureCache.on_disk(model, b.ids, b.mask, cfg.data.cache_dir,
                                                      f"{s}-{n}", cfg.train.batch_size, show)
    return caches


def score_trunk(model, splits: dict, caches: dict, cfg: RunConfig, accelerator) -> dict:
    """The trunk alone (the `trunk` head: nothing trained), on validation and test."""
    res = {s: {d: evaluate(model, b, accelerator, cfg.train.batch_size, caches.get((s, d)))
               for d, b in splits[s].items()} for s in ("validation", "test")}
    return {"head": "trunk", "trainable_parameters": 0, "head_parameters": 0,
            "learning": "-", "epoch_seconds": [], "ranks_identical": True} | res


def main(argv=None) -> int:
    args = parse_args(argv)
    run_start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        out = Path(cfg.output_dir)
        if not args.resume and out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"output_dir '{out}' already holds files: pass --resume to continue that run, "
                "or choose another output_dir (nothing was changed)"
            )
        saved = out / "config.yaml"
        if args.resume and saved.is_file() and yaml.safe_load(saved.read_text()) != cfg.to_dict():
            raise ConfigError(
                f"--resume: output_dir '{out}' holds a run with another config ({saved}); "
                "resume with that config or choose another output_dir"
            )
        accelerator = make_accelerator(cfg)
        start = time.perf_counter()
        with accelerator.main_process_first():  # one process converts a GGUF trunk
            trunk = resolve_trunk(cfg.model.encoder, cfg.data.cache_dir)
        convert_seconds = time.perf_counter() - start
        accelerator.print(f"trunk: {trunk.note} ({trunk.kind}; ready in {convert_seconds:.1f} s)")
        tokenizer = load_tokenizer(trunk, cfg.data.block_size)
        # the zero-shot trunk: its checks run here, before anything is written
        trunk_model = HybridForCausalLM.from_encoder(cfg.model.encoder, cfg.data.cache_dir,
                                                     **model_kwargs(cfg, "trunk"))
        tokenizer_id = tokenizer_identity(tokenizer)
        identities = {h: run_identity(HybridForCausalLM.config_class.model_type, h,
                                      asdict(cfg.model), tokenizer_id,
                                      trunk_fingerprint(trunk_model))
                      for h in cfg.train.heads}
        resume_from = {h: resume_point(out / h / "checkpoints", identities[h])
                       if args.resume else None
                       for h in cfg.train.heads}
        with accelerator.main_process_first():
            domains = build_corpora(cfg.data, tokenizer, accelerator.is_local_main_process)
    except (ConfigError, DataError, TrunkError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    accelerator.print(format_report(domains))
    d = cfg.data
    train_parts = [Blocks(subsample(dom.splits["train"], d.max_train_tokens_per_domain,
                                    d.block_size, d.subsample_seed)) for dom in domains]
    splits = {"train": IndexedBlocks(train_parts),
              "train_tokens": sum(p.tokens() for p in train_parts)}
    for split in ("validation", "test"):
        splits[split] = {dom.name: Blocks(subsample(
            dom.splits[split], d.max_eval_tokens_per_domain, d.block_size, d.subsample_seed))
            for dom in domains}
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

    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    results = {}
    if accelerator.is_main_process:
        results |= ngram_baselines(splits, trunk_model.config.encoder_config.vocab_size)
    for head in cfg.train.heads:
        done = out / head / "metrics.json"
        if args.resume and done.is_file():
            import json

            results[head] = json.loads(done.read_text())
            accelerator.print(f"[{head}] already finished: {done}")
            continue
        if head == "trunk":
            results[head] = score_trunk(trunk_model, splits, caches, cfg, accelerator)
            accelerator.print("[trunk] zero-shot val ppl: " + ", ".join(
                f"{n} {r['perplexity']:.2f}" for n, r in results[head]["validation"].items()))
            if accelerator.is_main_process:
                write_json_atomic(done, results[head])
            continue
        try:
            results[head] = train_head(head, cfg, args, splits, caches, tokenizer, out,
                                       identities[head], resume_from[head], results.get("trunk"))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except FloatingPointError as e:
            print(f"error: {e}", file=sys.stderr)
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
        write_json_atomic(out / "metrics.json", summary)
        for h, r in results.items():  # the cards again, now with the run's results table
            if (out / h / "model" / "config.json").is_file():
                hub.write_model_card(out / h / "model", r, summary, cfg)
        note = ("SmolLM2's web pretraining may already contain these public-domain and "
                "open-source texts (Shakespeare, the Python standard library and docs, common "
                "licences): read the trunk's zero-shot row with that in mind."
                if "smollm2" in trunk.name.lower() else "")
        worse = ("Heads that ended worse than the trunk they started from (validation mean "
                 f"bits/char): {', '.join(summary['worse_than_trunk'])}."
                 if summary["worse_than_trunk"] else "")
        text = (f"Trunk: {trunk.note}. Training tokens: {splits['train_tokens']:,} (one pass "
                f"per epoch, {cfg.train.epochs} epoch(s)), seed {cfg.seed}.\n\n"
                f"## Validation\n\n{tables['validation']}\n\n## Test\n\n{tables['test']}\n\n"
                f"{note}\n\n{worse}\n")
        write_text_atomic(out / "results.md", text)
        (out / "results.png").write_bytes(results_figure(models, names, "validation"))
        print(f"\nValidation: perplexity / bits per character per domain\n{tables['validation']}")
        if worse:
            print(worse)
        print(f"\nWrote {out / 'results.md'}, {out / 'metrics.json'} and the model folders "
              f"{out}/<head>/model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
