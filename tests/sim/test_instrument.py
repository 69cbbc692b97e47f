"""Each detector effect does what it says: noise variance, cosmic rays, hot pixels, masks, PSFs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import ndimage, signal

from lensexp.config import load_data_preset
from lensexp.sim import instrument as inst
from lensexp.errors import ConfigError
from lensexp.sim.psf import PSFBank, direct_convolve, draw_kernel, fft_convolve, kernel_rfft, measure_fwhm
from lensexp.sim.render import Simulator


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("poisson", ["exact", "gaussian"])
def test_noise_variance_is_poisson_plus_read_noise(poisson):
    level, sky, t, read, gain = 0.8, 0.36, 1000.0, 4.0, 2.5  # e-/s, e-/s, s, e-, e-/ADU
    img = torch.full((4, 1, 128, 128), level, dtype=torch.float64)
    noisy = inst.add_noise(img, t, sky, read, gain, gen(1), poisson)
    want = (level + sky) / t + read**2 / t**2 + gain**2 / (12 * t**2)
    var = float(noisy.var())
    n = img.numel()
    assert var == pytest.approx(want, rel=5 * math.sqrt(2 / n))
    assert float(noisy.mean()) == pytest.approx(level, abs=5 * math.sqrt(want / n))
    # the sky is subtracted: a zero image has zero mean
    zero = inst.add_noise(torch.zeros_like(img), t, sky, read, gain, gen(2), poisson)
    assert abs(float(zero.mean())) < 5 * math.sqrt(want / n)


def test_correlated_noise_keeps_variance_and_correlates_neighbours():
    white = torch.randn(8, 1, 96, 96, generator=gen(3), dtype=torch.float64)
    cor = inst.correlate_noise(white, 1.5)
    assert float(cor.var()) == pytest.approx(1.0, rel=0.05)
    rho = float((cor[..., 1:] * cor[..., :-1]).mean() / cor.var())
    rho_white = float((white[..., 1:] * white[..., :-1]).mean())
    assert rho > 0.3 and abs(rho_white) < 0.02


def test_cosmic_rays_are_extended_tracks():
    like = torch.zeros(1)
    dep = inst.cosmic_rays((64, 1, 64, 64), 2.0, (8.0, 30.0), (1.0, 2.0), (500.0, 2000.0), 0.3, gen(4), like)
    assert dep.min() >= 0
    sizes, elong = [], []
    for im in dep[:, 0].numpy():
        lab, n = ndimage.label(im > 50.0, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            yy, xx = np.nonzero(lab == k)
            sizes.append(len(yy))
            if len(yy) >= 6:
                ev = np.linalg.eigvalsh(np.cov(np.stack([xx, yy])))
                elong.append(math.sqrt(ev[1] / max(ev[0], 1e-3)))
    sizes = np.array(sizes)
    assert len(sizes) > 60  # ~2 per image
    assert np.median(sizes) >= 8, "cosmic rays should cover several pixels, not single points"
    assert (sizes == 1).mean() < 0.1
    assert np.median(elong) > 2.5, "tracks should be elongated"
    # deposits near the configured amplitude per pixel crossed
    assert 200 < np.median(dep[dep > 50].numpy()) < 3000


def test_hot_pixel_count_matches_fraction():
    like = torch.zeros(1)
    frac = 0.002
    img, hot = inst.hot_pixels((16, 2, 128, 128), frac, (1.0, 5.0), gen(5), like)
    n = hot.numel()
    assert abs(int(hot.sum()) - frac * n) < 5 * math.sqrt(frac * n)
    vals = img[hot]
    assert vals.min() >= 1.0 and vals.max() <= 5.0 and (img[~hot] == 0).all()


def test_masks_keep_configured_arc_flux():
    sim = Simulator(load_data_preset("tiny", ["data.source.kind=sersic"]))
    p = sim.draw_params(32, gen(6))
    arc, _ = sim.render_source(p)
    for keep in (0.9, 0.6):
        m = inst.circular_masks(arc, (2, 5), (0.15, 0.25), 0.1, keep, gen(7))
        kept = (arc * ~m).sum((1, 2)) / arc.sum((1, 2))
        assert (kept >= keep - 1e-6).all()
        assert m.any(), "some masks must be placed"
    # radii: a lone disc of radius 0.2" at 0.1"/px covers ~pi * 2^2 pixels
    one = inst.circular_masks(torch.zeros(1, 64, 64) + 1e-9, (1, 1), (0.2, 0.2), 0.1, 0.0, gen(8))
    assert 9 <= int(one.sum()) <= 16


def test_masks_cosmic_rays_hot_pixels_in_simulated_batch():
    sim = Simulator(load_data_preset("tiny", ["data.source.kind=sersic"]))
    b = sim.sample(32, seed=3, keep_clean=True, keep_noise_map=True)
    m = b.meta["mask"]
    assert (b.images[:, 0][m] == 0).all()
    assert int(b.meta["cosmic_rays"].sum()) > 0
    assert int(b.meta["hot_pixels"].sum()) > 0
    assert b.meta["noise_var"].shape == b.images.shape


def test_artefact_switches():
    cfg = load_data_preset(
        "tiny",
        [
            "data.source.kind=sersic",
            "data.instrument.cosmic_rays.enabled=false",
            "data.instrument.hot_pixels.enabled=false",
            "data.instrument.masks.enabled=false",
            "data.instrument.bias=[0,0]",
        ],
    )
    b = Simulator(cfg).sample(8, seed=1, keep_clean=True, keep_noise_map=True)
    assert "mask" not in b.meta and "cosmic_rays" not in b.meta
    resid = (b.images - b.clean) / b.meta["noise_var"].sqrt()
    assert float(resid.std()) == pytest.approx(1.0, abs=0.05)
    clean = Simulator(cfg).sample(8, seed=1, noise=False, artefacts=False, keep_clean=True)
    assert torch.equal(clean.images, clean.clean)


def test_bias_offsets_zero_level():
    cfg = load_data_preset(
        "tiny",
        [
            "data.source.kind=sersic",
            "data.instrument.bias=[0.5,0.5]",
            "data.instrument.cosmic_rays.enabled=false",
            "data.instrument.hot_pixels.enabled=false",
            "data.instrument.masks.enabled=false",
        ],
    )
    b = Simulator(cfg).sample(4, seed=1, keep_clean=True)
    assert float((b.images - b.clean).mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["peak", "std", "quantile", "asinh"])
def test_normalisation_removes_flux_units(method):
    x = torch.rand(3, 2, 16, 16, generator=gen(9)) - 0.2
    a = inst.normalize(x, method)
    b = inst.normalize(x * 1234.5, method)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert inst.normalize(x, "none") is x


def test_noise_sigma_reads_the_noise_under_a_bright_galaxy_and_cosmic_rays():
    """The asinh stretch's sigma: white noise of known sigma per band under a galaxy 5 000 sigma
    bright and a few cosmic rays is read within 5 %; the stretch puts the galaxy core near
    asinh(5 000)."""
    from lensexp.sim.normalize import noise_sigma

    n = 96
    yy, xx = torch.meshgrid(torch.arange(n) - 47.5, torch.arange(n) - 47.5, indexing="ij")
    galaxy = 5000.0 * torch.exp(-((xx**2 + yy**2) ** 0.5) / 4.0)
    sig = torch.tensor([1.0, 7.0]).reshape(1, 2, 1, 1)
    img = galaxy + sig * torch.randn(3, 2, n, n, generator=gen(12))
    img[:, :, 10, 5:40] += 3000.0  # cosmic-ray tracks
    est = noise_sigma(img)
    assert est.shape == (3, 2, 1, 1)
    torch.testing.assert_close(est, sig.expand(3, 2, 1, 1), rtol=0.05, atol=0)
    masked = img.clone()
    masked[..., :, :30] = 0.0  # a third of the field masked (zeros, as predict leaves bad pixels)
    torch.testing.assert_close(noise_sigma(masked), sig.expand(3, 2, 1, 1), rtol=0.05, atol=0)
    assert float(noise_sigma(torch.zeros(1, 1, 8, 8)).abs().max()) == 0.0
    stretched = inst.normalize(img[:1, :1], "asinh")
    assert float(stretched[0, 0, 48, 48]) == pytest.approx(float(torch.asinh(img[0, 0, 48, 48] / est[0, 0])), rel=1e-5)
    assert float(stretched[0, 0, 48, 48]) > 8.5  # asinh(5000) ~ 9.2: 3 000x compressed to ~9
    assert float(inst.normalize(torch.zeros(1, 1, 8, 8), "asinh").abs().max()) == 0.0  # zero stays zero


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="asinh"):
        inst.normalize(torch.ones(1, 1, 4, 4), "log")


def test_fft_convolution_is_scipy_same():
    img = torch.rand(2, 3, 40, 40, generator=gen(10), dtype=torch.float64)
    k = torch.from_numpy(np.stack([draw_kernel("moffat", 0.3, 0.1, 11), draw_kernel("airy", 0.25, 0.1, 11)])).double()
    size = 45  # the smallest cyclic size that is exact: 40 + (11 - 1) / 2
    out = fft_convolve(img, kernel_rfft(k, size), 11, size)
    with pytest.raises(ValueError, match="too small"):
        fft_convolve(img, kernel_rfft(k, 44), 11, 44)
    direct = direct_convolve(img, k)
    for b in range(2):
        for c in range(3):
            ref = signal.fftconvolve(img[b, c].numpy(), k[b].numpy(), mode="same")
            np.testing.assert_allclose(out[b, c].numpy(), ref, atol=1e-12)
            np.testing.assert_allclose(direct[b, c].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("size", [11, 25])  # direct (<= DIRECT_MAX) and the complex FFT
def test_pair_convolution_is_each_image_convolved(size):
    """PSFBank.convolve_pair (lensed source and lens light through one complex FFT for large
    kernels) equals scipy's 'same' convolution of each in float64; in float32, with a lens
    galaxy 10^4 times brighter than the arc, either output moves by < 2e-6 of the lens peak
    (the presets' lens peaks are 5e3-5e4 sky sigma: < 0.1 sigma even at this bound)."""
    ker = [draw_kernel(k, f, 0.04, size) for k, f in (("moffat", 0.12), ("airy", 0.1), ("gaussian", 0.15))]
    bank = PSFBank(torch.from_numpy(np.stack(ker)).double(), torch.tensor([0.12, 0.1, 0.15]), 48)
    a = torch.rand(4, 1, 48, 48, generator=gen(11), dtype=torch.float64)
    b = torch.rand(4, 1, 48, 48, generator=gen(12), dtype=torch.float64)
    idx = torch.tensor([2, 0, 1, 2])
    ca, cb = bank.convolve_pair(a, b, idx)
    assert ca.shape == cb.shape == a.shape and ca.dtype == cb.dtype == torch.float64
    for i in range(4):
        kern = ker[int(idx[i])].astype(np.float64)
        np.testing.assert_allclose(ca[i, 0].numpy(), signal.fftconvolve(a[i, 0].numpy(), kern, mode="same"), atol=1e-12)
        np.testing.assert_allclose(cb[i, 0].numpy(), signal.fftconvolve(b[i, 0].numpy(), kern, mode="same"), atol=1e-12)
    # float32: a faint arc next to a bright, peaked galaxy
    y, x = torch.meshgrid(torch.arange(48.0) - 23.5, torch.arange(48.0) - 23.5, indexing="ij")
    lens = 1e4 * torch.exp(-torch.sqrt(x * x + y * y) / 3.0)
    arc = torch.exp(-0.5 * ((torch.sqrt(x * x + y * y) - 12.0) / 1.5) ** 2)
    bank32 = PSFBank(torch.from_numpy(np.stack(ker)).float(), torch.tensor([0.12, 0.1, 0.15]), 48)
    arcs, lenses, i3 = arc.expand(3, 1, 48, 48), lens.expand(3, 1, 48, 48), torch.arange(3)
    pa, pb = bank32.convolve_pair(arcs, lenses, i3)
    sa, sb = bank32.convolve(arcs, i3), bank32.convolve(lenses, i3)
    assert float((pa - sa).abs().max()) < 2e-6 * float(lens.max())
    assert float((pb - sb).abs().max()) < 2e-6 * float(lens.max())


@pytest.mark.parametrize("kind", ["gaussian", "moffat", "airy"])
def test_galsim_kernels_have_requested_fwhm(kind):
    k = draw_kernel(kind, 0.6, 0.05, 41)
    assert k.sum() == pytest.approx(1.0, abs=1e-6)
    assert measure_fwhm(k, 0.05) == pytest.approx(0.6, rel=0.12)


def test_analytic_psf_bank_mixes_profiles_and_moffat_betas():
    cfg = load_data_preset("tiny_broad").psf
    bank = PSFBank.from_config(cfg, 0.1, 64)
    kinds = np.array(bank.kind)
    assert len(kinds) == 192 and {k: int((kinds == k).sum()) for k in ("gaussian", "moffat", "airy")} == {
        "gaussian": 64,
        "moffat": 64,
        "airy": 64,
    }
    np.testing.assert_allclose(bank.kernels.sum((1, 2)).numpy(), 1.0, atol=1e-5)
    # the Moffat kernels carry different betas: at one FWHM a low beta has broader wings
    lo = draw_kernel("moffat", 0.25, 0.1, 13, 2.0)
    hi = draw_kernel("moffat", 0.25, 0.1, 13, 4.5)
    ring = np.hypot(*np.meshgrid(np.arange(13) - 6, np.arange(13) - 6)) >= 4
    assert lo[ring].sum() > 2 * hi[ring].sum()
    wings = [float(bank.kernels[i][torch.from_numpy(ring)].sum()) for i in np.flatnonzero(kinds == "moffat")]
    assert np.ptp(wings) > 0.01  # not one beta for all
    with pytest.raises(ConfigError, match="moffat_beta"):
        PSFBank.from_config(OmegaConf.merge(cfg, {"moffat_beta": [0.5, 3.0]}), 0.1, 64)


def test_psf_bank_with_empirical_psfs(emp_psf):
    cfg = load_data_preset("hst").psf
    bank = PSFBank.from_config(cfg, 0.04, 64)
    kinds = np.array(bank.kind)
    assert (kinds == "empirical").sum() > 0 and (kinds == "gaussian").sum() == 32
    np.testing.assert_allclose(bank.kernels.sum((1, 2)).numpy(), 1.0, atol=1e-5)
    emp = bank.fwhm[torch.from_numpy(kinds == "empirical")]
    # WFC3/UVIS F814W core FWHM is ~0.07-0.1"
    assert 0.05 < float(emp.median()) < 0.12


def test_artefacts_added_in_place_equal_the_dense_ones():
    like, img = torch.zeros(1), torch.rand(40, 2, 48, 48, generator=gen(7))
    args = ((40, 2, 48, 48), 0.5, (4.0, 30.0), (1.0, 2.0), (300.0, 900.0), 0.3)
    dep = inst.cosmic_rays(*args, gen(8), like)
    scale = torch.linspace(1e-3, 2e-3, 40)
    into = img.clone()
    tracks = inst.cosmic_rays(*args, gen(8), like, into=into, scale=scale)
    assert torch.allclose(into, img + dep * scale[:, None, None, None], atol=1e-5)
    hit = torch.count_nonzero(dep.reshape(40, -1), dim=1) > 0  # tracks start inside the image
    assert torch.equal(hit, tracks > 0) and (tracks == 0).any() and (tracks >= 2).any()
    hot, mask = inst.hot_pixels((40, 2, 48, 48), 0.003, (1.0, 5.0), gen(9), like)
    into = img.clone()
    n_hot = inst.hot_pixels((40, 2, 48, 48), 0.003, (1.0, 5.0), gen(9), like, into=into)
    assert torch.allclose(into, img + hot)
    assert torch.equal(n_hot, torch.count_nonzero(mask.reshape(40, -1), dim=1)) and n_hot.sum() > 0
