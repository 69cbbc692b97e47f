"""``mass_model=sie``: the fit's SIE without external shear (the model of the published SLACS
parameters), searched with the shear free and polished with it held at zero."""

from __future__ import annotations

import pytest
import torch

from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.fit import MASS, FitSettings, LensModel, ParamSpace, fit_batch
from lensexp.fit.workflow import check_config, resolve_search
from lensexp.sim.trace import render_sersic
from tests.test_fit import LENS, NPIX, PIX, SRC, observation, psf_kernel

LIGHT = dict(
    amp=3.0, R_sersic=0.8, n_sersic=3.0, e1=0.05, e2=-0.1, center_x=LENS["center_x"], center_y=LENS["center_y"]
)


def test_fixed_parameters_stay_at_their_value_with_zero_gradient():
    space = ParamSpace.for_grid(NPIX, PIX, 1)
    fixed = space.fixing({"gamma1": 0.0, "gamma2": 0.02})
    i1, i2 = space.names.index("gamma1"), space.names.index("gamma2")
    assert fixed.free.sum() == space.free.sum() - 2 and not fixed.free[i1] and not fixed.free[i2]
    p = (space.lo + space.hi) / 2 + 0.1 * (space.hi - space.lo)
    u = fixed.to_u(p[None]).requires_grad_(True)
    assert torch.isfinite(u).all() and float(u.detach()[0, i1]) == 0.0
    q = fixed.to_p(u)
    free = fixed.free
    assert torch.allclose(q[0, free], p[free], rtol=1e-9, atol=1e-12)  # free parameters round-trip
    assert float(q[0, i1]) == 0.0 and float(q[0, i2]) == 0.02  # fixed ones hold their value, whatever u is
    assert float(fixed.to_p(u + 5.0)[0, i2]) == 0.02
    q.sum().backward()
    assert float(u.grad[0, i1]) == 0.0 and float(u.grad[0, i2]) == 0.0 and float(u.grad[0, 0]) != 0.0


def _fit(img, psf, shear: bool, laplace: bool = False, direct: bool = False):
    return fit_batch(
        observation(img, psf),
        (torch.tensor([[LENS[k] for k in MASS]], dtype=torch.float64) + 0.01)[:, None],
        ParamSpace.for_grid(NPIX, PIX, True),
        LensModel(NPIX, PIX, 2, True),
        FitSettings(adam_steps=150, lbfgs_iters=500, polish=1, shear=shear, laplace=laplace, sie_direct=direct),
        [torch.Generator().manual_seed(0)],
    )[0]


@pytest.mark.parametrize("direct", [False, True])
def test_sie_model_recovers_a_shear_free_lens_with_its_shear_exactly_zero(direct):
    """A noiseless SIE (no shear) with lens light: the SIE fit, searched with the shear free and
    polished with it held at zero (after an SIE + shear polish, or at once: ``sie_direct``),
    recovers every mass parameter; its shear is exactly 0, its Laplace spread 0 and the other
    spreads finite; the degrees of freedom count 2 fewer parameters."""
    psf = psf_kernel()
    lens = {**LENS, "gamma1": 0.0, "gamma2": 0.0}
    img = render_sersic(lens, SRC, NPIX, PIX, 2, psf) + render_sersic(None, LIGHT, NPIX, PIX, 2, psf)
    res = _fit(img, psf, shear=False, laplace=True, direct=direct)
    for k in MASS:
        assert float(res["p"][k]) == pytest.approx(lens[k], abs=1e-4), k
    assert float(res["p"]["gamma1"]) == 0.0 and float(res["p"]["gamma2"]) == 0.0
    assert res["std"]["gamma1"] == 0.0 and res["std"]["gamma2"] == 0.0
    assert all(res["std"][k] > 0 for k in ("theta_E", "e1", "e2", "center_x", "center_y"))
    n_par = len(ParamSpace.for_grid(NPIX, PIX, True).names)
    assert res["dof"] == res["n_pix"] - (n_par - 2) - LensModel(NPIX, PIX, 2, True).K


def test_sie_model_holds_the_shear_at_zero_where_the_lens_has_one():
    """With a true shear of 0.036 the SIE + shear model fits the image and the SIE cannot: its
    shear stays 0 and its -ln L is worse."""
    psf = psf_kernel()
    img = render_sersic(LENS, SRC, NPIX, PIX, 2, psf) + render_sersic(None, LIGHT, NPIX, PIX, 2, psf)
    img = img + 0.05 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1), dtype=img.dtype)
    with_shear, sie = _fit(img, psf, shear=True), _fit(img, psf, shear=False)
    assert float(with_shear["p"]["gamma1"]) == pytest.approx(LENS["gamma1"], abs=0.01)
    assert float(sie["p"]["gamma1"]) == 0.0 and float(sie["p"]["gamma2"]) == 0.0
    assert sie["nll"] > with_shear["nll"] + 10


@pytest.mark.parametrize("lens_light, want", [(True, "sie"), (False, "sie_shear")])
def test_mass_model_auto_is_the_sie_for_real_ellipticals(lens_light, want):
    cfg = compose_config("fit", ["input=x", f"lens_light={str(lens_light).lower()}"])
    assert resolve_search(cfg).mass_model == want
    given = compose_config("fit", ["input=x", "lens_light=true", "mass_model=sie_shear"])
    assert resolve_search(given).mass_model == "sie_shear"


def test_mass_model_must_be_known():
    cfg = compose_config("fit", ["input=x", "mass_model=sis"])
    with pytest.raises(ConfigError, match="mass_model must be auto, sie or sie_shear"):
        check_config(resolve_search(cfg))


def test_sie_is_polished_from_every_candidate_and_the_best_kept():
    """``sie_candidates`` (with ``sie_direct=false``): each SIE + shear fit handed over is polished
    as an SIE and the best SIE ``-ln L`` wins, wherever it stands in the list, so a wrong basin
    ranked first by the richer model no longer decides."""
    from lensexp.fit.optimise import _without_shear

    psf = psf_kernel()
    lens = {**LENS, "gamma1": 0.0, "gamma2": 0.0}
    img = render_sersic(lens, SRC, NPIX, PIX, 2, psf) + render_sersic(None, LIGHT, NPIX, PIX, 2, psf)
    obs = observation(img, psf)
    space, model = ParamSpace.for_grid(NPIX, PIX, True), LensModel(NPIX, PIX, 2, True)
    good = _fit(img, psf, shear=True)
    far = {**good, "p": {**good["p"], "theta_E": good["p"]["theta_E"] * 1.4}, "start": 7}
    fs = FitSettings(lbfgs_iters=1, irls_rounds=1, shear=False)  # a short polish: the far start stays worse
    one, sp = _without_shear([far], obs, 0, space, model, fs)
    alone, _ = _without_shear([good], obs, 0, space, model, fs)
    assert one["start"] == 7 and one["nll"] > alone["nll"] + 1
    for cands in ([far, good], [good, far]):  # the better SIE wins wherever it stands in the list
        both, _ = _without_shear(cands, obs, 0, space, model, fs)
        assert both["nll"] == alone["nll"] and both["start"] == good["start"]
        assert float(both["p"]["gamma1"]) == 0.0 and float(both["p"]["gamma2"]) == 0.0
    assert not sp.free[space.names.index("gamma1")] and not sp.free[space.names.index("gamma2")]
