"""How well could anything map the density of the look-up test's lenses? An ideal observer's
convergence-map error beside the network's and the nearest-image look-up's, on lenses made by
lenstronomy like ``data=kappa``'s (issue 15).

    python benchmarks/kappa_floor.py --n 256 [--ckpt RUN/checkpoints/last.ckpt [RUN2/...] --bank shards/kappa_bank] \
        --out benchmarks/results/kappa_floor

Sets (lenstronomy ``SimAPI``; the ``data=kappa`` grid, detector and priors, read from the preset:
64 px at 0.1", 1 000 s, sky 22 mag/arcsec^2, read noise 4 e-, Gaussian PSFs of FWHM 0.1-0.25",
theta_E 0.5-2", q 0.3-1, centre +-0.25", shear +-0.1, Sersic sources of AB 21-24 within 0.6 theta_E
of the lens centre):

* ``epl_narrow``: the training family (an elliptical power law, lenstronomy ``EPL``, of slope
  2 +- 0-0.15, + shear); ``sie``: SIE + shear (slope 2 exactly);
* ``sie_pair``, ``sie_subhalo``, ``epl``: the look-up test's unseen classes, drawn as ``data=kappa``
  draws them (a second SIE, an SIS near the ring; the main lens a power law of slope 2 +- 0.25-0.5).

For each lens the Fisher matrix of its noiseless image (``information_floor.fisher_matrix``: central
differences in every lens parameter - the other profile's and the slope included - and every
Sersic parameter, the set's per-pixel noise) plus the inverse variances of the set's own priors gives the Laplace
posterior of an observer who knows the source is a Sersic, the PSF, the noise, the class's kind
of mass and its priors (as Gaussians of the set's spreads). That posterior is carried to the map:
each annulus pixel's clipped convergence min(kappa, 3) has the spread ``sqrt(J C J^T)`` (``J``: its
central differences in the lens parameters, ``C``: their posterior covariance), and the mean
|error| of a Gaussian of that spread is sqrt(2 / pi) times it; averaged over the 0.3-2" annulus,
the score of issue 15, it is the ideal observer's map error. ``main SIE`` is the error of the main
lens alone as an SIE, its parameters exact (for ``epl`` all but the slope, for the pair and the
subhalo without the other profile): about what a mapper that knows only the training family's
kind of lens can reach (for ``epl`` the best SIE in the annulus, theta_E rescaled, is 2 % lower).
With ``--ckpt`` each network's error on the same images, with ``--bank`` the look-up's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import ensure_allocator_env, machine_info, write_results
from information_floor import fisher_matrix, posterior_cov, source_columns

from lensexp.kappa_maps import KAPPA_CLIP, annulus_mask

# the look-up test's classes (lensexp/sim/mass.py: draw_components) as lenstronomy models, the
# external shear last; every range comes from the data=kappa preset (conf/data/kappa.yaml)
MODELS = {
    "sie": ["SIE"],
    "sie_pair": ["SIE", "SIE"],
    "sie_subhalo": ["SIE", "SIS"],
    "epl": ["EPL"],
    "epl_narrow": ["EPL"],
}
SETS = tuple(MODELS)
SLOPED = ("epl", "epl_narrow")  # the main lens a power law of slope 2 +- mass.<kind>.gamma_offset
MAIN_KEYS = ("theta_E", "e1", "e2", "center_x", "center_y")
PROFILE_KEYS = {"SIE": MAIN_KEYS, "EPL": (*MAIN_KEYS, "gamma"), "SIS": ("theta_E", "center_x", "center_y")}
STEP = 1e-3


def uniform(rng, lohi) -> float:
    """A uniform draw in ``lohi`` = [low, high]; the value itself, with no draw, for a fixed one."""
    lo, hi = (float(v) for v in lohi)
    return lo if lo == hi else float(rng.uniform(lo, hi))


def lens_keys(kind: str) -> tuple:
    """(keyword, lens-model index) of the free lens parameters: every profile's (the power law's
    slope included), then the external shear's."""
    models = MODELS[kind]
    keys = [(key, i) for i, name in enumerate(models) for key in PROFILE_KEYS[name]]
    return (*keys, ("gamma1", len(models)), ("gamma2", len(models)))


