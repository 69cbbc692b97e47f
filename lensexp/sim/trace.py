"""Ray tracing and rendering on a supersampled pixel grid: the lens + source stage.

Pure, batched functions: pixel and sub-pixel grids (``../shared/conventions.md``: ``x = (col -
(N-1)/2) * pixscale``, ``y`` likewise with row), SIE + shear ray shooting (plus an extra
deflection from further mass components), Sérsic + clumps and COSMOS-stamp sources, binning to
flux per pixel [e-/s], and the standalone renderers the fit uses (:func:`render_sersic`).
"""

from __future__ import annotations

from typing import NamedTuple
from collections.abc import Callable

import torch

from lensexp.sim import lens as lensmod
from lensexp.sim.priors import LABELS
from lensexp.sim.psf import DIRECT_MAX, direct_convolve, fast_fft_size, fft_convolve, kernel_rfft
from lensexp.sim.source import gaussian_clumps_sb, sersic_coefficients, sersic_sb_rotated, source_plane_grid


class Pointwise(NamedTuple):
    """The per-ray functions the renderers call, with the signatures of
    :func:`source.sersic_sb_rotated` and :func:`lens.sie_deflection_rotated`: the library's by
    default (:data:`EAGER`); the fit passes compiled ones for the calls autograd records
    (``lensexp.fit.kernels``)."""

    sersic: Callable
    deflection: Callable


EAGER = Pointwise(sersic_sb_rotated, lensmod.sie_deflection_rotated)


def pixel_grid(npix: int, pixscale: float, supersample: int = 1, dtype=torch.float64, device=None):
    """Sub-pixel centre coordinates (x, y) [arcsec], each [N*s, N*s] (row, col).

    Pixel (row, col) has centre ``((col - (N-1)/2) p, (row - (N-1)/2) p)``; its ``s x s``
    sub-pixels are spaced ``p / s`` around it.
    """
    s = int(supersample)
    idx = (torch.arange(npix * s, dtype=dtype, device=device) + 0.5) / s - 0.5  # in pixel units
    c = (idx - (npix - 1) / 2.0) * pixscale
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def subpixel_planes(npix: int, pixscale: float, supersample: int = 1, dtype=torch.float64, device=None):
    """The :func:`pixel_grid` sub-pixels ordered as planes: (x, y) each [s*s * N*N], plane-major.

    Plane ``k = i s + j`` holds, for every pixel in row-major order, the sub-pixel at offset
    (row i, col j) inside it. Summing over planes bins to pixels with unit-stride memory access,
    which lets the fused ray-tracing kernel vectorise.
    """
    s = int(supersample)
    x, y = pixel_grid(npix, pixscale, s, dtype, device)

    def planes(a):
        return a.reshape(npix, s, npix, s).permute(1, 3, 0, 2).reshape(-1)

    return planes(x), planes(y)


def bin_supersampled(sb: torch.Tensor, npix: int, supersample: int, pixscale: float) -> torch.Tensor:
    """Surface brightness on :func:`subpixel_planes` [B, s*s*N*N] -> flux per pixel [B, N, N] (e-/s)."""
    s = supersample
    area = (pixscale / s) ** 2
    return sb.reshape(sb.shape[0], s * s, npix, npix).sum(1) * area


def lens_coefficients(p: dict) -> tuple:
    """(cx, cy, g1, g2) + :func:`lens.sie_coefficients`, each [B, 1], from a parameter dict."""
    col = lambda k: p[k][:, None]  # noqa: E731
    return (
        col("center_x"),
        col("center_y"),
        col("gamma1"),
        col("gamma2"),
        *lensmod.sie_coefficients(col("theta_E"), col("e1"), col("e2")),
    )


# C++ kernels built with floating-point contraction (a * b + c as one FMA): the SIE + Sersic ray
# kernel at 64 px runs 47.0 instead of 52.5 us per image on one core (AMD EPYC Zen 5, 2026-12-06,
# same process); rounding moves by float32 ulps (mean relative error against float64 2.2e-7 instead
# of 2.4e-7). -funsafe-math-optimizations was measured too: 4 % alone, slower with contraction.
KERNEL_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def batch_dynamic(fn):
    """``torch.compile`` of ``fn`` (:data:`KERNEL_OPTIONS`) with the batch size symbolic: dim 0 of
    every tensor argument (also inside tuples) longer than one is marked dynamic, everything else
    stays static, so one kernel serves every batch and subset size (a batch of one specialises once)."""
    compiled = torch.compile(fn, options=KERNEL_OPTIONS)  # automatic dynamic: marked dims symbolic

    def call(*args, **kw):
        for a in args:
            for t in a if isinstance(a, tuple) else (a,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] > 1:
                    torch._dynamo.mark_dynamic(t, 0)
        return compiled(*args, **kw)

    return call


