"""The pixel grid's 8 symmetries: labels turned back by an independent derivation, and the
``d4`` posterior centre (dropout off, averaged over them) exactly equivariant for any network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensexp.build import lens_module
from lensexp.errors import ConfigError
from lensexp.labels import D4, d4_back, d4_forward_each, d4_image, d4_image_each, d4_supported, random_turns
from lensexp.sim.priors import LABELS
from lensexp.sim.trace import render_sersic

LENS = dict(theta_E=1.1, e1=0.12, e2=-0.07, center_x=0.15, center_y=-0.08, gamma1=0.04, gamma2=0.03)
SRC = dict(amp=20.0, R_sersic=0.25, n_sersic=1.5, e1=0.1, e2=0.2, center_x=0.12, center_y=-0.2)


def matrix(transpose, flip_x, flip_y) -> np.ndarray:
    """Where the image operation moves a feature at (x, y): transpose swaps the axes, a column
    mirror negates x, a row mirror y (x = column, y = row, conventions.md)."""
    m = np.eye(2)
    if transpose:
        m = np.array([[0.0, 1.0], [1.0, 0.0]]) @ m
    if flip_x:
        m = np.diag([-1.0, 1.0]) @ m
    if flip_y:
        m = np.diag([1.0, -1.0]) @ m
    return m


def turned(p: dict, m: np.ndarray, spin2=(("e1", "e2"),), centre=("center_x", "center_y")) -> dict:
    """Parameters of the turned system: positions move by M; an ellipticity or shear (e1, e2) is
    the traceless tensor [[e1, e2], [e2, -e1]], which turns as M Q M^T."""
    out = dict(p)
    out[centre[0]], out[centre[1]] = m @ np.array([p[centre[0]], p[centre[1]]])
    for a, b in spin2:
        q = m @ np.array([[p[a], p[b]], [p[b], -p[a]]]) @ m.T
        out[a], out[b] = q[0, 0], q[0, 1]
    return out


@pytest.mark.parametrize("t", D4)
def test_turned_image_is_the_turned_lens_and_d4_back_undoes_it(t):
    """Rendering the turned lens and source (an independent derivation of how every label turns)
    gives the turned image to float64 rounding; :func:`d4_back` maps the turned lens's labels
    to the original ones exactly."""
    m = matrix(*t)
    lens_t = turned(LENS, m, spin2=(("e1", "e2"), ("gamma1", "gamma2")))
    src_t = turned(SRC, m)
    img = render_sersic(LENS, SRC, 48, 0.1, 2)
    img_t = render_sersic(lens_t, src_t, 48, 0.1, 2)
    assert torch.allclose(d4_image(img, *t), img_t, rtol=1e-9, atol=1e-9 * float(img.abs().max()))
    labels = LABELS[:-1]
    y_t = torch.tensor([[lens_t[k] for k in labels]], dtype=torch.float64)
    back = d4_back(y_t, labels, *t)
    assert torch.allclose(back, torch.tensor([[LENS[k] for k in labels]], dtype=torch.float64), atol=1e-12)


def test_labels_without_a_known_symmetry_are_not_turned():
    assert d4_supported(LABELS)
    assert not d4_supported(["theta_E", "center_x"])  # the centre needs both components
    assert not d4_supported(["theta_E", "gamma_slope"])


def _module(centre="d4"):
    torch.manual_seed(0)
    return lens_module(
        {"backbone": "test_resnet", "dropout": 0.2, "head_hidden": 16},
        "gaussian_nll",
        data_info={"npix": 32, "pixscale": 0.1},
        posterior_centre=centre,
    ).eval()


def test_d4_centre_is_exactly_equivariant_for_any_network():
    """Averaged over the group, the estimate of a turned image, turned back, is the estimate of
    the original (an untrained network is far from equivariant on its own)."""
    m = _module()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = m.from_net(m.point_estimate(x, "d4"))
    single = m.from_net(m.point_estimate(x, "deterministic"))
    for t in D4[1:]:
        got = d4_back(m.from_net(m.point_estimate(d4_image(x, *t), "d4")), m.labels, *t)
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), t
        raw = d4_back(m.from_net(m.point_estimate(d4_image(x, *t), "deterministic")), m.labels, *t)
        assert not torch.allclose(raw, single, rtol=1e-4, atol=1e-5)  # the single pass is not


def test_posterior_is_the_mc_mixture_moved_onto_the_centre():
    """Same MC draws: the ``d4`` samples are the ``mc_mean`` ones shifted by the centre's move;
    the centre is the dropout-off estimate."""
    m = _module()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    s0, c0 = m.posterior(x, 4, 64, 0, centre="mc_mean")
    torch.manual_seed(5)
    s1, c1 = m.posterior(x, 4, 64, 0)
    assert torch.allclose(c1, m.point_estimate(x, "d4"), atol=1e-6)
    assert torch.allclose(s1 - c1, s0 - c0, atol=1e-5)
    assert not m.training  # point_estimate restores the mode


def test_old_checkpoints_keep_the_mc_mean_and_bad_values_are_refused():
    m = lens_module({"backbone": "test_resnet", "dropout": 0.2, "head_hidden": 16}, "gaussian_nll")
    assert m.hparams.get("posterior_centre") == "mc_mean"
    with pytest.raises(ConfigError, match="posterior_centre must be one of"):
        _module("median")


def _kappa_module(centre="d4"):
    from lensexp.build import kappa_module

    torch.manual_seed(0)
    return kappa_module(
        {"backbone": "test_resnet", "dropout": 0.1}, data_info={"npix": 32, "pixscale": 0.1}, posterior_centre=centre
    ).eval()


def test_d4_density_map_is_exactly_equivariant_and_centres_the_samples():
    """The d4 mean map of a turned image is the turned d4 map of the original (the single pass is
    not), and the MC samples are rescaled per pixel onto it (log target: their log-spread kept)."""
    from lensexp.labels import d4_unturn

    m = _kappa_module()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = m.point_map(x, "d4")
    assert ref.shape == (2, 32, 32)
    for t in D4[1:]:
        assert torch.allclose(d4_unturn(m.point_map(d4_image(x, *t), "d4"), *t), ref, rtol=1e-4, atol=1e-6), t
    t = D4[5]
    single = m.point_map(x, "deterministic")
    assert not torch.allclose(d4_unturn(m.point_map(d4_image(x, *t), "deterministic"), *t), single, rtol=1e-4)
    passes = m.predict_mc(x, 3)
    samples = m.map_samples(passes, 2, torch.Generator().manual_seed(0))
    s1, c1 = m.centred(x, passes, samples)
    assert torch.allclose(c1, ref)
    assert torch.allclose(torch.log(s1) - torch.log(c1), torch.log(samples) - torch.log(m.mean_map(passes)), atol=1e-4)
    s0, c0 = m.centred(x, passes, samples, "mc_mean")
    assert torch.equal(s0, samples) and torch.allclose(c0, m.mean_map(passes))


def test_per_image_turns_match_the_single_turn_and_d4_back_undoes_the_labels():
    """Training augmentation: image ``i`` turned by ``D4[turns[i]]`` is :func:`d4_image` of it, and
    the turned labels are those :func:`d4_back` maps to the originals (so they agree with the
    rendered turned lens of the test above)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 2, 12, 12, generator=g)
    y = torch.randn(16, len(LABELS), generator=g)
    turns = torch.arange(16) % 8
    got = d4_image_each(images, turns)
    y_t = d4_forward_each(y, LABELS, turns)
    for i in range(16):
        t = D4[int(turns[i])]
        assert torch.equal(got[i], d4_image(images[i : i + 1], *t)[0])
        assert torch.allclose(d4_back(y_t[i : i + 1], LABELS, *t), y[i : i + 1], atol=0)
    assert torch.equal(y_t[turns == 0], y[turns == 0]) and not torch.equal(y_t, y)
    lens_t = turned(LENS, matrix(*D4[5]), spin2=(("e1", "e2"), ("gamma1", "gamma2")))
    y1 = torch.tensor([[LENS[k] for k in LABELS[:-1]]], dtype=torch.float64)
    want = torch.tensor([[lens_t[k] for k in LABELS[:-1]]], dtype=torch.float64)
    assert torch.allclose(d4_forward_each(y1, LABELS[:-1], torch.tensor([5])), want, atol=1e-12)