def components(kind: str, main: dict, mass, rng) -> list[dict]:
    """Keywords of the profiles other than the main lens (for the power laws: the main lens's
    slope), drawn from the preset's ``mass`` ranges as ``lensexp.sim.mass.draw_components`` draws
    them (distances in units of theta_E)."""
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    te, cx, cy = main["theta_E"], main["center_x"], main["center_y"]
    if kind in SLOPED:
        main["gamma"] = 2.0 + rng.choice([-1.0, 1.0]) * uniform(rng, mass[kind].gamma_offset)
        return []
    if kind == "sie_pair":
        r, a = te * uniform(rng, mass.pair.separation), rng.uniform(0, 2 * np.pi)
        e1, e2 = phi_q2_ellipticity(rng.uniform(0, np.pi), uniform(rng, mass.pair.q))
        m2 = {"theta_E": te * uniform(rng, mass.pair.theta_E_ratio), "e1": e1, "e2": e2}
        return [m2 | {"center_x": cx + r * np.cos(a), "center_y": cy + r * np.sin(a)}]
    if kind == "sie_subhalo":
        r, a = te * uniform(rng, mass.subhalo.radius), rng.uniform(0, 2 * np.pi)
        sub = {"theta_E": uniform(rng, mass.subhalo.theta_E)}
        return [sub | {"center_x": cx + r * np.cos(a), "center_y": cy + r * np.sin(a)}]
    return []


def make_set(kind: str, n: int, seed: int = 0) -> dict:
    """``{"images": [n, 1, N, N] float32 e-/s, "kappa": [n, N, N] float64 (the true convergence
    at the pixel centres), "kappa_main": the same for the main lens alone as an SIE (its parameters
    but slope 2, without the other profiles), "models": per lens (sim, image_model, kw_lens,
    kw_source), "x", "y": pixel centres [N, N] arcsec, "pixscale": arcsec/px}``, on the ``data=kappa`` grid and detector
    with its Gaussian PSFs, lens priors and Sersic sources (offsets uniform in area)."""
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.SimulationAPI.sim_api import SimAPI
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    from lensexp.config import load_data_preset

    if kind not in SETS:
        raise ValueError(f"unknown set '{kind}' (sets: {SETS})")
    c = load_data_preset("kappa")
    lens, src, inst, npix = c.lens, c.source, c.instrument, int(c.npix)
    rng = np.random.default_rng([seed, 15, SETS.index(kind)])
    model = {"lens_model_list": [*MODELS[kind], "SHEAR"], "source_light_model_list": ["SERSIC_ELLIPSE"]}
    mass, main_sie = LensModel(MODELS[kind]), LensModel(["SIE"])
    images = np.zeros((n, 1, npix, npix), np.float32)
    kappa, kappa_main = np.zeros((n, npix, npix)), np.zeros((n, npix, npix))
    kept, x, y = [], None, None
    for i in range(n):
        band = {
            "pixel_scale": float(c.pixscale),
            "exposure_time": uniform(rng, inst.exposure_time),
            "magnitude_zero_point": float(inst.zeropoint),
            "read_noise": uniform(rng, inst.read_noise),
            "ccd_gain": float(inst.gain),
            "sky_brightness": uniform(rng, inst.sky_mag),
            "num_exposures": 1,
            "psf_type": "GAUSSIAN",
            "seeing": uniform(rng, c.psf.fwhm),
        }
        sim = SimAPI(npix, band, model)
        if x is None:
            x, y = (v.reshape(npix, npix) for v in sim.data_class.pixel_coordinates)
        theta_e, q, phi = uniform(rng, lens.theta_E), uniform(rng, lens.q), uniform(rng, lens.phi)
        e1, e2 = phi_q2_ellipticity(phi, q)
        cx, cy = uniform(rng, lens.center), uniform(rng, lens.center)
        kw_main = {"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": cx, "center_y": cy}
        kw_mass = [kw_main, *components(kind, kw_main, c.mass, rng)]
        g1, g2 = uniform(rng, lens.gamma), uniform(rng, lens.gamma)
        kw_lens = [*kw_mass, {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0}]
        lo, hi = (float(v) for v in src.offset)
        r, a = theta_e * np.sqrt(uniform(rng, (lo * lo, hi * hi))), rng.uniform(0, 2 * np.pi)
        se1, se2 = phi_q2_ellipticity(rng.uniform(0, np.pi), uniform(rng, src.sersic.q))
        kw_src = {
            "magnitude": uniform(rng, src.mag),
            "R_sersic": uniform(rng, src.sersic.R_sersic),
            "n_sersic": uniform(rng, src.sersic.n),
            "e1": se1,
            "e2": se2,
            "center_x": cx + r * np.cos(a),
            "center_y": cy + r * np.sin(a),
        }
        _, kw_source, _ = sim.magnitude2amplitude(kwargs_source_mag=[kw_src])
        image_model = sim.image_model_class({"supersampling_factor": 4})
        clean = image_model.image(kw_lens, kw_source)
        images[i, 0] = clean + sim.noise_for_model(clean, seed=int(rng.integers(2**31)))
        kappa[i] = mass.kappa(x, y, kw_mass)
        kappa_main[i] = main_sie.kappa(x, y, [{k: kw_main[k] for k in MAIN_KEYS}])
        kept.append((sim, image_model, kw_lens, kw_source))
    out = {"images": images, "kappa": kappa, "kappa_main": kappa_main, "models": kept}
    return out | {"x": x, "y": y, "pixscale": float(c.pixscale)}


