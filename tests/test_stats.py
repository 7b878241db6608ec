import numpy as np
import pytest
import torch

from saelab.evals.metrics import explained_variance
from saelab.evals.stats import compare, mean_ci, resample_counts


def test_resample_counts_draw_every_unit_n_times_in_total():
    w = resample_counts(50, 40, seed=1)
    assert w.shape == (40, 50) and (w.sum(1) == 50).all()
    assert not np.array_equal(w[0], w[1])


def test_identical_sides_give_a_zero_difference_and_a_degenerate_ci():
    rng = np.random.default_rng(0)
    correct = (rng.random(300) < 0.7).astype(float)
    r = compare((correct, np.ones(300)), (correct, np.ones(300)), n_boot=300)
    assert r.diff == 0 and r.diff_ci95 == [0.0, 0.0]
    assert r.a_ci95[0] < r.a < r.a_ci95[1]


def test_a_real_difference_is_detected_and_a_null_one_is_not():
    rng = np.random.default_rng(0)
    n = 400
    a = (rng.random(n) < 0.9).astype(float)
    b = (rng.random(n) < 0.6).astype(float)
    r = compare((a, np.ones(n)), (b, np.ones(n)), n_boot=500)
    assert r.diff == pytest.approx(a.mean() - b.mean())
    assert r.diff_ci95[0] > 0.15
    b2 = rng.permutation(a)  # same accuracy, other examples right
    r2 = compare((a, np.ones(n)), (b2, np.ones(n)), n_boot=500)
    assert r2.diff_ci95[0] < 0 < r2.diff_ci95[1]


def test_one_minus_ratio_reproduces_explained_variance():
    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64) + 3
    x_hat = x + 0.3 * torch.randn(200, 6, dtype=torch.float64)
    sse = ((x - x_hat) ** 2).sum(1).numpy()
    tv = ((x - x.mean(0)) ** 2).sum(1).numpy()
    r = compare((sse, tv), (sse * 2, tv), n_boot=200, one_minus=True)
    assert r.a == pytest.approx(explained_variance(x, x_hat))
    assert r.diff > 0 and r.diff_ci95[0] > 0


def test_unpaired_units_are_refused():
    with pytest.raises(ValueError, match="same units"):
        compare((np.ones(3), np.ones(3)), (np.ones(4), np.ones(4)))


def test_mean_ci_covers_the_mean():
    r = mean_ci(np.linspace(0, 1, 101), n_boot=300)
    assert r.mean == pytest.approx(0.5)
    assert r.ci95[0] < r.mean < r.ci95[1]
