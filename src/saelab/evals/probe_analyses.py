"""Interpretability analyses of SAE probes (from the seed repository's notebooks), on cached pooled
features. Latents are chosen on a task's training rows and measured on its test rows.

- separability: Jensen-Shannon divergence (base 2, in [0, 1]) between the class-conditional
  distributions of each top latent's activation (histograms on shared bins, zero in its own bin);
- selectivity: the Gini coefficient over tasks of each latent's |class-mean difference| (0: tied
  to every task alike, -> 1: tied to one task), for the latents that are top-k for some task;
- reuse: the Jaccard overlap of the top-k latent sets of every pair of tasks, beside what k of
  `width` latents drawn at random would give (k / (2 width - k));
- cluster separation: Calinski-Harabasz (higher is better), Davies-Bouldin (lower) and silhouette
  (higher) of a multi-class task's classes in SAE-latent space vs residual space (each
  standardised per dimension), on test rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

from saelab.evals.probe_regimes import top_latents


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """JS(p || q) in bits of two histograms (normalised here)."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return 0.5 * kl(p) + 0.5 * kl(q)


def separability(z, y: np.ndarray, is_test: np.ndarray, k: int = 10, bins: int = 20) -> list[dict[str, float]]:
    """JS divergence of the top-k latents (by |class-mean difference| on train rows) on test rows."""
    tr, te = ~is_test, is_test
    out = []
    for lat in top_latents(z[tr], y[tr], k):
        v = np.asarray(z[te][:, [lat]].toarray() if hasattr(z, "toarray") else z[te][:, lat]).ravel()
        hi = v.max()
        edges = np.concatenate([[-1e-12, 1e-12], np.linspace(1e-12, hi if hi > 1e-12 else 1.0, bins)[1:]])
        hp, _ = np.histogram(v[y[te] == 1], edges)
        hn, _ = np.histogram(v[y[te] == 0], edges)
        out.append({"latent": int(lat), "js": js_divergence(hp + 1e-12, hn + 1e-12),
                    "active_pos": float((v[y[te] == 1] > 0).mean()), "active_neg": float((v[y[te] == 0] > 0).mean())})
    return out


def gini(v: np.ndarray) -> float:
    """Gini coefficient of nonnegative values (0: all equal; (n-1)/n: all mass on one)."""
    v = np.sort(np.asarray(v, dtype=np.float64))
    if v.sum() <= 0:
        return 0.0
    n = len(v)
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * v.sum()))


def mean_diff(z, y: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(z[y == 1].mean(0)).ravel() - np.asarray(z[y == 0].mean(0)).ravel())


def selectivity_and_reuse(tasks: dict[str, tuple[Any, np.ndarray, np.ndarray]], k: int = 20) -> dict[str, Any]:
    """Gini selectivity of the latents top-k for some task, and the Jaccard reuse of top-k sets.
    tasks: name -> (z, y, is_test); train rows only."""
    names = sorted(tasks)
    diffs = {t: mean_diff(tasks[t][0][~tasks[t][2]], tasks[t][1][~tasks[t][2]]) for t in names}
    tops = {t: set(np.argsort(-diffs[t], kind="stable")[:k].tolist()) for t in names}
    union = sorted(set().union(*tops.values()))
    m = np.stack([diffs[t] for t in names])  # [tasks, width]
    m = m / np.maximum(m.max(1, keepdims=True), 1e-12)  # each task's effects on one scale
    ginis = [gini(m[:, lat]) for lat in union]
    jac = [[len(tops[a] & tops[b]) / len(tops[a] | tops[b]) for b in names] for a in names]
    off = [jac[i][j] for i in range(len(names)) for j in range(len(names)) if i < j]
    width = m.shape[1]
    return {"k": k, "tasks": names, "latents": len(union), "gini": {"mean": float(np.mean(ginis)),
            "median": float(np.median(ginis)), "values": ginis, "max_possible": (len(names) - 1) / len(names)},
            "jaccard": jac, "jaccard_mean_offdiag": float(np.mean(off)) if off else float("nan"),
            "jaccard_random": k / (2 * width - k),
            "shared_pairs": [(names[i], names[j], jac[i][j]) for i in range(len(names)) for j in range(len(names))
                             if i < j and jac[i][j] > 0]}


def cluster_separation(spaces: dict[str, np.ndarray], labels: np.ndarray, max_rows: int = 1500,
                       seed: int = 0) -> dict[str, dict[str, float]]:
    """CH, DB and silhouette of the classes in each feature space (dense [n, dims], standardised
    per dimension; constant dimensions dropped); the same rows (at most max_rows, seeded) in each."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(labels), min(max_rows, len(labels)), replace=False))
    out = {}
    for name, x in spaces.items():
        v = np.asarray(x[rows].toarray() if hasattr(x, "toarray") else x[rows], dtype=np.float64)
        sd = v.std(0)
        v = (v[:, sd > 0] - v[:, sd > 0].mean(0)) / sd[sd > 0]
        out[name] = {"calinski_harabasz": float(calinski_harabasz_score(v, labels[rows])),
                     "davies_bouldin": float(davies_bouldin_score(v, labels[rows])),
                     "silhouette": float(silhouette_score(v, labels[rows])), "dims": int(v.shape[1]),
                     "rows": int(len(rows))}
    return out
