"""How accurately can the outside sets' lens parameters be measured at all? An ideal observer's
error on each image, from the very model and priors that made it, beside a network's errors.

    python benchmarks/information_floor.py --n 400 [--ckpt outputs/runs/quickstart/checkpoints/last.ckpt] \
        --out benchmarks/results/information_floor

For every lens of ``outside_sets.make_set`` (same seed and lenses as ``outside_coverage.py``) the
Fisher matrix ``F = J^T diag(1/sigma^2) J`` of its noiseless lenstronomy image: ``J`` the central
differences of the image (PSF and 4x supersampling included) in the 7 lens parameters (theta_E,
e1, e2, centre, shear) and every source parameter (Sersic: log amplitude, R, n, e1, e2, centre;
COSMOS: log amplitude, centre, angle, scale), ``sigma`` the set's per-pixel noise (sky, read noise,
the source's Poisson noise: lenstronomy's ``estimate_noise``).

* CRB: ``sqrt(inv(F)_jj)``, the Cramer-Rao bound of an unbiased estimator with every parameter
  free and unconstrained. Where arcs are faint, source and lens trade off and it is large.
* Ideal observer: ``sqrt(inv(F + P)_jj)`` with ``P`` the inverse variances of every parameter over
  the set (its priors as Gaussians of equal spread): the width of the Laplace posterior of an
  observer who knows the source family, the PSF, the noise and the priors. The mean posterior
  variance is the smallest mean squared error any estimator reaches, so the RMS of these widths
  over a set estimates the best RMSE possible on it (to the Laplace and Gaussian-prior
  approximations; a network, which knows less, should not beat it by much).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import ensure_allocator_env, machine_info, write_results
from outside_sets import LABELS, SETS, make_set

LENS_KEYS = (("theta_E", 0), ("e1", 0), ("e2", 0), ("center_x", 0), ("center_y", 0), ("gamma1", 1), ("gamma2", 1))
SOURCE_SKIP = ("image",)  # the COSMOS pixels themselves are known (the same galaxy)
STEP = 1e-3  # central-difference step, in each parameter's own unit (arcsec, ellipticity, Sersic R and n)


def _shifted(kwargs_list: list[dict], i: int, key: str, h: float) -> list[dict]:
    """A copy of lenstronomy keyword dicts with ``kwargs_list[i][key]`` moved by ``h``."""
    out = [dict(c) for c in kwargs_list]
    out[i][key] += h
    return out


def fisher_matrix(
    sim, image_model, kw_lens, kw_source, step: float = STEP, lens_keys=LENS_KEYS
) -> tuple[np.ndarray, list[str]]:
    """Fisher matrix [P, P] of one noiseless image and its parameter names: the lens parameters
    ``lens_keys`` ((keyword, index of the lens model) pairs; the 7 of SIE + shear by default) first,
    then the source's (its amplitude as ``log_amp``, so that one prior width fits a set)."""
    clean = image_model.image(kw_lens, kw_source)
    var = sim.estimate_noise(clean) ** 2

    def central(moved):  # d image / d parameter, ``moved(h)``: the keywords with it moved by h
        return (image_model.image(*moved(step)) - image_model.image(*moved(-step))) / (2 * step)

    cols, names = [], []
    for key, k in lens_keys:
        cols.append(central(lambda h, key=key, k=k: (_shifted(kw_lens, k, key, h), kw_source)))
        names.append(key)
    src = kw_source[0]
    for key, value in src.items():
        if key in SOURCE_SKIP or not np.isscalar(value):
            continue
        if key == "amp":  # the image is linear in the amplitude: d image / d log(amp) = image
            cols.append(clean)
            names.append("log_amp")
            continue
        cols.append(central(lambda h, key=key: (kw_lens, _shifted(kw_source, 0, key, h))))
        names.append(f"source_{key}")
    j = np.stack([c.ravel() for c in cols], 1)
    return j.T @ (j / var.ravel()[:, None]), names


def posterior_cov(f: np.ndarray, prior_var: np.ndarray | None = None) -> np.ndarray | None:
    """``inv(F + diag(1 / prior_var))`` [P, P]: without ``prior_var`` the Cramer-Rao covariance,
    with it that of the Laplace posterior under Gaussian priors of those variances; None where
    singular."""
    if prior_var is not None:
        f = f + np.diag(1.0 / np.asarray(prior_var))
    scale = np.sqrt(np.clip(np.diag(f), 1e-300, None))  # precondition: parameters differ by orders of magnitude
    try:
        return np.linalg.inv(f / np.outer(scale, scale)) / np.outer(scale, scale)
    except np.linalg.LinAlgError:
        return None


def lens_bound(f: np.ndarray, prior_var: np.ndarray | None = None, n_lens: int = len(LENS_KEYS)) -> np.ndarray:
    """Standard deviations [n_lens] of the lens parameters (the first ``n_lens``) from
    :func:`posterior_cov`: the Cramer-Rao bound without ``prior_var`` (``inf`` where F is
    singular), with it the width of the Laplace posterior."""
    cov = posterior_cov(f, prior_var)
    if cov is None:
        return np.full(n_lens, np.inf)
    d = np.diag(cov)[:n_lens]
    return np.where(d > 0, np.sqrt(np.abs(d)), np.inf)


def fisher_bound(sim, image_model, kw_lens, kw_source, step: float = STEP) -> np.ndarray:
    """Cramer-Rao standard deviations [7] of (theta_E, e1, e2, center_x, center_y, gamma1, gamma2),
    every source parameter free and unconstrained."""
    return lens_bound(fisher_matrix(sim, image_model, kw_lens, kw_source, step)[0])


