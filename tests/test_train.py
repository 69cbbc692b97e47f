"""Training configs compose and run; resume continues from the saved step; run-directory contract."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lensexp.config import CONF_DIR, compose_config
from lensexp.errors import ConfigError
from lensexp.paths import PROJECT_ROOT
from lensexp.train import run

# small, fast, file-free settings: on-the-fly Sérsic sources, W&B disabled
FAST = [
    "data=tiny",
    "data.source.kind=sersic",
    "datamodule.source=on_the_fly",
    "datamodule.batch_size=8",
    "datamodule.train_epoch_size=16",
    "datamodule.val_size=16",
    "datamodule.shard_size=16",
    "datamodule.sim_batch_size=16",
    "n_mc_val=2",
    "logger=csv",
    "trainer=cpu",
    "+trainer.enable_progress_bar=false",
]

SERSIC_ONLY = "data.source.kind=sersic"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (CONF_DIR / "loss").glob("*.yaml"))  # a new loss file is tested as it lands


def fast_dev(tmp_path, *over):
    cfg = compose_config("train", [*FAST, "+trainer.fast_dev_run=true", *over])
    return cfg, run(cfg, tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run(tmp_path, experiment):
    # density-map experiments need a preset with kappa maps (tiny has none)
    task = compose_config("train", [f"experiment={experiment}"]).task
    cfg, out = fast_dev(
        tmp_path,
        f"experiment={experiment}",
        "data=kappa" if task == "kappa" else "data=tiny",
        "trainer=cpu",
        "trainer.precision=32-true",
        "trainer.compile=false",
        "datamodule.num_workers=0",
        "datamodule.pin_memory=false",
    )
    assert "train/loss" in out and torch.isfinite(torch.tensor(out["train/loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_every_model_runs_fast_dev_run(tmp_path, model):
    kappa = model.startswith("kappa")  # density-map networks train on maps
    cfg, out = fast_dev(tmp_path, f"model={model}", *(["task=kappa", "data=kappa", SERSIC_ONLY] if kappa else []))
    assert cfg.model.backbone and ("val/kappa_mae" if kappa else "val/rmse/theta_E") in out


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains(tmp_path, loss):
    _, out = fast_dev(tmp_path, f"loss={loss}")
    assert torch.isfinite(torch.tensor(out["train/loss"]))
    # the coverage of the one validation batch (fast_dev_run): a count of its 8 lenses
    k = out["val/cov68/theta_E"] * 8
    assert abs(k - round(k)) < 1e-5, out["val/cov68/theta_E"]


def _last_step(run_dir: Path) -> tuple[int, int]:
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ck["global_step"], ck["epoch"]


def test_resume_continues_from_saved_step(tmp_path):
    base = [*FAST, "callbacks.lr_monitor=false"]
    run(compose_config("train", [*base, "trainer.max_epochs=2"]), tmp_path)
    step2, epoch2 = _last_step(tmp_path)
    assert step2 == 4  # 16 images / batch 8 = 2 steps per epoch
    last = tmp_path / "checkpoints" / "last.ckpt"
    mean_before = torch.load(last, weights_only=False)["state_dict"]["scaler.label_mean"]
    run(compose_config("train", [*base, "trainer.max_epochs=3"]), tmp_path)  # same run dir: resumes
    step3, _ = _last_step(tmp_path)
    assert step3 == 6
    mean_after = torch.load(last, weights_only=False)["state_dict"]["scaler.label_mean"]
    torch.testing.assert_close(mean_before, mean_after)  # label scale fixed after the first batches
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert max(int(r["epoch"]) for r in rows) == 2


def test_rerun_with_other_data_is_refused_not_resumed(tmp_path):
    """Rerunning a run folder with another data config (e.g. a new default mass family) would
    continue, or when finished silently keep, a network of other data: refused in one line before
    any work; the same data resume; ``ckpt_path=`` given on purpose starts from it on other data."""
    from lensexp.callbacks import DATA_KEY

    base = [*FAST, "callbacks.lr_monitor=false"]
    run(compose_config("train", [*base, "trainer.max_epochs=1"]), tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert len(torch.load(last, weights_only=True)[DATA_KEY]) == 64
    other = [*base, "data.lens.theta_E=[0.5,2.0]", "trainer.max_epochs=2"]
    with pytest.raises(ConfigError, match="another data config"):
        run(compose_config("train", other), tmp_path)
    assert _last_step(tmp_path) == (2, 0)  # untouched
    run(compose_config("train", [*base, "trainer.max_epochs=2"]), tmp_path)  # same data: resumes
    assert _last_step(tmp_path)[0] == 4
    run(compose_config("train", [*other, f"ckpt_path={last}", "trainer.max_epochs=3"]), tmp_path / "new")
    assert _last_step(tmp_path / "new")[0] == 6


def test_cli_run_directory_contract(tmp_path):
    """`python -m lensexp.train experiment=quickstart hydra.run.dir=RUN` leaves what conventions.md lists."""
    run_dir = tmp_path / "RUN"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        "-m",
        "lensexp.train",
        "experiment=quickstart",
        f"hydra.run.dir={run_dir}",
        *[o for o in FAST if not o.startswith("logger=")],
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",  # the quickstart validates every 2nd epoch
    ]
    r = subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    cols = set(rows[0])
    for p in ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2", "mu_F"):
        for m in ("rmse", "cov68", "cov95", "cov997"):
            assert f"val/{m}/{p}" in cols
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_bad_training_config_is_one_clear_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "lensexp.train", *FAST, "datamodule.source=ftp", f"hydra.run.dir={tmp_path}"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "datamodule.source must be" in r.stderr.strip().splitlines()[-1]


def test_unknown_input_norm_is_refused_before_training():
    from lensexp.train import build_module

    with pytest.raises(ConfigError, match="input_norm must be one of"):
        build_module(compose_config("train", [*FAST, "input_norm=log"]))


def test_optuna_search_space_names_real_options():
    import yaml

    spec = yaml.safe_load((CONF_DIR / "hparams_search" / "optuna.yaml").read_text())
    cfg = compose_config("train", [])
    from omegaconf import OmegaConf

    for key in spec["hydra"]["sweeper"]["params"]:
        assert OmegaConf.select(cfg, key) is not None, key
    assert OmegaConf.select(cfg, "optimized_metric") == "val/loss"
    assert spec["optimized_metric"] == "val/coverage_error"


def test_lr_plan_warms_up_holds_then_anneals():
    from lensexp.module import LRPlan

    plan = LRPlan(warm=4, total=None)
    assert [plan.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert plan.factor(1000) == 1.0  # a time budget has not fixed the end yet: the peak holds
    plan.total = 14
    assert plan.factor(4) == 1.0 and abs(plan.factor(9) - (0.01 + 0.99 * 0.5)) < 1e-12
    assert abs(plan.factor(14) - 0.01) < 1e-12 and plan.factor(99) == plan.factor(14)


def test_lr_plan_revised_late_continues_from_the_current_rate():
    """A revision stretches (or compresses) the rest of the cosine from the rate at its step: no
    jump there, monotone after, 1 % of the peak at the new end; a resumed run takes the anchor
    from the plan in the checkpoint."""
    from types import SimpleNamespace

    from lensexp.callbacks import TimeBudget
    from lensexp.module import LRPlan

    plan = LRPlan(warm=10, total=100)
    before = plan.factor(70)
    plan.revise(70, 160)  # more epochs fit than planned: stretched
    assert plan.factor(70) == before and plan.factor(69) > before  # continuous, still decaying
    tail = [plan.factor(k) for k in range(70, 161)]
    assert all(a > b for a, b in zip(tail, tail[1:])) and abs(tail[-1] - 0.01) < 1e-12
    assert plan.factor(100) > 0.1  # the old end lies half-way down the new tail
    plan.revise(120, 130)  # then fewer: compressed, again without a jump
    assert abs(plan.factor(120) - tail[50]) < 1e-12 and abs(plan.factor(130) - 0.01) < 1e-12
    budget = TimeBudget(60.0)
    budget.load_state_dict({"plan": {"epochs": 13, "warm": 10, "total": 130, "anchor": [120, plan.anchor_progress]}})
    module = SimpleNamespace(lr_plan=LRPlan(warm=5, total=None))
    trainer = SimpleNamespace(num_training_batches=10, global_step=120, fit_loop=SimpleNamespace(max_epochs=1))
    budget.on_train_start(trainer, module)
    assert trainer.fit_loop.max_epochs == 13
    assert [module.lr_plan.factor(k) for k in (120, 125, 130)] == [plan.factor(k) for k in (120, 125, 130)]


def test_time_budget_fits_epochs_and_ends_annealed(tmp_path):
    """``time_budget``: the epoch count is fixed from the measured speed at the first validation,
    written to RUN/schedule.json and kept in the checkpoint; the learning rate ends at 1 % of its
    peak whatever the count; rerunning the same command resumes the plan (nothing more to train)."""
    import json
    import time

    over = [*FAST, "time_budget=00:00:00:06", "trainer.max_epochs=500", "+trainer.check_val_every_n_epoch=2"]
    t0 = time.perf_counter()
    run(compose_config("train", over), tmp_path)
    wall = time.perf_counter() - t0
    plan = json.loads((tmp_path / "schedule.json").read_text())
    step, epoch = _last_step(tmp_path)
    assert plan["epochs"] % 2 == 0 and 2 <= plan["epochs"] < 500  # a multiple of the validation period
    assert step == plan["total"] == 2 * plan["epochs"] and epoch == plan["epochs"] - 1  # the last epoch's index
    assert plan["warm"] == 2  # one epoch of warm-up
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    lr = compose_config("train", over).optim.lr
    assert abs(ck["lr_schedulers"][0]["_last_lr"][0] - 0.01 * lr) < 1e-9 * lr
    assert any(v.get("plan") == plan for v in ck["callbacks"].values())
    assert wall < 6 + 20  # the budget, plus start-up and the last validation
    run(compose_config("train", over), tmp_path)  # same run dir: resumes, the plan is complete
    assert _last_step(tmp_path)[0] == step
    # an epoch cap below the validation period: the plan is fixed after the first epoch, annealed to the cap
    short = [*FAST, "time_budget=00:00:10:00", "trainer.max_epochs=2", "+trainer.check_val_every_n_epoch=4"]
    run(compose_config("train", short), tmp_path / "short")
    assert json.loads((tmp_path / "short" / "schedule.json").read_text())["epochs"] == 2
    ck = torch.load(tmp_path / "short" / "checkpoints" / "last.ckpt", weights_only=False)
    assert abs(ck["lr_schedulers"][0]["_last_lr"][0] - 0.01 * lr) < 1e-9 * lr
    with pytest.raises(ConfigError, match="time_budget must look like"):
        run(compose_config("train", [*FAST, "time_budget=ten minutes"]), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before any logger or checkpoint is made


ZEN5_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni\n"
SKYLAKE_FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"


def test_precision_auto_is_bf16_only_on_hardware_bfloat16(monkeypatch):
    """``trainer.precision=auto`` (the CPU trainer's default): bf16-mixed where the CPU flags list
    hardware bfloat16, float32 otherwise (emulated bfloat16 is slower than float32); an explicit
    setting is kept as given."""
    from lensexp import runtime

    assert runtime.cpu_has_native_bf16(ZEN5_FLAGS)
    assert runtime.cpu_has_native_bf16(SKYLAKE_FLAGS.replace("avx512_vnni", "amx_bf16 amx_tile"))
    assert not runtime.cpu_has_native_bf16(SKYLAKE_FLAGS)
    assert not runtime.cpu_has_native_bf16("no flags line\n")
    assert compose_config("train", ["trainer=cpu"]).trainer.precision == "auto"
    for flags, want in ((ZEN5_FLAGS, "bf16-mixed"), (SKYLAKE_FLAGS, "32-true")):
        monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda cpuinfo=None, f=flags: "avx512_bf16" in f)
        assert runtime.resolve_precision("auto", "cpu") == want
    assert runtime.resolve_precision("32-true", "cpu") == "32-true"
    assert runtime.resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_bf16_mixed_training_runs_and_resumes(tmp_path):
    """A run in bf16-mixed precision trains with finite float32 losses, saves float32 weights
    (only the layers' arithmetic is bfloat16) and resumes from its checkpoint."""
    base = [*FAST, "callbacks.lr_monitor=false", "trainer.precision=bf16-mixed"]
    out = run(compose_config("train", [*base, "trainer.max_epochs=1"]), tmp_path)
    assert torch.isfinite(torch.tensor(out["train/loss"]))
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ck["state_dict"] and all(v.dtype != torch.bfloat16 for v in ck["state_dict"].values())
    run(compose_config("train", [*base, "trainer.max_epochs=2"]), tmp_path)  # same run dir: resumes
    assert _last_step(tmp_path)[0] == 4


@pytest.mark.parametrize("task", ["params", "kappa"])
def test_d4_augmented_run_trains_and_its_checkpoint_loads(tmp_path, task):
    """``augment=d4`` trains label and density-map networks, and the setting travels in the
    checkpoint through the weights-only loader's allow-list."""
    from lensexp.checkpoints import load_module

    extra = ["task=kappa", "data=kappa", "model=kappa_unet"] if task == "kappa" else []
    out = run(compose_config("train", [*FAST, *extra, "augment=d4", "trainer.max_epochs=1"]), tmp_path)
    assert torch.isfinite(torch.tensor(out["train/loss"]))
    assert load_module(tmp_path / "checkpoints" / "last.ckpt").hparams.augment == "d4"
    with pytest.raises(ConfigError, match="augment must be one of"):
        run(compose_config("train", [*FAST, "augment=rot45", "+trainer.fast_dev_run=true"]), tmp_path / "bad")


def test_training_from_shards_is_deterministic_by_seed(tmp_path):
    """Two runs with the same seed over the same shards, one loader worker, dropout and grid
    augmentation on, end with identical weights (shards, samples, dropout masks and turns all
    drawn from the seed)."""
    from lensexp.simulate import run as simulate

    root = tmp_path / "shards"
    simulate(
        compose_config(
            "simulate",
            ["data=tiny", SERSIC_ONLY, "n=96", "shard_size=16", "seed=1", "progress=false", f"out={root}"],
        )
    )
    over = [
        "datamodule.source=shards",
        f"datamodule.root={root}",
        "datamodule.num_workers=1",
        "datamodule.shuffle=20",
        "augment=d4",
        "model.dropout=0.1",
        "trainer.max_epochs=2",
        "callbacks.lr_monitor=false",
    ]
    weights = []
    for k in range(2):
        run(compose_config("train", [*FAST, *over]), tmp_path / f"run{k}")
        ck = torch.load(tmp_path / f"run{k}" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        weights.append(ck["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class SlowStart(pl.Callback):
    """Sleeps after each training step of the first ``epochs`` epochs: another process busy on
    the cores while the time budget measures the speed."""

    def __init__(self, seconds: float = 0.5, epochs: int = 2):
        self.seconds, self.epochs = seconds, epochs

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch < self.epochs:
            time.sleep(self.seconds)


def test_time_budget_revises_a_plan_made_while_the_machine_was_busy(tmp_path):
    """A plan fixed from slowed first epochs is revised upwards at the next validations (from
    the speed since the start), each revision kept in RUN/schedule.json, and the run still ends
    on the revised plan's last step with the learning rate annealed."""
    import json

    over = [
        *FAST,
        "time_budget=00:00:00:16",  # room for validations after the plan on a slow CPU (8 s: none on a 2-core Xeon)
        "trainer.max_epochs=500",
        "+trainer.check_val_every_n_epoch=2",
        "+callbacks.slow_start._target_=tests.test_train.SlowStart",
    ]
    run(compose_config("train", over), tmp_path)
    plan = json.loads((tmp_path / "schedule.json").read_text())
    revised = plan.get("revisions", [])
    assert revised and revised[-1]["epochs"] == plan["epochs"]
    first = revised[0]  # the speed since the start rose once the machine was free: more epochs fit
    assert first["steps_per_s"] > plan["steps_per_s"] and plan["epochs"] > first["from"]
    step, epoch = _last_step(tmp_path)
    assert step == plan["total"] == 2 * plan["epochs"] and epoch == plan["epochs"] - 1
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    lr = compose_config("train", over).optim.lr
    assert abs(ck["lr_schedulers"][0]["_last_lr"][0] - 0.01 * lr) < 1e-9 * lr


@pytest.mark.parametrize(("fits", "planned"), [(22.5, 20), (23.2, 24), (17.0, 16), (8.3, 12), (5.0, 12)])
def test_a_time_budget_revision_plans_at_most_one_epoch_past_what_fits(fits, planned):
    """Revisions come late, when an overrun cannot be made up: the count goes to a multiple of
    the validation interval no more than one epoch past what fits (the nearest multiple, 24 for
    22.5 epochs, overran a 720-s budget by 66 s). With the budget spent after epoch 8 it is the
    next multiple, 12, never 9: the last epoch must validate (CI: a plan of 17 at every 2)."""
    from types import SimpleNamespace

    from lensexp.callbacks import TimeBudget
    from lensexp.module import LRPlan

    budget, done, rate, steps_epoch = 100.0, 8, 2.0, 10  # 2 steps/s since the last validation
    elapsed = budget - (fits - done) * steps_epoch / rate
    tb = TimeBudget(budget)
    tb.plan = {"epochs": 20, "warm": 10, "total": 200, "cap": None}
    now = time.perf_counter()
    tb._t0, tb._step0, tb._last = now - elapsed, 0, (now - 10.0, done * steps_epoch - 20)
    trainer = SimpleNamespace(
        num_training_batches=steps_epoch,
        current_epoch=done - 1,
        global_step=done * steps_epoch,
        check_val_every_n_epoch=4,
        strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
        fit_loop=SimpleNamespace(max_epochs=20),
        is_global_zero=True,
    )
    module = SimpleNamespace(lr_plan=LRPlan(warm=10, total=200))
    tb._fix(trainer, module, revise=True)
    assert tb.plan["epochs"] == trainer.fit_loop.max_epochs == planned
    assert module.lr_plan.total == 10 * planned


class SlowFirstHalf(SlowStart):
    """Busy cores for the first 7 epochs: past half of a 16-s budget on any machine."""

    def __init__(self):
        super().__init__(seconds=0.5, epochs=7)


def test_time_budget_revises_after_half_the_budget_without_a_jump(tmp_path):
    """A slow stretch that outlasts half the budget still leaves the budget used: the validations
    after it revise the plan from the speed since the previous one (measured: a quickstart whose
    first 8 of 16 epochs ran at half speed ended 200 of its 570 s early); the decay is stretched
    from the current rate and the run ends annealed on the revised plan's last step."""
    import json

    over = [
        *FAST,
        "time_budget=00:00:00:16",
        "trainer.max_epochs=500",
        "+trainer.check_val_every_n_epoch=2",
        "+callbacks.slow_start._target_=tests.test_train.SlowFirstHalf",
    ]
    run(compose_config("train", over), tmp_path)
    plan = json.loads((tmp_path / "schedule.json").read_text())
    late = [r for r in plan.get("revisions", []) if r["after_s"] > 8.0 and r["epochs"] > r["from"]]
    assert late, plan  # more epochs fit once the cores were free, past half the budget
    assert plan["anchor"][0] >= 2 * 8 and 0 < plan["anchor"][1] < 1  # stretched from epoch 8 on, mid-decay
    step, epoch = _last_step(tmp_path)
    assert step == plan["total"] == 2 * plan["epochs"] and epoch == plan["epochs"] - 1
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    lr = compose_config("train", over).optim.lr
    assert abs(ck["lr_schedulers"][0]["_last_lr"][0] - 0.01 * lr) < 1e-9 * lr


def test_ema_validates_saves_and_resumes_the_average(tmp_path):
    """With ``callbacks.ema`` the checkpoint's ``state_dict`` (what ``load_module`` reads,
    weights-only) is the moving average of the raw weights it also carries, its buffers (label
    scaler, batch-norm statistics) the raw ones; the average follows ``(1 - w) * avg + w * raw``
    each step; a resumed run continues both."""
    from lensexp.callbacks import EMA
    from lensexp.checkpoints import load_module

    ema = ["+callbacks.ema._target_=lensexp.callbacks.EMA", "+callbacks.ema.decay=0.5"]
    base = [*FAST, "callbacks.lr_monitor=false", *ema]
    run(compose_config("train", [*base, "trainer.max_epochs=1"]), tmp_path)
    ck = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    raw, avg = ck["current_model_state"], ck["state_dict"]
    assert int(ck["averaging_state"]["n_averaged"]) == 2  # 2 steps
    moved = [k for k in raw if not torch.equal(raw[k], avg[k])]
    assert moved and all(k.startswith("net.") and "running_" not in k for k in moved)  # weights, not buffers
    assert torch.equal(avg["scaler.label_std"], raw["scaler.label_std"])  # the fitted scaler, exactly
    loaded = load_module(tmp_path / "checkpoints" / "last.ckpt").state_dict()
    assert all(torch.equal(loaded[k], avg[k]) for k in moved)
    run(compose_config("train", [*base, "trainer.max_epochs=2"]), tmp_path)  # same run dir: resumes
    ck2 = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ck2["global_step"] == 4 and int(ck2["averaging_state"]["n_averaged"]) == 4
    # the update rule with its warm-up: after n updates the weight of the new value is 1 - min(decay, (1+n)/(10+n))
    cb = EMA(decay=0.5)
    a, c = [torch.zeros(3)], [torch.ones(3)]
    cb._update(a, c, torch.tensor(1))  # min(0.5, 2/11) = 2/11 -> weight 9/11
    torch.testing.assert_close(a[0], torch.full((3,), 9 / 11))
    cb._update(a, c, torch.tensor(100))  # decay 0.5 -> halfway to 1
    torch.testing.assert_close(a[0], torch.full((3,), 10 / 11))
    with pytest.raises(ConfigError, match="decay must be in"):
        EMA(decay=1.0)


def test_make_data_simulates_the_shard_set_once_then_trains_from_it(tmp_path):
    """``make_data`` writes ``datamodule.root`` from the run's own data config before training
    (density maps included), finds it complete on a rerun (nothing rewritten), and a set made
    with other settings is refused in one line; on-the-fly runs have nothing to make."""
    root = tmp_path / "shards"
    base = [
        *FAST,
        "task=kappa",
        "data=kappa",
        "data.source.kind=sersic",
        "model=kappa_unet",
        "callbacks.lr_monitor=false",
        "datamodule.source=shards",
        f"datamodule.root={root}",
        "make_data={n: 48, splits: {train: 32, val: 16, test: 0}, seed: 3, workers: 1}",
        "trainer.max_epochs=1",
    ]
    out = run(compose_config("train", base), tmp_path / "run")
    assert torch.isfinite(torch.tensor(out["train/loss"]))
    man = json.loads((root / "manifest.json").read_text())
    assert man["count"] == 48 and {s["name"].split("/")[0] for s in man["shards"]} == {"train", "val"}
    shard = sorted(root.glob("train/shard-*.tar"))[0]
    names = {m.name.split(".", 1)[1] for m in tarfile.open(shard)}
    assert {"image.npy", "kappa.npy", "params.json"} <= names  # the run's preset: maps included
    stamp = shard.stat().st_mtime_ns
    run(compose_config("train", [*base, "trainer.max_epochs=2"]), tmp_path / "run")  # resumes; the set is complete
    assert shard.stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="different configuration"):
        run(compose_config("train", [*base, "make_data.seed=4"]), tmp_path / "other")
    fly = [*base, "datamodule.source=on_the_fly", f"datamodule.root={tmp_path / 'unused'}"]
    run(compose_config("train", fly), tmp_path / "fly")  # simulated while training: nothing to make
    assert not (tmp_path / "unused").exists() and (tmp_path / "fly" / "checkpoints" / "last.ckpt").is_file()
