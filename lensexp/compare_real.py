"""Real lenses against their published parameters: ``python -m lensexp.compare_real``.

    python -m lensexp.compare_real published=../shared/data/slacs_dev/published.csv \
        methods='{fit: fits.csv, cnn: preds.csv}' peer=../shared/data/slacs_dev/peer_tinylensgpu.csv \
        sim_truth=outputs/fits/truth.csv sim_preds=outputs/preds_sim.csv out=outputs/real

``published``: a CSV with ``name``, ``theta_E`` [arcsec] and ``q`` (e.g. Bolton et al. 2008's SIE
fits). Each method is a ``predict`` or ``fit`` CSV; its ``q`` comes from ``e1, e2``
(``q = (1 - e) / (1 + e)``, ``e = sqrt(e1^2 + e2^2)``). ``peer``: another code's ``theta_E_p50``
(and ``_p16``/``_p84``) on the same files, shown as a method. Writes ``OUT/real_comparison.csv``,
``.md``, ``.html`` - per method: lenses, fraction within 5 % and 10 % of the published theta_E,
median |fractional error|, fraction off by more than 20 %, median |q error|, seconds per lens and,
where the method gives 95.5 % intervals, the fraction holding the published value (interval
widened in quadrature by ``systematic`` x theta_E for the published value's own error); for a
``fit`` table with ``sh_theta_E0`` also a row ``<method> (unwarned)``: the lenses the fit does not
warn about (theta_E moved by at most 5 % by the shapelet source, mass centre within 0.3" of the
light's, :func:`lensexp.fit.results.warned`) - and
``real_lenses.csv`` (per lens), ``real_vs_published.png`` (Hezaveh et al. 2017 Fig. 1: the
simulated test set's 68/95 % bands of estimate against truth, with the real lenses as coloured
points and 95 % error bars).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from lensexp.compare import write_tables
from lensexp.errors import ConfigError
from lensexp.fit.results import shift_of, warned
from lensexp.io import read_table
from lensexp.paths import resolve_path

SUMMARY = [
    "method",
    "n",
    "within5",
    "within10",
    "median_abs_frac",
    "fail20",
    "median_abs_q",
    "cover95",
    "seconds_per_lens",
]


def axis_ratio(e1: float, e2: float) -> float:
    """lenstronomy's ``q`` of ellipticity components (``phi_q2_ellipticity`` inverted)."""
    e = min(math.hypot(e1, e2), 0.999999)
    return (1 - e) / (1 + e)


def estimates(table: dict, peer: bool = False) -> dict:
    """``{name: {theta_E, q, lo95, hi95, seconds}}`` of a method's CSV (or a peer table)."""
    out = {}
    for n, r in table.items():
        if peer:
            t = r.get("theta_E_p50", math.nan)
            half = 2 * (r.get("theta_E_p84", math.nan) - r.get("theta_E_p16", math.nan)) / 2  # ~95 % from 68 %
            out[n] = {"theta_E": t, "q": math.nan, "lo95": t - half, "hi95": t + half, "seconds": math.nan}
            continue
        if "theta_E" not in r:
            raise ConfigError(f"a method table lacks the theta_E column (lens {n})")
        e = {"theta_E": r["theta_E"], "seconds": r.get("seconds", math.nan)}
        e["q"] = axis_ratio(r["e1"], r["e2"]) if "e1" in r and "e2" in r else math.nan
        if "theta_E_lo95" in r:
            e["lo95"], e["hi95"] = r["theta_E_lo95"], r["theta_E_hi95"]
        elif "theta_E_std" in r:
            e["lo95"], e["hi95"] = r["theta_E"] - 2 * r["theta_E_std"], r["theta_E"] + 2 * r["theta_E_std"]
        else:
            e["lo95"] = e["hi95"] = math.nan
        if "sh_theta_E0" in r:  # a fit table: theta_E moved by the source model (lensexp.fit.results)
            e["source_shift"] = shift_of(r["theta_E"], r["sh_theta_E0"], r.get("sh_n_max"))
            e["off_light"] = r.get("off_light", math.nan)
        out[n] = e
    return out


