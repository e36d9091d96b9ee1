"""Continual learning: train one model through a sequence of domains, scoring every domain's
TEST split before any training and after each stage (the matrices R of
`hybridlm.continual.metrics`). The methods (a config entry each: a head, `model` overrides,
EWC, replay, DER++, joint training) are explained in `hybridlm.continual.methods`.

Every method sees the same number of optimizer steps and tokens per stage, the same stage
blocks in the same order, from the same seed; with replay, part of each batch is replayed
blocks instead of new ones (same tokens, fewer new-domain tokens). Each stage starts a fresh
AdamW with a warmup + cosine schedule (fine-tuning on each domain in turn); the Hebbian
learner and its gate persist across stages (the gate sees the loss jump at a domain switch).

The trunk's features come from the feature caches of the `Stream` (on disk in a normal run,
shared with `make train`), shared by all stages, methods and seeds. A general text in none
of the domains (`continual.retention`) is scored with every row: it shows a head that adapts
to the domains by breaking what the trunk knew.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from hybridlm.config import ContinualConfig, MethodConfig, TrainConfig
from hybridlm.continual.methods import EWC, NonFiniteStage, Reservoir, replay_logits
from hybridlm.continual.metrics import HIGHER_IS_BETTER, all_metrics
from hybridlm.continual.stream import Stream, batches_per_stage, require_split, stage_blocks
from hybridlm.corpora import DataError
from hybridlm.engine import Engine, NonFiniteLoss, make_optimizer
from hybridlm.evaluation import evaluate, ranks_agree

SCORES = tuple(HIGHER_IS_BETTER)  # accuracy, loss, perplexity


# ---- processes --------------------------------------------------------------------------------
def head_state(base) -> torch.Tensor:
    """The head's weights and buffers and any other trainable parameter, flattened: what
    training changes (the frozen encoder is the same everywhere)."""
    parts = [t.detach().flatten().double().cpu() for t in base.head.state_dict().values()]
    parts += [p.detach().flatten().double().cpu() for n, p in base.named_parameters()
              if p.requires_grad and not n.startswith("head.")]
    return torch.cat(parts)


# ---- evaluation -----------------------------------------------------------------------------
def evaluate_row(model, stream: Stream, accelerator, batch_size: int) -> dict[str, dict]:
    """Every domain's TEST split (validation in a tuning run) scored by `evaluate`
    (gather_for_metrics inside)."""
    row = {}
    for d in stream.order:
        blocks = stream.test[d]
        require_split(blocks, stream.eval_split)
        cache = stream.test_caches[d] if stream.test_caches else None
        row[d] = evaluate(model, blocks, accelerator, batch_size, cache)
    return row


def evaluate_retention(model, stream: Stream, accelerator, batch_size: int) -> dict | None:
    """The general text's scores (None when the stream has none)."""
    if stream.retention is None:
        return None
    require_split(stream.retention, stream.eval_split)
    return evaluate(model, stream.retention, accelerator, batch_size, stream.retention_cache)


def layer_diagnostics(model, stream: Stream, accelerator, batch_size: int,
                      time_steps: list[int]) -> dict[int, dict]:
    """Energy-based heads: every domain's scores and layer statistics (firing rate, spikes
    per token, settled energy F_T / F_0, code density) with T inner steps at evaluation,
    without retraining, per T."""
    out = {}
    for t in time_steps:
        out[t] = {}
        for d in stream.order:
            require_split(stream.test[d], stream.eval_split)
            cache = stream.test_caches[d] if stream.test_caches else None
            out[t][d] = evaluate(model, stream.test[d], accelerator, batch_size, cache,
                                 time_steps=t)
    return out


