"""The pixelated source: its regularisation, the ray-to-node mapping against lenstronomy's ray
shooting, the evidence against the Gaussian marginal likelihood written out directly, and the
stage recovering theta_E of a source no Sérsic describes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.fit import FitSettings, LensModel, ParamSpace
from lensexp.fit import pixelated as px
from lensexp.fit.results import PIXEL_COLUMNS, columns
from lensexp.fit.workflow import check_config, fit_settings, resolve_search
from lensexp.sim.psf import draw_kernel
from lensexp.sim.trace import convolve_psf
from tests.test_fit_shapelets import LENS, NPIX, PIX, observation


def test_regularisation_sums_squared_neighbour_differences():
    n = 5
    H = px.regularisation(n)
    s = torch.randn(n * n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = s.reshape(n, n)
    want = 0.0
    for r in range(n):
        for c in range(n):
            left = g[r, c - 1] if c else 0.0  # beyond the edge: 0
            down = g[r - 1, c] if r else 0.0
            want += float(g[r, c] - left) ** 2 + float(g[r, c] - down) ** 2
        want += float(g[r, n - 1]) ** 2 + float(g[n - 1, r]) ** 2  # the far edges
    assert float(s @ H @ s) == pytest.approx(want, rel=1e-12)
    assert float(torch.linalg.eigvalsh(H).min()) > 0  # positive definite: ln det H is finite


def test_mapping_reproduces_a_linear_source_through_lenstronomy_rays():
    """Bilinear nodes carry a linear function exactly, so the mapped image is that function at the
    source positions lenstronomy's ray shooting gives (rays on the grid; zero a cell beyond it)."""
    from lenstronomy.LensModel.lens_model import LensModel as LtLens

    n, grid = 12, (torch.tensor(-0.6).double(), torch.tensor(-0.5).double(), torch.tensor(0.1).double())
    xs = grid[0] + grid[2] * torch.arange(n).double()
    ys = grid[1] + grid[2] * torch.arange(n).double()
    a, bx_, by_ = 2.0, 1.5, -0.7
    nodes = (a + bx_ * xs[None, :] + by_ * ys[:, None]).flatten()  # row = y, column = x
    p = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in LENS.items()}
    model = LensModel(NPIX, PIX, 1, 0)
    _, M, idx = px.lensed_nodes(p, grid, n, NPIX, model, None, 0)
    got = torch.zeros(NPIX * NPIX, dtype=torch.float64).index_add(0, idx, nodes @ M).reshape(NPIX, NPIX).numpy()
    got /= PIX**2

    c = (np.arange(NPIX) - (NPIX - 1) / 2) * PIX
    x, y = np.meshgrid(c, c)
    kw = [{k: LENS[k] for k in ("theta_E", "e1", "e2", "center_x", "center_y")},
          {"gamma1": LENS["gamma1"], "gamma2": LENS["gamma2"]}]  # fmt: skip
    bx, by = (v.reshape(NPIX, NPIX) for v in LtLens(["SIE", "SHEAR"]).ray_shooting(x.ravel(), y.ravel(), kw))
    x0, y0, step = (float(t) for t in grid)

    def inside(margin):
        hi = (n - 1) * step - margin
        return (bx > x0 + margin) & (bx < x0 + hi) & (by > y0 + margin) & (by < y0 + hi)

    on, off = inside(1e-4), ~inside(-step - 1e-4)  # beyond the ring of zero nodes: nothing
    assert on.sum() > 100 and off.sum() > 100
    np.testing.assert_allclose(got[on], (a + bx_ * bx + by_ * by)[on], rtol=0, atol=1e-5)
    assert np.all(got[off] == 0)


def test_box_drawing_equals_the_whole_grid():
    """Node images drawn on the box around the rays that reach the grid, PSF margin included, are
    the whole grid's images: zero outside the box, equal inside."""
    n, grid = 8, (torch.tensor(-0.05).double(), torch.tensor(-0.06).double(), torch.tensor(0.03).double())
    p = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in LENS.items()}
    model = LensModel(NPIX, PIX, 2, 0)
    psf = torch.from_numpy(draw_kernel("gaussian", 0.12, PIX, 11)).double()
    S, _, idx = px.lensed_nodes(p, grid, n, NPIX, model, psf, 5)
    assert len(idx) < NPIX * NPIX  # a box, not the grid
    _, M_all, idx_all = px.lensed_nodes(p, grid, n, NPIX, model, None, NPIX)
    assert len(idx_all) == NPIX * NPIX
    full = convolve_psf(M_all.reshape(-1, NPIX, NPIX), psf).flatten(1)
    boxed = torch.zeros_like(full).index_add(1, idx, S)
    torch.testing.assert_close(boxed, full, rtol=0, atol=1e-9 * float(full.abs().max()))  # FFT round-off


