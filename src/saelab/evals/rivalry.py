"""Feature rivalry: the statistics of "Feature Rivalry" (arXiv 2605.08149; reference code
hvardhan878/feature-rivalry), with the fixes its issue asks for. Pure functions of arrays: answer
text, SAE activations, decoder rows. Nothing here loads a model or knows a run directory.

Definitions (each says where it follows the reference and where it departs):

- First word and its normalisation: the reference takes `text.strip().split()[0].lower()`
  (data/dataset_builder.py). Here the word is also Unicode-folded (NFKD, combining marks dropped)
  and stripped of surrounding punctuation, so "Paris." and "paris" are one answer.
- Answer entropy: the normalised Shannon entropy of the n first words, H / log(n) (the
  reference's normaliser, log of the number of samples, not of the distinct answers); 0 when all
  agree, 1 when all differ.
- Conditions: ambiguous = entropy > 0.7, unambiguous = entropy < 0.5 (the reference's
  thresholds). When either side has fewer than `min_per_condition` questions (an overconfident
  model: most entropies 0) the thresholds fall back to percentiles: unambiguous = entropy <= the
  `fraction` quantile, ambiguous = entropy >= the 1 - `fraction` quantile and above the first.
- Answer normalisation for correctness (SQuAD's, Rajpurkar et al. 2016, plus Unicode folding):
  fold, lower-case, punctuation to spaces, articles (a, an, the) dropped, whitespace collapsed.
  An answer is correct when any normalised gold answer or alias occurs in the normalised
  generation as a whole-word run (the reference: `gold.lower() in generated.lower()`).
- Rivalry of a condition (analysis/rivalry_score.py): last-token SAE activations of the
  condition's prompts [prompts, latents]; latents with mean activation > 0.01 (a seeded subsample
  of 300 when more); the Pearson r matrix across prompts; rivalry = the 5th percentile of its
  upper triangle (more negative: more anti-correlated pairs). Latents constant over the
  condition's prompts have no r and are left out.
- Pooled-pair test (the reference's): Mann-Whitney U between the two conditions' pairwise r.
  Its p treats ~45k pairs as independent samples, which they are not (pairs share latents and all
  share the same prompts), so it is inflated; it is reported beside the prompt-level test.
- Prompt-level permutation test (the fix): shuffle the condition labels over prompts, recompute
  both conditions' rivalry (latent selection included) and their difference; two-sided
  p = (1 + #{|d_perm| >= |d_obs|}) / (1 + n_perm) (Phipson & Smyth 2010).
- Frequency-matched control: the same latents in both conditions (active, mean > 0.01, in both;
  one seeded subsample), so a difference cannot come from the conditions' different active sets.
- Per-prompt scores (experiments/exp3_uncertainty.py): among the prompt's top-50 active latents
  (activation > 0.01), the 5th percentile of the pairwise cosine similarity of their decoder rows
  (geometry: the reference's score), and of their pairwise Pearson r over a reference set of
  prompts (co-activation: the variant the issue adds). Fewer than 2 active latents: 0 (as the
  reference).
- AUROC: P(score of a correct answer > score of a wrong one) + P(tie) / 2, from ranks (equal to
  Mann-Whitney U / (n1 n2)); rivalry scores enter negated (less rivalry predicts correct, as the
  reference). CIs: percentile bootstrap over questions; comparisons paired on the same resamples.
- Multiple comparisons across layers: Holm (1979) step-down and Benjamini-Hochberg (1995).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from saelab.evals.stats import auroc
from saelab.runs.results import Comparison, Estimate

THRESHOLD = 0.01  # an active latent: activation (or mean activation) above this
MAX_LATENTS = 300
TOP_K = 50
PERCENTILE = 5.0
ARTICLES = {"a", "an", "the"}
BOOT = "percentile bootstrap over questions (Efron & Tibshirani 1993)"


# --- answers -------------------------------------------------------------------------------------------


def fold(text: str) -> str:
    """NFKD-decomposed text with combining marks dropped, lower-cased ("Bogotá" -> "bogota")."""
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()


def first_word(text: str) -> str:
    """The first whitespace-separated word, folded and stripped of surrounding punctuation ('' if none)."""
    for w in fold(text).split():
        w = w.strip("".join(c for c in set(w) if not c.isalnum()))
        if w:
            return w
    return ""


def normalise_answer(text: str) -> str:
    """SQuAD-style normalisation with folding: lower, punctuation to spaces, articles dropped."""
    t = re.sub(r"[^\w\s]|_", " ", fold(text))
    return " ".join(w for w in t.split() if w not in ARTICLES)


def is_correct(generated: str, answers: Iterable[str]) -> bool:
    """Whether any gold answer (normalised) occurs in the normalised generation as whole words."""
    g = f" {normalise_answer(generated)} "
    return any(a and f" {a} " in g for a in (normalise_answer(x) for x in answers))


def answer_entropy(words: Sequence[str]) -> float:
    """Normalised Shannon entropy of the answers' first words: H / log(n), n the number of samples."""
    n = len(words)
    if n < 2:
        return 0.0
    p = np.array(list(Counter(words).values()), dtype=np.float64) / n
    if p.size == 1:
        return 0.0
    return float(-(p * np.log(p)).sum() / math.log(n))


