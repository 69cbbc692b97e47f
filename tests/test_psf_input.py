"""A network told each image's PSF (``model.psf_input``): the PSF's description (encircled energy
at fixed radii), the samples that carry it, training, checkpoints and prediction."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from astropy.io import fits

from lensexp.errors import ConfigError
from lensexp.models import LensRegressor, psf_condition
from lensexp.sim.psf import EE_KEYS, EE_RADII, draw_kernel, encircled_energy


def test_encircled_energy_of_a_gaussian_is_the_analytic_curve():
    """A finely sampled circular Gaussian: EE(r) = 1 - exp(-r^2 / 2 sigma^2) (independent of the
    code), for one kernel ([R]) and a bank ([K, R])."""
    pix, n = 0.004, 201
    c = (np.arange(n) - (n - 1) / 2) * pix
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    radii = (0.05, 0.1, 0.2, 0.3)
    for sigma in (0.05, 0.08):
        k = np.exp(-r2 / (2 * sigma**2))
        want = 1 - np.exp(-np.square(radii) / (2 * sigma**2))
        np.testing.assert_allclose(encircled_energy(k, pix, radii).numpy(), want, atol=2e-3)
    bank = np.stack([np.exp(-r2 / (2 * s**2)) for s in (0.05, 0.08)])
    assert encircled_energy(bank, pix, radii).shape == (2, 4)
    with pytest.raises(ConfigError, match="odd square"):
        encircled_energy(np.ones((4, 4)), 0.1)


def test_wider_wings_hold_less_light_at_small_radii():
    """At one FWHM a Moffat beta=2 kernel keeps less light within the FWHM than a Gaussian (the
    wings the network should be told about): analytically 0.29 against 0.5 before pixelisation."""
    g = encircled_energy(draw_kernel("gaussian", 0.2, 0.02, 61), 0.02, (0.1,))
    m = encircled_energy(draw_kernel("moffat", 0.2, 0.02, 61, 2.0), 0.02, (0.1,))
    assert 0.45 < float(g) < 0.52 and 0.25 < float(m) < 0.34


def test_a_psf_at_another_scale_is_described_on_the_network_grid():
    """An HST PSF at 0.05"/px binned as the image is (lensexp.inputs.psf_to_scale): unit sum,
    odd, centred, and its description close to the kernel drawn at 0.1"/px (the binning of an
    odd grid by 2 splits edge pixels, which widens narrow PSFs a little: within 0.025)."""
    from lensexp.inputs import psf_to_scale

    for kind, fwhm in (("gaussian", 0.2), ("moffat", 0.25), ("airy", 0.28)):
        fine = draw_kernel(kind, fwhm, 0.05, 25, 2.5)
        coarse = psf_to_scale(fine, 0.05, 0.1)
        assert coarse.shape == (13, 13) and abs(coarse.sum() - 1) < 1e-12
        c = np.arange(13) - 6
        assert abs((coarse.sum(0) * c).sum()) < 1e-9 and abs((coarse.sum(1) * c).sum()) < 1e-9
        direct = encircled_energy(draw_kernel(kind, fwhm, 0.1, 13, 2.5), 0.1)
        assert float((encircled_energy(coarse, 0.1) - direct).abs().max()) < 0.025
    assert psf_to_scale(fine, 0.1, 0.1) is fine


def test_samples_carry_their_kernels_description():
    """Each simulated sample's meta holds the encircled energy of the kernel it was convolved
    with; batches stack it as ``psf_ee`` [B, R]."""
    from lensexp.config import compose_config
    from lensexp.data import OnTheFlyDataset, _collate
    from lensexp.sim.render import Simulator

    cfg = compose_config("simulate", ["data=tiny", "data.source.kind=sersic"]).data
    sim = Simulator(cfg)
    np.testing.assert_allclose(
        sim.psf.ee.numpy(), encircled_energy(sim.psf.kernels, float(cfg.pixscale)).numpy(), rtol=1e-6
    )
    samples = list(OnTheFlyDataset(cfg, seed=2, shard_size=8, batch_size=8, epoch_size=8))
    batch = _collate(samples)
    assert batch["psf_ee"].shape == (8, len(EE_RADII))
    for s, row in zip(samples, batch["psf_ee"]):
        want = sim.psf.ee[int(s["meta"]["psf_index"])]
        torch.testing.assert_close(row, want)
        assert [s["meta"][k] for k in EE_KEYS] == pytest.approx(want.tolist())


def test_psf_condition_marks_known_and_unknown_rows():
    ee = torch.tensor([[0.1, 0.3, 0.7, 0.9, 1.0], [float("nan")] * 5])
    cond = psf_condition(ee, 2)
    torch.testing.assert_close(cond[0], torch.tensor([1.0, 0.1, 0.3, 0.7, 0.9, 1.0]))
    assert not cond[1].any()
    assert not psf_condition(None, 3).any() and psf_condition(None, 3).shape == (3, 1 + len(EE_RADII))
    with pytest.raises(ConfigError, match="PSF description"):
        psf_condition(torch.zeros(2, 3), 2)


@pytest.mark.parametrize("mode", [True, "head", "channels", "film"])
def test_the_regressor_reads_the_psf_beside_the_image(mode):
    """In the head (beside the pooled features) or as constant input planes (beside the image);
    'unknown' (None) equals the all-zero condition."""
    torch.manual_seed(0)
    net = LensRegressor("test_resnet", 1, 16, dropout=0.0, psf_input=mode).eval()
    plain = LensRegressor("test_resnet", 1, 16, dropout=0.0)
    extra = 1 + len(EE_RADII)
    if mode in ("channels", "film"):
        assert net.head[0].in_features == plain.head[0].in_features
        assert net.backbone.conv1[0].in_channels == (1 + extra if mode == "channels" else 1)
    else:
        assert net.head[0].in_features == plain.head[0].in_features + extra
    x = torch.randn(2, 1, 64, 64)
    a = psf_condition(torch.tensor([[0.1, 0.4, 0.9, 1.0, 1.0]] * 2), 2)
    b = psf_condition(torch.tensor([[0.05, 0.2, 0.6, 0.8, 0.95]] * 2), 2)
    if mode == "film":  # starts as the identity: the plain network's numbers, whatever the PSF
        with torch.no_grad():
            torch.testing.assert_close(net(x, a), net(x, b))
            torch.nn.init.normal_(net.psf_film.weight)
    with torch.no_grad():
        assert not torch.allclose(net(x, a), net(x, b))
        torch.testing.assert_close(net(x), net(x, psf_condition(None, 2)))
    for bad in ("kernel", [1.0], 1):
        with pytest.raises(ConfigError, match="psf_input must be one of"):
            LensRegressor("test_resnet", 1, 16, psf_input=bad)


PSF_RUN = ["model.psf_input=true", "psf_dropout=0.5"]


@pytest.fixture(scope="module")
def psf_ckpt(tmp_path_factory):
    from lensexp.config import compose_config
    from lensexp.train import run
    from tests.test_train import FAST

    run_dir = tmp_path_factory.mktemp("psf_run")
    run(compose_config("train", [*FAST, "trainer.max_epochs=1", *PSF_RUN]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def test_a_psf_network_trains_reloads_and_keeps_its_settings(psf_ckpt):
    from lensexp.checkpoints import load_module

    m = load_module(psf_ckpt).eval()
    assert m.psf_input and m.hparams.psf_dropout == 0.5
    x = torch.randn(3, 1, 64, 64).abs()
    ee = torch.tensor([[0.15, 0.4, 0.85, 0.97, 1.0]] * 3)
    with torch.no_grad():
        known, unknown = m.point_estimate(x, "d4", ee), m.point_estimate(x, "d4")
    assert not torch.allclose(known, unknown)
    # training without the description is refused; withheld rows are NaN in training only
    with pytest.raises(ConfigError, match="psf_input needs samples"):
        m.batch_loss({"image": x, "labels": torch.zeros(3, len(m.labels))}, train=True)
    m.hparams.psf_dropout = 1.0
    assert torch.isnan(m.batch_psf({"psf_ee": ee}, train=True)).all()
    torch.testing.assert_close(m.batch_psf({"psf_ee": ee}, train=False), ee)


def test_a_bad_psf_dropout_is_refused():
    from lensexp.config import compose_config
    from lensexp.train import build_module
    from tests.test_train import FAST

    with pytest.raises(ConfigError, match="psf_dropout"):
        build_module(compose_config("train", [*FAST, "psf_dropout=1.5"]))


def test_predict_tells_the_network_each_lens_psf(psf_ckpt, tmp_path, caplog):
    """Lens folders with a psf.fits give the network their PSF; one without is predicted with
    'unknown PSF' and a warning; the PSF changes the answer."""
    from lensexp.config import compose_config
    from lensexp.predict import Predictor, run
    from tests.test_inputs import make_folder

    make_folder(tmp_path / "set", "J1")
    (make_folder(tmp_path / "set", "J2") / "psf.fits").unlink()
    out = tmp_path / "preds.csv"
    cfg = compose_config("predict", [f"ckpt={psf_ckpt}", f"input={tmp_path / 'set'}", f"out={out}", "pixscale=0.05"])
    cfg.n_mc, cfg.n_samples = 2, 64
    with caplog.at_level(logging.WARNING, logger="lensexp.predict"):
        assert run(cfg)["n"] == 2
    assert "1 lens(es) without a PSF" in caplog.text
    pred = Predictor(str(psf_ckpt), n_mc=1, n_samples=64, calibration=None)
    psf = fits.getdata(tmp_path / "set" / "J1" / "psf.fits").astype(np.float64)
    ee = pred.psf_description(psf / psf.sum(), 0.05)
    np.testing.assert_allclose(ee, encircled_energy(_binned(psf / psf.sum()), 0.1).numpy(), rtol=1e-5)
    assert np.isnan(pred.psf_description(None, 0.05)).all()
    x = torch.randn(1, 1, 64, 64).abs()
    told = pred.predict_arrays(x, torch.Generator().manual_seed(0), torch.from_numpy(ee)[None])["mean"]
    blind = pred.predict_arrays(x, torch.Generator().manual_seed(0))["mean"]
    assert not torch.allclose(told, blind)


def _binned(psf: np.ndarray) -> np.ndarray:
    """A 15-px 0.05"/px kernel on a 0.1"/px grid by hand: centred 2x bins of an odd grid split
    the edge pixels in halves (weights 1/2, 1, 1/2 per axis around each output centre)."""
    n = psf.shape[0]
    m = int(np.ceil(n / 2)) | 1
    w = np.zeros((m, n))
    for j in range(m):
        centre = (n - 1) / 2 + 2 * (j - (m - 1) / 2)
        for i in range(n):
            w[j, i] = max(0.0, min(centre + 1, i + 0.5) - max(centre - 1, i - 0.5))
    out = w @ psf @ w.T
    return out / out.sum()
