"""Lens images from files: the one validation path of ``predict`` and ``fit``.

``input=`` is one FITS file, a folder of FITS files (one lens per file; the row's name is the
file name), or a folder of lens folders ``<name>/image.fits`` with optional ``noise.fits``
(1-sigma per pixel; >= 1e7, <= 0 or non-finite mark unusable pixels), ``psf.fits`` and
``mask.fits`` (nonzero = masked); the row's name is then the folder's name.

Every file is untrusted. :func:`load` refuses, with one :class:`~lensexp.io.BadInput` message
naming the file and the problem: unreadable FITS, no image, more than :data:`MAX_PIXELS`
pixels, sides under :data:`MIN_SIDE` pixels, no finite pixel, a constant image, no pixel scale
(header ``PIXSCALE``, a celestial WCS, or ``pixscale=``), a ``pixscale=`` that contradicts the
header, auxiliary files of another shape, a PSF that is not a finite, square, odd-sized image
of positive flux. Integer and scaled (``BSCALE``/``BZERO``) images become float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lensexp.errors import ConfigError
from lensexp.io import BadInput, crop_offset, cut_out, pixel_scale, read_fits_hdus

log = logging.getLogger("lensexp.inputs")

SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
IMAGE_NAMES = ("image.fits", "image.fits.gz", "image.fit")
MIN_SIDE = 16  # pixels: below this there is no lens to measure
MAX_PIXELS = 8192 * 8192  # per file: a guard against reading a whole survey tile
NOISE_UNUSABLE = 1e7  # noise-map values >= this mark unusable pixels
SCALE_TOLERANCE = 0.01  # relative: a header and pixscale= that differ more contradict each other


@dataclass
class LensFiles:
    """One lens: its name (file or folder name), image and optional noise map, PSF and mask."""

    name: str
    image: Path
    noise: Path | None = None
    psf: Path | None = None
    mask: Path | None = None


@dataclass
class LensData:
    """A validated lens image [bands, H, W] (float32, non-finite pixels kept as NaN) with its
    pixel scale [arcsec/px], header, 1-sigma noise map [H, W] (NaN = unusable; None when not
    given), PSF kernel (unit sum; None when not given) and ``bad`` [H, W] (True = excluded:
    non-finite, masked or unusable noise)."""

    name: str
    image: np.ndarray
    pixscale: float
    header: object
    noise: np.ndarray | None = None
    psf: np.ndarray | None = None
    bad: np.ndarray = field(default=None)
    integer: bool = False  # stored as integers: a zero is a measurement, not a masked pixel


def _lens_folder(d: Path) -> LensFiles | None:
    img = next((d / n for n in IMAGE_NAMES if (d / n).is_file()), None)
    if img is None:
        return None
    opt = lambda stem: next((d / f"{stem}{s}" for s in SUFFIXES if (d / f"{stem}{s}").is_file()), None)  # noqa: E731
    return LensFiles(d.name, img, opt("noise"), opt("psf"), opt("mask"))


def list_inputs(path: str | Path) -> list[LensFiles]:
    """The lenses of ``input=``: a FITS file, a lens folder, or a folder of FITS files and/or
    lens folders (sorted by name)."""
    p = Path(path)
    if p.is_file():
        return [LensFiles(p.name, p)]
    if p.is_dir():
        own = _lens_folder(p)
        if own is not None:
            return [own]
        items = []
        for f in sorted(p.iterdir()):
            if f.is_file() and f.name.lower().endswith(SUFFIXES) and not f.name.startswith("."):
                items.append(LensFiles(f.name, f))
            elif f.is_dir() and (lf := _lens_folder(f)) is not None:
                items.append(lf)
        if not items:
            raise ConfigError(f"no FITS files ({', '.join(SUFFIXES)}) or lens folders (<name>/image.fits) in '{path}'")
        names = [i.name for i in items]
        if len(set(names)) != len(names):
            raise ConfigError(f"'{path}' holds two lenses of the same name; rename one")
        return items
    raise ConfigError(f"input not found: '{path}'")


def file_scale(name: str, header, pixscale: float | None) -> float:
    """The image's pixel scale [arcsec/px]: the header's (``PIXSCALE`` or WCS) or ``pixscale=``;
    refused when neither is known or when they contradict each other."""
    own = pixel_scale(header)
    if pixscale is not None:
        pixscale = float(pixscale)
        if not pixscale > 0:
            raise ConfigError(f"pixscale must be > 0 arcsec/px, got {pixscale}")
        if own is not None and abs(own / pixscale - 1) > SCALE_TOLERANCE:
            raise BadInput(
                f'{name}: the header says {own:.4g}"/px but pixscale={pixscale:.4g}; '
                "remove pixscale= or correct the header"
            )
        return pixscale
    if own is None:
        raise BadInput(f"{name}: no pixel scale (no PIXSCALE keyword or celestial WCS); give pixscale=ARCSEC_PER_PX")
    if not own > 0:
        raise BadInput(f"{name}: the header's pixel scale {own} is not positive")
    return own


def check_psf(name: str, psf) -> np.ndarray:
    """A PSF as a unit-sum float64 kernel, or :class:`BadInput`."""
    psf = np.asarray(psf, np.float64)
    if psf.ndim == 3 and psf.shape[0] == 1:
        psf = psf[0]
    if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0 or not np.isfinite(psf).all():
        raise BadInput(f"{name}: the PSF must be a finite, square, odd-sized image, got shape {psf.shape}")
    if not psf.sum() > 0:
        raise BadInput(f"{name}: the PSF has no positive flux")
    return psf / psf.sum()


def _aux(name: str, path: Path, what: str, shape) -> np.ndarray:
    data, _, _ = read_fits_hdus(path, max_pixels=MAX_PIXELS)
    if data.shape[0] != 1 or data.shape[1:] != tuple(shape):
        raise BadInput(f"{name}: {what} {path.name} has shape {data.shape[1:]}, the image {tuple(shape)}")
    return data[0]


def load(lens: LensFiles, pixscale: float | None = None, extensions: tuple = ("PSF",)) -> LensData:
    """Read and validate one lens (see the module docstring for what is refused)."""
    name = lens.name
    img, header, ext = read_fits_hdus(lens.image, extensions, max_pixels=MAX_PIXELS)
    integer = bool(header.get("BITPIX", -32) > 0 and "BSCALE" not in header and "BZERO" not in header)
    h, w = img.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise BadInput(f"{name}: image of {h}x{w} px is too small (at least {MIN_SIDE}x{MIN_SIDE} px)")
    finite = np.isfinite(img)
    vals = img[finite]
    if vals.min() == vals.max():
        raise BadInput(f"{name}: constant image (every finite pixel = {vals.min():g}): nothing to measure")
    scale = file_scale(name, header, pixscale)
    bad = ~finite.all(0)
    noise = None
    if lens.noise is not None:
        noise = _aux(name, lens.noise, "noise map", (h, w)).astype(np.float64)
        unusable = ~np.isfinite(noise) | (noise <= 0) | (noise >= NOISE_UNUSABLE)
        noise[unusable] = np.nan
        bad |= unusable
    if lens.mask is not None:
        m = _aux(name, lens.mask, "mask", (h, w))
        bad |= np.nan_to_num(m, nan=1.0) != 0
    psf = None
    if lens.psf is not None:
        psf, _, _ = read_fits_hdus(lens.psf, max_pixels=MAX_PIXELS)
        psf = check_psf(f"{name} ({lens.psf.name})", psf)
    elif ext.get("PSF") is not None:
        psf = check_psf(f"{name} (PSF extension)", ext["PSF"])
    if (~bad).sum() < 50:
        raise BadInput(f"{name}: only {int((~bad).sum())} usable pixels (NaN, masked or no noise)")
    return LensData(name, img, scale, header, noise, psf, bad, integer)


# ---------------------------------------------------------------------------- grids
def overlap_matrix(n_in: int, n_out: int, ratio: float) -> np.ndarray:
    """[n_out, n_in] fractions of input pixel i inside output pixel j, for output pixels
    ``ratio`` input pixels wide on the same centre ((n-1)/2 on both axes). Summing with these
    weights conserves flux exactly; for an integer ratio on aligned blocks they are block sums."""
    c = (n_in - 1) / 2
    lo = c + (np.arange(n_out)[:, None] - n_out / 2) * ratio
    hi = lo + ratio
    i = np.arange(n_in)[None, :]
    return np.clip(np.minimum(hi, i + 0.5) - np.maximum(lo, i - 0.5), 0.0, None)


def resample(img: np.ndarray, ratio: float, npix: int, variance: bool = False) -> np.ndarray:
    """Images [C, H, W] onto an ``npix`` grid of pixels ``ratio`` times larger (>= 1), centred:
    flux-conserving area-weighted sums (block sums for aligned integer ratios). ``variance``:
    propagate independent per-pixel variances (squared weights)."""
    wy, wx = overlap_matrix(img.shape[-2], npix, ratio), overlap_matrix(img.shape[-1], npix, ratio)
    if variance:
        wy, wx = wy**2, wx**2
    return np.einsum("ai,cij,bj->cab", wy, img.astype(np.float64), wx)


def interpolate(img: np.ndarray, scale_in: float, scale_out: float, npix: int) -> np.ndarray:
    """Images [C, H, W] onto a finer ``npix`` grid of ``scale_out`` < ``scale_in`` arcsec/px,
    centred: GalSim ``InterpolatedImage`` (Lanczos-5, flux-conserving, ``method='no_pixel'``)."""
    import galsim

    out = np.zeros((img.shape[0], npix, npix))
    for c, im in enumerate(img):
        prof = galsim.InterpolatedImage(
            galsim.Image(np.ascontiguousarray(im, np.float64), scale=scale_in),
            x_interpolant=galsim.Lanczos(5),
            normalization="flux",
            calculate_stepk=False,
            calculate_maxk=False,
        )
        out[c] = prof.drawImage(nx=npix, ny=npix, scale=scale_out, method="no_pixel").array
    return out


def psf_to_scale(psf: np.ndarray, scale_in: float, scale_out: float) -> np.ndarray:
    """A unit-sum PSF [k, k] at ``scale_in`` arcsec/px on an odd, centred grid of ``scale_out``
    arcsec/px covering it, resampled as images are (:func:`resample` for coarser grids,
    :func:`interpolate` for finer ones); unchanged when the scales agree."""
    ratio = scale_out / scale_in
    if abs(ratio - 1) <= 1e-6:
        return psf
    n = int(np.ceil(psf.shape[-1] / ratio))
    n += 1 - n % 2
    out = resample(psf[None], ratio, n)[0] if ratio > 1 else interpolate(psf[None], scale_in, scale_out, n)[0]
    return out / out.sum()


@dataclass
class Grid:
    """A lens on another grid: ``image`` [C, n, n] (excluded pixels 0), ``bad`` [n, n], ``noise``
    [n, n] or None, and ``offset`` (dx, dy) [arcsec]: the new grid's centre in the file's
    centred frame (add it to positions measured on the new grid)."""

    image: np.ndarray
    bad: np.ndarray
    noise: np.ndarray | None
    offset: tuple
    note: str = ""


def to_grid(lens: LensData, npix: int, pixscale: float | None = None) -> Grid:
    """The lens on an ``npix`` grid of ``pixscale`` arcsec/px (default: the file's): a centred
    integer cut-out at the same scale, area-weighted binning for coarser grids, GalSim
    interpolation for finer ones. Excluded pixels follow the image (an output pixel touching one
    is excluded); the noise map is propagated as a variance."""
    scale = lens.pixscale if pixscale is None else float(pixscale)
    ratio = scale / lens.pixscale
    img = np.where(lens.bad[None], 0.0, np.nan_to_num(lens.image, nan=0.0))
    h, w = img.shape[-2:]
    if abs(ratio - 1) <= 1e-6:
        dy = crop_offset(h, npix) + (npix - 1) / 2 - (h - 1) / 2
        dx = crop_offset(w, npix) + (npix - 1) / 2 - (w - 1) / 2
        bad = cut_out(lens.bad[None], npix, True)[0]
        noise = None if lens.noise is None else cut_out(lens.noise[None], npix, np.nan)[0]
        return Grid(cut_out(img.astype(np.float32), npix, 0.0), bad, noise, (dx * scale, dy * scale))
    if ratio > 1:
        out = resample(img, ratio, npix)
        cover = resample(np.ones((1, h, w)), ratio, npix)[0] / ratio**2
        bad = (resample(lens.bad[None].astype(float), ratio, npix)[0] > 0) | (cover < 1 - 1e-6)
        noise = None
        if lens.noise is not None:
            noise = np.sqrt(resample(np.nan_to_num(lens.noise, nan=0.0)[None] ** 2, ratio, npix, variance=True)[0])
        how = "area-weighted block sums"
    else:
        out = interpolate(img, lens.pixscale, scale, npix)
        cover = interpolate(np.ones((1, h, w)), lens.pixscale, scale, npix)[0] / ratio**2
        badf = interpolate(lens.bad[None].astype(float), lens.pixscale, scale, npix)[0]
        bad = (np.abs(badf) > 1e-3 * ratio**2) | (cover < 0.999)
        noise = None
        if lens.noise is not None:  # per-pixel flux scales as ratio^2: variance as ratio^4 (correlations ignored)
            var = interpolate(np.nan_to_num(lens.noise, nan=0.0)[None] ** 2, lens.pixscale, scale, npix)[0]
            noise = np.sqrt(np.clip(var, 0, None) * ratio**2)
        how = "GalSim Lanczos-5 interpolation"
    out[:, bad] = 0.0
    if noise is not None:
        noise = np.where(bad, np.nan, noise)
    note = f'{lens.name}: resampled {lens.pixscale:.4g}"/px -> {scale:.4g}"/px ({how}, flux conserved)'
    log.info(note)
    return Grid(out.astype(np.float32), bad, noise, (0.0, 0.0), note)
