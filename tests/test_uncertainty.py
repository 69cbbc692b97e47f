"""Uncertainty methods behind one posterior-samples interface: MC dropout, deep ensembles, flow head.

Checks: samples have the right shape and physical units for every method; the flow's
log-probability equals a hand-derived density; an ensemble of identical members is that member;
ensembles and flows train, calibrate and predict through the ordinary entry points.
"""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lensexp.checkpoints import load_module
from lensexp.calibrate import run as calibrate
from lensexp.config import compose_config
from lensexp.ensemble import Ensemble, read_manifest
from lensexp.errors import ConfigError
from lensexp.flow import FlowNLL
from lensexp.build import lens_module
from lensexp.sim.priors import LABELS
from lensexp.train import run_ensemble
from tests.test_train import FAST

TINY = {"backbone": "test_resnet", "dropout": 0.1, "head_hidden": 32}
FLOW = {"name": "flow_nll", "transforms": 2, "hidden": [32, 32], "context": 16, "bins": 4}
# physical label means the modules are pinned to (mu_F through its log)
MEANS = torch.tensor([1.2, 0.1, -0.1, 0.05, -0.05, 0.02, -0.02, 12.0])


def pinned(loss="gaussian_nll", dropout=0.1, means=MEANS, seed=0):
    """An untrained module whose label transform maps network units to ``means`` with a tiny
    spread (1e-3 per network unit), so physical samples must sit at ``means``."""
    torch.manual_seed(seed)
    m = lens_module({**TINY, "dropout": dropout}, loss, data_info={"npix": 32, "pixscale": 0.1})
    s = m.scaler
    s.label_mean.copy_(torch.where(s.is_log, torch.log(means), means))
    s.label_std.fill_(1e-3)
    s.label_fitted.fill_(True)
    return m.eval()


