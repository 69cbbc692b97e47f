"""The fit's workflow: settings, batches of files, resumable CSV rows, plots."""

from __future__ import annotations

import csv
import logging
import os
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lensexp.errors import ConfigError
from lensexp.fit import kernels
from lensexp.fit.data import Loader
from lensexp.fit.light import LIGHT_START_VARIANTS
from lensexp.fit.model import MASS, LensModel, Observation, ParamSpace, amp_names
from lensexp.fit.optimise import FitSettings, fit_batch
from lensexp.fit.plots import fit_figure
from lensexp.fit.results import columns, result_row, warn_at_edge, warn_off_light, warn_source_shift
from lensexp.fit.starts import starts_for
from lensexp.files import check_writable, clean_stale, temp_path
from lensexp.inputs import list_inputs
from lensexp.io import BadInput, read_table
from lensexp.paths import resolve_path
from lensexp.runtime import resolve_device, set_threads

log = logging.getLogger("lensexp.fit")
INITS = ("prior", "cnn", "truth")


def read_truth(path: str | Path) -> dict:
    """Truth mass parameters [7] by file name from a ``truth.csv``."""
    rows = read_table(path, "truth file")
    missing = [k for k in MASS if rows and k not in next(iter(rows.values()))]
    if not rows or missing:
        raise ConfigError(f"truth file '{path}' needs columns name and {', '.join(MASS)}; missing {missing}")
    return {n: [r[k] for k in MASS] for n, r in rows.items()}


# ---------------------------------------------------------------------------- entry point
# search budget by default: real galaxies (lens_light=true) leave many local optima (16 SLACS files,
# two seeds: 16 starts / 3 polished reached the best -ln posterior of four runs on 11-12 lenses, 8 / 2 on 5-9)
SEARCH = {"n_starts": (8, 16), "lbfgs.polish": (2, 3)}  # (without, with lens light)


# shapelet source order with lens light (real galaxies): on the 16 SLACS development files the BIC kept
# them for 13 (-ln L better by 171-16 675), worst theta_E error 19.9 -> 10.5 %, +11 s/lens
SHAPELETS_WITH_LIGHT = 6