@dataclass
class Split:
    ambiguous: np.ndarray  # bool [questions]
    unambiguous: np.ndarray
    high: float
    low: float
    method: str


def split_conditions(entropy: np.ndarray, high: float = 0.7, low: float = 0.5, min_per_condition: int = 10,
                     fraction: float = 1 / 3) -> Split:
    """Ambiguous (entropy > high) vs unambiguous (< low); percentile thresholds when a side is small."""
    e = np.asarray(entropy, dtype=np.float64)
    amb, una = e > high, e < low
    if min(amb.sum(), una.sum()) >= min_per_condition:
        return Split(amb, una, high, low, f"fixed thresholds: ambiguous > {high:g}, unambiguous < {low:g}")
    lo_t, hi_t = float(np.quantile(e, fraction)), float(np.quantile(e, 1 - fraction))
    una, amb = e <= lo_t, (e >= hi_t) & (e > lo_t)
    return Split(amb, una, hi_t, lo_t,
                 f"percentile fallback (fixed thresholds gave {int((e > high).sum())} ambiguous / "
                 f"{int((e < low).sum())} unambiguous, fewer than {min_per_condition}): unambiguous <= the "
                 f"{fraction:.3g} quantile ({lo_t:.3f}), ambiguous >= the {1 - fraction:.3g} quantile ({hi_t:.3f}) "
                 "and above the first")


