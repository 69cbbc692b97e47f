"""Lightning module: network, loss, label normalisation and MC-dropout validation metrics.

Labels are standardised inside the network (``mu_F`` through its logarithm) with a mean and
standard deviation fitted on the first training batches and stored as buffers, so that a
checkpoint predicts in physical units. Inputs are normalised per image (flux units drop out).
Validation runs ``n_mc_val`` MC-dropout passes, each widened by its aleatoric sigma, and logs per
label RMSE, median absolute error and coverage of the 68.3/95.5/99.7 % central intervals.
"""

from __future__ import annotations

import math
import time

import pytorch_lightning as pl
import torch

from lensexp import metrics
from lensexp.losses import get_loss
from lensexp.models import LensRegressor, MCDropout, set_mc_dropout
from lensexp.sim.instrument import normalize
from lensexp.sim.priors import LABELS

LOG_LABELS = ("mu_F",)
SHORT = {0.683: "cov68", 0.955: "cov95", 0.997: "cov997"}
VAL_SAMPLES = 1024  # posterior samples per lens in validation metrics


class EvalHooks:
    """Lightning's validation and test steps routed to ``_eval_step(batch, batch_idx, prefix)``
    and their epoch ends to ``_log_collected(prefix)`` (shared by the label and map modules)."""

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self):
        self._log_collected("val")

    def on_test_epoch_end(self):
        self._log_collected("test")


