"""Lens light of several concentric Sérsics (``data.lens_light.components``) against lenstronomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lensexp.config import load_data_preset
from lensexp.errors import ConfigError
from lensexp.sim.render import Simulator
from lensexp.sim.source import sersic_amp_from_flux
from lensexp.sim.trace import pixel_grid

pytest.importorskip("lenstronomy")
from lenstronomy.LightModel.light_model import LightModel  # noqa: E402


def slacs(**over):
    cfg = load_data_preset("slacs")
    return OmegaConf.merge(cfg, {"npix": 48, "psf": {"kind": "gaussian"}, **over})


def test_components_are_concentric_sersics_as_lenstronomy_draws_them():
    cfg = slacs()
    sim = Simulator(cfg)
    p = sim.draw_params(3, torch.Generator().manual_seed(2))
    assert p["llc_flux"].shape == (3, 2)
    got = sim.render_lens_light(p).numpy()
    s, N, pix = int(cfg.supersample), int(cfg.npix), float(cfg.pixscale)
    x, y = (a.numpy().ravel() for a in pixel_grid(N, pix, s))
    for i in range(3):
        kw = []
        comps = [("ll_", None)] + [("llc_", k) for k in range(2)]
        for pre, k in comps:
            v = {key: p[pre + key][i] if k is None else p[pre + key][i, k] for key in ("flux", "R", "n", "e1", "e2")}
            amp = sersic_amp_from_flux(v["flux"].double(), v["R"].double(), v["n"].double())
            kw.append(
                dict(
                    amp=float(amp),
                    R_sersic=float(v["R"]),
                    n_sersic=float(v["n"]),
                    e1=float(v["e1"]),
                    e2=float(v["e2"]),
                    center_x=float(p["center_x"][i]),
                    center_y=float(p["center_y"][i]),
                )
            )
        sb = LightModel(["SERSIC_ELLIPSE"] * 3).surface_brightness(x, y, kw)
        ref = sb.reshape(N, s, N, s).sum((1, 3)) * (pix / s) ** 2
        np.testing.assert_allclose(got[i], ref, rtol=2e-3, atol=1e-5 * ref.max())


def test_components_share_the_galaxy_flux_within_their_ranges():
    cfg = slacs()
    p = Simulator(cfg).draw_params(400, torch.Generator().manual_seed(0))
    total = p["ll_flux"] + p["llc_flux"].sum(1)
    zp = float(cfg.instrument.zeropoint)
    mags = zp - 2.5 * torch.log10(total)
    assert float(mags.min()) >= 16.5 - 1e-4 and float(mags.max()) <= 19.0 + 1e-4
    for k, comp in enumerate(cfg.lens_light.components):
        frac = p["llc_flux"][:, k] / total
        scale = p["llc_R"][:, k] / p["ll_R"]
        lo, hi = comp.flux_fraction
        assert float(frac.min()) >= lo - 1e-6 and float(frac.max()) <= hi + 1e-6
        assert float(scale.min()) >= comp.R_scale[0] - 1e-6 and float(scale.max()) <= comp.R_scale[1] + 1e-6
    assert (p["ll_flux"] > 0).all()


def test_components_that_would_take_all_the_flux_are_refused():
    bad = slacs(lens_light={"components": [{"flux_fraction": [0.1, 0.6], "R_scale": [0.1, 0.2], "n": [1, 2]}] * 2})
    with pytest.raises(ConfigError, match="flux_fraction highs must sum to < 1"):
        Simulator(bad)
    bad = slacs(lens_light={"components": [{"flux_fraction": [0.1, 0.2], "R_scale": [0.0, 0.2], "n": [1, 2]}]})
    with pytest.raises(ConfigError, match=r"components\[0\].R_scale"):
        Simulator(bad)
