"""Bad configuration fails at once with one clear message naming the option."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException

from lensexp.config import load_data_preset
from lensexp.errors import ConfigError
from lensexp.sim.render import Simulator


def build(*overrides, preset="tiny"):
    return Simulator(load_data_preset(preset, list(overrides)))


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.psf.fwhm=[-0.1,0.2]", ["data.psf.fwhm", "outside its domain"]),
        ("data.psf.fwhm=[0.3,0.1]", ["data.psf.fwhm", "empty range"]),
        ("data.lens.theta_E=[2.0,1.0]", ["data.lens.theta_E", "empty range"]),
        ("data.lens.q=[0.0,1.0]", ["data.lens.q", "outside its domain"]),
        ("data.lens.q=[0.5,1.5]", ["data.lens.q", "outside its domain"]),
        ("data.source.kind=spiral", ["data.source.kind", "spiral"]),
        ("data.source.offset_in=volume", ["data.source.offset_in", "volume"]),
        (
            "data.source.cosmos.catalog=/nonexistent/cat.fits",
            ["COSMOS catalogue not found", "/nonexistent/cat.fits", "galsim_download_cosmos"],
        ),
        ("data.psf.kind=zernike", ["psf.kind", "zernike"]),
        ("data.psf.size=14", ["psf.size", "odd"]),
        ("data.psf.empirical.file=/nope.fits", ["empirical PSF file not found"]),
        ("data.instrument.exposure_time=[0,100]", ["exposure_time", "outside its domain"]),
        ("data.instrument.gain=-1", ["gain"]),
        ("data.instrument.hot_pixels.fraction=2", ["hot_pixels.fraction"]),
        ("data.instrument.masks.keep_arc_flux=1.5", ["keep_arc_flux"]),
        ("data.pixscale=0", ["data.pixscale"]),
        ("data.npix=4", ["data.npix"]),
        ("data.instrument.normalize=zscore", ["normalize", "zscore"]),
        ("data.lens.theta_E=oops", ["data.lens.theta_E", "range"]),
        # the structured schema (lensexp/sim/schema.py: DataSchema): types and key names
        ("data.npix=3.5", ["data.npix must be a whole number, got 3.5"]),
        ("data.lens.theta_E=[a,1]", ["data.lens.theta_E[0] must be a number, got 'a'"]),
        ("data.instrument.noise=maybe", ["data.instrument.noise must be true or false"]),
        ("data.bands=3", ["data.bands must be a list"]),
        ("+data.lens.thetaE=1.0", ["data.lens.thetaE is not a setting"]),
    ],
)
def test_bad_option_names_itself(override, words):
    overrides = [override]
    if "empirical" in override:
        overrides.append("data.psf.kind=empirical")
    with pytest.raises(ConfigError) as exc:
        build(*overrides)
    msg = str(exc.value)
    for w in words:
        assert w in msg, msg
    assert "\n" not in msg


def test_unknown_preset_and_unknown_key():
    with pytest.raises(ConfigError, match="unknown data preset 'jwst'"):
        load_data_preset("jwst")
    with pytest.raises(ConfigCompositionException, match="psf_fwhm"):
        load_data_preset("tiny", ["data.psf_fwhm=0.1"])


def test_impossible_min_mu():
    sim = build("data.source.min_mu=1e6", "data.source.kind=sersic")
    with pytest.raises(ConfigError, match="min_mu"):
        sim.sample(4, seed=0)


def test_negative_count():
    with pytest.raises(ConfigError, match=">= 0"):
        build("data.source.kind=sersic").sample(-1, seed=0)


def test_every_preset_builds_and_simulates(cosmos_catalog, emp_psf):
    for name in ("tiny", "hst", "euclid", "lsst"):
        cfg = load_data_preset(name)
        sim = Simulator(cfg)
        b = sim.sample(2, seed=0)
        assert b.images.shape == (2, len(cfg.bands), cfg.npix, cfg.npix)
        assert torch.isfinite(b.images).all() and torch.isfinite(b.labels).all()


@pytest.mark.parametrize("offset_in, inner", [("area", 0.25**2), ("radius", 0.25)])
def test_source_offset_is_uniform_in_area_or_in_radius(offset_in, inner):
    """``data.source.offset_in``: the share of sources within a quarter of the largest offset is
    its area share (1/16) or its radius share (1/4); offsets stay inside ``offset`` x theta_E."""
    sim = build(f"data.source.offset_in={offset_in}", "data.source.offset=[0.0,0.8]")
    p = sim.draw_params(20000, torch.Generator().manual_seed(3))
    r = torch.hypot(p["src_x"] - p["center_x"], p["src_y"] - p["center_y"]) / p["theta_E"]
    assert float(r.max()) <= 0.8 + 1e-9
    assert abs(float((r < 0.2).double().mean()) - inner) < 0.012
