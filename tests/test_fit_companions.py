"""Companions: an unmasked neighbour galaxy is found in the residual and fitted as an unlensed
Sérsic, so the lensed source stays on the arcs and theta_E on the ring."""

from __future__ import annotations

import pytest
import torch

from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.fit import FitSettings, LensModel, ParamSpace, fit_batch, run
from lensexp.fit.companions import residual_peaks
from lensexp.fit.light import fit_light
from lensexp.fit.model import amp_names, param_names
from lensexp.sim.psf import draw_kernel
from lensexp.sim.trace import render_sersic
from tests.test_fit import noisy_observation

NPIX, PIX = 80, 0.05
LENS = dict(theta_E=1.1, e1=0.1, e2=-0.05, center_x=0.03, center_y=-0.02, gamma1=0.02, gamma2=0.01)
SRC = dict(amp=4.0, R_sersic=0.12, n_sersic=1.0, e1=0.1, e2=0.0, center_x=0.08, center_y=0.05)
LIGHT = [
    dict(amp=30.0, R_sersic=1.2, n_sersic=4.0, e1=0.08, e2=-0.04, center_x=0.03, center_y=-0.02),
    dict(amp=40.0, R_sersic=0.15, n_sersic=1.0, e1=0.08, e2=-0.04, center_x=0.03, center_y=-0.02),
]
# a compact neighbour 1.6" south of the lens, at its peak ~5x brighter than the arcs
COMPANION = dict(amp=60.0, R_sersic=0.1, n_sersic=1.5, e1=0.05, e2=0.1, center_x=0.2, center_y=-1.6)


def lens_with_companion(seed=0):
    psf = torch.from_numpy(draw_kernel("gaussian", 0.1, PIX, 11)).double()
    parts = LIGHT + [COMPANION]
    img = render_sersic(LENS, SRC, NPIX, PIX, 2, psf) + sum(render_sersic(None, c, NPIX, PIX, 2, psf) for c in parts)
    return noisy_observation(img, psf, 0.02 * float(img[0].max()) / 40, seed)


def test_parameter_names_and_boxes():
    assert param_names(2, 1, 2)[-12:] == ("cp_x", "cp_y", "cp_R", "cp_n", "cp_e1", "cp_e2") + tuple(
        f"cp2_{k}" for k in ("x", "y", "R", "n", "e1", "e2")
    )
    assert amp_names(2, 1, 1) == ["src_amp", "ll_amp", "ll2_amp", "cp_amp"]
    space = ParamSpace.for_grid(NPIX, PIX, 2, n_comp=1)
    box = dict(zip(space.names, zip(space.lo.tolist(), space.hi.tolist())))
    assert box["cp_x"] == pytest.approx((-2.0, 2.0)) and box["cp_R"] == pytest.approx((0.025, 0.5))
    assert LensModel(NPIX, PIX, 2, 2, 1, 1).K == 4


def test_residual_peak_is_the_neighbour_not_a_hot_pixel_or_the_core():
    obs = lens_with_companion()
    obs.data[0, 10, 60] += 50 * float(obs.data[0].max())  # a cosmic ray brighter than anything
    model = LensModel(NPIX, PIX, 2, 2)
    light = fit_light(obs, ParamSpace.for_grid(NPIX, PIX, 2), model, 100, 0.05, 10.0)
    x, y = residual_peaks(obs, light, model, 2)
    assert float(x[0, 0]) == pytest.approx(COMPANION["center_x"], abs=2 * PIX)
    assert float(y[0, 0]) == pytest.approx(COMPANION["center_y"], abs=2 * PIX)
    assert float(torch.hypot(x[0, 1] - x[0, 0], y[0, 1] - y[0, 0])) >= 0.5  # the next peak elsewhere


def fit(n_comp: int):
    obs = lens_with_companion()
    model = LensModel(NPIX, PIX, 2, 2, 1, n_comp)
    space = ParamSpace.for_grid(NPIX, PIX, 2, n_comp=n_comp)
    fs = FitSettings(adam_steps=150, lbfgs_iters=40, polish=1, irls_rounds=1, light_steps=100, ring_start=True)
    return fit_batch(
        obs, torch.zeros(1, 3, 7, dtype=torch.float64), space, model, fs, [torch.Generator().manual_seed(1)]
    )[0]


def test_companion_is_fitted_and_theta_E_stays_on_the_ring():
    res = fit(1)
    assert float(res["p"]["theta_E"]) == pytest.approx(LENS["theta_E"], rel=0.02)
    assert float(res["p"]["cp_x"]) == pytest.approx(COMPANION["center_x"], abs=0.02)
    assert float(res["p"]["cp_y"]) == pytest.approx(COMPANION["center_y"], abs=0.02)
    assert float(res["p"]["cp_R"]) == pytest.approx(COMPANION["R_sersic"], rel=0.2)


