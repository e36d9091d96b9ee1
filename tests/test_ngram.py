"""Unigram and Kneser-Ney bigram baselines against hand-computed values."""

import math
from fractions import Fraction as F

import numpy as np
import pytest

from hybridlm.ngram import KneserNeyBigramLM, UnigramLM, score

# A tiny corpus, V = 5 (token 4 never occurs). The third block is padded with id 0: if padding
# were counted, (1, 0) would gain a count; if blocks were joined, (2, 2) and (3, 3) would appear.
V = 5
IDS = np.array([[0, 1, 0, 1, 2],
                [2, 0, 1, 2, 3],
                [3, 1, 0, 0, 0]])
MASK = np.array([[1, 1, 1, 1, 1],
                 [1, 1, 1, 1, 1],
                 [1, 1, 0, 0, 0]], dtype=np.int8)
# In-block pairs: (0,1) x3, (1,2) x2, (1,0), (2,0), (2,3), (3,1) once each.
PAIRS = {(0, 1): 3, (1, 2): 2, (1, 0): 1, (2, 0): 1, (2, 3): 1, (3, 1): 1}
D_HAND = F(4, 4 + 2 * 1)  # n1 = 4 pairs seen once, n2 = 1 pair seen twice


def kn_by_hand(prev: int, nxt: int) -> F:
    """Interpolated KN p(nxt | prev) on the corpus above, in exact fractions."""
    D = D_HAND
    c_v = {0: 3, 1: 3, 2: 2, 3: 1, 4: 0}[prev]  # sum over w of c(v, w)
    types_v = {0: 1, 1: 2, 2: 2, 3: 1, 4: 0}[prev]  # N1+(v .)
    cont = {0: 2, 1: 2, 2: 1, 3: 1, 4: 0}  # N1+(. w): 0 follows 1, 2; 1 follows 0, 3; ...
    n_pairs, n_types = 6, 4  # N1+(. .), #{w : N1+(. w) > 0}
    p_cont = (max(cont[nxt] - D, 0) + D * n_types / V) / n_pairs
    if c_v == 0:
        return p_cont
    return max(PAIRS.get((prev, nxt), 0) - D, 0) / F(c_v) + D * types_v / F(c_v) * p_cont


def test_hand_computed_kneser_ney():
    assert kn_by_hand(0, 1) == F(343, 405)  # 7/9 + (2/9) * (14/45), worked on paper
    assert kn_by_hand(4, 4) == F(4, 45)  # unseen context, unseen token: D * 4/5 / 6
    lm = KneserNeyBigramLM.fit(IDS, MASK, V)
    assert lm.discount == pytest.approx(float(D_HAND), abs=1e-15)
    for prev in range(V):
        expected = [math.log(kn_by_hand(prev, w)) for w in range(V)]
        np.testing.assert_allclose(lm.next_token_log_prob(prev), expected, rtol=0, atol=1e-12)
    # scoring the training blocks gives the same numbers, at the predicted positions only
    nll = lm.token_nll(IDS, MASK)
    assert nll.shape == (3, 4)
    for b in range(3):
        for t in range(4):
            want = -math.log(kn_by_hand(IDS[b, t], IDS[b, t + 1])) if MASK[b, t + 1] else 0.0
            assert nll[b, t] == pytest.approx(want, abs=1e-12)


def test_discount_estimate_counts_of_counts():
    ids = np.array([[0, 1, 2, 3, 0, 2, 2, 2, 2],
                    [1, 2, 3, 4, 4, 4, 4, 4, 4]])
    # pairs: (0,1) (3,0) (0,2) (3,4) once, (1,2) (2,3) twice, (2,2) x3, (4,4) x5
    # -> n1 = 4, n2 = 2, D = 4 / 8
    lm = KneserNeyBigramLM.fit(ids, np.ones_like(ids), vocab_size=5)
    assert lm.discount == pytest.approx(4 / (4 + 2 * 2), abs=1e-15)
    assert KneserNeyBigramLM.fit(ids, np.ones_like(ids), 5, discount=0.3).discount == 0.3


