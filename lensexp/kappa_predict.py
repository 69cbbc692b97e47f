"""Density maps from images: what ``python -m lensexp.predict ... kappa_out=MAPS`` does with a
``task: kappa`` checkpoint.

Per lens, ``n_mc`` MC-dropout passes each widened by its per-pixel aleatoric sigma give samples
of the convergence map on the network's grid; ``MAPS/<name>.fits`` holds their mean (float32
[npix, npix], header ``PIXSCALE`` [arcsec/px]) and ``MAPS/<name>_std.fits`` their standard
deviation. The CSV row summarises the map: the Einstein radius where the mean convergence inside
equals 1 (:func:`lensexp.kappa_maps.einstein_radius`) with its spread and central intervals over
the samples, the map's centre (its peak, in the file's own centred frame) and the mean per-pixel
std in the 0.3-2" annulus.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lensexp import kappa_maps
from lensexp.errors import ConfigError
from lensexp.files import temp_path
from lensexp.metrics import LEVELS

COLUMNS = [
    "name",
    "theta_E",
    "theta_E_std",
    "theta_E_lo68",
    "theta_E_hi68",
    "theta_E_lo95",
    "theta_E_hi95",
    "center_x",
    "center_y",
    "kappa_std_annulus",
]
FITS_SUFFIXES = (".fits.gz", ".fits", ".fit", ".fts")
INTERVAL_LEVELS = LEVELS[:2]  # 0.683 and 0.955: the theta_E_lo68/hi68 and lo95/hi95 columns


def map_stem(name: str) -> str:
    """File stem of a lens's maps: the row's name without a FITS suffix."""
    for suf in FITS_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


class KappaPredictor:
    """A density-map checkpoint ready to analyse images (same interface as
    :class:`lensexp.predict.Predictor`: ``npix``, ``pixscale``, ``in_chans``, ``columns``, ``rows``)."""

    def __init__(self, module, npix: int, pixscale: float, n_mc: int = 8, per_pass: int = 4, kappa_out=None):
        self.module, self.npix, self.pixscale = module, int(npix), float(pixscale)
        self.n_mc, self.per_pass = int(n_mc), int(per_pass)
        self.in_chans = module.in_chans
        self.columns = list(COLUMNS)
        self.out = Path(kappa_out) if kappa_out else None
        if self.out is not None:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"kappa_out '{self.out}' is not a writable folder: {exc.strerror or exc}") from None

    @torch.no_grad()
    def samples(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple:
        """(convergence samples [n_mc * per_pass, B, npix, npix], posterior mean map [B, npix, npix])
        for images [B, C, npix, npix]."""
        dev = next(self.module.parameters()).device
        images = images.to(dev)
        passes = self.module.predict_mc(images, self.n_mc)
        samples, mean = self.module.centred(images, passes, self.module.map_samples(passes, self.per_pass, generator))
        return samples.cpu(), mean.cpu()

    def summarise(self, samples: torch.Tensor, mean: torch.Tensor) -> dict:
        """Mean and std maps [B, N, N] and the Einstein-radius summaries of map samples."""
        std = samples.std(0)
        centre = kappa_maps.peak_centre(mean, self.pixscale)
        S, B = samples.shape[:2]
        radii = kappa_maps.einstein_radius(
            samples.reshape(S * B, *samples.shape[2:]), self.pixscale, centre.repeat(S, 1)
        ).reshape(S, B)
        ring = kappa_maps.annulus_mask(self.npix, self.pixscale)
        # central 68.3 / 95.5 % intervals (lo, hi per level), NaN radii left out
        qs = torch.tensor([(1 + sign * c) / 2 for c in INTERVAL_LEVELS for sign in (-1, 1)], dtype=radii.dtype)
        return {
            "mean": mean,
            "std": std,
            "centre": centre,
            "theta_E": kappa_maps.einstein_radius(mean, self.pixscale, centre),
            "theta_E_std": torch.from_numpy(np.nanstd(radii.numpy(), 0)),
            "theta_E_q": torch.from_numpy(np.nanquantile(radii.numpy(), qs.numpy(), 0)) if S > 1 else None,
            "kappa_std_annulus": std[:, ring].mean(-1),
        }

    def rows(self, names, images: torch.Tensor, offsets, generator=None) -> list[dict]:
        """CSV rows for a batch (and, with ``kappa_out``, the two FITS maps of each lens)."""
        res = self.summarise(*self.samples(images, generator))
        rows = []
        for i, name in enumerate(names):
            dx, dy = (float(v) for v in (offsets[i] if offsets is not None else (0.0, 0.0)))
            q = res["theta_E_q"]
            lo68, hi68, lo95, hi95 = (float(q[j, i]) for j in range(4)) if q is not None else (float("nan"),) * 4
            rows.append(
                {
                    "name": name,
                    "theta_E": float(res["theta_E"][i]),
                    "theta_E_std": float(res["theta_E_std"][i]),
                    "theta_E_lo68": lo68,
                    "theta_E_hi68": hi68,
                    "theta_E_lo95": lo95,
                    "theta_E_hi95": hi95,
                    "center_x": float(res["centre"][i, 0]) + dx,
                    "center_y": float(res["centre"][i, 1]) + dy,
                    "kappa_std_annulus": float(res["kappa_std_annulus"][i]),
                }
            )
            if self.out is not None:
                self.write_maps(name, res["mean"][i], res["std"][i], (dx, dy))
        return rows

    def write_maps(self, name: str, mean: torch.Tensor, std: torch.Tensor, offset=(0.0, 0.0)) -> None:
        """``<out>/<stem>.fits`` (mean kappa) and ``<stem>_std.fits``, each written atomically."""
        import os

        from astropy.io import fits

        stem = map_stem(name)
        for suffix, arr, what in (("", mean, "mean convergence"), ("_std", std, "convergence std")):
            hdu = fits.PrimaryHDU(arr.numpy().astype(np.float32))
            h = hdu.header
            h["PIXSCALE"] = (self.pixscale, "arcsec / pixel")
            h["BUNIT"] = ("convergence", what)
            h["XOFFSET"] = (float(offset[0]), "arcsec, map centre x in the file centred frame")
            h["YOFFSET"] = (float(offset[1]), "arcsec, map centre y in the file centred frame")
            h["NMC"] = (self.n_mc, "MC-dropout passes")
            h["SOURCE"] = (name[:60], "input lens")
            path = self.out / f"{stem}{suffix}.fits"
            tmp = temp_path(path)
            try:
                hdu.writeto(tmp, overwrite=True)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
