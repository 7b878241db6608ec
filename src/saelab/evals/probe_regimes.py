"""Probing under four data regimes (Kantamneni et al. 2025, "Are Sparse Autoencoders Useful? A
Case Study in Sparse Probing"; code: JoshEngels/SAE-Probes), on binary tasks.

Regimes, as SAE-Probes `utils_data.py` samples them (`get_training_sizes`, `get_class_imbalance`,
`get_classimabalance_num_train`, `get_train_test_indices`, `corrupt_ytrain`, `get_corrupt_frac`):
  normal       n_train = min(2 * min(#pos, #neg), 1024), balanced
  scarcity     n_train in unique(round(2^linspace(1, 10, 20))), balanced
  imbalance    positive ratio in linspace(0.05, 0.95, 19) at one n_train per task, the largest the
               extreme ratios allow (capped at 1024); the test set has the same ratio
  label_noise  the normal draw with a fraction linspace(0, 0.5, 11) of training labels flipped
A sample has ceil(ratio * n) positives. Our tasks have a fixed train/test split by group, so
train rows are drawn from the train split and test rows from the test split (the paper draws
both from one pool); the test set is fixed within a setting, so points are paired on it.
Draws are nested: each pool is permuted once per (task, setting) and a point takes prefixes, so
label-noise points share one training set and their flipped sets are nested (as the paper's
seeded `np.random.choice` gives).

Hyperparameters are chosen on the training rows only, by mean validation ROC-AUC over the
paper's splits (`utils_training.get_cv`): leave-pair-out for 4 <= n <= 12 (pairs holding both
classes), stratified 6-fold for n < 128, one stratified holdout of min(20%, 100) rows above;
below 4 rows there is no split and each probe keeps its default. Every probe gets the same
budget: `budget` configurations (4 by default, at most 8), scored on the same splits; scaling
and the SAE probe's latent ranking are refit inside each split.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import scipy.sparse as sp
import sklearn
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from saelab.evals.probe_mlp import fit_mlps
from saelab.evals.stats import auroc, compare, mean_ci
from saelab.io import stable_hash

SETTINGS = ("normal", "scarcity", "imbalance", "label_noise")
MAX_TRAIN = 1024
BASELINES = ("logreg", "pca", "knn", "gbdt", "mlp")
SAE_PROBES = ("sae_topk", "sae_all")


# --- the regimes' points -------------------------------------------------------------------------
def training_sizes() -> list[int]:
    """Data scarcity: unique(round(2^linspace(1, 10, 20))) = 2, 3, 4, 5, 7, ..., 737, 1024."""
    return [int(v) for v in np.unique(np.round(np.logspace(1, 10, num=20, base=2)).astype(int))]


def imbalance_ratios() -> list[float]:
    """Class imbalance: positive ratio linspace(0.05, 0.95, 19), rounded to 2 decimals."""
    return [round(float(v), 2) for v in np.linspace(0.05, 0.95, num=19)]


def noise_fractions() -> list[float]:
    """Label noise: fraction of training labels flipped, linspace(0, 0.5, 11)."""
    return [round(float(v), 2) for v in np.linspace(0, 0.5, num=11)]


def n_positive(n: int, ratio: float) -> int:
    """ceil(ratio * n), as the paper's sampler, computed on the rounded product so that a ratio
    like 0.15000000000000002 does not add a positive."""
    return math.ceil(round(ratio * n, 9))


def n_flipped(n: int, frac: float) -> int:
    """int(frac * n) labels flipped (the paper's corrupt_ytrain), on the rounded product."""
    return int(round(frac * n, 9))


@dataclass(frozen=True)
class Point:
    """One point of a regime: the training and test draws it asks for."""

    setting: str
    value: float  # the regime's variable: n_train (normal, scarcity), positive ratio, flipped fraction
    n_train: int
    pos_ratio: float
    noise: float
    n_test: int
    test_ratio: float

    @property
    def n_pos(self) -> int:
        return n_positive(self.n_train, self.pos_ratio)

    @property
    def n_test_pos(self) -> int:
        return n_positive(self.n_test, self.test_ratio)

    @property
    def n_flip(self) -> int:
        return n_flipped(self.n_train, self.noise)


def _balanced_max(pos: int, neg: int, cap: int) -> int:
    return min(2 * min(pos, neg), cap)


def _imbalance_n(pos: int, neg: int, cap: int) -> int:
    """The paper's get_classimabalance_num_train: the most rows every ratio in 0.05..0.95 can be
    drawn at, capped."""
    lo, hi = min(imbalance_ratios()), max(imbalance_ratios())
    n = min(int(neg / (1 - lo)), int(pos / hi), cap)
    while n > 0 and any(n_positive(n, r) > pos or n - n_positive(n, r) > neg for r in imbalance_ratios()):
        n -= 1  # never needed for integer pools; guards the float edge
    return n


def regime_points(setting: str, pos_train: int, neg_train: int, pos_test: int, neg_test: int,
                  max_train: int = MAX_TRAIN) -> list[Point]:
    """The points of `setting` a task with these class counts can supply (scarcity sizes it cannot
    are left out, as the paper skips sizes larger than the data)."""
    n_test = 2 * min(pos_test, neg_test)
    if setting == "normal":
        return [Point(setting, float(n), n, 0.5, 0.0, n_test, 0.5) for n in [_balanced_max(pos_train, neg_train,
                                                                                             max_train)]]
    if setting == "scarcity":
        return [Point(setting, float(n), n, 0.5, 0.0, n_test, 0.5) for n in training_sizes()
                if n <= max_train and n_positive(n, 0.5) <= pos_train and n - n_positive(n, 0.5) <= neg_train]
    if setting == "imbalance":
        n, nt = _imbalance_n(pos_train, neg_train, max_train), _imbalance_n(pos_test, neg_test, 10**9)
        return [Point(setting, r, n, r, 0.0, nt, r) for r in imbalance_ratios()] if n >= 20 and nt >= 20 else []
    if setting == "label_noise":
        n = _balanced_max(pos_train, neg_train, max_train)
        return [Point(setting, f, n, 0.5, f, n_test, 0.5) for f in noise_fractions()]
    raise ValueError(f"unknown setting {setting!r}; settings: {', '.join(SETTINGS)}")


@dataclass
class Draw:
    """Row indices into the task's arrays and the labels a probe is trained and tested on."""

    train: np.ndarray
    y_train: np.ndarray  # after label noise
    test: np.ndarray
    y_test: np.ndarray  # always clean
    flipped: np.ndarray  # positions (into train) whose label was flipped


@dataclass
class Pools:
    """A (task, setting)'s permuted class pools: every point of the setting takes prefixes."""

    y: np.ndarray
    train_pos: np.ndarray
    train_neg: np.ndarray
    test_pos: np.ndarray
    test_neg: np.ndarray
    order_seed: int
    flip_seed: int

    @classmethod
    def make(cls, y: np.ndarray, is_test: np.ndarray, seed: int) -> Pools:
        rng = np.random.default_rng(seed)
        parts = [rng.permutation(np.flatnonzero(m)) for m in (~is_test & (y == 1), ~is_test & (y == 0),
                                                               is_test & (y == 1), is_test & (y == 0))]
        return cls(y, *parts, order_seed=int(rng.integers(2**31)), flip_seed=int(rng.integers(2**31)))

    def draw(self, p: Point) -> Draw:
        if p.n_pos > len(self.train_pos) or p.n_train - p.n_pos > len(self.train_neg):
            raise ValueError(f"{p.setting} point {p.value}: needs {p.n_pos} positive / {p.n_train - p.n_pos} "
                             f"negative training rows, the task has {len(self.train_pos)} / {len(self.train_neg)}")
        train = np.concatenate([self.train_pos[: p.n_pos], self.train_neg[: p.n_train - p.n_pos]])
        train = train[np.random.default_rng(self.order_seed).permutation(len(train))]  # the holdout takes the tail
        test = np.concatenate([self.test_pos[: p.n_test_pos], self.test_neg[: p.n_test - p.n_test_pos]])
        y_train = self.y[train].copy()
        flipped = np.random.default_rng(self.flip_seed).permutation(len(train))[: p.n_flip]
        y_train[flipped] = 1 - y_train[flipped]
        return Draw(train, y_train, test, self.y[test].copy(), np.sort(flipped))


# --- cross-validation (the paper's get_cv / get_splits) -------------------------------------------
def cv_splits(y: np.ndarray, seed: int = 0) -> tuple[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(scheme, [(fit rows, validation rows)]) over positions 0..n-1 of one training draw; only
    splits whose validation rows hold both classes (and whose fit rows do) are kept."""
    n = len(y)
    if n < 4 or len(np.unique(y)) < 2:
        return "none", []
    if n <= 12:
        scheme = "leave-pair-out"
        splits = [(np.setdiff1d(np.arange(n), pair), np.array(pair)) for pair in combinations(range(n), 2)]
    elif n < 128:
        scheme = "stratified 6-fold"
        counts = np.bincount(y, minlength=2)
        k = int(min(6, counts.min())) if counts.min() >= 2 else 0
        splits = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), y)) if k else []
    else:
        scheme = "stratified holdout"
        m = min(int(0.2 * n), 100)
        rng = np.random.default_rng(seed)
        val = []
        for c in (0, 1):  # the validation rows keep the class ratio, with at least one of each
            rows = np.flatnonzero(y == c)
            take = min(len(rows) - 1, max(1, round(m * len(rows) / n)))
            val.append(rng.choice(rows, take, replace=False))
        va = np.sort(np.concatenate(val))
        splits = [(np.setdiff1d(np.arange(n), va), va)]
    return scheme, [(tr, va) for tr, va in splits if len(np.unique(y[va])) == 2 and len(np.unique(y[tr])) == 2]


# --- probes --------------------------------------------------------------------------------------
def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _logistic(c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=1000, random_state=seed)


def _scale(xf, xe):
    """Standardise with the fit rows' statistics (sparse: scale only, keeping zeros)."""
    s = StandardScaler(with_mean=not sp.issparse(xf)).fit(xf)
    return s.transform(xf), s.transform(xe)


class Probe:
    """A probe family: `configs(n, d)` lists the hyperparameters it may try (at most `budget`), and
    `fit_score` fits one model per config on the fit rows and scores the evaluation rows."""

    name: str = ""
    features: str = "resid"  # which matrix it reads: "resid" (x) or "sae" (z)

    def __init__(self, budget: int = 4, seed: int = 0, name: str | None = None, features: str | None = None):
        self.budget, self.seed = budget, seed
        self.name, self.features = name or self.name, features or self.features

    def configs(self, n: int, d: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def default(self, n: int, d: int) -> dict[str, Any]:
        """The config used where no validation split exists (n < 4)."""
        cs = self.configs(n, d)
        return cs[len(cs) // 2]

    def fit_score(self, xf, yf, xe, configs: list[dict[str, Any]]) -> np.ndarray:
        """[len(configs), rows of xe] positive-class probabilities."""
        raise NotImplementedError

    def fit_score_splits(self, x, y: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                         configs: list[dict[str, Any]]) -> list[np.ndarray]:
        """fit_score on every (fit rows, validation rows) split of the training rows x; a probe
        that can fit all splits at once overrides this."""
        return [self.fit_score(x[tr], y[tr], x[va], configs) for tr, va in splits]


class LogReg(Probe):
    """L2 logistic regression on standardised features, C on a log grid (warm-started along it)."""

    name = "logreg"
    Cs = (1e-4, 1e3)

    def configs(self, n, d):
        return [{"C": float(c)} for c in np.logspace(np.log10(self.Cs[0]), np.log10(self.Cs[1]), self.budget)]

    def fit_score(self, xf, yf, xe, configs):
        xf, xe = _scale(xf, xe)
        clf = LogisticRegression(max_iter=1000, random_state=self.seed, warm_start=True)
        out = []
        for cfg in configs:
            clf.set_params(C=cfg["C"]).fit(xf, yf)
            out.append(clf.predict_proba(xe)[:, 1])
        return np.array(out)


class PCALogReg(Probe):
    """PCA (on standardised features, fit rows only) to a number of components on a log grid, then
    logistic regression (C = 1), as SAE-Probes' find_best_pcareg."""

    name = "pca"

    def configs(self, n, d):
        top = max(1, min(n - 1, d, 100))
        dims = np.unique(np.round(np.logspace(0, np.log2(top), self.budget, base=2)).astype(int))
        return [{"components": int(k)} for k in dims]

    def fit_score(self, xf, yf, xe, configs):
        xf, xe = _scale(_dense(xf), _dense(xe))
        top = max(c["components"] for c in configs)
        pca = PCA(n_components=min(top, xf.shape[0], xf.shape[1]), random_state=self.seed).fit(xf)
        pf, pe = pca.transform(xf), pca.transform(xe)
        return np.array([_logistic(1.0, self.seed).fit(pf[:, :c["components"]], yf)
                         .predict_proba(pe[:, :c["components"]])[:, 1] for c in configs])


class KNN(Probe):
    """k nearest neighbours (Euclidean, standardised features), k on a log grid up to 100; the
    score is the share of positive neighbours. One neighbour search serves every k."""

    name = "knn"

    def configs(self, n, d):
        top = max(1, min(n - 1, 100))
        return [{"k": int(k)} for k in np.unique(np.round(np.logspace(0, np.log2(top), self.budget, base=2)).astype(int))]

    def fit_score(self, xf, yf, xe, configs):
        xf, xe = _scale(_dense(xf), _dense(xe))
        kmax = min(max(c["k"] for c in configs), len(yf))
        idx = NearestNeighbors(n_neighbors=kmax).fit(xf).kneighbors(xe, return_distance=False)
        share = np.cumsum(yf[idx], axis=1) / np.arange(1, kmax + 1)
        return np.array([share[:, min(c["k"], kmax) - 1] for c in configs])


class GBDT(Probe):
    """Gradient-boosted trees (xgboost, histogram method with 16 bins, one thread per process): the
    first `budget` configurations of a fixed list spread over trees x depth x learning rate x column
    subsample (cheap and regularised ones first)."""

    name = "gbdt"
    GRID = ({"n_estimators": 50, "max_depth": 2, "learning_rate": 0.3, "colsample_bytree": 0.3},
            {"n_estimators": 100, "max_depth": 3, "learning_rate": 0.1, "colsample_bytree": 0.3},
            {"n_estimators": 25, "max_depth": 2, "learning_rate": 0.3, "colsample_bytree": 1.0},
            {"n_estimators": 50, "max_depth": 3, "learning_rate": 0.1, "colsample_bytree": 1.0},
            {"n_estimators": 100, "max_depth": 2, "learning_rate": 0.1, "colsample_bytree": 0.6},
            {"n_estimators": 25, "max_depth": 4, "learning_rate": 0.3, "colsample_bytree": 0.6},
            {"n_estimators": 100, "max_depth": 4, "learning_rate": 0.03, "colsample_bytree": 0.3},
            {"n_estimators": 200, "max_depth": 2, "learning_rate": 0.03, "colsample_bytree": 1.0})

    def configs(self, n, d):
        return [dict(c) for c in self.GRID[: self.budget]]

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        try:
            import xgboost  # noqa: F401
        except ImportError as e:
            raise ValueError(f"the gbdt probe needs xgboost (a saelab dependency: pip install xgboost-cpu): {e}") from None

    def fit_score(self, xf, yf, xe, configs):
        import xgboost

        # one quantised fit matrix serves every config (as XGBClassifier with the same parameters)
        fit = xgboost.QuantileDMatrix(_dense(xf), yf, max_bin=16, nthread=1)
        ev = xgboost.DMatrix(_dense(xe), nthread=1)
        out = []
        for cfg in configs:
            params = {"objective": "binary:logistic", "tree_method": "hist", "max_bin": 16, "nthread": 1,
                      "seed": self.seed, "max_depth": cfg["max_depth"], "eta": cfg["learning_rate"],
                      "colsample_bytree": cfg["colsample_bytree"], "min_child_weight": 1 if len(yf) < 50 else 2}
            out.append(xgboost.train(params, fit, num_boost_round=cfg["n_estimators"]).predict(ev))
        return np.array(out, dtype=np.float64)


class MLP(Probe):
    """A ReLU MLP (saelab.evals.probe_mlp: sklearn's MLPClassifier model and objective, full-batch
    Adam, 100 steps) on standardised features: the first `budget` configurations of a fixed list over
    SAE-Probes' hidden sizes (up to two layers) x L2 penalty (alpha), spread over the penalty first.
    Every split and config of a selection is trained at once."""

    name = "mlp"
    GRID = ({"hidden_layer_sizes": (32,), "alpha": 1e-2}, {"hidden_layer_sizes": (64,), "alpha": 1.0},
            {"hidden_layer_sizes": (32, 32), "alpha": 1e-1}, {"hidden_layer_sizes": (16,), "alpha": 10.0},
            {"hidden_layer_sizes": (64, 64), "alpha": 1e-3}, {"hidden_layer_sizes": (16, 16), "alpha": 1.0},
            {"hidden_layer_sizes": (64,), "alpha": 1e-4}, {"hidden_layer_sizes": (32,), "alpha": 1e-1})

    def configs(self, n, d):
        return [dict(c) for c in self.GRID[: self.budget]]

    def fit_score(self, xf, yf, xe, configs):
        return fit_mlps([(_dense(xf), yf, _dense(xe))], configs, self.seed)[0]

    def fit_score_splits(self, x, y, splits, configs):
        x = _dense(x)
        return fit_mlps([(x[tr], y[tr], x[va]) for tr, va in splits], configs, self.seed) if splits else []


def top_latents(z, y: np.ndarray, k: int) -> np.ndarray:
    """The k latents with the largest |mean over y=1 - mean over y=0| (SAEBench's ranking)."""
    diff = np.abs(np.asarray(z[y == 1].mean(0)).ravel() - np.asarray(z[y == 0].mean(0)).ravel())
    return np.argsort(-diff, kind="stable")[:k]


class SAETopK(Probe):
    """Logistic regression (C = 1, standardised) on the top-k SAE latents by class-mean difference
    on the fit rows, k on a log grid over 1 ... 512 (SAE-Probes' `run_sae_evals.py` trains k in 1, 2,
    4, ..., 512 in the normal setting and 16, 128 in the others; `budget` points of that range here,
    1, 8, 64, 512 at the default 4)."""

    name = "sae_topk"
    features = "sae"
    K_MAX = 512

    def configs(self, n, d):
        top = min(self.K_MAX, d)
        ks = np.unique(np.round(np.logspace(0, np.log2(top), self.budget, base=2)).astype(int))
        return [{"k": int(k)} for k in ks]

    def fit_score(self, xf, yf, xe, configs):
        order = top_latents(xf, yf, max(c["k"] for c in configs))
        out = []
        for c in configs:
            cols = order[: c["k"]]
            f, e = _scale(_dense(xf[:, cols]), _dense(xe[:, cols]))
            out.append(_logistic(1.0, self.seed).fit(f, yf).predict_proba(e)[:, 1])
        return np.array(out)


class SAEAll(LogReg):
    """L2 logistic regression on every SAE latent (sparse, scaled by each latent's std)."""

    name = "sae_all"
    features = "sae"


PROBES: dict[str, type[Probe]] = {p.name: p for p in (LogReg, PCALogReg, KNN, GBDT, MLP, SAETopK, SAEAll)}


CONTROL_PREFIX = "ctrl_"  # the randomized-model SAE's probes: ctrl_topk, ctrl_all read its latents


def make_probes(names: list[str], budget: int = 4, seed: int = 0) -> list[Probe]:
    """Probes by name; `ctrl_topk` / `ctrl_all` are the SAE probes on the control SAE's latents."""
    out = []
    for n in names:
        base = "sae_" + n[len(CONTROL_PREFIX):] if n.startswith(CONTROL_PREFIX) else n
        if base not in PROBES:
            raise ValueError(f"unknown probe {n!r}; probes: {', '.join([*PROBES, 'ctrl_topk', 'ctrl_all'])}")
        out.append(PROBES[base](budget, seed, name=n, features="ctrl" if n != base else None))
    return out


# --- one point: select on the training rows, then test ----------------------------------------
def auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(auroc(y, s)) if len(np.unique(y)) == 2 else float("nan")


@dataclass
class ProbeOutcome:
    probe: str
    config: dict[str, Any]
    val_auc: float  # NaN: no validation split (n < 4); the probe kept its default
    test_auc: float
    test_acc: float
    seconds: float  # selection and the final fit
    scores: np.ndarray = field(repr=False)


def select_and_test(probe: Probe, x_train, y_train: np.ndarray, x_test, y_test: np.ndarray,
                    splits: list[tuple[np.ndarray, np.ndarray]]) -> ProbeOutcome:
    """Choose the probe's config by mean validation AUC over `splits` (rows of x_train only; ties
    go to the earlier config), refit it on all training rows and score the test rows."""
    t0 = time.perf_counter()
    n, d = x_train.shape
    configs = probe.configs(n, d)
    if splits:
        # every split's validation rows hold both classes (cv_splits): one vectorised AUC per split
        aucs = np.array([auroc(y_train[va], scores) for (_, va), scores in
                         zip(splits, probe.fit_score_splits(x_train, y_train, splits, configs), strict=True)])
        mean = np.nanmean(aucs, axis=0) if np.isfinite(aucs).any() else np.full(len(configs), np.nan)
        best = int(np.nanargmax(mean)) if np.isfinite(mean).any() else len(configs) // 2
        cfg, val = configs[best], float(mean[best])
    else:
        cfg, val = probe.default(n, d), float("nan")
    scores = probe.fit_score(x_train, y_train, x_test, [cfg])[0]
    return ProbeOutcome(probe.name, cfg, val, auc(y_test, scores), float(((scores >= 0.5) == y_test).mean()),
                        round(time.perf_counter() - t0, 4), scores)


def run_point(feats: dict[str, Any], probes: list[Probe], draw: Draw, seed: int = 0
              ) -> tuple[str, list[ProbeOutcome]]:
    """Every probe on one draw, on the same validation splits. feats: "resid" -> x, "sae" -> z,
    and any other name a probe reads (e.g. the control SAE's latents)."""
    scheme, splits = cv_splits(draw.y_train, seed)
    out = []
    # our own finite arrays and fixed parameters: sklearn's per-call input and parameter checks are
    # a quarter of a small fit's time, so they are skipped
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for p in probes:
            x = feats[p.features]
            out.append(select_and_test(p, x[draw.train], draw.y_train, x[draw.test], draw.y_test, splits))
    return scheme, out


# --- the grid of one task ------------------------------------------------------------------------
def task_grid(task: str, feats: dict[str, Any], y: np.ndarray, is_test: np.ndarray, settings: list[str],
              probes: list[Probe], seed: int = 0, max_train: int = MAX_TRAIN) -> list[dict[str, Any]]:
    """Every (setting, point, probe) of one binary task: one record each (JSON-ready)."""
    y = np.asarray(y).astype(int)
    counts = [int(((y == c) & m).sum()) for m in (~is_test, is_test) for c in (1, 0)]
    records = []
    for setting in settings:
        pools = Pools.make(y, is_test, int(stable_hash([seed, task, setting])[:8], 16))
        for pt in regime_points(setting, *counts, max_train=max_train):
            d = pools.draw(pt)
            scheme, outcomes = run_point(feats, probes, d, seed)
            for o in outcomes:
                records.append({"task": task, "setting": setting, "point": pt.value, "n_train": pt.n_train,
                                "n_train_pos": pt.n_pos, "n_test": pt.n_test, "n_test_pos": pt.n_test_pos,
                                "noise": pt.noise, "flipped": int(len(d.flipped)), "cv": scheme, "probe": o.probe,
                                "config": o.config, "val_auc": o.val_auc, "test_auc": o.test_auc,
                                "test_acc": o.test_acc, "seconds": o.seconds})
    return records


def _task_job(args):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one core per worker: the workers are the parallelism
        return task_grid(*args)


def grid(jobs: list[tuple], n_jobs: int = 1, progress: bool = False) -> list[list[dict[str, Any]]]:
    """task_grid over many tasks (args tuples), on n_jobs worker processes (joblib), in order."""
    from tqdm.auto import tqdm

    if n_jobs == 1:
        it = (_task_job(a) for a in jobs)
    else:
        from joblib import Parallel, delayed

        it = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator")(delayed(_task_job)(a) for a in jobs)
    return list(tqdm(it, total=len(jobs), desc="probe grid (tasks)", disable=not progress))


# --- the win rate (the paper's "quiver of arrows") -------------------------------------------------
def quiver(records: list[dict[str, Any]], baselines: list[str], extra: list[str]) -> list[dict[str, Any]]:
    """Per (task, setting, point): the probe with the best validation AUC among `baselines`, and
    among baselines + `extra`; an extra probe is picked only when its validation AUC is strictly
    higher (ties go to the baselines; SAE-Probes' plots break ties towards SAEs). Points where a
    probe has no validation AUC (n_train < 4) are left out. Test AUC never enters the choice."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["setting"], r["point"]), {})[r["probe"]] = r
    out = []
    for (task, setting, point), by in groups.items():
        base = [by[p] for p in baselines if p in by]
        ext = [by[p] for p in extra if p in by]
        if not base or not ext or any(not np.isfinite(r["val_auc"]) for r in base + ext):
            continue
        b = max(base, key=lambda r: r["val_auc"])  # max keeps the first of equal values
        e = max(ext, key=lambda r: r["val_auc"])
        a = e if e["val_auc"] > b["val_auc"] else b
        out.append({"task": task, "setting": setting, "point": point, "pick_baselines": b["probe"],
                    "pick_with_extra": a["probe"], "extra_picked": a is e, "test_auc_baselines": b["test_auc"],
                    "test_auc_with_extra": a["test_auc"], "test_acc_baselines": b["test_acc"],
                    "test_acc_with_extra": a["test_acc"]})
    return out


def per_task_means(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Mean of rows[key] over each task's points (tasks are the independent units)."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["task"], []).append(float(r[key]))
    return {t: float(np.mean(v)) for t, v in sorted(by.items())}


METHOD = ("Kantamneni et al. 2025 regimes as SAE-Probes' utils_data.py samples them (train rows from the task's "
          "train split, test rows from its test split, test labels clean); hyperparameters chosen by mean "
          "validation ROC-AUC on the training rows only (leave-pair-out n<=12, stratified 6-fold n<128, "
          "stratified holdout of min(20%, 100) rows above; none below 4 rows); quiver: per task and point the "
          "probe with the best validation AUC among baselines, and among baselines + the extra probes (ties to "
          "the baselines); tasks are the bootstrap units (each task's mean over its points)")


def setting_summary(records: list[dict[str, Any]], setting: str, baselines: list[str],
                    extras: dict[str, list[str]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The fields of a ProbeSettingResult for one setting: each probe's mean test AUC / accuracy over
    tasks (bootstrap CI over tasks), and for each group of extra probes (e.g. "sae": [sae_topk,
    sae_all]) the quiver comparison, paired over tasks, and the share of points it is picked."""
    rs = [r for r in records if r["setting"] == setting]
    probes = list(dict.fromkeys(r["probe"] for r in rs))
    test_auc = {p: mean_ci(np.array(list(per_task_means([r for r in rs if r["probe"] == p], "test_auc").values())),
                           n_boot, seed) for p in probes}
    test_acc = {p: mean_ci(np.array(list(per_task_means([r for r in rs if r["probe"] == p], "test_acc").values())),
                           n_boot, seed) for p in probes}
    quiv, picked, all_picks = {}, {}, {}
    for name, extra in extras.items():
        picks = quiver(rs, baselines, [p for p in extra if p in probes])
        if not picks:
            continue
        all_picks[name] = picks
        a, b = per_task_means(picks, "test_auc_with_extra"), per_task_means(picks, "test_auc_baselines")
        ones = np.ones(len(a))
        quiv[name] = compare((np.array(list(a.values())), ones), (np.array(list(b.values())), ones), n_boot, seed,
                             unit="task", sides=f"a = best of baselines + {', '.join(extra)} by validation AUC, "
                                                f"b = best of baselines ({', '.join(baselines)})")
        picked[name] = mean_ci(np.array(list(per_task_means(picks, "extra_picked").values())), n_boot, seed)
    curve = []
    for point in sorted({r["point"] for r in rs}):
        at = [r for r in rs if r["point"] == point]
        row: dict[str, Any] = {"point": point, "tasks": len({r["task"] for r in at}),
                               "test_auc": {p: float(np.mean([r["test_auc"] for r in at if r["probe"] == p]))
                                            for p in probes}}
        for name, picks in all_picks.items():
            here = [q for q in picks if q["point"] == point]
            if here:
                row[name] = {"picked": float(np.mean([q["extra_picked"] for q in here])),
                             "test_auc_with": float(np.mean([q["test_auc_with_extra"] for q in here])),
                             "test_auc_without": float(np.mean([q["test_auc_baselines"] for q in here]))}
        curve.append(row)
    keys = {(r["task"], r["point"]) for r in rs}
    no_val = {(r["task"], r["point"]) for r in rs if not np.isfinite(r["val_auc"])}
    return {"setting": setting, "tasks": sorted({r["task"] for r in rs}), "points": len(keys - no_val),
            "points_without_validation": len(no_val), "test_auc": test_auc, "test_acc": test_acc, "quiver": quiv,
            "picked": picked, "curve": curve, "method": METHOD}
