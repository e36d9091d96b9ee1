"""Perplexity, bits per character and next-token accuracy over a packed dataset, exact under
several processes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from hybridlm.features import FeatureCache


class Blocks(Dataset):
    """A packed split as model inputs: input_ids (L,), labels (L,) with -100 on padding,
    chars (L,) (characters of text each token covers) and the block's index (the feature
    cache's row)."""

    def __init__(self, hf_dataset):
        self.ids = torch.tensor(hf_dataset["input_ids"], dtype=torch.long)
        self.mask = torch.tensor(hf_dataset["attention_mask"], dtype=torch.bool)
        # chars: absent from data built without offsets (then no bits per character)
        self.chars = torch.tensor(hf_dataset["chars"], dtype=torch.int32) \
            if "chars" in hf_dataset.column_names else torch.zeros_like(self.ids, dtype=torch.int32)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = self.ids[i].masked_fill(~self.mask[i], -100)
        return {"input_ids": self.ids[i], "labels": labels, "chars": self.chars[i],
                "index": torch.tensor(i)}

    def tokens(self) -> int:
        return int(self.mask.sum())


def token_stats(logits: torch.Tensor, labels: torch.Tensor,
                chars: torch.Tensor | None = None) -> torch.Tensor:
    """Per block: (summed next-token NLL, predicted tokens, correct argmax predictions,
    characters those tokens cover), (B, 4). Chars are 0 when `chars` is None."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    valid = labels != -100
    correct = (logits.argmax(-1) == labels) & valid
    n_chars = torch.zeros_like(nll[:, 0]) if chars is None else \
        (chars[:, 1:].to(nll.dtype) * valid).sum(1)
    return torch.stack([nll.sum(1), valid.sum(1).float(), correct.sum(1).float(), n_chars], 1)


def scores(nll: float, tokens: float, correct: float, chars: float) -> dict:
    """Loss (nats/token), perplexity, accuracy and bits per character from summed totals."""
    loss = nll / tokens
    out = {"loss": loss, "perplexity": math.exp(loss), "accuracy": correct / tokens,
           "tokens": int(tokens)}
    if chars > 0:
        out["bits_per_char"] = nll / math.log(2) / chars
    return out


@torch.no_grad()
def evaluate(model, blocks: Blocks, accelerator, batch_size: int, cache: FeatureCache | None):
    """Loss, perplexity, bits per character, accuracy and (spiking heads) mean firing rate
    on `blocks`.

    Each process scores its shard; `gather_for_metrics` drops the padding duplicates of the
    last batch, so every block counts exactly once.
    """
    loader = accelerator.prepare(DataLoader(blocks, batch_size=batch_size, shuffle=False))
    base = accelerator.unwrap_model(model)
    was_training = base.training
    base.eval()
    totals = torch.zeros(5, dtype=torch.float64)
    for batch in loader:
        feats = cache.features(base, batch["index"], batch["input_ids"]) if cache else None
        with accelerator.autocast():
            out = base(input_ids=batch["input_ids"], features=feats)
        stats = token_stats(out.logits, batch["labels"], batch["chars"])
        rate = base.head.stats.get("rate", torch.tensor(float("nan")))
        per_block = torch.cat([stats, rate.reshape(1, 1).expand(len(stats), 1) * stats[:, 1:2]], 1)
        totals += accelerator.gather_for_metrics(per_block).double().sum(0).cpu()
    base.train(was_training)
    nll, n, correct, chars, rate_sum = totals.tolist()
    result = scores(nll, n, correct, chars)
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
