"""Adaptive supersampling (lensexp/sim/adaptive.py) against the full supersampled render."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from lensexp.config import load_data_preset
from lensexp.errors import ConfigError
from lensexp.sim import adaptive
from lensexp.sim.render import Simulator
from lensexp.sim.trace import pixel_grid


def pair(cfg, **adapt):
    """The same preset rendered fully and adaptively."""
    full = Simulator(OmegaConf.merge(cfg, {"adaptive": {"enabled": False}}))
    ad = Simulator(OmegaConf.merge(cfg, {"adaptive": {"enabled": True, **adapt}}))
    return full, ad


def test_noise_floor_is_the_quietest_empty_pixel():
    """hst: 2000 s, sky 22 mag/arcsec^2 at 0.04"/px, read noise 4 e-, gain 2.5 - by hand."""
    cfg = load_data_preset("hst")
    sky = 10 ** (-0.4 * (22.0 - 25.9)) * 0.04**2  # e-/s per pixel
    t = 2000.0
    want = math.sqrt(sky / t + (4.0**2 + 2.5**2 / 12) / t**2)
    assert adaptive.noise_floor(cfg.instrument, 0.04) == pytest.approx(want, rel=1e-9)
    # the quietest of a range: the longest exposure, darkest sky, lowest read noise
    wide = OmegaConf.merge(
        cfg.instrument, {"exposure_time": [500.0, 2000.0], "sky_mag": [21.0, 22.0], "read_noise": [4.0, 8.0]}
    )
    assert adaptive.noise_floor(wide, 0.04) == pytest.approx(want, rel=1e-9)