def test_augment_is_checked_and_turns_training_batches_only():
    """``augment=d4`` trains on the batch turned by the drawn symmetries (the loss equals that of
    a plain copy fed the turned batch); evaluation sees the batch as it is."""
    import copy

    with pytest.raises(ConfigError, match="augment must be one of"):
        _module_aug("rotate")
    m = _module_aug("d4").train()
    plain = copy.deepcopy(m)
    plain.hparams.augment = "none"
    x, y = torch.randn(8, 1, 32, 32), torch.rand(8, len(LABELS)) * 0.2 + 0.5
    torch.manual_seed(0)
    turns = random_turns(8)
    torch.manual_seed(0)
    a = m.batch_loss({"image": x, "labels": y}, train=True)
    b = plain.batch_loss({"image": d4_image_each(x, turns), "labels": d4_forward_each(y, m.labels, turns)}, train=True)
    assert torch.equal(a, b)
    assert not torch.isclose(a, copy.deepcopy(plain).batch_loss({"image": x, "labels": y}, train=True))
    m.eval()
    plain.eval()
    batch = {"image": x, "labels": y}
    assert torch.equal(m.batch_loss(batch, False), plain.batch_loss(batch, False))


def _module_aug(augment):
    torch.manual_seed(0)
    return lens_module(
        {"backbone": "test_resnet", "dropout": 0.0, "head_hidden": 16},
        "gaussian_nll",
        in_chans=1,
        augment=augment,
    )
