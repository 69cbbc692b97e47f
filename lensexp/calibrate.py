"""Calibration: ``python -m lensexp.calibrate ckpt=CKPT out=DIR``.

MC-dropout posteriors on a split (the run's test split by default): ``n_mc`` stochastic passes,
each widened by its aleatoric sigma (Perreault Levasseur et al. 2017). Per label: posterior mean,
std and central intervals; coverage at 68.3/95.5/99.7 % and the full coverage curve with binomial
errors; RMSE, bias and the sigma/error ratio. The spread is recalibrated on the validation split
(Gaussian-NLL sigma plus MC spread over-covers), per image by default (:mod:`lensexp.recalibrate`:
scales from the posterior std and the image S/N, then one factor per label over the coverage
curve), saved beside the checkpoint as ``calibration.json`` and applied by ``predict``; the report
shows coverage before and after, also per S/N bin and source kind. Writes ``DIR/coverage.json``
(``{param: {"0.683": f, ...}}``, after recalibration), ``DIR/metrics.json``, ``DIR/report.html``
and its PNGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lensexp import metrics
from lensexp.metrics import coverage_curve
from lensexp.checkpoints import load_module, resolve_ckpt, run_config
from lensexp.errors import ConfigError
from lensexp.files import write_text_atomic

CAL_FILE = "calibration.json"


def read_calibration(path: Path, labels):
    """The :class:`~lensexp.recalibrate.Recalibration` saved in ``path``; one line if unusable."""
    from lensexp.recalibrate import Recalibration

    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"calibration file '{path}' cannot be read as JSON ({exc})") from None
    return Recalibration.from_dict(d, labels, f"calibration file '{path}'")


@torch.no_grad()
def collect(
    module,
    loader,
    n_mc: int,
    max_lenses: int | None = None,
    progress: bool = True,
    n_samples: int = 2048,
    seed: int = 0,
) -> dict:
    """Over a loader, from the posterior-samples interface (``module.posterior``: MC dropout,
    ensemble or flow alike): network-space ``samples`` [S, N, D] and ``centre`` [N, D], physical
    ``truth`` [N, D], each image's detection ``snr`` [N], when the samples record it
    ``is_cosmos`` [N], and ``seconds_per_lens`` of posterior sampling."""
    import time

    from tqdm import tqdm

    from lensexp.recalibrate import image_snr

    out = {k: [] for k in ("samples", "centre", "truth", "snr", "is_cosmos")}
    n, busy = 0, 0.0
    g = torch.Generator().manual_seed(int(seed))
    dev = module.device
    for batch in tqdm(loader, desc="posterior", unit="batch", disable=not progress):
        t0 = time.perf_counter()
        s, c = module.posterior(batch["image"].to(dev), n_mc, n_samples, g, psf_ee=batch.get("psf_ee"))
        busy += time.perf_counter() - t0
        out["samples"].append(s)
        out["centre"].append(c)
        out["truth"].append(batch["labels"])
        out["snr"].append(image_snr(batch["image"]))
        if "is_cosmos" in batch:
            out["is_cosmos"].append(batch["is_cosmos"])
        n += batch["labels"].shape[0]
        if max_lenses and n >= max_lenses:
            break
    if not out["truth"]:
        raise ConfigError("the chosen split holds no lenses")
    if len(out["is_cosmos"]) != len(out["truth"]):
        out.pop("is_cosmos")
    c = {k: torch.cat(v, 1 if k == "samples" else 0) for k, v in out.items()}
    if max_lenses:
        c = {k: v[:, :max_lenses] if k == "samples" else v[:max_lenses] for k, v in c.items()}
    c["seconds_per_lens"] = busy / max(n, 1)
    return c


def summarise(module, c: dict, cal=None) -> dict:
    """Physical-unit posterior summaries and calibration numbers for one split (``c`` from
    :func:`collect`), recalibrated by ``cal`` (:class:`~lensexp.recalibrate.Recalibration`) if given."""
    from lensexp.recalibrate import coverage_by_group

    truth = c["truth"]
    z_truth = module.to_net(truth)
    samples, centre = c["samples"], c["centre"]
    if cal is not None:
        samples = cal.apply(samples, centre, c["snr"])
    phys = module.from_net(samples)
    mean, std = phys.mean(0), phys.std(0)
    iv = metrics.central_intervals(phys, metrics.LEVELS)
    cov = metrics.coverage(truth, iv)
    curve = coverage_curve(samples, z_truth)
    err = mean - truth
    return {
        "mean": mean,
        "std": std,
        "intervals": iv,
        "coverage": cov,
        "curve": curve,
        "max_curve_deviation": np.abs(curve - metrics.CURVE[:, None]).max(0),
        "groups": coverage_by_group(truth, iv, c),
        "rmse": metrics.rmse(mean, truth),
        "bias": err.mean(0),
        "sigma_over_error": std.mean(0) / metrics.rmse(mean, truth).clamp(min=1e-12),
        "median_abs": metrics.median_abs_error(mean, truth),
        "truth": truth,
        "n": truth.shape[0],
    }


def uncertainty_method(module) -> str:
    """``ensemble``, ``flow``, ``mc_dropout`` (Gaussian head with active dropout) or ``gaussian``."""
    if hasattr(module, "members"):
        return f"ensemble of {len(module.members)} ({uncertainty_method(module.members[0])})"
    if not hasattr(module.loss_fn, "mean_std"):
        return "flow" + (" + mc_dropout" if module.mc_passes(2) > 1 else "")
    return "mc_dropout" if module.mc_passes(2) > 1 else str(module.loss_fn.name)


def _loader_for(cfg: DictConfig, train_cfg: DictConfig | None, split: str):
    from lensexp.data import LensDataModule

    if train_cfg is None and cfg.data_root is None and not cfg.on_the_fly:
        raise ConfigError("no run config beside the checkpoint: give data_root=SHARDS or on_the_fly=true")
    data_cfg = train_cfg.data if train_cfg is not None else cfg.data
    # a run trained on the fly has no shard set: its splits are simulated the same way
    fly = cfg.on_the_fly or (
        cfg.data_root is None and train_cfg is not None and train_cfg.datamodule.get("source") == "on_the_fly"
    )
    if fly:
        dm = LensDataModule(
            data_cfg,
            source="on_the_fly",
            batch_size=int(cfg.batch_size),
            val_size=int(cfg.max_lenses or 1024),
            seed=int(cfg.seed),
        )
    else:
        root = cfg.data_root or train_cfg.datamodule.root
        dm = LensDataModule(data_cfg, source="shards", root=str(root), batch_size=int(cfg.batch_size))
    return dm.eval_dataloader(split)


def dropout_table(root: str | Path) -> list[dict]:
    """Runs under ``root`` (each with ``.hydra/config.yaml`` and ``csv/metrics.csv``, e.g. a Hydra
    multirun over ``model.dropout``) with their dropout rate and last validation calibration,
    best (smallest mean |coverage - nominal|) first."""
    import csv

    rows = []
    for cfg_path in sorted(Path(root).glob("**/.hydra/config.yaml")):
        run_dir = cfg_path.parent.parent
        metrics_csv = run_dir / "csv" / "metrics.csv"
        if not metrics_csv.is_file():
            continue
        val = [r for r in csv.DictReader(open(metrics_csv)) if r.get("val/coverage_error")]
        if not val:
            continue
        last = val[-1]
        rows.append(
            {
                "run": str(run_dir),
                "dropout": float(OmegaConf.load(cfg_path).model.dropout),
                "coverage_error": float(last["val/coverage_error"]),
                "cov68_theta_E": float(last.get("val/cov68/theta_E") or "nan"),
                "rmse_theta_E": float(last.get("val/rmse/theta_E") or "nan"),
            }
        )
    if not rows:
        raise ConfigError(f"no training runs with validation metrics under '{root}'")
    return sorted(rows, key=lambda r: r["coverage_error"])


def choose_dropout(root: str | Path, out: Path | None = None) -> dict:
    """Pick the dropout rate whose run is best calibrated (Perreault Levasseur et al. 2017)."""
    rows = dropout_table(root)
    print(f"{'dropout':>8} {'|cov-nominal|':>14} {'cov68 θE':>9} {'RMSE θE':>8}  run")
    for r in rows:
        cols = f"{r['dropout']:8.3f} {r['coverage_error']:14.4f} {r['cov68_theta_E']:9.3f} {r['rmse_theta_E']:8.4f}"
        print(f"{cols}  {r['run']}")
    choice = {"dropout": rows[0]["dropout"], "run": rows[0]["run"], "table": rows}
    print(f"chosen dropout rate: {choice['dropout']} ({choice['run']})")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "dropout_choice.json").write_text(json.dumps(choice, indent=2))
    return choice


def log_wandb(cfg: DictConfig, out: Path, m: dict) -> None:
    """Metrics table and report images to W&B (offline unless ``wandb.mode=online``)."""
    import wandb

    run = wandb.init(
        project=cfg.wandb.project,
        dir=str(out),
        mode=cfg.wandb.mode,
        job_type="calibration",
        config={"ckpt": str(cfg.ckpt), "split": str(cfg.split), "n_mc": int(cfg.n_mc)},
    )
    try:
        cols = ["label", "rmse", "bias", "sigma_over_error", "cov68", "cov95", "cov997", "cov68_before"]
        data = [
            [
                n,
                v["rmse"],
                v["bias"],
                v["sigma_over_error"],
                *v["coverage_after"].values(),
                v["coverage_before"]["0.683"],
            ]
            for n, v in m["per_label"].items()
        ]
        run.log(
            {
                "calibration/table": wandb.Table(columns=cols, data=data),
                **{f"calibration/{p.stem}": wandb.Image(str(p)) for p in sorted(out.glob("*.png"))},
            }
        )
    finally:
        run.finish()


def run(cfg: DictConfig) -> dict:
    """Calibrate the checkpoint ``cfg.ckpt`` and write the report to ``cfg.out``
    (or, with ``select_dropout=DIR``, choose the best-calibrated dropout rate among runs)."""
    from lensexp.report import write_report

    if cfg.get("select_dropout"):
        return choose_dropout(cfg.select_dropout, Path(cfg.out))
    if not cfg.ckpt:
        raise ConfigError("give ckpt=RUN/checkpoints/last.ckpt (or select_dropout=DIR)")

    from lensexp.runtime import resolve_device, set_threads

    set_threads()
    device = resolve_device(cfg.device)
    module = load_module(cfg.ckpt, device)
    if module.hparams.get("task") == "kappa":
        raise ConfigError(
            f"'{cfg.ckpt}' is a density-map checkpoint: its per-pixel coverage is logged in validation and "
            "measured per mass class by python -m lensexp.lookup"
        )
    train_cfg = run_config(cfg.ckpt)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = module.labels
    sampling = dict(
        n_mc=int(cfg.n_mc),
        max_lenses=cfg.max_lenses,
        progress=cfg.progress,
        n_samples=int(cfg.n_samples),
        seed=int(cfg.seed),
    )
    cal = None
    if cfg.recalibrate:
        from lensexp.recalibrate import Recalibration

        v = collect(module, _loader_for(cfg, train_cfg, cfg.recalibrate_split), **sampling)
        cal = Recalibration.fit(
            labels, v["samples"], v["centre"], module.to_net(v["truth"]), v["snr"], str(cfg.recalibrate_method)
        )
        del v
        record = {**cal.to_dict(), "split": str(cfg.recalibrate_split)}
        for path in (resolve_ckpt(cfg.ckpt).parent / CAL_FILE, out / CAL_FILE):
            write_text_atomic(path, json.dumps(record, indent=2))
    c = collect(module, _loader_for(cfg, train_cfg, cfg.split), **sampling)
    truth = c["truth"]
    before = summarise(module, c)
    after = summarise(module, c, cal) if cal is not None else before
    final = after
    coverage = {n: {f"{c:.3f}": float(final["coverage"][c][j]) for c in metrics.LEVELS} for j, n in enumerate(labels)}
    (out / "coverage.json").write_text(json.dumps(coverage, indent=2))
    m = {
        "n_lenses": int(truth.shape[0]),
        "n_mc": int(cfg.n_mc),
        "passes": int(module.mc_passes(int(cfg.n_mc))),
        "n_samples": int(cfg.n_samples),
        "uncertainty": uncertainty_method(module),
        "predict_seconds_per_lens": float(c["seconds_per_lens"]),
        "split": str(cfg.split),
        "recalibrated": cal is not None,
        "method": cal.method if cal is not None else None,
        "scale": {n: float(s) for n, s in zip(labels, cal.factor)} if cal is not None else None,
        "binomial_sigma": {f"{c:.3f}": metrics.binomial_sigma(c, int(truth.shape[0])) for c in metrics.LEVELS},
        "groups": {"before": before["groups"], "after": after["groups"]},
        "per_label": {},
    }
    for j, n in enumerate(labels):
        m["per_label"][n] = {
            "rmse": float(final["rmse"][j]),
            "bias": float(final["bias"][j]),
            "median_abs": float(final["median_abs"][j]),
            "sigma_over_error": float(final["sigma_over_error"][j]),
            "coverage_before": {f"{c:.3f}": float(before["coverage"][c][j]) for c in metrics.LEVELS},
            "coverage_after": {f"{c:.3f}": float(after["coverage"][c][j]) for c in metrics.LEVELS},
            "max_curve_deviation_before": float(before["max_curve_deviation"][j]),
            "max_curve_deviation_after": float(after["max_curve_deviation"][j]),
            "curve_before": [round(float(x), 5) for x in before["curve"][:, j]],  # at metrics.CURVE levels
            "curve_after": [round(float(x), 5) for x in after["curve"][:, j]],
        }
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
    write_report(out, labels, before, after if cal is not None else None, m, str(cfg.ckpt))
    if cfg.wandb.mode != "disabled":
        log_wandb(cfg, out, m)
    print(f"wrote {out / 'report.html'}, coverage.json, metrics.json ({truth.shape[0]} lenses, {cfg.n_mc} MC passes)")
    return m


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors

    hydra.main(config_path="../conf", config_name="calibrate", version_base="1.3")(clean_errors(run))()
