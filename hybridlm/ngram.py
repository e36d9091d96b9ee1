"""Count-based baselines for the results table: a smoothed unigram and a Kneser-Ney bigram.

They are fitted on the training blocks of a split and scored on exactly the tokens the neural
heads predict, so their losses sit beside the neural ones on the same footing:

    in every block, token t+1 is predicted from the tokens <= t, for t = 0..L-2,
    and only where mask[:, t+1] == 1.

The bigram's context is token t of the same block; nothing is counted or scored across a block
boundary or into padding. Padding sits only at the end of a block (see `data.pack`), and its ids
are never looked at.

Both models keep only O(V + number of distinct bigrams) numbers: bigrams are coded as
prev * V + next (int64), counted with np.unique, and looked up with np.searchsorted, so a
V x V matrix is never built.
"""

from __future__ import annotations

import math

import numpy as np


def _check_blocks(ids, mask, vocab_size: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one split; return ids as int64 and mask as bool, both (n_blocks, L)."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    ids = np.asarray(ids)
    mask = np.asarray(mask)
    if ids.ndim != 2:
        raise ValueError(f"{what}: ids must be 2-D (n_blocks, L), got shape {ids.shape}")
    if mask.shape != ids.shape:
        raise ValueError(
            f"{what}: mask shape {mask.shape} differs from ids shape {ids.shape}; "
            "pass the attention_mask of the same split"
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what}: ids must be integer token ids, got dtype {ids.dtype}")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"{what}: mask must hold only 0 and 1 (1 = real token)")
        mask = mask.astype(bool)
    # A real token after padding would make "context = previous token" wrong.
    if mask.shape[1] > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(f"{what}: mask has a real token after padding; padding must end a block")
    real = ids[mask]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(
            f"{what}: token ids must lie in [0, {vocab_size}) where mask is 1, found range "
            f"[{real.min()}, {real.max()}]; was the model fitted with the right vocab_size?"
        )
    return ids.astype(np.int64, copy=False), mask


def _predicted(ids: np.ndarray, mask: np.ndarray):
    """The (context, target) pairs the neural heads predict, and where they sit.

    Returns prev, nxt (1-D int64) and `where` (n_blocks, L-1) bool: position t of `where` is
    the prediction of ids[:, t+1] from ids[:, t]. Slicing each block keeps pairs in-block.
    """
    where = mask[:, 1:] & mask[:, :-1]  # == mask[:, 1:] as padding only ends blocks
    return ids[:, :-1][where], ids[:, 1:][where], where


def _scatter_nll(nll: np.ndarray, where: np.ndarray) -> np.ndarray:
    out = np.zeros(where.shape, dtype=np.float64)
    out[where] = nll
    return out


class UnigramLM:
    """Additive (Laplace / Lidstone) smoothed unigram:

        p(w) = (c(w) + alpha) / (N + alpha * V)

    where c(w) counts w over all real tokens of the training blocks (including the first token
    of each block, which no model predicts: it is still a sample of the token distribution,
    and counting it makes the estimate independent of the block size), N = sum_w c(w).
    """

    def __init__(self, counts: np.ndarray, alpha: float):
        self.vocab_size = len(counts)
        self.alpha = float(alpha)
        self.counts = counts
        total = counts.sum() + self.alpha * self.vocab_size
        self._log_p = np.log(counts + self.alpha) - math.log(total)

    @classmethod
    def fit(cls, ids: np.ndarray, mask: np.ndarray, vocab_size: int,
            alpha: float = 1.0) -> UnigramLM:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0 so every token has p > 0, got {alpha}")
        ids, mask = _check_blocks(ids, mask, vocab_size, "training data")
        if not mask.any():
            raise ValueError("training data has no real tokens (mask is all 0); cannot fit")
        counts = np.bincount(ids[mask], minlength=vocab_size).astype(np.float64)
        return cls(counts, alpha)

    def log_prob(self) -> np.ndarray:
        """(V,) natural-log probabilities of every token."""
        return self._log_p.copy()

    def token_nll(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n_blocks, L-1) NLL in nats of ids[:, 1:]; 0.0 where mask[:, 1:] == 0."""
        ids, mask = _check_blocks(ids, mask, self.vocab_size, "evaluation data")
        _, nxt, where = _predicted(ids, mask)
        return _scatter_nll(-self._log_p[nxt], where)


class KneserNeyBigramLM:
    """Interpolated Kneser-Ney bigram with a single discount D (Chen & Goodman 1998).

    With c(v, w) the count of the pair (v, w) inside training blocks, c(v) = sum_w c(v, w),
    N1+(v .) = #{w : c(v, w) > 0}, N1+(. w) = #{v : c(v, w) > 0}, N1+(. .) = #distinct pairs:

        p(w | v) = max(c(v, w) - D, 0) / c(v) + D * N1+(v .) / c(v) * p_cont(w)   if c(v) > 0
        p(w | v) = p_cont(w)                                                       if c(v) == 0

    The continuation distribution is discounted the same way one level down, onto the uniform
    distribution, so every token of the vocabulary (even one never seen) has p > 0:

        p_cont(w) = (max(N1+(. w) - D, 0) + D * T / V) / N1+(. .),   T = #{w : N1+(. w) > 0}

    Both levels sum to 1 because 0 < D <= 1 and every nonzero count is >= 1, so the mass taken
    by the discount (D per type) is exactly what the lower level is given. When `discount` is
    None, D = n1 / (n1 + 2 n2), n_k = number of distinct pairs seen exactly k times.
    """

    def __init__(self, vocab_size: int, codes: np.ndarray, pair_counts: np.ndarray,
                 discount: float):
        V = vocab_size
        self.vocab_size = V
        self.discount = D = float(discount)
        self.codes = codes  # sorted distinct prev * V + next
        self.pair_counts = pair_counts
        prev, nxt = codes // V, codes % V
        self.context_count = np.bincount(prev, weights=pair_counts, minlength=V)  # c(v)
        self.context_types = np.bincount(prev, minlength=V).astype(np.float64)  # N1+(v .)
        cont = np.bincount(nxt, minlength=V).astype(np.float64)  # N1+(. w)
        n_types = np.count_nonzero(cont)
        self.p_cont = (np.maximum(cont - D, 0.0) + D * n_types / V) / len(codes)
        # lambda(v) = D * N1+(v .) / c(v): the weight given to p_cont after context v
        seen = self.context_count > 0
        self._backoff = np.ones(V)
        self._backoff[seen] = D * self.context_types[seen] / self.context_count[seen]

    @staticmethod
    def estimate_discount(pair_counts: np.ndarray) -> float:
        """D = n1 / (n1 + 2 n2) from the counts of counts of the distinct pairs."""
        n1 = int(np.count_nonzero(pair_counts == 1))
        n2 = int(np.count_nonzero(pair_counts == 2))
        if n1 == 0:
            raise ValueError(
                "cannot estimate the discount: no bigram occurs exactly once (n1 = 0, which "
                "would give D = 0 and zero probabilities); pass discount= explicitly"
            )
        return n1 / (n1 + 2 * n2)

    @classmethod
    def fit(cls, ids: np.ndarray, mask: np.ndarray, vocab_size: int,
            discount: float | None = None) -> KneserNeyBigramLM:
        ids, mask = _check_blocks(ids, mask, vocab_size, "training data")
        prev, nxt, _ = _predicted(ids, mask)
        if prev.size == 0:
            raise ValueError(
                "training data has no bigram (no block holds two real tokens); cannot fit"
            )
        codes, pair_counts = np.unique(prev * vocab_size + nxt, return_counts=True)
        pair_counts = pair_counts.astype(np.float64)
        if discount is None:
            discount = cls.estimate_discount(pair_counts)
        elif not 0 < discount <= 1:
            # D > 1 would clip max(c - D, 0) and the distribution would no longer sum to 1
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        return cls(vocab_size, codes, pair_counts, discount)

    def _pair_count(self, codes: np.ndarray) -> np.ndarray:
        """c(v, w) for each code prev * V + next (0 for unseen pairs)."""
        i = np.searchsorted(self.codes, codes)
        i_ok = np.minimum(i, len(self.codes) - 1)
        found = self.codes[i_ok] == codes
        return np.where(found, self.pair_counts[i_ok], 0.0)

    def _prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        c_vw = self._pair_count(prev * self.vocab_size + nxt)
        c_v = self.context_count[prev]
        # unseen context: c(v, w) = 0 and backoff = 1, so this is p_cont(w) with no 0/0
        discounted = np.maximum(c_vw - self.discount, 0.0) / np.maximum(c_v, 1.0)
        return discounted + self._backoff[prev] * self.p_cont[nxt]

    def next_token_log_prob(self, prev: int) -> np.ndarray:
        """(V,) natural-log distribution of the token that follows `prev`."""
        if not 0 <= prev < self.vocab_size:
            raise ValueError(f"prev must be a token id in [0, {self.vocab_size}), got {prev}")
        nxt = np.arange(self.vocab_size, dtype=np.int64)
        return np.log(self._prob(np.full_like(nxt, prev), nxt))

    def token_nll(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n_blocks, L-1) NLL in nats of ids[:, 1:] given ids[:, :-1]; 0.0 where padded."""
        ids, mask = _check_blocks(ids, mask, self.vocab_size, "evaluation data")
        prev, nxt, where = _predicted(ids, mask)
        return _scatter_nll(-np.log(self._prob(prev, nxt)), where)


def score(model, ids: np.ndarray, mask: np.ndarray, chars: np.ndarray | None = None) -> dict:
    """Loss, perplexity and (with `chars`) bits per character on the predicted tokens.

    chars (n_blocks, L): how many characters of text each token covers; the predicted tokens'
    characters, chars[:, 1:] where mask[:, 1:] == 1, are the denominator of

        bits_per_char = sum NLL / ln 2 / sum chars
    """
    nll = model.token_nll(ids, mask)
    where = np.asarray(mask)[:, 1:].astype(bool)
    tokens = int(where.sum())
    if tokens == 0:
        raise ValueError("no predicted tokens: every block has fewer than two real tokens")
    total = float(nll[where].sum())
    loss = total / tokens
    out = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
    if chars is not None:
        chars = np.asarray(chars)
        if chars.shape != np.shape(ids):
            raise ValueError(f"chars shape {chars.shape} differs from ids shape {np.shape(ids)}")
        n_chars = chars[:, 1:][where]
        if (n_chars < 0).any():
            raise ValueError("chars holds negative character counts")
        total_chars = int(n_chars.sum())
        if total_chars == 0:
            raise ValueError(
                "the predicted tokens cover 0 characters, so bits_per_char is undefined; "
                "check that chars holds per-token character counts"
            )
        out["bits_per_char"] = total / math.log(2) / total_chars
    return out
