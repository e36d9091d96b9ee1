"""Perplexity and next-token accuracy over a packed dataset, exact under several processes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hybridlm.features import FeatureCache


class Blocks(Dataset):
    """A packed split as model inputs: input_ids (L,), labels (L,) with -100 on padding, and
    the block's index (the feature cache's row)."""

    def __init__(self, hf_dataset):
        self.ids = torch.tensor(hf_dataset["input_ids"], dtype=torch.long)
        self.mask = torch.tensor(hf_dataset["attention_mask"], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].masked_fill(~self.mask[i], -100)
        return {"input_ids": self.ids[i], "labels": labels, "index": torch.tensor(i)}

    def tokens(self) -> int:
        return int(self.mask.sum())


def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per block: (summed next-token NLL, predicted tokens, correct argmax predictions), (B, 3)."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    correct = (logits.argmax(-1) == labels) & valid
    return torch.stack([nll.sum(1), valid.sum(1).float(), correct.sum(1).float()], dim=1)


@torch.no_grad()
def evaluate(model, blocks: Blocks, accelerator, batch_size: int, cache: FeatureCache | None):
    """Loss, perplexity, accuracy and (spiking heads) mean firing rate on `blocks`.

    Each process scores its shard; `gather_for_metrics` drops the padding duplicates of the
    last batch, so every block counts exactly once.
    """
    loader = accelerator.prepare(DataLoader(blocks, batch_size=batch_size, shuffle=False))
    base = accelerator.unwrap_model(model)
    was_training = base.training
    base.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for batch in loader:
        feats = cache.features(base, batch["index"], batch["input_ids"]) if cache else None
        with accelerator.autocast():
            out = base(input_ids=batch["input_ids"], features=feats)
        stats = token_stats(out.logits, batch["labels"])
        rate = base.head.stats.get("rate", torch.tensor(float("nan")))
        per_block = torch.cat([stats, rate.reshape(1, 1).expand(len(stats), 1) * stats[:, 1:2]], 1)
        totals += accelerator.gather_for_metrics(per_block).double().sum(0).cpu()
    base.train(was_training)
    nll, n, correct, rate_sum = totals.tolist()
    loss = nll / n
    result = {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / n, "tokens": int(n)}
    if not math.isnan(rate_sum):
        result["firing_rate"] = rate_sum / n
    return result


@torch.no_grad()
def ranks_agree(accelerator, t: torch.Tensor) -> bool:
    """True when every process holds a bit-identical `t` (trivially with one process)."""
    if accelerator.num_processes == 1:
        return True
    everyone = accelerator.gather(t.to(accelerator.device).unsqueeze(0))  # (ranks, ...)
    same = bool((everyone == everyone[0]).all())
    if not same:
        accelerator.print("warning: the processes' state differs (see ranks_agree)")
    return same