def test_evidence_is_the_gaussian_marginal_likelihood():
    """-ln E equals -ln N(d; 0, C + S (lambda H)^-1 S^T (+ V U^T U)) written out as a dense Gaussian:
    without unregularised components exactly, with them in the limit of a broad prior V on their
    amplitudes, less the flat prior's constant (K/2) ln V."""
    g = torch.Generator().manual_seed(3)
    n, P, K = 4, 60, 2
    S = torch.rand(n * n, P, generator=g, dtype=torch.float64)
    U = torch.rand(K, P, generator=g, dtype=torch.float64)
    var = 0.5 + torch.rand(P, generator=g, dtype=torch.float64)
    d = torch.randn(P, generator=g, dtype=torch.float64) + 3.0
    H = px.regularisation(n)
    log_lam = torch.tensor(0.7, dtype=torch.float64)
    logdet_H = float(torch.linalg.slogdet(H)[1])
    var_term = 0.5 * float(torch.log(2 * math.pi * var).sum())

    def direct(cov):
        return -float(torch.distributions.MultivariateNormal(torch.zeros(P, dtype=torch.float64), cov).log_prob(d))

    base = torch.diag(var) + S.T @ torch.linalg.inv(math.exp(0.7) * H) @ S
    idx = torch.arange(P)
    nle0 = px.evidence(S, idx, U[:0], d, 1 / var, H, log_lam, logdet_H, var_term)[0]
    assert float(nle0) == pytest.approx(direct(base), rel=1e-9)
    V = 1e6
    nle = px.evidence(S, idx, U, d, 1 / var, H, log_lam, logdet_H, var_term)[0]
    assert float(nle) + 0.5 * K * math.log(V) == pytest.approx(direct(base + V * U.T @ U), abs=1e-3)


def stage_inputs():
    obs = observation(knots=True)  # a Sérsic source with two bright knots
    model = LensModel(NPIX, PIX, 2, 0)
    space = ParamSpace.for_grid(NPIX, PIX, 0, shear_max=0.1)
    fs = FitSettings(lbfgs_iters=60, irls_rounds=1, pixels=16)
    return obs, model, space, fs


def start(theta_E: float, obs, model, space) -> dict:
    """A result dict as the polish leaves it: mass perturbed, the true source Sérsic."""
    p = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in LENS.items()}
    p["theta_E"] = torch.tensor(theta_E, dtype=torch.float64)
    p["center_x"] = p["center_x"] + 0.03
    src = {"src_R": 0.15, "src_n": 1.0, "src_e1": 0.0, "src_e2": 0.0, "src_x": 0.05, "src_y": 0.03}
    p.update({k: torch.tensor(v, dtype=torch.float64) for k, v in src.items()})
    return {"p": p, "amps": torch.tensor([5.0]).double(), "var": obs.bg_var[0].expand(NPIX, NPIX).clone(), "start": 0}


def test_stage_recovers_theta_E_and_keeps_the_most_probable_start():
    obs, model, space, fs = stage_inputs()
    good, bad = start(LENS["theta_E"] * 1.04, obs, model, space), start(LENS["theta_E"] * 0.8, obs, model, space)
    good["start"], bad["start"] = 1, 2
    stage = px.PixelatedStage(obs, 0, space, model, fs, 16, NPIX)
    runs = [stage.run(c) for c in (bad, good)]
    res = px.refine([bad, good], obs, 0, space, model, fs, 16, NPIX)
    # from 4 % high: the ring of a source no Sérsic describes; from 20 % low a worse optimum, less probable
    assert float(runs[1]["p"]["theta_E"]) == pytest.approx(LENS["theta_E"], rel=0.01)
    assert float(runs[1]["p"]["center_x"]) == pytest.approx(LENS["center_x"], abs=0.02)
    assert runs[1]["nle"] < runs[0]["nle"] - 100
    assert res["px_nle"] == runs[1]["nle"] and res["start"] == 1
    assert float(res["p"]["theta_E"]) == float(runs[1]["p"]["theta_E"])
    assert res["chi2"] / res["n_pix"] < 1.2  # the knots fitted near the noise (16^2 nodes of 0.04")
    assert float(res["amps"][0]) == 0.0  # the Sérsic source is replaced
    assert res["px_flux"][0] > 0 and res["px_flux"][1] > 0 and -20 < res["px_log_lam"] < 20
    assert 1 < res["px_n_eff"] < 16**2


