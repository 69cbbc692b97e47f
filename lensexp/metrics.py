"""Accuracy and calibration metrics: RMSE, median absolute error, interval coverage.

The predictive distribution of one lens is the MC-dropout mixture of Perreault Levasseur et al.
(2017): ``T`` stochastic forward passes, each a Gaussian ``N(mu_t, sigma_t^2)`` (aleatoric); its
central intervals come from samples of the mixture. Coverage at level ``c`` is the fraction of
truths inside the central ``c`` interval: calibrated predictions give ``c``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LEVELS = (0.683, 0.955, 0.997)
CURVE = np.round(np.linspace(0.01, 0.99, 99), 2)  # nominal levels of the coverage curve
SCALES = np.exp(np.linspace(np.log(0.1), np.log(10.0), 161))  # spread scales tried by fit_scales


def mixture_samples(
    means: torch.Tensor, stds: torch.Tensor, per_pass: int = 16, generator=None, common: bool = False
) -> torch.Tensor:
    """Samples [T * per_pass, B, D] of the mixture of ``N(means[t], stds[t]^2)`` over passes ``t``.

    ``means``, ``stds``: [T, B, D] from T MC-dropout passes (``stds`` zero for an MSE model).
    ``common``: every lens uses the same standard-normal draws (common random numbers), so a
    lens's samples do not depend on its batch or DDP rank.
    """
    t, b, d = means.shape
    shape = (per_pass, t, 1, d) if common else (per_pass, t, b, d)
    eps = torch.randn(shape, generator=generator, dtype=means.dtype, device=means.device)
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


def as_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """``seed`` itself when it is a generator (a stream over many batches), else a CPU generator
    seeded with it (None: 0)."""
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed or 0))


def posterior_samples(means, stds, n_samples: int = 2048, seed: int | torch.Generator = 0, common: bool = False):
    """Mixture samples [S, N, D] (network space) and their centre (mean of the MC means) [N, D].

    ``seed``: an int or a generator to draw from (a stream over many batches); ``common``: as in
    :func:`mixture_samples`."""
    g = as_generator(seed)
    samples = mixture_samples(means, stds, per_pass=max(1, n_samples // means.shape[0]), generator=g, common=common)
    return samples, means.mean(0)


def scaled(samples, centre, scale):
    """Samples with their spread about ``centre`` multiplied by ``scale`` ([D], or [B, D] per image)."""
    return centre + (samples - centre) * torch.as_tensor(scale, dtype=samples.dtype)


def coverage_curve(samples, z_truth, levels=CURVE) -> np.ndarray:
    """Empirical coverage [len(levels), D] of central intervals at each nominal level."""
    lv = [float(x) for x in levels]
    cov = coverage(z_truth, central_intervals(samples, lv))
    return np.stack([cov[c].numpy() for c in lv])


def fit_scales(samples, centre, z_truth, levels=CURVE) -> np.ndarray:
    """Per-label spread scale minimising the mean |coverage - nominal| over the curve."""
    best = np.full(z_truth.shape[1], np.inf)
    out = np.ones(z_truth.shape[1])
    # distance of each truth from the centre, in units of the posterior's quantile spreads:
    # coverage at scale s equals coverage at 1 of truths shrunk by 1/s, so one quantile pass serves all
    lv = [float(x) for x in levels]
    iv = central_intervals(samples, lv)
    for s in SCALES:
        zt = centre + (z_truth - centre) / s
        cov = coverage(zt, iv)
        err = np.mean([np.abs(cov[c].numpy() - c) for c in lv], 0)
        better = err < best
        best[better], out[better] = err[better], s
    return out


SHORT = {0.683: "cov68", 0.955: "cov95", 0.997: "cov997"}  # metric names of the LEVELS


def validation_metrics(model, samples: torch.Tensor, centre: torch.Tensor, truth: torch.Tensor, prefix="val") -> dict:
    """Per label: RMSE and median error of the centre (physical units) and coverage at
    ``LEVELS``, before and after one spread scale per label (fitted on the even-numbered lenses,
    scored on the odd ones), as ``{prefix}/{metric}/{label}``. ``samples`` [S, N, D] and
    ``centre`` [N, D] are in network units (``model.posterior``), ``truth`` [N, D] physical;
    ``model`` gives ``labels``, ``to_net`` and ``from_net``."""
    z_truth = model.to_net(truth.to(model.device)).cpu()
    cov = coverage(z_truth, central_intervals(samples))
    pred = model.from_net(centre.to(model.device)).cpu()
    err_rms, med = rmse(pred, truth), median_abs_error(pred, truth)
    out = {}
    for j, name in enumerate(model.labels):
        out[f"{prefix}/rmse/{name}"] = float(err_rms[j])
        out[f"{prefix}/median_abs/{name}"] = float(med[j])
        for c, v in cov.items():
            out[f"{prefix}/{SHORT[c]}/{name}"] = float(v[j])
    out[f"{prefix}/coverage_error"] = float(coverage_error(cov).mean())
    if truth.shape[0] >= 4:
        fit = fit_scales(samples[:, 0::2], centre[0::2], z_truth[0::2])
        cal = coverage(z_truth[1::2], central_intervals(scaled(samples[:, 1::2], centre[1::2], fit)))
        for j, name in enumerate(model.labels):
            for c, v in cal.items():
                out[f"{prefix}/cal_{SHORT[c]}/{name}"] = float(v[j])
        out[f"{prefix}/cal_coverage_error"] = float(coverage_error(cal).mean())
    return out
