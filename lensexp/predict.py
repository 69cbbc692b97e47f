"""Prediction on FITS images: ``python -m lensexp.predict ckpt=CKPT input=PATH out=preds.csv n_mc=32``.

Reads one FITS file, a folder of them (one lens per file: a 2-D image, or a (2, H, W) cube
cleaned of lens light by ICA with ``ica=true``) or a folder of lens folders
(``<name>/image.fits`` + optional ``mask.fits``, ...; :mod:`lensexp.inputs`), validated by the
same path as ``fit``, streams them in batches (never all in memory),
runs ``n_mc`` MC-dropout passes each widened by its aleatoric sigma, applies the spread
recalibration saved by ``calibrate`` (``calibration.json`` beside the checkpoint) and writes one
CSV row per file: ``name`` and, per label ``p``: ``p, p_std, p_lo68, p_hi68, p_lo95, p_hi95,
p_lo997, p_hi997`` (posterior mean, std, central 68.3/95.5/99.7 % intervals). Files that cannot
be analysed go to ``<out>.errors.csv`` with the reason; the run continues.

Every file needs a pixel scale (``PIXSCALE``, a celestial WCS, or ``pixscale=`` for files
without one; ``pixscale=`` never changes the network's grid). Images at another scale are
resampled to the network's (flux-conserving; :func:`lensexp.inputs.to_grid`, logged), then
centre-cropped or zero-padded; the centre columns are given in the file's own centred frame.
Flux units do not matter (per-image normalisation). When no file could be used the run exits
with an error after writing the errors file. Optional circular masks (radius ~0.2") on the lens centre and on bright
cosmic rays, or a mask FITS (nonzero = masked), as Hezaveh et al. 2017 did for real HST data.
"""

from __future__ import annotations

import csv
from dataclasses import replace
import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from lensexp import metrics
from lensexp.recalibrate import image_snr
from lensexp.errors import ConfigError
from lensexp.files import check_writable, clean_stale, temp_path
from lensexp.inputs import LensFiles, list_inputs, load, psf_to_scale, to_grid
from lensexp.io import BadInput, stamp_mask
from lensexp.runtime import resolve_device, set_threads

log = logging.getLogger("lensexp.predict")
LEVEL_TAGS = {0.683: "68", 0.955: "95", 0.997: "997"}


def csv_columns(labels) -> list[str]:
    cols = ["name"]
    for p in labels:
        cols += [p, f"{p}_std"] + [f"{p}_{side}{t}" for t in LEVEL_TAGS.values() for side in ("lo", "hi")]
    return cols


