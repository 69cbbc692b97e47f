"""Rendering against lenstronomy: grid convention, lensed Sérsic image, mu_F, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensexp.config import load_data_preset
from lensexp.sim.psf import draw_kernel
from lensexp.sim.render import Simulator
from lensexp.sim.trace import pixel_grid, render_sersic
from lensexp.sim.source import sersic_total_flux

pytest.importorskip("lenstronomy")
from lenstronomy.Data.imaging_data import ImageData  # noqa: E402
from lenstronomy.Data.psf import PSF  # noqa: E402
from lenstronomy.ImSim.image_model import ImageModel  # noqa: E402
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402
from lenstronomy.LightModel.light_model import LightModel  # noqa: E402
from lenstronomy.Util import simulation_util  # noqa: E402

LENS = dict(theta_E=1.1, e1=0.12, e2=-0.07, center_x=0.05, center_y=-0.08, gamma1=0.04, gamma2=0.02)
SRC = dict(amp=30.0, R_sersic=0.25, n_sersic=1.8, e1=0.1, e2=0.15, center_x=0.08, center_y=0.02)


def lenstronomy_image(npix, pix, ss, kernel=None, lens=LENS, src=SRC):
    kw = simulation_util.data_configure_simple(npix, pix, exposure_time=1.0, background_rms=1.0, inverse=False)
    psf = PSF(psf_type="PIXEL", kernel_point_source=kernel) if kernel is not None else PSF(psf_type="NONE")
    model = ImageModel(
        ImageData(**kw),
        psf,
        lens_model_class=LensModel(["SIE", "SHEAR"]),
        source_model_class=LightModel(["SERSIC_ELLIPSE"]),
        kwargs_numerics={"supersampling_factor": ss, "supersampling_convolution": False},
    )
    kl = [
        {k: lens[k] for k in ("theta_E", "e1", "e2", "center_x", "center_y")},
        dict(gamma1=lens["gamma1"], gamma2=lens["gamma2"], ra_0=0.0, dec_0=0.0),
    ]
    return model.image(kwargs_lens=kl, kwargs_source=[src])


def test_pixel_grid_is_lenstronomy_grid():
    kw = simulation_util.data_configure_simple(7, 0.1, exposure_time=1.0, background_rms=1.0, inverse=False)
    data = ImageData(**kw)
    xg, yg = data.pixel_coordinates
    x, y = pixel_grid(7, 0.1, 1)
    np.testing.assert_allclose(x.numpy(), xg, atol=1e-12)
    np.testing.assert_allclose(y.numpy(), yg, atol=1e-12)
    # conventions: x = (col - (N-1)/2) p, y = (row - (N-1)/2) p
    assert float(x[2, 5]) == pytest.approx((5 - 3) * 0.1)
    assert float(y[2, 5]) == pytest.approx((2 - 3) * 0.1)


@pytest.mark.parametrize("npix, pix, fwhm", [(64, 0.1, 0.15), (96, 0.04, 0.1)])
def test_lensed_sersic_matches_lenstronomy(npix, pix, fwhm):
    kernel = draw_kernel("gaussian", fwhm, pix, 15)
    ref = lenstronomy_image(npix, pix, 2, kernel)
    got = render_sersic(LENS, SRC, npix, pix, supersample=2, psf_kernel=torch.from_numpy(kernel))[0].numpy()
    assert np.abs(got - ref).max() < 0.01 * ref.max()
    assert got.sum() == pytest.approx(ref.sum(), rel=1e-3)


def test_supersampled_without_psf_matches_lenstronomy_closely():
    ref = lenstronomy_image(48, 0.1, 3, None)
    got = render_sersic(LENS, SRC, 48, 0.1, supersample=3)[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9 * ref.max())


def test_sersic_total_flux_formula():
    # flux of the unlensed profile integrated on a fine grid equals the closed form
    amp, R, n = (
        torch.tensor(2.0, dtype=torch.float64),
        torch.tensor(0.3, dtype=torch.float64),
        torch.tensor(1.5, dtype=torch.float64),
    )
    lens0 = dict(theta_E=1e-9, e1=0.0, e2=0.0, center_x=0.0, center_y=0.0, gamma1=0.0, gamma2=0.0)
    src = dict(amp=amp, R_sersic=R, n_sersic=n, e1=0.2, e2=0.0, center_x=0.0, center_y=0.0)
    img = render_sersic(lens0, src, 400, 0.02, supersample=3)
    assert float(img.sum()) == pytest.approx(float(sersic_total_flux(amp, R, n)), rel=2e-3)


def _sim(name="tiny", **over):
    ov = [f"data.{k}={v}" for k, v in over.items()]
    return Simulator(load_data_preset(name, ov))


def test_mu_F_matches_independent_high_resolution_lenstronomy():
    """mu_F labels (supersampling 2) against lenstronomy at supersampling 10 without PSF."""
    sim = _sim(**{"source.kind": "sersic", "source.clumps.n": "[0,0]"})
    rng = torch.Generator().manual_seed(5)
    p = sim.draw_params(12, rng)
    _, mu = sim.render_source(p)
    for i in range(12):
        lens = {k: float(p[k][i]) for k in LENS}
        amp = float(
            p["sersic_flux"][i]
            / sersic_total_flux(torch.tensor(1.0, dtype=torch.float64), p["src_R"][i].double(), p["src_n"][i].double())
        )
        src = dict(
            amp=amp,
            R_sersic=float(p["src_R"][i]),
            n_sersic=float(p["src_n"][i]),
            e1=float(p["src_e1"][i]),
            e2=float(p["src_e2"][i]),
            center_x=float(p["src_x"][i]),
            center_y=float(p["src_y"][i]),
        )
        hi = lenstronomy_image(64, 0.1, 10, None, lens, src).sum() / float(p["src_flux"][i])
        assert float(mu[i]) == pytest.approx(hi, rel=0.02), i


def test_mu_F_converges_with_supersampling_for_real_galaxies(cosmos_catalog):
    lo, hi = _sim(**{"source.kind": "cosmos"}), _sim(**{"source.kind": "cosmos", "supersample": 8})
    p = lo.draw_params(8, torch.Generator().manual_seed(2))
    _, mu_lo = lo.render_source(p)
    _, mu_hi = hi.render_source(p)
    np.testing.assert_allclose(mu_lo.numpy(), mu_hi.numpy(), rtol=0.03)
    assert (mu_hi > 1).all()


def test_unlensed_real_galaxy_keeps_its_flux(cosmos_catalog):
    sim = _sim(**{"source.kind": "cosmos", "supersample": 4})
    p = sim.draw_params(6, torch.Generator().manual_seed(0))
    p["theta_E"][:] = 1e-8
    p["gamma1"][:] = 0.0
    p["gamma2"][:] = 0.0
    p["src_x"][:] = 0.0
    p["src_y"][:] = 0.0
    _, mu = sim.render_source(p)
    np.testing.assert_allclose(mu.numpy(), 1.0, atol=0.02)


@pytest.mark.parametrize("kind", ["sersic", "mix"])
def test_sample_shapes_labels_and_determinism(kind, request):
    if kind == "mix":
        request.getfixturevalue("cosmos_catalog")  # real galaxies: skipped without ../shared/data
    sim = Simulator(load_data_preset("tiny", [f"data.source.kind={kind}"]))
    a = sim.sample(20, seed=11, batch_size=8)
    b = sim.sample(20, seed=11, batch_size=8)
    c = sim.sample(20, seed=12, batch_size=8)
    assert a.images.shape == (20, 1, 64, 64) and a.images.dtype == torch.float32
    assert a.labels.shape == (20, 8)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)
    assert torch.isfinite(a.images).all()
    th = a.labels[:, 0]
    assert th.min() >= 0.3 and th.max() <= 2.2
    assert (a.labels[:, 7] >= 2.0).all()  # min_mu rejection
    e = torch.hypot(a.labels[:, 1], a.labels[:, 2])
    assert (e <= (1 - 0.3) / (1 + 0.3) + 1e-6).all()
    assert (a.labels[:, 3:5].abs() <= 0.25).all() and (a.labels[:, 5:7].abs() <= 0.1).all()


def test_two_band_colours_and_lens_light():
    """Each band is PSF * (source * source_scale + lens light * lens_scale), red lens, blue source."""
    sim = _sim("hst", **{"npix": 64, "source.kind": "sersic", "psf.kind": "gaussian"})
    p = sim.draw_params(6, torch.Generator().manual_seed(0))
    src, _ = sim.render_source(p)
    ll = sim.render_lens_light(p)
    img, clean, _ = sim.observe(src, ll, p, torch.Generator().manual_seed(1), False, False)
    assert img.shape == (6, 2, 64, 64) and torch.equal(img, clean)
    ps = sim.psf.convolve(src[:, None], p["psf_index"])[:, 0]
    pl = sim.psf.convolve(ll[:, None], p["psf_index"])[:, 0]
    for i in range(6):
        A = torch.stack([ps[i].flatten(), pl[i].flatten()], 1).double()
        for band in range(2):
            coef = torch.linalg.lstsq(A, clean[i, band].flatten().double()[:, None]).solution[:, 0]
            assert float(coef[0]) == pytest.approx(float(p["band_src"][i, band]), rel=1e-3)
            assert float(coef[1]) == pytest.approx(float(p["band_lens"][i, band]), rel=1e-3)
    assert (p["band_lens"][:, 1] <= 0.4).all() and (p["band_src"][:, 1] >= 0.8).all()
    assert (ll.sum((1, 2)) > 0).all()


def test_magnification_map_matches_lenstronomy():
    from lensexp.sim.trace import magnification_map

    mu = magnification_map(LENS, 16, 0.25)[0].numpy()
    x, y = pixel_grid(16, 0.25, 1)
    lm = LensModel(["SIE", "SHEAR"])
    kl = [
        {k: LENS[k] for k in ("theta_E", "e1", "e2", "center_x", "center_y")},
        dict(gamma1=LENS["gamma1"], gamma2=LENS["gamma2"], ra_0=0.0, dec_0=0.0),
    ]
    ref = lm.magnification(x.numpy().ravel(), y.numpy().ravel(), kl).reshape(16, 16)
    ok = np.abs(ref) < 50
    np.testing.assert_allclose(mu[ok], ref[ok], rtol=1e-3)
    assert (mu < 0).any() and (mu > 0).any()  # the grid straddles the critical curves


def test_float64_simulation_and_composed_config_entry():
    from lensexp.config import compose_config
    from lensexp.sim.render import simulate_batch

    cfg = compose_config("data_only", ["data=tiny", "data.dtype=float64", "data.source.kind=sersic"])
    images, labels = simulate_batch(cfg, 4, seed=3)
    again, _ = simulate_batch(cfg, 4, seed=3)
    assert images.shape == (4, 1, 64, 64) and labels.shape == (4, 8)
    assert torch.equal(images, again) and torch.isfinite(images).all()


def test_large_images_are_drawn_in_capped_batches_and_sample_joins_them():
    """hst (192 px, supersampling 2) draws at most MAX_BATCH_RAYS rays per batch; tiny keeps the
    requested batch; ``sample`` is exactly its ``batches`` joined."""
    from lensexp.sim.render import MAX_BATCH_RAYS, effective_batch_size

    hst = load_data_preset("hst")
    cap = MAX_BATCH_RAYS // (192 * 2) ** 2
    assert effective_batch_size(256, hst.npix, hst.supersample) == cap == 56
    assert effective_batch_size(256, 64, 2) == 256 and effective_batch_size(8, 192, 2) == 8
    sim = Simulator(hst)
    parts = list(sim.batches(cap + 3, seed=4, batch_size=256, artefacts=False))
    assert [p.images.shape[0] for p in parts] == [cap, 3]
    whole = sim.sample(cap + 3, seed=4, batch_size=256, artefacts=False)
    assert torch.equal(whole.images, torch.cat([p.images for p in parts]))
    assert torch.equal(whole.labels, torch.cat([p.labels for p in parts]))
