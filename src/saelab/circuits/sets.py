"""Feature-set circuits: do a few SAE latents per layer carry a concept?

For a labelled task and SAEs at several layers, each example's latents (pooled over the
positions each SAE reads) are ranked per layer by an attribution that needs no probe, the
class-mean difference on the training split (`rank="mean_diff"`), or by |probe weight x
mean activation| of a logistic probe on all of a layer's latents (`rank="probe"`). The top K
per layer form the circuit. Faithfulness of a set = the test accuracy of a fresh logistic
probe on only those latents, against the ceiling (all latents of every layer) and against
random latent sets of the same size per layer (many draws; their per-example correctness
averaged over draws). Every comparison is paired on the same test examples with a bootstrap
95% CI. The build-up curve: the circuit of the first layer alone, the first two, ... .

Multi-class tasks are pooled over balanced one-vs-rest problems, as in sparse probing
(saelab.evals.probing.one_vs_rest), so chance is 50%.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from saelab.data.tasks import TaskData
from saelab.evals.probing import fit_predict, one_vs_rest, top_k_by_mean_diff
from saelab.evals.stats import compare, mean_ci

Rank = Literal["mean_diff", "probe"]


def rank_latents(z: np.ndarray, y: np.ndarray, rank: Rank, seed: int) -> np.ndarray:
    """Latent indices of one layer [width], best first, from training rows only. z: [n, width]."""
    if rank == "mean_diff":
        return top_k_by_mean_diff(z, y, z.shape[1])
    scaler = StandardScaler().fit(z)
    clf = LogisticRegression(max_iter=1000, random_state=seed).fit(scaler.transform(z), y)
    w = clf.coef_[0] / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)  # back in the latents' own units
    score = np.abs(w * z.mean(0))
    return np.argsort(-score, kind="stable")


def _problems(data: TaskData, seed: int):
    return list(one_vs_rest(data.labels, data.test, len(data.classes), seed))


def set_correctness(layers: list[np.ndarray], data: TaskData, columns) -> np.ndarray:
    """Per test example correctness (pooled over the one-vs-rest problems) of a probe on the
    columns `columns(problem, train rows, train y) -> [(layer, latent indices)]` picks."""
    out = []
    for c, tr, ytr, te, yte in _problems(data, 0):
        cols = columns(c, tr, ytr)
        x = np.hstack([layers[li][:, idx] for li, idx in cols]) if cols else np.zeros((len(data.labels), 1))
        out.append(fit_predict(x[tr], ytr, x[te], 0) == yte)
    return np.concatenate(out).astype(np.float64)


def feature_set_circuit(layers: list[np.ndarray], layer_names: list[str], data: TaskData, ks: list[int],
                        n_random: int = 20, rank: Rank = "mean_diff", buildup_k: int | None = None,
                        n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Faithfulness of the top-K-per-layer circuit for each K, against the all-latent ceiling and
    random sets of the same size; and the build-up over layers. layers: per layer z [n, width]."""
    rng = np.random.default_rng(seed)
    ranks: dict[tuple[int, int], np.ndarray] = {}

    def ranked(c, tr, ytr, li):
        if (c, li) not in ranks:
            ranks[(c, li)] = rank_latents(layers[li][tr], ytr, rank, seed)
        return ranks[(c, li)]

    units = "test example"
    ceiling = set_correctness(layers, data, lambda c, tr, ytr: [(li, slice(None)) for li in range(len(layers))])
    ones = np.ones_like(ceiling)
    grid = {}
    for k in ks:
        circuit = set_correctness(layers, data, lambda c, tr, ytr, k=k: [(li, ranked(c, tr, ytr, li)[:k])
                                                                        for li in range(len(layers))])
        draws = [set_correctness(layers, data, lambda c, tr, ytr, k=k: [
            (li, rng.choice(layers[li].shape[1], k, replace=False)) for li in range(len(layers))])
            for _ in range(n_random)]
        random_mean = np.mean(draws, axis=0)  # per example: the share of random sets that get it right
        grid[f"k{k}"] = {
            "k_per_layer": k, "latents": k * len(layers),
            "circuit_vs_random": compare((circuit, ones), (random_mean, ones), n_boot, seed, unit=units,
                                         sides="a = top-K circuit, b = random sets of the same size (mean of "
                                               f"{n_random} draws)"),
            "circuit_vs_ceiling": compare((circuit, ones), (ceiling, ones), n_boot, seed, unit=units,
                                          sides="a = top-K circuit, b = every latent of every layer"),
            "fraction_of_ceiling": float(circuit.mean() / max(ceiling.mean(), 1e-12)),
            "random_accuracy_per_draw": [float(d.mean()) for d in draws],
        }
    k = buildup_k or ks[len(ks) // 2]
    buildup = []
    for n in range(1, len(layers) + 1):
        acc = set_correctness(layers, data, lambda c, tr, ytr, n=n: [(li, ranked(c, tr, ytr, li)[:k])
                                                                    for li in range(n)])
        buildup.append({"layers": layer_names[:n], "accuracy": mean_ci(acc, n_boot, seed)})
    return {"ceiling_accuracy": mean_ci(ceiling, n_boot, seed), "grid": grid,
            "buildup": {"k_per_layer": k, "points": buildup}, "rank": rank, "n_random": n_random,
            "test_examples": int(ceiling.shape[0])}