def test_companions_need_the_light_fit(tmp_path):
    def cfg(*over):
        return compose_config("fit", [f"input={tmp_path}", f"out={tmp_path / 'f.csv'}", *over])

    with pytest.raises(ConfigError, match="companions must be 0, 1 or 2"):
        run(cfg("companions=3", "lens_light=true"))
    with pytest.raises(ConfigError, match="companions > 0 needs lens_light=true"):
        run(cfg("companions=1"))
    assert not list(tmp_path.iterdir())


def test_anchored_starts_copy_the_first_starts_onto_the_light_with_a_tight_centre_prior():
    """Per lens: the S free starts, then copies of the first A with the mass centre on the light's;
    the centre prior per start; a per-start sigma gives the same numbers as a float (the free
    starts explore as before)."""
    from lensexp.fit.model import center_penalty
    from lensexp.fit.optimise import anchored

    fs = FitSettings(center_sigma=0.1, anchor_sigma=0.02)
    B, S, A = 2, 3, 2
    p = torch.arange(B * S * 7, dtype=torch.float64).reshape(B * S, 7)
    jit = -torch.arange(B * S * 4, dtype=torch.float64).reshape(B * S, 4)
    light = {"names": ["ll_R", "ll_x", "ll_y"], "p": torch.tensor([[1.0, 0.5, -0.5], [1.0, 0.25, 0.75]])}
    q, j, sigma = anchored(p, jit, B, S, A, fs, light)
    assert q[:, 0].tolist() == [0, 7, 14, 0, 7, 21, 28, 35, 21, 28]  # theta_E column: lens 0's starts, copies, lens 1's
    assert q[:, 3:5].tolist()[3:5] == [[0.5, -0.5]] * 2 and q[:, 3:5].tolist()[8:] == [[0.25, 0.75]] * 2
    assert torch.equal(q[:3], p[:3]) and torch.equal(q[3, 5:], p[0, 5:])
    assert torch.equal(j[[3, 4, 8, 9]], jit[[0, 1, 3, 4]])
    assert sigma.tolist() == [0.1, 0.1, 0.1, 0.02, 0.02] * 2
    assert anchored(p, jit, B, S, 0, fs, light) == (p, jit, 0.1)
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.float64):
        d = {k: torch.randn(10, generator=g, dtype=dt) for k in ("center_x", "center_y", "ll_x", "ll_y")}
        per = center_penalty(d, sigma)
        assert torch.equal(per[:3], center_penalty({k: v[:3] for k, v in d.items()}, 0.1))
        r2 = float((d["center_x"][3] - d["ll_x"][3]) ** 2 + (d["center_y"][3] - d["ll_y"][3]) ** 2)
        assert float(per[3]) == pytest.approx(0.5 * r2 / 0.02**2, rel=1e-6)


def test_an_anchored_start_rescues_a_search_that_took_the_neighbour_for_an_image():
    """No companion component, every start with the mass 0.7" towards the neighbour: the free
    starts stay in that basin (the mass off the light, theta_E wrong); one anchored copy,
    moved onto the light and explored with the centre tied to it, is polished beside them under
    the same posterior and wins."""
    obs = lens_with_companion()
    model = LensModel(NPIX, PIX, 2, 2)
    space = ParamSpace.for_grid(NPIX, PIX, 2)
    starts = torch.tensor([[[1.0, 0.0, 0.0, 0.15, -0.7, 0.0, 0.0]] * 2], dtype=torch.float64)
    out = {}
    for a in (0, 1):
        fs = FitSettings(adam_steps=150, lbfgs_iters=40, polish=2, irls_rounds=1, light_steps=100)
        fs.center_sigma, fs.anchored_starts = 0.1, a
        out[a] = fit_batch(obs, starts, space, model, fs, [torch.Generator().manual_seed(1)])[0]
    off = {
        a: float(torch.hypot(r["p"]["center_x"] - r["p"]["ll_x"], r["p"]["center_y"] - r["p"]["ll_y"]))
        for a, r in out.items()
    }
    assert off[0] > 0.3 and abs(float(out[0]["p"]["theta_E"]) / LENS["theta_E"] - 1) > 0.1
    assert out[1]["start"] == 2 and off[1] < 0.1
    assert float(out[1]["p"]["theta_E"]) == pytest.approx(LENS["theta_E"], rel=0.02)
    assert out[1]["nll"] < out[0]["nll"]
