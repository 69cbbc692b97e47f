"""The slacs preset against the real SLACS files it models: noise and lens-light flux levels,
the grid of experiment=slacs_cpu and the resampling that brings the 0.05" files onto it."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats

from lensexp.config import compose_config
from lensexp.paths import SHARED_DATA
from lensexp.sim.render import Simulator

SLACS = SHARED_DATA / "slacs_dev"


def test_slacs_cpu_grid_is_the_binned_slacs_grid():
    cfg = compose_config("train", ["experiment=slacs_cpu"])
    assert (cfg.data.name, cfg.data.npix, cfg.data.pixscale) == ("slacs", 64, 0.1)
    assert cfg.data.lens_light.enabled and len(cfg.data.bands) == 1
    assert compose_config("train", ["experiment=slacs"]).data.pixscale == 0.05


def test_simulated_noise_and_lens_flux_span_the_real_files():
    if not SLACS.is_dir():
        pytest.skip(f"SLACS development sample not found at {SLACS} (../shared/data is absent)")
    real_sigma, real_flux = [], []
    for d in sorted(p for p in SLACS.iterdir() if p.is_dir()):
        noise = fits.getdata(d / "noise.fits").astype(float)
        real_sigma.append(2 * np.median(noise[noise < 1e7]))  # 2x2 block sum of 0.05" pixels
        real_flux.append(fits.getdata(d / "image.fits").astype(float).sum())
    cfg = compose_config("train", ["experiment=slacs_cpu", "data.source.kind=sersic"]).data
    # 256 lenses: the quietest of 64 moved from 0.012 to 0.015 e-/s with the random stream alone
    b = Simulator(cfg).sample(256, seed=0, batch_size=64)
    img = b.images[:, 0].numpy()
    edge = np.concatenate([img[:, :6, :].reshape(256, -1), img[:, -6:, :].reshape(256, -1)], 1)
    sim_sigma = np.array([sigma_clipped_stats(e)[2] for e in edge])
    sim_flux = img.sum((1, 2))
    # the simulated range covers the real one (noise maps exceed the drizzled pixel scatter by ~30 %)
    assert sim_sigma.min() < 0.8 * min(real_sigma) and sim_sigma.max() > 0.6 * max(real_sigma)
    assert np.percentile(sim_flux, 10) < np.median(real_flux) < np.percentile(sim_flux, 90)
