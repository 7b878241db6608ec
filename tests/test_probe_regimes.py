"""The probing regimes: exact sampler sizes, ratios and noise rates; CV that never sees test
rows; a planted latent makes the SAE probe win; shuffled labels give chance; the quiver."""

import math
import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from saelab.evals.probe_regimes import (
    KNN,
    LogReg,
    Pools,
    Probe,
    cv_splits,
    imbalance_ratios,
    make_probes,
    noise_fractions,
    quiver,
    regime_points,
    run_point,
    select_and_test,
    setting_summary,
    task_grid,
    training_sizes,
)


def _pools(pos_train=300, neg_train=700, pos_test=120, neg_test=200, seed=0):
    y = np.array([1] * pos_train + [0] * neg_train + [1] * pos_test + [0] * neg_test)
    test = np.array([False] * (pos_train + neg_train) + [True] * (pos_test + neg_test))
    return y, test, Pools.make(y, test, seed)


def test_the_regimes_points_are_the_papers():
    assert training_sizes() == [2, 3, 4, 5, 7, 10, 14, 20, 28, 38, 53, 74, 103, 143, 198, 275, 382, 531, 737, 1024]
    assert imbalance_ratios() == [round(0.05 * i, 2) for i in range(1, 20)]
    assert noise_fractions() == [round(0.05 * i, 2) for i in range(11)]
    sizes = [p.n_train for p in regime_points("scarcity", 300, 700, 120, 200)]
    assert sizes == [n for n in training_sizes() if n <= 600]  # 737 and 1024 need more positives
    (normal,) = regime_points("normal", 300, 700, 120, 200)
    assert (normal.n_train, normal.n_pos, normal.n_test, normal.n_test_pos) == (600, 300, 240, 120)
    imb = regime_points("imbalance", 300, 700, 120, 200)
    n = min(int(700 / 0.95), int(300 / 0.95))  # the paper's get_classimabalance_num_train
    assert [p.pos_ratio for p in imb] == imbalance_ratios() and {p.n_train for p in imb} == {n}
    assert regime_points("normal", 900, 900, 100, 100)[0].n_train == 1024  # the paper's cap


@pytest.mark.parametrize("setting", ["normal", "scarcity", "imbalance", "label_noise"])
def test_each_samplers_draws_have_exactly_the_stated_sizes_ratios_and_noise(setting):
    y, test, pools = _pools()
    flipped_before = None
    for p in regime_points(setting, 300, 700, 120, 200):
        d = pools.draw(p)
        assert len(d.train) == p.n_train and len(set(d.train)) == p.n_train
        assert y[d.train].sum() == math.ceil(round(p.pos_ratio * p.n_train, 9))  # clean labels: the ratio
        assert not test[d.train].any() and test[d.test].all()  # train rows from train, test rows from test
        assert len(d.test) == p.n_test and y[d.test].sum() == math.ceil(round(p.test_ratio * p.n_test, 9))
        assert (d.y_test == y[d.test]).all()  # test labels stay clean
        changed = np.flatnonzero(d.y_train != y[d.train])
        assert len(changed) == int(round(p.noise * p.n_train, 9)) and (changed == d.flipped).all()
        if setting == "label_noise":  # one training set, nested flips, as the paper's seeded draws
            if flipped_before is not None:
                assert set(flipped_before) <= set(d.flipped)
            flipped_before = d.flipped
    if setting == "imbalance":
        ratios = [round(float(y[pools.draw(p).train].mean()), 2) for p in regime_points(setting, 300, 700, 120, 200)]
        assert max(abs(a - b) for a, b in zip(ratios, imbalance_ratios(), strict=True)) <= 0.01


def test_cv_follows_the_papers_rule():
    assert cv_splits(np.array([1, 0, 1]))[0] == "none"
    scheme, splits = cv_splits(np.array([1, 0] * 5))  # n = 10: leave-pair-out over mixed pairs
    assert scheme == "leave-pair-out" and len(splits) == 25 and all(len(va) == 2 for _, va in splits)
    scheme, splits = cv_splits(np.array([1, 0] * 30))
    assert scheme == "stratified 6-fold" and len(splits) == 6
    y = np.array([1] * 30 + [0] * 170)
    scheme, splits = cv_splits(y)
    (tr, va), = splits
    assert scheme == "stratified holdout" and len(va) == 40 and y[va].sum() == 6 and not set(tr) & set(va)
    assert len(cv_splits(np.array([1, 0] * 400))[1][0][1]) == 100  # min(20%, 100)


class Spy(LogReg):
    """Logistic regression that records the row ids (column 0) of every matrix it is shown."""

    def __init__(self):
        super().__init__(budget=3)
        self.calls = []

    def fit_score(self, xf, yf, xe, configs):
        self.calls.append((set(xf[:, 0].astype(int)), set(xe[:, 0].astype(int)), len(configs)))
        return super().fit_score(xf, yf, xe, configs)