class Predictor:
    """A checkpoint ready to analyse images: grid, calibration and MC settings."""

    def __init__(
        self,
        ckpt: str,
        device: str = "cpu",
        n_mc: int = 32,
        n_samples: int = 1024,
        seed: int = 0,
        calibration: str | None = "auto",
        npix: int | None = None,
        pixscale: float | None = None,
    ):
        from lensexp.calibrate import CAL_FILE, read_calibration
        from lensexp.checkpoints import load_module, resolve_ckpt, run_config

        ckpt = resolve_ckpt(ckpt)
        self.module = load_module(ckpt, device)
        info = self.module.hparams.get("data_info")
        if info is None:  # older checkpoints: the run's config
            rc = run_config(ckpt)
            info = {"npix": int(rc.data.npix), "pixscale": float(rc.data.pixscale)} if rc is not None else {}
        self.npix = int(npix or info.get("npix") or 0)
        self.pixscale = float(pixscale or info.get("pixscale") or 0)
        if not self.npix or not self.pixscale:
            raise ConfigError("the checkpoint does not record its grid: give npix= and pixscale= (arcsec/px)")
        self.n_mc, self.n_samples, self.seed, self.device = int(n_mc), int(n_samples), int(seed), device
        self.labels = list(getattr(self.module, "labels", []))  # none for density-map checkpoints
        self.columns = csv_columns(self.labels)
        self.calibration = None
        cal_path = (
            Path(ckpt).parent / CAL_FILE if calibration == "auto" else (Path(calibration) if calibration else None)
        )
        if not self.labels:  # density maps: no label recalibration
            pass
        elif cal_path is not None and cal_path.is_file():
            self.calibration = read_calibration(cal_path, self.labels)
        elif calibration not in ("auto", None, "none"):
            raise ConfigError(f"calibration file not found: '{calibration}'")

    @property
    def psf_input(self) -> bool:
        """Whether the network takes each lens's PSF (``model.psf_input``)."""
        return bool(getattr(self.module, "psf_input", False))

    @torch.no_grad()
    def posterior(self, images: torch.Tensor, generator: torch.Generator | None = None, psf_ee=None) -> torch.Tensor:
        """Recalibrated posterior samples [n_samples, B, labels] (physical units) for images
        [B, C, npix, npix] in any flux unit; ``psf_ee`` [B, R]: their PSFs' encircled energy for
        a ``psf_input`` network (:meth:`psf_description`; None or NaN rows: unknown)."""
        g = generator or torch.Generator().manual_seed(self.seed)
        samples, centre = self.module.posterior(images.to(self.device), self.n_mc, self.n_samples, g, psf_ee=psf_ee)
        if self.calibration is not None:
            snr = image_snr(images) if self.calibration.method != "global" else None
            samples = self.calibration.apply(samples, centre, snr)
        return self.module.from_net(samples.to(self.module.device)).cpu()

    def psf_description(self, psf: np.ndarray | None, scale: float) -> np.ndarray:
        """[R] encircled energy of a PSF given at ``scale`` arcsec/px, taken on the network's
        grid (:func:`lensexp.inputs.psf_to_scale`) as the training kernels are; NaN when unknown."""
        from lensexp.sim.psf import EE_RADII, encircled_energy

        if psf is None:
            return np.full(len(EE_RADII), np.nan, np.float32)
        return encircled_energy(psf_to_scale(psf, scale, self.pixscale), self.pixscale).numpy().astype(np.float32)

    def predict_arrays(self, images: torch.Tensor, generator: torch.Generator | None = None, psf_ee=None) -> dict:
        """Posterior summaries (mean, std, central intervals) of :meth:`posterior`."""
        phys = self.posterior(images, generator, psf_ee)
        return {"mean": phys.mean(0), "std": phys.std(0), "intervals": metrics.central_intervals(phys)}

    def rows(self, names, images: torch.Tensor, offsets=None, generator=None, psf_ee=None) -> list[dict]:
        """CSV rows (``columns``) for a batch of images on the network's grid."""
        return _rows(names, self.predict_arrays(images, generator, psf_ee), self.labels, offsets)


def _rows(names, res, labels, offsets=None) -> list[dict]:
    """CSV rows; ``offsets`` [(dx, dy)] arcsec move the centre columns into each file's frame."""
    rows = []
    for i, name in enumerate(names):
        row = {"name": name}
        for j, p in enumerate(labels):
            shift = 0.0
            if offsets is not None and p in ("center_x", "center_y"):
                shift = float(offsets[i][0 if p == "center_x" else 1])
            row[p] = float(res["mean"][i, j]) + shift
            row[f"{p}_std"] = float(res["std"][i, j])
            for c, t in LEVEL_TAGS.items():
                lo, hi = res["intervals"][c]
                row[f"{p}_lo{t}"], row[f"{p}_hi{t}"] = float(lo[i, j]) + shift, float(hi[i, j]) + shift
        rows.append(row)
    return rows


def ica_png(cube: np.ndarray, source: np.ndarray, path: Path) -> None:
    """Before/after picture of ICA lens-light removal: both bands and the cleaned source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, im, title in zip(axes, (cube[0], cube[1], source), ("band 1 (red)", "band 2 (blue)", "source (ICA)")):
        s = max(float(np.percentile(np.abs(im), 99.5)), 1e-12)
        ax.imshow(np.arcsinh(im / (0.05 * s)), origin="lower", cmap="magma")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def prepare(lens: LensFiles, pred: Predictor, cfg: DictConfig) -> tuple[np.ndarray, tuple, np.ndarray]:
    """One lens -> (model input [C, npix, npix], centre offset (dx, dy) arcsec, PSF description
    [R]: NaN unless the network takes the PSF and the lens has one) through the shared validation
    (:func:`lensexp.inputs.load`: the lens folder's ``psf.fits`` or the file's ``PSF`` extension),
    ICA, resampling to the network's grid and masks; or :class:`BadInput`."""
    wants_psf = getattr(pred, "psf_input", False)  # density-map predictors have no PSF input
    data = load(lens, None if cfg.pixscale is None else float(cfg.pixscale), extensions=("PSF",) if wants_psf else ())
    ee = pred.psf_description(data.psf, data.pixscale) if wants_psf else None
    if cfg.ica:
        from lensexp.ica import cube_source

        cube = data.image
        src = cube_source(np.nan_to_num(cube), lens.name, int(cfg.seed))
        data = replace(data, image=src[None])
        if cfg.save_cleaned:
            from astropy.io import fits

            out = Path(cfg.save_cleaned)
            out.mkdir(parents=True, exist_ok=True)
            stem = lens.name.split(".")[0]
            fits.PrimaryHDU(src).writeto(out / f"{stem}.fits", overwrite=True)
            ica_png(cube, src, out / f"{stem}_ica.png")
    return (*network_input(data, pred, cfg.masks), ee)