def cosmos_grid(x, y, lens_coef, gal_coef, extra=None):
    """Ray-shoot the sub-pixel planes x, y [P] and map them to ``grid_sample`` coordinates of each
    image's galaxy stamp [B, P, 2] (:func:`source.source_plane_grid`) in one pass."""
    bx, by = shoot(x, y, lens_coef, extra)
    return source_plane_grid(bx, by, gal_coef)


def shoot(x, y, lens_coef, extra=None, pw: Pointwise = EAGER):
    """Source-plane positions (bx, by) [B, P] of the sub-pixel planes x, y [P] (SIE + shear,
    minus an ``extra`` deflection (ax, ay) [B, P] of further mass components when given)."""
    cx, cy, g1, g2, *sie = lens_coef
    ax, ay = pw.deflection(x - cx, y - cy, *sie)
    bx, by = x - ax - (g1 * x + g2 * y), y - ay - (g2 * x - g1 * y)
    if extra is not None:
        bx, by = bx - extra[0].to(bx.dtype), by - extra[1].to(by.dtype)
    return bx, by


def lensed_sersic_sb(x, y, lens_coef, src_coef, clumps, extra=None, pw: Pointwise = EAGER):
    """SB [e-/s/arcsec^2] of Sérsic + clumps sources seen through SIE + shear at image-plane
    positions x, y ([P] or [B, P]; coefficients as in :func:`trace_sersic`, each [B, 1])."""
    sx, sy, *sc = src_coef
    bx, by = shoot(x, y, lens_coef, extra, pw)
    sb = pw.sersic(bx - sx, by - sy, *sc)
    if clumps[0].shape[-1] > 0:
        sb = sb + gaussian_clumps_sb(bx, by, *clumps)
    return sb


def sersic_sb(x, y, coef):
    """SB of unlensed Sérsics (e.g. lens light) at positions x, y [B, P]; ``coef``: (cx, cy) +
    :func:`source.sersic_coefficients`, each [B, 1]."""
    cx, cy, *sc = coef
    return sersic_sb_rotated(x - cx, y - cy, *sc)


def sersic_image(x, y, coef, npix, supersample, pixscale, pw: Pointwise = EAGER):
    """Unlensed Sérsic (e.g. lens light) binned from sub-pixel planes to flux per pixel [B, N, N]."""
    cx, cy, *sc = coef
    planes = supersample * supersample
    xs, ys = x.reshape(planes, 1, -1), y.reshape(planes, 1, -1)
    total = sum(pw.sersic(xs[k] - cx, ys[k] - cy, *sc) for k in range(planes))
    return (total * (pixscale / supersample) ** 2).reshape(-1, npix, npix)


def trace_sersic(x, y, lens_coef, src_coef, clumps, npix, supersample, pixscale, extra=None, pw: Pointwise = EAGER):
    """Ray-trace the sub-pixel grid through SIE + shear, evaluate Sérsic + clumps and bin to flux
    per pixel [B, N, N] (e-/s).

    ``x, y``: :func:`subpixel_planes` [s*s*N*N]; ``lens_coef``: (cx, cy, g1, g2) +
    :func:`lens.sie_coefficients`, ``src_coef``: (sx, sy) + :func:`source.sersic_coefficients`,
    each [B, 1]; ``clumps``: (flux, sigma, x, y) [B, K]; ``extra``: further deflection (ax, ay)
    [B, s*s*N*N] on the same planes, or None. The sub-pixel planes are summed in an
    unrolled loop, so ``torch.compile`` emits one pointwise kernel over pixels with no
    intermediate buffers.
    """
    planes = supersample * supersample
    xs, ys = x.reshape(planes, 1, -1), y.reshape(planes, 1, -1)
    total = None
    n = xs.shape[-1]
    for k in range(planes):
        ek = None if extra is None else (extra[0][:, k * n : (k + 1) * n], extra[1][:, k * n : (k + 1) * n])
        sb = lensed_sersic_sb(xs[k], ys[k], lens_coef, src_coef, clumps, ek, pw)
        total = sb if total is None else total + sb
    return (total * (pixscale / supersample) ** 2).reshape(-1, npix, npix)