@pytest.mark.parametrize("n_train", [10, 60, 300])
def test_cross_validation_never_sees_test_rows(n_train):
    """The hyperparameter search may only be shown training rows; the one call that sees test rows is
    the final fit (on all training rows), after the choice is made. Fails if any CV call sees one."""
    y, test, pools = _pools()
    rng = np.random.default_rng(0)
    x = np.column_stack([np.arange(len(y)), rng.normal(size=(len(y), 5)) + y[:, None]])
    (p,) = [q for q in regime_points("scarcity", 300, 700, 120, 200) if q.n_train >= n_train][:1]
    d = pools.draw(p)
    spy = Spy()
    run_point({"resid": x}, [spy], d)
    train_ids, test_ids = set(d.train), set(d.test)
    *cv_calls, final = spy.calls
    assert cv_calls and all(fit <= train_ids and ev <= train_ids for fit, ev, _ in cv_calls)
    assert final[0] == train_ids and final[1] == test_ids and final[2] == 1


def _planted(n_pos=150, n_neg=150, seed=0, shuffle=False):
    """Residual: weak signal spread over 50 dims; latent 7 fires on (most) positives only."""
    rng = np.random.default_rng(seed)
    n = 2 * (n_pos + n_neg)
    y = np.array(([1] * n_pos + [0] * n_neg) * 2)
    test = np.array([False] * (n_pos + n_neg) + [True] * (n_pos + n_neg))
    x = rng.normal(size=(n, 50)) + 0.05 * y[:, None]
    z = sp.random(n, 200, density=0.03, random_state=seed, format="lil", dtype=np.float32)
    z[:, 7] = (y * (rng.random(n) < 0.9) * 3.0)[:, None]
    if shuffle:
        y = rng.permutation(y)
    return {"resid": x, "sae": z.tocsr()}, y, test


def test_a_planted_latent_makes_the_sae_probe_win_and_shuffled_labels_give_chance():
    probes = make_probes(["logreg", "knn", "sae_topk"], budget=3)
    feats, y, test = _planted()
    recs = task_grid("planted", feats, y, test, ["normal", "label_noise"], probes)
    s = setting_summary(recs, "normal", ["logreg", "knn"], {"sae": ["sae_topk"]}, n_boot=100)
    assert s["picked"]["sae"].mean == 1.0 and s["test_auc"]["sae_topk"].mean > 0.9 > s["test_auc"]["logreg"].mean
    noisy = [r for r in recs if r["setting"] == "label_noise" and r["point"] <= 0.2]
    picks = quiver(noisy, ["logreg", "knn"], ["sae_topk"])
    assert all(q["extra_picked"] for q in picks) and len(picks) == 5
    feats, y, test = _planted(shuffle=True)
    chance = task_grid("shuffled", feats, y, test, ["normal"], probes)
    assert all(abs(r["test_auc"] - 0.5) < 0.1 for r in chance), [(r["probe"], r["test_auc"]) for r in chance]


def test_the_quiver_breaks_ties_towards_the_baselines_and_skips_points_without_validation():
    def rec(probe, point, val, test):
        return {"task": "t", "setting": "s", "point": point, "probe": probe, "val_auc": val, "test_auc": test,
                "test_acc": test}

    recs = [rec("logreg", 1, 0.8, 0.7), rec("sae_topk", 1, 0.8, 0.9),  # tie: the baseline
            rec("logreg", 2, 0.7, 0.7), rec("sae_topk", 2, 0.9, 0.6),  # SAE picked on validation, worse on test
            rec("logreg", 3, float("nan"), 0.5), rec("sae_topk", 3, float("nan"), 0.9)]
    picks = quiver(recs, ["logreg"], ["sae_topk"])
    assert [(q["point"], q["extra_picked"]) for q in picks] == [(1, False), (2, True)]
    assert picks[1]["test_auc_with_extra"] == 0.6  # never chosen on test


def test_probes_score_and_select_on_training_rows(tmp_path):
    rng = np.random.default_rng(0)
    y = np.array([1, 0] * 40)
    x = rng.normal(size=(80, 8)) + 1.5 * y[:, None]
    for probe in make_probes(["logreg", "pca", "knn", "mlp", "sae_all", "ctrl_topk"], budget=3):
        assert isinstance(probe, Probe)
        xx = sp.csr_matrix(np.abs(x)) if probe.features in ("sae", "ctrl") else x
        o = select_and_test(probe, xx[:60], y[:60], xx[60:], y[60:], cv_splits(y[:60])[1])
        assert 0 <= o.val_auc <= 1 and o.test_auc > 0.7, (probe.name, o)
    assert isinstance(make_probes(["knn"])[0], KNN)
    with pytest.raises(ValueError, match="unknown probe 'svm'"):
        make_probes(["svm"])


