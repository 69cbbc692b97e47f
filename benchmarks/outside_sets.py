"""Lenses made by another simulator (lenstronomy), unlike lensexp's training defaults.

Three sets on the ``tiny`` grid (64 px at 0.1"/px, e-/s, sky subtracted), SIE + external shear
drawn inside the training prior, so that differences measure images, not labels:

* ``bright_rings``: elliptical Sersic sources of AB 20.5-22 close to the caustic centre (rings);
* ``faint_arcs``: Sersic sources of AB 23.5-25, 0.4-0.9 theta_E off centre (arcs, doubles, quads);
* ``real_sources``: the COSMOS galaxies of ``../shared/data/cosmos_sample`` through lenstronomy's
  ``INTERPOL`` profile (rotated, flipped, resized), AB 22-24.

Unlike the training defaults: Moffat PSFs (beta 2-4, FWHM 0.12-0.30") given as pixel kernels,
exposure times 400-4000 s, sky 21-22.5 mag/arcsec^2, read noise 3-8 e-, Poisson noise from
lenstronomy's ``SimAPI`` (``inverse=False`` grid: x grows with column, as conventions.md).
``mu_F`` is the conventions' ratio of the noiseless lensed to the intrinsic source flux (before
PSF), both integrated by lenstronomy at 4x supersampling. Only a test/benchmark reference.
"""

from __future__ import annotations

import numpy as np

SETS = ("bright_rings", "faint_arcs", "real_sources")
NPIX, PIXSCALE, ZEROPOINT = 64, 0.1, 25.9
LABELS = ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2", "mu_F")