def set_prior_var(d: dict, names: list[str]) -> np.ndarray:
    """Each parameter's variance over the set (its lenses' labels, its sources' keywords): the
    spread of the prior the set was drawn from, as a Gaussian's."""
    lens = [d["labels"][:, LABELS.index(n)] for n in names if n in LABELS]
    return np.array([np.var(c) for c in lens + source_columns(d["models"], [n for n in names if n not in LABELS])])


def source_columns(models: list, names: list[str]) -> list:
    """Per source parameter name of a Fisher matrix (``log_amp``, ``source_<keyword>``), its values
    over the set's lenstronomy models ``(sim, image_model, kw_lens, kw_source)``."""
    return [
        np.log([m[3][0]["amp"] for m in models])
        if name == "log_amp"
        else np.array([m[3][0][name.removeprefix("source_")] for m in models])
        for name in names
    ]


def network_errors(ckpt: str, images: np.ndarray, truth: np.ndarray, n_mc: int) -> np.ndarray:
    """The checkpoint's posterior-mean errors [N, 8] (recalibration does not move the mean)."""
    import torch
    from outside_coverage import evaluate

    from lensexp.checkpoints import load_module

    module = load_module(ckpt)
    res = evaluate(module, torch.from_numpy(images), torch.from_numpy(truth), None, n_mc)
    return (res["before"]["mean"] - torch.from_numpy(truth)).numpy()


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else float("nan")


def summary(crb: np.ndarray, ideal: np.ndarray, theta: np.ndarray, err: np.ndarray | None) -> dict:
    """Per set: theta_E's Cramer-Rao bound (median, share above 0.05"), the ideal observer's RMSE
    (RMS of the Laplace posterior widths: the expected posterior variance is the smallest mean
    squared error), each lens label's, and per theta_E bin; with ``err`` the network's RMSE beside."""
    out = {
        "theta_E_crb_median": float(np.median(crb[:, 0])),
        "theta_E_crb_above_0.05": float(np.mean(crb[:, 0] > 0.05)),
        "ideal_rmse": {k: rms(ideal[:, i]) for i, (k, _) in enumerate(LENS_KEYS)},
        "bins": {},
    }
    if err is not None:
        out["network_rmse"] = {k: rms(err[:, LABELS.index(k)]) for k, _ in LENS_KEYS}
    for lo, hi in ((0.5, 1.0), (1.0, 1.6), (1.6, 2.0)):
        m = (theta >= lo) & (theta < hi)
        row = {"n": int(m.sum()), "ideal_rmse": rms(ideal[m, 0]), "crb_median": float(np.median(crb[m, 0]))}
        if err is not None:
            row["network_rmse"] = rms(err[m, 0])
        out["bins"][f"{lo}-{hi}"] = row
    return out


def markdown(res: dict) -> str:
    net = res["ckpt"] is not None
    lines = [
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; {res['n']} lenses per set, seed "
        f"{res['seed']}; network `{res['ckpt']}`. Ideal observer: RMS of the Laplace posterior widths under the "
        "set's own priors (Gaussians of the set's spreads); CRB: the flat-prior Cramer-Rao bound.",
        "",
        "| set | θE CRB median | CRB > 0.05″ | θE ideal / network | θE 0.5–1 / 1–1.6 / 1.6–2″: ideal (network) "
        "| e1 ideal / network | centre x ideal / network | γ1 ideal / network |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in res["sets"].items():
        nr = s.get("network_rmse", {})

        def cell(k, s=s, nr=nr):
            return f"{s['ideal_rmse'][k]:.3f} / " + (f"{nr[k]:.3f}" if net else "–")

        bins = " / ".join(
            f"{v['ideal_rmse']:.3f}" + (f" ({v['network_rmse']:.3f})" if net else "") for v in s["bins"].values()
        )
        lines.append(
            f"| {name} | {s['theta_E_crb_median']:.4f}″ | {s['theta_E_crb_above_0.05']:.2f} | {cell('theta_E')} | "
            f"{bins} | {cell('e1')} | {cell('center_x')} | {cell('gamma1')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="lenses per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--ckpt", default=None, help="also the network's errors on the same images")
    ap.add_argument("--n-mc", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/information_floor")
    args = ap.parse_args()
    ensure_allocator_env()
    res = {"machine": machine_info(), "n": args.n, "seed": args.seed, "ckpt": args.ckpt, "sets": {}}
    for name in args.sets:
        t0 = time.perf_counter()
        d = make_set(name, args.n, args.seed, models=True)
        fishers = [fisher_matrix(*m) for m in d["models"]]
        prior_var = set_prior_var(d, fishers[0][1])
        crb = np.stack([lens_bound(f) for f, _ in fishers])
        ideal = np.stack([lens_bound(f, prior_var) for f, _ in fishers])
        err = network_errors(args.ckpt, d["images"], d["labels"], args.n_mc) if args.ckpt else None
        res["sets"][name] = summary(crb, ideal, d["labels"][:, 0], err)
        s = res["sets"][name]
        print(
            f"{name}: {time.perf_counter() - t0:.0f} s; theta_E CRB median {s['theta_E_crb_median']:.4f}, "
            f"ideal observer RMSE {s['ideal_rmse']['theta_E']:.4f}"
            + (f", network {s['network_rmse']['theta_E']:.4f}" if err is not None else ""),
            flush=True,
        )
    write_results(args.out, "information_floor", res, markdown(res))


if __name__ == "__main__":
    main()
