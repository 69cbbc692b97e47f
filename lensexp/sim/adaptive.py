"""Adaptive supersampling: one ray per pixel, ``s x s`` rays only where the image needs them.

A supersampled render evaluates ``s^2`` rays in every pixel, although most pixels hold smooth,
faint light whose pixel average the pixel-centre value already gives to far below the noise.
Here an image is rendered first with one ray per pixel (the "coarse" image); the pixels whose
sampling error may matter are then rendered again with the ``s x s`` sub-pixel rays of the full
render and put in place. For light ``f`` smooth on the pixel scale, the mean of the ``s x s``
sub-pixel samples differs from the centre value by ``(1 - 1/s^2) / 24 * laplacian(f)`` (pixel
units), so a pixel is refined when that estimate, from the coarse image's 5-point Laplacian,
exceeds ``tolerance`` times the preset's lowest sky noise (:func:`noise_floor`), and so are its
8 neighbours (features narrower than a pixel show in the neighbours' curvature first).

The refined pixels are the full render's (up to float32 rounding of the ray positions); the
others are the one-ray render's and differ from the full render by about the tolerance at most
(hst: < 0.1 of the quietest sky noise; tests: ``tests/sim/test_adaptive.py``). lenstronomy offers the same idea
(``supersampling_compute_mode='adaptive'`` with a user-given pixel set).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lensexp.sim.instrument import noise_variance, sky_per_pixel
from lensexp.sim.ranges import check_range


def noise_floor(instrument, pixscale: float) -> float:
    """Lowest background noise [e-/s per pixel] a preset's detector draws: longest exposure,
    darkest sky, lowest read noise (``instrument.noise_variance`` of an empty pixel)."""
    t = max(check_range("data.instrument.exposure_time", instrument.exposure_time))
    sky = sky_per_pixel(
        max(check_range("data.instrument.sky_mag", instrument.sky_mag)), float(instrument.zeropoint), pixscale
    )
    read = min(check_range("data.instrument.read_noise", instrument.read_noise))
    var = noise_variance(torch.tensor(0.0, dtype=torch.float64), t, sky, read, float(instrument.gain))
    return math.sqrt(float(var))


def sampling_error_mask(coarse: torch.Tensor, supersample: int, threshold: float) -> torch.Tensor:
    """Pixels [B, N, N] bool whose estimated sampling error ``(1 - 1/s^2) / 24 |laplacian|`` of
    the coarse flux per pixel ``coarse`` [B, N, N] (5-point stencil, edges replicated) exceeds
    ``threshold`` [same units]."""
    a = F.pad(coarse[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    lap = a[:, :-2, 1:-1] + a[:, 2:, 1:-1] + a[:, 1:-1, :-2] + a[:, 1:-1, 2:] - 4.0 * coarse
    return lap.abs() * ((1.0 - 1.0 / (supersample * supersample)) / 24.0) > threshold


def grow(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` [B, N, N] bool grown by one pixel (3 x 3), as two separable passes of shifted slices."""
    N = mask.shape[-1]
    m = F.pad(mask, (1, 1, 1, 1))
    rows = m[:, :, :N] | m[:, :, 1 : N + 1] | m[:, :, 2:]
    return rows[:, :N] | rows[:, 1 : N + 1] | rows[:, 2:]


def refine_mask(coarse: torch.Tensor, supersample: int, threshold: float, error_mask=sampling_error_mask):
    """Pixels [B, N, N] bool to render with ``supersample^2`` rays: :func:`sampling_error_mask`
    (``error_mask``: the same function, e.g. compiled) grown by one pixel (features narrower
    than a pixel show in the neighbours' curvature first). conv2d and max_pool2d took 0.8 ms per
    192-px image, these 0.06; the growing stays eager (inductor's code for it ran 25x slower)."""
    return grow(error_mask(coarse, supersample, threshold))


def refine_pixels(coarse: torch.Tensor, supersample: int, threshold: float, error_mask=sampling_error_mask):
    """Flat indices [M] (into ``coarse.reshape(-1)``, row-major over [B, N, N]) of the
    :func:`refine_mask` pixels."""
    return torch.nonzero(refine_mask(coarse, supersample, threshold, error_mask).reshape(-1)).squeeze(1)


def subpixel_points(idx: torch.Tensor, npix: int, pixscale: float, supersample: int, dtype):
    """(batch index [M], x [M, s^2], y [M, s^2]) [arcsec] of the sub-pixel rays of the flat pixel
    indices ``idx`` (:func:`refine_pixels`), at the positions :func:`trace.pixel_grid` uses."""
    s = int(supersample)
    b, pix = idx // (npix * npix), idx % (npix * npix)
    row, col = pix // npix, pix % npix
    off = ((torch.arange(s, dtype=dtype, device=idx.device) + 0.5) / s - 0.5) * pixscale
    oy, ox = torch.meshgrid(off, off, indexing="ij")
    c = (npix - 1) / 2.0
    x = (col.to(dtype) - c)[:, None] * pixscale + ox.reshape(1, -1)
    y = (row.to(dtype) - c)[:, None] * pixscale + oy.reshape(1, -1)
    return b, x, y


def gather_rows(tensors: tuple, b: torch.Tensor) -> tuple:
    """Per-image coefficients (a tuple of tensors [B, ...]) taken at batch index ``b`` [M], one
    row per refined pixel, in one gather."""
    flat = [t.reshape(t.shape[0], -1) for t in tensors]
    rows = torch.cat(flat, 1).index_select(0, b).split([f.shape[1] for f in flat], 1)
    return tuple(r.reshape(b.shape[0], *t.shape[1:]) for r, t in zip(rows, tensors))  # [M, 0] too (no clumps)


def put_refined(coarse: torch.Tensor, idx: torch.Tensor, sb: torch.Tensor, pixscale: float, supersample: int):
    """``coarse`` [B, N, N] with the pixels ``idx`` replaced by the binned sub-pixel surface
    brightness ``sb`` [M, s^2] (e-/s/arcsec^2 -> e-/s per pixel), in place."""
    area = (pixscale / supersample) ** 2
    total = sb[:, 0]
    for k in range(1, sb.shape[1]):  # the full render's order of summation
        total = total + sb[:, k]
    coarse.view(-1).index_copy_(0, idx, (total * area).to(coarse.dtype))
    return coarse
