"""Calibration: recalibration on synthetic predictors, the report from a trained run, bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from lensexp import metrics
from lensexp.calibrate import run
from lensexp.checkpoints import load_module
from lensexp.metrics import coverage_curve, fit_scales, posterior_samples, scaled
from lensexp.config import compose_config
from lensexp.errors import ConfigError
from tests.conftest import train_tiny_checkpoint


def _synthetic(scale_sigma, n=3000, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(n, d, generator=g)
    s = 0.5 + torch.rand(n, d, generator=g)
    truth = mu + s * torch.randn(n, d, generator=g)
    passes = 4
    return truth, mu.expand(passes, n, d).clone(), (scale_sigma * s).expand(passes, n, d).clone()


@pytest.mark.parametrize("mis", [0.4, 2.5])
def test_recalibration_fixes_a_misscaled_predictor(mis):
    truth, means, stds = _synthetic(mis, seed=1)
    samples, centre = posterior_samples(means, stds)
    before = coverage_curve(samples, truth)
    scale = fit_scales(samples, centre, truth)
    np.testing.assert_allclose(scale, 1 / mis, rtol=0.1)
    # applied to fresh data from the same predictor, coverage returns to nominal
    truth2, means2, stds2 = _synthetic(mis, seed=2)
    s2, c2 = posterior_samples(means2, stds2)
    cov = metrics.coverage(truth2, metrics.central_intervals(scaled(s2, c2, scale)))
    for c in metrics.LEVELS:
        assert np.all(np.abs(cov[c].numpy() - c) < 4 * metrics.binomial_sigma(c, 3000) + 0.005)
    i68 = int(np.argmin(np.abs(np.round(np.linspace(0.01, 0.99, 99), 2) - 0.68)))
    assert (before[i68] < 0.6).all() if mis < 1 else (before[i68] > 0.8).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("run"))


def test_report_from_a_trained_run(trained, tmp_path):
    cfg = compose_config(
        "calibrate",
        [
            f"ckpt={trained}",
            f"out={tmp_path}",
            "on_the_fly=true",
            "data.source.kind=sersic",
            "max_lenses=48",
            "n_mc=4",
            "batch_size=16",
            "progress=false",
        ],
    )
    m = run(cfg)
    cov = json.loads((tmp_path / "coverage.json").read_text())
    assert set(cov) == {"theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2", "mu_F"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    # coverage.json is the recalibrated coverage, in 1/48 steps (a fraction of the 48 lenses)
    for name, v in cov.items():
        assert v == saved["per_label"][name]["coverage_after"]
        assert all(abs(x * 48 - round(x * 48)) < 1e-4 for x in v.values())
    assert m["recalibrated"] and m["n_lenses"] == 48 and m["method"] == "auto"
    assert saved["per_label"]["theta_E"]["rmse"] > 0
    # coverage per image S/N bin, before and after: the bins partition the lenses
    for key in ("before", "after"):
        snr = saved["groups"][key]["snr"]
        assert snr and sum(g["n"] for g in snr.values()) <= 48
        assert all(len(g["coverage"]["0.683"]) == 8 for g in snr.values())
    html = (tmp_path / "report.html").read_text()
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["coverage_by_snr.png", "coverage_curve.png", "mu_F_uncertainty.png", "true_vs_pred.png"]
    for p in pngs:
        assert f'href="{p}"' in html and (tmp_path / p).stat().st_size > 5000
    assert len(re.findall(r"data:image/png;base64,", html)) == 4  # self-contained
    assert "per image S/N and source kind" in html and re.search(r"<td>S/N (\d|&gt;)", html)
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # logged to W&B offline
    cal = json.loads((trained.parent / "calibration.json").read_text())
    # the default (auto) picks, per label, none / one scale / the conditional model
    assert cal["method"] == "auto" and set(cal["coef"]) == set(cov) and set(cal["choice"]) == set(cov)
    assert set(cal["choice"].values()) <= {"none", "global", "conditional"}
    assert set(cal["scale"]) == set(cov) and all(v > 0 for v in cal["scale"].values())


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_module(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="weights-only"):
        load_module(bad)
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="not a lensexp training checkpoint"):
        load_module(tmp_path / "other.ckpt")


def test_choose_dropout_by_calibration(tmp_path):
    from omegaconf import OmegaConf

    from lensexp.calibrate import choose_dropout

    for rate, err in ((0.02, 0.12), (0.1, 0.03), (0.3, 0.08)):
        d = tmp_path / f"run_{rate}"
        (d / ".hydra").mkdir(parents=True)
        (d / "csv").mkdir()
        OmegaConf.save(OmegaConf.create({"model": {"dropout": rate}}), d / ".hydra" / "config.yaml")
        (d / "csv" / "metrics.csv").write_text(
            "epoch,val/coverage_error,val/cov68/theta_E,val/rmse/theta_E\n0,0.5,0.9,0.3\n1," + f"{err},0.7,0.1\n"
        )
    choice = choose_dropout(tmp_path, tmp_path / "out")
    assert choice["dropout"] == 0.1 and [r["dropout"] for r in choice["table"]] == [0.1, 0.3, 0.02]
    assert (tmp_path / "out" / "dropout_choice.json").is_file()
    with pytest.raises(ConfigError, match="no training runs"):
        choose_dropout(tmp_path / "out")
