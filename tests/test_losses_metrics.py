"""Losses against torch.distributions and hand values; coverage on synthetic predictors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from lensexp.errors import ConfigError
from lensexp.build import build_loss
from lensexp.losses import BetaNLL, FullCovNLL, GaussianNLL, MSELoss
from lensexp.metrics import (
    LEVELS,
    binomial_sigma,
    central_intervals,
    coverage,
    coverage_error,
    median_abs_error,
    mixture_samples,
    rmse,
)

G = torch.Generator().manual_seed(0)


def test_mse_by_hand():
    out = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert float(MSELoss()(out, y)) == pytest.approx((1 + 0 + 1 + 4) / 2)


def test_gaussian_nll_matches_torch_distributions():
    mu = torch.randn(5, 8, generator=G, dtype=torch.float64)
    log_sigma = 0.3 * torch.randn(5, 8, generator=G, dtype=torch.float64)
    y = torch.randn(5, 8, generator=G, dtype=torch.float64)
    got = GaussianNLL()(torch.cat([mu, log_sigma], -1), y)
    want = -Normal(mu, log_sigma.exp()).log_prob(y).sum(-1).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    # by hand: one label, mu 0, sigma e, y 1 -> 1/(2 e^2) + 1 + log(2 pi)/2
    one = GaussianNLL()(torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64))
    assert float(one) == pytest.approx(0.5 / math.e**2 + 1 + 0.5 * math.log(2 * math.pi))


def test_full_cov_nll_matches_multivariate_normal():
    d, b = 4, 6
    loss = FullCovNLL()
    assert loss.n_outputs(d) == 4 + 10 and loss.dim(14) == 4
    out = torch.randn(b, loss.n_outputs(d), generator=G, dtype=torch.float64)
    y = torch.randn(b, d, generator=G, dtype=torch.float64)
    mu, L = loss.split(out)
    assert torch.all(torch.diagonal(L, dim1=-2, dim2=-1) > 0) and torch.equal(L, torch.tril(L))
    want = -MultivariateNormal(mu, scale_tril=L).log_prob(y).mean()
    assert float(loss(out, y)) == pytest.approx(float(want), rel=1e-10)
    m, s = loss.mean_std(out)
    cov = L @ L.transpose(-1, -2)
    torch.testing.assert_close(s, torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1)))
    samples = loss.sample(out, 20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples.std(0), s, rtol=0.03, atol=0.0)


def test_beta_nll_reweights_the_mean_gradient_and_keeps_the_optimal_sigma():
    mu = torch.tensor([[0.0, 0.0]], requires_grad=True)
    log_sigma = torch.tensor([[math.log(0.5), math.log(2.0)]], requires_grad=True)
    y = torch.tensor([[1.0, 1.0]])
    loss = build_loss("beta_nll")
    assert isinstance(loss, BetaNLL) and loss.n_outputs(8) == 16
    loss(torch.cat([mu, log_sigma], -1), y).backward()
    # d/dmu = -(y - mu) / sigma^2 * sigma^(2 beta) = -(y - mu) / sigma for beta = 1/2
    torch.testing.assert_close(mu.grad, -torch.tensor([[1 / 0.5, 1 / 2.0]]))
    # d/dlog sigma = sigma (1 - r^2 / sigma^2): zero at sigma = |r|, as for the plain NLL
    torch.testing.assert_close(log_sigma.grad, torch.tensor([[0.5 * (1 - 4.0), 2.0 * (1 - 0.25)]]))
    # beta = 0 is the Gaussian NLL
    zero = BetaNLL()
    zero.beta = 0.0
    out = torch.randn(4, 16)
    yy = torch.randn(4, 8)
    torch.testing.assert_close(zero(out, yy), GaussianNLL()(out, yy))


def test_build_loss_from_a_name_or_a_target():
    assert isinstance(build_loss("gaussian_nll"), GaussianNLL)
    assert isinstance(build_loss({"_target_": "lensexp.losses.FullCovNLL"}), FullCovNLL)
    with pytest.raises(ConfigError, match="unknown loss 'l1'"):
        build_loss("l1")
    with pytest.raises(ConfigError, match="unknown loss 'os.system'"):
        build_loss({"_target_": "os.system"})


def _predictor(n, d, scale_sigma, passes=8):
    """Truth ~ N(mu, s^2) per lens; the predictor reports sigma = scale_sigma * s."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(n, d, generator=g)
    s = 0.5 + torch.rand(n, d, generator=g)
    truth = mu + s * torch.randn(n, d, generator=g)
    means = mu.expand(passes, n, d)
    stds = (scale_sigma * s).expand(passes, n, d)
    return truth, means, stds


def test_coverage_recovers_nominal_for_calibrated_gaussians():
    n, d = 4000, 3
    truth, means, stds = _predictor(n, d, 1.0)
    cov = coverage(truth, central_intervals(mixture_samples(means, stds, 64, G)))
    for c in LEVELS:
        assert torch.all((cov[c] - c).abs() < 4 * binomial_sigma(c, n) + 0.004), (c, cov[c])
    assert float(coverage_error(cov).max()) < 0.02


def test_coverage_detects_over_and_under_confidence():
    n, d = 4000, 2
    truth, means, stds = _predictor(n, d, 0.5)  # overconfident
    low = coverage(truth, central_intervals(mixture_samples(means, stds, 64, G)))
    truth, means, stds = _predictor(n, d, 2.0)  # underconfident
    high = coverage(truth, central_intervals(mixture_samples(means, stds, 64, G)))
    assert torch.all(low[0.683] < 0.683 - 0.1) and torch.all(high[0.683] > 0.683 + 0.1)


def test_mc_spread_enters_the_intervals():
    # zero aleatoric sigma: the spread of the passes alone sets the interval
    g = torch.Generator().manual_seed(4)
    truth = torch.zeros(2000, 1)
    means = torch.randn(200, 2000, 1, generator=g)
    cov = coverage(truth, central_intervals(mixture_samples(means, torch.zeros_like(means), 1, g)))
    assert cov[0.683].item() == 1.0  # 0 is the centre of every pass distribution
    lo, hi = central_intervals(mixture_samples(means, torch.zeros_like(means), 1, g))[0.683]
    assert float((hi - lo).mean()) == pytest.approx(2.0, rel=0.1)


def test_rmse_and_median():
    pred = torch.tensor([[1.0], [2.0], [4.0]])
    truth = torch.tensor([[1.0], [1.0], [1.0]])
    assert float(rmse(pred, truth)) == pytest.approx(math.sqrt((0 + 1 + 9) / 3))
    assert float(median_abs_error(pred, truth)) == 1.0
