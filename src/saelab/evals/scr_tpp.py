"""SAEBench SCR and TPP (Karvonen et al. 2025; adamkarvonen/SAEBench `evals/scr_and_tpp/main.py`),
on cached pooled features, with a random-latent control and at several probe training sizes.

Ablation: the SAE's latents S are zero-ablated with the SAE's error kept, x' = x - sum_{i in S} z_i
W_dec,i. Decoding is linear, so this holds per token and therefore for the pooled x and z
(mean-pooled as SAEBench, or at the last token): the ablation runs on the cached features.

SCR (spurious correlation removal). A task has two binary attributes a (the label) and b (the
spurious one) on every row. A "biased" probe is trained on rows where they agree (a=1,b=1 vs
a=0,b=0); the oracle on rows balanced in a over b; the spurious probe balanced in b over a. Latents
are ranked by |delta mu_i . (w_probe . W_dec,i)| (delta mu: mean latent on the probe's positives
minus negatives, on its training rows; SAEBench's get_effects_per_class_precomputed_acts). For
direction 1, the spurious probe's top-n latents are ablated and the biased probe is scored on a:
S = (A_abl - A_base) / (A_oracle - A_base) (0 when A_oracle - A_base < 0.001, as SAEBench);
direction 2 swaps a and b; SAEBench's rule picks the direction in which the biased probe is worse.
TPP (targeted probe perturbation). One class-vs-rest probe per class; latents ranked by
max(delta mu_i, 0) . (w_i . W_dec,i); ablating class i's top-n latents gives
TPP = mean_i [(A_i,clean - A_i,abl) - mean_{j != i} (A_j,clean - A_j,abl)].
Both are compared with n latents drawn at random from those with a nonzero effect (the same
ablation machinery; it should move nothing), paired on the same test rows with a bootstrap CI.
Probes are standardised logistic regressions, C chosen by validation AUC on their training rows
(the regimes' CV rule); SAEBench trains torch probes with a fixed schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from saelab.evals.probe_regimes import LogReg, cv_splits, select_and_test, training_sizes
from saelab.evals.stats import resample_counts
from saelab.runs.results import Comparison

N_VALUES = (2, 5, 10, 20, 50, 100, 500)  # SAEBench's n_values


@dataclass
class Linear:
    """A probe in the raw activation space: predict 1 where x . w + b > 0."""

    w: np.ndarray
    b: float
    C: float

    def correct(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return ((x @ self.w + self.b > 0).astype(int) == y).astype(np.float64)


def fit_linear(x: np.ndarray, y: np.ndarray, budget: int = 4, seed: int = 0) -> Linear:
    """Standardised L2 logistic regression, C by validation AUC on (x, y) only, as a raw-space w, b."""
    probe = LogReg(budget, seed)
    c = select_and_test(probe, x, y, x[:2], y[:2], cv_splits(y, seed)[1]).config["C"]
    s = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(s.transform(x), y)
    w = clf.coef_[0] / s.scale_
    return Linear(w, float(clf.intercept_[0] - (w * s.mean_).sum()), c)


def effects(z, y: np.ndarray, w: np.ndarray, w_dec: np.ndarray, scr: bool) -> np.ndarray:
    """Each latent's effect on the probe: delta mu_i (w . W_dec,i); |.| for SCR, delta mu clamped at
    0 for TPP (only latents more active on the class), as SAEBench."""
    dmu = np.asarray(z[y == 1].mean(0)).ravel() - np.asarray(z[y == 0].mean(0)).ravel()
    if not scr:
        dmu = np.clip(dmu, 0, None)
    e = dmu * (w_dec @ w)
    return np.abs(e) if scr else e


def top_latents(e: np.ndarray, n: int) -> np.ndarray:
    """The n latents with the largest effect (only those with a nonzero one, as SAEBench)."""
    nz = np.flatnonzero(e != 0)
    return nz[np.argsort(-e[nz], kind="stable")[:n]]


def random_latents(e: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    nz = np.flatnonzero(e != 0)
    return rng.choice(nz, min(n, len(nz)), replace=False)


def ablated(x: np.ndarray, z, w_dec: np.ndarray, latents: np.ndarray) -> np.ndarray:
    """x - z_S W_dec[S]: the latents S zero-ablated, the SAE's error kept."""
    if len(latents) == 0:
        return x
    return x - np.asarray(z[:, latents].toarray() if hasattr(z, "toarray") else z[:, latents]) @ w_dec[latents]


def _take(rng: np.random.Generator, rows: np.ndarray, k: int) -> np.ndarray:
    if k > len(rows):
        raise ValueError(f"needs {k} rows of a quadrant, the task has {len(rows)}")
    return rng.choice(rows, k, replace=False)


