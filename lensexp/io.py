"""FITS input for prediction: validated reading, pixel scale, cut-out to the model's grid.

Files from others are untrusted: every problem (unreadable, no image, NaN-only, wrong shape,
pixel-scale mismatch) raises :class:`BadInput` with one message naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class BadInput(ValueError):
    """A FITS file that cannot be analysed, with the reason."""


def read_fits(path: str | Path) -> tuple[np.ndarray, float | None]:
    """Image [bands, H, W] float32 and pixel scale [arcsec/px] (``PIXSCALE`` or WCS; None if absent).

    Accepts a 2-D image or a 3-D cube in the first HDU holding data.
    """
    data, header, _ = read_fits_hdus(path)
    return data, pixel_scale(header)


def read_fits_hdus(
    path: str | Path, extensions: tuple = (), max_pixels: int | None = None
) -> tuple[np.ndarray, object, dict]:
    """:func:`read_fits`'s validated image [bands, H, W], its header, and the data of the named
    image ``extensions`` present in the file (e.g. ``("PSF",)``), in one opening of the file.

    Integer and scaled (``BSCALE``/``BZERO``) data become float32; an image of more than
    ``max_pixels`` pixels is refused from its header, before its data are read."""
    from astropy.io import fits

    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            hdul.verify("silentfix")
            hdu = next((h for h in hdul if h.is_image and len(h.shape) >= 2), None)
            if hdu is None:
                raise BadInput(f"{path.name}: no image data in any HDU")
            n = int(np.prod(hdu.shape))
            if max_pixels and n > max_pixels:
                shape = "x".join(map(str, hdu.shape))
                raise BadInput(f"{path.name}: image of {shape} px exceeds the {max_pixels:,}-pixel limit; cut it out")
            data = np.asarray(hdu.data, dtype=np.float32)
            header = hdu.header
            extra = {e: np.asarray(hdul[e].data) for e in extensions if e in hdul and hdul[e].data is not None}
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - astropy raises many types for broken files
        raise BadInput(f"{path.name}: unreadable FITS ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise BadInput(f"{path.name}: expected a 2-D image or a (bands, H, W) cube, got shape {data.shape}")
    if not np.isfinite(data).any():
        raise BadInput(f"{path.name}: no finite pixels (NaN/inf only)")
    return data, header, extra


def pixel_scale(header) -> float | None:
    """Pixel scale [arcsec/px] from ``PIXSCALE`` or the WCS, None when neither is present."""
    if "PIXSCALE" in header:
        return float(header["PIXSCALE"])
    try:
        from astropy.wcs import WCS
        from astropy.wcs.utils import proj_plane_pixel_scales

        w = WCS(header, naxis=2)
        if w.has_celestial:
            return float(np.mean(proj_plane_pixel_scales(w.celestial)) * 3600.0)
    except Exception:  # noqa: BLE001 - a broken WCS is the same as none
        return None
    return None


def crop_offset(n_in: int, n_out: int) -> int:
    """First input pixel of a centred integer cut-out (negative: zero padding)."""
    return (n_in - n_out) // 2


def cut_out(a: np.ndarray, npix: int, fill: float = 0.0) -> np.ndarray:
    """Centred integer crop/pad of [C, H, W] to [C, npix, npix], ``fill`` outside the input."""
    _, h, w = a.shape
    out = np.full((a.shape[0], npix, npix), fill, a.dtype)
    sy, sx = crop_offset(h, npix), crop_offset(w, npix)
    ys, xs = max(0, sy), max(0, sx)
    crop = a[:, ys : ys + npix, xs : xs + npix]
    oy, ox = ys - sy, xs - sx
    out[:, oy : oy + crop.shape[1], ox : ox + crop.shape[2]] = crop
    return out


def to_grid(img: np.ndarray, npix: int) -> np.ndarray:
    """Centre-crop or zero-pad [bands, H, W] to float32 [bands, npix, npix]; NaNs become 0 (masked)."""
    return cut_out(np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32), npix)


def disc_mask(shape, centres, radius_pix: float) -> np.ndarray:
    """Boolean mask [H, W] of discs of ``radius_pix`` around ``centres`` [(row, col), ...]."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    m = np.zeros(shape, bool)
    for r, c in centres:
        m |= (yy - r) ** 2 + (xx - c) ** 2 <= radius_pix**2
    return m


def cosmic_ray_centres(img: np.ndarray, nsigma: float = 8.0) -> list[tuple[int, int]]:
    """Pixels far above a 3x3 median-filtered image (sharp outliers such as cosmic rays)."""
    from scipy.ndimage import median_filter

    resid = img - median_filter(img, size=3)
    sigma = 1.4826 * np.median(np.abs(resid - np.median(resid))) + 1e-30
    return [tuple(x) for x in np.argwhere(resid > nsigma * sigma)]


def stamp_mask(img: np.ndarray, pixscale: float, masks) -> np.ndarray:
    """Boolean mask [H, W] (True = masked) for an image [bands, H, W] from a ``masks`` config:
    discs of ``radius`` [arcsec] on the centre (``centre``) and on sharp outliers
    (``cosmic_rays``), and a FITS ``file`` (nonzero = masked), as Hezaveh et al. 2017 did."""
    npix = img.shape[-1]
    mask = np.zeros(img.shape[1:], bool)
    r = float(masks.radius) / pixscale
    if masks.centre:
        mask |= disc_mask(mask.shape, [((img.shape[1] - 1) / 2, (npix - 1) / 2)], r)
    if masks.cosmic_rays:
        mask |= disc_mask(mask.shape, cosmic_ray_centres(img.sum(0)), r)
    if masks.file:
        m, _ = read_fits(Path(masks.file))
        mask |= to_grid(m, npix)[0] != 0
    return mask


def read_table(path: str | Path, what: str) -> dict[str, dict]:
    """A CSV with a ``name`` column as ``{name: {column: float}}`` (non-numbers become NaN)."""
    import csv
    import math

    from lensexp.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: '{path}'")
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "name" not in rows[0]:
        raise ConfigError(f"{what} '{path}' has no 'name' column")

    def num(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    return {r["name"]: {k: num(v) for k, v in r.items() if k != "name"} for r in rows}