def test_error_estimate_matches_the_supersampled_mean_of_a_smooth_profile():
    """For a Gaussian several pixels wide, (1 - 1/s^2)/24 times the 5-point Laplacian of the
    centre samples predicts the s x s sub-pixel mean minus the centre value (derived by Taylor
    expansion; checked on the exact sub-pixel mean)."""
    N, s, sig = 33, 2, 3.0
    x, y = pixel_grid(N, 1.0, 1, torch.float64)
    xs, ys = pixel_grid(N, 1.0, s, torch.float64)
    f = lambda a, b: torch.exp(-(a * a + b * b) / (2 * sig * sig))  # noqa: E731
    centre = f(x, y)
    mean = f(xs, ys).reshape(N, s, N, s).mean((1, 3))
    a = torch.nn.functional.pad(centre[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * centre
    est = (1 - 1 / s**2) / 24 * lap
    inner = slice(8, 25)
    err = (mean - centre)[inner, inner]
    assert err.abs().max() > 1e-3  # not trivially small
    torch.testing.assert_close(est[inner, inner], err, atol=0.05 * float(err.abs().max()), rtol=0)
    # the mask flags exactly where the estimate exceeds the threshold
    thr = 0.5 * float(est.abs().max())
    mask = adaptive.sampling_error_mask(centre[None].float(), s, thr)[0]
    assert torch.equal(mask, (est.abs() > thr))


def test_grow_adds_the_eight_neighbours_and_stops_at_the_edges():
    m = torch.zeros(2, 6, 6, dtype=torch.bool)
    m[0, 2, 3] = True
    m[1, 0, 0] = True
    g = adaptive.grow(m)
    want0 = torch.zeros(6, 6, dtype=torch.bool)
    want0[1:4, 2:5] = True
    want1 = torch.zeros(6, 6, dtype=torch.bool)
    want1[0:2, 0:2] = True
    assert torch.equal(g[0], want0) and torch.equal(g[1], want1)


def test_subpixel_points_are_the_full_grids_rays():
    N, p, s = 7, 0.05, 3
    xs, ys = pixel_grid(N, p, s, torch.float64)
    idx = torch.tensor([0, 10, 2 * N * N + 4 * N + 6])  # image 0 pixel (0,0) and (1,3); image 2 pixel (4,6)
    b, x, y = adaptive.subpixel_points(idx, N, p, s, torch.float64)
    assert b.tolist() == [0, 0, 2]
    for m, (row, col) in enumerate([(0, 0), (1, 3), (4, 6)]):
        want_x = xs[row * s : (row + 1) * s, col * s : (col + 1) * s].reshape(-1)
        want_y = ys[row * s : (row + 1) * s, col * s : (col + 1) * s].reshape(-1)
        torch.testing.assert_close(x[m], want_x, atol=1e-12, rtol=0)
        torch.testing.assert_close(y[m], want_y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["sersic", "cosmos"])
def test_adaptive_render_is_the_full_render_within_a_tenth_of_the_noise(kind, cosmos_catalog):
    """hst at 96 px (lens light, clumps or COSMOS sources): the refined pixels are the full
    render's, the others the one-ray render's, and no pixel differs from the full render by a
    tenth of the quietest sky noise (rms < 0.005); mu_F within 0.1 %."""
    cfg = OmegaConf.merge(load_data_preset("hst"), {"npix": 96, "source": {"kind": kind}})
    if kind == "cosmos":
        cfg.source.cosmos.catalog = str(cosmos_catalog)
    full, ad = pair(cfg)
    coarse = Simulator(OmegaConf.merge(cfg, {"supersample": 1, "adaptive": {"enabled": False}}))
    sigma = adaptive.noise_floor(cfg.instrument, cfg.pixscale)
    p = full.draw_params(24, torch.Generator().manual_seed(3))
    src_f, mu_f = full.render_source(p)
    src_a, mu_a = ad.render_source(p)
    ll_f, ll_a = full.render_lens_light(p), ad.render_lens_light(p)
    # thresholds: tolerance 0.01 of the noise floor, over the brightest band scale (F475W source 1.5, lens 1)
    for f, a, c, top in (
        (src_f, src_a, coarse.render_source(p)[0], 1.5),
        (ll_f, ll_a, coarse.render_lens_light(p), 1.0),
    ):
        d = (f - a).abs() / sigma
        assert float(d.max()) < 0.1, float(d.max())
        assert float(d.pow(2).mean().sqrt()) < 0.005
        idx = adaptive.refine_pixels(c, 2, 0.01 * sigma / top)
        assert 0 < idx.numel() < 0.5 * c.numel()  # refined where needed, far from everywhere
        # the full render's rays, up to float32 rounding of their positions (< 0.001 sigma)
        torch.testing.assert_close(a.reshape(-1)[idx], f.reshape(-1)[idx], rtol=1e-4, atol=1e-3 * sigma)
        rest = torch.ones(c.numel(), dtype=torch.bool)
        rest[idx] = False
        torch.testing.assert_close(a.reshape(-1)[rest], c.reshape(-1)[rest], rtol=0, atol=0)  # one ray per pixel there
    torch.testing.assert_close(mu_a, mu_f, rtol=1e-3, atol=0)
    # whole batches through the detector: the same random stream, so the images differ by the
    # render's difference (x 1.5 in F475W) or, where it tips a rounding, one ADU
    a = ad.sample(6, seed=1, batch_size=3)
    f = full.sample(6, seed=1, batch_size=3)
    adu = cfg.instrument.gain / max(cfg.instrument.exposure_time)
    assert a.images.shape == f.images.shape
    assert float((a.images - f.images).abs().max()) < 0.15 * sigma + adu * 1.001


def test_adaptive_render_with_further_mass_components():
    """The kappa families' extra deflection is traced at the refined rays too."""
    cfg = OmegaConf.merge(load_data_preset("kappa"), {"source": {"kind": "sersic"}, "mass": {"kind": "sie_pair"}})
    full, ad = pair(cfg)
    sigma = adaptive.noise_floor(cfg.instrument, cfg.pixscale)
    p = full.draw_params(8, torch.Generator().manual_seed(0))
    d = (full.render_source(p)[0] - ad.render_source(p)[0]).abs() / sigma
    assert float(d.max()) < 0.1


def test_adaptive_render_of_sources_without_clumps():
    """Sources drawn with no clumps (clump tensors [B, 0], e.g. the matched benchmark settings)
    are refined like any other: found by benchmarks/sim_speed.py at 192 px, which crashed."""
    cfg = OmegaConf.merge(load_data_preset("hst"), {"npix": 64, "source": {"kind": "sersic", "clumps": {"n": [0, 0]}}})
    full, ad = pair(cfg)
    sigma = adaptive.noise_floor(cfg.instrument, cfg.pixscale)
    p = full.draw_params(6, torch.Generator().manual_seed(2))
    d = (full.render_source(p)[0] - ad.render_source(p)[0]).abs() / sigma
    assert float(d.max()) < 0.1


def test_adaptive_tolerance_is_checked():
    cfg = OmegaConf.merge(load_data_preset("hst"), {"adaptive": {"enabled": True, "tolerance": 0.0}})
    with pytest.raises(ConfigError, match="data.adaptive.tolerance"):
        Simulator(cfg)