# ---- training -------------------------------------------------------------------------------
def run_sequence(model, method: MethodConfig, stream: Stream, cc: ContinualConfig,
                 tc: TrainConfig, seed: int, accelerator, diagnostics: bool = False,
                 log: Callable[[dict], None] | None = None) -> dict:
    """Train `model` through `stream.order` with `method`; returns the matrices R (rows:
    stages, columns: domains in training order) of every score, the untrained row b, the
    retention text's scores before and after every stage, per-stage tokens, steps and
    timings, and the metrics of each score. A joint method trains one stage on every
    domain's stage blocks at once and has a final row instead of R. A stage whose loss stays
    non-finite ends the sequence: the result then says so (`failed`) and keeps the rows of
    the stages before it."""
    model = accelerator.prepare(model)
    base = accelerator.unwrap_model(model)
    device = accelerator.device
    order = stream.order
    block = stream.train[order[0]].ids.shape[1]
    n_stage_blocks = max(1, cc.tokens_per_stage // block)
    b = min(tc.batch_size, n_stage_blocks)
    steps_per_epoch = max(1, n_stage_blocks // b)
    world, rank = accelerator.num_processes, accelerator.process_index
    local = base.local_learning()
    ewc = EWC(method.ewc_lambda) if method.ewc_lambda > 0 else None
    reservoir = Reservoir(method.replay_size, seed) if method.replay_size > 0 else None
    # DER++: (corrected state y (L, D), LM bias of that moment) of every buffered block
    stored: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def reduce_mean(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, "mean") if world > 1 else t

    def make_batch(items: list[tuple[str, int]]):
        ids = torch.stack([stream.train[d].ids[i] for d, i in items])  # (B, L)
        mask = torch.stack([stream.train[d].mask[i] for d, i in items])
        labels = ids.masked_fill(~mask, -100)
        feats = None
        if stream.train_caches is not None:
            parts: dict[str, list[tuple[int, int]]] = {}
            for pos, (d, i) in enumerate(items):
                parts.setdefault(d, []).append((pos, i))
            rows: list[torch.Tensor | None] = [None] * len(items)
            for d, lst in parts.items():
                pos, idx = zip(*lst, strict=True)
                f = stream.train_caches[d].features(base, torch.tensor(idx), ids[list(pos)])
                for k, p in enumerate(pos):
                    rows[p] = f[k]
            feats = torch.stack(rows).to(device)  # (B, L, D)
        return ids.to(device), labels.to(device), feats, int(mask.sum())

    def batches(items: list, s: int) -> list[tuple[list, int]]:
        """The stage's plan: (blocks, how many of them are replayed) per batch, seeded."""
        n_replay = round(cc.replay_fraction * b) if reservoir and reservoir.items else 0
        per_epoch = steps_per_epoch * (len(order) if method.joint else 1)
        plan = []
        for epoch in range(cc.epochs_per_stage):
            perm = random.Random(seed * 7919 + s * 31 + epoch).sample(items, len(items))
            cursor = 0
            for _ in range(per_epoch):
                new = [perm[(cursor + k) % len(perm)] for k in range(b - n_replay)]
                cursor += b - n_replay
                plan.append((new + reservoir.draw(n_replay) if n_replay else new, n_replay))
        return plan

    def train_stage(plan: list[tuple[list, int]], s: int, label: str) -> dict:
        """Optimizer steps over this process's share of `plan`. The plan is the same for
        every process (the reservoir is too: same seed, same offers, same draws); each takes
        its share of whole batches, and one optimizer step averages the ranks' batches
        (DDP), so W processes of batch b step like one process of batch W * b."""
        batches_per_stage(cc, tc.batch_size, block, world)  # raises if len(plan) < world
        plan = plan[: len(plan) // world * world]
        mine = plan[rank::world]
        optimizer = accelerator.prepare(make_optimizer(base, tc.lr, tc.weight_decay))
        total_steps = len(mine)  # optimizer steps this stage, the same on every process
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(tc.warmup_fraction * total_steps), total_steps)
        # short stages: every step failed
        engine = Engine(accelerator, model, optimizer, scheduler, tc.max_grad_norm, local,
                        patience=min(10, len(mine)))
        model.train()
        tokens = 0
        losses, gates, penalties, distill = [], [], [], []
        for items, n_rep in mine:
            ids, labels, feats, n_tok = make_batch(items)
            tokens += n_tok
            with accelerator.autocast():
                out = model(input_ids=ids, labels=labels, features=feats)
            loss = total = out.loss
            penalty = ewc.penalty(base) if ewc else None
            if penalty is not None:
                total = total + penalty
                penalties.append(penalty.item())
            if method.der_alpha > 0 and n_rep:
                rep = items[-n_rep:]
                with torch.no_grad():
                    target = torch.stack([replay_logits(base, stored[it][0].to(device),
                                                        stored[it][1]) for it in rep])
                real = labels[-n_rep:] != -100  # (R, L): real tokens only
                der = (out.logits[-n_rep:][real].float() - target[real].float()).pow(2).mean()
                total = total + method.der_alpha * der
                distill.append(der.item())
            # the gate reads the next-token loss, not the method's penalties
            try:
                stepped = engine.step(total, out.local_statistic, gate_loss=loss)
            except NonFiniteLoss:
                raise NonFiniteStage(
                    f"[{method.name} seed {seed}] loss NaN/inf for {engine.bad_in_a_row} steps "
                    f"in a row in stage {s + 1} ({label}); the stages before it are kept; "
                    "lower train.lr") from None
            if stepped is None:  # non-finite on some rank: every rank skipped it
                continue
            if local is not None:
                gates.append(stepped["plasticity/gate"])
            losses.append(loss.item())
        train_loss = sum(losses) / len(losses) if losses else None
        der = sum(distill) / len(distill) if distill else None
        if world > 1:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=device), "sum").item())
            if train_loss is not None:  # every rank takes the same (non-skipped) steps
                train_loss = float(reduce_mean(torch.tensor(train_loss, device=device)))
            if der is not None:  # each rank distils its own replayed blocks
                der = float(reduce_mean(torch.tensor(der, device=device)))
        return {"domain": label, "steps": len(mine), "batches": len(plan), "tokens": tokens,
                "token_slots": len(plan) * b * block,  # equal for every method by design
                "replayed_per_batch": plan[0][1] if plan else 0,
                "skipped_steps": engine.skipped,
                "train_loss": train_loss,
                "gate_mean": sum(gates) / len(gates) if gates else None,
                "ewc_penalty_mean": sum(penalties) / len(penalties) if penalties else None,
                "der_distillation_mean": der,
                "_mine": mine}

    @torch.no_grad()
    def store_outputs() -> None:
        """DER++: the corrected states of newly buffered blocks under the current model."""
        buffered = set(reservoir.items)
        for key in [k for k in stored if k not in buffered]:
            del stored[key]
        new = [it for it in reservoir.items if it not in stored]
        bias = None if base.lm_bias is None else base.lm_bias.detach().clone()
        was_training = base.training
        base.eval()
        for k in range(0, len(new), b):
            chunk = new[k: k + b]
            ids, labels, feats, _ = make_batch(chunk)
            y = base.corrected_state(ids, feats, token_mask=labels != -100)
            for it, row in zip(chunk, y, strict=True):
                stored[it] = (row.cpu(), bias)
        base.train(was_training)

    def score(rows: list, retained: list) -> None:
        t0 = time.perf_counter()
        rows.append(evaluate_row(model, stream, accelerator, tc.batch_size))
        retained.append(evaluate_retention(model, stream, accelerator, tc.batch_size))
        timings["eval"] += time.perf_counter() - t0

    timings = {"train": 0.0, "eval": 0.0, "fisher": 0.0, "diagnostics": 0.0}
    rows: list[dict] = []
    retained: list[dict | None] = []
    score(rows, retained)  # b: untrained
    stages = []
    sync: list[dict] = []  # with several processes: do the ranks hold identical state?
    failed = None
    sequence = [(0, "joint")] if method.joint else list(enumerate(order))
    for s, dom in sequence:
        t0 = time.perf_counter()
        if method.joint:  # the sequence's own blocks, every stage's at once
            items = [(d, i) for k, d in enumerate(order)
                     for i in stage_blocks(len(stream.train[d]), n_stage_blocks, seed, k)]
        else:
            items = [(dom, i) for i in stage_blocks(len(stream.train[dom]), n_stage_blocks,
                                                   seed, s)]
        try:
            stage = train_stage(batches(items, s), s, dom)
        except NonFiniteStage as e:
            failed = {"stage": s + 1, "domain": dom, "message": str(e)}
            accelerator.print(f"error: {e}")
            break
        mine = stage.pop("_mine")
        timings["train"] += time.perf_counter() - t0
        if ewc is not None and s < len(order) - 1:  # no later stage uses the last Fisher
            t0 = time.perf_counter()
            # each rank's share of the first fisher_batches global batches; consolidate
            # averages each batch's gradient over ranks before squaring (global-batch Fisher)
            ewc.consolidate(base, [make_batch(it)[:3] for it, _ in mine[: cc.fisher_batches]],
                            reduce_mean)
            timings["fisher"] += time.perf_counter() - t0
        if reservoir is not None:
            for item in items:
                reservoir.add(item)
            if method.der_alpha > 0:
                store_outputs()
        if world > 1:  # local updates, Fisher and buffer are made outside DDP: check them
            sync.append({"stage": s, "weights": ranks_agree(accelerator, head_state(base))}
                        | ({"fisher": ranks_agree(accelerator, ewc.flat_fisher())} if ewc else {})
                        | ({"replay": ranks_agree(accelerator, reservoir.fingerprint())}
                           if reservoir else {}))
        score(rows, retained)
        row = rows[-1]
        stages.append(stage)
        if log is not None:
            log({"stage": s, "domain": dom, "row": row, "retention": retained[-1]} | stage)
        accelerator.print(f"[{method.name} seed {seed}] stage {s + 1}/{len(sequence)} ({dom}): "
                          + ", ".join(f"{d} {r['loss']:.3f}" for d, r in row.items())
                          + (f", retention {retained[-1]['loss']:.3f}" if retained[-1] else ""))

    scores = [k for k in SCORES if k in rows[0][order[0]]]  # bits/char needs `chars` data
    result = {"method": method.name, "seed": seed, "order": order, "joint": method.joint,
              "trainable_parameters": base.trainable_parameters(),
              "head_parameters": base.head_parameters(),
              "baseline": {k: [rows[0][d][k] for d in order] for k in scores},
              "rows": [{k: [r[d][k] for d in order] for k in scores} for r in rows[1:]],
              "stages": stages, "processes": world}
    if retained[0] is not None:
        result["retention"] = {k: [r[k] for r in retained] for k in scores}  # [b, stages...]
    if sync:
        result["ranks_identical"] = sync
    for key in ("firing_rate", "active_fraction", "relative_energy", "spikes_per_token"):
        if key in rows[0][order[0]]:  # row 0: untrained
            result[key] = [[r[d][key] for d in order] for r in rows]
    if failed is not None:
        result["failed"] = failed
    elif method.joint:
        result["final"] = result["rows"][0]
        result["metrics"] = {k: {"ACC": sum(result["final"][k]) / len(order), "BWT": None,
                                 "FWT": None, "forgetting": None} for k in scores}
    else:
        result["R"] = {k: [r[k] for r in result["rows"]] for k in scores}
        result["metrics"] = {k: all_metrics(result["R"][k], result["baseline"][k], k)
                             for k in scores}
    if diagnostics and failed is None and "relative_energy" in rows[0][order[0]]:
        t0 = time.perf_counter()
        trained = base.config.time_steps
        by_t = layer_diagnostics(model, stream, accelerator, tc.batch_size,
                                 sorted(set(cc.eval_time_steps) - {trained}))
        by_t[trained] = rows[-1]  # the last row is already scored at the trained T
        result["diagnostics"] = {"trained_time_steps": trained,  # keys: str(T), as in JSON
                                 "by_T": {str(t): by_t[t] for t in sorted(by_t)}}
        timings["diagnostics"] += time.perf_counter() - t0
    result["seconds"] = timings
    accelerator.free_memory()  # drop the references prepare() kept to this run's objects
    return result


def check_checkpoint_tokenizer(folder, data_tokenizer) -> None:
    """Raise DataError when a saved model folder's tokenizer differs from the data's."""
    from transformers import AutoTokenizer

    from hybridlm.data import tokenizer_fingerprint

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise DataError(f"checkpoint '{folder}' has no readable tokenizer: {e}") from e
    if tokenizer_fingerprint(tok) != tokenizer_fingerprint(data_tokenizer):
        raise DataError(
            f"checkpoint '{folder}' was saved with a different tokenizer than the one of "
            "config key 'model.encoder' that builds this config's data: its token ids would "
            "mean other words; evaluate it with the config it was trained with")
