"""Lightning callbacks of a training run, instantiated from ``conf/callbacks/*.yaml``.

:class:`Throughput` logs the network's size and the training images per second of each epoch;
:class:`WandbSummary` adds a table of the last validation metrics to a W&B run.
:func:`build_callbacks` and :func:`build_loggers` turn the ``callbacks`` and ``logger`` config
groups into objects (``_target_`` + :func:`hydra.utils.instantiate`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from lensexp.metrics import SHORT

WANDB_ID_FILE = "wandb_run_id.txt"


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
