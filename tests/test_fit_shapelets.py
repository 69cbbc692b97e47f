"""Shapelets on the source: the basis and its lensed images against lenstronomy, and the fit's
last stage, which keeps them only when the BIC prefers them (structured source: kept, theta_E
on the ring; a plain Sérsic source: the Sérsic-only fit stays)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.fit import FitSettings, LensModel, ParamSpace, fit_batch
from lensexp.fit import shapelets as sh
from lensexp.fit.results import columns, off_light, source_shift, warn_at_edge, warn_off_light, warn_source_shift
from lensexp.fit.workflow import check_config, resolve_search
from lensexp.sim.psf import draw_kernel
from lensexp.sim.trace import render_sersic
from tests.test_fit import noisy_observation

NPIX, PIX = 64, 0.05
LENS = dict(theta_E=1.0, e1=0.08, e2=-0.04, center_x=0.02, center_y=-0.03, gamma1=0.03, gamma2=-0.01)
SRC = dict(amp=3.0, R_sersic=0.15, n_sersic=1.0, e1=0.1, e2=0.05, center_x=0.06, center_y=0.04)
# star-forming knots off the disc's centre (Sérsic n = 0.5: Gaussians), which one Sérsic cannot fit
KNOTS = [
    dict(amp=12.0, R_sersic=0.03, n_sersic=0.5, e1=0.0, e2=0.0, center_x=0.12, center_y=0.09),
    dict(amp=8.0, R_sersic=0.04, n_sersic=0.5, e1=0.0, e2=0.0, center_x=-0.03, center_y=0.10),
]


def test_basis_matches_lenstronomy():
    from lenstronomy.LightModel.Profiles.shapelets import Shapelets

    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 0.3, 300), rng.normal(0, 0.3, 300)
    beta, n_max = 0.17, 8
    ours = sh.shapelet_sb(
        torch.tensor(x - 0.05), torch.tensor(y + 0.02), torch.tensor([beta], dtype=torch.float64), n_max
    ).numpy()
    assert ours.shape == (sh.n_basis(n_max), 300) == (45, 300)
    ref = Shapelets(stable_cut=False)
    for k, (n1, n2) in enumerate(sh.orders(n_max)):
        np.testing.assert_allclose(ours[k], ref.function(x, y, 1.0, beta, n1, n2, 0.05, -0.02), rtol=0, atol=1e-12)


def test_intrinsic_flux_integrates_the_basis():
    g = np.linspace(-2.5, 2.5, 1001)
    X, Y = np.meshgrid(g, g)
    beta = torch.tensor(0.2, dtype=torch.float64)
    sb = sh.shapelet_sb(torch.tensor(X.ravel()), torch.tensor(Y.ravel()), beta.reshape(1), 6).sum(1)
    numeric = sb.numpy() * (g[1] - g[0]) ** 2
    np.testing.assert_allclose(sh.intrinsic_flux(beta, 6).numpy(), numeric, atol=1e-10)
    assert sh.intrinsic_flux(beta, 6)[0] == pytest.approx(2 * math.sqrt(math.pi) * 0.04)  # the Gaussian


def test_lensed_templates_match_lenstronomy_ray_shooting():
    from lenstronomy.LensModel.lens_model import LensModel as LtLens
    from lenstronomy.LightModel.Profiles.shapelets import Shapelets

    beta, n_max = 0.12, 4
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in LENS.items()}
    p.update(src_x=torch.tensor(0.06).double(), src_y=torch.tensor(0.04).double(), sh_beta=torch.tensor(beta).double())
    img, flux = sh.shapelet_templates(p, n_max, NPIX, PIX, 1)
    c = (np.arange(NPIX) - (NPIX - 1) / 2) * PIX
    x, y = np.meshgrid(c, c)
    lt = LtLens(["SIE", "SHEAR"])
    kw = [{k: LENS[k] for k in ("theta_E", "e1", "e2", "center_x", "center_y")}, {"gamma1": 0.03, "gamma2": -0.01}]
    bx, by = lt.ray_shooting(x.ravel(), y.ravel(), kw)
    ref = Shapelets(stable_cut=False)
    for k, (n1, n2) in enumerate(sh.orders(n_max)):
        want = ref.function(bx, by, 1.0, beta, n1, n2, 0.06, 0.04).reshape(NPIX, NPIX) * PIX**2
        # the ray tracer's deflection angles agree with lenstronomy's to ~1e-7 (float32-accurate arctan)
        np.testing.assert_allclose(img[k].numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert float(flux[k]) == pytest.approx(want.sum(), rel=1e-5, abs=1e-5 * np.abs(want).sum())


def observation(knots: bool, seed=0):
    psf = torch.from_numpy(draw_kernel("gaussian", 0.1, PIX, 11)).double()
    img = render_sersic(LENS, SRC, NPIX, PIX, 2, psf)
    if knots:
        img = img + sum(render_sersic(LENS, k, NPIX, PIX, 2, psf) for k in KNOTS)
    return noisy_observation(img, psf, 0.01 * float(img.max()), seed)


def fit(obs, n_max, laplace=False):
    model = LensModel(NPIX, PIX, 2, 0)
    space = ParamSpace.for_grid(NPIX, PIX, 0, shear_max=0.1)
    fs = FitSettings(adam_steps=150, lbfgs_iters=60, polish=1, irls_rounds=1, shapelets=n_max, laplace=laplace)
    truth = torch.tensor([[LENS[k] for k in ParamSpace.for_grid(NPIX, PIX, 0).names[:7]]], dtype=torch.float64)
    starts = (truth + torch.tensor([0.1, 0.05, -0.05, 0.05, 0.0, 0.0, 0.0]).double())[None]
    return fit_batch(obs, starts, space, model, fs, [torch.Generator().manual_seed(0)])[0]


def test_shapelets_fit_a_structured_source_and_are_kept():
    obs = observation(knots=True)
    plain, res = fit(obs, None), fit(obs, 6, laplace=True)
    assert res["sh_n_max"] == 6 and res["sh_dnll"] > sh.bic_threshold(6, res["n_pix"])
    # the stage starts from the Sérsic-source fit: its theta_E is the plain fit's, to the bit
    assert res["sh_theta_E0"] == float(plain["p"]["theta_E"])
    assert source_shift(res) == pytest.approx(float(res["p"]["theta_E"]) / float(plain["p"]["theta_E"]) - 1)
    assert plain["chi2"] / plain["n_pix"] > 1.3  # the knots are more than one Sérsic can fit
    assert res["chi2"] / res["n_pix"] < 1.1  # at the noise
    assert float(res["p"]["theta_E"]) == pytest.approx(LENS["theta_E"], rel=0.01)
    assert 0 < float(res["p"]["sh_beta"]) < 0.5 and math.isfinite(res["std"]["sh_beta"])
    assert 0 < res["std"]["theta_E"] < 0.01
    # mu_F counts the shapelets' flux: the source's lensed over intrinsic flux, as simulated
    assert float(res["p"]["mu_F"]) == pytest.approx(true_mu_F(), rel=0.05)


def true_mu_F() -> float:
    """Lensed flux (before the PSF) over intrinsic flux of the simulated source, knots included."""
    from lensexp.sim.source import sersic_total_flux

    parts = [SRC, *KNOTS]
    lensed = sum(float(render_sersic(LENS, c, NPIX, PIX, 4).sum()) for c in parts)
    t = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
    intrinsic = sum(float(sersic_total_flux(t(c["amp"]), t(c["R_sersic"]), t(c["n_sersic"]))) for c in parts)
    return lensed / intrinsic


def test_a_plain_sersic_source_keeps_the_sersic_fit():
    obs = observation(knots=False)
    res = fit(obs, 6)
    assert res["sh_n_max"] == 0 and math.isnan(float(res["p"]["sh_beta"]))
    assert res["sh_dnll"] < sh.bic_threshold(6, res["n_pix"])
    assert res["sh_theta_E0"] == float(res["p"]["theta_E"]) and source_shift(res) == 0.0  # the Sérsic fit stands
    assert float(res["p"]["theta_E"]) == pytest.approx(LENS["theta_E"], rel=0.01)


def test_config_and_columns(tmp_path):
    cfg = compose_config("fit", [f"input={tmp_path}", "source_shapelets=13"])
    with pytest.raises(ConfigError, match="source_shapelets"):
        check_config(resolve_search(cfg))
    for bad in ("six", "-1", "0", "1.5"):
        with pytest.raises(ConfigError, match="source_shapelets"):
            check_config(resolve_search(compose_config("fit", [f"input={tmp_path}", f"source_shapelets={bad}"])))
    check_config(resolve_search(compose_config("fit", [f"input={tmp_path}", "source_shapelets=6"])))
    auto = {
        ll: resolve_search(compose_config("fit", ["input=x", f"lens_light={ll}"])).source_shapelets
        for ll in ("true", "false")
    }
    assert auto == {"true": 6, "false": None}  # real galaxies (lens light) get shapelets, simulations fit as before
    cols = columns(3, True, shapelets=True)
    assert {"sh_n_max", "sh_beta", "sh_dnll", "sh_theta_E0", "sh_beta_std"} <= set(cols)
    assert "sh_n_max" not in columns(3, False)
    assert "off_light" in columns(3, False) and "off_light" not in columns(0, False)


def test_a_large_source_model_shift_is_said_in_the_log(caplog):
    """A kept shapelet source that moved theta_E by more than SOURCE_SHIFT_WARN is named in a
    warning; a small move, or shapelets not kept, says nothing."""

    def res(theta_E, theta_E0, kept=6):
        return {"p": {"theta_E": torch.tensor(theta_E)}, "sh_n_max": kept, "sh_theta_E0": theta_E0}

    with caplog.at_level("WARNING", logger="lensexp.fit"):
        warn_source_shift("J-small", res(1.02, 1.0))
        warn_source_shift("J-not-kept", res(0.8, 1.0, kept=0))
        assert not caplog.records
        warn_source_shift("J-large", res(0.92, 1.0))
    (rec,) = caplog.records
    assert "J-large" in rec.getMessage() and "-8.0 %" in rec.getMessage() and "sh_theta_E0" in rec.getMessage()


def test_a_mass_parameter_at_its_box_edge_is_said_in_the_log(caplog):
    """theta_E fitted at the edge of its box is named in a warning; inside the box, or a fixed
    (lo == hi) shear, says nothing."""
    space = ParamSpace.for_grid(NPIX, PIX, 0, shear_max=0.1, theta_E_range=(0.3, 2.2)).fixing(
        {"gamma1": 0.0, "gamma2": 0.0}
    )
    p = {n: torch.tensor(0.0, dtype=torch.float64) for n in space.names}
    with caplog.at_level("WARNING", logger="lensexp.fit"):
        warn_at_edge("J-inside", {"p": {**p, "theta_E": torch.tensor(1.2)}}, space)
        assert not caplog.records
        warn_at_edge("J-edge", {"p": {**p, "theta_E": torch.tensor(2.199991)}}, space)
    (rec,) = caplog.records
    assert "J-edge" in rec.getMessage() and "theta_E = 2.2" in rec.getMessage() and "gamma" not in rec.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lensexp.fit"):  # both components inside +-0.7, the modulus at 0.7
        warn_at_edge("J-round", {"p": {**p, "theta_E": torch.tensor(1.2), "e1": torch.tensor(0.49)}}, space)
        assert not caplog.records
        diagonal = {"e1": torch.tensor(0.4951), "e2": torch.tensor(0.4951)}
        warn_at_edge("J-flat", {"p": {**p, "theta_E": torch.tensor(1.2), **diagonal}}, space)
    (rec,) = caplog.records
    assert "J-flat" in rec.getMessage() and "|e| = 0.7002" in rec.getMessage() and "theta_E" not in rec.getMessage()


def test_a_mass_centre_far_from_the_light_is_said_in_the_log(caplog):
    """off_light is the mass-to-light centre distance by hand (0.3, 0.4 -> 0.5"), NaN without lens
    light; beyond 0.3" the fit warns, naming the lens and the distance; within it, or without lens
    light, it says nothing."""

    def res(cx, cy, lx=0.0, ly=0.0):
        return {"p": {"center_x": torch.tensor(cx), "center_y": torch.tensor(cy), "ll_x": lx, "ll_y": ly}}

    assert off_light(res(0.3, 0.4)["p"]) == pytest.approx(0.5)
    assert math.isnan(off_light({"center_x": 0.3, "center_y": 0.4}))
    with caplog.at_level("WARNING", logger="lensexp.fit"):
        warn_off_light("J-near", res(0.12, -0.25, 0.02, 0.03))  # 0.297"
        warn_off_light("J-no-light", {"p": {"center_x": 0.9, "center_y": 0.0}})
        assert not caplog.records
        warn_off_light("J-far", res(0.02, 0.92))
    (rec,) = caplog.records
    assert "J-far" in rec.getMessage() and "0.92 arcsec" in rec.getMessage() and "off_light" in rec.getMessage()