def annulus_error(pred: np.ndarray, truth: np.ndarray, pixscale: float) -> np.ndarray:
    """The score of issue 15 per map [B] (:func:`lensexp.kappa_maps.annulus_error`) of numpy maps."""
    import torch

    from lensexp.kappa_maps import annulus_error as score

    return score(torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(truth)), pixscale).numpy()


def kappa_jacobian(kw_lens: list[dict], models: list[str], keys: tuple, x, y, step: float = STEP) -> np.ndarray:
    """[P_lens, M]: central differences of the clipped convergence min(kappa, 3) of the profiles
    ``models`` (keywords ``kw_lens``, the shear's after them) at the points x, y [M] in each lens
    parameter of ``keys`` (the shear's rows are zero: it adds no convergence)."""
    from lenstronomy.LensModel.lens_model import LensModel

    mass = LensModel(models)
    kw = [dict(c) for c in kw_lens[: len(models)]]
    rows = []
    for key, k in keys:
        if k >= len(models):
            rows.append(np.zeros(np.shape(x)))
            continue
        v = kw[k][key]
        kw[k][key] = v + step
        hi = np.minimum(mass.kappa(x, y, kw), KAPPA_CLIP)
        kw[k][key] = v - step
        lo = np.minimum(mass.kappa(x, y, kw), KAPPA_CLIP)
        kw[k][key] = v
        rows.append((hi - lo) / (2 * step))
    return np.stack(rows)


def prior_var(models: list, names: list[str], keys: tuple) -> np.ndarray:
    """Each parameter's variance over the set (the lens keywords ``keys`` first, then the source's
    keywords and log amplitude in the order of ``names``): the spread of the prior the set was
    drawn from, as a Gaussian's."""
    cols = [[m[2][k][key] for m in models] for key, k in keys]
    return np.array([np.var(c) for c in cols + source_columns(models, names[len(keys) :])])


def ideal_errors(d: dict, kind: str) -> dict:
    """Per lens: the ideal observer's expected annulus |kappa error| and the posterior widths of
    theta_E (and of the slope for ``epl``)."""
    keys = lens_keys(kind)
    fishers = [fisher_matrix(*m, lens_keys=keys) for m in d["models"]]
    pv = prior_var(d["models"], fishers[0][1], keys)
    ring = annulus_mask(d["x"].shape[-1], d["pixscale"]).numpy()
    xs, ys = d["x"][ring], d["y"][ring]
    out = {"kappa_mae": [], "theta_E_sd": [], "slope_sd": []}
    for (f, names), (_, _, kw_lens, _) in zip(fishers, d["models"]):
        cov = posterior_cov(f, pv)[: len(keys), : len(keys)]
        j = kappa_jacobian(kw_lens, MODELS[kind], keys, xs, ys)
        sd = np.sqrt(np.clip(np.einsum("pm,pq,qm->m", j, cov, j), 0, None))
        out["kappa_mae"].append(float(np.sqrt(2 / np.pi) * sd.mean()))
        out["theta_E_sd"].append(float(np.sqrt(cov[0, 0])))
        if "gamma" in names:
            g = names.index("gamma")
            out["slope_sd"].append(float(np.sqrt(cov[g, g])))
    return {k: np.array(v) for k, v in out.items()}


def network_maps(ckpt: str, images: np.ndarray, n_mc: int, seed: int = 0) -> np.ndarray:
    """The checkpoint's posterior-mean maps [n, 64, 64] (as ``lensexp.lookup``: MC dropout seeded)."""
    import torch

    from lensexp.checkpoints import load_module
    from lensexp.kappa_predict import KappaPredictor

    torch.manual_seed(seed)
    module = load_module(ckpt)
    pred = KappaPredictor(module, images.shape[-1], module.pixscale, n_mc)
    g = torch.Generator().manual_seed(seed)
    im = torch.from_numpy(images)
    return torch.cat([pred.samples(im[i : i + 64], g)[1] for i in range(0, len(im), 64)]).double().numpy()