@pytest.mark.parametrize("alpha", [1.0, 0.01])
def test_distributions_sum_to_one_and_are_positive(alpha):
    rng = np.random.default_rng(0)
    V_big = 300
    ids = rng.integers(0, 40, size=(20, 16))  # tokens 40.. never occur
    mask = np.ones_like(ids)
    mask[-1, 9:] = 0
    uni = UnigramLM.fit(ids, mask, V_big, alpha=alpha)
    p = np.exp(uni.log_prob())
    assert p.shape == (V_big,)
    assert abs(p.sum() - 1) < 1e-9 and (p > 0).all()
    bi = KneserNeyBigramLM.fit(ids, mask, V_big)
    assert bi.context_count[ids[0, 0]] > 0 and bi.context_count[200] == 0
    for prev in (int(ids[0, 0]), 200):  # a seen context, an unseen one
        p = np.exp(bi.next_token_log_prob(prev))
        assert p.shape == (V_big,)
        assert abs(p.sum() - 1) < 1e-9 and (p > 0).all()


def test_unigram_by_hand():
    # all real tokens counted, the first of each block too: c = [3, 4, 3, 2, 0], N = 12
    lm = UnigramLM.fit(IDS, MASK, V, alpha=0.5)
    np.testing.assert_allclose(
        np.exp(lm.log_prob()), np.array([3.5, 4.5, 3.5, 2.5, 0.5]) / (12 + 0.5 * V), atol=1e-15
    )
    nll = lm.token_nll(IDS, MASK)
    assert nll[2, 0] == pytest.approx(-math.log(4.5 / 14.5), abs=1e-12)  # token 1
    assert (nll[2, 1:] == 0).all()


def test_padding_skipped_and_blocks_never_crossed():
    # Trained as two blocks, 1 is never followed by anything and 2 never preceded by 1.
    ids = np.array([[0, 1], [2, 3], [0, 1], [2, 3], [1, 0]])
    lm = KneserNeyBigramLM.fit(ids, np.ones_like(ids), vocab_size=4, discount=0.5)
    joined = KneserNeyBigramLM.fit(ids.reshape(1, -1), np.ones((1, 10)), 4, discount=0.5)
    assert lm.context_count[1] == 1  # only (1, 0) from the last block
    assert joined.context_count[1] > 1  # joining would add (1, 2) pairs
    assert lm.next_token_log_prob(1)[2] != pytest.approx(joined.next_token_log_prob(1)[2])

    # Scoring: [1 | 2] across a block boundary would be scored as 2 after 1 (and the first
    # token of a block would get a loss); in-block it must not.
    ev_ids = np.array([[0, 1, 1, 7], [2, 3, 0, 1]])  # 7 is padding (even out of range)
    ev_mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    nll = lm.token_nll(ev_ids, ev_mask)
    lp = {v: lm.next_token_log_prob(v) for v in range(4)}
    np.testing.assert_allclose(
        nll, [[-lp[0][1], -lp[1][1], 0.0], [-lp[2][3], 0.0, 0.0]], rtol=0, atol=1e-12
    )
    # padding ids don't matter
    np.testing.assert_array_equal(nll, lm.token_nll(np.where(ev_mask, ev_ids, 0), ev_mask))
    # block-wise scoring equals scoring each block alone
    np.testing.assert_array_equal(nll[1], lm.token_nll(ev_ids[1:], ev_mask[1:])[0])

    # the unigram also counts no padding
    uni = UnigramLM.fit(ev_ids % 4, ev_mask, vocab_size=4, alpha=1.0)
    np.testing.assert_array_equal(uni.counts, [1, 2, 1, 1])