def network_input(data, pred: Predictor, masks) -> tuple[np.ndarray, tuple]:
    """A validated lens (:class:`~lensexp.inputs.LensData`) on the network's grid with masks
    applied: (image [C, npix, npix], centre offset (dx, dy) arcsec), or :class:`BadInput`."""
    if data.image.shape[0] != pred.module.in_chans:
        raise BadInput(f"{data.name}: {data.image.shape[0]} band(s) but the model takes {pred.module.in_chans}")
    grid = to_grid(data, pred.npix, pred.pixscale)
    img = grid.image
    img[:, stamp_mask(img, pred.pixscale, masks) | grid.bad] = 0.0
    if not np.abs(img).max() > 0:
        raise BadInput(f"{data.name}: no usable pixel inside the network's {pred.npix}x{pred.npix} field")
    return img, grid.offset


def run(cfg: DictConfig) -> dict:
    """Predict every lens of ``cfg.input`` into ``cfg.out`` (CSV) and ``<out>.errors.csv``."""
    from tqdm import tqdm

    out = Path(cfg.out)
    err_path = out.with_name(out.stem + ".errors.csv")
    check_writable(out, err_path)
    clean_stale(out.parent, (out.name, err_path.name))
    set_threads()
    device = resolve_device(cfg.device)
    torch.manual_seed(int(cfg.seed))
    pred = Predictor(
        str(cfg.ckpt),
        device,
        int(cfg.n_mc),
        int(cfg.n_samples),
        int(cfg.seed),
        None if cfg.calibration == "none" else str(cfg.calibration),
        cfg.npix,
        cfg.model_pixscale,
    )
    kappa_out = cfg.get("kappa_out")
    if pred.module.hparams.get("task") == "kappa":
        from lensexp.kappa_predict import KappaPredictor

        pred = KappaPredictor(pred.module, pred.npix, pred.pixscale, int(cfg.n_mc), kappa_out=kappa_out)
    elif kappa_out:
        raise ConfigError(f"kappa_out= needs a density-map checkpoint (task=kappa); '{cfg.ckpt}' predicts the labels")
    files = list_inputs(cfg.input)
    tmp, tmp_err = temp_path(out), temp_path(err_path)
    g = torch.Generator().manual_seed(int(cfg.seed))
    n_ok, errors = 0, []
    try:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=pred.columns)
            w.writeheader()
            batch, names, offsets, psfs = [], [], [], []
            bs, n_no_psf = int(cfg.batch_size), 0
            for i, f in enumerate(tqdm(files, unit="lens", disable=not cfg.progress)):
                try:
                    img, off, ee = prepare(f, pred, cfg)
                    batch.append(img)
                    names.append(f.name)
                    offsets.append(off)
                    psfs.append(ee)
                    n_no_psf += ee is not None and bool(np.isnan(ee).any())
                except BadInput as exc:
                    errors.append({"name": f.name, "error": str(exc)})
                    log.warning("skipped %s", exc)
                if len(batch) == bs or (i == len(files) - 1 and batch):
                    psf = {"psf_ee": torch.from_numpy(np.stack(psfs))} if psfs[0] is not None else {}
                    w.writerows(pred.rows(names, torch.from_numpy(np.stack(batch)), offsets, g, **psf))
                    n_ok += len(names)
                    batch, names, offsets, psfs = [], [], [], []
            if n_no_psf:
                log.warning(
                    "%d lens(es) without a PSF (no psf.fits, no PSF extension): the network was told 'unknown PSF'",
                    n_no_psf,
                )
        with open(tmp_err, "w", newline="") as fh:
            ew = csv.DictWriter(fh, fieldnames=["name", "error"])
            ew.writeheader()
            ew.writerows(errors)
        os.replace(tmp_err, err_path)
        if n_ok == 0:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"no usable input: all {len(files)} file(s) were rejected (reasons in {err_path})")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_err.unlink(missing_ok=True)
        raise
    print(f"wrote {out} ({n_ok} lenses) and {err_path} ({len(errors)} skipped)")
    return {"n": n_ok, "errors": errors}


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors

    hydra.main(config_path="../conf", config_name="predict", version_base="1.3")(clean_errors(run))()
