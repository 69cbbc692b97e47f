"""Prediction on FITS: round trip, bad files, pixel-scale refusal, ICA lens-light removal."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from astropy.io import fits

from lensexp.config import compose_config, load_data_preset
from lensexp.ica import remove_lens_light
from lensexp.predict import Predictor, csv_columns, run
from lensexp.sim.render import Simulator
from lensexp.simulate import run as simulate
from tests.conftest import train_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny_checkpoint(tmp_path_factory.mktemp("run"))


def predict_cfg(ckpt, inp, out, *over):
    return compose_config(
        "predict",
        [
            f"ckpt={ckpt}",
            f"input={inp}",
            f"out={out}",
            "n_mc=4",
            "n_samples=256",
            "progress=false",
            "batch_size=16",
            *over,
        ],
    )


def read_rows(path):
    return list(csv.DictReader(open(path)))


def test_fits_round_trip_equals_direct_prediction(ckpt, tmp_path):
    simulate(
        compose_config(
            "simulate",
            [
                "data=tiny",
                "data.source.kind=sersic",
                "n=6",
                "seed=3",
                "format=fits",
                f"out={tmp_path / 'fits'}",
                "progress=false",
                "batch_size=64",
            ],
        )
    )
    run(predict_cfg(ckpt, tmp_path / "fits", tmp_path / "p.csv"))
    rows = read_rows(tmp_path / "p.csv")
    assert list(rows[0]) == csv_columns(["theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2", "mu_F"])
    assert [r["name"] for r in rows] == [f"lens_{i:06d}.fits" for i in range(6)]
    # the same images as arrays, straight from the simulator
    cfg = load_data_preset("tiny", ["data.source.kind=sersic"])
    images = Simulator(cfg).sample(6, seed=3, batch_size=64).images
    torch.manual_seed(0)
    pred = Predictor(str(ckpt), n_mc=4, n_samples=256, seed=0)
    res = pred.predict_arrays(images, torch.Generator().manual_seed(0))
    got = np.array([[float(r["theta_E"]), float(r["mu_F_hi95"])] for r in rows])
    want = np.stack([res["mean"][:, 0].numpy(), res["intervals"][0.955][1][:, 7].numpy()], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert read_rows(tmp_path / "p.errors.csv") == []


def test_bad_files_are_reported_not_fatal(ckpt, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    good = rng.normal(size=(64, 64)).astype(np.float32)
    fits.PrimaryHDU(good).writeto(d / "a_good.fits")
    (d / "b_garbage.fits").write_bytes(b"SIMPLE = nonsense")
    fits.PrimaryHDU(np.full((64, 64), np.nan, np.float32)).writeto(d / "c_nan.fits")
    fits.PrimaryHDU(np.zeros(10, np.float32)).writeto(d / "d_1d.fits")
    h = fits.PrimaryHDU(good)
    h.header["PIXSCALE"] = 0.05
    h.writeto(d / "e_scale.fits")
    fits.PrimaryHDU(rng.normal(size=(3, 64, 64)).astype(np.float32)).writeto(d / "f_3band.fits")
    big = fits.PrimaryHDU(rng.normal(size=(80, 90)).astype(np.float32))
    big.header["PIXSCALE"] = 0.1
    big.writeto(d / "g_bigger.fits")
    run(predict_cfg(ckpt, d, tmp_path / "p.csv"))
    # no pixel scale: refused (never the model's assumed); another scale: resampled to the model's grid
    assert [r["name"] for r in read_rows(tmp_path / "p.csv")] == ["e_scale.fits", "g_bigger.fits"]
    errs = {r["name"]: r["error"] for r in read_rows(tmp_path / "p.errors.csv")}
    assert set(errs) == {"a_good.fits", "b_garbage.fits", "c_nan.fits", "d_1d.fits", "f_3band.fits"}
    assert "no pixel scale" in errs["a_good.fits"] and "pixscale=" in errs["a_good.fits"]
    assert "unreadable FITS" in errs["b_garbage.fits"] or "no image" in errs["b_garbage.fits"]
    assert "no finite pixels" in errs["c_nan.fits"]
    # pixscale= states the scale of files without one, and is refused where it contradicts a header
    run(predict_cfg(ckpt, d, tmp_path / "q.csv", "pixscale=0.1"))
    assert [r["name"] for r in read_rows(tmp_path / "q.csv")] == ["a_good.fits", "g_bigger.fits"]
    errs = {r["name"]: r["error"] for r in read_rows(tmp_path / "q.errors.csv")}
    assert "3 band(s) but the model takes 1" in errs["f_3band.fits"]
    assert 'header says 0.05"/px but pixscale=0.1' in errs["e_scale.fits"]


def test_missing_input_and_checkpoint(ckpt, tmp_path):
    from lensexp.errors import ConfigError

    with pytest.raises(ConfigError, match="input not found"):
        run(predict_cfg(ckpt, tmp_path / "none", tmp_path / "p.csv"))
    with pytest.raises(ConfigError, match="checkpoint not found"):
        run(predict_cfg(tmp_path / "x.ckpt", tmp_path, tmp_path / "p.csv"))
    assert not (tmp_path / "p.csv").exists()


def _two_band(n=20, seed=0):
    cfg = load_data_preset(
        "hst", ["data.npix=96", "data.source.kind=sersic", "data.psf.kind=gaussian", "data.source.mag=[21,22.5]"]
    )
    sim = Simulator(cfg)
    p = sim.draw_params(n, torch.Generator().manual_seed(seed))
    src, _ = sim.render_source(p)
    img, _, _ = sim.observe(src, sim.render_lens_light(p), p, torch.Generator().manual_seed(seed + 1), False, True)
    return img.numpy(), sim.psf.convolve(src[:, None], p["psf_index"])[:, 0].numpy()


def test_ica_recovers_the_source():
    img, truth = _two_band()
    cors = np.array([np.corrcoef(remove_lens_light(img[i])[0].ravel(), truth[i].ravel())[0, 1] for i in range(20)])
    assert np.median(cors) >= 0.9 and (cors >= 0.9).mean() >= 0.8, np.round(cors, 3)
    # with the lens light still in, the red band correlates far worse with the source
    raw = np.array([np.corrcoef(img[i, 0].ravel(), truth[i].ravel())[0, 1] for i in range(20)])
    assert np.median(raw) < np.median(cors) - 0.2
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        remove_lens_light(img[0, :1])


def test_predict_with_ica_and_masks(ckpt, tmp_path):
    img, _ = _two_band(n=3)
    d = tmp_path / "cubes"
    d.mkdir()
    for i in range(3):
        h = fits.PrimaryHDU(img[i][:, 16:80, 16:80] * 1e3)  # any flux unit; 64 px cut-out
        h.header["PIXSCALE"] = 0.1  # declared on the model's grid for this test
        h.writeto(d / f"cube_{i}.fits")
    run(
        predict_cfg(
            ckpt,
            d,
            tmp_path / "p.csv",
            "ica=true",
            f"save_cleaned={tmp_path / 'clean'}",
            "masks.centre=true",
            "masks.cosmic_rays=true",
        )
    )
    assert len(read_rows(tmp_path / "p.csv")) == 3
    assert len(list((tmp_path / "clean").glob("*.fits"))) == 3
    assert len(list((tmp_path / "clean").glob("*_ica.png"))) == 3