def cycle_corpus(rng, n_blocks, L, V, noise):
    """Tokens walk a fixed cycle over 10 of V tokens; with prob `noise` a random token instead."""
    cycle = rng.permutation(V)[:10]
    pos = rng.integers(0, 10, size=n_blocks)[:, None] + np.arange(L)[None, :]
    ids = cycle[pos % 10]
    flip = rng.random(ids.shape) < noise
    ids[flip] = rng.integers(0, V, size=int(flip.sum()))
    return ids


def test_bigram_beats_unigram_beats_uniform_on_structured_text():
    rng = np.random.default_rng(1234)
    Vs = 200
    tokens = cycle_corpus(rng, 220, 32, Vs, noise=0.1)
    train, test = tokens[:200], tokens[200:]
    mask = np.ones_like(test)
    mask[-1, 20:] = 0
    uni = score(UnigramLM.fit(train, np.ones_like(train), Vs), test, mask)
    bi = score(KneserNeyBigramLM.fit(train, np.ones_like(train), Vs), test, mask)
    assert uni["perplexity"] < 0.2 * Vs  # ~10 frequent tokens
    assert bi["perplexity"] < 0.3 * uni["perplexity"]  # the next token is mostly determined
    assert bi["tokens"] == uni["tokens"] == 20 * 31 - 12


def test_score_by_hand():
    lm = UnigramLM.fit(IDS, MASK, V)
    chars = np.array([[9, 1, 2, 3, 4],
                      [9, 5, 6, 7, 8],
                      [9, 2, 9, 9, 9]])  # first column and padding never count
    out = score(lm, IDS, MASK, chars)
    nll = lm.token_nll(IDS, MASK)
    assert out["tokens"] == 4 + 4 + 1
    assert out["loss"] == pytest.approx(nll.sum() / 9, abs=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(nll.sum() / 9), rel=1e-12)
    assert out["bits_per_char"] == pytest.approx(nll.sum() / math.log(2) / 38, abs=1e-12)
    assert "bits_per_char" not in score(lm, IDS, MASK)


def test_bad_input_raises_useful_errors():
    ids, mask = IDS, MASK
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        UnigramLM.fit(ids, mask, vocab_size=3)
    with pytest.raises(ValueError, match="token ids"):
        KneserNeyBigramLM.fit(ids - 1, mask, V)
    with pytest.raises(ValueError, match="mask shape"):
        KneserNeyBigramLM.fit(ids, mask[:, :3], V)
    with pytest.raises(ValueError, match="2-D"):
        UnigramLM.fit(ids.ravel(), mask.ravel(), V)
    with pytest.raises(ValueError, match="no real tokens"):
        UnigramLM.fit(ids, np.zeros_like(mask), V)
    with pytest.raises(ValueError, match="no bigram"):
        KneserNeyBigramLM.fit(ids[:, :1], mask[:, :1], V)
    with pytest.raises(ValueError, match="after padding"):
        UnigramLM.fit(ids, np.array([[1, 0, 1, 1, 1]] * 3), V)
    with pytest.raises(ValueError, match="discount"):
        KneserNeyBigramLM.fit(ids, mask, V, discount=1.5)
    with pytest.raises(ValueError, match="pass discount"):  # every pair seen twice: n1 = 0
        KneserNeyBigramLM.fit(np.array([[0, 1], [0, 1]]), np.ones((2, 2)), V)
    with pytest.raises(ValueError, match="alpha"):
        UnigramLM.fit(ids, mask, V, alpha=0)
    lm = KneserNeyBigramLM.fit(ids, mask, V)
    with pytest.raises(ValueError, match="vocab_size"):  # eval ids beyond the fitted vocab
        lm.token_nll(ids + V, mask)
    with pytest.raises(ValueError, match="prev"):
        lm.next_token_log_prob(V)
    with pytest.raises(ValueError, match="0 characters"):
        score(lm, ids, mask, np.zeros_like(ids))
    with pytest.raises(ValueError, match="chars shape"):
        score(lm, ids, mask, np.ones((3, 4)))
