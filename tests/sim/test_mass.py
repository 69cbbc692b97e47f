"""Mass profiles beyond the SIE and the kappa preset's families, against lenstronomy 1.14.2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensexp.config import load_data_preset
from lensexp.sim import lens as lensmod
from lensexp.sim import mass
from lensexp.sim.render import Simulator
from lensexp.sim.trace import lens_coefficients, pixel_grid, shoot

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402

RNG = np.random.default_rng(7)
X, Y = RNG.uniform(-3, 3, 1500), RNG.uniform(-3, 3, 1500)


def _e(q, phi):
    e = (1 - q) / (1 + q)
    return e * np.cos(2 * phi), e * np.sin(2 * phi)


@pytest.mark.parametrize("q", [0.3, 0.55, 0.8, 0.999, 1.0])
@pytest.mark.parametrize("gamma", [1.5, 1.75, 2.0, 2.3, 2.5])
def test_epl_matches_lenstronomy(q, gamma):
    e1, e2 = _e(q, 0.9)
    kw = dict(theta_E=1.3, gamma=gamma, e1=e1, e2=e2, center_x=0.1, center_y=-0.2)
    lm = LensModel(["EPL"])
    ax, ay = lm.alpha(X, Y, [kw])
    bx, by = mass.epl_deflection(torch.tensor(X), torch.tensor(Y), **kw)
    np.testing.assert_allclose(np.hypot(bx.numpy() - ax, by.numpy() - ay) / np.hypot(ax, ay), 0, atol=1e-6)
    np.testing.assert_allclose(
        mass.epl_convergence(torch.tensor(X), torch.tensor(Y), **kw).numpy(), lm.kappa(X, Y, [kw]), rtol=1e-6
    )


def test_epl_at_gamma_2_is_the_sie():
    x, y = torch.tensor(X), torch.tensor(Y)
    e1, e2 = _e(0.6, -0.4)
    a = mass.epl_deflection(x, y, 1.1, 2.0, e1, e2, 0.05, 0.1)
    b = lensmod.sie_deflection(x, y, 1.1, e1, e2, 0.05, 0.1)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-10, atol=1e-12)


def test_epl_series_under_autograd_gives_the_same_deflection_and_its_slope_derivative():
    """The series is summed in place unless autograd needs its terms: both paths give the same
    bits, and d alpha / d gamma through the series matches a central difference."""
    x, y = torch.tensor(X), torch.tensor(Y)
    e1, e2 = _e(0.5, 0.3)
    g = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    with_grad = mass.epl_deflection(x, y, 1.2, g, e1, e2, 0.05, 0.1)
    with torch.no_grad():
        plain = mass.epl_deflection(x, y, 1.2, g, e1, e2, 0.05, 0.1)
    for u, v in zip(with_grad, plain):
        assert torch.equal(u.detach(), v)
    (dg,) = torch.autograd.grad(with_grad[0].sum(), g)
    h = 1e-6
    num = (
        mass.epl_deflection(x, y, 1.2, 2.3 + h, e1, e2, 0.05, 0.1)[0].sum()
        - mass.epl_deflection(x, y, 1.2, 2.3 - h, e1, e2, 0.05, 0.1)[0].sum()
    ) / (2 * h)
    np.testing.assert_allclose(float(dg), float(num), rtol=1e-6)


def test_sis_matches_lenstronomy():
    kw = dict(theta_E=0.3, center_x=0.2, center_y=0.1)
    lm = LensModel(["SIS"])
    ax, ay = lm.alpha(X, Y, [kw])
    bx, by = mass.sis_deflection(torch.tensor(X), torch.tensor(Y), **kw)
    np.testing.assert_allclose(bx.numpy(), ax, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(by.numpy(), ay, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(
        mass.sis_convergence(torch.tensor(X), torch.tensor(Y), **kw).numpy(), lm.kappa(X, Y, [kw]), rtol=1e-6
    )


@pytest.mark.parametrize("sigma", [0.05, 0.3, 1.2])
def test_gaussian_convergence_matches_lenstronomy(sigma):
    kw = dict(amp=0.4, sigma=sigma, center_x=0.2, center_y=-0.1)
    lm = LensModel(["GAUSSIAN"])
    x = np.concatenate([X, [0.2, 0.2 + 1e-9]])  # the centre itself and a hair beside it
    y = np.concatenate([Y, [-0.1, -0.1]])
    ax, ay = lm.alpha(x, y, [kw])
    bx, by = mass.gaussian_deflection(torch.tensor(x), torch.tensor(y), **kw)
    np.testing.assert_allclose(bx.numpy(), ax, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(by.numpy(), ay, rtol=1e-6, atol=1e-12)
    k = mass.gaussian_convergence(torch.tensor(x), torch.tensor(y), **kw).numpy()
    np.testing.assert_allclose(k, lm.kappa(x, y, [kw]), rtol=1e-6, atol=1e-12)  # lenstronomy rounds at ~1e-16
    # independent of lenstronomy: the mass inside r, as the deflection says, is the integral of kappa
    r = np.linspace(0.0, 4 * sigma, 40001)
    kr = mass.gaussian_convergence(torch.tensor(r), 0.0, 0.4, sigma).numpy()
    m_int = np.concatenate([[0], np.cumsum(np.diff(r) * 0.5 * (kr[1:] * r[1:] + kr[:-1] * r[:-1]))]) * 2 * np.pi
    a_r = mass.gaussian_deflection(torch.tensor(r), 0.0, 0.4, sigma)[0].numpy()
    np.testing.assert_allclose(a_r[500:], m_int[500:] / (np.pi * r[500:]), rtol=1e-5)


def _lenstronomy_model(kind, lab, meta, i):
    """lenstronomy model list and keywords of lens ``i`` of a simulated batch (main lens + shear + component)."""
    main = dict(theta_E=lab[i, 0], e1=lab[i, 1], e2=lab[i, 2], center_x=lab[i, 3], center_y=lab[i, 4])
    shear = dict(gamma1=lab[i, 5], gamma2=lab[i, 6], ra_0=0, dec_0=0)
    m = {k: float(meta[k][i]) for k in mass.COMPONENT_KEYS[kind]}
    if kind in mass.EPL_KINDS:
        return ["EPL", "SHEAR"], [{**main, "gamma": m["epl_gamma"]}, shear]
    if kind == "sie_pair":
        comp = {k[3:]: v for k, v in m.items()}
        return ["SIE", "SHEAR", "SIE"], [main, shear, comp]
    if kind == "sie_subhalo":
        return ["SIE", "SHEAR", "SIS"], [main, shear, {k[4:]: v for k, v in m.items()}]
    if kind == "sie_blobs":
        blobs = [{k: m[f"blob{j}_{k}"] for k in ("amp", "sigma", "center_x", "center_y")} for j in range(mass.N_BLOBS)]
        return ["SIE", "SHEAR", *["GAUSSIAN"] * len(blobs)], [main, shear, *blobs]
    return ["SIE", "SHEAR"], [main, shear]


@pytest.mark.parametrize("kind", mass.MASS_KINDS)
def test_preset_kappa_is_the_analytic_convergence_of_its_components(kind):
    cfg = load_data_preset("kappa", [f"data.mass.kind={kind}", "data.source.kind=sersic"])
    b = Simulator(cfg).sample(4, seed=3, artefacts=False)
    kappa, lab = b.meta["kappa"].double().numpy(), b.labels.double().numpy()
    x, y = (t.numpy() for t in pixel_grid(cfg.npix, cfg.pixscale, 1))
    for i in range(4):
        main = lensmod.sie_convergence(x, y, *lab[i, :5]).numpy() if kind not in mass.EPL_KINDS else 0.0
        models, kws = _lenstronomy_model(kind, lab, b.meta, i)
        # SIEs against the lens module's analytic kappa (lenstronomy's SIE kappa carries ~1e-4
        # numerical error: checked to 1e-3), every other component against lenstronomy to 1e-6
        extra = LensModel(models[2:]).kappa(x, y, kws[2:]) if len(models) > 2 else 0.0
        if kind in mass.EPL_KINDS:
            extra = LensModel(["EPL"]).kappa(x, y, kws[:1])
            slope = abs(float(b.meta["epl_gamma"][i]) - 2)
            lo, hi = cfg.mass[kind].gamma_offset
            assert lo <= slope <= hi  # each power-law family draws from its own slope range
        if kind == "sie_pair":
            np.testing.assert_allclose(kappa[i], main + extra, rtol=1e-3)
            c = kws[2]
            extra = lensmod.sie_convergence(x, y, c["theta_E"], c["e1"], c["e2"], c["center_x"], c["center_y"]).numpy()
        np.testing.assert_allclose(kappa[i], main + extra, rtol=1e-6)
        assert np.all(kappa[i] > 0) and kappa.dtype == np.float64 and b.meta["kappa"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["sie_pair", "sie_subhalo", "epl", "epl_narrow", "sie_blobs"])
def test_ray_shooting_of_each_family_matches_lenstronomy(kind):
    cfg = load_data_preset("kappa", [f"data.mass.kind={kind}", "data.source.kind=sersic"])
    sim = Simulator(cfg)
    rng = torch.Generator().manual_seed(5)
    p = {k: v.double() if v.is_floating_point() else v for k, v in sim.draw_params(3, rng).items()}
    x, y = torch.tensor(X)[None], torch.tensor(Y)[None]
    sie = p if kind not in mass.EPL_KINDS else {**p, "theta_E": torch.zeros_like(p["theta_E"])}
    bx, by = shoot(x, y, lens_coefficients(sie), mass.extra_deflection(kind, p, x, y))
    lab = torch.stack([p[k] for k in ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2")], 1).numpy()
    for i in range(3):
        models, kws = _lenstronomy_model(kind, lab, p, i)
        rx, ry = LensModel(models).ray_shooting(X, Y, kws)
        np.testing.assert_allclose(bx[i].numpy(), rx, atol=1e-6)
        np.testing.assert_allclose(by[i].numpy(), ry, atol=1e-6)


def test_other_presets_draw_no_components_and_no_maps():
    b = Simulator(load_data_preset("tiny", ["data.source.kind=sersic"])).sample(2, seed=1)
    assert "kappa" not in b.meta and not any(k in b.meta for k in mass.COMPONENT_KEYS["sie_pair"])


def test_bad_mass_settings_are_one_line():
    from lensexp.errors import ConfigError

    with pytest.raises(ConfigError, match="data.mass.kind must be one of"):
        Simulator(load_data_preset("kappa", ["data.mass.kind=nfw"]))
    with pytest.raises(ConfigError, match="data.mass.blobs.sigma"):
        Simulator(load_data_preset("kappa", ["data.mass.kind=sie_blobs", "data.mass.blobs.sigma=[0,0.1]"]))
    with pytest.raises(ConfigError, match="data.mass.subhalo.theta_E"):
        Simulator(load_data_preset("kappa", ["data.mass.kind=sie_subhalo", "data.mass.subhalo.theta_E=[0.3,0.1]"]))
    with pytest.raises(ConfigError, match="data.mass.epl_narrow.gamma_offset"):
        Simulator(
            load_data_preset("kappa", ["data.mass.kind=epl_narrow", "data.mass.epl_narrow.gamma_offset=[0.2,0.1]"])
        )
