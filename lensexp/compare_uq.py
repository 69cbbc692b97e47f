"""Uncertainty methods side by side, from calibrated runs (part of ``python -m lensexp.compare``).

A run counts when it holds ``RUN/.hydra/config.yaml`` and ``RUN/calibration/metrics.json``
(``python -m lensexp.calibrate ckpt=RUN out=RUN/calibration``). One row per run: the method (MC
dropout, deep ensemble, flow), training cost (``train_cost.json``, summed over ensemble members),
prediction cost per lens, and per label the test-split RMSE, coverage at 68.3/95.5/99.7 % before
and after recalibration, coverage at 68.3 % per image S/N bin after it, and the maximum
|coverage - nominal| over the whole 1-99 % curve. Writes ``uncertainty.csv``, ``.md``, ``.html``
and ``uncertainty_curves.png`` (coverage curves) and ``uncertainty_by_snr.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from lensexp.build import loss_name

LEVELS = ("0.683", "0.955", "0.997")
TAGS = {"0.683": "68", "0.955": "95", "0.997": "997"}
META = (
    "run",
    "method",
    "loss",
    "dropout",
    "members",
    "n_test",
    "train_s",
    "train_images",
    "predict_ms_per_lens",
    "max_dev_before",
    "max_dev_after",
    "worst_label_after",
)
# the compact Markdown/HTML table (the CSV holds every column)
SHORT = (
    "run",
    "method",
    "train_s",
    "predict_ms_per_lens",
    "rmse/theta_E",
    "cov68_before/theta_E",
    "cov68_after/theta_E",
    "cov95_after/theta_E",
    "max_dev_before",
    "max_dev_after",
    "worst_label_after",
)


def find_calibrated(root: Path) -> list[Path]:
    """Runs under ``root`` (itself included) with a config and a calibration report."""
    return [
        p.parent.parent
        for p in sorted(Path(root).glob("**/calibration/metrics.json"))
        if (p.parent.parent / ".hydra" / "config.yaml").is_file()
    ]


def uq_row(run_dir: Path, root: Path) -> dict:
    """One table row from a calibrated run (see the module docstring)."""
    from lensexp.train import read_cost

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    m = json.loads((run_dir / "calibration" / "metrics.json").read_text())
    cost = read_cost(run_dir)
    per = m["per_label"]
    dev_b = {n: per[n]["max_curve_deviation_before"] for n in per}
    dev_a = {n: per[n]["max_curve_deviation_after"] for n in per}
    row = {
        "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        "method": m.get("uncertainty") or "mc_dropout",
        "loss": loss_name(cfg.loss),
        "dropout": float(cfg.model.dropout),
        "members": int(cfg.get("ensemble", {}).get("n", 1)),
        "n_test": m["n_lenses"],
        "train_s": cost.get("seconds"),
        "train_images": cost.get("images"),
        "predict_ms_per_lens": 1e3 * m["predict_seconds_per_lens"] if "predict_seconds_per_lens" in m else None,
        "max_dev_before": max(dev_b.values()),
        "max_dev_after": max(dev_a.values()),
        "worst_label_after": max(dev_a, key=dev_a.get),
        "_curves": {n: (per[n].get("curve_before"), per[n].get("curve_after")) for n in per},
        "_snr": m.get("groups", {}).get("after", {}).get("snr", {}),
    }
    for j, n in enumerate(per):  # labels in the checkpoint's order (the S/N coverage lists follow it)
        row[f"rmse/{n}"] = per[n]["rmse"]
        row[f"max_dev_after/{n}"] = dev_a[n]
        for lv in LEVELS:
            row[f"cov{TAGS[lv]}_before/{n}"] = per[n]["coverage_before"][lv]
            row[f"cov{TAGS[lv]}_after/{n}"] = per[n]["coverage_after"][lv]
        for b, g in row["_snr"].items():
            row[f"cov68_after_snr{b}/{n}"] = g["coverage"]["0.683"][j]
    return row


def columns(rows: list[dict]) -> list[str]:
    """Every column of the CSV: metadata, then per label, in the order first seen."""
    cols = list(META)
    for r in rows:
        cols += [k for k in r if not k.startswith("_") and k not in cols]
    return cols


def plots(rows: list[dict], out: Path) -> None:
    """Coverage curves (θE and the worst label per method) and θE 68.3 % coverage per S/N bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lensexp.metrics import CURVE

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for r in rows:
        for ax, name in zip(axes, ("theta_E", r["worst_label_after"])):
            before, after = r["_curves"].get(name, (None, None))
            if after:
                (ln,) = ax.plot(CURVE, np.asarray(after) - CURVE, label=f"{r['method']} ({name})")
                if before:
                    ax.plot(CURVE, np.asarray(before) - CURVE, ls=":", color=ln.get_color())
    for ax, title in zip(axes, ("θE", "worst label per method")):
        ax.axhline(0, color="k", lw=0.8)
        ax.axhspan(-0.02, 0.02, color="0.9", zorder=0)
        ax.set_xlabel("nominal coverage")
        ax.set_ylabel("empirical − nominal (dotted: before recalibration)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "uncertainty_curves.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = sorted({b for r in rows for b in r["_snr"]}, key=lambda b: float(b.lstrip(">").split("-")[0]))
    w = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        y = [r.get(f"cov68_after_snr{b}/theta_E", np.nan) for b in bins]
        ax.bar(np.arange(len(bins)) + i * w, y, w, label=r["method"])
    ax.axhline(0.683, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(bins)) + w * (len(rows) - 1) / 2, bins)
    ax.set_xlabel("image S/N")
    ax.set_ylabel("θE coverage of the 68.3 % interval (recalibrated)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "uncertainty_by_snr.png", dpi=90)
    plt.close(fig)


def write(rows: list[dict], out: Path) -> None:
    """``OUT/uncertainty.csv`` (every column), ``.md`` and ``.html`` (compact) and the figures."""
    import csv

    from lensexp.compare import write_tables

    out.mkdir(parents=True, exist_ok=True)
    plots(rows, out)
    write_tables(
        rows,
        out,
        SHORT,
        stem="uncertainty",
        title="Uncertainty methods",
        note="Test split; after = recalibrated on the validation split; max_dev = max |coverage - nominal| "
        "over the 1-99 % curve, worst label; train_s summed over ensemble members. Every column: uncertainty.csv.",
        figs=("uncertainty_curves.png", "uncertainty_by_snr.png"),
    )
    cols = columns(rows)
    with open(out / "uncertainty.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
