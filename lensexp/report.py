"""Figures and the self-contained HTML calibration report.

* ``true_vs_pred.png``: predicted against true value per label, with the 68 % and 95 % bands of
  the predictions in bins of the truth (Hezaveh et al. 2017, Fig. 1 style).
* ``coverage_curve.png``: empirical against nominal coverage over 1-99 %, with a binomial band,
  before and after recalibration.
* ``coverage_by_snr.png``: coverage of the 68.3 % interval per image S/N bin and label, before
  and after recalibration (beside a table per S/N bin and source kind).
* ``mu_F_uncertainty.png``: predicted 68.3 % uncertainty of mu_F against true mu_F, points coloured
  by the smallest of the 68.3/95.5/99.7 % intervals holding the truth (Perreault Levasseur et al.
  2017, Fig. 1 style).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from lensexp.metrics import CURVE

UNITS = {"theta_E": "″", "center_x": "″", "center_y": "″"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def true_vs_pred(labels, summary, path: Path) -> None:
    plt = _plt()
    truth, mean = summary["truth"].numpy(), summary["mean"].numpy()
    n = len(labels)
    cols = 4
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.1 * rows), squeeze=False)
    for j, name in enumerate(labels):
        ax = axes.flat[j]
        t, p = truth[:, j], mean[:, j]
        lo, hi = np.percentile(t, [1, 99])
        edges = np.linspace(lo, hi, 16)
        mid, bands = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            sel = p[(t >= a) & (t < b)]
            if sel.size >= 5:
                mid.append(0.5 * (a + b))
                bands.append(np.percentile(sel, [2.5, 16, 50, 84, 97.5]))
        if bands:
            bands = np.array(bands)
            ax.fill_between(mid, bands[:, 0], bands[:, 4], color="tab:blue", alpha=0.2, label="95 %")
            ax.fill_between(mid, bands[:, 1], bands[:, 3], color="tab:blue", alpha=0.4, label="68 %")
        ax.scatter(t, p, s=2, color="0.4", alpha=0.5, lw=0)
        ax.plot([lo, hi], [lo, hi], "r--", lw=1)
        ax.set_xlim(lo, hi)
        ax.set_xlabel(f"true {name}{UNITS.get(name, '')}", fontsize=8)
        ax.set_ylabel(f"predicted {name}", fontsize=8)
        ax.tick_params(labelsize=7)
        if j == 0:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def coverage_curves(labels, before, after, n: int, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(
        1, 2 if after is not None else 1, figsize=(10 if after is not None else 5.2, 4.6), squeeze=False
    )
    sig = np.sqrt(CURVE * (1 - CURVE) / max(n, 1))
    for k, (title, s) in enumerate((("before recalibration", before), ("after recalibration", after))):
        if s is None:
            continue
        a = ax[0, k]
        a.fill_between(CURVE, CURVE - 2 * sig, CURVE + 2 * sig, color="0.85", label="±2σ binomial")
        a.plot([0, 1], [0, 1], "k--", lw=1)
        for j, name in enumerate(labels):
            a.plot(CURVE, s["curve"][:, j], lw=1.2, label=name)
        for c in (0.683, 0.955, 0.997):
            a.axvline(c, color="0.7", lw=0.6)
        a.set_xlabel("nominal coverage")
        a.set_ylabel("empirical coverage")
        a.set_title(title, fontsize=10)
        a.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def mu_f_uncertainty(labels, summary, path: Path) -> None:
    plt = _plt()
    j = labels.index("mu_F")
    t = summary["truth"][:, j].numpy()
    lo, hi = summary["intervals"][0.683]
    width = 0.5 * (hi[:, j] - lo[:, j]).numpy()
    inside = {
        c: ((summary["truth"][:, j] >= a[:, j]) & (summary["truth"][:, j] <= b[:, j])).numpy()
        for c, (a, b) in summary["intervals"].items()
    }
    cls = np.where(inside[0.683], 0, np.where(inside[0.955], 1, np.where(inside[0.997], 2, 3)))
    fig, ax = plt.subplots(figsize=(5.5, 4.3))
    for k, (name, col) in enumerate(
        (
            ("within 68.3 %", "tab:orange"),
            ("within 95.5 %", "tab:blue"),
            ("within 99.7 %", "black"),
            ("outside", "tab:red"),
        )
    ):
        sel = cls == k
        ax.scatter(t[sel], width[sel], s=6, color=col, label=f"{name} ({sel.mean():.1%})")
    ax.set_xscale("log")
    ax.set_xlabel("true μF")
    ax.set_ylabel("predicted 68.3 % uncertainty of μF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def coverage_by_snr(labels, groups: dict, path: Path, level: str = "0.683") -> None:
    """Coverage of the ``level`` interval per S/N bin, per label, before (dashed) and after."""
    plt = _plt()
    bins = list(groups["after"].get("snr", {}))
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(bins))
    for j, name in enumerate(labels):
        for key, ls in (("before", "--"), ("after", "-")):
            g = groups[key].get("snr", {})
            y = [g[b]["coverage"][level][j] if b in g else np.nan for b in bins]
            ax.plot(x, y, ls, marker="o", ms=3, color=f"C{j}", label=name if key == "after" else None)
    ax.axhline(float(level), color="k", lw=1)
    ax.set_xticks(x, [f"{b}\n(n={groups['after']['snr'][b]['n']})" for b in bins], fontsize=7)
    ax.set_xlabel("image detection S/N")
    ax.set_ylabel(f"coverage of the {float(level) * 100:.1f} % interval")
    ax.legend(fontsize=7, ncol=4)
    ax.set_title("dashed: before recalibration, solid: after", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def group_rows(labels, groups: dict, level: str = "0.683") -> str:
    """HTML rows: coverage of the ``level`` interval per group (S/N bin, source kind), before → after."""
    rows = []
    for kind, title in (("snr", "S/N"), ("source", "source")):
        for name, g in groups["after"].get(kind, {}).items():
            b = groups["before"][kind][name]["coverage"][level]
            a = g["coverage"][level]
            cells = "".join(f"<td>{b[j]:.2f} → <b>{a[j]:.2f}</b></td>" for j in range(len(labels)))
            rows.append(f"<tr><td>{title} {html.escape(name)}</td><td>{g['n']}</td>{cells}</tr>")
    head = "".join(f"<th>{html.escape(n)}</th>" for n in labels)
    return f"<table><tr><th>group</th><th>n</th>{head}</tr>{''.join(rows)}</table>"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_report(out: Path, labels, before, after, m: dict, ckpt: str) -> list[Path]:
    """Write the PNGs and ``report.html`` (PNGs embedded, and linked by file name)."""
    final = after if after is not None else before
    figs = [
        (
            "true_vs_pred.png",
            "Predicted against true values (shaded: 68 % and 95 % of predictions per bin)",
            lambda p: true_vs_pred(labels, final, p),
        ),
        (
            "coverage_curve.png",
            "Coverage of central intervals, nominal against empirical",
            lambda p: coverage_curves(labels, before, after, m["n_lenses"], p),
        ),
    ]
    if m.get("groups", {}).get("after", {}).get("snr"):
        figs.append(
            (
                "coverage_by_snr.png",
                "Coverage of the 68.3 % interval per image S/N bin",
                lambda p: coverage_by_snr(labels, m["groups"], p),
            )
        )
    if "mu_F" in labels:
        figs.append(
            (
                "mu_F_uncertainty.png",
                "Predicted 68.3 % uncertainty of μF against true μF",
                lambda p: mu_f_uncertainty(labels, final, p),
            )
        )
    paths = []
    for name, _, draw in figs:
        draw(out / name)
        paths.append(out / name)
    rows = []
    for n in labels:
        pl = m["per_label"][n]
        cb, ca = pl["coverage_before"], pl["coverage_after"]
        cells = "".join(f"<td>{cb[c]:.3f} → <b>{ca[c]:.3f}</b></td>" for c in ("0.683", "0.955", "0.997"))
        scale = f"{m['scale'][n]:.2f}" if m["scale"] else "—"
        rows.append(
            f"<tr><td>{n}</td><td>{pl['rmse']:.4g}</td><td>{pl['bias']:+.3g}</td>"
            f"<td>{pl['median_abs']:.4g}</td><td>{pl['sigma_over_error']:.2f}</td>{cells}<td>{scale}</td></tr>"
        )
    sig = m["binomial_sigma"]
    imgs = "".join(
        f'<figure><a href="{name}"><img src="data:image/png;base64,{_b64(out / name)}"'
        f' alt="{name}"></a><figcaption>{html.escape(cap)} (<a href="{name}">{name}</a>)</figcaption></figure>'
        for name, cap, _ in figs
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>lensexp calibration report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}figure{{margin:2em 0}}</style>
</head><body><h1>Calibration report</h1>
<p>Checkpoint <code>{html.escape(ckpt)}</code>; split <b>{html.escape(m["split"])}</b>, {m["n_lenses"]} lenses,
{m["n_mc"]} MC-dropout passes each widened by its aleatoric σ. Recalibration
({html.escape(str(m.get("method") or "global"))}: spread scales fitted on the validation split):
<b>{"applied" if m["recalibrated"] else "not applied"}</b>.</p>
<p>How to read it: a calibrated model puts 68.3 / 95.5 / 99.7 % of the true values inside its
68.3 / 95.5 / 99.7 % intervals. Binomial standard errors for {m["n_lenses"]} lenses:
{sig["0.683"]:.3f}, {sig["0.955"]:.3f}, {sig["0.997"]:.3f}. Coverage above nominal means the
intervals are too wide (under-confident), below nominal too narrow. σ/error is the mean
predicted standard deviation over the RMSE (≈1 when honest).</p>
<table><tr><th>label</th><th>RMSE</th><th>bias</th><th>median |error|</th><th>σ/error</th>
<th>68.3 % before → after</th><th>95.5 %</th><th>99.7 %</th><th>scale</th></tr>
{"".join(rows)}</table>
<h2>Coverage of the 68.3 % interval per image S/N and source kind (before → after)</h2>
<p>Honest intervals hold about 68 % of the truths in every group, not only on average; S/N is
the detection signal-to-noise of the image (lensexp/recalibrate.py: image_snr).</p>
{group_rows(labels, m["groups"]) if m.get("groups") else ""}{imgs}</body></html>"""
    (out / "report.html").write_text(page)
    return paths
