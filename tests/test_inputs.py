"""Real data products: lens folders (noise map, mask, PSF), resampling to the network's grid,
the noise model's precedence and its check against the empty sky."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from astropy.io import fits

from lensexp.config import compose_config
from lensexp.inputs import LensData, LensFiles, list_inputs, load, overlap_matrix, resample, to_grid
from lensexp.io import BadInput
from lensexp.paths import SHARED_DATA


def gaussian(n, sigma_px, cx=None, cy=None, flux=1.0):
    """Pixel-integrated-like Gaussian blob on an n x n grid (centre (n-1)/2 unless given)."""
    cx = (n - 1) / 2 if cx is None else cx
    cy = (n - 1) / 2 if cy is None else cy
    yy, xx = np.mgrid[:n, :n]
    g = np.exp(-0.5 * ((xx - cx) ** 2 + (yy - cy) ** 2) / sigma_px**2)
    return (flux * g / g.sum()).astype(np.float64)


def centroid(img):
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    return float((img * xx).sum() / img.sum()), float((img * yy).sum() / img.sum())


def lens_data(img, scale, noise=None, bad=None, name="l"):
    img = np.asarray(img, np.float32)[None]
    return LensData(name, img, scale, fits.Header(), noise, None, np.zeros(img.shape[1:], bool) if bad is None else bad)


def make_folder(root, name, n=96, scale=0.05, sigma=0.02):
    """A lens folder as real data releases ship it: image without scale keyword, noise map with
    unusable pixels (1e8), PSF, mask."""
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    img = 5 * np.exp(-np.hypot(xx, yy) / 6) + np.exp(-0.5 * ((np.hypot(xx, yy) - 20) / 2) ** 2)
    img = img + rng.normal(0, sigma, (n, n))
    noise = np.full((n, n), sigma, np.float32)
    noise[:5, :7] = 1e8  # another object
    mask = np.zeros((n, n), np.int16)
    mask[-4:, -4:] = 1
    fits.PrimaryHDU(img.astype(np.float32)).writeto(d / "image.fits")
    fits.PrimaryHDU(noise).writeto(d / "noise.fits")
    fits.PrimaryHDU(mask).writeto(d / "mask.fits")
    fits.PrimaryHDU(gaussian(15, 1.5).astype(np.float32)).writeto(d / "psf.fits")
    return d


def test_lens_folders_are_read_with_noise_map_mask_and_psf(tmp_path):
    make_folder(tmp_path / "set", "J1430+4105")
    make_folder(tmp_path / "set", "J0008-0004")
    lenses = list_inputs(tmp_path / "set")
    assert [x.name for x in lenses] == ["J0008-0004", "J1430+4105"]
    assert all(x.noise and x.psf and x.mask for x in lenses)
    with pytest.raises(BadInput, match="no pixel scale"):
        load(lenses[0])
    d = load(lenses[0], pixscale=0.05)
    assert d.pixscale == 0.05 and d.image.shape == (1, 96, 96) and abs(d.psf.sum() - 1) < 1e-12
    assert d.bad[:5, :7].all() and d.bad[-4:, -4:].all() and d.bad.sum() == 5 * 7 + 16
    assert np.isnan(d.noise[0, 0]) and d.noise[50, 50] == pytest.approx(0.02)
    # a single lens folder given directly
    assert [x.name for x in list_inputs(tmp_path / "set" / "J1430+4105")] == ["J1430+4105"]
    # auxiliary files of another shape are refused
    fits.PrimaryHDU(np.ones((10, 10), np.float32)).writeto(
        tmp_path / "set" / "J0008-0004" / "noise.fits", overwrite=True
    )
    with pytest.raises(BadInput, match="noise map noise.fits has shape"):
        load(list_inputs(tmp_path / "set")[0], pixscale=0.05)


def test_binning_conserves_flux_exactly_and_keeps_the_lens_centred():
    # integer ratio on aligned blocks: block sums
    img = gaussian(128, 4.0)[None] * 1000
    out = resample(img, 2.0, 64)
    np.testing.assert_allclose(out.sum(), img.sum(), rtol=1e-5)
    np.testing.assert_allclose(out[0, 10, 20], img[0, 20:22, 40:42].sum(), rtol=1e-12)
    assert centroid(out[0]) == pytest.approx((31.5, 31.5), abs=1e-6)
    # odd input (201 px, as the SLACS cut-outs) onto an even grid: area-weighted, still centred
    img = gaussian(201, 6.0)[None]
    out = resample(img, 2.0, 64)
    np.testing.assert_allclose(out.sum(), img.sum(), rtol=1e-5)
    assert centroid(out[0]) == pytest.approx((31.5, 31.5), abs=1e-6)
    # a non-integer ratio (0.04 -> 0.1 "/px)
    img = gaussian(192, 8.0)[None]
    out = resample(img, 2.5, 64)
    np.testing.assert_allclose(out.sum(), img.sum(), rtol=1e-5)
    assert centroid(out[0]) == pytest.approx((31.5, 31.5), abs=1e-6)
    # each output pixel is exactly ratio^2 input pixels
    np.testing.assert_allclose(overlap_matrix(201, 64, 2.0).sum(1), 2.0)


def test_finer_grid_by_galsim_interpolation_conserves_flux_and_centre():
    img = gaussian(64, 3.0)
    g = to_grid(lens_data(img, 0.1), 96, 0.05)
    np.testing.assert_allclose(g.image.sum(), img.sum(), rtol=2e-3)
    assert centroid(g.image[0]) == pytest.approx((47.5, 47.5), abs=0.02)


def test_masks_and_noise_follow_the_image():
    n = 64
    img = gaussian(n, 5.0) * 100
    bad = np.zeros((n, n), bool)
    bad[10, 10] = True
    noise = np.full((n, n), 2.0)
    g = to_grid(lens_data(img, 0.05, noise=noise, bad=bad), 32, 0.1)
    assert g.bad[(10 - 0) // 2, 10 // 2] and g.bad.sum() == 1  # the block holding the pixel
    assert g.image[0, 5, 5] == 0
    np.testing.assert_allclose(g.noise[~g.bad], 4.0)  # sum of 4 pixels of sigma 2: sqrt(4 * 4)
    # same scale, odd difference: an integer cut-out, its half-pixel offset reported in arcsec
    g = to_grid(lens_data(gaussian(65, 4.0), 0.1), 64)
    assert g.offset == pytest.approx((-0.05, -0.05))


def test_pixscale_never_moves_the_network_grid(tmp_path):
    from lensexp.predict import Predictor, prepare
    from tests.conftest import train_tiny_checkpoint

    ckpt = train_tiny_checkpoint(tmp_path / "run")
    d = make_folder(tmp_path / "set", "J1", n=128)
    cfg = compose_config("predict", [f"ckpt={ckpt}", f"input={tmp_path / 'set'}", "pixscale=0.05", "n_mc=2"])
    pred = Predictor(str(ckpt), n_mc=2, n_samples=16, calibration=None)
    assert (pred.npix, pred.pixscale) == (64, 0.1)
    img, off, _ = prepare(list_inputs(tmp_path / "set")[0], pred, cfg)
    raw = fits.getdata(d / "image.fits").astype(np.float64)
    want = raw.reshape(64, 2, 64, 2).sum((1, 3))  # 0.05 -> 0.1 "/px: 2x2 block sums
    ok = img[0] != 0
    np.testing.assert_allclose(img[0][ok], want[ok], rtol=1e-5)
    assert off == (0.0, 0.0)


def noise_cfg(*over):
    return compose_config("fit", ["input=x", *over])


@pytest.mark.parametrize("case", ["map", "header", "sky_no_skylev", "sky_nothing"])
def test_noise_precedence(case, caplog):
    from lensexp.fit.data import noise_model

    rng = np.random.default_rng(0)
    sigma = 0.05
    n = 96
    img = gaussian(n, 8.0) * 200 + rng.normal(0, sigma, (n, n))
    use = np.ones((n, n), bool)
    header = fits.Header()
    noise_map = None
    if case == "map":
        noise_map = np.full((n, n), sigma)
    if case == "header":  # complete keywords: sky 0.36 e-/s/px over 1000 s -> sigma 0.019 + read noise
        header.update(EXPTIME=1000.0, SKYLEV=0.36, RDNOISE=4.0, GAIN=2.5)
    if case == "sky_no_skylev":  # EXPTIME alone is incomplete: the sky is measured, never assumed zero
        header.update(EXPTIME=1000.0)
    with caplog.at_level(logging.WARNING, logger="lensexp.fit"):
        nm = noise_model(header, img, use, noise_map, noise_cfg())
    expected = {"map": "map", "header": "header", "sky_no_skylev": "sky", "sky_nothing": "sky"}[case]
    assert nm["noise_source"] == expected
    adopted = np.sqrt(np.median(np.broadcast_to(nm["bg_var"], (n, n))))
    if case == "header":
        assert adopted == pytest.approx(np.sqrt(0.36 / 1000 + (16 + 2.5**2 / 12) / 1000**2), rel=1e-6)
        assert nm["sky_ratio"] > 1.3 and "empty sky scatters" in caplog.text  # the data's noise is larger
    else:
        assert adopted == pytest.approx(sigma, rel=0.05) and nm["sky_ratio"] == pytest.approx(1, abs=0.05)
        assert "empty sky scatters" not in caplog.text
    assert nm["inv_t"] == (0.0 if case in ("map", "sky_nothing") else 1e-3)


def test_fit_reads_a_lens_folder_and_uses_its_noise_map(tmp_path):
    from lensexp.fit.data import Loader

    make_folder(tmp_path / "set", "J1")
    cfg = compose_config("fit", [f"input={tmp_path / 'set'}", "pixscale=0.05"])
    item = Loader(cfg, None)(list_inputs(tmp_path / "set")[0])
    assert item["noise_source"] == "map" and item["sky_ratio"] == pytest.approx(1, abs=0.1)
    assert not item["use"][:5, :7].any() and not item["use"][-4:, -4:].any()
    assert item["psf"].shape == (15, 15)


SLACS = SHARED_DATA / "slacs_dev"


@pytest.mark.slow
def test_slacs_files_load_with_their_noise_maps():
    if not SLACS.is_dir():
        pytest.skip(f"SLACS development sample not found at {SLACS} (../shared/data is absent)")
    lenses = list_inputs(SLACS)
    assert len(lenses) == 16 and all(isinstance(x, LensFiles) and x.noise and x.psf for x in lenses)
    for x in lenses:
        d = load(x, pixscale=0.05)
        flagged = fits.getdata(x.noise) >= 1e7  # the release's "ignore" value
        assert d.image.shape == (1, 201, 201) and (d.bad == flagged).all() and 0 < flagged.mean() < 0.25, x.name


TWO_BANDS = (
    "data.bands=[{name:r,source_scale:[1.0,1.0],lens_scale:[1.0,1.0]},"
    "{name:g,source_scale:[1.5,1.5],lens_scale:[0.3,0.3]}]"
)


def test_cnn_starts_with_a_two_band_checkpoint(tmp_path):
    """init=cnn gives a two-band network both bands (it used to build one channel) and fits one."""
    import csv

    from lensexp.fit import run as fit
    from lensexp.simulate import run as simulate
    from lensexp.train import run as train
    from tests.test_train import FAST

    train(compose_config("train", [*FAST, TWO_BANDS, "trainer.max_epochs=1"]), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    simulate(
        compose_config(
            "simulate",
            [
                "data=tiny",
                "data.source.kind=sersic",
                TWO_BANDS,
                "n=2",
                "seed=5",
                "format=fits",
                f"out={tmp_path / 'fits'}",
                "progress=false",
            ],
        )
    )
    out = tmp_path / "f.csv"
    res = fit(
        compose_config(
            "fit",
            [
                f"input={tmp_path / 'fits'}",
                f"out={out}",
                "init=cnn",
                f"ckpt={ckpt}",
                "band=0",
                "n_starts=2",
                "n_mc=2",
                "adam.steps=5",
                "lbfgs.iters=2",
                "lbfgs.polish=1",
                "lbfgs.irls_rounds=1",
                "progress=false",
            ],
        )
    )
    assert res["n"] == 2 and not res["errors"]
    assert [r["name"] for r in csv.DictReader(open(out))] == ["lens_000000.fits", "lens_000001.fits"]


@pytest.mark.slow
def test_fit_of_real_slacs_lenses_through_the_contract_command(tmp_path):
    """Two of the 16 development lenses through the real-data path (lens folders, noise maps,
    PSFs, pixscale=, lens light): theta_E within 10 % of Bolton et al. (2008)."""
    import csv

    if not SLACS.is_dir():
        pytest.skip(f"SLACS development sample not found at {SLACS} (../shared/data is absent)")
    from lensexp.fit import run as fit

    d = tmp_path / "two"
    d.mkdir()
    for name in ("J0330-0020", "J1250+0523"):
        (d / name).symlink_to(SLACS / name, target_is_directory=True)
    out = tmp_path / "fits.csv"
    fit(
        compose_config(
            "fit", [f"input={d}", f"out={out}", "pixscale=0.05", "lens_light=true", "npix=121", "progress=false"]
        )
    )
    pub = {r["name"]: float(r["theta_E"]) for r in csv.DictReader(open(SLACS / "published.csv"))}
    for r in csv.DictReader(open(out)):
        assert r["noise_source"] == "map"
        assert abs(float(r["theta_E"]) / pub[r["name"]] - 1) < 0.10, (r["name"], r["theta_E"])
