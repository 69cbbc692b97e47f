"""Source and lens-light surface brightness: elliptical Sérsic, Gaussian clumps, COSMOS bank.

Surface brightness (SB) is in e-/s/arcsec^2, positions in arcsec. Ellipticity follows
lenstronomy: ``R = sqrt(q x'^2 + y'^2 / q)`` in the frame of the major axis (``e1, e2`` as in
:mod:`lensexp.sim.lens`). Sérsic uses lenstronomy's ``SERSIC_ELLIPSE`` with
``b_n = 1.9992 n - 0.3271`` and ``amp`` the SB at ``R_sersic``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lensexp.errors import ConfigError
from lensexp.paths import resolve_path
from lensexp.sim.lens import ellipticity_to_q_cos_sin


def sersic_bn(n):
    """lenstronomy's Sérsic ``b_n`` approximation, ``1.9992 n - 0.3271``."""
    return 1.9992 * n - 0.3271


def sersic_total_flux(amp, R_sersic, n):
    """Total flux [e-/s] of an elliptical Sérsic with SB ``amp`` at ``R_sersic`` [arcsec].

    ``F = 2 pi n amp R^2 exp(b) b^(-2n) Gamma(2n)``; the q-elliptical radius preserves area.
    """
    b = sersic_bn(n)
    return 2 * math.pi * n * amp * R_sersic**2 * torch.exp(b - 2 * n * torch.log(b) + torch.lgamma(2 * n))


def sersic_amp_from_flux(flux, R_sersic, n):
    """Inverse of :func:`sersic_total_flux`: SB at ``R_sersic`` for a total flux [e-/s]."""
    return flux / sersic_total_flux(torch.ones_like(flux), R_sersic, n)


def sersic_coefficients(amp, R_sersic, n, e1, e2):
    """Per-source constants for :func:`sersic_sb_rotated`: (cos, sin, q, 1/q, log amp + b, b,
    0.5/n, -log(R_sersic)/n)."""
    q, c, s, _ = ellipticity_to_q_cos_sin(e1, e2)
    b = sersic_bn(n)
    return c, s, q, 1.0 / q, torch.log(amp) + b, b, 0.5 / n, -torch.log(R_sersic) / n


def sersic_sb_rotated(dx, dy, c, s, q, inv_q, log_amp_b, b, half_inv_n, log_r_n, smoothing=1e-5):
    """Sérsic SB at offsets (dx, dy) [arcsec]; ``amp exp(-b ((R/R_s)^(1/n) - 1))`` written as
    ``exp(log amp + b - b exp(log(R^2)/(2n) - log(R_s)/n))``: one log and two exp per point"""
    xr = c * dx + s * dy
    yr = -s * dx + c * dy
    R2 = (q * xr * xr + inv_q * yr * yr).clamp(min=smoothing * smoothing)
    return torch.exp(log_amp_b - b * torch.exp(torch.log(R2) * half_inv_n + log_r_n))


def gaussian_clumps_sb(x, y, flux, sigma, center_x, center_y):
    """Sum of circular Gaussian clumps: ``flux, sigma, center_*`` are [B, K]; x, y [B, P] or [P].

    Returns SB [e-/s/arcsec^2] [B, P]. The loop over the K clumps is unrolled, so under
    ``torch.compile`` it stays one pointwise kernel.
    """
    inv2s2 = 0.5 / (sigma * sigma)
    norm = flux * inv2s2 / math.pi
    total = 0.0
    for k in range(flux.shape[-1]):
        dx = x - center_x[:, k : k + 1]
        dy = y - center_y[:, k : k + 1]
        total = total + norm[:, k : k + 1] * torch.exp(-(dx * dx + dy * dy) * inv2s2[:, k : k + 1])
    return total


