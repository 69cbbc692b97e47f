"""Maximum-likelihood fits: exact recovery, the noise model's chi-square, Laplace errors, CLI, bad input."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from astropy.io import fits

from lensexp.config import compose_config
from lensexp.errors import ConfigError
from lensexp.fit import (
    MASS,
    SOURCE,
    FitSettings,
    LensModel,
    Observation,
    ParamSpace,
    check_config,
    fit_batch,
    likelihood_terms,
    rho,
    run,
)
from lensexp.sim.psf import draw_kernel
from lensexp.sim.trace import render_sersic
from lensexp.simulate import run as simulate
from tests.conftest import train_tiny_checkpoint

LENS = dict(theta_E=1.1, e1=0.08, e2=-0.12, center_x=0.05, center_y=-0.03, gamma1=0.03, gamma2=-0.02)
SRC = dict(amp=20.0, R_sersic=0.25, n_sersic=1.5, e1=0.1, e2=0.05, center_x=0.12, center_y=0.07)
T_EXP, SKY, READ, GAIN = 1000.0, 0.36, 4.0, 2.5  # s, e-/s/px, e-, e-/ADU (the tiny preset's)
NPIX, PIX = 64, 0.1
BG_VAR = SKY / T_EXP + (READ**2 + GAIN**2 / 12) / T_EXP**2  # derived by hand: sky Poisson + read + quantisation


def psf_kernel():
    return torch.from_numpy(draw_kernel("gaussian", 0.15, PIX, 11)).double()


def observation(images, psf):
    K = images.shape[0]
    return Observation(
        images,
        torch.ones(K, NPIX, NPIX, dtype=torch.bool),
        psf.expand(K, *psf.shape[-2:]),
        torch.full((K,), BG_VAR, dtype=torch.float64),
        torch.full((K,), 1 / T_EXP, dtype=torch.float64),
    )


def noisy_copies(clean, k, seed):
    """Independent of lensexp.sim.instrument: numpy Poisson counts, read noise, ADC rounding."""
    rng = np.random.default_rng(seed)
    mean = (clean.numpy() + SKY) * T_EXP
    counts = rng.poisson(np.broadcast_to(mean, (k, *mean.shape))) + rng.normal(0, READ, (k, *mean.shape))
    return torch.from_numpy(np.round(counts / GAIN) * GAIN / T_EXP - SKY)


def truth_vector():
    return torch.tensor([[LENS[k] for k in MASS]], dtype=torch.float64)


@pytest.mark.parametrize("explore_ss", [None, 1])
def test_noiseless_fit_started_near_truth_recovers_every_parameter(explore_ss):
    """Exact recovery also when the exploration traces one ray per pixel (``adam.supersample=1``,
    the CLI default): the polish at the model's supersampling removes its bias."""
    psf = psf_kernel()
    img = render_sersic(LENS, SRC, NPIX, PIX, 2, psf)
    start = truth_vector() + 0.02 * torch.tensor([[1, -1, 1, -1, 1, -1, 1.0]], dtype=torch.float64)
    fs = FitSettings(adam_steps=150, lbfgs_iters=150, polish=1, adam_supersample=explore_ss)
    res = fit_batch(
        observation(img, psf),
        start[:, None],
        ParamSpace.for_grid(NPIX, PIX, False),
        LensModel(NPIX, PIX, 2, False),
        fs,
        [torch.Generator().manual_seed(0)],
    )[0]
    for k in MASS:
        assert float(res["p"][k]) == pytest.approx(LENS[k], abs=2e-6), k
    src = dict(zip(SOURCE, ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")))
    for k, s in src.items():
        assert float(res["p"][k]) == pytest.approx(SRC[s], abs=1e-5), k
    assert float(res["amps"][0]) == pytest.approx(SRC["amp"], rel=1e-5)
    assert res["chi2"] < 1e-6 and res["n_out"] == 0
    # mu_F of the fitted model: the lensed flux over the intrinsic flux, checked by a 4x finer render
    fine = render_sersic(LENS, SRC, NPIX, PIX, 8).sum()
    wide = render_sersic(None, SRC, 512, PIX / 2, 2).sum()
    assert float(res["p"]["mu_F"]) == pytest.approx(float(fine / wide), rel=2e-3)


def test_two_component_source_is_recovered_and_mu_F_weighs_both():
    """``source_components=2``: a disc with a compact offset knot is fitted to the noise floor
    from a start near the truth (the components' order is free: matched by size), and ``mu_F``
    is the lensed flux of both over their intrinsic flux (finer renders, by hand)."""
    from lensexp.fit.results import columns

    psf = psf_kernel()
    knot = dict(amp=60.0, R_sersic=0.06, n_sersic=1.0, e1=-0.1, e2=0.1, center_x=0.22, center_y=0.02)
    img = render_sersic(LENS, SRC, NPIX, PIX, 2, psf) + render_sersic(LENS, knot, NPIX, PIX, 2, psf)
    start = truth_vector() + 0.02 * torch.tensor([[1, -1, 1, -1, 1, -1, 1.0]], dtype=torch.float64)
    fits = {}
    for n_src in (1, 2):
        fits[n_src] = fit_batch(
            observation(img, psf),
            start[:, None],
            ParamSpace.for_grid(NPIX, PIX, 0, n_src=n_src),
            LensModel(NPIX, PIX, 2, 0, n_src),
            FitSettings(adam_steps=200, lbfgs_iters=300, polish=1),
            [torch.Generator().manual_seed(0)],
        )[0]
    res = fits[2]
    assert len(res["amps"]) == 2 and "src2_R" in res["p"]
    cols = columns(2, True, 2)
    assert cols[cols.index("src_y") + 1 : cols.index("src_y") + 3] == ["src2_R", "src2_n"]
    assert {"src2_amp", "src2_R_std", "ll2_amp"} <= set(cols)
    for k in MASS:
        assert float(res["p"][k]) == pytest.approx(LENS[k], abs=1e-4), k
    assert res["chi2"] < 1e-3 < fits[1]["chi2"] / 100  # one Sérsic cannot fit the knot
    big, small = sorted(("src_", "src2_"), key=lambda c: -float(res["p"][c + "R"]))
    amp = dict(zip(("src_", "src2_"), res["amps"].tolist()))
    assert float(res["p"][big + "R"]) == pytest.approx(SRC["R_sersic"], rel=1e-3)
    assert float(res["p"][small + "R"]) == pytest.approx(knot["R_sersic"], rel=1e-3)
    assert float(res["p"][small + "x"]) == pytest.approx(knot["center_x"], abs=1e-4)
    assert (amp[big], amp[small]) == pytest.approx((SRC["amp"], knot["amp"]), rel=1e-3)
    lensed = sum(render_sersic(LENS, s, NPIX, PIX, 8).sum() for s in (SRC, knot))
    intrinsic = sum(render_sersic(None, s, 512, PIX / 2, 2).sum() for s in (SRC, knot))
    assert float(res["p"]["mu_F"]) == pytest.approx(float(lensed / intrinsic), rel=2e-3)


def test_exploration_cut_out_keeps_every_pixel_centre():
    """Adam explores a centred cut-out (``adam.half_width``): its pixels are the full grid's inner
    pixels at the same sky positions, so a model rendered on it equals the full model's centre."""
    from lensexp.fit.optimise import explore_npix

    psf = psf_kernel()
    full = render_sersic(LENS, SRC, NPIX, PIX, 2, None)
    obs = observation(full, psf)
    model = LensModel(NPIX, PIX, 2, False)
    assert explore_npix(model, None) == NPIX and explore_npix(model, 100.0) == NPIX
    n = explore_npix(model, 2.05)  # 41 px rounded up to the grid's parity
    assert n == 42
    cut = obs.crop(n)
    assert cut.data.shape[-1] == n and cut.use.shape == cut.data.shape
    assert torch.equal(cut.data[0], full[0, 11:53, 11:53])
    small = render_sersic(LENS, SRC, n, PIX, 2, None)
    assert torch.allclose(small, cut.data, rtol=1e-12, atol=1e-12)


def test_a_lens_fit_does_not_depend_on_its_batch():
    """Each lens explores its own cut-out (a wider ring beside it widens only its own) and draws
    its starts from its name: alone or in a batch, the same optimum."""
    from lensexp.fit.optimise import own_cutouts
    from lensexp.fit.workflow import lens_generator

    psf = psf_kernel()
    wide = {**LENS, "theta_E": 2.2}
    img = torch.cat([render_sersic(LENS, SRC, NPIX, PIX, 2, psf), render_sersic(wide, SRC, NPIX, PIX, 2, psf)])
    img = img + 0.05 * torch.randn(img.shape, generator=torch.Generator().manual_seed(2), dtype=img.dtype)
    starts = torch.stack([truth_vector()[0] + 0.03, torch.tensor([wide[k] for k in MASS]).double() + 0.03])[:, None]
    fs = FitSettings(adam_steps=60, lbfgs_iters=300, polish=1, irls_rounds=1, adam_half_width=1.5)
    run = lambda sl: fit_batch(  # noqa: E731
        observation(img[sl], psf), starts[sl], ParamSpace.for_grid(NPIX, PIX, 0), LensModel(NPIX, PIX, 2, 0),
        fs, [lens_generator(0, n) for n in ("a", "b")[sl]],
    )  # fmt: skip
    alone, pair = run(slice(0, 1))[0], run(slice(0, 2))[0]
    for k in MASS:
        # the same optimum; the float32 exploration rounds differently in a batch of two (~1e-6)
        assert float(alone["p"][k]) == pytest.approx(float(pair["p"][k]), abs=1e-5), k
    cut = own_cutouts(observation(img, psf).crop(40), [20, 40])
    assert int(cut.use[0].sum()) == 400 and bool(cut.use[0, 10:30, 10:30].all()) and int(cut.use[1].sum()) == 1600
    assert torch.equal(lens_generator(0, "J1").get_state(), lens_generator(0, "J1").get_state())
    assert not torch.equal(lens_generator(0, "J1").get_state(), lens_generator(0, "J2").get_state())


def test_polish_takes_distinct_rings_first():
    from lensexp.fit.optimise import distinct_starts

    theta = [1.00, 1.01, 1.30, 0.99, 0.70]
    assert distinct_starts([0, 1, 3, 2, 4], theta, 2) == [0, 2]  # 1 and 3 are the same ring as 0
    assert distinct_starts([0, 1, 3, 2, 4], theta, 3) == [0, 2, 4]
    assert distinct_starts([0, 1], theta, 2) == [0, 1]  # no distinct one left: loss order
    assert distinct_starts([3, 0], theta, 1) == [3]


def test_lens_light_is_fitted_too():
    psf = psf_kernel()
    light = dict(
        amp=3.0, R_sersic=0.8, n_sersic=3.0, e1=0.05, e2=-0.1, center_x=LENS["center_x"], center_y=LENS["center_y"]
    )
    img = render_sersic(LENS, SRC, NPIX, PIX, 2, psf) + render_sersic(None, light, NPIX, PIX, 2, psf)
    start = truth_vector() + 0.01
    res = fit_batch(
        observation(img, psf),
        start[:, None],
        ParamSpace.for_grid(NPIX, PIX, True),
        LensModel(NPIX, PIX, 2, True),
        FitSettings(adam_steps=150, lbfgs_iters=500, polish=1),
        [torch.Generator().manual_seed(0)],
    )[0]
    for k in MASS:
        assert float(res["p"][k]) == pytest.approx(LENS[k], abs=1e-4), k
    assert float(res["p"]["ll_R"]) == pytest.approx(0.8, rel=1e-3)
    assert float(res["amps"][1]) == pytest.approx(3.0, rel=1e-3)


def test_center_prior_pulls_the_mass_towards_the_light_and_enters_the_nll():
    """Gaussian prior on mass centre - light centre: 0.5 (0.3^2 + 0.4^2) / 0.1^2 = 12.5 by hand;
    a fit whose true mass sits 0.2" from the light ends nearer the light, and its -ln posterior
    is the likelihood's plus the prior's."""
    from lensexp.fit.model import center_penalty, prior_penalty

    p = {
        "center_x": torch.tensor(0.3),
        "center_y": torch.tensor(-0.4),
        "ll_x": torch.tensor(0.0),
        "ll_y": torch.tensor(0.0),
    }
    assert float(center_penalty(p, 0.1)) == pytest.approx(12.5)
    assert center_penalty(p, None) == 0.0 and center_penalty({"center_x": 0.3, "center_y": 0.1}, 0.1) == 0.0
    psf = psf_kernel()
    light = dict(
        amp=3.0,
        R_sersic=0.8,
        n_sersic=3.0,
        e1=0.05,
        e2=-0.1,
        center_x=LENS["center_x"] - 0.2,
        center_y=LENS["center_y"],
    )
    img = render_sersic(LENS, SRC, NPIX, PIX, 2, psf) + render_sersic(None, light, NPIX, PIX, 2, psf)
    # noisy, so that the data do not pin the centre to 1e-6"
    img = img + torch.randn(img.shape, generator=torch.Generator().manual_seed(3), dtype=img.dtype) * 0.2
    obs = observation(img, psf)
    offsets = {}
    # a prior 40x tighter than the 0.2" offset: the data alone hold the centre within ~0.01",
    # so a weak prior's pull is at the optimiser's (and the CPU's) rounding level
    for sigma in (None, 0.005):
        res = fit_batch(
            obs,
            (truth_vector() + 0.01)[:, None],
            ParamSpace.for_grid(NPIX, PIX, True),
            LensModel(NPIX, PIX, 2, True),
            FitSettings(adam_steps=100, lbfgs_iters=200, polish=1, irls_rounds=1, center_sigma=sigma),
            [torch.Generator().manual_seed(0)],
        )[0]
        offsets[sigma] = float(res["p"]["center_x"] - res["p"]["ll_x"])
        m = (
            res["amps"][:, None, None]
            * LensModel(NPIX, PIX, 2, True).templates({k: v[None] for k, v in res["p"].items()}, psf[None])[0]
        ).sum(0)
        lik = likelihood_terms(m[None], img, obs.use, res["var"][None], 10.0)["nll"]
        assert res["nll"] == pytest.approx(float(lik[0]) + float(prior_penalty(res["p"], sigma)), rel=1e-9)
    assert offsets[None] == pytest.approx(0.2, abs=0.01)
    assert offsets[0.005] < 0.5 * offsets[None]


def test_the_mass_ellipticity_stays_inside_the_modulus_prior():
    """The wall: 0 for |e| < 0.7 (and a finite, zero gradient at e = 0), by hand beyond it
    (|e| = 0.71: ((0.71^2 - 0.49) / (2 0.7 0.002))^2 / 2 = 12.68); a noiseless lens of q = 0.11
    (|e| = 0.8 on the diagonal, each component inside the +-0.7 box) is fitted at |e| ~ 0.7, where
    the box alone let it reach its truth."""
    from lensexp.fit.model import ellipticity_wall

    e = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    wall = ellipticity_wall({"e1": e[0], "e2": e[1]})
    wall.backward()
    assert wall.item() == 0.0 and e.grad.tolist() == [0.0, 0.0]
    assert float(ellipticity_wall({"e1": torch.tensor(0.69), "e2": torch.tensor(0.0)})) == 0.0
    c = torch.tensor(0.71 / math.sqrt(2), dtype=torch.float64)
    v = float(ellipticity_wall({"e1": c, "e2": c}))
    assert v == pytest.approx(0.5 * ((0.71**2 - 0.49) / (2 * 0.7 * 0.002)) ** 2, rel=1e-9)
    psf = psf_kernel()
    flat = {**LENS, "e1": 0.8 / math.sqrt(2), "e2": 0.8 / math.sqrt(2)}
    img = render_sersic(flat, SRC, NPIX, PIX, 2, psf)
    start = torch.tensor([[flat[k] for k in MASS]], dtype=torch.float64) - 0.02
    res = fit_batch(
        observation(img, psf),
        start[:, None],
        ParamSpace.for_grid(NPIX, PIX, False),
        LensModel(NPIX, PIX, 2, False),
        FitSettings(adam_steps=60, lbfgs_iters=100, polish=1, irls_rounds=1),
        [torch.Generator().manual_seed(0)],
    )[0]
    modulus = math.hypot(float(res["p"]["e1"]), float(res["p"]["e2"]))
    assert 0.69 < modulus < 0.71


def test_theta_E_is_boxed_by_the_data_preset_prior_unless_given(tmp_path):
    from lensexp.fit.workflow import theta_E_range

    cfg = compose_config("fit", ["input=x", "data=tiny"])
    assert theta_E_range(cfg) == (0.3, 2.2)  # conf/data/tiny.yaml lens.theta_E
    assert theta_E_range(compose_config("fit", ["input=x", "theta_E_range=[0.5,4]"])) == (0.5, 4.0)
    space = ParamSpace.for_grid(NPIX, PIX, 0, theta_E_range=(0.3, 9.0))
    i = space.names.index("theta_E")
    assert (float(space.lo[i]), float(space.hi[i])) == pytest.approx((0.3, NPIX * PIX / 2))  # the grid's F/2 wins
    with pytest.raises(ValueError, match="leaves nothing"):
        ParamSpace.for_grid(NPIX, PIX, 0, theta_E_range=(4.0, 9.0))


def test_source_radius_box_on_request():
    from lensexp.fit.workflow import source_R_max

    assert source_R_max(compose_config("fit", ["input=x"])) is None
    assert source_R_max(compose_config("fit", ["input=x", "source_R_max=1.5"])) == 1.5
    i = ParamSpace.for_grid(NPIX, PIX, 2).names.index("src_R")
    assert float(ParamSpace.for_grid(NPIX, PIX, 2).hi[i]) == pytest.approx(NPIX * PIX / 4)  # no bound: F/4
    assert float(ParamSpace.for_grid(NPIX, PIX, 2, src_R_max=0.6).hi[i]) == pytest.approx(0.6)
    assert float(ParamSpace.for_grid(NPIX, PIX, 2, src_R_max=9.0).hi[i]) == pytest.approx(NPIX * PIX / 4)
    with pytest.raises(ValueError, match="below a quarter pixel"):
        ParamSpace.for_grid(NPIX, PIX, 2, src_R_max=0.01)


def test_fit_figure_zooms_on_the_ring_with_the_lens_light_subtracted(tmp_path):
    import matplotlib.image

    from lensexp.fit.plots import fit_figure

    lens = {k: LENS[k] for k in ("theta_E", "center_x", "center_y")}
    src = render_sersic(LENS, SRC, NPIX, PIX, 1, psf_kernel())[0]
    light = render_sersic(None, {**SRC, "R_sersic": 0.8, "center_x": 0.05, "center_y": -0.03}, NPIX, PIX, 1)[0]
    T = torch.stack([src / src.sum(), light / light.sum()])
    amps = torch.tensor([float(src.sum()), float(light.sum())], dtype=T.dtype)
    use = torch.ones(NPIX, NPIX, dtype=torch.bool)
    use[:5] = False  # masked rows stay blank
    var = torch.full((NPIX, NPIX), BG_VAR, dtype=T.dtype)
    two = fit_figure(src + light, T, amps, var, use, PIX, "two.fits", {**lens, "chi2_dof": 1.0}, tmp_path)
    one = fit_figure(src, T[:1], amps[:1], var, use, PIX, "one", {**lens, "chi2_dof": 1.0}, tmp_path)
    assert (two.name, one.name) == ("two_fit.png", "one_fit.png")
    h2, h1 = matplotlib.image.imread(two).shape[0], matplotlib.image.imread(one).shape[0]
    assert h2 == pytest.approx(2 * h1, rel=0.02)  # the zoom row with lens light, one row without


def test_search_budget_defaults_to_more_starts_with_lens_light():
    from lensexp.fit.workflow import resolve_search

    c = resolve_search(compose_config("fit", ["input=x"]))
    assert (c.n_starts, c.lbfgs.polish) == (8, 2)
    c = resolve_search(compose_config("fit", ["input=x", "lens_light=true"]))
    assert (c.n_starts, c.lbfgs.polish) == (16, 3)
    c = resolve_search(compose_config("fit", ["input=x", "lens_light=true", "n_starts=5", "lbfgs.polish=1"]))
    assert (c.n_starts, c.lbfgs.polish) == (5, 1)


def test_chi2_at_truth_is_the_number_of_pixels():
    """E[chi^2] = N for the noise model: 16 images of 4096 pixels give chi^2/N = 1 +- 0.0055."""
    psf = psf_kernel()
    clean = render_sersic(LENS, SRC, NPIX, PIX, 2, psf)
    data = noisy_copies(clean[0], 16, seed=1)
    obs = observation(data, psf)
    terms = likelihood_terms(clean.expand_as(data), data, obs.use, obs.variance(clean.expand_as(data)), None)
    ratio = float(terms["chi2"].sum()) / data.numel()
    assert abs(ratio - 1) < 4 * math.sqrt(2 / data.numel()), ratio
    # a wrong noise model is visible: the variance without the source's Poisson term
    wrong = likelihood_terms(clean.expand_as(data), data, obs.use, obs.bg_var[:, None, None].expand_as(data), None)
    assert float(wrong["chi2"].sum()) / data.numel() > ratio + 0.02
    # the robust likelihood flags almost no pixel of pure noise as an outlier at 5 sigma
    robust = likelihood_terms(clean.expand_as(data), data, obs.use, obs.variance(clean.expand_as(data)), 5.0)
    assert int(robust["n_out"].sum()) <= 3


@pytest.mark.slow
def test_fits_of_noise_realisations_are_unbiased_with_laplace_errors_that_match_their_scatter():
    psf = psf_kernel()
    clean = render_sersic(LENS, SRC, NPIX, PIX, 2, psf)
    K = 16
    data = noisy_copies(clean[0], K, seed=2)
    fs = FitSettings(adam_steps=60, lbfgs_iters=100, polish=1, laplace=True)
    res = fit_batch(
        observation(data, psf),
        truth_vector().expand(K, 7)[:, None],
        ParamSpace.for_grid(NPIX, PIX, False),
        LensModel(NPIX, PIX, 2, False),
        fs,
        [torch.Generator().manual_seed(i) for i in range(K)],
    )
    est = np.array([[float(r["p"][k]) for k in MASS] for r in res])
    std = np.array([[r["std"][k] for k in MASS] for r in res])
    ok = np.isfinite(std).all(1)
    assert ok.sum() >= K - 2
    pull = (est[ok] - truth_vector().numpy()) / std[ok]
    n = ok.sum()
    assert np.all(np.abs(pull.mean(0)) < 4 / math.sqrt(n)), pull.mean(0)  # unbiased
    assert np.all((pull.std(0) > 0.55) & (pull.std(0) < 1.6)), pull.std(0)  # errors match the scatter
    chi2_dof = np.array([r["chi2"] / r["dof"] for r in res])
    assert abs(chi2_dof.mean() - 1) < 0.02


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def fits_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("fits")
    simulate(
        compose_config(
            "simulate",
            [
                "data=tiny",
                "data.source.kind=sersic",
                "data.source.clumps.n=[0,0]",
                "data.source.mag=[20,21]",
                "data.lens.theta_E=[0.8,1.6]",
                "n=3",
                "seed=4",
                "format=fits",
                f"out={d}",
                "progress=false",
            ],
        )
    )
    return d


def fit_cfg(inp, out, *over):
    return compose_config(
        "fit", [f"input={inp}", f"out={out}", "progress=false", "adam.steps=120", "lbfgs.iters=60", *over]
    )


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def truth_rows(d):
    return {r["name"]: r for r in read_rows(d / "truth.csv")}


def test_cli_blind_fit_writes_the_contract_columns_and_finds_bright_lenses(fits_set, tmp_path):
    out = tmp_path / "fits.csv"
    run(
        fit_cfg(
            fits_set,
            out,
            "n_starts=8",
            "init=prior",
            "laplace=true",
            "adam.steps=300",
            "lbfgs.iters=100",
            f"save_plots={tmp_path / 'png'}",
        )
    )
    rows = read_rows(out)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"lens_{i:06d}_fit.png" for i in range(3)]
    assert list(rows[0])[:10] == ["name", *MASS, "chi2_dof", "seconds"]
    assert "theta_E_std" in rows[0] and "src_R" in rows[0]
    truth = truth_rows(fits_set)
    assert [r["name"] for r in rows] == sorted(truth)
    for r in rows:
        t = truth[r["name"]]
        assert float(r["chi2_dof"]) < 1.3, r
        assert abs(float(r["theta_E"]) - float(t["theta_E"])) < 0.05, (r["name"], r["theta_E"], t["theta_E"])
        assert float(r["seconds"]) > 0
    assert not (tmp_path / "fits.csv.partial").exists()


def test_cli_is_deterministic_and_resumes(fits_set, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    run(fit_cfg(fits_set, a, "init=truth", f"truth={fits_set / 'truth.csv'}", "batch_size=2"))
    rows = read_rows(a)
    # an interrupted run: the first batch (two lenses) is already in b.csv.partial
    with open(tmp_path / "b.csv.partial", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:2])
    run(fit_cfg(fits_set, b, "init=truth", f"truth={fits_set / 'truth.csv'}", "batch_size=2"))
    again = read_rows(b)
    assert [r["name"] for r in again] == [r["name"] for r in rows]
    for r1, r2 in zip(rows, again):
        assert {k: r1[k] for k in MASS} == {k: r2[k] for k in MASS}  # same batches, same numbers
    # a partial file from other settings is refused, not mixed in
    with open(tmp_path / "c.csv.partial", "w") as fh:
        fh.write("name,theta_E\nx,1\n")
    with pytest.raises(ConfigError, match="other settings"):
        run(fit_cfg(fits_set, tmp_path / "c.csv", "init=truth", f"truth={fits_set / 'truth.csv'}"))


def test_cli_fit_of_a_lens_does_not_depend_on_the_other_files(fits_set, tmp_path):
    """By default (batch_size=1) each lens is optimised alone: its row is bitwise the same whether
    it is fitted in a folder with others or on its own (in a batch, float32 rounding depends on
    the batch mates, which moved real-lens fits by up to 6 % in theta_E)."""
    # a narrow exploration cut-out, so lenses of a batch would explore on different crops (with
    # batch_size=3 this lens then ends elsewhere: e1 0.58 against 0.35)
    fast = ("n_starts=4", "adam.steps=60", "lbfgs.iters=30", "adam.half_width=1.0")
    run(fit_cfg(fits_set, tmp_path / "all.csv", *fast))
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "lens_000001.fits").symlink_to(fits_set / "lens_000001.fits")
    run(fit_cfg(alone, tmp_path / "one.csv", *fast))
    together = {r["name"]: r for r in read_rows(tmp_path / "all.csv")}["lens_000001.fits"]
    (single,) = read_rows(tmp_path / "one.csv")
    assert {k: together[k] for k in MASS} == {k: single[k] for k in MASS}