def balance(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint masks cut to the same size (a seeded subsample of the larger): the 5th
    percentile of correlations over fewer prompts is more extreme, so conditions of different sizes
    would differ in rivalry for that reason alone (the reference used equal n_per_condition)."""
    a, b = np.asarray(a, dtype=bool).copy(), np.asarray(b, dtype=bool).copy()
    n = min(a.sum(), b.sum())
    rng = np.random.default_rng(seed)
    for m in (a, b):
        idx = np.flatnonzero(m)
        if idx.size > n:
            m[:] = False
            m[rng.choice(idx, n, replace=False)] = True
    return a, b


# --- rivalry of a condition ------------------------------------------------------------------------------


def active_latents(acts: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Latents whose mean activation over the prompts exceeds the threshold (sorted ids)."""
    return np.flatnonzero(np.asarray(acts).mean(0) > threshold)


def subsample(ids: np.ndarray, max_latents: int, seed: int) -> np.ndarray:
    if ids.size <= max_latents:
        return ids
    return np.sort(np.random.default_rng(seed).choice(ids, max_latents, replace=False))


def correlations(acts: np.ndarray) -> np.ndarray:
    """Pearson r [latents, latents] across prompts (rows) of acts [prompts, latents]; NaN where constant."""
    x = np.asarray(acts, dtype=np.float64)
    x = x - x.mean(0)
    sd = np.sqrt((x * x).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x.T @ x) / np.outer(sd, sd)
    r[:, sd == 0] = np.nan
    r[sd == 0, :] = np.nan
    return np.clip(r, -1.0, 1.0)


def upper(r: np.ndarray) -> np.ndarray:
    """The finite values of the strict upper triangle."""
    v = r[np.triu_indices(r.shape[0], k=1)]
    return v[np.isfinite(v)]


@dataclass
class Rivalry:
    score: float  # the 5th percentile of the pairwise r (NaN with fewer than 2 usable latents)
    mean_r: float
    latents: np.ndarray  # global latent ids the matrix is over
    pairs: np.ndarray  # the upper-triangle r values (finite)
    r: np.ndarray  # [latents, latents]


def rivalry(acts: np.ndarray, latents: np.ndarray | None = None, max_latents: int = MAX_LATENTS, seed: int = 0,
            threshold: float = THRESHOLD, percentile: float = PERCENTILE) -> Rivalry:
    """A condition's rivalry from its prompts' activations [prompts, width]; `latents` fixes the set
    (the frequency-matched control), else the active ones (mean > threshold), subsampled."""
    ids = subsample(active_latents(acts, threshold), max_latents, seed) if latents is None else np.asarray(latents)
    r = correlations(np.asarray(acts)[:, ids])
    v = upper(r)
    if v.size == 0:
        return Rivalry(float("nan"), float("nan"), ids, v, r)
    return Rivalry(float(np.percentile(v, percentile)), float(v.mean()), ids, v, r)


def shared_latents(a: np.ndarray, b: np.ndarray, max_latents: int = MAX_LATENTS, seed: int = 0,
                   threshold: float = THRESHOLD) -> np.ndarray:
    """Latents active (mean > threshold) in both conditions, one seeded subsample (the matched set)."""
    return subsample(np.intersect1d(active_latents(a, threshold), active_latents(b, threshold)), max_latents, seed)


def rivalry_difference(acts: np.ndarray, labels: np.ndarray, matched: bool = False, max_latents: int = MAX_LATENTS,
                       seed: int = 0) -> tuple[float, float]:
    """(rivalry of the label-True prompts, rivalry of the label-False prompts)."""
    a, b = acts[labels], acts[~labels]
    ids = shared_latents(a, b, max_latents, seed) if matched else None
    return rivalry(a, ids, max_latents, seed).score, rivalry(b, ids, max_latents, seed).score


def permutation_test(acts: np.ndarray, labels: np.ndarray, n_perm: int = 1000, seed: int = 0, matched: bool = False,
                     max_latents: int = MAX_LATENTS) -> dict[str, float]:
    """Prompt-level test of rivalry(True) - rivalry(False): labels shuffled over prompts, the whole
    statistic (latent selection included) recomputed; two-sided p (Phipson & Smyth 2010)."""
    labels = np.asarray(labels, dtype=bool)
    a, b = rivalry_difference(acts, labels, matched, max_latents, seed)
    obs = a - b
    rng = np.random.default_rng(seed)
    null = np.empty(n_perm)
    for i in range(n_perm):
        pa, pb = rivalry_difference(acts, rng.permutation(labels), matched, max_latents, seed)
        null[i] = pa - pb
    null = null[np.isfinite(null)]
    if not math.isfinite(obs) or null.size == 0:
        return {"diff": obs, "p": float("nan"), "n_perm": int(null.size), "null_sd": float("nan")}
    p = (1 + int((np.abs(null) >= abs(obs) - 1e-12).sum())) / (1 + null.size)
    return {"diff": float(obs), "p": float(p), "n_perm": int(null.size), "null_sd": float(null.std())}


def bootstrap_rivalry(acts: np.ndarray, labels: np.ndarray, n_boot: int = 500, seed: int = 0, matched: bool = False,
                      max_latents: int = MAX_LATENTS, sides: str = "") -> Comparison:
    """Rivalry of each condition and their difference with percentile-bootstrap 95% CIs: each
    condition's prompts resampled with replacement (independently), the latent set held at the
    observed one (a duplicated prompt leaves it as it is)."""
    labels = np.asarray(labels, dtype=bool)
    A, B = acts[labels], acts[~labels]
    ids = shared_latents(A, B, max_latents, seed) if matched else None
    ra, rb = rivalry(A, ids, max_latents, seed), rivalry(B, ids, max_latents, seed)
    rng = np.random.default_rng(seed)
    sa, sb = np.empty(n_boot), np.empty(n_boot)
    for i in range(n_boot):
        sa[i] = rivalry(A[rng.integers(0, len(A), len(A))], ra.latents).score
        sb[i] = rivalry(B[rng.integers(0, len(B), len(B))], rb.latents).score

    def ci(x):
        x = x[np.isfinite(x)]
        return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if x.size else [math.nan, math.nan]

    return Comparison(a=ra.score, b=rb.score, diff=ra.score - rb.score, a_ci95=ci(sa), b_ci95=ci(sb),
                      diff_ci95=ci(sa - sb), n_units=int(min(len(A), len(B))), unit="prompt", n_boot=n_boot,
                      method="independent percentile bootstrap over each condition's prompts (Efron & Tibshirani "
                      "1993), latent sets held at the observed ones", sides=sides)


# --- rank statistics ---------------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mid-ranks (1-based) of x and the sizes of its tie groups."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    _, start, counts = np.unique(xs, return_index=True, return_counts=True)
    mid = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(mid, counts)
    return ranks, counts


def mann_whitney(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two-sided Mann-Whitney U test of a vs b: U of a, the normal approximation with tie correction
    and continuity correction (as scipy's method='asymptotic'), and the rank-biserial effect size
    2 U / (n1 n2) - 1 (positive: a tends to be larger)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return {"u": math.nan, "p": math.nan, "z": math.nan, "rank_biserial": math.nan, "n_a": n1, "n_b": n2}
    ranks, ties = _ranks(np.concatenate([a, b]))
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2)
    n = n1 + n2
    mu = n1 * n2 / 2
    var = n1 * n2 / 12 * ((n + 1) - float((ties ** 3 - ties).sum()) / (n * (n - 1)))
    if var <= 0:
        return {"u": u, "p": 1.0, "z": 0.0, "rank_biserial": 2 * u / (n1 * n2) - 1, "n_a": n1, "n_b": n2}
    z = (abs(u - mu) - 0.5) / math.sqrt(var)
    p = min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2)))
    return {"u": u, "p": float(p), "z": float(math.copysign(max(z, 0.0), u - mu)),
            "rank_biserial": 2 * u / (n1 * n2) - 1, "n_a": int(n1), "n_b": int(n2)}


