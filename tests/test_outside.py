"""The outside-style check: lenstronomy-made lenses through a checkpoint and its recalibration."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from lensexp.calibrate import run
from lensexp.checkpoints import load_module
from lensexp.config import compose_config
from lensexp.paths import PROJECT_ROOT
from lensexp.recalibrate import Recalibration, image_snr
from tests.conftest import train_tiny_checkpoint

pytest.importorskip("lenstronomy")
sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
from outside_coverage import evaluate, table_rows  # noqa: E402
from outside_sets import NARROW, make_set, moffat_kernel, prior_ranges  # noqa: E402


def test_outside_sets_follow_the_conventions():
    bright, faint = make_set("bright_rings", 12, 0), make_set("faint_arcs", 12, 0)
    assert bright["images"].shape == (12, 1, 64, 64) and bright["images"].dtype == np.float32
    # the faint set is fainter to the detector, not only by its stated magnitudes
    assert float(image_snr(torch.from_numpy(faint["images"])).median()) < 0.5 * float(
        image_snr(torch.from_numpy(bright["images"])).median()
    )
    # labels: e1, e2 from phi and q (e <= 1/3 for q >= 0.5), shear inside its range, mu_F > 1
    lab = bright["labels"]
    assert np.all(np.hypot(lab[:, 1], lab[:, 2]) < 0.43) and np.all(np.abs(lab[:, 5:7]) <= 0.08)
    assert np.all(lab[:, 7] > 1.0)
    # the Moffat kernel's FWHM is the one asked for (half maximum at the stated radius)
    k = moffat_kernel(0.3, 3.0, size=41, pixscale=0.01, sub=1)
    row = k[20] / k[20, 20]
    assert abs(np.interp(0.5, row[20:][::-1], np.arange(21)[::-1]) * 0.01 * 2 - 0.3) < 0.015


def test_sets_can_draw_their_lenses_from_a_training_prior():
    """``ranges=prior_ranges(preset)``: lens parameters over the preset's whole prior (wider than
    the default narrow ranges: centres beyond 0.2", shears beyond 0.08), with the same kinds of
    images and the PSF of each image described."""
    import yaml

    want = yaml.safe_load((PROJECT_ROOT / "conf" / "data" / "tiny.yaml").read_text())["lens"]
    ranges = prior_ranges("tiny_broad")  # tiny_broad keeps tiny's lens prior
    assert ranges == {k: tuple(want[k]) for k in NARROW}
    d = make_set("bright_rings", 16, 0, ranges)
    lab = d["labels"]
    assert np.all((lab[:, 0] >= 0.3) & (lab[:, 0] <= 2.2)) and np.all(np.abs(lab[:, 3:5]) <= 0.25)
    assert np.abs(lab[:, 3:5]).max() > 0.2 and np.abs(lab[:, 5:7]).max() > 0.08
    assert d["psf_ee"].shape == (16, 5) and np.all(np.diff(d["psf_ee"], axis=1) >= 0)
    narrow = make_set("bright_rings", 16, 0)["labels"]
    assert np.abs(narrow[:, 3:5]).max() <= 0.2 and np.abs(narrow[:, 5:7]).max() <= 0.08


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    ckpt = train_tiny_checkpoint(tmp_path_factory.mktemp("run"))
    cfg = compose_config(
        "calibrate",
        [
            f"ckpt={ckpt}",
            f"out={ckpt.parent / 'cal'}",
            "on_the_fly=true",
            "data.source.kind=sersic",
            "max_lenses=64",
            "n_mc=4",
            "batch_size=32",
            "progress=false",
            "wandb.mode=disabled",
            "recalibrate_method=conditional",
        ],
    )
    run(cfg)
    return ckpt


def test_recalibration_is_applied_per_image_on_outside_lenses(calibrated):
    module = load_module(calibrated)
    cal = Recalibration.from_dict(json.loads((calibrated.parent / "calibration.json").read_text()), module.labels)
    d = make_set("faint_arcs", 24, 1)
    images, truth = torch.from_numpy(d["images"]), torch.from_numpy(d["labels"])
    res = evaluate(module, images, truth, cal, n_mc=4)
    before, after = res["before"], res["after"]
    # each lens's spread is multiplied by its own scale (S/N and posterior std), per label
    samples = res["c"]["samples"]
    expect = cal.scales(samples, res["c"]["snr"]) * torch.from_numpy(cal.factor)
    # (physical = affine of network units, except mu_F, learned as log mu_F)
    ratio = (after["std"] / before["std"]).double()
    torch.testing.assert_close(ratio[:, :7], expect[:, :7], rtol=1e-4, atol=1e-6)
    assert cal.method == "conditional" and float(expect.std(0).max()) > 1e-3  # not one scale for all
    rows = table_rows(module.labels, res)
    assert rows["n"] == 24 and set(rows["labels"]) == set(module.labels)
    assert sum(g["n"] for g in after["groups"]["snr"].values()) <= 24


def test_information_bound_belongs_to_the_images_and_is_numerically_stable():
    """``benchmarks/information_floor.py``: the kept lenstronomy models made the set's images (noise
    residuals of unit variance under the noise the bound assumes), the Cramer-Rao bound does not
    depend on the difference step, and it falls with the source's flux."""
    from information_floor import fisher_bound

    d = make_set("faint_arcs", 4, 0, models=True)
    for (sim, image_model, kw_lens, kw_source), img in zip(d["models"], d["images"]):
        clean = image_model.image(kw_lens, kw_source)
        z = (img[0] - clean) / sim.estimate_noise(clean)
        assert 0.9 < z.std() < 1.1 and abs(z.mean()) < 0.05
    sim, image_model, kw_lens, kw_source = d["models"][0]
    b = fisher_bound(sim, image_model, kw_lens, kw_source)
    assert b.shape == (7,) and np.all(np.isfinite(b)) and np.all(b > 0)
    np.testing.assert_allclose(fisher_bound(sim, image_model, kw_lens, kw_source, step=2.5e-4), b, rtol=0.02)
    brighter = [dict(kw_source[0], amp=kw_source[0]["amp"] * 16)]  # 3 mag brighter: noise up by at most 4x
    assert np.all(fisher_bound(sim, image_model, kw_lens, brighter) < b / 3)


