"""Architecture comparison: ``python -m lensexp.compare runs=DIR out=OUT``.

Finds every training run under DIR (a folder with ``.hydra/config.yaml`` and ``csv/metrics.csv``,
e.g. a Hydra multirun) and writes ``OUT/comparison.csv``, ``.md`` and ``.html``, one row per run:
backbone, dropout, loss, parameter count, training and inference images/s, and per label the
validation RMSE, median absolute error and coverage at 68.3/95.5/99.7 % before and after
recalibration (spread scales fitted on half of the validation lenses, coverage on the other
half); plus ``accuracy_vs_speed.png`` and ``coverage_vs_dropout.png``. Works offline from local
files; ``runs=wandb:ENTITY/PROJECT`` reads a W&B project instead (needs a login). Runs that hold a
calibration report (``RUN/calibration/metrics.json``) also make the uncertainty-methods table
``OUT/uncertainty.*`` (:mod:`lensexp.compare_uq`).
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lensexp.build import loss_name
from lensexp.errors import ConfigError
from lensexp.sim.priors import LABELS

LEVEL_KEYS = ("cov68", "cov95", "cov997")
META = (
    "run",
    "backbone",
    "dropout",
    "dropout_where",
    "loss",
    "data",
    "params",
    "train_img_per_s",
    "infer_img_per_s",
    "coverage_error",
    "cal_coverage_error",
)


# the validation metrics of density-map runs (task=kappa, lensexp/kappa_module.py)
KAPPA_COLUMNS = ("kappa_mae", "kappa_cov68", "kappa_cov95", "theta_E_frac")


def columns(kappa: bool = False) -> list[str]:
    """Table columns: run metadata, then per label RMSE, median error, coverage before/after;
    with ``kappa`` (a density-map run among the rows) also the density-map metrics."""
    per = []
    for n in LABELS:
        per += [f"rmse/{n}", f"median_abs/{n}"]
        per += [f"{k}/{n}" for k in LEVEL_KEYS]
        per += [f"cal_{k}/{n}" for k in LEVEL_KEYS]
    return [*META, *per, *(KAPPA_COLUMNS if kappa else ())]


def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every metric in a Lightning CSV log."""
    out: dict[str, float] = {}
    with open(metrics_csv) as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if v not in ("", None):
                    out[k] = float(v)
    return out


def find_runs(root: str | Path) -> list[Path]:
    runs = [
        p.parent.parent
        for p in sorted(Path(root).glob("**/.hydra/config.yaml"))
        if (p.parent.parent / "csv" / "metrics.csv").is_file()
    ]
    if not runs:
        raise ConfigError(f"no training runs (with .hydra/config.yaml and csv/metrics.csv) under '{root}'")
    return runs


def run_row(run_dir: Path, root: Path) -> dict:
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    m = last_values(run_dir / "csv" / "metrics.csv")
    row = {
        "run": str(run_dir.relative_to(root)) if run_dir != root else run_dir.name,
        "backbone": cfg.model.backbone,
        "dropout": float(cfg.model.dropout),
        "dropout_where": cfg.model.dropout_where,
        "loss": loss_name(cfg.loss),
        "data": cfg.data.name,
        "params": m.get("model/params"),
        "train_img_per_s": m.get("train/img_per_s"),
        "infer_img_per_s": m.get("val/infer_img_per_s"),
        "coverage_error": m.get("val/coverage_error"),
        "cal_coverage_error": m.get("val/cal_coverage_error"),
    }
    for c in columns(kappa=True)[len(META) :]:
        row[c] = m.get(f"val/{c}")
    return row


