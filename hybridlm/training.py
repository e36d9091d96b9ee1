"""`make train`: train every head of `train.heads` on the same blocks, order and seed, and
score them beside the trunk alone and the n-gram baselines.

The shape follows transformers' `run_clm_no_trainer.py`: Accelerate, AdamW, warmup + cosine
schedule, clipping and accumulation, validation at intervals, `save_state` checkpoints, a
final `save_pretrained` folder and `metrics.json`. The step itself is `hybridlm.engine`'s;
the folder layout is `hybridlm.rundir`'s; the checkpoint schema is `hybridlm.checkpoints`'.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
import time

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from hybridlm import checkpoints, precision
from hybridlm.checkpoints import drop_keys, frozen_trunk_keys, latest_intact
from hybridlm.config import ConfigError, RunConfig
from hybridlm.engine import Engine, NonFiniteLoss, check_local_learning, make_optimizer
from hybridlm.evaluation import Blocks, evaluate, ranks_agree
from hybridlm.features import FeatureCache, sample_states
from hybridlm.heads import SPIKING_HEADS
from hybridlm.hub.folder import full_state_dict
from hybridlm.io import folder_atomic, write_json_atomic
from hybridlm.modeling import HybridForCausalLM, model_kwargs
from hybridlm.report import Run, log_plots
from hybridlm.rundir import History, RunDir
from hybridlm.streaming import (
    TrainStream,
    check_world_size,
    gather_positions,
    in_step,
    sum_over_ranks,
)
from hybridlm.tracking import Tracker


class IndexedBlocks(torch.utils.data.Dataset):
    """Several domains' blocks as one training set; `index` is the row in the feature cache."""

    def __init__(self, parts: list[Blocks]):
        self.data = ConcatDataset(parts)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return self.data[i] | {"index": torch.tensor(i)}