IMAGES = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["mc_dropout", "flow", "ensemble"])
def test_posterior_samples_have_shape_and_units(method):
    if method == "ensemble":
        module = Ensemble([pinned(dropout=0.0, seed=0), pinned(dropout=0.0, seed=1)])
    else:
        module = pinned(FLOW if method == "flow" else "gaussian_nll", 0.0 if method == "flow" else 0.1)
    samples, centre = module.posterior(IMAGES, n_mc=4, n_samples=64, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (64, 3, len(LABELS)) and centre.shape == (3, len(LABELS))
    assert samples.device.type == "cpu" and torch.isfinite(samples).all()
    phys = module.from_net(samples)
    # network units -> arcsec, ellipticity, magnification: at the pinned means within the tiny spread
    torch.testing.assert_close(phys.mean((0, 1)), MEANS, atol=0.05, rtol=0.01)
    assert (phys[..., LABELS.index("mu_F")] > 0).all()
    assert samples.std(0).min() > 0  # a distribution, not a point


def test_dropout_free_models_run_one_pass():
    assert pinned(dropout=0.0).mc_passes(16) == 1 and pinned(dropout=0.1).mc_passes(16) == 16


def test_flow_log_prob_matches_a_hand_built_affine_flow():
    # one masked affine layer with every weight zero and every last bias c: shift b = c and log scale
    # a = c / (1 + |c / log 1e-3|) (zuko's soft clip) for every label, whatever the context; then
    # log q(z) = sum_k [log N(exp(a) z_k + b; 0, 1) + a]
    f = FlowNLL(3, flow="maf", transforms=1, hidden=[8], context=4, passes=3)
    c = 0.4
    with torch.no_grad():
        for p in f.parameters():
            p.zero_()
        hyper = f.flow.transform.transforms[0].hyper
        hyper[-1].bias.fill_(c)
    a = c / (1 + abs(c / math.log(1e-3)))
    z = torch.tensor([[0.3, -1.2, 2.0], [0.0, 0.5, -0.7]])
    u = math.exp(a) * z + c
    want = (-0.5 * u**2 - 0.5 * math.log(2 * math.pi) + a).sum(-1)
    got = f.log_prob(torch.randn(2, 4), z)
    torch.testing.assert_close(got, want)
    # and its samples invert the map: z = (u - b) / exp(a)
    s = f.sample(torch.randn(2, 4), 20000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(s.mean((0, 1)), torch.full((3,), -c / math.exp(a)), atol=0.02, rtol=0)
    torch.testing.assert_close(s.std((0, 1)), torch.full((3,), math.exp(-a)), atol=0.02, rtol=0)


def test_spline_flow_density_is_normalised_and_matches_its_samples():
    torch.manual_seed(3)
    f = FlowNLL(1, flow="nsf", transforms=2, hidden=[16], context=2, bins=6, passes=1)
    ctx = torch.tensor([[0.5, -1.0]])
    z = torch.linspace(-12, 12, 24001)[:, None]
    with torch.no_grad():
        dens = f.log_prob(ctx.expand(len(z), 2), z).exp()
        s = f.sample(ctx, 50000, torch.Generator().manual_seed(0))[:, 0, 0]
    dz = float(z[1, 0] - z[0, 0])
    assert abs(float(dens.sum()) * dz - 1) < 2e-3
    cdf = torch.cumsum(dens, 0) * dz
    for q in (0.1, 0.5, 0.9):  # the samples' quantiles are the density's
        zq = float(z[int(torch.searchsorted(cdf, torch.tensor(q))), 0])
        assert abs(float(torch.quantile(s, q)) - zq) < 0.03


def test_ensemble_of_identical_members_equals_one_member():
    m = pinned(dropout=0.1)

    def g():  # the sample stream and the dropout masks (torch's global generator), both reset
        torch.manual_seed(7)
        return torch.Generator().manual_seed(5)

    one_s, one_c = m.posterior(IMAGES, 4, 64, g())
    s1, c1 = Ensemble([m]).posterior(IMAGES, 4, 64, g())
    assert torch.equal(s1, one_s) and torch.equal(c1, one_c)
    # two identical deterministic members: the same centre, the same distribution
    d = pinned(dropout=0.0)
    s2, c2 = Ensemble([d, copy.deepcopy(d)]).posterior(IMAGES, 4, 20000, g())
    big, c = d.posterior(IMAGES, 4, 20000, g())
    torch.testing.assert_close(c2, c)
    torch.testing.assert_close(s2.std(0), big.std(0), rtol=0.05, atol=0)
    for q in (0.05, 0.5, 0.95):
        torch.testing.assert_close(torch.quantile(s2, q, 0), torch.quantile(big, q, 0), atol=0.1, rtol=0)


def test_ensemble_members_in_other_units_are_converted():
    # member 1 standardises theta_E about 2.0: the mixture must be half at 1.2", half at 2.0"
    other = MEANS.clone()
    other[0] = 2.0
    ens = Ensemble([pinned(dropout=0.0), pinned(dropout=0.0, means=other, seed=1)])
    s, c = ens.posterior(IMAGES, 1, 200, 0)
    th = ens.from_net(s)[..., 0]
    assert ((th - 1.2).abs() < 0.05).float().mean() == pytest.approx(0.5)
    assert ((th - 2.0).abs() < 0.05).float().mean() == pytest.approx(0.5)
    torch.testing.assert_close(ens.from_net(c)[:, 0], torch.full((3,), 1.6), atol=0.03, rtol=0)


def test_ensemble_members_must_share_labels_and_grid():
    a, b = pinned(), pinned()
    b.hparams["data_info"] = {"npix": 64, "pixscale": 0.1}
    with pytest.raises(ConfigError, match="another grid"):
        Ensemble([a, b])


def test_manifest_refuses_paths_outside_the_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (tmp_path / "x.ckpt").write_bytes(b"")
    man = run / "checkpoints" / "ensemble.json"
    for members, msg in (
        (["../../x.ckpt"], "outside the run folder"),
        (["/etc/passwd"], "not a relative path"),
        ([], "1 to 64"),
        (["../members/0/checkpoints/last.ckpt"], "not found"),
    ):
        man.write_text(json.dumps({"members": members}))
        with pytest.raises(ConfigError, match=msg):
            read_manifest(man)
    man.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        load_module(run)


def test_checkpoint_loss_settings_are_allow_listed(tmp_path):
    m = pinned(FLOW, 0.0)
    hp = dict(m.hparams)
    for bad in ({**FLOW, "target": "os.system"}, {"name": "flow_nll", "hidden": ["x"]}, {"name": "other"}):
        torch.save(
            {"hyper_parameters": {**hp, "spec": {**hp["spec"], "loss": bad}}, "state_dict": m.state_dict()},
            tmp_path / "b.ckpt",
        )
        with pytest.raises(ConfigError, match="refused loss setting"):
            load_module(tmp_path / "b.ckpt")
    torch.save({"hyper_parameters": hp, "state_dict": m.state_dict()}, tmp_path / "ok.ckpt")
    again = load_module(tmp_path / "ok.ckpt")
    z = torch.randn(3, len(LABELS))
    ctx = again(IMAGES)
    torch.testing.assert_close(again.loss_fn.log_prob(ctx, z), m.loss_fn.log_prob(m(IMAGES), z))


@pytest.fixture(scope="module")
def uq_runs(tmp_path_factory):
    """A two-member ensemble run and a flow run, one tiny epoch each."""
    from lensexp.train import run

    root = tmp_path_factory.mktemp("uq")
    ens = compose_config("train", [*FAST, "trainer.max_epochs=1", "uq=ensemble", "ensemble.n=2"])
    run_ensemble(ens, root / "ensemble")
    flow = compose_config("train", [*FAST, "trainer.max_epochs=1", "uq=flow", "loss.transforms=2", "loss.hidden=[32]"])
    run(flow, root / "flow")
    for name, cfg in (("ensemble", ens), ("flow", flow)):  # what Hydra leaves in a run folder
        (root / name / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, root / name / ".hydra" / "config.yaml")
    return root


def test_ensemble_run_splits_the_budget_and_resumes(uq_runs):
    run = uq_runs / "ensemble"
    members = read_manifest(run / "checkpoints" / "ensemble.json")
    assert [p.parent.parent.name for p in members] == ["0", "1"]
    costs = [json.loads((run / "members" / k / "train_cost.json").read_text()) for k in "01"]
    assert [c["images"] for c in costs] == [8, 8]  # train_epoch_size 16 split between 2 members
    ens = load_module(run)
    assert isinstance(ens, Ensemble) and len(ens.members) == 2
    w0, w1 = (list(m.net.parameters())[0] for m in ens.members)
    assert not torch.equal(w0, w1)  # independently seeded
    # a rerun finds both members done and only rewrites the manifest
    before = [p.stat().st_mtime_ns for p in members]
    run_ensemble(compose_config("train", [*FAST, "trainer.max_epochs=1", "uq=ensemble", "ensemble.n=2"]), run)
    assert [p.stat().st_mtime_ns for p in members] == before


def calibrate_run(run):
    """Calibrate a test run into RUN/calibration (on the fly, as the run was trained), once."""
    path = run / "calibration" / "metrics.json"
    if path.is_file():
        return json.loads(path.read_text())
    over = ["max_lenses=16", "n_mc=2", "n_samples=128", "progress=false", "wandb.mode=disabled"]
    return calibrate(compose_config("calibrate", [f"ckpt={run}", f"out={run / 'calibration'}", *over]))


@pytest.mark.parametrize("method", ["ensemble", "flow"])
def test_calibrate_and_predict_take_every_method(uq_runs, method, tmp_path):
    from lensexp.predict import run as predict
    from lensexp.simulate import run as simulate

    run = uq_runs / method
    m = calibrate_run(run)
    assert m["n_lenses"] == 16 and m["uncertainty"].startswith(method)
    assert m["predict_seconds_per_lens"] > 0 and (run / "checkpoints" / "calibration.json").is_file()
    simulate(
        compose_config(
            "simulate",
            ["data=tiny", "data.source.kind=sersic", "n=3", "seed=3", "format=fits", f"out={tmp_path / 'f'}"],
        )
    )
    predict(
        compose_config(
            "predict", [f"ckpt={run}", f"input={tmp_path / 'f'}", f"out={tmp_path / 'p.csv'}", "n_samples=128"]
        )
    )
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 3
    for r in rows:
        lo, mid, hi = (float(r[k]) for k in ("theta_E_lo68", "theta_E", "theta_E_hi68"))
        assert lo < hi and float(r["mu_F"]) > 0 and np.isfinite(mid)


def test_compare_tables_the_methods(uq_runs, tmp_path):
    from lensexp.compare import run as compare

    for method in ("ensemble", "flow"):
        calibrate_run(uq_runs / method)
    rows = compare(compose_config("compare", [f"runs={uq_runs}", f"out={tmp_path}"]))
    by = {r["run"]: r for r in rows}
    assert set(by) == {"ensemble", "flow"}
    assert by["ensemble"]["method"].startswith("ensemble of 2") and by["flow"]["method"] == "flow"
    assert by["ensemble"]["train_images"] == 16 and by["ensemble"]["train_s"] > 0
    for r in rows:  # the worst label's deviation, named
        dev = [r[f"max_dev_after/{n}"] for n in LABELS]
        assert r["max_dev_after"] == max(dev) and r["worst_label_after"] == LABELS[int(np.argmax(dev))]
    table = list(csv.DictReader(open(tmp_path / "uncertainty.csv")))
    assert len(table) == 2 and "cov95_before/mu_F" in table[0]
    assert "Uncertainty methods" in (tmp_path / "uncertainty.html").read_text()
    for png in ("uncertainty_curves.png", "uncertainty_by_snr.png"):
        assert (tmp_path / png).stat().st_size > 5000