def test_cli_cnn_initialised_fit_starts_from_the_network_posterior(fits_set, tmp_path_factory, tmp_path):
    from lensexp.fit import cnn_starts
    from lensexp.io import read_fits, to_grid
    from lensexp.predict import Predictor
    from lensexp.predict import run as predict

    ckpt = train_tiny_checkpoint(tmp_path_factory.mktemp("run"))
    out = tmp_path / "cnn.csv"
    run(fit_cfg(fits_set, out, "init=cnn", f"ckpt={ckpt}", "n_starts=4", "n_mc=4"))
    rows = read_rows(out)
    assert len(rows) == 3 and all(0 <= int(r["start"]) < 4 for r in rows)
    assert all(0 < float(r["chi2_dof"]) < 10 for r in rows)
    # the starts: the posterior mean lensexp.predict reports, then distinct posterior samples
    predict(
        compose_config(
            "predict", [f"ckpt={ckpt}", f"input={fits_set}", f"out={tmp_path / 'p.csv'}", "n_mc=32", "progress=false"]
        )
    )
    pred_rows = read_rows(tmp_path / "p.csv")
    pred = Predictor(str(ckpt), n_mc=32, n_samples=1024)
    imgs = torch.from_numpy(np.stack([to_grid(read_fits(fits_set / r["name"])[0], 64) for r in pred_rows]))
    starts = cnn_starts(pred, imgs, 4)
    assert starts.shape == (3, 4, 7) and len(torch.unique(starts[:, :, 0])) == 12
    for i, r in enumerate(pred_rows):
        for j, k in enumerate(MASS):
            assert abs(float(starts[i, 0, j]) - float(r[k])) < 0.3 * float(r[f"{k}_std"]), (k, r)


