"""Bootstrap confidence intervals for comparisons (both sides, the difference, a 95% CI).

Method: the paired nonparametric bootstrap with percentile intervals (Efron & Tibshirani 1993,
"An Introduction to the Bootstrap", ch. 13). Both sides are measured on the same units
(test examples, or token contexts), and each resample draws units with replacement and
recomputes both statistics on the same draw, so the CI of the difference accounts for the
pairing. A resample is a vector of counts per unit, so every statistic here is a ratio of
weighted sums: stat(w) = sum(w * num) / sum(w * den), which covers means, accuracies and
explained variance (1 - SSE / total variance).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from saelab.runs.results import Comparison, Estimate

METHOD = "paired percentile bootstrap (Efron & Tibshirani 1993), units resampled with replacement"


def resample_counts(n_units: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_units] counts: how often each unit is drawn in each resample."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_units, size=(n_boot, n_units))
    counts = np.zeros((n_boot, n_units), dtype=np.float64)
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts


def ratio(num: np.ndarray, den: np.ndarray, w: np.ndarray | None = None) -> np.ndarray | float:
    """sum(w * num) / sum(w * den); w: [n_boot, units] or None (the plain estimate)."""
    if w is None:
        return float(np.sum(num) / np.sum(den))
    return (w @ num) / (w @ den)


def compare(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], n_boot: int = 1000,
            seed: int = 0, one_minus: bool = False, unit: str = "example", sides: str = "") -> Comparison:
    """Compare statistic A and B (each a (num, den) pair over the same units): a, b, a - b and
    the 95% CIs of a, b and a - b. one_minus: the statistic is 1 - num/den (explained variance)."""
    (na, da), (nb, db) = (np.asarray(x, dtype=np.float64) for x in a), (np.asarray(x, dtype=np.float64) for x in b)
    n = na.shape[0]
    if not (da.shape[0] == nb.shape[0] == db.shape[0] == n):
        raise ValueError(f"paired comparison needs the same units on both sides, got {n} and {nb.shape[0]}")
    sign = -1.0 if one_minus else 1.0
    off = 1.0 if one_minus else 0.0
    est_a, est_b = off + sign * ratio(na, da), off + sign * ratio(nb, db)
    sa, sb = [], []
    for start in range(0, n_boot, 250):  # chunks bound memory: 250 x units floats
        w = resample_counts(n, min(250, n_boot - start), seed + start)
        sa.append(off + sign * ratio(na, da, w))
        sb.append(off + sign * ratio(nb, db, w))
    sa_, sb_ = np.concatenate(sa), np.concatenate(sb)

    def ci(x: np.ndarray) -> list[float]:
        return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]

    return Comparison(a=est_a, b=est_b, diff=est_a - est_b, a_ci95=ci(sa_), b_ci95=ci(sb_), diff_ci95=ci(sa_ - sb_),
                      n_units=int(n), unit=unit, n_boot=int(n_boot), method=METHOD, sides=sides)


def mean_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """A mean with its percentile-bootstrap 95% CI (one side, no comparison)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return Estimate(mean=float("nan"), ci95=[float("nan"), float("nan")], n_units=0)
    w = resample_counts(v.shape[0], n_boot, seed)
    boots = ratio(v, np.ones_like(v), w)
    return Estimate(mean=float(v.mean()), ci95=[float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                    n_units=int(v.shape[0]), n_boot=int(n_boot), method=METHOD)


INDEPENDENT = "independent percentile bootstrap (Efron & Tibshirani 1993), each side's units resampled separately"


def compare_independent(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0, unit: str = "unit",
                        sides: str = "") -> Comparison:
    """Means of two independent samples (e.g. latents of two different coders): a, b, a - b and
    their 95% CIs, each side resampled on its own (no pairing to exploit)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        nan = [float("nan"), float("nan")]
        return Comparison(a=float("nan"), b=float("nan"), diff=float("nan"), a_ci95=nan, b_ci95=nan, diff_ci95=nan,
                          n_units=int(min(a.size, b.size)), unit=unit, n_boot=int(n_boot), method=INDEPENDENT,
                          sides=sides)
    wa, wb = resample_counts(a.size, n_boot, seed), resample_counts(b.size, n_boot, seed + 1)
    sa, sb = wa @ a / a.size, wb @ b / b.size

    def ci(x: np.ndarray) -> list[float]:
        return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]

    return Comparison(a=float(a.mean()), b=float(b.mean()), diff=float(a.mean() - b.mean()), a_ci95=ci(sa),
                      b_ci95=ci(sb), diff_ci95=ci(sa - sb), n_units=int(min(a.size, b.size)), unit=unit,
                      n_boot=int(n_boot), method=INDEPENDENT, sides=sides)


def ratio_ci(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """sum(num) / sum(den) over units (e.g. faithfulness over prompts) with its percentile-bootstrap
    95% CI, the units resampled."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    boots = np.concatenate([ratio(num, den, resample_counts(num.shape[0], min(250, n_boot - s), seed + s))
                            for s in range(0, n_boot, 250)])
    return Estimate(mean=ratio(num, den), ci95=[float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                    n_units=int(num.shape[0]), n_boot=int(n_boot), method=METHOD)


def auroc(y: np.ndarray, score: np.ndarray) -> np.ndarray | float:
    """Area under the ROC curve along the last axis = the Mann-Whitney probability that a positive
    outscores a negative (ties count half): sklearn's roc_auc_score, vectorised over resamples."""
    y, score = np.asarray(y), np.asarray(score, dtype=np.float64)
    pos = y == 1
    n1, n0 = pos.sum(-1), (y == 0).sum(-1)
    ranks = rankdata(score, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((ranks * pos).sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return float(out) if np.ndim(out) == 0 else out
