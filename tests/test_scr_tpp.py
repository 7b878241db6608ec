"""SCR / TPP on a synthetic SAE whose latents are known directions, and the analyses' measures."""

import numpy as np
import scipy.sparse as sp

from saelab.evals.probe_analyses import (
    cluster_separation,
    gini,
    js_divergence,
    selectivity_and_reuse,
    separability,
)
from saelab.evals.scr_tpp import ablated, scr, scr_score, summarize, tpp


def _sae_world(labels_dims: dict[int, np.ndarray], n: int, d: int = 200, seed: int = 0):
    """x = 3 * (attribute) along its own axis + noise; the SAE's latents are the positive parts of
    the axes (W_dec = identity), so ablating latent i removes what axis i carries."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * 0.7
    for dim, v in labels_dims.items():
        x[:, dim] += 3.0 * v
    z = sp.csr_matrix(np.maximum(x, 0))
    return x, z, np.eye(d)


def test_ablation_keeps_the_error_and_removes_the_latents_share():
    x, z, w = _sae_world({}, 5, d=4)
    out = ablated(x, z, w, np.array([1, 3]))
    assert np.allclose(out[:, [0, 2]], x[:, [0, 2]]) and np.allclose(out[:, [1, 3]], np.minimum(x[:, [1, 3]], 0))
    assert scr_score(0.9, 0.6, 0.6) == 0.0 and abs(scr_score(0.8, 0.6, 1.0) - 0.5) < 1e-12


def test_scr_removes_a_planted_spurious_direction_and_random_latents_do_not():
    """Each value of each attribute has its own latent (as a gender attribute has 'male' and
    'female' latents); the spurious one is stronger, so the biased probe leans on it."""
    rng = np.random.default_rng(1)
    n = 1600
    a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
    x, z, w = _sae_world({0: 0.5 * a, 1: 0.5 * (1 - a), 2: b, 3: 1 - b}, n)
    test = rng.random(n) < 0.4
    r = scr(x, z, a, b, test, w, n_train=400, n_values=(2, 20), n_boot=200)
    assert r["direction"] == "dir1" and r["oracle"] > r["base"] + 0.1
    s = r["scores"]
    assert s[2]["sae"] > 0.5 and abs(s[2]["random"]) < 0.2, s
    summary, clean = summarize([{"task": "t", "setting": "normal", **r}], "scr", (2, 20))
    c = summary["mean_normal_top2"]
    assert c.a == s[2]["sae"] and c.diff_ci95[0] > 0 and "boot_sae" not in clean[0]["scores"]["2"]


def test_tpp_drops_the_targeted_probe_only():
    rng = np.random.default_rng(2)
    n = 1500
    labels = rng.integers(0, 3, n)
    x, z, w = _sae_world({i: (labels == i).astype(float) for i in range(3)}, n)
    test = rng.random(n) < 0.4
    r = tpp(x, z, labels, ["a", "b", "c"], test, w, n_train=200, n_values=(1, 20), n_boot=200)
    s = r["scores"][1]
    # the other class-vs-rest probes read a little of class a too (its rows are their negatives)
    assert s["sae"]["intended"] > 0.25 and abs(s["sae"]["unintended"]) < 0.1 and s["sae"]["tpp"] > 0.15
    assert abs(s["random"]["tpp"]) < 0.05
    summary, _ = summarize([{"task": "t", "setting": "normal", **r}], "tpp", (1, 20))
    assert summary["mean_normal_top1"].diff_ci95[0] > 0


def test_the_analyses_measures():
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == 1.0
    assert js_divergence(np.array([0.3, 0.7]), np.array([0.3, 0.7])) == 0.0
    assert abs(gini(np.array([0, 0, 0, 1.0])) - 0.75) < 1e-12 and gini(np.ones(4)) == 0.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    test = rng.random(600) < 0.5
    x, z, _ = _sae_world({5: y}, 600, d=50)
    sep = separability(z, y, test, k=3)
    assert sep[0]["latent"] == 5 and sep[0]["js"] > 0.5 > sep[1]["js"]
    x2, z2, _ = _sae_world({9: y}, 600, d=50, seed=1)
    sel = selectivity_and_reuse({"t5": (z, y, test), "t9": (z2, y, test), "t5b": (z, 1 - y, test)}, k=1)
    assert sel["jaccard"][sel["tasks"].index("t5")][sel["tasks"].index("t5b")] == 1.0
    assert sel["latents"] == 2 and sel["jaccard_random"] == 1 / 99
    labels = rng.integers(0, 3, 600)
    xc, zc, _ = _sae_world({i: (labels == i).astype(float) for i in range(3)}, 600, d=30)
    c = cluster_separation({"resid": xc, "noise": rng.normal(size=(600, 30))}, labels)
    assert c["resid"]["silhouette"] > c["noise"]["silhouette"] and c["resid"]["davies_bouldin"] < c["noise"]["davies_bouldin"]