def magnification_map(lens: dict, npix: int, pixscale: float, dtype=torch.float64) -> torch.Tensor:
    """Signed point magnification 1/det(A) at the pixel centres [B, N, N] for SIE + shear
    parameters ``lens`` (floats or tensors [B]); critical curves are where it changes sign."""
    x, y = pixel_grid(npix, pixscale, 1, dtype)
    args = [torch.as_tensor(lens[k], dtype=dtype).reshape(-1, 1, 1) for k in LABELS[:-1]]
    return lensmod.magnification(x[None], y[None], *args)


def render_sersic(
    lens: dict | None,
    source: dict,
    npix: int,
    pixscale: float,
    supersample: int = 2,
    psf_kernel: torch.Tensor | None = None,
    dtype=torch.float64,
    pw: Pointwise = EAGER,
) -> torch.Tensor:
    """Noiseless image [B, N, N] (e-/s per pixel) of an elliptical Sérsic lensed by SIE + shear.

    ``lens``: ``theta_E, e1, e2, center_x, center_y, gamma1, gamma2`` (floats or tensors [B]);
    ``source``: lenstronomy ``SERSIC_ELLIPSE`` keywords ``amp, R_sersic, n_sersic, e1, e2,
    center_x, center_y``. ``psf_kernel`` [k, k] or [B, k, k] (unit sum) convolves in 'same' mode
    as lenstronomy does. ``lens=None``: the Sérsic seen directly (e.g. the lens light). ``pw``:
    the per-ray functions (:class:`Pointwise`). The building block of the simulator and of
    maximum-likelihood fits.
    """
    if lens is None:
        coef = _source_coefficients(source, dtype)
        B = max(v.shape[0] for v in coef)
        x, y = subpixel_planes(npix, pixscale, supersample, dtype, coef[0].device)
        img = sersic_image(x, y, tuple(t.expand(B, 1) for t in coef), npix, supersample, pixscale, pw)
        return convolve_psf(img, psf_kernel)

    def col(v):
        return torch.as_tensor(v, dtype=dtype).reshape(-1, 1)

    lp = {k: col(lens[k]) for k in LABELS[:-1]}
    lens_coef = lens_coefficients({k: v[:, 0] for k, v in lp.items()})
    src_coef = _source_coefficients(source, dtype)
    B = max(v.shape[0] for v in [*lp.values(), *src_coef])
    x, y = subpixel_planes(npix, pixscale, supersample, dtype, lp["theta_E"].device)
    empty = torch.zeros(B, 0, dtype=dtype, device=x.device)
    lens_coef = tuple(t.expand(B, 1) for t in lens_coef)
    src_coef = tuple(t.expand(B, 1) for t in src_coef)
    img = trace_sersic(
        x.reshape(1, -1), y.reshape(1, -1), lens_coef, src_coef, (empty,) * 4, npix, supersample, pixscale, pw=pw
    )
    return convolve_psf(img, psf_kernel)


def _source_coefficients(source: dict, dtype) -> tuple:
    """(center_x, center_y) + :func:`source.sersic_coefficients`, each [B, 1], from lenstronomy
    ``SERSIC_ELLIPSE`` keywords (floats or tensors [B])."""
    sp = {k: torch.as_tensor(v, dtype=dtype).reshape(-1, 1) for k, v in source.items()}
    return (
        sp["center_x"],
        sp["center_y"],
        *sersic_coefficients(sp["amp"], sp["R_sersic"], sp["n_sersic"], sp["e1"], sp["e2"]),
    )


def convolve_psf(img: torch.Tensor, psf_kernel: torch.Tensor | None) -> torch.Tensor:
    """Images [B, N, N] convolved ('same', as lenstronomy) with a unit-sum kernel [k, k] or
    [B, k, k]; returned unchanged for ``None``."""
    if psf_kernel is None:
        return img
    k = torch.as_tensor(psf_kernel, dtype=img.dtype, device=img.device)
    k = k.expand(img.shape[0], *k.shape[-2:]) if k.dim() == 2 else k
    if k.shape[-1] <= DIRECT_MAX:
        return direct_convolve(img[:, None], k)[:, 0]
    size = fast_fft_size(img.shape[-1] + (k.shape[-1] - 1) // 2)
    return fft_convolve(img[:, None], kernel_rfft(k, size), k.shape[-1], size)[:, 0]