def test_config_and_columns(tmp_path):
    cfg = resolve_search(compose_config("fit", [f"input={tmp_path}", "lens_light=true", "source_pixels=20"]))
    assert fit_settings(cfg, 3).pixels == 20
    default = fit_settings(resolve_search(compose_config("fit", [f"input={tmp_path}"])), 3)
    assert (default.pixels, default.pixels_when) == (None, "warned")  # an option (README: its search is multimodal)
    assert columns(3, False, pixels=True)[-4:] == PIXEL_COLUMNS
    with pytest.raises(ConfigError, match="pixelated_when"):
        check_config(resolve_search(compose_config("fit", [f"input={tmp_path}", "pixelated_when=sometimes"])))
    with pytest.raises(ConfigError, match="source_pixels"):
        check_config(resolve_search(compose_config("fit", [f"input={tmp_path}", "source_pixels=3"])))


def test_grid_is_centred_on_the_light_and_reaches_three_rms():
    g = torch.Generator().manual_seed(1)
    bx, by = torch.randn(2000, generator=g).double() * 0.3 + 0.2, torch.randn(2000, generator=g).double() * 0.2
    wt = torch.rand(2000, generator=g).double()
    x0, y0, step = (float(t) for t in px.source_grid(bx, by, wt, 21))
    b, w = np.stack([bx.numpy(), by.numpy()]), wt.numpy() / wt.numpy().sum()
    centre = (b * w).sum(1)
    half = 3 * np.sqrt(((b - centre[:, None]) ** 2 * w).sum(1).max())
    assert (x0 + 10 * step, y0 + 10 * step) == pytest.approx(tuple(centre), abs=1e-12)
    assert step * 10 == pytest.approx(half, rel=1e-12)
    inside = (np.abs(b - centre[:, None]) <= half).all(0)
    assert inside.mean() > 0.95  # nearly all the light on the grid
    tiny = px.source_grid(bx * 1e-3, by * 1e-3, wt, 21)
    assert float(tiny[2]) * 10 == pytest.approx(0.1)  # at least 0.1" either side


def test_which_fits_go_on_to_the_pixelated_source():
    from lensexp.fit.optimise import needs_pixels

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    p = {"theta_E": t(1.0), "center_x": t(0.0), "center_y": t(0.0), "ll_x": t(0.05), "ll_y": t(0.0)}
    calm = {"p": p, "sh_n_max": 6, "sh_theta_E0": 1.03}  # shapelets moved theta_E 3 %, mass 0.05" off the light
    shifted = {**calm, "sh_theta_E0": 1.2}  # moved 17 %
    off = {**calm, "p": {**p, "ll_x": t(0.45)}}  # mass 0.45" off the light
    fs = FitSettings(pixels=20)
    assert [needs_pixels(r, fs) for r in (calm, shifted, off)] == [False, True, True]
    assert needs_pixels(calm, FitSettings(pixels=20, pixels_when="always"))
    assert not needs_pixels(shifted, FitSettings(pixels=None))


def test_a_pixelated_refit_is_named_in_the_warning(caplog):
    from lensexp.fit.results import warn_source_shift

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    res = {"p": {"theta_E": t(0.68)}, "sh_n_max": 6, "sh_theta_E0": 0.79, "px_nle": -3.1e4}
    with caplog.at_level("WARNING", logger="lensexp.fit"):
        warn_source_shift("J0000", res)
    assert "0.680 arcsec with the pixelated source, 0.790 with the Sérsic source (-13.9 %)" in caplog.text