def auroc_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0) -> Estimate:
    v, boots = _auroc_boot(labels, {"s": scores}, n_boot, seed)
    return Estimate(mean=v["s"], ci95=_ci(boots["s"]), n_units=len(labels), n_boot=n_boot, method=BOOT)


def compare_auroc(labels: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                  sides: str = "") -> Comparison:
    """AUROC of score a vs score b for the same labels: both sides, a - b, paired bootstrap CIs."""
    v, boots = _auroc_boot(labels, {"a": a, "b": b}, n_boot, seed)
    return Comparison(a=v["a"], b=v["b"], diff=v["a"] - v["b"], a_ci95=_ci(boots["a"]), b_ci95=_ci(boots["b"]),
                      diff_ci95=_ci(boots["a"] - boots["b"]), n_units=len(labels), unit="question", n_boot=n_boot,
                      method="paired " + BOOT + ": both AUROCs on each resample", sides=sides)


def _auroc_boot(labels, scores: dict[str, np.ndarray], n_boot: int, seed: int):
    y = np.asarray(labels, dtype=bool)
    rng = np.random.default_rng(seed)
    boots = {k: np.empty(n_boot) for k in scores}
    for i in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        for k, s in scores.items():
            boots[k][i] = auroc(y[idx], np.asarray(s)[idx])
    return {k: auroc(y, s) for k, s in scores.items()}, boots