def test_the_gbdt_probe_is_xgboost():
    pytest.importorskip("xgboost")
    y = np.array([1, 0] * 40)
    x = np.random.default_rng(0).normal(size=(80, 6)) + 2 * y[:, None]
    (g,) = make_probes(["gbdt"], budget=2)
    o = select_and_test(g, x[:60], y[:60], x[60:], y[60:], cv_splits(y[:60])[1])
    assert o.test_auc > 0.8 and o.config in [g.GRID[0], g.GRID[1]]


def test_mlps_trained_together_equal_each_trained_alone():
    """The batched MLP: every (problem, config) is its own objective, so a model trained beside
    others (problems of different sizes padded together, one- and two-layer configs sharing the
    first matrix) equals the same model trained alone."""
    from saelab.evals.probe_mlp import fit_mlps

    rng = np.random.default_rng(0)
    configs = [dict(c) for c in make_probes(["mlp"], budget=4)[0].GRID[:4]]
    problems = []
    for n, m in ((9, 3), (20, 7), (14, 5)):
        y = np.array([0, 1] * (n // 2) + [1] * (n % 2))
        problems.append((rng.normal(size=(n, 12)) + y[:, None], y, rng.normal(size=(m, 12))))
    together = fit_mlps(problems, configs, seed=3)
    for p, t in zip(problems, together, strict=True):
        alone = fit_mlps([p], configs, seed=3)[0]
        assert t.shape == (len(configs), len(p[2]))
        np.testing.assert_allclose(t, alone, atol=1e-5)
    assert not np.allclose(together[0][0], fit_mlps([problems[0]], configs, seed=4)[0][0], atol=1e-3)


def test_the_mlp_probe_learns_what_a_linear_probe_cannot_and_matches_sklearns_mlp():
    """XOR of two features: logistic regression is at chance, the MLP is not; its test AUC is that
    of sklearn's MLPClassifier (the model and objective it reimplements) within 0.05."""
    from sklearn.metrics import roc_auc_score
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 10))
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)
    (mlp,) = make_probes(["mlp"], budget=2)
    (lin,) = make_probes(["logreg"], budget=2)
    splits = cv_splits(y[:400])[1]
    o = select_and_test(mlp, x[:400], y[:400], x[400:], y[400:], splits)
    lo = select_and_test(lin, x[:400], y[:400], x[400:], y[400:], splits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = MLPClassifier(**o.config, solver="lbfgs", max_iter=200, random_state=0).fit(x[:400], y[:400])
    sk_auc = roc_auc_score(y[400:], sk.predict_proba(x[400:])[:, 1])
    assert lo.test_auc < 0.65 < 0.9 < o.test_auc and abs(o.test_auc - sk_auc) < 0.05, (o, lo.test_auc, sk_auc)


def test_the_mlps_cross_validation_never_sees_test_rows(monkeypatch):
    """The MLP fits every split at once (fit_score_splits): its CV problems hold training rows only."""
    import saelab.evals.probe_regimes as pr

    calls = []
    real = pr.fit_mlps

    def spy(problems, configs, seed=0, **kw):
        calls.append([(set(f[:, 0].astype(int)), set(e[:, 0].astype(int))) for f, _, e in problems])
        return real(problems, configs, seed, steps=2)

    monkeypatch.setattr(pr, "fit_mlps", spy)
    y, test, pools = _pools()
    x = np.column_stack([np.arange(len(y)), np.random.default_rng(0).normal(size=(len(y), 5)) + y[:, None]])
    for n_train in (10, 60, 300):
        (p,) = [q for q in regime_points("scarcity", 300, 700, 120, 200) if q.n_train >= n_train][:1]
        d = pools.draw(p)
        calls.clear()
        run_point({"resid": x}, make_probes(["mlp"], budget=2), d)
        *cv, final = calls
        train_ids = set(d.train)
        assert len(cv) == 1 and len(cv[0]) == len(cv_splits(d.y_train)[1]) > 0
        assert all(f <= train_ids and e <= train_ids for f, e in cv[0])
        assert final == [(train_ids, set(d.test))]


def test_the_sae_topk_grid_spans_the_papers_ks():
    (p,) = make_probes(["sae_topk"], budget=4)
    assert [c["k"] for c in p.configs(100, 4608)] == [1, 8, 64, 512]
    assert [c["k"] for c in p.configs(100, 50)] == [1, 4, 14, 50]
    assert [c["k"] for c in make_probes(["sae_topk"], budget=8)[0].configs(100, 4608)] == [1, 2, 6, 14, 35, 86, 210, 512]
