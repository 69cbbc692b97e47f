"""Training: ``python -m lensexp.train`` - a Hydra-composed Lightning run of a timm backbone.

    python -m lensexp.train experiment=quickstart hydra.run.dir=outputs/runs/quickstart
    python -m lensexp.train model=inception_v4 data=hst trainer=gpu
    python -m lensexp.train -m model=resnet18,efficientnet_b0 model.dropout=0.05,0.1
    python -m lensexp.train experiment=quickstart uq=ensemble     # 4 seeded members, one run's budget
    python -m lensexp.train experiment=quickstart uq=flow         # normalizing-flow posterior head

A run directory RUN holds ``checkpoints/last.ckpt`` (and the best by validation loss),
``.hydra/config.yaml``, ``csv/`` metrics and an offline W&B run under ``wandb/``. Rerunning with
the same ``hydra.run.dir`` resumes from ``last.ckpt`` exactly (or give ``ckpt_path=...``); a
rerun whose ``data`` config differs from the one the checkpoint was trained on is refused, since
it would continue (or, when finished, keep) a network of other data.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from lensexp.cli import clean_errors, log
from lensexp.errors import ConfigError


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Fit (and optionally test) the configured model; returns the final logged metrics."""
    import pytorch_lightning as pl
    import torch

    from lensexp.callbacks import DataFingerprint, TimeBudget, build_callbacks, build_loggers, parse_duration
    from lensexp.data import LensDataModule
    from lensexp.runtime import resolve_precision, set_threads
    from lensexp.sim.schema import validate_config

    run_dir = Path(run_dir)
    validate_config(cfg.data)
    budget = parse_duration(cfg.time_budget) if cfg.get("time_budget") else None  # a bad value: one line, first
    ckpt = resume_checkpoint(cfg, run_dir)  # before any data are made: a refusal costs nothing
    if cfg.get("make_data"):
        make_data(cfg)
    set_threads()
    pl.seed_everything(int(cfg.seed), workers=True)
    dm = LensDataModule(cfg.data, **cfg.datamodule, seed=int(cfg.seed))
    model = build_module(cfg)
    trainer_kw = OmegaConf.to_container(cfg.trainer, resolve=True)
    if cfg.datamodule.source == "on_the_fly":
        # a new loader each epoch: the simulator continues its sequence (fresh lenses every epoch)
        trainer_kw.setdefault("reload_dataloaders_every_n_epochs", 1)
    precision = resolve_precision(trainer_kw.get("precision", "32-true"), trainer_kw.get("accelerator", "cpu"))
    if precision != str(trainer_kw.get("precision")):
        log.info("trainer.precision=%s -> %s on this machine", trainer_kw.get("precision"), precision)
    trainer_kw["precision"] = precision
    if trainer_kw.pop("compile", False):
        model.net = torch.compile(model.net)
    loggers = build_loggers(cfg, run_dir)
    callbacks = build_callbacks(cfg.callbacks, str(run_dir / "checkpoints"), bool(loggers))
    if budget:  # epochs and learning-rate schedule fitted to the wall time
        callbacks["time_budget"] = TimeBudget(budget, run_dir)
    callbacks["data_fingerprint"] = DataFingerprint(data_fingerprint(cfg))
    trainer = pl.Trainer(
        **trainer_kw, logger=loggers or False, callbacks=list(callbacks.values()), default_root_dir=str(run_dir)
    )
    try:
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
        record_cost(run_dir, time.perf_counter() - t0, trainer.global_step, int(cfg.datamodule.batch_size))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.test_after:
            best = getattr(callbacks.get("checkpoint"), "best_model_path", "")  # empty in fast_dev_run: test in memory
            trainer.test(model, datamodule=dm, ckpt_path=best or None)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    finally:
        if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
            import wandb

            wandb.finish()
    return metrics


