"""SIE + shear deflection, convergence and Hessian against lenstronomy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensexp.sim import lens

lenstronomy = pytest.importorskip("lenstronomy")
from lenstronomy.LensModel.lens_model import LensModel  # noqa: E402

F64 = torch.float64
REF = dict(
    theta_E=1.0, e1=0.08823529411764709, e2=0.152828012432548, center_x=0.1, center_y=-0.05, gamma1=0.03, gamma2=-0.02
)


def t(v):
    return torch.tensor(v, dtype=F64)


def ours(x, y, p):
    args = {k: t(v) for k, v in p.items()}
    ax, ay = lens.deflection(t(x), t(y), **args)
    return float(ax), float(ay), float(lens.convergence(t(x), t(y), **args))


@pytest.mark.parametrize(
    "p, x, y, want",
    [
        (REF, 0.5, 0.5, (0.4899656961, 0.8008125837, 0.8117745)),
        (REF, 1.2, -0.3, (0.9805971229, -0.3485065027, 0.4353901)),
        (
            dict(theta_E=1.5, e1=0.0, e2=-1 / 3, center_x=0.0, center_y=0.0, gamma1=0.0, gamma2=0.0),
            1.2,
            -0.3,
            (1.4196074921, -0.0300499119, 0.6401851),
        ),
        (
            dict(theta_E=1.0, e1=0.0, e2=0.0, center_x=0.0, center_y=0.0, gamma1=0.0, gamma2=0.0),
            0.6,
            0.8,
            (0.6, 0.8, 0.5),
        ),
    ],
)
def test_reference_values(p, x, y, want):
    ax, ay, k = ours(x, y, p)
    assert ax == pytest.approx(want[0], abs=1e-9)
    assert ay == pytest.approx(want[1], abs=1e-9)
    assert k == pytest.approx(want[2], abs=1e-6)


def test_ellipticity_convention():
    e1, e2 = lens.phi_q_to_ellipticity(t(np.pi / 6), t(0.7))
    assert float(e1) == pytest.approx(0.088235294117647, rel=1e-12)
    assert float(e2) == pytest.approx(0.152828012432548, rel=1e-12)


def _random_sets(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.2, 1.0, n)
    q[:50] = 1.0  # exact SIS limit included
    phi = rng.uniform(0, np.pi, n)
    e = (1 - q) / (1 + q)
    P = dict(
        theta_E=rng.uniform(0.05, 3.0, n),
        e1=e * np.cos(2 * phi),
        e2=e * np.sin(2 * phi),
        center_x=rng.uniform(-0.3, 0.3, n),
        center_y=rng.uniform(-0.3, 0.3, n),
        gamma1=rng.uniform(-0.1, 0.1, n),
        gamma2=rng.uniform(-0.1, 0.1, n),
    )
    x, y = rng.uniform(-4, 4, n), rng.uniform(-4, 4, n)
    return P, x, y


def test_deflection_matches_lenstronomy_random():
    P, x, y = _random_sets()
    ax, ay = lens.deflection(t(x), t(y), **{k: t(v) for k, v in P.items()})
    lm = LensModel(["SIE", "SHEAR"])
    ref = np.array([lm.alpha(x[i], y[i], _kw(P, i)) for i in range(len(x))])
    got = np.stack([ax.numpy(), ay.numpy()], 1)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-3)
    assert rel.max() < 1e-6, f"max relative deflection error {rel.max():.2e}"


def test_convergence_analytic_and_lenstronomy():
    P, x, y = _random_sets(seed=1)
    k = lens.convergence(t(x), t(y), **{kk: t(v) for kk, v in P.items()}).numpy()
    # independent closed form: theta_E / (2 sqrt(q x'^2 + y'^2 / q)), x' along the major axis
    phi = 0.5 * np.arctan2(P["e2"], P["e1"])
    e = np.hypot(P["e1"], P["e2"])
    q = (1 - e) / (1 + e)
    dx, dy = x - P["center_x"], y - P["center_y"]
    xr = np.cos(phi) * dx + np.sin(phi) * dy
    yr = -np.sin(phi) * dx + np.cos(phi) * dy
    analytic = P["theta_E"] / (2 * np.sqrt(q * xr**2 + yr**2 / q))
    assert np.max(np.abs(k / analytic - 1)) < 1e-8
    lm = LensModel(["SIE", "SHEAR"])
    ref = np.array([lm.kappa(x[i], y[i], _kw(P, i)) for i in range(len(x))])
    assert np.max(np.abs(k / ref - 1)) < 1e-3


def test_hessian_and_magnification_match_lenstronomy():
    P, x, y = _random_sets(n=400, seed=2)
    args = {k: t(v) for k, v in P.items()}
    fxx, fxy, fyy = (h.numpy() for h in lens.hessian(t(x), t(y), **args))
    mu = lens.magnification(t(x), t(y), **args).numpy()
    lm = LensModel(["SIE", "SHEAR"])
    ref = np.array([lm.hessian(x[i], y[i], _kw(P, i)) for i in range(len(x))])
    np.testing.assert_allclose(fxx, ref[:, 0], atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(fxy, ref[:, 1], atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(fyy, ref[:, 3], atol=2e-4, rtol=1e-3)
    mref = np.array([lm.magnification(x[i], y[i], _kw(P, i)) for i in range(len(x))])
    ok = np.abs(mref) < 50  # away from critical curves, where mu is ill-conditioned
    np.testing.assert_allclose(mu[ok], mref[ok], rtol=1e-3)


def test_sis_limit_centre_and_small_theta_E_are_finite():
    x = t([0.0, 0.6, 1e-12, -2.0])
    y = t([0.0, 0.8, 0.0, 0.5])
    for q in (1.0, 1 - 1e-9, 0.999):
        e1, e2 = lens.phi_q_to_ellipticity(t(0.3), t(q))
        ax, ay = lens.deflection(x, y, 1.0, e1, e2, 0.0, 0.0, 0.0, 0.0)
        assert torch.isfinite(ax).all() and torch.isfinite(ay).all()
        r = torch.hypot(x, y).clamp(min=1e-300)
        if q == 1.0:  # SIS: |alpha| = theta_E, radial
            np.testing.assert_allclose(ax[1:].numpy(), (x / r)[1:].numpy(), rtol=1e-12)
            np.testing.assert_allclose(ay[1:].numpy(), (y / r)[1:].numpy(), rtol=1e-12)
    ax, ay = lens.deflection(x, y, 1e-12, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert torch.all(ax.abs() < 1e-11) and torch.all(ay.abs() < 1e-11)
    assert float(ax[0]) == 0.0 and float(ay[0]) == 0.0  # exactly at the centre


def test_broadcasting_float32_and_gradients():
    x = torch.linspace(-2, 2, 5, dtype=torch.float32)[None, :]
    th = torch.tensor([[0.5], [1.0], [1.5]], dtype=torch.float32, requires_grad=True)
    ax, ay = lens.deflection(x, x * 0.3, th, 0.1, -0.05, 0.0, 0.0, 0.02, 0.01)
    assert ax.shape == (3, 5) and ax.dtype == torch.float32
    (ax.sum() + ay.sum()).backward()
    assert torch.isfinite(th.grad).all()
    ax64, _ = lens.deflection(x.double(), x.double() * 0.3, th.double(), 0.1, -0.05, 0.0, 0.0, 0.02, 0.01)
    np.testing.assert_allclose(ax.detach().numpy(), ax64.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_plain_floats_accepted():
    ax, ay = lens.deflection(0.5, 0.5, **REF)
    assert isinstance(ax, torch.Tensor)
    assert ax.dtype == torch.float64
    assert float(ax) == pytest.approx(0.4899656961, abs=1e-10)


def _kw(P, i):
    return [
        dict(
            theta_E=P["theta_E"][i], e1=P["e1"][i], e2=P["e2"][i], center_x=P["center_x"][i], center_y=P["center_y"][i]
        ),
        dict(gamma1=P["gamma1"][i], gamma2=P["gamma2"][i], ra_0=0.0, dec_0=0.0),
    ]


def test_float32_atan_and_atanh_match_float64_to_float32_precision():
    from lensexp.sim.fastmath import atan_f32, atanh_f32

    x = torch.cat(
        [torch.logspace(-12, 8, 20001, dtype=torch.float64), torch.linspace(-5, 5, 10001, dtype=torch.float64)]
    )
    x = torch.cat([x, -x, torch.zeros(1, dtype=torch.float64)]).float().double()  # exact float32 inputs
    got, ref = atan_f32(x.float()).double(), torch.atan(x)
    assert ((got - ref).abs() <= 2.5e-7 * ref.abs()).all()
    v = torch.cat(
        [
            torch.logspace(-12, -1e-7, 20001, dtype=torch.float64),
            torch.linspace(-0.9999, 0.9999, 10001, dtype=torch.float64),
        ]
    )
    v = torch.cat([v, -v]).float().double()
    got, ref = atanh_f32(v.float()).double(), torch.atanh(v)
    assert ((got - ref).abs() <= 3e-7 * ref.abs()).all()


def test_float32_deflection_of_a_nearly_round_lens_is_accurate():
    # q -> 1 makes a = sqrt(1 - q^2) tiny: the float32 atanh path must not lose the deflection
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)[None, :]
    y = torch.linspace(-1.5, 1.7, 41, dtype=torch.float64)[:, None]
    for e1 in (0.0, 1e-9, 1e-6, 1e-3, 0.3):
        ref = lens.sie_deflection(x, y, 1.2, e1, 0.0, 0.05, -0.03)
        got = lens.sie_deflection(x.float(), y.float(), 1.2, e1, 0.0, 0.05, -0.03)
        for r, g in zip(ref, got):
            assert g.dtype == torch.float32
            assert (g.double() - r).abs().max() < 2e-6  # arcsec, float32 rounding of ~1" values
