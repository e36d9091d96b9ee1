"""Continual-learning metrics over a result matrix, each named with its sign convention.

R[i][j] is the score on domain j (columns in training order) after training stage i
(0-based, T stages: stage i trains on domain i); b[j] is the untrained model's score.
Formulas (GEM, Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018), written 0-based:

    ACC = (1/T) sum_j R[T-1][j]
    BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])
    FWT = 1/(T-1) sum_{j>=1} (R[j-1][j] - b[j])
    forgetting (Chaudhry) f_j = max_{l<T-1} R[l][j] - R[T-1][j],  F = mean_{j<T-1} f_j

BWT and FWT are kept exactly as GEM writes them, so their sign depends on the score: for an
accuracy, BWT < 0 is forgetting and FWT > 0 is positive transfer; for a loss or perplexity
(lower is better) BWT > 0 is forgetting and FWT < 0 is positive transfer. Chaudhry's
forgetting is defined for accuracies ("best earlier minus final"); for a lower-is-better
score we use the same quantity with the best earlier value being the minimum,
f_j = R[T-1][j] - min_{l<T-1} R[l][j], so F > 0 is forgetting for every score. Avalanche's
"forgetting" (first-minus-last, R[j][j] - R[T-1][j]) is -BWT: not reported under that name.

With one stage, BWT, FWT and forgetting are not defined: the functions return None and the
reports print "not defined" (never NaN as a number).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]

# Score name -> whether higher is better. Every score in the matrices is one of these.
HIGHER_IS_BETTER = {"accuracy": True, "loss": False, "perplexity": False, "bits_per_char": False}

SIGN_CONVENTIONS = {
    "ACC": "mean final score over all domains (GEM); for loss/perplexity lower is better",
    "BWT": "GEM backward transfer R[T][j] - R[j][j]: for accuracy negative = forgetting; "
           "for loss/perplexity POSITIVE = forgetting (the sign flips)",
    "FWT": "GEM forward transfer R[j-1][j] - b[j]: for accuracy positive = helps unseen "
           "domains; for loss/perplexity NEGATIVE = helps unseen domains",
    "forgetting": "Chaudhry et al. 2018, best earlier score minus final score, oriented so "
                  "POSITIVE = forgetting for every score (for a loss: final - min earlier)",
}

NOT_DEFINED = "not defined"


def _check(R: Matrix, b: Sequence[float] | None = None) -> int:
    t = len(R)
    if t == 0:
        raise ValueError("R has no rows: at least one stage is needed")
    for i, row in enumerate(R):
        if len(row) != t:
            raise ValueError(f"R must be T x T (T = {t} stages); row {i} has {len(row)} entries")
    if b is not None and len(b) != t:
        raise ValueError(f"b must have T = {t} entries, got {len(b)}")
    return t


def acc(R: Matrix) -> float:
    """Average final score, (1/T) sum_j R[T-1][j]."""
    t = _check(R)
    return sum(R[t - 1]) / t


def bwt(R: Matrix) -> float | None:
    """GEM backward transfer; None (not defined) with one stage."""
    t = _check(R)
    if t < 2:
        return None
    return sum(R[t - 1][j] - R[j][j] for j in range(t - 1)) / (t - 1)


def fwt(R: Matrix, b: Sequence[float]) -> float | None:
    """GEM forward transfer against the untrained model's scores b; None with one stage."""
    t = _check(R, b)
    if t < 2:
        return None
    return sum(R[j - 1][j] - b[j] for j in range(1, t)) / (t - 1)


def forgetting_per_domain(R: Matrix, higher_is_better: bool = True) -> list[float] | None:
    """Chaudhry's f_j for j < T-1 (positive = forgetting); None with one stage."""
    t = _check(R)
    if t < 2:
        return None
    out = []
    for j in range(t - 1):
        earlier = [R[i][j] for i in range(t - 1)]
        final = R[t - 1][j]
        out.append(max(earlier) - final if higher_is_better else final - min(earlier))
    return out


def forgetting(R: Matrix, higher_is_better: bool = True) -> float | None:
    """Chaudhry's average forgetting F = mean_{j<T-1} f_j (positive = forgetting)."""
    f = forgetting_per_domain(R, higher_is_better)
    return None if f is None else sum(f) / len(f)


def all_metrics(R: Matrix, b: Sequence[float], score: str) -> dict[str, float | None]:
    """ACC, BWT, FWT and forgetting of one score's matrix; None where not defined."""
    if score not in HIGHER_IS_BETTER:
        raise ValueError(f"unknown score '{score}'; known: {sorted(HIGHER_IS_BETTER)}")
    hib = HIGHER_IS_BETTER[score]
    return {"ACC": acc(R), "BWT": bwt(R), "FWT": fwt(R, b), "forgetting": forgetting(R, hib),
            "forgetting_per_domain": forgetting_per_domain(R, hib)}


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) over seeds. None if any
    value is None (a metric not defined for this sequence)."""
    if not values or any(v is None for v in values):
        return {"mean": None, "std": None, "n": len(values)}
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": sd, "n": n}


def compare(method: Sequence[float | None], reference: Sequence[float | None]) -> dict:
    """Method vs reference (e.g. forgetting of gated Hebbian vs fine-tuning), seeds paired.

    relative_reduction = 1 - mean(method) / mean(reference) (positive: the method forgets
    less, when the score is a forgetting); it is None (not defined) unless the reference's
    mean is > 0, since a ratio against no forgetting (or a gain) means nothing.
    exceeds_seed_spread is True when the two mean +- std intervals do not overlap, i.e.
    |difference of means| > std_m + std_r.
    """
    a, r = mean_std(method), mean_std(reference)
    if a["mean"] is None or r["mean"] is None:
        return {"defined": False, "reason": NOT_DEFINED}
    diffs = [x - y for x, y in zip(method, reference, strict=True)]
    d = mean_std(diffs)
    rel = 1 - a["mean"] / r["mean"] if r["mean"] > 0 else None
    return {
        "defined": True,
        "method": a, "reference": r,
        "paired_difference": d,
        "relative_reduction": rel,
        "exceeds_seed_spread": abs(a["mean"] - r["mean"]) > a["std"] + r["std"],
    }


def fmt(value: float | None, digits: int = 4) -> str:
    """A number for a report, or 'not defined' for None (never 'nan')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_DEFINED
    return f"{value:.{digits}f}"