def _ci(x: np.ndarray) -> list[float]:
    x = x[np.isfinite(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if x.size else [math.nan, math.nan]


# --- multiple comparisons ---------------------------------------------------------------------------------


def holm(p: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values (NaN stays NaN and is not counted)."""
    p = np.asarray(p, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    m = ok.size
    order = ok[np.argsort(p[ok], kind="mergesort")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def benjamini_hochberg(p: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg (1995) adjusted p-values (q-values); NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(p))
    out = np.full(p.shape, np.nan)
    m = ok.size
    order = ok[np.argsort(p[ok], kind="mergesort")]
    running = 1.0
    for rank in range(m - 1, -1, -1):
        i = order[rank]
        running = min(running, m * p[i] / (rank + 1))
        out[i] = min(1.0, running)
    return out.tolist()


# --- per-prompt scores, hubs -----------------------------------------------------------------------------------


def _top_active(z: np.ndarray, top_k: int, threshold: float) -> np.ndarray:
    idx = np.flatnonzero(z > threshold)
    return idx[np.argsort(z[idx], kind="mergesort")[-top_k:]] if idx.size > top_k else idx


def decoder_cosine_score(z: np.ndarray, unit_dec: np.ndarray, top_k: int = TOP_K, threshold: float = THRESHOLD,
                         percentile: float = PERCENTILE) -> float:
    """The reference's per-prompt score: the 5th percentile of the decoder-row cosines among the
    prompt's top-k active latents (unit_dec: W_dec rows normalised, [width, d]); 0 below 2 latents."""
    idx = _top_active(np.asarray(z), top_k, threshold)
    if idx.size < 2:
        return 0.0
    u = unit_dec[idx]
    return float(np.percentile(upper(u @ u.T), percentile))


def coactivation_score(z: np.ndarray, r: np.ndarray, top_k: int = TOP_K, threshold: float = THRESHOLD,
                       percentile: float = PERCENTILE) -> float:
    """The co-activation variant: the 5th percentile of the Pearson r (r: [width, width] over a
    reference set of prompts, NaN where undefined) among the prompt's top-k active latents."""
    idx = _top_active(np.asarray(z), top_k, threshold)
    if idx.size < 2:
        return 0.0
    v = upper(r[np.ix_(idx, idx)])
    return float(np.percentile(v, percentile)) if v.size else 0.0


def hub_latents(riv: Rivalry, n_pairs: int = 100, top: int = 10) -> tuple[list[dict], list[dict]]:
    """The most negative pairs of a condition's r matrix and the latents most frequent among them:
    ([{latent_i, latent_j, r}], [{latent, count}]), most negative / most frequent first."""
    n = riv.r.shape[0]
    rows, cols = np.triu_indices(n, k=1)
    vals = riv.r[rows, cols]
    ok = np.flatnonzero(np.isfinite(vals))
    order = ok[np.argsort(vals[ok], kind="mergesort")[:n_pairs]]
    pairs = [{"latent_i": int(riv.latents[rows[k]]), "latent_j": int(riv.latents[cols[k]]), "r": float(vals[k])}
             for k in order]
    counts = Counter([p["latent_i"] for p in pairs] + [p["latent_j"] for p in pairs])
    hubs = [{"latent": int(i), "count": int(c)} for i, c in sorted(counts.items(), key=lambda t: (-t[1], t[0]))[:top]]
    return pairs, hubs