def lookup_maps(bank: str, input_norm: str, images: np.ndarray) -> np.ndarray:
    """The nearest bank image's true map [n, 64, 64] (``lensexp.lookup.LookupBank``)."""
    import torch

    from lensexp.lookup import LookupBank

    return LookupBank(bank, input_norm).query(torch.from_numpy(images))[0].double().numpy()


def markdown(res: dict) -> str:
    nets = res["ckpts"]
    head = " | ".join(f"network {i + 1}" for i in range(len(nets)))
    lines = [
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; {res['n']} lenstronomy lenses per set, "
        f"seed {res['seed']}; bank `{res['bank']}`; "
        + "; ".join(f"network {i + 1} `{c}`" for i, c in enumerate(nets))
        + ". Mean |kappa error| (kappa clipped at 3) in the 0.3-2\" annulus; the ideal observer's from its Laplace "
        "posterior under the set's priors; ratios against the look-up.",
        "",
        f"| set | ideal observer | main SIE, exact | {head + ' | ' if nets else ''}look-up | ideal / look-up | "
        + "".join(f"network {i + 1} / look-up | " for i in range(len(nets)))
        + "theta_E posterior sd (median) | slope posterior sd (median) |",
        "|---|---|---|" + "---|" * (2 * len(nets)) + "---|---|---|---|",
    ]
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for name, s in res["sets"].items():
        look = s.get("lookup")
        ratio = lambda v, look=look: "–" if v is None or not look else f"{v / look:.2f}"  # noqa: E731
        errs = [s["networks"][c] for c in nets]
        lines.append(
            f"| {name} | {f(s['ideal'])} | {f(s['main_sie'])} | "
            + "".join(f"{f(e)} | " for e in errs)
            + f"{f(look)} | {ratio(s['ideal'])} | "
            + "".join(f"{ratio(e)} | " for e in errs)
            + f"{s['theta_E_sd_median']:.4f}″ | {f(s.get('slope_sd_median'))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="lenses per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--ckpt", nargs="*", default=[], help="task=kappa checkpoints: their errors on the same images")
    ap.add_argument("--bank", default=None, help="a data=kappa shard set: the look-up's error on the same images")
    ap.add_argument("--n-mc", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results/kappa_floor")
    args = ap.parse_args()
    ensure_allocator_env()
    res = {"machine": machine_info(), "n": args.n, "seed": args.seed, "ckpts": args.ckpt, "bank": args.bank}
    res["sets"] = {}
    norm = "quantile"
    if args.ckpt:
        from lensexp.checkpoints import load_module

        norm = str(load_module(args.ckpt[0]).hparams.input_norm)  # the look-up matches images as the network sees them
    for name in args.sets:
        t0 = time.perf_counter()
        d = make_set(name, args.n, args.seed)
        ideal = ideal_errors(d, name)
        s = {
            "ideal": float(ideal["kappa_mae"].mean()),
            "main_sie": float(annulus_error(d["kappa_main"], d["kappa"], d["pixscale"]).mean()),
            "theta_E_sd_median": float(np.median(ideal["theta_E_sd"])),
            "per_lens_ideal": ideal["kappa_mae"].tolist(),
            "networks": {},
        }
        if name in SLOPED:
            s["slope_sd_median"] = float(np.median(ideal["slope_sd"]))
            s["slope_sd_below_0.1"] = float(np.mean(ideal["slope_sd"] < 0.1))
        for ckpt in args.ckpt:
            maps = network_maps(ckpt, d["images"], args.n_mc)
            s["networks"][ckpt] = float(annulus_error(maps, d["kappa"], d["pixscale"]).mean())
        if args.bank:
            maps = lookup_maps(args.bank, norm, d["images"])
            s["lookup"] = float(annulus_error(maps, d["kappa"], d["pixscale"]).mean())
        s["seconds"] = time.perf_counter() - t0
        res["sets"][name] = s
        print(
            f"{name}: {s['seconds']:.0f} s; ideal {s['ideal']:.4f}, main SIE {s['main_sie']:.4f}"
            + "".join(f", network {v:.4f}" for v in s["networks"].values())
            + (f", look-up {s['lookup']:.4f}" if "lookup" in s else ""),
            flush=True,
        )
    write_results(args.out, "kappa_floor", res, markdown(res))


if __name__ == "__main__":
    main()