def wandb_rows(project: str) -> list[dict]:
    """Rows from a W&B project's runs (summary metrics and config)."""
    import wandb

    try:
        runs = wandb.Api().runs(project)
    except Exception as exc:  # noqa: BLE001 - network/auth errors: one clear message
        raise ConfigError(f"cannot read W&B project '{project}' (online and logged in?): {exc}") from exc
    rows = []
    for r in runs:
        cfg, s = r.config, r.summary
        model = cfg.get("model", {})
        row = {
            "run": r.name,
            "backbone": model.get("backbone"),
            "dropout": model.get("dropout"),
            "dropout_where": model.get("dropout_where"),
            "loss": cfg.get("loss", {}).get("name"),
            "data": cfg.get("data", {}).get("name"),
            "params": s.get("model/params"),
            "train_img_per_s": s.get("train/img_per_s"),
            "infer_img_per_s": s.get("val/infer_img_per_s"),
            "coverage_error": s.get("val/coverage_error"),
            "cal_coverage_error": s.get("val/cal_coverage_error"),
        }
        row.update({c: s.get(f"val/{c}") for c in columns(kappa=True)[len(META) :]})
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def write_tables(
    rows: list[dict],
    out: Path,
    cols: list[str] | None = None,
    stem: str = "comparison",
    title: str = "Architecture comparison",
    note: str = "Validation metrics, last epoch; cal_ = after recalibration.",
    figs: tuple = ("accuracy_vs_speed.png", "coverage_vs_dropout.png"),
) -> None:
    """``OUT/<stem>.csv``, ``.md`` and ``.html`` (with the figures ``figs``) of ``rows``."""
    cols = cols or columns(kappa=any(r.get("kappa_mae") is not None for r in rows))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows([{c: r.get(c) for c in cols} for r in rows])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    img = "".join(f'<p><img src="{p}" alt="{p}"></p>' for p in figs)
    (out / f"{stem}.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>lensexp {html.escape(title)}</title><style>"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>"
        f"<table><tr>{head}</tr>{body}</table>{img}</body></html>"
    )


def plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for r in rows:
        if r.get("infer_img_per_s") and r.get("rmse/theta_E") is not None:
            ax.scatter(r["infer_img_per_s"], r["rmse/theta_E"])
            ax.annotate(f"{r['backbone']} p={r['dropout']}", (r["infer_img_per_s"], r["rmse/theta_E"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("inference forward passes / s")
    ax.set_ylabel("validation RMSE of θE [″]")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_speed.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for key, lab in (("coverage_error", "before recalibration"), ("cal_coverage_error", "after")):
        pts = sorted((r["dropout"], r[key]) for r in rows if r.get(key) is not None)
        if pts:
            ax.plot(*zip(*pts), "o-", label=lab)
    ax.set_xlabel("dropout rate")
    ax.set_ylabel("mean |coverage − nominal| (68.3/95.5/99.7 %)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "coverage_vs_dropout.png", dpi=90)
    plt.close(fig)


def run(cfg: DictConfig) -> list[dict]:
    """Build the comparison of ``cfg.runs`` into ``cfg.out``; returns the uncertainty-methods rows
    when calibrated runs are found, else the architecture rows."""
    src = str(cfg.runs)
    uq: list[dict] = []  # the uncertainty-methods rows, returned when there are any
    if src.startswith("wandb:"):
        rows = wandb_rows(src[len("wandb:") :])
    else:
        from lensexp.compare_uq import find_calibrated, uq_row, write

        root = Path(src)
        calibrated = find_calibrated(root)
        if calibrated:  # uncertainty methods: from each run's calibration report
            uq = [uq_row(r, root) for r in calibrated]
            write(uq, Path(cfg.out))
            print(f"wrote {Path(cfg.out) / 'uncertainty.csv'}, .md, .html ({len(uq)} calibrated runs)")
        try:
            rows = [run_row(r, root) for r in find_runs(root)]
        except ConfigError:
            if uq:
                return uq
            raise
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plots(rows, out)
    write_tables(rows, out)
    print(f"wrote {out / 'comparison.csv'}, .md, .html ({len(rows)} runs)")
    return uq or rows


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors

    hydra.main(config_path="../conf", config_name="compare", version_base="1.3")(clean_errors(run))()
