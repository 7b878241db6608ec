import math

import pytest
import torch

from saelab.evals.metrics import (
    Moments,
    ce_loss_recovered,
    explained_variance,
    l0,
    token_ce,
    token_kl,
)


def test_explained_variance_is_variance_around_the_mean():
    torch.manual_seed(0)
    x = torch.randn(500, 8, dtype=torch.float64) + 10.0  # a large mean must not inflate EV
    x_hat = x + 0.5 * torch.randn(500, 8, dtype=torch.float64)
    manual = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert explained_variance(x, x_hat) == pytest.approx(float(manual), rel=1e-9)
    # predicting the mean explains nothing; predicting zeros is far worse than nothing
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-9)
    assert explained_variance(x, torch.zeros_like(x)) < -50
    assert explained_variance(x, x) == pytest.approx(1.0)


def test_streaming_moments_equal_one_shot():
    torch.manual_seed(1)
    x, x_hat = torch.randn(300, 5) * 3 + 1, torch.randn(300, 5)
    m = Moments(5)
    for a, b in zip(x.split(77), x_hat.split(77), strict=True):
        m.update(a, b)
    assert m.explained_variance() == pytest.approx(explained_variance(x, x_hat), rel=1e-10)
    assert m.mse() == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-6)


def test_ce_recovered_endpoints():
    assert ce_loss_recovered(2.0, 2.0, 10.0) == 1.0
    assert ce_loss_recovered(2.0, 10.0, 10.0) == 0.0
    assert ce_loss_recovered(2.0, 4.0, 10.0) == pytest.approx(0.75)


def test_token_ce_and_kl():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    ce = token_ce(logits, torch.tensor([0, 0]))
    assert ce[0] == pytest.approx(math.log(2)) and ce[1] < 1e-6
    assert torch.allclose(token_kl(logits, logits), torch.zeros(2), atol=1e-7)
    kl = token_kl(logits, logits.flip(-1))  # row 0 is uniform either way: KL 0; row 1 ~ 20 nats
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[1] == pytest.approx(20.0, rel=1e-4)


def test_l0():
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])) == 1.5


def test_legacy_explained_variance_is_a_mean_of_ratios_and_differs():
    from saelab.evals.metrics import explained_variance_legacy

    torch.manual_seed(0)
    x = torch.randn(400, 8, dtype=torch.float64)
    x[:200] *= 0.1  # low-variance tokens weigh as much as the others in the legacy mean
    x_hat = x + 0.05 * torch.randn(400, 8, dtype=torch.float64)
    legacy = explained_variance_legacy(x, x_hat)
    assert legacy.shape == (400,)
    assert float(legacy.mean()) < explained_variance(x, x_hat) - 0.05


def test_relative_reconstruction_bias_and_shrinkage():
    from saelab.evals.metrics import relative_reconstruction_bias

    x = torch.randn(100, 5)
    assert relative_reconstruction_bias(x, x) == pytest.approx(1.0)
    assert relative_reconstruction_bias(x, 0.5 * x) == pytest.approx(0.5)


def test_density_histogram_and_similar_decoder_pairs():
    from saelab.evals.metrics import density_histogram, most_similar_decoder_pairs

    h = density_histogram(torch.tensor([0.0, 0.0, 1e-3, 0.5, 1.0]))
    assert h["never_fired"] == 2 and sum(h["counts"]) == 3
    torch.manual_seed(0)
    W = torch.randn(300, 16)
    W[250] = W[7] * 3 + 1e-3  # a near-duplicate direction (any scale)
    W[40] = -W[41]  # anti-parallel is not similar
    pairs = most_similar_decoder_pairs(W, 3, chunk=64)
    assert (pairs[0]["i"], pairs[0]["j"]) == (7, 250) and pairs[0]["cosine"] > 0.999
    assert all(p["i"] < p["j"] for p in pairs) and pairs[0]["cosine"] >= pairs[1]["cosine"]
