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
from dataclasses import dataclass, field

import torch
from transformers import get_cosine_schedule_with_warmup

from hybridlm.config import ContinualConfig, MethodConfig, TrainConfig
from hybridlm.continual.methods import EWC, NonFiniteStage, Reservoir, replay_logits
from hybridlm.continual.metrics import HIGHER_IS_BETTER, all_metrics
from hybridlm.continual.stream import Stream, batches_per_stage, require_split, stage_blocks
from hybridlm.corpora import DataError
from hybridlm.engine import Engine, NonFiniteLoss, make_optimizer, mean_over_processes
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
def _mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class _Tally:
    """What a stage's optimizer steps add up to: its tokens and the per-step values whose
    means the stage reports."""

    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    gates: list[float] = field(default_factory=list)
    penalties: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)


class ContinualRun:
    """One method trained through one stream from one seed: the state its stages share (the
    prepared model, the EWC terms, the replay buffer and DER++'s stored outputs, the scored
    rows, the timings). `run_sequence` is the entry point."""

    def __init__(self, model, method: MethodConfig, stream: Stream, cc: ContinualConfig,
                 tc: TrainConfig, seed: int, accelerator):
        self.model = accelerator.prepare(model)
        self.base = accelerator.unwrap_model(self.model)
        self.method, self.stream, self.cc, self.tc, self.seed = method, stream, cc, tc, seed
        self.accelerator, self.device = accelerator, accelerator.device
        self.order = stream.order
        self.block = stream.train[self.order[0]].ids.shape[1]
        self.n_stage_blocks = max(1, cc.tokens_per_stage // self.block)
        self.b = min(tc.batch_size, self.n_stage_blocks)  # blocks per batch
        self.steps_per_epoch = max(1, self.n_stage_blocks // self.b)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.local = self.base.local_learning()
        self.ewc = EWC(method.ewc_lambda) if method.ewc_lambda > 0 else None
        self.reservoir = Reservoir(method.replay_size, seed) if method.replay_size > 0 else None
        # DER++: (corrected state y (L, D), LM bias of that moment) of every buffered block
        self.stored: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.sequence = [(0, "joint")] if method.joint else list(enumerate(self.order))
        self.timings = {"train": 0.0, "eval": 0.0, "fisher": 0.0, "diagnostics": 0.0}
        self.rows: list[dict] = []
        self.retained: list[dict | None] = []
        self.stages: list[dict] = []
        self.sync: list[dict] = []  # with several processes: do the ranks hold identical state?
        self.failed: dict | None = None

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return mean_over_processes(self.accelerator, t)

    # ---- batches ----
    def make_batch(self, items: list[tuple[str, int]]):
        """(ids, labels, features or None, real tokens) of the (domain, row) `items`."""
        ids = torch.stack([self.stream.train[d].ids[i] for d, i in items])  # (B, L)
        mask = torch.stack([self.stream.train[d].mask[i] for d, i in items])
        labels = ids.masked_fill(~mask, -100)
        feats = None if self.stream.train_caches is None else self.features(items, ids)
        return ids.to(self.device), labels.to(self.device), feats, int(mask.sum())

    def features(self, items: list[tuple[str, int]], ids: torch.Tensor) -> torch.Tensor:
        """The trunk's features of `items` from each domain's cache, in the batch's order."""
        parts: dict[str, list[tuple[int, int]]] = {}
        for pos, (d, i) in enumerate(items):
            parts.setdefault(d, []).append((pos, i))
        rows: list[torch.Tensor | None] = [None] * len(items)
        for d, lst in parts.items():
            pos, idx = zip(*lst, strict=True)
            f = self.stream.train_caches[d].features(self.base, torch.tensor(idx), ids[list(pos)])
            for k, p in enumerate(pos):
                rows[p] = f[k]
        return torch.stack(rows).to(self.device)  # (B, L, D)

    def stage_items(self, s: int, dom: str) -> list[tuple[str, int]]:
        """The (domain, row) blocks stage `s` trains on."""
        if self.method.joint:  # the sequence's own blocks, every stage's at once
            return [(d, i) for k, d in enumerate(self.order)
                    for i in stage_blocks(len(self.stream.train[d]), self.n_stage_blocks,
                                          self.seed, k)]
        return [(dom, i) for i in stage_blocks(len(self.stream.train[dom]), self.n_stage_blocks,
                                               self.seed, s)]

    def plan(self, items: list, s: int) -> list[tuple[list, int]]:
        """The stage's plan: (blocks, how many of them are replayed) per batch, seeded."""
        reservoir, b = self.reservoir, self.b
        n_replay = round(self.cc.replay_fraction * b) if reservoir and reservoir.items else 0
        per_epoch = self.steps_per_epoch * (len(self.order) if self.method.joint else 1)
        plan = []
        for epoch in range(self.cc.epochs_per_stage):
            perm = random.Random(self.seed * 7919 + s * 31 + epoch).sample(items, len(items))
            cursor = 0
            for _ in range(per_epoch):
                new = [perm[(cursor + k) % len(perm)] for k in range(b - n_replay)]
                cursor += b - n_replay
                plan.append((new + reservoir.draw(n_replay) if n_replay else new, n_replay))
        return plan

    # ---- one stage's training ----
    def train_stage(self, plan: list[tuple[list, int]], s: int, label: str) -> dict:
        """Optimizer steps over this process's share of `plan`. The plan is the same for
        every process (the reservoir is too: same seed, same offers, same draws); each takes
        its share of whole batches, and one optimizer step averages the ranks' batches
        (DDP), so W processes of batch b step like one process of batch W * b."""
        # raises if len(plan) < world
        batches_per_stage(self.cc, self.tc.batch_size, self.block, self.world)
        plan = plan[: len(plan) // self.world * self.world]
        mine = plan[self.rank::self.world]
        engine = self.engine(len(mine))
        self.model.train()
        tally = _Tally()
        try:
            for items, n_rep in mine:
                self.step(engine, items, n_rep, tally)
        except NonFiniteLoss:
            raise NonFiniteStage(
                f"[{self.method.name} seed {self.seed}] loss NaN/inf for {engine.bad_in_a_row} "
                f"steps in a row in stage {s + 1} ({label}); the stages before it are kept; "
                "lower train.lr") from None
        return self.stage_record(label, plan, mine, engine, tally)

    def engine(self, total_steps: int) -> Engine:
        """A fresh AdamW and warmup + cosine schedule: each stage fine-tunes anew."""
        tc = self.tc
        optimizer = self.accelerator.prepare(make_optimizer(self.base, tc.lr, tc.weight_decay))
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(tc.warmup_fraction * total_steps), total_steps)
        # short stages: every step failed
        return Engine(self.accelerator, self.model, optimizer, scheduler, tc.max_grad_norm,
                      self.local, patience=min(10, total_steps))

    def step(self, engine: Engine, items: list, n_rep: int, tally: _Tally) -> None:
        """One optimizer step on the batch `items`, its last `n_rep` blocks replayed."""
        ids, labels, feats, n_tok = self.make_batch(items)
        tally.tokens += n_tok
        with self.accelerator.autocast():
            out = self.model(input_ids=ids, labels=labels, features=feats)
        loss = total = out.loss
        penalty = self.ewc.penalty(self.base) if self.ewc else None
        if penalty is not None:
            total = total + penalty
            tally.penalties.append(penalty.item())
        if self.method.der_alpha > 0 and n_rep:
            der = self.distillation(out.logits, labels, items[-n_rep:])
            total = total + self.method.der_alpha * der
            tally.distill.append(der.item())
        # the gate reads the next-token loss, not the method's penalties
        stepped = engine.step(total, out.local_statistic, gate_loss=loss)
        if stepped is None:  # non-finite on some rank: every rank skipped it
            return
        if self.local is not None:
            tally.gates.append(stepped["plasticity/gate"])
        tally.losses.append(loss.item())

    def distillation(self, logits: torch.Tensor, labels: torch.Tensor,
                     rep: list) -> torch.Tensor:
        """DER++: squared distance of the replayed blocks' logits (the last `len(rep)` of the
        batch) to the logits stored when they were buffered."""
        n_rep = len(rep)
        with torch.no_grad():
            target = torch.stack([replay_logits(self.base, self.stored[it][0].to(self.device),
                                                self.stored[it][1]) for it in rep])
        real = labels[-n_rep:] != -100  # (R, L): real tokens only
        return (logits[-n_rep:][real].float() - target[real].float()).pow(2).mean()

    def stage_record(self, label: str, plan: list, mine: list, engine: Engine,
                     tally: _Tally) -> dict:
        """The stage's entry of the result (`_mine`: this process's batches, popped by `run`)."""
        tokens, train_loss, der = tally.tokens, _mean(tally.losses), _mean(tally.distill)
        if self.world > 1:
            device = self.device
            tokens = int(self.accelerator.reduce(torch.tensor(tokens, device=device),
                                                 "sum").item())
            if train_loss is not None:  # every rank takes the same (non-skipped) steps
                train_loss = float(self.reduce_mean(torch.tensor(train_loss, device=device)))
            if der is not None:  # each rank distils its own replayed blocks
                der = float(self.reduce_mean(torch.tensor(der, device=device)))
        return {"domain": label, "steps": len(mine), "batches": len(plan), "tokens": tokens,
                "token_slots": len(plan) * self.b * self.block,  # equal for every method by design
                "replayed_per_batch": plan[0][1] if plan else 0,
                "skipped_steps": engine.skipped,
                "train_loss": train_loss,
                "gate_mean": _mean(tally.gates),
                "ewc_penalty_mean": _mean(tally.penalties),
                "der_distillation_mean": der,
                "_mine": mine}

    # ---- between stages ----
    def consolidate(self, s: int, mine: list) -> None:
        """EWC: the Fisher of the stage just trained, which later stages are held to."""
        if self.ewc is None or s >= len(self.order) - 1:  # no later stage uses the last Fisher
            return
        t0 = time.perf_counter()
        # each rank's share of the first fisher_batches global batches; consolidate
        # averages each batch's gradient over ranks before squaring (global-batch Fisher)
        self.ewc.consolidate(self.base, [self.make_batch(it)[:3]
                                         for it, _ in mine[: self.cc.fisher_batches]],
                             self.reduce_mean)
        self.timings["fisher"] += time.perf_counter() - t0

    def remember(self, items: list) -> None:
        """Replay: offer the stage's blocks to the buffer (DER++: with the model's outputs
        now, before later stages move it)."""
        if self.reservoir is None:
            return
        for item in items:
            self.reservoir.add(item)
        if self.method.der_alpha > 0:
            self.store_outputs()

    @torch.no_grad()
    def store_outputs(self) -> None:
        """DER++: the corrected states of newly buffered blocks under the current model."""
        base, stored = self.base, self.stored
        buffered = set(self.reservoir.items)
        for key in [k for k in stored if k not in buffered]:
            del stored[key]
        new = [it for it in self.reservoir.items if it not in stored]
        bias = None if base.lm_bias is None else base.lm_bias.detach().clone()
        was_training = base.training
        base.eval()
        for k in range(0, len(new), self.b):
            chunk = new[k: k + self.b]
            ids, labels, feats, _ = self.make_batch(chunk)
            y = base.corrected_state(ids, feats, token_mask=labels != -100)
            for it, row in zip(chunk, y, strict=True):
                stored[it] = (row.cpu(), bias)
        base.train(was_training)

    def check_sync(self, s: int) -> None:
        """Several processes: local updates, Fisher and buffer are made outside DDP, so
        check that the ranks still agree on them."""
        if self.world == 1:
            return
        acc = self.accelerator
        self.sync.append({"stage": s, "weights": ranks_agree(acc, head_state(self.base))}
                         | ({"fisher": ranks_agree(acc, self.ewc.flat_fisher())}
                            if self.ewc else {})
                         | ({"replay": ranks_agree(acc, self.reservoir.fingerprint())}
                            if self.reservoir else {}))

    def score(self) -> None:
        """Append a row: every domain's test scores and the retention text's."""
        t0 = time.perf_counter()
        bs = self.tc.batch_size
        self.rows.append(evaluate_row(self.model, self.stream, self.accelerator, bs))
        self.retained.append(evaluate_retention(self.model, self.stream, self.accelerator, bs))
        self.timings["eval"] += time.perf_counter() - t0

    # ---- the sequence ----
    def run(self, log: Callable[[dict], None] | None = None) -> None:
        """The untrained row, then every stage and the row after it."""
        self.score()  # b: the row that forward transfer and the baselines compare with
        for s, dom in self.sequence:
            t0 = time.perf_counter()
            items = self.stage_items(s, dom)
            try:
                stage = self.train_stage(self.plan(items, s), s, dom)
            except NonFiniteStage as e:
                # a diverged method is a result too: keep the stages before it
                self.failed = {"stage": s + 1, "domain": dom, "message": str(e)}
                self.accelerator.print(f"error: {e}")
                break
            mine = stage.pop("_mine")
            self.timings["train"] += time.perf_counter() - t0
            # the Fisher and the buffer must see the model as this stage left it
            self.consolidate(s, mine)
            self.remember(items)
            self.check_sync(s)
            self.score()
            self.stages.append(stage)
            self.report(s, dom, stage, log)

    def report(self, s: int, dom: str, stage: dict, log: Callable[[dict], None] | None) -> None:
        """Hand the stage's row to `log` (wandb in a normal run) and print its losses."""
        row, retained = self.rows[-1], self.retained[-1]
        if log is not None:
            log({"stage": s, "domain": dom, "row": row, "retention": retained} | stage)
        self.accelerator.print(
            f"[{self.method.name} seed {self.seed}] stage {s + 1}/{len(self.sequence)} ({dom}): "
            + ", ".join(f"{d} {r['loss']:.3f}" for d, r in row.items())
            + (f", retention {retained['loss']:.3f}" if retained else ""))

    def diagnostics(self) -> dict:
        """Energy-based heads: the layer against T at evaluation (`layer_diagnostics`)."""
        t0 = time.perf_counter()
        trained = self.base.config.time_steps
        by_t = layer_diagnostics(self.model, self.stream, self.accelerator, self.tc.batch_size,
                                 sorted(set(self.cc.eval_time_steps) - {trained}))
        by_t[trained] = self.rows[-1]  # the last row is already scored at the trained T
        self.timings["diagnostics"] += time.perf_counter() - t0
        return {"trained_time_steps": trained,  # keys: str(T), as in JSON
                "by_T": {str(t): by_t[t] for t in sorted(by_t)}}


def _result(run: ContinualRun) -> dict:
    """The result of a finished (or failed) run: the rows as matrices per score, and the
    metrics of each score."""
    order, rows, retained = run.order, run.rows, run.retained
    scores = [k for k in SCORES if k in rows[0][order[0]]]  # bits/char needs `chars` data
    result = {"method": run.method.name, "seed": run.seed, "order": order,
              "joint": run.method.joint,
              "trainable_parameters": run.base.trainable_parameters(),
              "head_parameters": run.base.head_parameters(),
              "baseline": {k: [rows[0][d][k] for d in order] for k in scores},
              "rows": [{k: [r[d][k] for d in order] for k in scores} for r in rows[1:]],
              "stages": run.stages, "processes": run.world}
    if retained[0] is not None:
        result["retention"] = {k: [r[k] for r in retained] for k in scores}  # [b, stages...]
    if run.sync:
        result["ranks_identical"] = run.sync
    for key in ("firing_rate", "active_fraction", "relative_energy", "spikes_per_token"):
        if key in rows[0][order[0]]:  # row 0: untrained
            result[key] = [[r[d][key] for d in order] for r in rows]
    if run.failed is not None:
        result["failed"] = run.failed
    elif run.method.joint:  # one stage on everything: a final row, no R to forget along
        result["final"] = result["rows"][0]
        result["metrics"] = {k: {"ACC": sum(result["final"][k]) / len(order), "BWT": None,
                                 "FWT": None, "forgetting": None} for k in scores}
    else:
        result["R"] = {k: [r[k] for r in result["rows"]] for k in scores}
        result["metrics"] = {k: all_metrics(result["R"][k], result["baseline"][k], k)
                             for k in scores}
    return result


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
    run = ContinualRun(model, method, stream, cc, tc, seed, accelerator)
    run.run(log)
    result = _result(run)
    if diagnostics and run.failed is None and "relative_energy" in run.rows[0][run.order[0]]:
        result["diagnostics"] = run.diagnostics()
    result["seconds"] = run.timings
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
