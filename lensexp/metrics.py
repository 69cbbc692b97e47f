"""Accuracy and calibration metrics: RMSE, median absolute error, interval coverage.

The predictive distribution of one lens is the MC-dropout mixture of Perreault Levasseur et al.
(2017): ``T`` stochastic forward passes, each a Gaussian ``N(mu_t, sigma_t^2)`` (aleatoric); its
central intervals come from samples of the mixture. Coverage at level ``c`` is the fraction of
truths inside the central ``c`` interval: calibrated predictions give ``c``.
"""

from __future__ import annotations

import math

import torch

LEVELS = (0.683, 0.955, 0.997)


def mixture_samples(means: torch.Tensor, stds: torch.Tensor, per_pass: int = 16, generator=None) -> torch.Tensor:
    """Samples [T * per_pass, B, D] of the mixture of ``N(means[t], stds[t]^2)`` over passes ``t``.

    ``means``, ``stds``: [T, B, D] from T MC-dropout passes (``stds`` zero for an MSE model).
    """
    eps = torch.randn((per_pass, *means.shape), generator=generator, dtype=means.dtype, device=means.device)
    return (means.unsqueeze(0) + stds.unsqueeze(0) * eps).reshape(-1, *means.shape[1:])


def central_intervals(samples: torch.Tensor, levels=LEVELS) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """Central intervals per level from samples [S, B, D]: ``{level: (lo [B, D], hi [B, D])}``."""
    qs = []
    for c in levels:
        qs += [(1 - c) / 2, (1 + c) / 2]
    q = torch.quantile(samples.float(), torch.tensor(qs, device=samples.device), dim=0)
    return {c: (q[2 * i], q[2 * i + 1]) for i, c in enumerate(levels)}


def coverage(truth: torch.Tensor, intervals: dict) -> dict[float, torch.Tensor]:
    """Fraction [D] of truths [B, D] inside each level's interval."""
    return {c: ((truth >= lo) & (truth <= hi)).float().mean(0) for c, (lo, hi) in intervals.items()}


def coverage_error(cov: dict) -> torch.Tensor:
    """Mean |coverage - nominal| over levels, per label [D] (0 is perfect calibration)."""
    return torch.stack([(v - c).abs() for c, v in cov.items()]).mean(0)


def binomial_sigma(level: float, n: int) -> float:
    """Standard error of an empirical coverage at ``level`` from ``n`` lenses."""
    return math.sqrt(level * (1 - level) / max(n, 1))


def rmse(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Root-mean-square error per label [D]."""
    return torch.sqrt(((pred - truth) ** 2).mean(0))


def median_abs_error(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Median absolute error per label [D]."""
    return (pred - truth).abs().median(0).values
