"""Network versus maximum-likelihood fits on one test set: ``python -m lensexp.compare_fit``.

    python -m lensexp.compare_fit truth=DIR/truth.csv out=OUT \
        methods='{cnn: preds.csv, fit_prior: fits_prior.csv, fit_cnn: fits_cnn.csv}' \
        reference=fits_truth.csv seconds='{cnn: 0.04}'

Each method is a CSV with ``name`` and the labels (``lensexp.predict`` or ``lensexp.fit``
output). Writes ``OUT/fit_comparison.csv``, ``.md``, ``.html`` - one row per method: lenses,
seconds per lens (a ``seconds`` column of the CSV, else ``seconds.<method>``), its ratio to the
fastest method, per label RMSE, median absolute error and bias against the truth, the median
chi-square per degree of freedom (fits) and, given a ``reference`` fit started at the truth,
``optimum_rate``: the fraction of lenses whose fit reached ``-ln L`` no worse than the reference's
+ ``tolerance`` (the true optimum, or a better one) - and ``fit_vs_truth.png`` (estimate against
truth per label and method).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from lensexp.compare import write_tables
from lensexp.errors import ConfigError
from lensexp.io import read_table
from lensexp.sim.priors import LABELS


def columns(labels) -> list[str]:
    cols = ["method", "n", "seconds_per_lens", "time_ratio", "optimum_rate", "median_chi2_dof"]
    for p in labels:
        cols += [f"rmse/{p}", f"median_abs/{p}", f"bias/{p}"]
    return cols


def method_row(name: str, est: dict, truth: dict, labels, seconds: float | None, ref: dict | None, tol: float):
    common = [n for n in est if n in truth]
    if not common:
        raise ConfigError(f"method '{name}' shares no lens names with the truth file")
    row = {"method": name, "n": len(common)}
    secs = [est[n].get("seconds", math.nan) for n in common]
    row["seconds_per_lens"] = float(np.nanmean(secs)) if np.isfinite(secs).any() else seconds
    chi = [est[n].get("chi2_dof", math.nan) for n in common]
    row["median_chi2_dof"] = float(np.nanmedian(chi)) if np.isfinite(chi).any() else None
    if ref is not None and all("nll" in est[n] for n in common):
        both = [n for n in common if n in ref]
        ok = [est[n]["nll"] <= ref[n]["nll"] + tol for n in both]
        row["optimum_rate"] = float(np.mean(ok)) if ok else None
    for p in labels:
        if not all(p in est[n] for n in common):
            continue
        err = np.array([est[n][p] - truth[n][p] for n in common])
        err = err[np.isfinite(err)]
        if err.size:
            row[f"rmse/{p}"] = float(np.sqrt(np.mean(err**2)))
            row[f"median_abs/{p}"] = float(np.median(np.abs(err)))
            row[f"bias/{p}"] = float(np.mean(err))
    return row, common


def plot(methods: dict, truth: dict, labels, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(13, 6.4))
    for ax, p in zip(axes.flat, labels):
        lo, hi = math.inf, -math.inf
        for name, est in methods.items():
            names = [n for n in est if n in truth and p in est[n]]
            if not names:
                continue
            t = np.array([truth[n][p] for n in names])
            e = np.array([est[n][p] for n in names])
            ax.scatter(t, e, s=10, alpha=0.7, label=name)
            lo, hi = min(lo, t.min(), np.nanmin(e)), max(hi, t.max(), np.nanmax(e))
        if math.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], "k:", lw=1)
        ax.set_title(p, fontsize=9)
        ax.set_xlabel("truth", fontsize=8)
        ax.set_ylabel("estimate", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(cfg: DictConfig) -> list[dict]:
    if not cfg.methods:
        raise ConfigError("methods is empty: give methods='{name: CSV, ...}'")
    truth = read_table(cfg.truth, "truth file")
    labels = [p for p in LABELS if truth and p in next(iter(truth.values()))]
    ref = read_table(cfg.reference, "reference fit") if cfg.reference else None
    seconds = dict(cfg.seconds or {})
    methods = {str(k): read_table(v, f"method '{k}'") for k, v in cfg.methods.items()}
    rows = [
        method_row(k, est, truth, labels, seconds.get(k), ref, float(cfg.tolerance))[0] for k, est in methods.items()
    ]
    times = [r["seconds_per_lens"] for r in rows if r["seconds_per_lens"]]
    for r in rows:
        if r["seconds_per_lens"] and times:
            r["time_ratio"] = r["seconds_per_lens"] / min(times)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(methods, truth, labels, out / "fit_vs_truth.png")
    write_tables(
        rows,
        out,
        columns(labels),
        "fit_comparison",
        "Network versus maximum-likelihood fits",
        "Errors against the truth on the same test set; time_ratio = seconds per lens / the fastest method's; "
        "optimum_rate = share of lenses whose -ln L is within tolerance of a fit started at the truth.",
        ("fit_vs_truth.png",),
    )
    print(f"wrote {out / 'fit_comparison.csv'}, .md, .html ({len(rows)} methods)")
    return rows


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors

    hydra.main(config_path="../conf", config_name="compare_fit", version_base="1.3")(clean_errors(run))()