class LensModule(EvalHooks, pl.LightningModule):
    """``model``: kwargs of :class:`~lensexp.models.LensRegressor` (backbone, dropout, ...);
    ``loss``: a name (``mse``, ``gaussian_nll``, ``beta_nll``, ``full_cov_nll``) or a mapping
    (``{name: flow_nll, ...}``, :mod:`lensexp.flow`); ``in_chans``: bands; ``data_info``:
    the training grid (``npix``, ``pixscale`` [arcsec/px], ``bands``, preset ``name``), kept in the
    checkpoint so that prediction can check its inputs."""

    def __init__(
        self,
        model: dict,
        loss: str | dict = "gaussian_nll",
        in_chans: int = 1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        n_mc_val: int = 8,
        input_norm: str = "quantile",
        label_fit_batches: int = 8,
        labels: tuple = LABELS,
        data_info: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.labels = list(labels)
        self.loss_fn = get_loss(loss, len(self.labels))  # an nn.Module (flow): its weights train and save
        self.net = LensRegressor(in_chans=in_chans, n_outputs=self.loss_fn.n_outputs(len(self.labels)), **model)
        d = len(self.labels)
        self.register_buffer("label_mean", torch.zeros(d))
        self.register_buffer("label_std", torch.ones(d))
        self.register_buffer("label_fitted", torch.tensor(False))
        self.register_buffer("is_log", torch.tensor([n in LOG_LABELS for n in self.labels]))
        self._fit_buf: list[torch.Tensor] = []
        self._collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # ---------------------------------------------------------------- label transform
    def _log_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Physical labels with the ``LOG_LABELS`` (mu_F) replaced by their logarithm."""
        return torch.where(self.is_log, torch.log(y.clamp(min=1e-6)), y)

    def to_net(self, y: torch.Tensor) -> torch.Tensor:
        """Physical labels [B, D] -> standardised network space."""
        return (self._log_labels(y) - self.label_mean) / self.label_std

    def from_net(self, z: torch.Tensor) -> torch.Tensor:
        """Network space -> physical labels (inverse of :meth:`to_net`, elementwise monotone)."""
        y = z * self.label_std + self.label_mean
        return torch.where(self.is_log, torch.exp(y), y)

    def _update_label_scale(self, y: torch.Tensor) -> None:
        """Fit mean/std on the first ``label_fit_batches`` training batches (refined each step)."""
        if bool(self.label_fitted):
            return
        self._fit_buf.append(y.detach())
        ys = self._log_labels(torch.cat(self._fit_buf))
        self.label_mean.copy_(ys.mean(0))
        if ys.shape[0] > 1:
            self.label_std.copy_(ys.std(0).clamp(min=1e-6))
        if len(self._fit_buf) >= self.hparams.label_fit_batches:
            self.label_fitted.fill_(True)
            self._fit_buf = []

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run keeps the label scale it has (the batches it was fitted on are gone, and
        fresh on-the-fly epochs would refit it on other lenses): it is fixed from here on."""
        sd = checkpoint.get("state_dict", {})
        if "label_fitted" in sd:
            sd["label_fitted"] = torch.tensor(True)

    # ---------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw network outputs for images [B, C, H, W] in any flux unit."""
        return self.net(normalize(images, self.hparams.input_norm))

    def mc_passes(self, n_mc: int) -> int:
        """Stochastic passes worth running: ``n_mc``, or 1 when no dropout is active (all equal)."""
        return max(int(n_mc), 1) if any(m.p > 0 for m in self.modules() if isinstance(m, MCDropout)) else 1

    @torch.no_grad()
    def mc_outputs(self, images: torch.Tensor, n_mc: int) -> list[torch.Tensor]:
        """Raw outputs of :meth:`mc_passes` MC-dropout forward passes (eval mode, dropout on)."""
        was = self.training
        self.eval()
        n = self.mc_passes(n_mc)
        set_mc_dropout(self, n > 1)
        try:
            return [self(images) for _ in range(n)]
        finally:
            set_mc_dropout(self, False)
            self.train(was)

    @torch.no_grad()
    def predict_mc(self, images: torch.Tensor, n_mc: int) -> tuple[torch.Tensor, torch.Tensor]:
        """MC-dropout passes of a Gaussian head: network-space means and sigmas [passes, B, D]."""
        outs = [self.loss_fn.mean_std(o) for o in self.mc_outputs(images, n_mc)]
        return torch.stack([m for m, _ in outs]), torch.stack([s for _, s in outs])

    @torch.no_grad()
    def posterior(self, images: torch.Tensor, n_mc: int, n_samples: int, generator=None, common: bool = False):
        """The posterior-samples interface shared by every uncertainty method: samples
        [S, B, D] and their centre [B, D], network units, on the CPU, for images [B, C, H, W].

        Gaussian heads: the mixture over MC-dropout passes of each pass's Gaussian (Perreault
        Levasseur et al. 2017), centred on the mean of the pass means. Flow heads: ``n_samples /
        passes`` flow samples per pass, centred on their mean. ``generator``: a CPU generator or
        an int seed; ``common``: the same random draws for every lens (validation uses this, so
        its metrics do not depend on batching or the number of DDP ranks)."""
        g = metrics.as_generator(generator)
        if hasattr(self.loss_fn, "mean_std"):
            means, stds = self.predict_mc(images, n_mc)
            return metrics.posterior_samples(means.cpu(), stds.cpu(), n_samples, g, common)
        outs = self.mc_outputs(images, n_mc)
        per = max(1, n_samples // len(outs))
        s = torch.cat([self.loss_fn.sample(o, per, g, common) for o in outs]).cpu()
        return s, s.mean(0)

    # ---------------------------------------------------------------- steps
    def on_train_start(self):
        self.log("model/params", float(sum(p.numel() for p in self.net.parameters())), rank_zero_only=True)

    def on_train_epoch_start(self):
        self._epoch_t0, self._epoch_n = time.perf_counter(), 0

    def on_train_epoch_end(self):
        dt = time.perf_counter() - getattr(self, "_epoch_t0", time.perf_counter())
        if dt > 0 and getattr(self, "_epoch_n", 0):
            self.log("train/img_per_s", self._epoch_n / dt)

    def training_step(self, batch, batch_idx):
        self._epoch_n = getattr(self, "_epoch_n", 0) + batch["image"].shape[0]
        self._update_label_scale(batch["labels"])
        loss = self.loss_fn(self(batch["image"]), self.to_net(batch["labels"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _eval_step(self, batch, batch_idx: int, prefix: str):
        y = batch["labels"]
        loss = self.loss_fn(self(batch["image"]), self.to_net(y))
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=y.shape[0])
        t0 = time.perf_counter()
        samples, centre = self.posterior(batch["image"], self.hparams.n_mc_val, VAL_SAMPLES, 0, common=True)
        self._infer = getattr(self, "_infer", [0, 0.0])
        self._infer[0] += y.shape[0] * self.mc_passes(self.hparams.n_mc_val)
        self._infer[1] += time.perf_counter() - t0
        self._collected.append((samples, centre, y.cpu()))

    def _log_collected(self, prefix: str):
        if not self._collected:
            return
        # every rank's lenses, so that coverage and RMSE are those of the whole split under DDP
        samples = gather_lenses(self, torch.cat([s for s, _, _ in self._collected], 1), dim=1)
        centre = gather_lenses(self, torch.cat([c for _, c, _ in self._collected]))
        truth = gather_lenses(self, torch.cat([y for _, _, y in self._collected]))
        self._collected = []
        self.last_metrics = self.evaluate(samples, centre, truth, prefix)
        n, dt = getattr(self, "_infer", [0, 0.0])
        if dt > 0:  # single forward passes per second (each MC pass counts once)
            self.last_metrics[f"{prefix}/infer_img_per_s"] = n / dt
        self._infer = [0, 0.0]
        for k, v in self.last_metrics.items():
            self.log(k, v)

    def on_fit_end(self):
        """A W&B summary table (per label: RMSE, median error, coverage) when W&B logs this run."""
        from pytorch_lightning.loggers import WandbLogger

        m = getattr(self, "last_metrics", None)
        loggers = [
            lg for lg in (self.trainer.loggers if self._trainer is not None else []) if isinstance(lg, WandbLogger)
        ]
        if not m or not loggers:
            return
        cols = ["label", "rmse", "median_abs", *SHORT.values()]
        rows = [
            [n, m[f"val/rmse/{n}"], m[f"val/median_abs/{n}"], *(m[f"val/{c}/{n}"] for c in SHORT.values())]
            for n in self.labels
        ]
        loggers[0].log_table(key="val/summary", columns=cols, data=rows)

    def evaluate(self, samples: torch.Tensor, centre: torch.Tensor, truth: torch.Tensor, prefix: str = "val") -> dict:
        """RMSE / median error in physical units and coverage per label, from posterior samples
        [S, N, D] and centres [N, D] (network units, :meth:`posterior`)."""
        dev = self.label_mean.device
        z_truth = self.to_net(truth.to(dev)).cpu()
        cov = metrics.coverage(z_truth, metrics.central_intervals(samples))
        pred = self.from_net(centre.to(dev)).cpu()
        rmse, med = metrics.rmse(pred, truth), metrics.median_abs_error(pred, truth)
        out = {}
        for j, name in enumerate(self.labels):
            out[f"{prefix}/rmse/{name}"] = float(rmse[j])
            out[f"{prefix}/median_abs/{name}"] = float(med[j])
            for c, v in cov.items():
                out[f"{prefix}/{SHORT[c]}/{name}"] = float(v[j])
        err = metrics.coverage_error(cov)
        out[f"{prefix}/coverage_error"] = float(err.mean())
        # after recalibration: spread scales fitted on even-numbered lenses, coverage on odd ones
        if truth.shape[0] >= 4:
            fit = metrics.fit_scales(samples[:, 0::2], centre[0::2], z_truth[0::2])
            cal = metrics.coverage(
                z_truth[1::2], metrics.central_intervals(metrics.scaled(samples[:, 1::2], centre[1::2], fit))
            )
            for j, name in enumerate(self.labels):
                for c, v in cal.items():
                    out[f"{prefix}/cal_{SHORT[c]}/{name}"] = float(v[j])
            out[f"{prefix}/cal_coverage_error"] = float(metrics.coverage_error(cal).mean())
        return out

    def configure_optimizers(self):
        return warmup_cosine(self)


def gather_lenses(module: pl.LightningModule, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``t`` with the lenses (along ``dim``) of every DDP rank, in rank order, on the CPU; ``t``
    itself in a single process. Ranks may hold different numbers of lenses (padded for the
    collective, the padding dropped)."""
    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return t
    t = t.movedim(dim, 0).to(module.device)
    counts = module.all_gather(torch.tensor(t.shape[0], device=module.device)).reshape(-1)
    pad = int(counts.max()) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    every = module.all_gather(t)  # [world, max, ...]
    return torch.cat([every[r, : int(n)] for r, n in enumerate(counts)]).movedim(0, dim).cpu()


def warmup_cosine(module: pl.LightningModule) -> dict:
    """AdamW over ``module``'s parameters (``hparams.lr``, ``hparams.weight_decay``); linear
    warm-up over 5 % of the steps, then cosine decay to 1 % of ``lr``.

    The schedule is a function of the step alone (LambdaLR), so resuming with more epochs
    stretches it instead of failing.
    """
    hp = module.hparams
    opt = torch.optim.AdamW(module.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    total = max(int(module.trainer.estimated_stepping_batches), 1) if module._trainer is not None else 1000
    warm = max(1, total // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