def data_fingerprint(cfg: DictConfig) -> str:
    """sha256 of the run's ``data`` config as composed, interpolations unresolved (so the same on
    any machine whatever its data paths): stored in every checkpoint of the run."""
    text = json.dumps(OmegaConf.to_container(cfg.data, resolve=False), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint the run continues from: ``ckpt_path`` when given, else ``RUN/checkpoints/last.ckpt``
    when there is one (loaded weights-only: a bad file is one line, before any work). Resuming
    ``last.ckpt`` by rerunning in the same folder with another ``data`` config is refused in one
    line (it would continue, or when finished silently keep, a network of other data); a
    ``ckpt_path`` given on purpose may start from other data (logged). Checkpoints from before the
    fingerprint carry none and resume as before."""
    from lensexp.callbacks import DATA_KEY
    from lensexp.checkpoints import read_checkpoint

    ckpt, explicit = cfg.ckpt_path, cfg.ckpt_path is not None
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpt is None and last.exists():
        ckpt = str(last)
        log.info("resuming from %s", ckpt)
    if ckpt is None:
        return None
    saved = read_checkpoint(ckpt).get(DATA_KEY)
    if saved is not None and saved != data_fingerprint(cfg):
        if not explicit:
            raise ConfigError(
                f"'{run_dir}' holds a run trained on another data config than this one (e.g. another preset or "
                "data.mass.kind): give a new hydra.run.dir, or ckpt_path= to start from that checkpoint on purpose"
            )
        log.info("ckpt_path %s was trained on another data config; continuing on this one", ckpt)
    return str(ckpt)


def make_data(cfg: DictConfig) -> None:
    """Simulate the run's shard set ``datamodule.root`` from its own ``data`` config before
    training, as ``make_data`` says (``n``, ``splits``, ``seed``, ``workers``): an experiment
    that trains from shards then runs on its own (on-the-fly data: nothing to make).
    ``lensexp.simulate`` resumes a partial set and finds a complete one in a second; a set made
    with other settings is refused (one line). Under DDP rank 0 makes it; the other ranks wait
    for rank 0 when the process group starts, before any shard is read."""
    import os

    from lensexp.config import compose_config
    from lensexp.simulate import run as simulate

    if cfg.datamodule.source != "shards":
        log.info("make_data ignored: datamodule.source=%s simulates while training", cfg.datamodule.source)
        return
    if int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0:
        return
    md = cfg.make_data
    sim = compose_config("simulate", [f"out={cfg.datamodule.root}", "progress=false"])
    with open_dict(sim):
        sim.data = cfg.data
        for key in ("n", "splits", "seed", "workers"):
            if md.get(key) is not None:
                sim[key] = md[key]
    t0 = time.perf_counter()
    simulate(sim)
    log.info("training data in %s ready after %.0f s", cfg.datamodule.root, time.perf_counter() - t0)


def build_module(cfg: DictConfig):
    """The LightningModule of ``cfg.task``: the network (``cfg.model``, ``_target_``), loss
    (``cfg.loss``) and training settings, through :mod:`lensexp.build`."""
    from lensexp import build
    from lensexp.sim.normalize import NORMALIZE

    if str(cfg.input_norm) not in NORMALIZE:
        raise ConfigError(f"input_norm must be one of {NORMALIZE}, got '{cfg.input_norm}'")
    settings = dict(
        lr=float(cfg.optim.lr),
        weight_decay=float(cfg.optim.weight_decay),
        n_mc_val=int(cfg.n_mc_val),
        input_norm=str(cfg.input_norm),
        posterior_centre=str(cfg.get("posterior_centre", "mc_mean")),
        augment=str(cfg.get("augment", "none")),
        data_info={
            "name": str(cfg.data.name),
            "npix": int(cfg.data.npix),
            "pixscale": float(cfg.data.pixscale),
            "bands": [str(b.name) for b in cfg.data.bands],
        },
    )
    task, in_chans = str(cfg.get("task", "params")), len(cfg.data.bands)
    target = str(cfg.model.get("_target_", build.REGRESSOR))
    if task == "kappa":
        if not (cfg.data.get("mass") or {}).get("kappa_map"):
            raise ConfigError(
                "task=kappa needs a data preset with kappa maps (data.mass.kappa_map), "
                f"e.g. data=kappa; got data={cfg.data.name}"
            )
        extra = cfg.get("kappa")  # the map target (log / linear), optional
        settings.update(OmegaConf.to_container(extra, resolve=True) if extra is not None else {})
        return build.kappa_module(cfg.model, in_chans, **settings)
    if task != "params":
        raise ConfigError(f"task must be 'params' (the eight labels) or 'kappa' (density maps), got '{task}'")
    if target == build.KAPPA_NET:
        raise ConfigError("model=kappa_unet is a density-map network: train it with task=kappa data=kappa")
    settings["psf_dropout"] = float(cfg.get("psf_dropout", 0.0))
    return build.lens_module(cfg.model, cfg.loss, in_chans, **settings)


COST_FILE = "train_cost.json"


def record_cost(run_dir: Path, seconds: float, steps: int, batch_size: int) -> None:
    """Add this fit's wall time to ``RUN/train_cost.json`` (kept over resumes): seconds, steps,
    training images seen."""
    from lensexp.files import write_text_atomic

    path = Path(run_dir) / COST_FILE
    prev = json.loads(path.read_text()) if path.is_file() else {}
    rec = {"seconds": float(prev.get("seconds", 0.0)) + seconds, "steps": int(steps), "images": int(steps) * batch_size}
    write_text_atomic(path, json.dumps(rec, indent=2) + "\n")


def read_cost(run_dir: Path) -> dict:
    """Training cost of a run (summed over an ensemble's members): seconds, images."""
    paths = [Path(run_dir) / COST_FILE, *sorted(Path(run_dir).glob(f"members/*/{COST_FILE}"))]
    recs = [json.loads(p.read_text()) for p in paths if p.is_file()]
    return {k: sum(r.get(k, 0) for r in recs) for k in ("seconds", "images")} if recs else {}


def split_time(max_time, n: int):
    """A ``DD:HH:MM:SS`` limit divided by ``n`` (None stays None)."""
    from lensexp.callbacks import parse_duration

    if not max_time:
        return max_time
    secs = int(parse_duration(max_time, "max_time")) // n
    return f"{secs // 86400:02d}:{secs // 3600 % 24:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"


def run_ensemble(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Deep ensemble: ``ensemble.n`` members, seeds ``seed + k``, each a whole training run in
    ``RUN/members/<k>`` (resumable; a finished member is skipped), then ``RUN/checkpoints/ensemble.json``.
    With ``ensemble.split_budget`` each member gets ``1/n`` of the images per epoch and of
    ``trainer.max_time`` (the ensemble costs what one run does)."""
    from lensexp.ensemble import write_manifest

    run_dir, n = Path(run_dir), int(cfg.ensemble.n)
    if cfg.get("make_data"):
        make_data(cfg)  # once for all members: each run would re-hash the whole set
    members, metrics = [], {}
    for k in range(n):
        mdir = run_dir / "members" / str(k)
        members.append(mdir / "checkpoints" / "last.ckpt")
        if (mdir / "DONE").is_file():
            log.info("ensemble member %d/%d already trained", k + 1, n)
            continue
        mcfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        mcfg.seed = int(cfg.seed) + k
        mcfg.ensemble.n = 1
        mcfg.make_data = None
        if cfg.ensemble.split_budget:
            mcfg.datamodule.train_epoch_size = max(1, int(cfg.datamodule.train_epoch_size) // n)
            if "max_time" in mcfg.trainer:
                mcfg.trainer.max_time = split_time(mcfg.trainer.max_time, n)
            if mcfg.get("time_budget"):
                mcfg.time_budget = split_time(mcfg.time_budget, n)
        log.info("ensemble member %d/%d (seed %d) in %s", k + 1, n, mcfg.seed, mdir)
        metrics = run(mcfg, mdir)
        (mdir / "DONE").write_text("trained\n")
    path = write_manifest(run_dir, members)
    log.info("ensemble of %d written to %s", n, path)
    return metrics


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    run_dir = HydraConfig.get().runtime.output_dir
    n = int(cfg.get("ensemble", {}).get("n", 1))
    if n < 1:
        raise ConfigError(f"ensemble.n must be >= 1, got {n}")
    out = run_ensemble(cfg, run_dir) if n > 1 else run(cfg, run_dir)
    return out.get(str(cfg.optimized_metric))


if __name__ == "__main__":
    main()