def test_kappa_floor_maps_the_same_lenses_and_carries_the_posterior_to_the_map():
    """``benchmarks/kappa_floor.py``: its lenstronomy maps are lensexp's convergence on the
    conventions.md grid, the map Jacobian is the analytic one (SIS: d kappa / d theta_E = 1 / (2 r),
    zero where kappa is clipped), the isothermal stand-in is exact for SIE lenses and not for power
    laws, and the ideal observer's map error falls with the source's flux."""
    from kappa_floor import annulus_error, ideal_errors, kappa_jacobian, make_set as kappa_set

    from lensexp.sim.mass import epl_convergence

    d = kappa_set("epl", 3, 0)
    c = (np.arange(64) - 31.5) * 0.1
    np.testing.assert_allclose(d["x"], np.broadcast_to(c, (64, 64)), atol=1e-12)  # x grows with column
    np.testing.assert_allclose(d["y"], np.broadcast_to(c[:, None], (64, 64)), atol=1e-12)
    for (_, _, kw_lens, _), k in zip(d["models"], d["kappa"]):
        m = kw_lens[0]
        ours = epl_convergence(
            torch.from_numpy(d["x"]),
            torch.from_numpy(d["y"]),
            m["theta_E"],
            m["gamma"],
            m["e1"],
            m["e2"],
            m["center_x"],
            m["center_y"],
        ).numpy()
        np.testing.assert_allclose(ours, k, rtol=1e-6)
    assert np.all(annulus_error(d["kappa_main"], d["kappa"], d["pixscale"]) > 0.05)
    x, y = np.array([0.5, 1.0, 0.1]), np.array([0.0, 0.3, 0.0])
    sis = [{"theta_E": 1.0, "center_x": 0.0, "center_y": 0.0}, {}]
    j = kappa_jacobian(sis, ["SIS"], (("theta_E", 0), ("gamma1", 1)), x, y)
    np.testing.assert_allclose(j[0], [1.0, 1 / (2 * np.hypot(1.0, 0.3)), 0.0], rtol=1e-6)  # kappa(0.1") = 5 > 3
    assert np.all(j[1] == 0)
    s = kappa_set("sie", 2, 1)
    assert np.all(annulus_error(s["kappa_main"], s["kappa"], s["pixscale"]) == 0)
    base = ideal_errors(s, "sie")["kappa_mae"]
    s["models"] = [(sim, im, kl, [dict(ks[0], amp=ks[0]["amp"] * 16)]) for sim, im, kl, ks in s["models"]]
    assert np.all(base > 0) and np.all(ideal_errors(s, "sie")["kappa_mae"] < base / 2)


def test_mc_turns_passes_turn_each_gaussian_back_to_the_image_frame():
    """``benchmarks/mc_turns.py``: with dropout off, the 8 turned passes average to the ``d4``
    centre (computed by another path, :meth:`point_estimate`); each pass's sigma is the network's
    sigma on the turned image, moved to the label it turns into (transpose: centre x <-> y) and
    rescaled by the labels' spreads; labels that do not turn keep theirs."""
    from mc_turns import turned_passes

    from lensexp.labels import D4, d4_image
    from lensexp.models import MCDropout
    from tests.test_d4 import _module

    m = _module()
    for mod in m.modules():
        if isinstance(mod, MCDropout):
            mod.p = 0.0
    m.mc_passes = lambda n: n  # 8 deterministic passes, one per turn
    m.scaler.label_std.copy_(torch.linspace(0.5, 2.0, len(m.labels)))  # unequal spreads: a missed swap shows
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    means, sigmas = turned_passes(m, x, 8)
    assert means.shape == sigmas.shape == (8, 2, len(m.labels)) and bool((sigmas > 0).all())
    assert torch.allclose(means.mean(0), m.point_estimate(x, "d4"), atol=1e-5)
    k = D4.index((True, False, False))
    _, raw = m.loss_fn.mean_std(m(d4_image(x, *D4[k])))
    col, std = {n: i for i, n in enumerate(m.labels)}, m.scaler.label_std
    for a, b in (("center_x", "center_y"), ("center_y", "center_x"), ("e1", "e1"), ("theta_E", "theta_E")):
        assert torch.allclose(sigmas[k, :, col[a]] * std[col[a]], raw[:, col[b]] * std[col[b]], rtol=1e-5), a
