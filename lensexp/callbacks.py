"""Lightning callbacks of a training run, instantiated from ``conf/callbacks/*.yaml``.

:class:`Throughput` logs the network's size and the training images per second of each epoch;
:class:`WandbSummary` adds a table of the last validation metrics to a W&B run;
:class:`TimeBudget` fits the number of epochs and the learning-rate schedule to a wall-time budget;
:class:`EMA` validates, tests and saves an exponential moving average of the weights.
:func:`build_callbacks` and :func:`build_loggers` turn the ``callbacks`` and ``logger`` config
groups into objects (``_target_`` + :func:`hydra.utils.instantiate`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import WeightAveraging

from lensexp.metrics import SHORT

WANDB_ID_FILE = "wandb_run_id.txt"
SCHEDULE_FILE = "schedule.json"
log = logging.getLogger("lensexp.train")


def parse_duration(text, name: str = "time_budget") -> float:
    """Seconds of a ``"DD:HH:MM:SS"`` / ``"HH:MM:SS"`` / ``"MM:SS"`` duration (Lightning's
    ``max_time`` format); ``name`` is the setting named in the error."""
    from lensexp.errors import ConfigError

    try:
        parts = [float(x) for x in str(text).split(":")]
        if not 1 <= len(parts) <= 4 or min(parts) < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"{name} must look like DD:HH:MM:SS, got '{text}'") from None
    seconds = sum(v * u for v, u in zip(reversed(parts), (1, 60, 3600, 86400)))
    if seconds <= 0:
        raise ConfigError(f"{name} must be > 0, got '{text}'")
    return seconds


class TimeBudget(pl.Callback):
    """Train for ``budget`` seconds of wall time with a schedule that ends annealed.

    A fixed epoch count either wastes a fast machine's budget or, cut by ``max_time``, stops a
    slow one at a high learning rate. Here the warm-up lasts the first epoch, the learning rate
    then holds its peak until the end of the first validation; there the run's speed (steps per
    second, validation included) fixes the number of epochs that fit the budget - the nearest
    multiple of ``check_val_every_n_epoch``, within ``trainer.max_epochs`` - and the cosine decay
    ends with them (Li et al. 2020, "Budgeted training"); without validation, or with a cap that
    ends the run before the first one, the plan is made at the end of an epoch instead. Each later
    validation but the plan's last revises the count from the speed since the previous one
    (that validation included; at most one epoch past what fits), so that first epochs slowed
    by another process on the same cores do not decide the whole run (measured: plans 25 and
    35 % short, the second with its slow stretch past half the budget): the decay is stretched
    or compressed from the current rate on, never jumps (:meth:`lensexp.module.LRPlan.revise`).
    The plan is written to ``RUN/schedule.json`` (with its ``revisions``) and kept in the
    checkpoint, so a resumed run continues it; given the plan, the run is deterministic by seed
    (only the epoch count depends on the machine's speed).
    """

    def __init__(self, budget: float, run_dir: str | Path | None = None):
        self.budget = float(budget)
        self.run_dir = Path(run_dir) if run_dir else None
        self.plan: dict | None = None  # {"epochs", "total", "warm", ...} once fixed
        self._resumed = False

    def on_train_start(self, trainer, pl_module):
        steps = max(int(trainer.num_training_batches), 1)
        self._t0, self._step0 = time.perf_counter(), int(trainer.global_step)
        self._last = (self._t0, self._step0)  # the previous validation's (time, step)
        if self.plan:  # resumed: continue the plan in the checkpoint (no further revisions)
            self._resumed = True
            trainer.fit_loop.max_epochs = int(self.plan["epochs"])
            lr = pl_module.lr_plan
            lr.warm, lr.total = int(self.plan["warm"]), int(self.plan["total"])
            lr.anchor_step, lr.anchor_progress = self.plan.get("anchor") or (None, 0.0)
            return
        pl_module.lr_plan.warm, pl_module.lr_plan.total = min(steps, pl_module.lr_plan.warm), None

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        if self.plan is None:
            self._fix(trainer, pl_module)
        elif not self._resumed and int(trainer.current_epoch) + 1 < int(self.plan["epochs"]):
            self._fix(trainer, pl_module, revise=True)  # every rank: _fix takes rank 0's plan
        self._last = (time.perf_counter(), int(trainer.global_step))

    def on_train_epoch_end(self, trainer, pl_module):
        if self.plan is not None:
            return
        every = int(trainer.check_val_every_n_epoch or 1)
        late = (trainer.current_epoch + 1) >= 2 * every  # no validation yet
        capped = 0 < (trainer.max_epochs or 0) <= every  # the cap ends the run before any validation
        if not trainer.enable_validation or late or capped:
            self._fix(trainer, pl_module)

    def _fix(self, trainer, pl_module, revise: bool = False) -> None:
        steps_epoch = max(int(trainer.num_training_batches), 1)
        done = int(trainer.current_epoch) + 1
        now, step = time.perf_counter(), int(trainer.global_step)
        elapsed = now - self._t0
        t_last, step_last = self._last  # the previous validation's; the start's for the first plan
        rate = max(step - step_last, 1) / max(now - t_last, 1e-9)
        every = int(trainer.check_val_every_n_epoch or 1)
        fit = (self.budget - elapsed) * rate / steps_epoch + done  # epochs that fit in the budget
        # the last epoch validates: a multiple of `every`, at least the next one (done + 1 = 17 at every 2
        # ended unvalidated); the first plan takes the nearest, a revision (late, when an overrun cannot be
        # made up) at most one epoch past what fits (the nearest at 527 of 720 s overran by 66 s)
        whole = (fit + 1) // every if revise else round(fit / every)
        epochs = max((done // every + 1) * every, int(whole) * every)
        old = self.plan
        if revise:  # trainer.max_epochs is the plan's count by now: the cap is the one the plan kept
            cap = old.get("cap")
        else:
            cap = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        epochs = int(min(epochs, cap or epochs))
        if revise:
            plan = old
            if epochs != int(old["epochs"]):
                entry = {
                    "after_s": round(elapsed, 2),
                    "steps_per_s": round(rate, 3),
                    "from": old["epochs"],
                    "epochs": epochs,
                }
                revisions = [*old.get("revisions", []), entry]
                plan = dict(old, epochs=epochs, total=epochs * steps_epoch, revisions=revisions)
        else:
            plan = {
                "budget_s": self.budget,
                "fixed_after_s": round(elapsed, 2),
                "steps_per_s": round(rate, 3),
                "epochs": epochs,
                "warm": int(pl_module.lr_plan.warm),
                "total": epochs * steps_epoch,
                "cap": cap,
            }
        self.plan = trainer.strategy.broadcast(plan, 0)  # one plan for every DDP rank: rank 0's (all ranks call)
        if revise and self.plan == old:
            return
        epochs = int(self.plan["epochs"])
        trainer.fit_loop.max_epochs = epochs
        if revise:  # the decay continues from the current rate (the same step on every rank)
            pl_module.lr_plan.revise(step, self.plan["total"])
            self.plan["anchor"] = [pl_module.lr_plan.anchor_step, pl_module.lr_plan.anchor_progress]
        else:
            pl_module.lr_plan.total = self.plan["total"]
        log.info(
            "time budget %.0f s: %.2f steps/s after %.0f s -> %d epochs (%d steps), learning rate annealed over them%s",
            self.budget,
            rate,
            elapsed,
            epochs,
            self.plan["total"],
            " (revised)" if revise else "",
        )
        if self.run_dir is not None and trainer.is_global_zero:
            from lensexp.files import write_text_atomic

            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / SCHEDULE_FILE, json.dumps(self.plan, indent=2) + "\n")

    def state_dict(self) -> dict:
        return {"plan": self.plan}

    def load_state_dict(self, state_dict: dict) -> None:
        plan = state_dict.get("plan")
        self.plan = dict(plan) if plan else None


class EMA(WeightAveraging):
    """Exponential moving average of the weights, updated after every optimiser step by
    Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging`: validation, the test and
    ``state_dict`` of every checkpoint use the average (the raw weights travel beside it as
    ``current_model_state``, so a resumed run continues both); at the end of fitting the average
    replaces the raw weights. Buffers are copied, not averaged: the label scaler is fitted on the
    first batches and an average would mix it with its unfitted start, and batch-norm statistics
    stay those of the raw weights (close to the average's at an annealed learning rate). The decay
    warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates - an average over about
    the last tenth of the steps so far, until ``decay`` (0.999: ~1 000 steps) takes over."""

    def __init__(self, decay: float = 0.999):
        from lensexp.errors import ConfigError

        if not 0.0 < float(decay) < 1.0:
            raise ConfigError(f"callbacks.ema.decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        super().__init__(use_buffers=False, multi_avg_fn=self._update)

    @torch.no_grad()
    def _update(self, averaged: list, current: list, n_averaged) -> None:
        n = float(n_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(self.decay, (1.0 + n) / (10.0 + n)))


DATA_KEY = "lensexp_data_fingerprint"  # checkpoint key: the run's data config (lensexp.train.data_fingerprint)


class DataFingerprint(pl.Callback):
    """Writes ``fingerprint`` (the run's data config, :func:`lensexp.train.data_fingerprint`)
    into every checkpoint under :data:`DATA_KEY`, so that rerunning a folder with other data is
    refused instead of resumed (:func:`lensexp.train.resume_checkpoint`)."""

    def __init__(self, fingerprint: str):
        self.fingerprint = str(fingerprint)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[DATA_KEY] = self.fingerprint


class Throughput(pl.Callback):
    """``model/params`` at the start; ``train/img_per_s`` (training images per second of wall
    time, data loading included) at the end of every epoch."""

    def on_train_start(self, trainer, pl_module):
        pl_module.log("model/params", float(sum(p.numel() for p in pl_module.net.parameters())), rank_zero_only=True)

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += int(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module):
        dt = time.perf_counter() - getattr(self, "_t0", time.perf_counter())
        if dt > 0 and getattr(self, "_n", 0):
            pl_module.log("train/img_per_s", self._n / dt)


class WandbSummary(pl.Callback):
    """At the end of fitting, a W&B table ``val/summary`` of the last validation: per label RMSE,
    median error and coverage for a label network; one row per metric for networks without
    labels (density maps: ``val/kappa_mae``, ``val/kappa_cov68``, ...). Nothing when no W&B
    logger is attached."""

    def on_fit_end(self, trainer, pl_module):
        from pytorch_lightning.loggers import WandbLogger

        m = getattr(pl_module, "last_metrics", None)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not m or not loggers:
            return
        labels = list(getattr(pl_module, "labels", None) or [])
        if labels and f"val/rmse/{labels[0]}" in m:
            cols = ["label", "rmse", "median_abs", *SHORT.values()]
            rows = [
                [n, m[f"val/rmse/{n}"], m[f"val/median_abs/{n}"], *(m[f"val/{c}/{n}"] for c in SHORT.values())]
                for n in labels
            ]
        else:
            cols, rows = ["metric", "value"], [[k, float(v)] for k, v in sorted(m.items()) if k.startswith("val/")]
        if rows:
            loggers[0].log_table(key="val/summary", columns=cols, data=rows)


def build_callbacks(cfg: DictConfig, ckpt_dir: str, with_loggers: bool) -> dict:
    """The ``callbacks`` group instantiated by name (null or false entries are off); checkpoint
    callbacks write to ``ckpt_dir``; ``LearningRateMonitor`` only when something logs."""
    from hydra.utils import instantiate

    out = {}
    for name, c in (cfg or {}).items():
        if not c:
            continue
        target = str(c.get("_target_", ""))
        if target.endswith("LearningRateMonitor") and not with_loggers:
            continue
        extra = {"dirpath": ckpt_dir} if target.endswith("ModelCheckpoint") else {}
        out[name] = instantiate(c, **extra, _convert_="all")
    return out


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """The ``logger`` group instantiated: CSV and/or W&B (offline by default; the W&B run id is
    kept in ``RUN/wandb_run_id.txt`` so that a resumed run continues it; checkpoints are uploaded
    only online)."""
    from hydra.utils import instantiate

    loggers = []
    if cfg.logger.get("csv"):
        loggers.append(instantiate(cfg.logger.csv, save_dir=str(run_dir), _convert_="all"))
    wb = cfg.logger.get("wandb")
    if wb and wb.get("mode") != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        spec = {
            **OmegaConf.to_container(wb, resolve=True),
            "id": wandb_run_id(run_dir),
            "resume": "allow",
            "save_dir": str(run_dir),
            "log_model": wb.mode == "online",
            "config": OmegaConf.to_container(cfg, resolve=True),  # a keyword instantiate itself takes
        }
        loggers.append(instantiate(spec, _recursive_=False, _convert_="all"))
    return loggers


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder (``RUN/wandb_run_id.txt``, made on the first start), so
    that a resumed run continues the same W&B run instead of starting a second one."""
    import secrets
    import string

    from lensexp.files import write_text_atomic

    path = Path(run_dir) / WANDB_ID_FILE
    if path.is_file():
        rid = path.read_text().strip()
        if rid.isalnum() and 0 < len(rid) <= 64:
            return rid
    rid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, rid + "\n")
    return rid
