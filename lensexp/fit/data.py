"""Files of a fit: the lens data products (:mod:`lensexp.inputs`), PSF, masks and the noise
model of each lens (lenstronomy's Data room).

Noise precedence, per lens: (1) the noise map (``noise.fits`` of a lens folder: the variance is
its square, fixed); (2) complete noise keywords (``EXPTIME`` and ``SKYLEV``, plus ``RDNOISE``,
``GAIN`` when present) or the same stated as ``noise.*``: background from the sky level, read
and quantisation noise, Poisson noise of the model; (3) else the background measured on the
empty-sky pixels (sigma-clipped standard deviation, :func:`sky_pixels`), with the model's
Poisson term only when ``EXPTIME`` is known. The sky is never assumed to be zero. The adopted
noise is checked against the empty sky: a warning when they differ by more than 30 %
(column ``sky_ratio`` = measured / adopted).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import replace

import numpy as np
import torch

from lensexp.inputs import LensFiles, check_psf, load, to_grid
from lensexp.io import BadInput, read_fits, stamp_mask
from lensexp.paths import resolve_path
from lensexp.sim import instrument as inst

log = logging.getLogger("lensexp.fit")
SKY_WARN = 0.30  # relative difference of adopted and measured sky noise that is reported


def sky_pixels(use: np.ndarray, min_count: int = 200) -> np.ndarray:
    """Empty-sky candidates [N, N]: usable pixels farther than 0.8 of the half-width from the
    centre (where lens, lens light and arcs are not), or all usable pixels when too few."""
    n = use.shape[-1]
    yy, xx = np.mgrid[: use.shape[0], :n]
    r = np.hypot(yy - (use.shape[0] - 1) / 2, xx - (n - 1) / 2)
    sky = use & (r > 0.8 * n / 2)
    return sky if sky.sum() >= min_count else use


def sky_sigma(img: np.ndarray, sky: np.ndarray) -> float:
    """Sigma-clipped (3 sigma) standard deviation of the sky pixels (objects clipped)."""
    from astropy.stats import sigma_clipped_stats

    _, _, std = sigma_clipped_stats(img[sky], sigma=3.0, maxiters=10)
    return float(std)


def noise_model(header, img: np.ndarray, use: np.ndarray, noise_map, cfg, from_image: bool = False) -> dict:
    """The lens's noise: ``bg_var`` (a number or a map [N, N], (image units)^2), ``inv_t`` (1 /
    exposure time for the Poisson term of the model; 0 without one), ``noise_source`` (map |
    header | sky) and ``sky_ratio``. ``from_image``: the header does not describe these pixels
    (e.g. an ICA mixture of bands)."""
    nz = cfg.noise

    def get(key, hdr):
        if nz.get(key) is not None:
            return float(nz[key])
        return None if from_image or hdr not in header else float(header[hdr])

    t, sky = get("exposure_time", "EXPTIME"), get("sky", "SKYLEV")
    sky_pix = sky_pixels(use)
    measured = sky_sigma(img, sky_pix)
    if noise_map is not None:
        bg, inv_t, source = np.where(use, noise_map, 1.0) ** 2, 0.0, "map"
    elif nz.get("background_rms") is not None:
        bg, inv_t, source = float(nz.background_rms) ** 2, (1.0 / t if t else 0.0), "config"
    elif t is not None and sky is not None:
        read, gain = (get(k, h) or 0.0 for k, h in (("read_noise", "RDNOISE"), ("gain", "GAIN")))
        bg = float(inst.noise_variance(torch.tensor(0.0), t, sky, read, gain))
        inv_t, source = 1.0 / t, "header"
    else:
        bg, inv_t, source = measured**2, (1.0 / t if t else 0.0), "sky"
    adopted = float(np.sqrt(np.median(np.broadcast_to(bg, use.shape)[sky_pix])))
    if not adopted > 0 or not math.isfinite(adopted):
        raise BadInput("background noise is zero or undefined: give noise.background_rms=SIGMA (image units)")
    ratio = measured / adopted
    if abs(ratio - 1) > SKY_WARN:
        log.warning(
            "noise (%s) is %.3g per pixel but the empty sky scatters by %.3g (ratio %.2f): check the "
            "noise keywords/map or give noise.background_rms=",
            source,
            adopted,
            measured,
            ratio,
        )
    return {"bg_var": bg, "inv_t": inv_t, "noise_source": source, "sky_ratio": ratio}


@functools.lru_cache(maxsize=8)
def load_psf(path: str, pixscale: float, psf_pixscale: float | None) -> np.ndarray:
    """A unit-sum odd-sized PSF kernel at ``pixscale`` from a FITS image (resampled with GalSim
    when ``psf_pixscale`` differs)."""
    from lensexp.sim.psf import load_empirical

    size = read_fits(path)[0].shape[-1]
    ps = float(psf_pixscale or pixscale)
    n = int(math.ceil(size * ps / pixscale)) | 1
    k, _ = load_empirical(str(path), ps, pixscale, n)
    return k[0]


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


class Loader:
    """Reads one lens into the arrays of a fit: ``data`` [N, N], ``use`` (pixels in the
    likelihood), PSF kernel, the noise model (:func:`noise_model`), the pixel scale, the centred
    cut-out's ``offset`` (arcsec, file frame) and the lens data (for network starts)."""

    def __init__(self, cfg, npix: int | None):
        self.cfg, self.npix = cfg, npix

    def __call__(self, lens: LensFiles) -> dict:
        from lensexp.sim.psf import draw_kernel

        cfg, name = self.cfg, lens.name
        data = load(lens, _opt_float(cfg.pixscale), ("PSF",))
        scale = data.pixscale
        if cfg.ica:  # two bands -> the lens-light-free source, in band-1 units
            from lensexp.ica import cube_source

            raw = cube_source(np.nan_to_num(data.image), name, int(cfg.seed))[None]
        else:
            band = int(cfg.band)
            if not 0 <= band < data.image.shape[0]:
                raise BadInput(f"{name}: band={band} but the file has {data.image.shape[0]} band(s)")
            raw = data.image[band : band + 1]
        side = min(raw.shape[-2:])
        if self.npix is None and side > int(cfg.max_npix):
            raise BadInput(
                f"{name}: {raw.shape[-2]}x{raw.shape[-1]} px is larger than max_npix={cfg.max_npix}: "
                "give npix=N to fit a centred N x N cut-out (or raise max_npix)"
            )
        npix = self.npix or side
        grid = to_grid(replace(data, image=raw), npix)
        img = grid.image
        use = ~grid.bad & ~stamp_mask(img, scale, cfg.masks)
        if grid.noise is None and not data.integer:
            use &= img[0] != 0  # float files without a noise map: exact zeros are masked pixels
        if use.sum() < 50:
            raise BadInput(f"{name}: only {int(use.sum())} usable pixels (NaN, zero or masked)")
        psf = data.psf
        if psf is None and cfg.psf:
            psf = load_psf(str(resolve_path(cfg.psf)), scale, _opt_float(cfg.psf_pixscale))
        if psf is None and cfg.psf_fwhm:
            psf = draw_kernel("gaussian", float(cfg.psf_fwhm), scale, int(cfg.psf_size))
        if psf is None:
            raise BadInput(f"{name}: no PSF (no psf.fits, no 'PSF' extension); give psf=FITS or psf_fwhm=ARCSEC")
        psf = check_psf(name, psf)
        noise_map = None if cfg.ica else grid.noise
        noise = noise_model(data.header, img[0], use, noise_map, cfg, from_image=bool(cfg.ica))
        item = {"data": img[0], "use": use, "psf": psf, "scale": scale, "offset": grid.offset, "lens": data}
        return {**item, "raw": raw, **noise}