def _galaxy_segment(a: np.ndarray, clip_sigma: float) -> np.ndarray:
    """Boolean mask of the galaxy nearest the stamp centre (see :meth:`GalaxyBank.from_catalog`)."""
    from scipy import ndimage

    if clip_sigma <= 0:
        return np.ones_like(a, dtype=bool)
    sm = ndimage.gaussian_filter(a, 1.0)
    # noise of the smoothed stamp, from its border (COSMOS noise is correlated by drizzling)
    sb = np.concatenate([sm[0], sm[-1], sm[:, 0], sm[:, -1]])
    noise = 1.4826 * np.median(np.abs(sb - np.median(sb)))
    det = sm > np.median(sb) + clip_sigma * noise
    lab, nlab = ndimage.label(det)
    if nlab == 0:
        return np.ones_like(a, dtype=bool)
    cy, cx = (np.array(a.shape) - 1) / 2
    yy, xx = np.nonzero(lab)
    near = lab[yy, xx][np.argmin((yy - cy) ** 2 + (xx - cx) ** 2)]
    return ndimage.binary_dilation(lab == near, iterations=2)


@dataclass
class GalaxyBank:
    """Real galaxy images, padded to a common square, each normalised to unit total flux.

    ``images``: [G, S, S] float32 (row = y, col = x), ``pixscale``: [G] arcsec per pixel of each
    stamp (galaxies larger than the stamp are binned down by an integer factor to fit whole),
    ``ids``: catalogue identifiers.
    """

    images: torch.Tensor
    pixscale: torch.Tensor
    ids: list

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def from_catalog(
        cls, catalog: str, max_galaxies: int | None = None, stamp: int = 128, clip_sigma: float = 3.0
    ) -> GalaxyBank:
        """Load a GalSim ``RealGalaxyCatalog`` (catalogue FITS + image FITS beside it).

        Each stamp has its border median subtracted and is cut out from its own noise: pixels
        outside the central galaxy's segment (the connected region where the image smoothed by a
        1-px Gaussian exceeds ``clip_sigma`` times its noise, grown by 2 px) are set to zero, so
        that lensing magnifies the galaxy and not the COSMOS sky noise. The segment is centred on
        a ``stamp``-pixel square, binned down by an integer factor when larger (its pixel scale
        grows accordingly), and normalised to unit sum. The catalogue's PSF images
        are not needed (sources stay convolved with the HST PSF, small next to simulated PSFs).
        """
        import galsim

        path = resolve_path(catalog)
        if not path.is_file():
            raise ConfigError(
                f"COSMOS catalogue not found: '{catalog}'. Point data.source.cosmos.catalog at a "
                "GalSim RealGalaxyCatalog FITS (the full one comes from `galsim_download_cosmos`; "
                "a 10-galaxy sample is in ../shared/data/cosmos_sample), or use data.source.kind=sersic."
            )
        try:
            cat = galsim.RealGalaxyCatalog(path.name, dir=str(path.parent))
        except Exception as exc:  # noqa: BLE001 - galsim raises many types
            raise ConfigError(f"cannot read COSMOS catalogue '{path}': {exc}") from exc
        n = cat.nobjects if max_galaxies is None else min(cat.nobjects, int(max_galaxies))
        out, ids, scales = np.zeros((n, stamp, stamp), np.float32), [], []
        for i in range(n):
            im = cat.getGalImage(i)
            a = np.asarray(im.array, dtype=np.float64)
            border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
            a = a - np.median(border)
            seg = _galaxy_segment(a, clip_sigma)
            a = a * seg
            # crop to the galaxy's segment, bin down if it does not fit the stamp
            yy, xx = np.nonzero(seg) if seg.any() else np.nonzero(np.ones_like(seg))
            a = a[yy.min() : yy.max() + 1, xx.min() : xx.max() + 1]
            f = int(np.ceil(max(a.shape) / stamp))
            if f > 1:
                a = np.pad(a, ((0, -a.shape[0] % f), (0, -a.shape[1] % f)))
                a = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f).sum((1, 3))
            scales.append(float(im.scale) * f)
            h, w = a.shape
            # centre crop / pad onto the common stamp
            y0, x0 = max(0, (h - stamp) // 2), max(0, (w - stamp) // 2)
            a = a[y0 : y0 + stamp, x0 : x0 + stamp]
            h, w = a.shape
            oy, ox = (stamp - h) // 2, (stamp - w) // 2
            out[i, oy : oy + h, ox : ox + w] = a
            total = out[i].sum()
            if not np.isfinite(total) or total <= 0:
                raise ConfigError(f"COSMOS galaxy {i} in '{path}' has no positive flux")
            out[i] /= total
            ids.append(int(cat.ident[i]) if hasattr(cat, "ident") else i)
        return cls(torch.from_numpy(out), torch.tensor(scales, dtype=torch.float64), ids)

    def grid_coefficients(self, index, center_x, center_y, angle_cos, angle_sin, flip, scale):
        """Per-image constants of :func:`source_plane_grid`, each [B, 1]: centre (arcsec),
        rotation (cos, sin), mirror sign, and the inverse half-width of the stamp (1/arcsec).

        Per image: galaxy ``index`` [B], centre [B], rotation (cos, sin) [B], mirror ``flip`` [B]
        bool, size ``scale`` [B] (multiplies the bank pixel scale).
        """
        pix = self.pixscale.to(device=center_x.device, dtype=center_x.dtype)[index] * scale
        half = self.images.shape[-1] * pix / 2.0
        sign = torch.where(flip, -1.0, 1.0).to(center_x.dtype)
        return tuple(t[:, None] for t in (center_x, center_y, angle_cos, angle_sin, sign, 1.0 / half))

    def sample_grid(self, grid, index, scale, flux, mode: str = "bilinear"):
        """SB [e-/s/arcsec^2] [B, P] of bank galaxies ``index`` [B] at a :func:`source_plane_grid`
        ``grid`` [B, P, 2], for size ``scale`` [B] and total ``flux`` [B] e-/s. Sampling is
        bilinear or bicubic (``torch.nn.functional.grid_sample``), zero outside the stamp."""
        imgs = self.images.to(device=grid.device, dtype=grid.dtype)[index].unsqueeze(1)  # [B,1,S,S]
        pix = self.pixscale.to(device=grid.device, dtype=grid.dtype)[index] * scale  # arcsec / px
        val = F.grid_sample(imgs, grid.unsqueeze(1), mode=mode, padding_mode="zeros", align_corners=False)
        return val[:, 0, 0, :] * (flux / (pix * pix))[:, None]

    def sample_rows(self, grid, b, index, scale, flux, mode: str = "bilinear"):
        """As :meth:`sample_grid`, for rows of points of different images: SB [M, P] at ``grid``
        [M, P, 2], row m from image ``b[m]`` (ascending) of images with galaxies ``index``, size
        ``scale`` and flux ``flux`` [B']; one ``grid_sample`` per image (measured: 3 ns a point,
        against ~30-50 for one call on the bank as a volume or for compiled gathers)."""
        imgs = self.images.to(device=grid.device, dtype=grid.dtype)
        pix = self.pixscale.to(device=grid.device, dtype=grid.dtype)[index] * scale
        norm = (flux / (pix * pix)).tolist()
        out = torch.empty(grid.shape[:2], dtype=grid.dtype, device=grid.device)
        start = 0
        for j, (g, n) in enumerate(zip(index.tolist(), torch.bincount(b, minlength=len(norm)).tolist())):
            if n:
                pts = grid[start : start + n].reshape(1, 1, -1, 2)
                val = F.grid_sample(imgs[g][None, None], pts, mode=mode, padding_mode="zeros", align_corners=False)
                out[start : start + n] = val.reshape(n, -1) * norm[j]
                start += n
        return out


def source_plane_grid(x, y, coef):
    """``grid_sample`` coordinates [B, P, 2] (stamp at [-1, 1]) of source-plane positions x, y
    [B, P] (arcsec) for :meth:`GalaxyBank.grid_coefficients` ``coef``; pure, so ``torch.compile``
    fuses it with the ray shooting into one kernel."""
    cx, cy, c, s, sign, inv_half = coef
    dx, dy = x - cx, y - cy
    u = sign * (c * dx + s * dy)
    v = -s * dx + c * dy
    return torch.stack([u * inv_half, v * inv_half], dim=-1)