def is_warned(e: dict) -> bool:
    """Whether the fit warned about this lens (:func:`lensexp.fit.results.warned`: theta_E moved by the
    source model, or the mass centre off the light)."""
    return warned(e.get("source_shift", 0.0), e.get("off_light", math.nan))


def unwarned(est: dict) -> dict | None:
    """The lenses of a fit table the fit does not warn about (:func:`is_warned`); None for tables
    without the fit's readouts (``sh_theta_E0``)."""
    if not any("source_shift" in e for e in est.values()):
        return None
    return {n: e for n, e in est.items() if not is_warned(e)}


def summary_row(name: str, est: dict, pub: dict, systematic: float) -> dict:
    common = [n for n in est if n in pub and math.isfinite(est[n]["theta_E"])]
    if not common:
        raise ConfigError(f"method '{name}' shares no lens names with the published table")
    t = np.array([pub[n]["theta_E"] for n in common])
    e = np.array([est[n]["theta_E"] for n in common])
    frac = np.abs(e / t - 1)
    row = {
        "method": name,
        "n": len(common),
        "within5": float(np.mean(frac <= 0.05)),
        "within10": float(np.mean(frac <= 0.10)),
        "median_abs_frac": float(np.median(frac)),
        "fail20": float(np.mean(frac > 0.20)),
    }
    dq = [abs(est[n]["q"] - pub[n]["q"]) for n in common if math.isfinite(est[n]["q"]) and "q" in pub[n]]
    row["median_abs_q"] = float(np.median(dq)) if dq else None
    lo = np.array([est[n]["lo95"] for n in common])
    hi = np.array([est[n]["hi95"] for n in common])
    if np.isfinite(lo).all():
        half = np.where(t < lo, e - lo, hi - e)  # the side of the interval towards the published value
        row["cover95"] = float(np.mean(np.abs(t - e) <= np.hypot(half, systematic * t)))
    secs = np.array([est[n]["seconds"] for n in common])
    row["seconds_per_lens"] = float(np.nanmean(secs)) if np.isfinite(secs).any() else None
    return row


def bands(sim_truth: dict, sim_est: dict, edges: np.ndarray) -> tuple:
    """Percentiles (2.5, 16, 50, 84, 97.5) of the estimate in bins of true theta_E."""
    names = [n for n in sim_est if n in sim_truth]
    t = np.array([sim_truth[n]["theta_E"] for n in names])
    e = np.array([sim_est[n]["theta_E"] for n in names])
    mids, pct = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (t >= a) & (t < b)
        if sel.sum() >= 5:
            mids.append((a + b) / 2)
            pct.append(np.percentile(e[sel], [2.5, 16, 50, 84, 97.5]))
    return np.array(mids), np.array(pct)