def _boot(cs: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """Bootstrap accuracies [n_boot] of several correctness vectors over the same test rows."""
    w = resample_counts(len(next(iter(cs.values()))), n_boot, seed)
    return {k: (w @ v) / w.sum(1) for k, v in cs.items()}


def scr_score(abl, base, oracle):
    """SAEBench's S = (A_abl - A_base) / (A_oracle - A_base), 0 where A_oracle - A_base < 0.001."""
    den = oracle - base
    return np.where(den < 0.001, 0.0, (abl - base) / np.where(den < 0.001, 1.0, den))


def scr(x: np.ndarray, z, a: np.ndarray, b: np.ndarray, is_test: np.ndarray, w_dec: np.ndarray, n_train: int,
        n_values=N_VALUES, budget: int = 4, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """SCR on one pair of attributes with probes trained on n_train rows (a, b: 0/1 per row)."""
    rng = np.random.default_rng(seed)
    quad = {(i, j): np.flatnonzero(~is_test & (a == i) & (b == j)) for i in (0, 1) for j in (0, 1)}
    tquad = {(i, j): np.flatnonzero(is_test & (a == i) & (b == j)) for i in (0, 1) for j in (0, 1)}
    half, quarter = n_train // 2, n_train // 4
    biased = np.concatenate([_take(rng, quad[1, 1], half), _take(rng, quad[0, 0], half)])
    bal = np.concatenate([_take(rng, q, quarter) for q in quad.values()])  # balanced in a and in b
    q = min(len(r) for r in tquad.values())
    test = np.concatenate([_take(rng, r, q) for r in tquad.values()])
    p_bias, p_a, p_b = fit_linear(x[biased], a[biased], budget, seed), fit_linear(x[bal], a[bal], budget, seed), \
        fit_linear(x[bal], b[bal], budget, seed)
    xt, zt = x[test], z[test]
    dirs = {}
    for name, label, oracle, spurious in (("dir1", a, p_a, p_b), ("dir2", b, p_b, p_a)):
        e = effects(z[bal], (b if name == "dir1" else a)[bal], spurious.w, w_dec, scr=True)
        c = {"base": p_bias.correct(xt, label[test]), "oracle": oracle.correct(xt, label[test])}
        for n in n_values:
            c[f"abl{n}"] = p_bias.correct(ablated(xt, zt, w_dec, top_latents(e, n)), label[test])
            c[f"rand{n}"] = p_bias.correct(ablated(xt, zt, w_dec, random_latents(e, n, rng)), label[test])
        dirs[name] = c
    # SAEBench: the direction in which the biased probe is worse (dir1: it reads b instead of a)
    pick = "dir1" if dirs["dir1"]["base"].mean() < dirs["dir2"]["base"].mean() else "dir2"
    c = dirs[pick]
    boot = _boot(c, n_boot, seed)
    out: dict[str, Any] = {"n_train": n_train, "n_test": int(len(test)), "direction": pick,
                           "base": float(c["base"].mean()), "oracle": float(c["oracle"].mean()),
                           "C": {"biased": p_bias.C, "a": p_a.C, "b": p_b.C},
                           "base_other_direction": float(dirs["dir2" if pick == "dir1" else "dir1"]["base"].mean()),
                           "scores": {}}
    for n in n_values:
        s_sae = float(scr_score(c[f"abl{n}"].mean(), c["base"].mean(), c["oracle"].mean()))
        s_rand = float(scr_score(c[f"rand{n}"].mean(), c["base"].mean(), c["oracle"].mean()))
        bs, br = (scr_score(boot[f"{k}{n}"], boot["base"], boot["oracle"]) for k in ("abl", "rand"))
        out["scores"][n] = {"sae": s_sae, "random": s_rand, "accuracy_ablated": float(c[f"abl{n}"].mean()),
                            "boot_sae": bs, "boot_random": br}
    return out


def tpp(x: np.ndarray, z, labels: np.ndarray, classes: list[str], is_test: np.ndarray, w_dec: np.ndarray,
        n_train: int, n_values=N_VALUES, budget: int = 4, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """TPP on a task with >= 3 classes: one balanced class-vs-rest probe per class on n_train rows."""
    rng = np.random.default_rng(seed)
    k = len(classes)
    probes, tests, effs = [], [], []
    q = min(int(((labels == i) & is_test).sum()) for i in range(k))
    for i in range(k):
        pos, neg = (np.flatnonzero(~is_test & m) for m in (labels == i, labels != i))
        tr = np.concatenate([_take(rng, pos, n_train // 2), _take(rng, neg, n_train // 2)])
        yi = (labels[tr] == i).astype(int)
        p = fit_linear(x[tr], yi, budget, seed)
        te = np.concatenate([_take(rng, np.flatnonzero(is_test & (labels == i)), q),
                             _take(rng, np.flatnonzero(is_test & (labels != i)), q)])
        probes.append(p)
        tests.append(te)
        effs.append(effects(z[tr], yi, p.w, w_dec, scr=False))
    rows = np.concatenate(tests)  # one resample over every class's test rows
    owner = np.repeat(np.arange(k), [len(t) for t in tests])
    ytrue = np.concatenate([(labels[t] == j).astype(int) for j, t in enumerate(tests)])
    xr, zr = x[rows], z[rows]

    def correct(xx: np.ndarray) -> np.ndarray:  # each row scored by its own class's probe
        out = np.empty(len(rows))
        for j, p in enumerate(probes):
            m = owner == j
            out[m] = p.correct(xx[m], ytrue[m])
        return out

    clean = correct(xr)
    w = resample_counts(len(rows), n_boot, seed)

    def accs(c: np.ndarray, weights: np.ndarray | None) -> np.ndarray:  # [..., k] accuracy of each probe
        if weights is None:
            return np.array([c[owner == j].mean() for j in range(k)])
        return np.stack([(weights[:, owner == j] @ c[owner == j]) / weights[:, owner == j].sum(1)
                         for j in range(k)], axis=-1)

    def score(clean_acc, abl_acc):  # [..., k(ablated class), k(probe)] -> TPP averaged over classes
        drop = clean_acc[..., None, :] - abl_acc
        own = np.diagonal(drop, axis1=-2, axis2=-1)
        others = (drop.sum(-1) - own) / (k - 1)
        return (own - others).mean(-1), own.mean(-1), others.mean(-1)

    out: dict[str, Any] = {"n_train": n_train, "n_test": int(len(rows)), "classes": classes,
                           "clean": accs(clean, None).tolist(), "scores": {}}
    ca, cb = accs(clean, None), accs(clean, w)
    for n in n_values:
        per = {}
        for kind, pick in (("sae", lambda e, n=n: top_latents(e, n)), ("random", lambda e, n=n: random_latents(e, n, rng))):
            abl = [correct(ablated(xr, zr, w_dec, pick(effs[i]))) for i in range(k)]
            total, own, others = score(ca, np.stack([accs(c, None) for c in abl]))
            bt, _, _ = score(cb, np.stack([accs(c, w) for c in abl], axis=1))
            per[kind] = {"tpp": float(total), "intended": float(own), "unintended": float(others), "boot": bt}
        out["scores"][n] = per
    return out


def scarcity_sizes(max_n: int, min_n: int = 10) -> list[int]:
    """The regimes' training sizes a probe set of at most max_n rows allows (from min_n up)."""
    return [n for n in training_sizes() if min_n <= n <= max_n]


def _ci(v: np.ndarray) -> list[float]:
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]


def summarize(points: list[dict[str, Any]], kind: str, n_values=N_VALUES) -> tuple[dict[str, Comparison], list]:
    """Means over tasks of the SAE-latent and random-latent scores: per n at the normal size
    (`mean_normal_top<n>`) and at n = 20 per scarcity size (`mean_scarcity<n_train>_top20`), each a
    Comparison whose CI comes from the tasks' bootstrap replicates (test rows resampled within each
    task, the replicates averaged over tasks). Returns (comparisons, the points without replicates)."""
    def get(p, n, side):
        s = p["scores"][n]
        return (s[side], s[f"boot_{side}"]) if kind == "scr" else (s[side]["tpp"], s[side]["boot"])

    groups: dict[str, tuple[list, int]] = {}
    for p in points:
        if p["setting"] == "normal":
            for n in n_values:
                groups.setdefault(f"mean_normal_top{n}", ([], n))[0].append(p)
        elif 20 in n_values:
            groups.setdefault(f"mean_scarcity{p['n_train']}_top20", ([], 20))[0].append(p)
    out = {}
    for key, (ps, n) in groups.items():
        a, ab = zip(*(get(p, n, "sae") for p in ps), strict=True)
        b, bb = zip(*(get(p, n, "random") for p in ps), strict=True)
        ab, bb = np.mean(ab, axis=0), np.mean(bb, axis=0)
        out[key] = Comparison(a=float(np.mean(a)), b=float(np.mean(b)), diff=float(np.mean(a) - np.mean(b)),
                              a_ci95=_ci(ab), b_ci95=_ci(bb), diff_ci95=_ci(ab - bb), n_units=int(sum(p["n_test"] for p in ps)),
                              unit="test example", n_boot=int(len(ab)), method=METHOD_BOOT,
                              sides=f"a = {kind.upper()} ablating the SAE's top-{n} latents, b = {n} random latents "
                                    f"with a nonzero effect; mean over {len(ps)} tasks")
    clean = []
    for p in points:
        q = {k: v for k, v in p.items() if k != "scores"}
        q["scores"] = {str(n): ({k: v for k, v in s.items() if not k.startswith("boot")} if kind == "scr" else
                                {side: {k: v for k, v in d.items() if k != "boot"} for side, d in s.items()})
                       for n, s in p["scores"].items()}
        clean.append(q)
    return out, clean


METHOD_BOOT = ("percentile bootstrap over test rows, resampled within each task (the same resamples for both "
               "sides), the replicates averaged over tasks")
