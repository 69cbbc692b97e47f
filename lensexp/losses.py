"""Regression losses with the predictive distributions they imply.

Each loss knows how many network outputs it needs for ``D`` labels, the per-batch loss, and the
predictive mean / standard deviation (and samples) it implies, so that training, calibration and
prediction share one definition:

* :class:`MSELoss` - outputs the mean only (no aleatoric uncertainty).
* :class:`GaussianNLL` - diagonal Gaussian; outputs mean and ``log sigma`` (Perreault Levasseur
  et al. 2017: ``sum_k (y_k - mu_k)^2 / (2 sigma_k^2) + log sigma_k``).
* :class:`BetaNLL` - the same Gaussian, each label's term weighted by ``sigma^(2 beta)`` (held
  constant in the gradient; Seitzer et al. 2022, beta = 0.5): hard labels keep their gradient
  instead of being explained away by a large sigma, while the optimal sigma is unchanged.
* :class:`FullCovNLL` - full-covariance Gaussian; outputs mean and the Cholesky factor ``L`` of
  the covariance (diagonal through ``exp``), ``Sigma = L L^T``.
* :class:`~lensexp.flow.FlowNLL` - a conditional normalizing flow over all labels (neural
  posterior estimation); outputs a context vector, has weights of its own (an ``nn.Module``) and
  no closed-form mean: it is sampled.

Labels are in normalised units (zero mean, unit spread per label) inside the network.
"""

from __future__ import annotations

import math

import torch

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -9.0, 5.0  # keeps exp(-2 log sigma) finite in float32


class Loss:
    """Base of the losses: ``name`` registers it (:data:`LOSSES`, checkpoints store the
    ``_target_``); the builder supplies ``n_labels`` (:func:`lensexp.build.build_loss`)."""

    name = ""

    def __init__(self, n_labels: int = 8):
        self.n_labels = int(n_labels)


class MSELoss(Loss):
    """Mean squared error; predictive std is zero (no aleatoric term)."""

    name = "mse"

    def n_outputs(self, d: int) -> int:
        return d

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).sum(-1).mean()

    def mean_std(self, out: torch.Tensor):
        return out, torch.zeros_like(out)

    def sample(self, out: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        return out.unsqueeze(0).expand(n, *out.shape)


class GaussianNLL(Loss):
    """Diagonal Gaussian negative log-likelihood; outputs ``[mu (D), log sigma (D)]``."""

    name = "gaussian_nll"

    def n_outputs(self, d: int) -> int:
        return 2 * d

    def split(self, out: torch.Tensor):
        d = out.shape[-1] // 2
        return out[..., :d], out[..., d:].clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self.split(out)
        z2 = ((y - mu) * torch.exp(-log_sigma)) ** 2
        return (0.5 * z2 + log_sigma + 0.5 * math.log(2 * math.pi)).sum(-1).mean()

    def mean_std(self, out: torch.Tensor):
        mu, log_sigma = self.split(out)
        return mu, torch.exp(log_sigma)

    def sample(self, out: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        mu, sigma = self.mean_std(out)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + sigma * eps


def beta_weight(log_sigma: torch.Tensor, beta: float) -> torch.Tensor:
    """The beta-NLL weight ``sigma^(2 beta)`` of each Gaussian term, held constant in the gradient
    (Seitzer et al. 2022): the mean's gradient becomes residual / sigma^(2 - 2 beta), the sigma that
    minimises each term is unchanged."""
    return torch.exp(2.0 * beta * log_sigma.detach())


class BetaNLL(GaussianNLL):
    """beta-NLL (Seitzer et al. 2022): the Gaussian NLL per label times ``sigma^(2 beta)``
    (detached). With ``beta = 0`` it is :class:`GaussianNLL`, with 1 the mean's gradient is the
    MSE's; 0.5 is meant to keep hard labels (e1, e2, centre, shear) learning while sigma still fits
    the residuals (measured in the CPU quickstart budget: no gain over the plain NLL). Same outputs
    and predictive distribution as :class:`GaussianNLL`."""

    name = "beta_nll"
    beta = 0.5

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self.split(out)
        z2 = ((y - mu) * torch.exp(-log_sigma)) ** 2
        weight = beta_weight(log_sigma, self.beta)
        return (weight * (0.5 * z2 + log_sigma + 0.5 * math.log(2 * math.pi))).sum(-1).mean()


class FullCovNLL(Loss):
    """Full-covariance Gaussian NLL; outputs ``[mu (D), L (D (D + 1) / 2)]``.

    ``L`` is lower triangular, filled row by row (``torch.tril_indices``); its diagonal is
    ``exp`` of the raw outputs, so ``Sigma = L L^T`` is positive definite.
    """

    name = "full_cov_nll"

    def n_outputs(self, d: int) -> int:
        return d + d * (d + 1) // 2

    @staticmethod
    def dim(n_out: int) -> int:
        return int((-3 + math.isqrt(9 + 8 * n_out)) // 2)

    def split(self, out: torch.Tensor):
        d = self.dim(out.shape[-1])
        mu, raw = out[..., :d], out[..., d:]
        rows, cols = torch.tril_indices(d, d, device=out.device)
        L = torch.zeros(*out.shape[:-1], d, d, dtype=out.dtype, device=out.device)
        L[..., rows, cols] = raw
        diag = torch.diagonal(L, dim1=-2, dim2=-1)
        L = L - torch.diag_embed(diag) + torch.diag_embed(torch.exp(diag.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX)))
        return mu, L

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mu, L = self.split(out)
        z = torch.linalg.solve_triangular(L, (y - mu).unsqueeze(-1), upper=False).squeeze(-1)
        logdet = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        d = mu.shape[-1]
        return (0.5 * (z * z).sum(-1) + logdet + 0.5 * d * math.log(2 * math.pi)).mean()

    def mean_std(self, out: torch.Tensor):
        mu, L = self.split(out)
        return mu, torch.sqrt((L * L).sum(-1))

    def sample(self, out: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        mu, L = self.split(out)
        eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + (L @ eps.unsqueeze(-1)).squeeze(-1)


LOSSES = {cls.name: cls for cls in (MSELoss, GaussianNLL, BetaNLL, FullCovNLL)}