def figure(methods: dict, pub: dict, path: Path, sim=None) -> None:
    """Hezaveh et al. 2017 Fig. 1: estimate against published theta_E over the simulated bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    ts = [pub[n]["theta_E"] for n in pub]
    lo, hi = 0.8 * min(ts), 1.2 * max(ts)
    if sim is not None:
        mids, pct = bands(*sim, np.linspace(lo, hi, 12))
        if len(mids):
            ax.fill_between(mids, pct[:, 0], pct[:, 4], color="0.85", label="simulated test set, 95 %")
            ax.fill_between(mids, pct[:, 1], pct[:, 3], color="0.7", label="68 %")
    for (name, est), c in zip(methods.items(), plt.cm.tab10.colors):
        names = [n for n in est if n in pub]
        x = np.array([pub[n]["theta_E"] for n in names])
        y = np.array([est[n]["theta_E"] for n in names])
        lo95 = np.array([est[n]["lo95"] for n in names])
        hi95 = np.array([est[n]["hi95"] for n in names])
        yerr = np.vstack([y - lo95, hi95 - y]) if np.isfinite(lo95).all() else None
        ax.errorbar(x, y, yerr=yerr, fmt="o", ms=4, color=c, capsize=2, lw=1, label=name)
        ringed = np.array([is_warned(est[n]) for n in names], bool)
        if ringed.any():  # fits the fit warns about (source model, mass off the light): ringed
            ax.plot(x[ringed], y[ringed], "o", ms=10, mfc="none", mec=c, lw=1, label=f"{name}: warned")
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.plot([lo, hi], [0.95 * lo, 0.95 * hi], color="0.5", lw=0.6, ls="--")
    ax.plot([lo, hi], [1.05 * lo, 1.05 * hi], color="0.5", lw=0.6, ls="--", label="±5 %")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("published θE (″)")
    ax.set_ylabel("estimated θE (″), 95 % intervals")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(cfg: DictConfig) -> list[dict]:
    if not cfg.methods and not cfg.peer:
        raise ConfigError("give methods='{name: CSV, ...}' and/or peer=CSV")
    pub = read_table(resolve_path(cfg.published), "published table")
    if not pub or "theta_E" not in next(iter(pub.values())):
        raise ConfigError(f"published table '{cfg.published}' needs columns name and theta_E (and q)")
    methods = {str(k): estimates(read_table(v, f"method '{k}'")) for k, v in (cfg.methods or {}).items()}
    if cfg.peer:
        methods[str(cfg.peer_name)] = estimates(read_table(cfg.peer, "peer table"), peer=True)
    sys_frac = float(cfg.systematic)
    trusted = {k: unwarned(est) for k, est in methods.items()}
    rows = []
    for k, est in methods.items():
        rows.append(summary_row(k, est, pub, sys_frac))
        if trusted[k]:  # the same method on the lenses it does not warn about
            rows.append(summary_row(f"{k} (unwarned)", trusted[k], pub, sys_frac))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = None
    if cfg.sim_truth and cfg.sim_preds:
        sim = (read_table(cfg.sim_truth, "simulated truth"), read_table(cfg.sim_preds, "simulated predictions"))
    figure(methods, pub, out / "real_vs_published.png", sim)
    per_lens = []
    for n in sorted(pub):
        r = {"name": n, "published_theta_E": pub[n]["theta_E"], "published_q": pub[n].get("q")}
        for k, est in methods.items():
            if n in est:
                r[f"{k}/theta_E"] = est[n]["theta_E"]
                r[f"{k}/frac"] = est[n]["theta_E"] / pub[n]["theta_E"] - 1
                r[f"{k}/q"] = est[n]["q"]
                r[f"{k}/source_shift"] = est[n].get("source_shift")
                r[f"{k}/off_light"] = est[n].get("off_light")
        per_lens.append(r)
    lens_cols = ["name", "published_theta_E", "published_q"] + [
        f"{k}/{c}" for k in methods for c in ("theta_E", "frac", "q")
    ]
    lens_cols += [f"{k}/{c}" for k in methods if trusted[k] is not None for c in ("source_shift", "off_light")]
    write_tables(
        per_lens, out, lens_cols, "real_lenses", "Real lenses, per lens", "frac = estimate / published - 1.", ()
    )
    write_tables(
        rows,
        out,
        SUMMARY,
        "real_comparison",
        "Real lenses against published parameters",
        f"within5/within10: fraction of lenses whose theta_E is within 5/10 % of the published value; fail20: more "
        f"than 20 % off; cover95: 95.5 % interval (widened by {sys_frac:.0%} systematic) holds the published value.",
        ("real_vs_published.png",),
    )
    print(f"wrote {out / 'real_comparison.csv'}, .md, .html and {out / 'real_lenses.csv'} ({len(rows)} methods)")
    return rows


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors
    from lensexp.config import CONF_DIR

    hydra.main(config_path=str(CONF_DIR), config_name="compare_real", version_base="1.3")(clean_errors(run))()