def test_bad_input_messages(fits_set, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = fits_set / "lens_000000.fits"
    (d / "a_good.fits").write_bytes(good.read_bytes())
    (d / "b_garbage.fits").write_bytes(b"SIMPLE = nonsense")
    fits.PrimaryHDU(np.full((64, 64), np.nan, np.float32)).writeto(d / "c_nan.fits")
    h = fits.PrimaryHDU(fits.getdata(good))
    h.header["PIXSCALE"] = 0.1
    h.writeto(d / "d_no_psf.fits")
    fits.HDUList([fits.PrimaryHDU(fits.getdata(good)), fits.open(good)["PSF"].copy()]).writeto(d / "e_no_scale.fits")
    bad_psf = fits.HDUList([fits.PrimaryHDU(fits.getdata(good)), fits.ImageHDU(np.ones((4, 4)), name="PSF")])
    bad_psf[0].header["PIXSCALE"] = 0.1
    bad_psf.writeto(d / "f_even_psf.fits")
    out = tmp_path / "f.csv"
    res = run(fit_cfg(d, out, "adam.steps=20", "lbfgs.iters=5", "n_starts=2"))
    assert res["n"] == 1 and [r["name"] for r in read_rows(out)] == ["a_good.fits"]
    errs = {r["name"]: r["error"] for r in read_rows(tmp_path / "f.errors.csv")}
    assert set(errs) == {"b_garbage.fits", "c_nan.fits", "d_no_psf.fits", "e_no_scale.fits", "f_even_psf.fits"}
    assert "unreadable FITS" in errs["b_garbage.fits"] or "no image" in errs["b_garbage.fits"]
    assert "no finite pixels" in errs["c_nan.fits"]
    assert "no PSF" in errs["d_no_psf.fits"] and "psf_fwhm=" in errs["d_no_psf.fits"]
    assert "no pixel scale" in errs["e_no_scale.fits"]
    assert "odd-sized" in errs["f_even_psf.fits"]
    # the same file fitted with a PSF and band given on the command line
    with pytest.raises(ConfigError, match="no usable input: all 1 file"):  # nothing usable: an error, no table
        run(
            fit_cfg(
                d / "d_no_psf.fits",
                tmp_path / "g.csv",
                "psf_fwhm=0.15",
                "band=3",
                "adam.steps=5",
                "lbfgs.iters=2",
                "n_starts=1",
            )
        )
    assert not (tmp_path / "g.csv").exists()
    assert "band=3 but the file has 1 band(s)" in read_rows(tmp_path / "g.errors.csv")[0]["error"]


@pytest.mark.parametrize(
    "over, message",
    [
        (["init=cnn"], "init=cnn needs ckpt="),
        (["init=guess"], "init must be one of"),
        (["init=truth"], "init=truth needs truth="),
        (["init=truth", "truth=/nonexistent/truth.csv"], "truth file not found"),
        (["n_starts=0"], "n_starts must be >= 1"),
        (["lbfgs.sie_candidates=0"], "lbfgs.sie_candidates must be >= 1"),
        (["adam.supersample=-1"], "adam.supersample must be >= 0"),
        (["shear_max=0"], "shear_max must be in"),
        (["center_prior=-0.1"], "center_prior must be > 0"),
        (["source_R_max=0"], "source_R_max must be > 0"),
        (["source_components=3"], "source_components must be 1 or 2"),
        (["theta_E_range=[2.0,1.0]"], "theta_E_range must be"),
        (["adam.half_width=-1"], "adam.half_width must be > 0"),
        (["adam.dtype=float16"], "adam.dtype must be float32 or float64"),
        (["psf=/nonexistent/psf.fits"], "psf file not found"),
        (["psf_fwhm=-1"], "psf_fwhm must be > 0"),
    ],
)
def test_config_errors(fits_set, tmp_path, over, message):
    with pytest.raises(ConfigError, match=message):
        run(fit_cfg(fits_set, tmp_path / "x.csv", *over))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_input(tmp_path):
    with pytest.raises(ConfigError, match="input not found"):
        run(fit_cfg(tmp_path / "nowhere", tmp_path / "x.csv"))


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_compare_fit_errors_times_and_optimum_rate(tmp_path):
    from lensexp.compare_fit import run as compare_fit

    names = [f"l{i}" for i in range(4)]
    truth = [{"name": n, "theta_E": 1.0 + i / 10, "e1": 0.0} for i, n in enumerate(names)]
    write_csv(tmp_path / "truth.csv", truth)
    cnn_err = [0.1, -0.1, 0.2, -0.2]
    write_csv(
        tmp_path / "cnn.csv",
        [{"name": n, "theta_E": t["theta_E"] + e, "e1": 0.0} for n, t, e in zip(names, truth, cnn_err)],
    )
    fit = [
        {
            "name": n,
            "theta_E": t["theta_E"] + 0.01,
            "e1": 0.02,
            "chi2_dof": 1.0 + i / 10,
            "seconds": 2.0,
            "nll": 100.0 + (5 if i == 3 else 0),
        }
        for i, (n, t) in enumerate(zip(names, truth))
    ]
    write_csv(tmp_path / "fit.csv", fit)
    write_csv(tmp_path / "ref.csv", [{"name": n, "theta_E": 0, "nll": 100.5} for n in names])
    cfg = compose_config(
        "compare_fit",
        [
            f"truth={tmp_path / 'truth.csv'}",
            f"out={tmp_path / 'out'}",
            f"methods={{cnn: {tmp_path / 'cnn.csv'}, fit: {tmp_path / 'fit.csv'}}}",
            f"reference={tmp_path / 'ref.csv'}",
            "seconds={cnn: 0.05}",
        ],
    )
    rows = {r["method"]: r for r in compare_fit(cfg)}
    assert rows["cnn"]["rmse/theta_E"] == pytest.approx(math.sqrt(np.mean(np.square(cnn_err))))
    assert rows["cnn"]["median_abs/theta_E"] == pytest.approx(0.15)
    assert rows["fit"]["bias/theta_E"] == pytest.approx(0.01) and rows["fit"]["rmse/e1"] == pytest.approx(0.02)
    assert rows["fit"]["time_ratio"] == pytest.approx(40.0) and rows["cnn"]["time_ratio"] == pytest.approx(1.0)
    assert rows["fit"]["optimum_rate"] == pytest.approx(0.75) and rows["fit"]["median_chi2_dof"] == pytest.approx(1.15)
    for f in ("fit_comparison.csv", "fit_comparison.md", "fit_comparison.html", "fit_vs_truth.png"):
        assert (tmp_path / "out" / f).is_file()
    with pytest.raises(ConfigError, match="method 'x' not found"):
        compare_fit(compose_config("compare_fit", [f"truth={tmp_path / 'truth.csv'}", "methods={x: /nope.csv}"]))


def test_psf_from_a_fits_file_resampled_to_the_image(fits_set, tmp_path, emp_psf):
    from lensexp.fit import load_psf

    k = load_psf(str(emp_psf), 0.1, 0.01)  # 101 px at 0.01"/px -> 11 px at 0.1"/px
    assert k.shape == (11, 11) and k.sum() == pytest.approx(1.0, rel=1e-5) and k.argmax() == 60
    h = fits.PrimaryHDU(fits.getdata(fits_set / "lens_000000.fits"))
    h.header.update(PIXSCALE=0.1, EXPTIME=1000.0, SKYLEV=0.36, RDNOISE=4.0, GAIN=2.5)
    h.writeto(tmp_path / "no_psf.fits")
    res = run(
        fit_cfg(
            tmp_path / "no_psf.fits",
            tmp_path / "f.csv",
            f"psf={emp_psf}",
            "psf_pixscale=0.01",
            "adam.steps=30",
            "lbfgs.iters=10",
            "n_starts=2",
        )
    )
    assert res["n"] == 1 and not res["errors"]


def test_two_band_cube_with_lens_light_is_cleaned_by_ica_then_fitted(tmp_path):
    psf = psf_kernel()
    arcs = render_sersic(LENS, SRC, NPIX, PIX, 2, psf)[0]
    light = render_sersic(
        None,
        dict(
            amp=2.0, R_sersic=0.8, n_sersic=3.0, e1=0.05, e2=-0.1, center_x=LENS["center_x"], center_y=LENS["center_y"]
        ),
        NPIX,
        PIX,
        2,
        psf,
    )[0]
    red = noisy_copies(arcs + light, 1, seed=5)[0]  # red lens galaxy, blue source
    blue = noisy_copies(1.5 * arcs + 0.15 * light, 1, seed=6)[0]
    d = tmp_path / "cubes"
    d.mkdir()
    h = fits.PrimaryHDU(torch.stack([red, blue]).numpy().astype(np.float32))
    h.header["PIXSCALE"] = PIX
    fits.HDUList([h, fits.ImageHDU(psf.numpy(), name="PSF")]).writeto(d / "cube.fits")
    write_csv(d / "truth.csv", [{"name": "cube.fits", **LENS}])
    out = tmp_path / "f.csv"
    res = run(fit_cfg(d, out, "ica=true", "init=truth", f"truth={d / 'truth.csv'}"))
    assert res["n"] == 1
    row = read_rows(out)[0]
    assert abs(float(row["theta_E"]) - LENS["theta_E"]) < 0.02
    assert abs(float(row["center_x"]) - LENS["center_x"]) < 0.02
    # ica=true refuses one-band files
    one = tmp_path / "one"
    one.mkdir()
    fits.HDUList([fits.PrimaryHDU(red.numpy()), fits.ImageHDU(psf.numpy(), name="PSF")]).writeto(one / "r.fits")
    with pytest.raises(ConfigError, match="no usable input"):
        run(fit_cfg(one, tmp_path / "h.csv", "ica=true", "pixscale=0.1"))
    assert "ica=true needs a (2, H, W) two-band cube" in read_rows(tmp_path / "h.errors.csv")[0]["error"]


def bright_elliptical_lens(npix=64, pix=0.05, seed=0):
    """An SLACS-like image: two-Sérsic lens light ~40x brighter at its peak than the arcs, noise."""
    psf = torch.from_numpy(draw_kernel("gaussian", 0.1, pix, 11)).double()
    lens = dict(theta_E=1.2, e1=0.1, e2=-0.05, center_x=0.03, center_y=-0.02, gamma1=0.02, gamma2=0.01)
    src = dict(amp=4.0, R_sersic=0.12, n_sersic=1.0, e1=0.1, e2=0.0, center_x=0.08, center_y=0.05)
    light = [
        dict(amp=30.0, R_sersic=1.2, n_sersic=4.0, e1=0.08, e2=-0.04, center_x=0.03, center_y=-0.02),
        dict(amp=40.0, R_sersic=0.15, n_sersic=1.0, e1=0.08, e2=-0.04, center_x=0.03, center_y=-0.02),
    ]
    img = render_sersic(lens, src, npix, pix, 2, psf) + sum(render_sersic(None, c, npix, pix, 2, psf) for c in light)
    return noisy_observation(img, psf, 0.02 * float(img[0].max()) / 40, seed), lens, npix, pix


def noisy_observation(img, psf, sigma: float, seed: int) -> Observation:
    """One image [1, N, N] plus Gaussian noise of ``sigma``, every pixel used, no Poisson term."""
    noisy = img + sigma * torch.randn(img.shape, generator=torch.Generator().manual_seed(seed), dtype=img.dtype)
    return Observation(
        noisy,
        torch.ones_like(noisy, dtype=torch.bool),
        psf[None],
        torch.tensor([sigma**2]).double(),
        torch.zeros(1).double(),
    )


def test_light_first_then_the_ring_gives_theta_E_of_a_bright_elliptical():
    from lensexp.fit.light import fit_light, ring_theta_E

    obs, lens, npix, pix = bright_elliptical_lens()
    model = LensModel(npix, pix, 2, 2)
    space = ParamSpace.for_grid(npix, pix, 2)
    light = fit_light(obs, space, model, 100, 0.05, 10.0)
    p = dict(zip(light["names"], light["p"][0]))
    assert float(p["ll_x"]) == pytest.approx(lens["center_x"], abs=0.02)
    assert float(p["ll_y"]) == pytest.approx(lens["center_y"], abs=0.02)
    assert float(ring_theta_E(obs, light, model)[0]) == pytest.approx(lens["theta_E"], rel=0.15)
    # the whole fit from the ring: blind (no mass start given), theta_E to 2 %
    fs = FitSettings(adam_steps=150, lbfgs_iters=40, polish=1, irls_rounds=1, light_steps=100, ring_start=True)
    res = fit_batch(
        obs, torch.zeros(1, 3, 7, dtype=torch.float64), space, model, fs, [torch.Generator().manual_seed(1)]
    )[0]
    assert float(res["p"]["theta_E"]) == pytest.approx(lens["theta_E"], rel=0.02)


def elliptical_with_envelope():
    """A core, a de Vaucouleurs bulge and a rounder exponential envelope (an elliptical with a
    halo), 64 px at 0.05", Gaussian noise: (observation, noiseless image, sigma, npix, pixscale)."""
    npix, pix = 64, 0.05
    psf = torch.from_numpy(draw_kernel("gaussian", 0.1, pix, 11)).double()
    centre = dict(center_x=0.03, center_y=-0.02)
    parts = [
        dict(amp=40.0, R_sersic=0.12, n_sersic=1.0, e1=0.1, e2=-0.05, **centre),
        dict(amp=8.0, R_sersic=0.6, n_sersic=4.0, e1=0.1, e2=-0.05, **centre),
        dict(amp=1.5, R_sersic=1.5, n_sersic=0.8, e1=-0.15, e2=0.1, **centre),
    ]
    img = sum(render_sersic(None, c, npix, pix, 2, psf) for c in parts)
    sigma = 0.002 * float(img.max())
    return noisy_observation(img, psf, sigma, 3), img, sigma, npix, pix


def test_a_third_light_component_fits_an_envelope_two_cannot():
    """``lens_light_components=3``: a core, a de Vaucouleurs bulge and a rounder exponential
    envelope (an elliptical with a halo) are fitted to the noise by three Sérsics, not by two."""
    from lensexp.fit.light import fit_light
    from lensexp.fit.model import amp_names, light_names

    obs, img, sigma, npix, pix = elliptical_with_envelope()
    noisy = obs.data
    chi2 = {}
    for n in (2, 3):
        light = fit_light(obs, ParamSpace.for_grid(npix, pix, n), LensModel(npix, pix, 2, n), 400, 0.05, None)
        assert light["names"] == light_names(n)
        chi2[n] = float(((noisy - light["image"]) ** 2).sum()) / sigma**2 / npix**2
    assert amp_names(3) == ["src_amp", "ll_amp", "ll2_amp", "ll3_amp"]
    assert chi2[3] < 1.2 and chi2[2] > 1.5 * chi2[3]  # measured 0.99 and 1.90


def test_lbfgs_finishes_the_light_fit_where_adam_stops_short():
    """The light-only fit's L-BFGS finish (``lbfgs.light_iters``) takes three Sérsics from 50
    Adam steps to the noise floor (chi2 at or below the truth's), which 50 Adam steps alone miss
    by far; it is lens by lens, so a lens's light does not depend on its batch."""
    from lensexp.fit.light import fit_light

    obs, img, sigma, npix, pix = elliptical_with_envelope()
    space, model = ParamSpace.for_grid(npix, pix, 3), LensModel(npix, pix, 2, 3)
    chi2 = lambda image: float(((obs.data - image) ** 2).sum()) / sigma**2  # noqa: E731 (4 096 pixels)
    adam = chi2(fit_light(obs, space, model, 50, 0.05, None)["image"])
    finished = fit_light(obs, space, model, 50, 0.05, None, lbfgs_iters=500)
    truth = chi2(img)
    # the truth's chi2 less the ~17 parameters' worth the fit absorbs from the noise: measured
    # Adam +175, Adam + L-BFGS -15
    assert chi2(finished["image"]) <= truth and adam > truth + 50
    two = Observation(*(torch.cat([t, t]) for t in (obs.data, obs.use, obs.psf, obs.bg_var, obs.inv_t)))
    pair = fit_light(two, space, model, 50, 0.05, None, lbfgs_iters=500)
    assert torch.allclose(pair["p"][0], finished["p"][0], atol=1e-3)  # to the optimiser's tolerance (~1e-4)


def test_light_starts_keep_each_lens_best_start():
    """``adam.light_starts``: every lens is fitted from each start variant and the lowest robust
    chi-square is kept; one start is the single-start fit exactly."""
    from lensexp.fit.light import LIGHT_START_VARIANTS, fit_light
    from lensexp.fit.workflow import resolve_search

    obs, img, sigma, npix, pix = elliptical_with_envelope()
    two = Observation(*(torch.cat([t, t]) for t in (obs.data, obs.use, obs.psf, obs.bg_var, obs.inv_t)))
    space, model = ParamSpace.for_grid(npix, pix, 3), LensModel(npix, pix, 2, 3)
    one = fit_light(two, space, model, 30, 0.05, 10.0)
    many = fit_light(two, space, model, 30, 0.05, 10.0, n_starts=3)
    assert one["chi2"].shape == (2, 1) and many["chi2"].shape == (2, len(LIGHT_START_VARIANTS))
    torch.testing.assert_close(many["chi2"][:, 0], one["chi2"][:, 0])  # the first start is the single one
    assert len(set(many["chi2"][0].tolist())) == 3  # the starts reach different fits
    w = two.weights()
    kept = (rho(w * (two.data - many["image"]) ** 2, 10.0) * (w > 0)).sum((1, 2))
    torch.testing.assert_close(kept, many["chi2"].amin(1))  # the best start's image and parameters
    with pytest.raises(ConfigError, match="adam.light_starts must be 1-3"):
        check_config(resolve_search(compose_config("fit", ["input=x", "adam.light_starts=4"])))


def test_light_screen_finishes_only_each_lens_best_start():
    """``lbfgs.light_screen_iters``: every start gets the screen's L-BFGS iterations, the best
    per lens (as a screen-only run ranks them) is finished and kept, improving on its screen."""
    from lensexp.fit.light import fit_light
    from lensexp.fit.workflow import resolve_search

    obs, img, sigma, npix, pix = elliptical_with_envelope()
    two = Observation(*(torch.cat([t, t]) for t in (obs.data, obs.use, obs.psf, obs.bg_var, obs.inv_t)))
    space, model = ParamSpace.for_grid(npix, pix, 3), LensModel(npix, pix, 2, 3)
    screened = fit_light(two, space, model, 20, 0.05, 10.0, lbfgs_iters=4, n_starts=3)
    finished = fit_light(two, space, model, 20, 0.05, 10.0, lbfgs_iters=30, n_starts=3, screen_iters=4)
    pick = screened["chi2"].argmin(1)
    lens = torch.arange(2)
    # the losers keep their screen, the winner (same start as the screen-only ranking) is finished
    loser = torch.ones_like(finished["chi2"], dtype=torch.bool)
    loser[lens, pick] = False
    torch.testing.assert_close(finished["chi2"][loser], screened["chi2"][loser])
    assert (finished["chi2"][lens, pick] < screened["chi2"][lens, pick] - 1).all()
    w = two.weights()
    kept = (rho(w * (two.data - finished["image"]) ** 2, 10.0) * (w > 0)).sum((1, 2))
    torch.testing.assert_close(kept, finished["chi2"][lens, pick])
    with pytest.raises(ConfigError, match="lbfgs.light_screen_iters must be >= 0"):
        check_config(resolve_search(compose_config("fit", ["input=x", "lbfgs.light_screen_iters=-1"])))