def resolve_search(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with ``n_starts`` and ``lbfgs.polish`` filled in where they are null
    (:data:`SEARCH`: more with ``lens_light``) and ``source_shapelets=auto`` resolved
    (:data:`SHAPELETS_WITH_LIGHT` with ``lens_light``, else none); given values are kept."""
    cfg = cfg.copy()
    for key, (plain, with_light) in SEARCH.items():
        if OmegaConf.select(cfg, key) is None:
            OmegaConf.update(cfg, key, with_light if cfg.lens_light else plain)
    if str(cfg.source_shapelets) == "auto":
        cfg.source_shapelets = SHAPELETS_WITH_LIGHT if cfg.lens_light else None
    if str(cfg.mass_model) == "auto":  # real ellipticals: the published SLACS models are SIEs (Bolton et al. 2008)
        cfg.mass_model = "sie" if cfg.lens_light else "sie_shear"
    return cfg


def check_config(cfg: DictConfig) -> None:
    if str(cfg.init) not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got '{cfg.init}'")
    if cfg.init == "cnn" and not cfg.ckpt:
        raise ConfigError("init=cnn needs ckpt=CHECKPOINT (a trained lensexp model)")
    if cfg.init == "truth" and not cfg.truth:
        raise ConfigError("init=truth needs truth=TRUTH_CSV (e.g. from lensexp.simulate format=fits)")
    ints = (
        ("n_starts", 1),
        ("batch_size", 1),
        ("adam.steps", 0),
        ("adam.source_steps", 0),
        ("lbfgs.iters", 1),
        ("lbfgs.polish", 1),
        ("lbfgs.sie_candidates", 1),
        ("lbfgs.irls_rounds", 1),
        ("lbfgs.light_iters", 0),
        ("lbfgs.light_screen_iters", 0),
        ("adam.light_steps", 0),
        ("adam.light_starts", 1),
        ("max_npix", 16),
    )
    for key, lo in ints:
        v = OmegaConf.select(cfg, key)
        if int(v) < lo:
            raise ConfigError(f"{key} must be >= {lo}, got {v}")
    if cfg.psf and not resolve_path(cfg.psf).is_file():
        raise ConfigError(f"psf file not found: '{cfg.psf}'")
    if cfg.psf_fwhm is not None and not float(cfg.psf_fwhm) > 0:
        raise ConfigError(f"psf_fwhm must be > 0 arcsec, got {cfg.psf_fwhm}")
    if int(cfg.adam.light_starts) > len(LIGHT_START_VARIANTS):
        raise ConfigError(f"adam.light_starts must be 1-{len(LIGHT_START_VARIANTS)}, got {cfg.adam.light_starts}")
    if int(cfg.source_components) not in (1, 2):
        raise ConfigError(f"source_components must be 1 or 2, got {cfg.source_components}")
    if int(cfg.lens_light_components) not in (1, 2, 3):
        raise ConfigError(f"lens_light_components must be 1, 2 or 3, got {cfg.lens_light_components}")
    sh = cfg.source_shapelets
    # order >= 1: sh_n_max = 0 in the table means "not kept", so an order of 0 would read as never kept
    if sh is not None and not (isinstance(sh, int) and not isinstance(sh, bool) and 1 <= sh <= 12):
        raise ConfigError(f"source_shapelets must be auto, null (none) or an order n_max in 1-12, got {sh}")
    px_n = cfg.source_pixels
    if px_n is not None and not (isinstance(px_n, int) and not isinstance(px_n, bool) and 4 <= px_n <= 60):
        raise ConfigError(f"source_pixels must be null (none) or nodes per side in 4-60, got {px_n}")
    if str(cfg.pixelated_when) not in ("warned", "always"):
        raise ConfigError(f"pixelated_when must be warned or always, got '{cfg.pixelated_when}'")
    pt = cfg.positions_threshold
    if pt is not None and not (isinstance(pt, (int, float)) and not isinstance(pt, bool) and pt > 0):
        raise ConfigError(f"positions_threshold must be null (off) or a positive number of arcsec, got {pt}")
    if int(cfg.companions) not in (0, 1, 2):
        raise ConfigError(f"companions must be 0, 1 or 2, got {cfg.companions}")
    if int(cfg.companions) and not (cfg.lens_light and int(cfg.adam.light_steps) > 0):
        raise ConfigError(
            "companions > 0 needs lens_light=true and adam.light_steps > 0: companions start on the "
            "residual of the light-only fit"
        )
    if cfg.adam.supersample is not None and int(cfg.adam.supersample) < 0:  # 0 / null: the model's supersampling
        raise ConfigError(f"adam.supersample must be >= 0, got {cfg.adam.supersample}")
    if cfg.adam.half_width is not None and not float(cfg.adam.half_width) > 0:
        raise ConfigError(f"adam.half_width must be > 0 arcsec (or null: the whole image), got {cfg.adam.half_width}")
    if str(cfg.mass_model) not in ("auto", "sie", "sie_shear"):
        raise ConfigError(f"mass_model must be auto, sie or sie_shear, got '{cfg.mass_model}'")
    if cfg.shear_max is not None and not 0 < float(cfg.shear_max) <= 0.5:
        raise ConfigError(f"shear_max must be in (0, 0.5], got {cfg.shear_max}")
    if cfg.theta_E_range is not None:
        r = list(cfg.theta_E_range)
        if len(r) != 2 or not 0 < float(r[0]) < float(r[1]):
            raise ConfigError(f"theta_E_range must be [low, high] arcsec with 0 < low < high, got {r}")
    if cfg.source_R_max is not None and not float(cfg.source_R_max) > 0:
        raise ConfigError(f"source_R_max must be > 0 arcsec (or null: no bound), got {cfg.source_R_max}")
    if cfg.center_prior is not None and not float(cfg.center_prior) > 0:
        raise ConfigError(f"center_prior must be > 0 arcsec (or null: no prior), got {cfg.center_prior}")
    if cfg.supersample is not None and int(cfg.supersample) < 1:
        raise ConfigError(f"supersample must be >= 1, got {cfg.supersample}")
    kernels.resolve(cfg.compile, "cpu")  # true | false | auto, else one clear message
    for key in ("dtype", "adam.dtype"):
        if str(OmegaConf.select(cfg, key)) not in ("float32", "float64"):
            raise ConfigError(f"{key} must be float32 or float64, got '{OmegaConf.select(cfg, key)}'")


def run(cfg: DictConfig) -> dict:
    """Fit every file of ``cfg.input``; rows to ``cfg.out`` (resumable), failures to ``<out>.errors.csv``."""
    from tqdm import tqdm

    cfg = resolve_search(cfg)
    check_config(cfg)
    out = Path(cfg.out)
    partial = out.with_name(out.name + ".partial")
    err_path = out.with_name(out.stem + ".errors.csv")
    check_writable(out, partial, err_path)
    clean_stale(out.parent, (err_path.name,))
    files = list_inputs(cfg.input)
    set_threads()
    torch.set_flush_denormal(True)
    dtype = getattr(torch, str(cfg.dtype))
    device = resolve_device(cfg.device)
    pred = None
    if cfg.init == "cnn":
        from lensexp.predict import Predictor

        pred = Predictor(str(cfg.ckpt), device, int(cfg.n_mc), max(int(cfg.n_starts), 1024), int(cfg.seed))
        if not pred.labels:
            raise ConfigError(
                f"init=cnn needs a network that predicts the lens parameters; '{cfg.ckpt}' is a "
                "density-map checkpoint (task=kappa): use init=prior, or a checkpoint from task=params"
            )
    truth = read_truth(cfg.truth) if cfg.init == "truth" else None
    loader = Loader(cfg, int(cfg.npix) if cfg.npix else None)
    ss = int(cfg.supersample or cfg.data.supersample)
    lens_light = int(cfg.lens_light_components) if cfg.lens_light else 0
    n_comp = int(cfg.companions)
    fs = fit_settings(cfg, lens_light)
    n_src, sh = int(cfg.source_components), fs.shapelets is not None
    cols = columns(lens_light, fs.laplace, n_src, n_comp, sh, bool(fs.pixels))
    done = _resume(partial, cols) if cfg.resume else set()
    if not cfg.resume:
        partial.unlink(missing_ok=True)
    # batches are fixed chunks of the input list, written whole: a resumed run fits the same batches
    bs = int(cfg.batch_size)
    starts = range(0, len(files), bs)
    chunks = [[(i, f) for i, f in enumerate(files[c : c + bs], c) if f.name not in done] for c in starts]
    chunks = [c for c in chunks if c]
    errors, n_ok = [], len(done)
    bar = tqdm(total=sum(map(len, chunks)), unit="lens", disable=not cfg.progress, desc=f"fit ({cfg.init})")
    for chunk in chunks:
        group = []
        for i, f in chunk:
            try:
                item = loader(f)
                if pred is not None:
                    item["cnn"], item["cnn_offset"] = _network_input(item, pred, cfg)
                    item["cnn_psf"] = pred.psf_description(item["psf"], item["scale"])
                if truth is not None and f.name not in truth:
                    raise BadInput(f"{f.name}: not in the truth file {cfg.truth}")
                group.append({**item, "name": f.name, "index": i})
            except BadInput as exc:
                errors.append({"name": f.name, "error": str(exc)})
        # one grid per fit batch: files of other sizes, scales or PSF sizes form their own
        keys = sorted({(g["data"].shape[-1], g["scale"], g["psf"].shape[-1]) for g in group})
        rows = []
        for key in keys:
            sub = [g for g in group if (g["data"].shape[-1], g["scale"], g["psf"].shape[-1]) == key]
            rows += _fit_safely(sub, errors, cfg, fs, pred, truth, ss, lens_light, dtype, device)
        if rows:
            new = not partial.is_file()
            with open(partial, "a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=cols)
                if new:
                    w.writeheader()
                w.writerows(rows)
            n_ok += len(rows)
        bar.update(len(chunk))
    bar.close()
    tmp_err = temp_path(err_path)
    with open(tmp_err, "w", newline="") as fh:
        ew = csv.DictWriter(fh, fieldnames=["name", "error"])
        ew.writeheader()
        ew.writerows(errors)
    os.replace(tmp_err, err_path)
    if not partial.is_file():  # nothing could be fitted
        raise ConfigError(f"no usable input: all {len(files)} file(s) were rejected (reasons in {err_path})")
    os.replace(partial, out)
    print(f"wrote {out} ({n_ok} lenses) and {err_path} ({len(errors)} skipped)")
    return {"n": n_ok, "errors": errors}


def fit_settings(cfg: DictConfig, lens_light: int) -> FitSettings:
    """The optimiser's settings from a resolved fit config (``lens_light``: light components, 0 = none)."""
    return FitSettings(
        adam_steps=int(cfg.adam.steps),
        adam_lr=float(cfg.adam.lr),
        source_steps=int(cfg.adam.source_steps),
        adam_dtype=getattr(torch, str(cfg.adam.dtype)),
        lbfgs_iters=int(cfg.lbfgs.iters),
        polish=int(cfg.lbfgs.polish),
        irls_rounds=int(cfg.lbfgs.irls_rounds),
        outlier_sigma=float(cfg.outlier_sigma) if cfg.outlier_sigma else None,
        laplace=bool(cfg.laplace),
        light_steps=int(cfg.adam.light_steps) if lens_light else 0,
        light_lbfgs_iters=int(cfg.lbfgs.light_iters) if lens_light else 0,
        light_starts=int(cfg.adam.light_starts),
        light_screen_iters=int(cfg.lbfgs.light_screen_iters),
        adam_supersample=int(cfg.adam.supersample) if cfg.adam.supersample else None,
        adam_half_width=float(cfg.adam.half_width) if cfg.adam.half_width else None,
        ring_start=bool(cfg.ring_start) and cfg.init == "prior",
        center_sigma=float(cfg.center_prior) if cfg.center_prior else None,
        anchored_starts=int(cfg.adam.anchored_starts),
        anchor_sigma=float(cfg.adam.anchor_sigma),
        anchored_polish=int(cfg.lbfgs.anchored_polish),
        shapelets=None if cfg.source_shapelets is None else int(cfg.source_shapelets),
        pixels=int(cfg.source_pixels) if cfg.source_pixels else None,
        pixels_when=str(cfg.pixelated_when),
        positions_floor=None if cfg.positions_threshold is None else float(cfg.positions_threshold),
        shear=str(cfg.mass_model) == "sie_shear",
        sie_candidates=int(cfg.lbfgs.sie_candidates),
        sie_direct=bool(cfg.lbfgs.sie_direct),
    )


def _resume(partial: Path, cols: list[str]) -> set:
    """Names already fitted in ``partial`` (a previous, interrupted run with the same settings)."""
    if not partial.is_file():
        return set()
    with open(partial, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != cols:
            raise ConfigError(
                f"{partial} was written with other settings (columns differ); delete it or pass resume=false"
            )
        done = {r["name"] for r in reader}
    log.info("resuming: %d lenses already fitted in %s", len(done), partial)
    return done


def _network_input(item: dict, pred, cfg):
    """The network's view of a loaded lens (init=cnn): all bands for a multi-band model, the
    fitted band (or ICA source) for a one-band model."""
    from dataclasses import replace

    from lensexp.predict import network_input

    lens = item["lens"]
    if pred.module.in_chans == 1 and lens.image.shape[0] != 1:
        lens = replace(lens, image=item["raw"])
    return network_input(lens, pred, cfg.masks)


def _fit_safely(group: list[dict], errors: list, *args) -> list[dict]:
    """:func:`_fit_group`, retried lens by lens when the batch fails; a lens that fails alone
    goes to ``errors`` with the cause and the run continues."""
    try:
        return _fit_group(group, *args)
    except Exception as exc:  # noqa: BLE001 - one bad lens must not end the run
        if len(group) == 1:
            log.warning("fit of %s failed: %s", group[0]["name"], exc)
            errors.append({"name": group[0]["name"], "error": f"fit failed ({type(exc).__name__}: {exc})"})
            return []
        return [row for g in group for row in _fit_safely([g], errors, *args)]


def _fit_group(group: list[dict], cfg, fs, pred, truth, ss, lens_light, dtype, device) -> list[dict]:
    """Fit loaded files sharing one grid; returns their CSV rows."""
    space, model, obs = prepare_group(group, cfg, ss, lens_light, dtype, device)
    scale = model.pixscale
    rngs = [lens_generator(int(cfg.seed), g["name"]) for g in group]
    t0 = time.perf_counter()
    starts = starts_for(cfg, group, pred, truth, rngs, dtype).to(device)
    t_init = (time.perf_counter() - t0) / len(group)
    rows = []
    for b, (g, res) in enumerate(zip(group, fit_batch(obs, starts, space, model, fs, rngs))):
        res["seconds"] += t_init
        res["noise_source"], res["sky_ratio"] = g["noise_source"], g["sky_ratio"]
        warn_source_shift(g["name"], res)
        warn_off_light(g["name"], res)
        warn_at_edge(g["name"], res, space)
        rows.append(result_row(g["name"], res, space, amp_names(lens_light, model.n_src, model.n_comp), g["offset"]))
        if cfg.save_plots:
            with torch.no_grad():
                T = model.templates({k: v[None] for k, v in res["p"].items()}, obs.psf[b : b + 1])[0]
            amps, n_src = res["amps"], model.n_src
            if res.get("sh_n_max"):  # the kept shapelets drawn as one more source component
                T = torch.cat([T[:n_src], res["sh_image"][None], T[n_src:]])
                amps, n_src = torch.cat([amps[:n_src], amps.new_ones(1), amps[n_src:]]), n_src + 1
            lens = {**{k: res["p"][k] for k in ("theta_E", "center_x", "center_y")}, "chi2_dof": rows[-1]["chi2_dof"]}
            png = Path(cfg.save_plots)
            fit_figure(obs.data[b], T, amps, res["var"], obs.use[b], scale, g["name"], lens, png, n_src)
    return rows


def prepare_group(group: list[dict], cfg, ss: int, lens_light: int, dtype, device):
    """The parameter space, forward model and batched observation of loaded files sharing one grid."""
    n, scale = group[0]["data"].shape[-1], group[0]["scale"]
    space = ParamSpace.for_grid(
        n,
        scale,
        lens_light,
        dtype,
        shear_max(cfg),
        theta_E_range(cfg),
        source_R_max(cfg),
        int(cfg.source_components),
        int(cfg.companions),
    ).to(device=device)
    pw = kernels.pointwise(kernels.resolve(cfg.compile, device))
    model = LensModel(n, scale, ss, lens_light, int(cfg.source_components), int(cfg.companions), pw)
    stack = lambda key: torch.from_numpy(np.stack([g[key] for g in group]))  # noqa: E731
    obs = Observation(
        stack("data").to(dtype),
        stack("use"),
        stack("psf").to(dtype),
        _bg_stack(group, dtype),
        torch.tensor([g["inv_t"] for g in group], dtype=dtype),
    ).to(device=device)
    return space, model, obs


def lens_generator(seed: int, name: str) -> torch.Generator:
    """The random generator of one lens's starts: from ``seed`` and the lens's name (CRC-32), so
    reruns and resumed runs agree, and a lens's fit does not change when other files join or leave
    the input folder (a seed from the position in the list did)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(name.encode()))


def shear_max(cfg: DictConfig) -> float:
    """Bound on each shear component: ``shear_max`` or, by default, the data preset's shear prior
    (the fit and the simulations that train the networks then share one prior; external shears
    of isolated lens galaxies are small, ~0.02-0.1, so a free |gamma| up to 0.3 mostly absorbs
    source and lens-light structure the model lacks)."""
    if cfg.shear_max is not None:
        return float(cfg.shear_max)
    return float(max(abs(float(v)) for v in cfg.data.lens.gamma))


def theta_E_range(cfg: DictConfig) -> tuple[float, float]:
    """Box of theta_E [arcsec]: ``theta_E_range`` or, by default, the data preset's prior
    (``data.lens.theta_E``), the range the networks are trained on; galaxy-scale lenses stay
    inside it, while a free theta_E of several arcsec lets a large source fit lens-light
    residuals as one giant ring."""
    r = cfg.theta_E_range if cfg.theta_E_range is not None else cfg.data.lens.theta_E
    return float(r[0]), float(r[1])


def source_R_max(cfg: DictConfig) -> float | None:
    """Largest source Sérsic radius [arcsec]: ``source_R_max``, or ``None`` (only the grid's F/4).
    A box at the data preset's source prior (0.6") was measured on the 16 SLACS files: sources
    that had grown to 2" to absorb lens-light residuals stayed small, but the residuals then
    moved the mass instead (within 5 %: 68.8 % as without; J0109 +17 %), so it is an option."""
    return None if cfg.source_R_max is None else float(cfg.source_R_max)


def _bg_stack(group: list[dict], dtype) -> torch.Tensor:
    """Background variances of a batch: [B] numbers, or [B, N, N] maps when any lens has a noise map."""
    if all(np.ndim(g["bg_var"]) == 0 for g in group):
        return torch.tensor([float(g["bg_var"]) for g in group], dtype=dtype)
    n = group[0]["data"].shape[-1]
    return torch.from_numpy(np.stack([np.broadcast_to(g["bg_var"], (n, n)) for g in group])).to(dtype)