def make_accelerator(cfg: RunConfig) -> Accelerator:
    """A fresh Accelerator: it tracks the objects it prepared, and `save_state` writes all of
    them, so each head gets its own. The seedable sampler makes each epoch's order a function
    of (seed, epoch) alone, which a resumed run must reproduce. A launch under which the
    local rule would be silently wrong, that Accelerate runs as something else than the
    launcher asked for (`hybridlm.launch.check_launch`), or a precision the device cannot
    compute in (`hybridlm.precision`), is refused here, before any work."""
    accelerator = precision.make_accelerator(
        cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if cfg.model.learning != "bptt" and any(h in SPIKING_HEADS for h in cfg.train.heads):
        check_local_learning(accelerator)
    return accelerator


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


def ranks_identical(accelerator: Accelerator, model) -> bool:
    """True when every process holds bit-identical parameters and buffers (trivially with one
    process). DDP keeps gradient updates in step; local Hebbian updates are reduced by hand."""
    if accelerator.num_processes == 1:
        return True
    return ranks_agree(accelerator, torch.cat(
        [t.detach().flatten().double() for t in model.state_dict().values()]))


def whole_state_dict(accelerator: Accelerator, model) -> dict | None:
    """The state dict to save for `model` (prepared) where the engine splits its weights
    across ranks, else None (save_pretrained reads the model's own). Under DeepSpeed ZeRO-3
    each rank holds 1/world of every weight: Accelerate gathers them (it needs
    `zero3_save_16bit_model`, which configs/accelerate/zero3.yaml sets); under FSDP2 each rank
    holds a slice: `full_state_dict` gathers them to rank 0. Collectives: every rank calls it."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)
    return full_state_dict(accelerator.unwrap_model(model))


def layer_row(stats: dict) -> dict:
    """The spiking layer's diagnostics of a training batch, as logged (empty for other heads)."""
    if "rate" not in stats:
        return {}
    return {"snn/firing_rate": float(stats["rate"]),
            "snn/spikes_per_token": float(stats["spikes_per_token"]),
            "snn/energy_settled_over_initial": float(stats["relative_energy"]),
            "snn/max_neuron_rate": float(stats["max_neuron_rate"]),
            "snn/pc_energy": float(stats["pc_energy_loss"])}


def train_head(head: str, cfg: RunConfig, splits: dict, caches: dict, tokenizer,
               run: RunDir, identity: dict, resume_from=None, initial: dict | None = None,
               use_wandb: bool = True) -> dict:
    """Train one head on the pretrained trunk, or continue it from the checkpoint
    `resume_from`; returns its metrics (also written to the run folder). `initial`: the
    trunk's own scores (what every untrained head scores), if already measured."""
    t = cfg.train
    # -- setup: seed, model (the pretrained trunk + a head that starts as the identity) --------
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    # streamed domains (hybridlm/streaming.py): this rank's shards, read as training goes
    stream = splits["train"] if isinstance(splits["train"], TrainStream) else None
    model = HybridForCausalLM.from_encoder(cfg.model.encoder, cfg.data.cache_dir,
                                           **model_kwargs(cfg.model) | {"head": head})
    if head in SPIKING_HEADS and cfg.model.dictionary_init == "data":
        n_tokens = 8 * cfg.model.n_neurons
        train = splits["train"] if stream is None else stream.first_blocks(n_tokens // 16)
        model.head.init_from_data(sample_states(model, train, caches.get("train"), n_tokens,
                                                cfg.seed))
    # -- optimizer, data, schedule; prepared together, as `save_state` / `load_state` expect --
    optimizer = make_optimizer(model, t.lr, t.weight_decay)
    if stream is None:
        train_loader = DataLoader(splits["train"], batch_size=t.batch_size, shuffle=True)
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum_steps)
        total_steps = t.epochs * steps_per_epoch
    else:  # not prepared: Accelerate would read the whole stream on every rank
        model, optimizer = accelerator.prepare(model, optimizer)
        steps_per_epoch = total_steps = t.max_steps  # "once per epoch": at the end
    base = accelerator.unwrap_model(model)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(t.warmup_fraction * total_steps), total_steps
    )
    local = base.local_learning()  # the gated local rule (None in bptt mode, other heads)
    engine = Engine(accelerator, model, optimizer, scheduler, t.max_grad_norm, local)
    frozen = frozen_trunk_keys(base)  # left out of checkpoints: the pretrained trunk
    accelerator.register_save_state_pre_hook(lambda models, weights, _: drop_keys(weights, frozen))
    eval_every = t.eval_every or steps_per_epoch
    save_every = t.save_every or steps_per_epoch

    # -- where we are: fresh, or a checkpoint's progress -------------------------------------
    # data_sha256 chains the block indices of every batch trained on, in order (all ranks'):
    # equal digests mean a resumed run saw exactly the batches of an uninterrupted one.
    progress = {"step": 0, "epoch": 0, "batches_done": 0, "history": [], "epoch_seconds": [],
                "skipped_steps": 0, "data_sha256": "", "resumes": []}
    if resume_from is not None:
        progress = checkpoints.restore(accelerator, resume_from, base, frozen, scheduler, local)
        if stream is not None:
            check_world_size(progress["stream"], accelerator.num_processes, resume_from)
        accelerator.print(f"[{head}] resumed from {resume_from} (step {progress['step']})")
    history = History(run.history(head), progress["step"] if resume_from else None,
                      enabled=accelerator.is_main_process)
    tracker = Tracker(cfg, head, run.root, accelerator.is_main_process and use_wandb)
    train_cache = caches.get("train")

    def log(row: dict, step: int) -> None:
        tracker.log(row, step)
        history.append({"step": step} | row)

    def validate(step: int) -> dict:
        res = {d: evaluate(model, b, accelerator, t.batch_size, caches.get(("validation", d)))
               for d, b in splits["validation"].items()}
        row = {f"eval/{d}/perplexity": r["perplexity"] for d, r in res.items()}
        row |= {f"snn/{d}/firing_rate": r["firing_rate"] for d, r in res.items()
                if "firing_rate" in r}
        log(row, step)
        # a run resumed from its final checkpoint validates that step again: record it once
        if {"step": step} | row not in progress["history"]:
            progress["history"].append({"step": step} | row)
        return res

    if progress["step"] == 0 and not progress["history"]:
        # the untrained model is the trunk alone (every head starts at zero): score it once
        if initial is not None:
            row = {f"eval/{d}/perplexity": r["perplexity"]
                   for d, r in initial["validation"].items()}
            log(row, 0)
            progress["history"].append({"step": 0} | row)
        else:
            res = validate(0)
            accelerator.print(f"[{head}] before training, val ppl: "
                              + ", ".join(f"{d} {r['perplexity']:.1f}" for d, r in res.items()))

    # -- the loop --------------------------------------------------------------------------
    model.train()
    resuming = resume_from is not None
    last_validation = None  # reused as the final validation when training ends on one
    # a stream is read in passes until max_steps: epoch = pass, ended together on all ranks
    epochs = range(progress["epoch"], t.epochs) if stream is None else \
        itertools.count(progress["epoch"])
    for epoch in epochs:
        if stream is not None and progress["step"] == total_steps:
            break  # (also when resumed from the final checkpoint)
        if stream is None:
            train_loader.set_epoch(epoch)
            loader = train_loader
            if progress["batches_done"]:  # resumed mid-epoch: the same order, minus what was done
                loader = accelerator.skip_first_batches(train_loader, progress["batches_done"])
        else:
            stream.restart()
            if progress["batches_done"]:  # resumed mid-pass: this rank's saved position
                stream.load_position(progress["stream"]["ranks"][accelerator.process_index])
            loader = in_step(stream.batches(), sum_over_ranks(accelerator),
                             accelerator.num_processes)
        start = time.perf_counter()
        eval_seconds = 0.0
        bar = tqdm(loader, desc=f"{head} epoch {epoch + 1}" + (f"/{t.epochs}" if stream is None
                                                              else " (stream)"),
                   disable=not accelerator.is_local_main_process, leave=False,
                   initial=progress["batches_done"],
                   total=len(train_loader) if stream is None else None,
                   mininterval=0.1 if sys.stderr.isatty() else 30)  # logs: a line per 30 s
        for batch in bar:
            index = batch["index"]  # the blocks' indices, or a streamed batch's token digest
            if accelerator.num_processes > 1:
                index = accelerator.gather(index)
            progress["data_sha256"] = hashlib.sha256(
                (progress["data_sha256"] + str(index.tolist())).encode()).hexdigest()
            # forward (from cached trunk features when there are), then the engine's step
            with accelerator.accumulate(model):
                feats = None
                if train_cache is not None:
                    feats = train_cache.features(base, batch["index"], batch["input_ids"])
                with accelerator.autocast():
                    out = model(input_ids=batch["input_ids"], labels=batch["labels"],
                                features=feats)
                try:
                    stepped = engine.step(out.loss, out.local_statistic)
                except NonFiniteLoss:
                    last = latest_intact(run.checkpoints(head))
                    kept = f"the last good checkpoint is {last}" if last else "no checkpoint yet"
                    raise FloatingPointError(
                        f"[{head}] loss was NaN/inf for 10 steps in a row (step "
                        f"{progress['step']}); {kept}. Lower train.lr or check the data, then "
                        "rerun (--resume).") from None
            progress["batches_done"] += 1
            if stepped is None:  # non-finite on some rank: every rank skipped it
                progress["skipped_steps"] += 1
                continue
            last_validation = None
            if not accelerator.sync_gradients:  # accumulating
                continue
            progress["step"] += 1
            step = progress["step"]
            row = {"train/loss": out.loss.item(), "train/lr": scheduler.get_last_lr()[0],
                   "train/grad_norm": stepped.pop("train/grad_norm"), "train/epoch": epoch}
            row |= layer_row(out.head_stats) | stepped
            log(row, step)
            # refresh=False: in a log file the bar is redrawn every 30 s, not at every step
            bar.set_postfix(loss=f"{row['train/loss']:.3f}", refresh=False)
            if resuming:  # restart to first new step: the cost of a crash, besides lost steps
                resuming = False
                seconds = time.time() - psutil.Process().create_time()
                progress["resumes"].append({"from_step": step - 1,
                                            "seconds_to_first_step": round(seconds, 2)})
                accelerator.print(f"[{head}] resumed: first new step {step} done {seconds:.1f} s "
                                  "after the process started")
            if step % 10 == 0:  # a thinned history travels in the checkpoint and metrics.json
                progress["history"].append({"step": step} | row)
            if step % eval_every == 0 or step == total_steps:
                e0 = time.perf_counter()
                res = last_validation = validate(step)
                eval_seconds += time.perf_counter() - e0
                ppl = ", ".join(f"{d} {r['perplexity']:.1f}" for d, r in res.items())
                accelerator.print(f"[{head}] step {step}/{total_steps} val ppl: {ppl}")
            if step % save_every == 0 or step == total_steps:
                if stream is not None:  # every rank's position (a collective)
                    progress["stream"] = gather_positions(stream, accelerator)
                elif progress["batches_done"] == len(train_loader):
                    progress["epoch"], progress["batches_done"] = epoch + 1, 0
                checkpoints.save(accelerator, run.checkpoint(head, step), progress, scheduler,
                                 local, identity, t.keep_checkpoints)
            if stream is not None and step == total_steps:
                break
        if stream is not None and progress["batches_done"] == 0:  # (checked before training)
            raise ConfigError(f"[{head}] a pass of the streamed training text held no batch")
        progress["epoch_seconds"].append(time.perf_counter() - start - eval_seconds)
        progress["epoch"], progress["batches_done"] = epoch + 1, 0
    if progress["step"] == 0:  # nothing learned: no model, card or metrics as if finished
        raise FloatingPointError(
            f"[{head}] no training step was taken: the loss was NaN/inf in all "
            f"{progress['skipped_steps']} batch(es). Lower train.lr or check the data and the "
            "loss weights, then rerun.")

    # -- final scores: validation, test, and the trained layer at other T --------------------
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
    log_plots(tracker.run, Run(run.root, {}, {head: metrics}, cfg.to_dict()),
              step=progress["step"])
    tracker.summary({f"final/{s}/{d}/perplexity": r["perplexity"]
                     for s in ("validation", "test") for d, r in final[s].items()})
    tracker.finish()
    whole = whole_state_dict(accelerator, model) if t.save_model else None  # every rank
    if accelerator.is_main_process:
        if t.save_model:  # the card is written once, after every head, with the run's table
            with folder_atomic(run.model(head)) as folder:
                base.save_pretrained(folder, state_dict=whole)
                tokenizer.save_pretrained(folder)
        write_json_atomic(run.metrics(head), metrics)
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
        mp = cfg.train.mixed_precision  # bf16/fp16: encoded under it, stored in it
        if not isinstance(splits["train"], TrainStream):  # streamed: features per batch
            train = splits["train"].data.datasets
            caches["train"] = FeatureCache.on_disk(
                model, torch.cat([p.ids for p in train]), torch.cat([p.mask for p in train]),
                cfg.data.cache_dir, "train", cfg.train.batch_size, show, mp)
        for s in ("validation", "test"):
            for n, b in splits[s].items():
                caches[(s, n)] = FeatureCache.on_disk(model, b.ids, b.mask, cfg.data.cache_dir,
                                                      f"{s}-{n}", cfg.train.batch_size, show, mp)
    return caches


def score_trunk(model, splits: dict, caches: dict, cfg: RunConfig, accelerator) -> dict:
    """The trunk alone (the `trunk` head: nothing trained), on validation and test."""
    res = {s: {d: evaluate(model, b, accelerator, cfg.train.batch_size, caches.get((s, d)))
               for d, b in splits[s].items()} for s in ("validation", "test")}
    return {"head": "trunk", "trainable_parameters": 0, "head_parameters": 0,
            "learning": "-", "epoch_seconds": [], "ranks_identical": True} | res