def moffat_kernel(fwhm: float, beta: float, size: int = 15, pixscale: float = PIXSCALE, sub: int = 5) -> np.ndarray:
    """Unit-sum Moffat kernel [size, size], integrated over pixels by ``sub``x``sub`` subsampling."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    c = (np.arange(size * sub) + 0.5) / sub - size / 2.0
    xx, yy = np.meshgrid(c * pixscale, c * pixscale)
    k = (1.0 + (xx**2 + yy**2) / alpha**2) ** (-beta)
    k = k.reshape(size, sub, size, sub).sum((1, 3))
    return k / k.sum()


def _galaxies():
    from lensexp.config import compose_config
    from lensexp.sim.source import GalaxyBank

    cat = compose_config("simulate", ["data=tiny"]).data.source.cosmos.catalog
    return GalaxyBank.from_catalog(cat)


# the lens parameters of the sets by default: inside every preset's prior, narrower than ``tiny``'s
NARROW = {"theta_E": (0.5, 2.0), "q": (0.4, 1.0), "center": (-0.2, 0.2), "gamma": (-0.08, 0.08)}


def prior_ranges(preset: str) -> dict:
    """The lens-parameter ranges of a data preset's prior (``data.lens``), for sets whose labels
    are drawn as the network's training labels were: coverage of a posterior interval is only
    nominal averaged over the prior the posterior assumes (a label the images say little about,
    drawn from a narrower range, is over-covered by the prior's spread)."""
    from lensexp.config import load_data_preset

    lens = load_data_preset(preset).lens
    return {k: tuple(float(v) for v in lens[k]) for k in NARROW}


def make_set(kind: str, n: int, seed: int = 0, ranges: dict | None = None, models: bool = False) -> dict:
    """``{"images": [n, 1, 64, 64] float32 e-/s, "labels": [n, 8] float32, "psf_ee": [n, R] float32
    (each image's PSF kernel described as networks with ``model.psf_input`` take it), "psf": [n, 2]
    float32 (the kernel's FWHM in arcsec and Moffat beta), "kind": kind}``;
    ``ranges``: the lens parameters' uniform ranges (:data:`NARROW` by default, or
    :func:`prior_ranges`); the images' sources, PSFs and noise are those of ``kind`` either way.
    ``models=True`` adds ``"models"``: per image ``(sim, image_model, kw_lens, kw_source)``, the
    lenstronomy objects and keywords that made its noiseless image (for information bounds)."""
    from lensexp.sim.psf import EE_RADII, encircled_energy

    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.SimulationAPI.sim_api import SimAPI
    from lenstronomy.Util.param_util import phi_q2_ellipticity

    if kind not in SETS:
        raise ValueError(f"unknown set '{kind}' (sets: {SETS})")
    rng = np.random.default_rng([seed, SETS.index(kind)])
    lr = dict(NARROW, **(ranges or {}))
    bank = _galaxies() if kind == "real_sources" else None
    light = ["INTERPOL"] if bank is not None else ["SERSIC_ELLIPSE"]
    model = {"lens_model_list": ["SIE", "SHEAR"], "source_light_model_list": light}
    images, labels = np.zeros((n, 1, NPIX, NPIX), np.float32), np.zeros((n, len(LABELS)), np.float32)
    psf_ee = np.zeros((n, len(EE_RADII)), np.float32)
    psf = np.zeros((n, 2), np.float32)  # FWHM [arcsec] and Moffat beta of each image's kernel
    lens_model = LensModel(["SIE", "SHEAR"])
    kept = []
    for i in range(n):
        fwhm, beta = rng.uniform(0.12, 0.30), rng.uniform(2.0, 4.0)
        band = {
            "pixel_scale": PIXSCALE,
            "exposure_time": rng.uniform(400.0, 4000.0),
            "magnitude_zero_point": ZEROPOINT,
            "read_noise": rng.uniform(3.0, 8.0),
            "ccd_gain": 2.5,
            "sky_brightness": rng.uniform(21.0, 22.5),
            "num_exposures": 1,
            "psf_type": "PIXEL",
            "kernel_point_source": moffat_kernel(fwhm, beta),
        }
        sim = SimAPI(NPIX, band, model)
        psf_ee[i] = encircled_energy(band["kernel_point_source"], PIXSCALE).numpy()
        psf[i] = fwhm, beta
        theta_e, q, phi = rng.uniform(*lr["theta_E"]), rng.uniform(*lr["q"]), rng.uniform(0, np.pi)
        e1, e2 = phi_q2_ellipticity(phi, q)
        cx, cy = rng.uniform(*lr["center"], 2)
        g1, g2 = rng.uniform(*lr["gamma"], 2)
        kw_lens = [
            {"theta_E": theta_e, "e1": e1, "e2": e2, "center_x": cx, "center_y": cy},
            {"gamma1": g1, "gamma2": g2, "ra_0": 0.0, "dec_0": 0.0},
        ]
        r_off = {"bright_rings": (0.0, 0.25), "faint_arcs": (0.4, 0.9), "real_sources": (0.0, 0.6)}[kind]
        r = theta_e * np.sqrt(rng.uniform(r_off[0] ** 2, r_off[1] ** 2))
        a = rng.uniform(0, 2 * np.pi)
        # source offset measured from the caustic centre (the source position of the lens centre)
        bx, by = lens_model.ray_shooting(cx, cy, kw_lens)
        sx, sy = float(bx) + r * np.cos(a), float(by) + r * np.sin(a)
        if bank is None:
            mag = rng.uniform(20.5, 22.0) if kind == "bright_rings" else rng.uniform(23.5, 25.0)
            se1, se2 = phi_q2_ellipticity(rng.uniform(0, np.pi), rng.uniform(0.5, 1.0))
            kw_src = {
                "magnitude": mag,
                "R_sersic": rng.uniform(0.1, 0.4) if kind == "faint_arcs" else rng.uniform(0.15, 0.5),
                "n_sersic": rng.uniform(0.8, 3.0),
                "e1": se1,
                "e2": se2,
                "center_x": sx,
                "center_y": sy,
            }
        else:
            g = int(rng.integers(len(bank)))
            img = bank.images[g].numpy().astype(float)
            if rng.random() < 0.5:
                img = img[:, ::-1]
            kw_src = {
                "magnitude": rng.uniform(22.0, 24.0),
                "image": np.ascontiguousarray(img),
                "center_x": sx,
                "center_y": sy,
                "phi_G": rng.uniform(0, 2 * np.pi),
                "scale": float(bank.pixscale[g]) * rng.uniform(0.3, 0.8),
            }
        _, kw_source, _ = sim.magnitude2amplitude(kwargs_source_mag=[kw_src])
        image_model = sim.image_model_class({"supersampling_factor": 4})
        clean = image_model.image(kw_lens, kw_source)
        noisy = clean + sim.noise_for_model(clean, seed=int(rng.integers(2**31)))
        images[i, 0] = noisy
        labels[i] = [theta_e, e1, e2, cx, cy, g1, g2, _mu_f(sim, kw_lens, kw_source)]
        if models:
            kept.append((sim, image_model, kw_lens, kw_source))
    out = {"images": images, "labels": labels, "psf_ee": psf_ee, "psf": psf, "kind": kind}
    return out | ({"models": kept} if models else {})


def _mu_f(sim, kw_lens, kw_source) -> float:
    """Lensed over intrinsic source flux, noiseless and before the PSF (conventions.md)."""
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.Data.psf import PSF

    num = {"supersampling_factor": 4}
    psf = PSF(psf_type="NONE")
    lensed = ImageModel(sim.data_class, psf, sim._lens_model_class, sim._source_model_class, kwargs_numerics=num)
    intrinsic = ImageModel(sim.data_class, psf, None, sim._source_model_class, kwargs_numerics=num)
    src_at_origin = [dict(kw_source[0], center_x=0.0, center_y=0.0)]
    return float(lensed.image(kw_lens, kw_source).sum() / intrinsic.image([], src_at_origin).sum())
