"""Cache of frozen-encoder outputs: the frozen part of the encoder runs once per block."""

from __future__ import annotations

import time

import torch


class FeatureCache:
    """Frozen-encoder features (n_blocks, block_size, D) of one dataset, filled on first sight.

    Rows are addressed by the block's index in its dataset. `encode_seconds` adds up the time
    spent running the encoder, `hits`/`misses` count blocks served from / added to the cache.
    """

    def __init__(self, n_blocks: int):
        self.n_blocks = n_blocks
        self.store: torch.Tensor | None = None
        self.filled = torch.zeros(n_blocks, dtype=torch.bool)
        self.hits = self.misses = 0
        self.encode_seconds = 0.0

    def features(self, model, index: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Features of the blocks `index` (B,) whose tokens are `input_ids` (B, L)."""
        index = index.cpu()
        missing = ~self.filled[index]
        if missing.any():
            start = time.perf_counter()
            new = model.encoder_features(input_ids[missing.to(input_ids.device)]).float().cpu()
            if self.store is None:
                self.store = torch.empty(self.n_blocks, *new.shape[1:], dtype=torch.float32)
            self.store[index[missing]] = new
            self.filled[index[missing]] = True
            self.encode_seconds += time.perf_counter() - start
        self.misses += int(missing.sum())
        self.hits += int((~missing).sum())
        return self.store[index].to(input_ids.device)

    def summary(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "encode_seconds": self.encode_seconds}
