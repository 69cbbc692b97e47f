"""Per-image recalibration: a predictor whose errors grow at low S/N while its sigma does not."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lensexp import metrics
from lensexp.errors import ConfigError
from lensexp.metrics import posterior_samples
from lensexp.recalibrate import Recalibration, coverage_by_group, image_snr


def _predictor(n, seed):
    """Means [T, N, 2], stds (constant 0.3), truths and S/N: the true error is 0.05 * 40 / snr
    for label 0 (hard at low S/N) and proportional to the predicted std for label 1."""
    g = torch.Generator().manual_seed(seed)
    snr = torch.exp(torch.empty(n).uniform_(np.log(8.0), np.log(300.0), generator=g))
    mu = torch.randn(n, 2, generator=g)
    s_pred = torch.stack([torch.full((n,), 0.3), 0.1 + 0.4 * torch.rand(n, generator=g)], 1)
    s_true = torch.stack([0.05 * 40.0 / snr, 0.7 * s_pred[:, 1]], 1)
    truth = mu + s_true * torch.randn(n, 2, generator=g)
    return mu.expand(4, n, 2).clone(), s_pred.expand(4, n, 2).clone(), truth, snr


def _cov68_by_snr(cal, means, stds, truth, snr):
    samples, centre = posterior_samples(means, stds)
    if cal is not None:
        samples = cal.apply(samples, centre, snr)
    iv = metrics.central_intervals(samples, metrics.LEVELS)
    return coverage_by_group(truth, iv, {"snr": snr})["snr"]


def test_conditional_recalibration_is_honest_per_snr_bin_where_one_scale_is_not():
    labels = ["a", "b"]
    means, stds, truth, snr = _predictor(6000, 1)
    samples, centre = posterior_samples(means, stds)
    glob = Recalibration.fit(labels, samples, centre, truth, snr, "global")
    cond = Recalibration.fit(labels, samples, centre, truth, snr, "conditional")
    tm, ts, tt, tsnr = _predictor(6000, 2)  # fresh lenses from the same predictor
    g_bins = _cov68_by_snr(glob, tm, ts, tt, tsnr)
    c_bins = _cov68_by_snr(cond, tm, ts, tt, tsnr)
    worst_global = max(abs(v["coverage"]["0.683"][0] - 0.683) for v in g_bins.values())
    assert worst_global > 0.15  # one scale: far too wide at high S/N, too narrow at low S/N
    for name, v in c_bins.items():
        tol = 4 * metrics.binomial_sigma(0.683, v["n"]) + 0.02
        assert abs(v["coverage"]["0.683"][0] - 0.683) < tol, (name, v)
        assert abs(v["coverage"]["0.683"][1] - 0.683) < tol, (name, v)
    # label 1's sigma is already informative: its fitted std exponent is ~2 (variance ~ std^2 * const)
    assert cond.coef[0, 2] < -1.5 and abs(cond.coef[1, 2]) < 0.3


def test_auto_recalibration_leaves_calibrated_labels_alone():
    # label a: calibrated already; b: sigma 2x too small everywhere; c: errors grow at low S/N
    labels = ["a", "b", "c"]

    def lenses(n, seed):
        g = torch.Generator().manual_seed(seed)
        snr = torch.exp(torch.empty(n).uniform_(np.log(8.0), np.log(300.0), generator=g))
        mu = torch.randn(n, 3, generator=g)
        s_pred = torch.full((n, 3), 0.3)
        s_true = torch.stack([torch.full((n,), 0.3), torch.full((n,), 0.6), 0.05 * 40.0 / snr], 1)
        truth = mu + s_true * torch.randn(n, 3, generator=g)
        return (*posterior_samples(mu.expand(4, n, 3).clone(), s_pred.expand(4, n, 3).clone()), truth, snr)

    samples, centre, truth, snr = lenses(6000, 5)
    cal = Recalibration.fit(labels, samples, centre, truth, snr, "auto")
    assert cal.choice == ["none", "global", "conditional"]
    assert cal.factor[0] == 1.0 and not cal.coef[0].any() and 1.7 < cal.factor[1] < 2.3
    back = Recalibration.from_dict(json.loads(json.dumps(cal.to_dict())), labels)
    assert back.choice == cal.choice
    ts, tc, tt, tsnr = lenses(6000, 6)  # fresh lenses: every label honest on the whole curve
    torch.testing.assert_close(back.apply(ts, tc, tsnr), cal.apply(ts, tc, tsnr))
    curve = metrics.coverage_curve(cal.apply(ts, tc, tsnr), tt)
    assert np.abs(curve - metrics.CURVE[:, None]).max() < 0.03
    # left alone, label a keeps its samples exactly
    torch.testing.assert_close(cal.apply(ts, tc, tsnr)[..., 0], ts[..., 0])


def test_recalibration_round_trips_through_json_and_reads_old_files():
    labels = ["a", "b"]
    means, stds, truth, snr = _predictor(800, 3)
    samples, centre = posterior_samples(means, stds)
    cal = Recalibration.fit(labels, samples, centre, truth, snr)
    back = Recalibration.from_dict(json.loads(json.dumps(cal.to_dict())), labels)
    torch.testing.assert_close(back.apply(samples, centre, snr), cal.apply(samples, centre, snr))
    old = Recalibration.from_dict({"method": "spread_scale", "scale": {"a": 2.0, "b": 0.5}}, labels)
    torch.testing.assert_close(old.apply(samples, centre, snr), metrics.scaled(samples, centre, [2.0, 0.5]))
    with pytest.raises(ConfigError, match="not a lensexp calibration"):
        Recalibration.from_dict({"method": "conditional", "scale": {"a": 1.0}}, labels, "x.json")
    # features outside the calibration range are clipped, not extrapolated
    far = cal.scales(samples * 1e6, snr * 1e6)
    near = cal.scales(samples, snr)
    assert float(far.max()) <= float(near.max()) * 1e3 + 1e-9 and torch.isfinite(far).all()


def test_image_snr_grows_with_the_source_and_ignores_units_and_sky():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    r = ((xx - 31.5) ** 2 + (yy - 31.5) ** 2).sqrt()
    ring = torch.exp(-0.5 * ((r - 15) / 2.0) ** 2)
    noise = torch.randn(3, 1, 64, 64, generator=g)
    imgs = noise + torch.stack([0 * ring, 3 * ring, 10 * ring])[:, None]
    snr = image_snr(imgs)
    assert snr[0] < 15 and snr[0] < snr[1] < snr[2]
    # matched-filter S/N of the bright ring: sqrt(sum(signal^2)) / sigma, within 15 %
    expect = float((10 * ring).pow(2).sum().sqrt())
    assert abs(float(snr[2]) / expect - 1) < 0.15
    torch.testing.assert_close(image_snr(7.0 * imgs + 100.0), snr, rtol=1e-4, atol=1e-3)
