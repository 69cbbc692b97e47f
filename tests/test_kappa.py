"""Density maps: shards with kappa.npy, the image-to-image network, map summaries, prediction
with kappa_out, fresh on-the-fly epochs, and the network against the nearest-image look-up."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from lensexp import kappa_maps
from lensexp.config import compose_config, load_data_preset
from lensexp.errors import ConfigError
from lensexp.kappa_net import KappaUNet
from lensexp.sim import lens as lensmod
from lensexp.sim.trace import pixel_grid

SERSIC = "data.source.kind=sersic"


@pytest.mark.parametrize("npix", [64, 50, 75])
@pytest.mark.parametrize("head_stride", [1, 2])
def test_decoder_output_has_the_input_grid(npix, head_stride):
    net = KappaUNet("test_resnet", in_chans=2, head_stride=head_stride, dropout=0.1).eval()
    out = net(torch.randn(3, 2, npix, npix))
    assert out.shape == (3, 2, npix, npix) and torch.isfinite(out).all()
    assert net.n_dropout > 10  # dropout before every weight layer


def test_decoder_without_coordinate_channels_is_shift_equivariant_away_from_the_edges():
    """``coord_channels=false``: the head sees no pixel positions, so an image shifted by the
    encoder's stride (32 px) gives the shifted map far from the zero-padded edges (with them the
    head is told where it is, and the map differs)."""
    torch.manual_seed(0)
    plain = KappaUNet("test_resnet", in_chans=1, dropout=0.0, coord_channels=False).eval()
    told = KappaUNet("test_resnet", in_chans=1, dropout=0.0).eval()
    told.load_state_dict({**plain.state_dict(), **{k: v for k, v in told.state_dict().items() if "head.0" in k}})
    assert plain.head[0][0].in_channels + 2 == told.head[0][0].in_channels
    x = torch.zeros(1, 1, 192, 192)
    x[..., 64:96, 64:96] = torch.randn(32, 32)
    shifted = torch.roll(x, (32, 32), (-2, -1))
    with torch.no_grad():
        a, b = plain(x)[..., 56:104, 56:104], plain(shifted)[..., 88:136, 88:136]
        c, d = told(x)[..., 56:104, 56:104], told(shifted)[..., 88:136, 88:136]
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(c, d, atol=1e-3)


def test_decoder_channels_must_match_the_encoder():
    from lensexp.errors import ConfigError

    with pytest.raises(ConfigError, match="one width per encoder stage"):
        KappaUNet("test_resnet", in_chans=1, decoder_channels=[32, 16])


def test_annulus_error_and_einstein_radius_of_analytic_maps():
    x, y = pixel_grid(64, 0.1)
    k = lensmod.sie_convergence(x, y, 1.5, 0.1, -0.05, 0.12, -0.07)[None].float()
    assert float(kappa_maps.annulus_error(k, k, 0.1)) == 0.0
    # a uniform offset of 0.02 everywhere is an annulus error of 0.02, except where both clip at 3
    m = kappa_maps.annulus_mask(64, 0.1)
    shifted = k + 0.02
    expect = (shifted.clamp(max=3) - k.clamp(max=3)).abs()[0][m].mean()
    assert abs(float(kappa_maps.annulus_error(shifted, k, 0.1)) - float(expect)) < 1e-6
    assert 0.019 < float(expect) <= 0.02
    # Einstein radius (mean kappa inside = 1) of an SIS sampled at pixel centres: theta_E to within
    # the cusp's pixel-sampling error (-2.7 % with the cusp between pixels, +1 % near a pixel centre,
    # at 1" on a 0.1" grid; less for larger radii); the centre to a fifth of a pixel
    for te, tol in ((1.0, 0.03), (1.8, 0.02)):
        for cx, cy in ((0.0, 0.0), (0.03, -0.04), (0.05, 0.05)):
            sis = lensmod.sie_convergence(x, y, te, 0.0, 0.0, cx, cy)[None]
            r = float(kappa_maps.einstein_radius(sis, 0.1))
            assert abs(r / te - 1) < tol, (te, cx, cy, r)
            c = kappa_maps.peak_centre(sis, 0.1)[0]
            assert abs(float(c[0]) - cx) < 0.02 and abs(float(c[1]) - cy) < 0.02
    # a map that never reaches a mean of 1 has no Einstein radius
    assert torch.isnan(kappa_maps.einstein_radius(torch.full((1, 64, 64), 0.3), 0.1)).all()


def test_simulate_writes_kappa_maps_to_shards_and_fits(tmp_path):
    from lensexp.data import shard_dataset, shard_urls
    from lensexp.simulate import run as simulate

    cfg = compose_config(
        "simulate",
        [
            "data=kappa",
            "data.mass.kind=sie",  # the SIE's map from the labels alone (the default family's slope is in the meta)
            SERSIC,
            "n=40",
            "seed=11",
            "shard_size=20",
            f"out={tmp_path / 's'}",
            "progress=false",
        ],
    )
    simulate(cfg)
    s = next(iter(shard_dataset(shard_urls(tmp_path / "s", "train"))))
    assert s["kappa"].shape == (64, 64) and s["kappa"].dtype == torch.float32
    x, y = pixel_grid(64, 0.1)
    lab = s["labels"].double()
    expect = lensmod.sie_convergence(x, y, *lab[:5])
    torch.testing.assert_close(s["kappa"].double(), expect, rtol=1e-6, atol=0)
    from astropy.io import fits

    cfg = compose_config(
        "simulate", ["data=kappa", SERSIC, "n=3", "seed=2", "format=fits", f"out={tmp_path / 'f'}", "progress=false"]
    )
    simulate(cfg)
    with fits.open(tmp_path / "f" / "lens_000000.fits") as h:
        assert h["KAPPA"].data.shape == (64, 64) and h["KAPPA"].header["PIXSCALE"] == 0.1
        assert h[0].data.shape == (64, 64)


def test_on_the_fly_epochs_are_fresh_and_resume_continues_the_sequence():
    from lensexp.data import OnTheFlyDataset

    cfg = load_data_preset("tiny", [SERSIC])
    kw = dict(seed=0, shard_size=8, batch_size=8, epoch_size=16)
    keys = lambda ds: [s["__key__"] for s in ds]  # noqa: E731
    e0 = keys(OnTheFlyDataset(cfg, **kw, epoch=0))
    e1 = keys(OnTheFlyDataset(cfg, **kw, epoch=1))
    assert not set(e0) & set(e1)  # fresh lenses every epoch
    # epoch 1 is exactly what an endless stream makes after epoch 0: a resumed run continues it
    endless = OnTheFlyDataset(cfg, seed=0, shard_size=8, batch_size=8, epoch_size=32)
    assert keys(endless) == e0 + e1
    # DDP ranks simulate disjoint lenses
    r0 = keys(OnTheFlyDataset(cfg, **kw, epoch=0, rank=0, world=2))
    r1 = keys(OnTheFlyDataset(cfg, **kw, epoch=0, rank=1, world=2))
    assert not set(r0) & set(r1)


@pytest.fixture(scope="module")
def kappa_ckpt(tmp_path_factory):
    """A density-map checkpoint trained for a few steps (on-the-fly Sérsic lenses)."""
    from lensexp.train import run

    d = tmp_path_factory.mktemp("kappa_run")
    cfg = compose_config(
        "train",
        [
            "experiment=kappa_quickstart",
            "datamodule.source=on_the_fly",  # the quickstart's own 66 560-lens shard set is too big for a test
            SERSIC,
            "datamodule.num_workers=0",
            "datamodule.batch_size=16",
            "datamodule.train_epoch_size=64",
            "datamodule.val_size=32",
            "datamodule.shard_size=32",
            "datamodule.sim_batch_size=32",
            "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=1",
            "logger=wandb",  # the default logger: its end-of-fit summary once crashed density-map runs
            "logger.wandb.mode=offline",
            "+trainer.enable_progress_bar=false",
        ],
    )
    out = run(cfg, d)
    assert all(np.isfinite(out[f"val/{k}"]) for k in ("kappa_mae", "kappa_cov68", "kappa_cov95", "loss"))
    assert list((d / "wandb").glob("offline-run-*"))
    return d / "checkpoints" / "last.ckpt"


def test_predict_writes_kappa_maps_and_summaries(kappa_ckpt, tmp_path):
    from astropy.io import fits

    from lensexp.predict import run as predict
    from lensexp.simulate import run as simulate

    simulate(
        compose_config(
            "simulate",
            ["data=kappa", SERSIC, "n=3", "seed=4", "format=fits", f"out={tmp_path / 'in'}", "progress=false"],
        )
    )
    out, maps = tmp_path / "preds.csv", tmp_path / "maps"
    predict(
        compose_config(
            "predict",
            [
                f"ckpt={kappa_ckpt}",
                f"input={tmp_path / 'in'}",
                f"out={out}",
                f"kappa_out={maps}",
                "n_mc=4",
                "progress=false",
            ],
        )
    )
    rows = list(csv.DictReader(open(out)))
    assert [r["name"] for r in rows] == [f"lens_00000{i}.fits" for i in range(3)]
    assert {"theta_E", "theta_E_std", "theta_E_lo68", "center_x", "kappa_std_annulus"} <= set(rows[0])
    for i in range(3):
        with fits.open(maps / f"lens_00000{i}.fits") as h, fits.open(maps / f"lens_00000{i}_std.fits") as hs:
            assert h[0].data.shape == (64, 64) and h[0].header["BITPIX"] == -32 and h[0].header["PIXSCALE"] == 0.1
            assert np.all(h[0].data > 0) and np.all(hs[0].data >= 0) and hs[0].data.max() > 0


def test_predict_refuses_kappa_out_for_a_label_checkpoint(tmp_path):
    from lensexp.errors import ConfigError
    from lensexp.predict import run as predict
    from tests.conftest import train_tiny_checkpoint

    ckpt = train_tiny_checkpoint(tmp_path / "run")
    with pytest.raises(ConfigError, match="kappa_out= needs a density-map checkpoint"):
        predict(
            compose_config(
                "predict",
                [f"ckpt={ckpt}", f"input={tmp_path}", f"out={tmp_path / 'p.csv'}", f"kappa_out={tmp_path / 'm'}"],
            )
        )


def test_lookup_bank_returns_the_map_of_the_nearest_image(tmp_path):
    from lensexp.lookup import LookupBank
    from lensexp.simulate import run as simulate

    simulate(
        compose_config(
            "simulate", ["data=kappa", SERSIC, "n=60", "seed=11", "shard_size=30", f"out={tmp_path}", "progress=false"]
        )
    )
    bank = LookupBank(tmp_path)
    assert len(bank) == 60
    from lensexp.data import shard_dataset, shard_urls

    s = list(shard_dataset(shard_urls(tmp_path, "val")))[2]
    maps, idx = bank.query(3.7 * s["image"][None])  # any flux unit: per-image normalisation
    torch.testing.assert_close(maps[0], s["kappa"])


def test_a_briefly_trained_network_beats_the_lookup_on_a_held_out_class(tmp_path):
    """The talk's question on a small scale: ~6 000 training lenses of the preset's family (power
    laws near isothermal + shear; about a minute) against the nearest-image look-up in a 2 000-image
    bank of the same family, on SIE + subhalo lenses that neither ever saw. The network must be
    clearly better (a look-up cannot place mass it never stored)."""
    from lensexp.checkpoints import load_module
    from lensexp.kappa_predict import KappaPredictor
    from lensexp.lookup import LookupBank, class_set, evaluate_class
    from lensexp.simulate import run as simulate
    from lensexp.train import run

    over = [SERSIC, "data.instrument.cosmic_rays.enabled=false"]
    cfg = compose_config(
        "train",
        [
            "experiment=kappa_quickstart",
            "datamodule.source=on_the_fly",  # the quickstart's own 66 560-lens shard set is too big for a test
            *over,
            "datamodule.num_workers=0",
            "datamodule.train_epoch_size=2048",
            "datamodule.val_size=64",
            "trainer.max_epochs=3",
            "logger=csv",
            "+trainer.enable_progress_bar=false",
        ],
    )
    run(cfg, tmp_path / "run")
    module = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt")
    simulate(
        compose_config(
            "simulate", ["data=kappa", *over, "n=2000", "seed=11", f"out={tmp_path / 'bank'}", "progress=false"]
        )
    )
    bank = LookupBank(tmp_path / "bank")
    images, kappa = class_set(cfg.data, "sie_subhalo", 64, seed=2026)
    net, look, _ = evaluate_class(KappaPredictor(module, 64, 0.1, n_mc=4), bank, images, kappa, 0.1)
    ratio = float(net["kappa_mae"].mean() / look["kappa_mae"].mean())
    assert ratio < 0.8, f"network / look-up annulus error {ratio:.2f}"


def test_lookup_compares_the_training_family_then_the_unseen_classes():
    from lensexp.lookup import default_classes

    assert default_classes("sie") == ["sie", "sie_pair", "sie_subhalo", "epl"]
    assert default_classes("epl_narrow") == ["epl_narrow", "sie_pair", "sie_subhalo", "epl"]


def test_lookup_command_is_deterministic_by_seed(kappa_ckpt, tmp_path):
    from lensexp.lookup import run as lookup
    from lensexp.simulate import run as simulate

    bank = tmp_path / "bank"
    simulate(compose_config("simulate", ["data=kappa", SERSIC, "n=40", "seed=11", f"out={bank}", "progress=false"]))
    tables = []
    for d in ("a", "b"):
        over = [f"ckpt={kappa_ckpt}", f"bank={bank}", f"out={tmp_path / d}", "n=6", "classes=[sie,sie_pair]", "n_mc=3"]
        lookup(compose_config("lookup", over))
        tables.append((tmp_path / d / "per_lens.csv").read_text())
    assert tables[0] == tables[1] and len(tables[0].splitlines()) == 13


def test_kappa_lookup_benchmark_makes_a_bank_of_the_training_family(kappa_ckpt, tmp_path, monkeypatch):
    """``benchmarks/kappa_lookup.py``: the missing bank is simulated with the checkpoint's own
    mass family; ``--classes`` picks the test classes."""
    import sys

    from lensexp.checkpoints import run_config
    from lensexp.lookup import bank_family
    from lensexp.paths import PROJECT_ROOT

    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "benchmarks"))
    sys.modules.pop("kappa_lookup", None)
    import kappa_lookup

    bank, out = tmp_path / "bank", tmp_path / "out"
    args = ["--ckpt", str(kappa_ckpt), "--bank", str(bank), "--bank-n", "24", "--n", "3", "--out", str(out)]
    assert kappa_lookup.main([*args, "--classes", "sie_pair", "sie"]) == 0
    assert run_config(kappa_ckpt) is None  # a run without its config: the preset's family, as lensexp.lookup assumes
    assert bank_family(bank) == load_data_preset("kappa").mass.kind == "epl_narrow"
    rows = json.loads((out / "kappa_lookup.json").read_text())["rows"]
    assert [r["class"] for r in rows] == ["sie_pair", "sie"] and "bank_s" in json.loads(
        (out / "kappa_lookup.json").read_text()
    )["timing"]
    # a run whose config says it trained on SIEs gets an SIE bank
    import shutil

    from omegaconf import OmegaConf

    run = tmp_path / "run"
    for sub in ("checkpoints", ".hydra"):
        (run / sub).mkdir(parents=True)
    shutil.copy(kappa_ckpt, run / "checkpoints" / "last.ckpt")
    data = load_data_preset("kappa", [SERSIC, "data.mass.kind=sie"])
    OmegaConf.save(OmegaConf.create({"data": OmegaConf.to_container(data)}), run / ".hydra" / "config.yaml")
    args = ["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--bank", str(tmp_path / "bank_sie"), "--bank-n", "24"]
    assert kappa_lookup.main([*args, "--n", "3", "--out", str(tmp_path / "out2"), "--classes", "sie"]) == 0
    assert bank_family(tmp_path / "bank_sie") == "sie"


def test_lookup_classes_work_with_a_training_config_older_than_the_family():
    """A checkpoint's data config saved before a mass family existed lacks its ranges: the test
    set takes them from the preset (it used to end in an omegaconf 'Missing key' error)."""
    from omegaconf import OmegaConf

    from lensexp.lookup import class_set

    old = load_data_preset("kappa", [SERSIC])
    mass = OmegaConf.to_container(old.mass)
    mass.pop("blobs")
    old.mass = OmegaConf.create(mass)
    images, kappa = class_set(old, "sie_blobs", 2, seed=5)
    assert images.shape == (2, 1, 64, 64) and kappa.shape == (2, 64, 64) and torch.all(kappa > 0)


def test_lookup_warns_when_the_bank_is_not_of_the_training_family(kappa_ckpt, tmp_path, caplog):
    """A bank simulated with another mass family than the network's would make the look-up
    baseline silently stronger or weaker: the command says so (the family from the manifest)."""
    from lensexp.lookup import bank_family
    from lensexp.lookup import run as lookup
    from lensexp.simulate import run as simulate

    bank = tmp_path / "bank"
    over = ["data=kappa", "data.mass.kind=sie_blobs", SERSIC, "n=20", "seed=11", f"out={bank}", "progress=false"]
    simulate(compose_config("simulate", over))
    assert bank_family(bank) == "sie_blobs" and bank_family(tmp_path) is None
    over = [f"ckpt={kappa_ckpt}", f"bank={bank}", f"out={tmp_path / 'o'}", "n=2", "classes=[sie]", "n_mc=2"]
    with caplog.at_level("WARNING", logger="lensexp.lookup"):
        lookup(compose_config("lookup", over))
    assert "holds mass family 'sie_blobs' but the network was trained on 'epl_narrow'" in caplog.text


def test_fit_refuses_a_density_map_checkpoint_for_init_cnn(kappa_ckpt, tmp_path):
    """init=cnn with a kappa checkpoint is one clear error before any lens is fitted (it used to
    fail on every lens with an AttributeError in the error table)."""
    from lensexp.fit import run as fit
    from lensexp.simulate import run as simulate

    simulate(compose_config("simulate", ["data=tiny", "n=2", "seed=3", "format=fits", f"out={tmp_path / 'in'}"]))
    cfg = compose_config(
        "fit", [f"input={tmp_path / 'in'}", f"out={tmp_path / 'fits.csv'}", "init=cnn", f"ckpt={kappa_ckpt}"]
    )
    with pytest.raises(ConfigError, match="density-map checkpoint"):
        fit(cfg)
    assert not (tmp_path / "fits.csv").exists()


def test_kappa_weighted_loss_counts_pixels_as_the_score_does():
    """``kappa.weight=kappa``: each pixel's NLL term weighted by its true kappa clipped at 3 (mean
    1 per map), so an error in log kappa costs in proportion to the error in kappa it makes
    (|d kappa| = kappa |d log kappa|); ``none`` is the plain mean; anything else is refused."""
    from lensexp.kappa_module import KappaModule

    net = KappaUNet("test_resnet", 1, dropout=0.0)
    plain, weighted = KappaModule(net), KappaModule(net, weight="kappa")
    kappa = torch.tensor([[[0.1, 0.5], [2.0, 9.0]]])  # the 9 counts as the clip, 3
    w = weighted.pixel_weight(kappa)
    assert plain.pixel_weight(kappa) is None
    torch.testing.assert_close(w, torch.tensor([[[0.1, 0.5], [2.0, 3.0]]]) / 1.4)
    out = torch.zeros(1, 2, 2, 2, requires_grad=True)  # mean 0, log sigma 0
    target = torch.ones(1, 2, 2)
    KappaModule.nll(out, target, w).backward()
    g = out.grad[0, 0]  # d loss / d mean per pixel: -(target - mean) * weight / n
    torch.testing.assert_close(g, -w[0] / 4)
    torch.testing.assert_close(KappaModule.nll(out, target, torch.ones(1, 2, 2)), KappaModule.nll(out, target))
    with pytest.raises(ConfigError, match="kappa.weight must be one of"):
        KappaModule(net, weight="annulus")
    from lensexp.checkpoints import split_hparams  # a checkpoint trained with it loads again

    settings, _ = split_hparams({"task": "kappa", "weight": "kappa", "spec": {"model": {}}}, "ckpt")
    assert settings["weight"] == "kappa"


def test_kappa_beta_nll_keeps_the_pull_of_uncertain_pixels_and_their_sigma():
    """``kappa.beta``: each pixel's NLL term times sigma^(2 beta), held constant in the gradient
    (beta-NLL). The mean's gradient is the residual / sigma^(2 - 2 beta) instead of / sigma^2; the
    sigma that minimises each term (|residual|) is the same; 0 is the plain NLL; [0, 1] only."""
    from lensexp.kappa_module import KappaModule

    log_sigma = torch.tensor([[[0.0, 1.0], [-1.0, 2.0]]])
    target = torch.tensor([[[1.0, -2.0], [0.5, 3.0]]])
    out = torch.stack([torch.zeros(1, 2, 2), log_sigma], 1).requires_grad_(True)
    KappaModule.nll(out, target, None, 0.5).backward()
    sigma = log_sigma.exp()
    torch.testing.assert_close(out.grad[:, 0], -target / sigma / 4)  # n = 4 pixels
    at_optimum = torch.stack([torch.zeros(1, 2, 2), target.abs().log()], 1).requires_grad_(True)
    KappaModule.nll(at_optimum, target, None, 0.5).backward()
    torch.testing.assert_close(at_optimum.grad[:, 1], torch.zeros(1, 2, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(KappaModule.nll(out, target, None, 0.0), KappaModule.nll(out, target))
    net = KappaUNet("test_resnet", 1, dropout=0.0)
    with pytest.raises(ConfigError, match="kappa.beta must be in"):
        KappaModule(net, beta=1.5)
    from lensexp.checkpoints import split_hparams  # a checkpoint trained with it loads again

    settings, _ = split_hparams({"task": "kappa", "beta": 0.5, "spec": {"model": {}}}, "ckpt")
    assert settings["beta"] == 0.5
