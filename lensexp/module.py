"""Lightning module for the eight labels: training steps and MC-dropout validation metrics.

``LensModule`` receives its network, loss and :class:`~lensexp.labels.LabelScaler` (built from
config or checkpoint by :mod:`lensexp.build`) and keeps only the steps, the posterior-samples
interface and the metrics. Inputs are normalised per image (flux units drop out). Validation
runs ``n_mc_val`` MC-dropout passes, each widened by its aleatoric sigma, and logs per label
RMSE, median absolute error and coverage of the 68.3/95.5/99.7 % central intervals
(:func:`lensexp.metrics.validation_metrics`), gathered over all DDP ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from torch import nn

from lensexp import metrics
from lensexp.errors import ConfigError
from lensexp.labels import (
    D4,
    LabelScaler,
    check_augment,
    d4_back,
    d4_forward_each,
    d4_image,
    d4_image_each,
    d4_supported,
    random_turns,
    upgrade_state_dict,
)
from lensexp.models import MCDropout, float32, psf_condition, set_mc_dropout
from lensexp.sim.normalize import normalize

VAL_SAMPLES = 1024  # posterior samples per lens in validation metrics
CENTRES = ("d4", "deterministic", "mc_mean")  # posterior_centre: see LensModule.point_estimate


def check_centre(posterior_centre: str) -> None:
    """Refuse an unknown ``posterior_centre`` (label and density-map modules alike)."""
    if posterior_centre not in CENTRES:
        raise ConfigError(f"posterior_centre must be one of {CENTRES}, got '{posterior_centre}'")


class EvalHooks:
    """Lightning's steps shared by the label and map modules: ``batch_loss(batch, train)`` gives
    the loss of a batch (logged as ``train/loss``, ``val/loss``, ``test/loss``); validation and
    test steps go on to ``_eval_step(batch, batch_idx, prefix)`` and their epoch ends to
    ``_log_collected(prefix)``."""

    @property
    def in_chans(self) -> int:
        """Bands the network takes (its spec)."""
        return int((self.hparams.get("spec") or {}).get("in_chans", 1))

    def training_step(self, batch, batch_idx):
        loss = self.batch_loss(batch, train=True)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def _eval_loss(self, batch, prefix: str) -> None:
        loss = self.batch_loss(batch, train=False)
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)

    @torch.no_grad()
    def dropout_off_mean(self, images: torch.Tensor, predict, turns=D4[:1]) -> torch.Tensor:
        """Mean over the grid symmetries ``turns`` (:data:`lensexp.labels.D4`, default the identity)
        of ``predict(turned images, turn)`` with dropout off, ``predict`` turning its result back;
        the training mode is restored. The dropout-off centre of label and map modules alike."""
        was = self.training
        self.eval()
        try:
            return torch.stack([predict(d4_image(images, *t), t) for t in turns]).mean(0)
        finally:
            self.train(was)

    def eval_centre(self) -> str:
        """The posterior centre of validation and test steps: a ``d4`` centre takes the unturned
        dropout-off pass there (8 more passes per lens would triple their cost inside a training
        budget); calibrate and predict use the full ``d4``."""
        mode = self.hparams.get("posterior_centre", "mc_mean")
        return "deterministic" if mode == "d4" else mode

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self):
        self._log_collected("val")

    def on_test_epoch_end(self):
        self._log_collected("test")


class LensModule(EvalHooks, pl.LightningModule):
    """The training steps and validation metrics of a label network.

    ``net``: images [B, C, H, W] -> raw outputs (e.g. :class:`~lensexp.models.LensRegressor`);
    ``loss``: the loss and predictive distribution of those outputs (:mod:`lensexp.losses`,
    :class:`~lensexp.flow.FlowNLL`); ``scaler``: the label transform
    (:class:`~lensexp.labels.LabelScaler`); ``data_info``: the training grid (``npix``,
    ``pixscale`` [arcsec/px], ``bands``, preset ``name``), kept in the checkpoint so that
    prediction can check its inputs; ``spec``: the settings that rebuild ``net``, ``loss`` and
    ``scaler`` (:func:`lensexp.build.lens_module`, stored in the checkpoint)."""

    def __init__(
        self,
        net: nn.Module,
        loss,
        scaler: LabelScaler | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        n_mc_val: int = 8,
        input_norm: str = "quantile",
        data_info: dict | None = None,
        spec: dict | None = None,
        posterior_centre: str = "mc_mean",
        augment: str = "none",
        psf_dropout: float = 0.0,
    ):
        super().__init__()
        check_centre(posterior_centre)
        if not 0.0 <= float(psf_dropout) <= 1.0:
            raise ConfigError(f"psf_dropout must be in [0, 1], got {psf_dropout}")
        self.save_hyperparameters(ignore=["net", "loss", "scaler"])
        self.net = net
        self.loss_fn = loss  # an nn.Module (flow) has weights that train and save
        self.scaler = scaler if scaler is not None else LabelScaler()
        self.labels = list(self.scaler.labels)
        check_augment(augment, self.labels)
        self._collected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._infer = [0, 0.0]  # validation forward passes and their seconds

    def to_net(self, y: torch.Tensor) -> torch.Tensor:
        """Physical labels [B, D] -> standardised network space (:class:`LabelScaler`)."""
        return self.scaler.to_net(y)

    def from_net(self, z: torch.Tensor) -> torch.Tensor:
        """Network space -> physical labels."""
        return self.scaler.from_net(z)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed run keeps the label scale it has (the batches it was fitted on are gone, and
        fresh on-the-fly epochs would refit it on other lenses): it is fixed from here on."""
        sd = upgrade_state_dict(checkpoint.get("state_dict", {}))
        if "scaler.label_fitted" in sd:
            sd["scaler.label_fitted"] = torch.tensor(True)

    # ---------------------------------------------------------------- forward
    @property
    def psf_input(self) -> bool:
        """Whether the network takes each image's PSF (``model.psf_input``)."""
        return bool(getattr(self.net, "psf_input", False))

    def forward(self, images: torch.Tensor, psf_ee: torch.Tensor | None = None) -> torch.Tensor:
        """Raw network outputs for images [B, C, H, W] in any flux unit; ``psf_ee`` [B, R]: their
        PSFs' encircled energy (:func:`lensexp.sim.psf.encircled_energy`; None or NaN rows:
        unknown), read only by a ``psf_input`` network."""
        x = normalize(images, self.hparams.input_norm)
        if not self.psf_input:
            return self.net(x)
        return self.net(x, psf_condition(psf_ee, x.shape[0], x.device))

    def mc_passes(self, n_mc: int) -> int:
        """Stochastic passes worth running: ``n_mc``, or 1 when no dropout is active (all equal)."""
        return max(int(n_mc), 1) if any(m.p > 0 for m in self.modules() if isinstance(m, MCDropout)) else 1

    @torch.no_grad()
    def mc_outputs(self, images: torch.Tensor, n_mc: int, psf_ee=None) -> list[torch.Tensor]:
        """Raw outputs of :meth:`mc_passes` MC-dropout forward passes (eval mode, dropout on)."""
        was = self.training
        self.eval()
        n = self.mc_passes(n_mc)
        set_mc_dropout(self, n > 1)
        try:
            return [self(images, psf_ee) for _ in range(n)]
        finally:
            set_mc_dropout(self, False)
            self.train(was)

    @torch.no_grad()
    def predict_mc(self, images: torch.Tensor, n_mc: int, psf_ee=None) -> tuple[torch.Tensor, torch.Tensor]:
        """MC-dropout passes of a Gaussian head: network-space means and sigmas [passes, B, D]."""
        outs = [self.loss_fn.mean_std(o) for o in self.mc_outputs(images, n_mc, psf_ee)]
        return torch.stack([m for m, _ in outs]), torch.stack([s for _, s in outs])

    @torch.no_grad()
    def point_estimate(self, images: torch.Tensor, mode: str = "d4", psf_ee=None) -> torch.Tensor:
        """Network-space estimate [B, D] of a Gaussian head with dropout off: one pass
        (``deterministic``), or (``d4``) the mean over the 8 symmetries of the pixel grid of the
        passes on the turned image, each turned back (:func:`lensexp.labels.d4_back`; one pass
        when a label's symmetry is unknown). On the quickstart network and lenstronomy-made lenses
        (README "Calibration reports") one such pass beat the mean of 32 MC-dropout passes, which
        carries the dropout's own shift and noise, and the 8-fold average beat both. The PSF's
        description (``psf_ee``) is radial, so the same for every turn."""
        if mode != "d4" or not d4_supported(self.labels):
            return self.dropout_off_mean(images, lambda x, t: self.loss_fn.mean_std(self(x, psf_ee))[0])

        def turned_back(x, t):
            return self.to_net(d4_back(self.from_net(self.loss_fn.mean_std(self(x, psf_ee))[0]), self.labels, *t))

        return self.dropout_off_mean(images, turned_back, D4)

    @torch.no_grad()
    def posterior(
        self,
        images: torch.Tensor,
        n_mc: int,
        n_samples: int,
        generator=None,
        common: bool = False,
        centre=None,
        psf_ee=None,
    ):
        """The posterior-samples interface shared by every uncertainty method: samples
        [S, B, D] and their centre [B, D], network units, on the CPU, for images [B, C, H, W].

        Gaussian heads: the mixture over MC-dropout passes of each pass's Gaussian (Perreault
        Levasseur et al. 2017), shifted onto the ``posterior_centre`` (``centre`` overrides it):
        ``d4``/``deterministic`` (:meth:`point_estimate`) or ``mc_mean``, the mean of the pass
        means (checkpoints from before 2026-12-05 keep it, as their calibrations do). Flow
        heads: ``n_samples / passes`` flow samples per pass, centred on their mean.
        ``generator``: a CPU generator or an int seed; ``common``: the same random draws for
        every lens (validation uses this, so its metrics do not depend on batching or the number
        of DDP ranks); ``psf_ee``: the images' PSFs for a ``psf_input`` network (:meth:`forward`)."""
        g = metrics.as_generator(generator)
        if hasattr(self.loss_fn, "mean_std"):
            means, stds = self.predict_mc(images, n_mc, psf_ee)
            samples, mid = metrics.posterior_samples(means.cpu(), stds.cpu(), n_samples, g, common)
            mode = centre or self.hparams.get("posterior_centre", "mc_mean")
            if mode == "mc_mean":
                return samples, mid
            point = self.point_estimate(images, mode, psf_ee).cpu().to(samples.dtype)
            return samples + (point - mid), point
        outs = self.mc_outputs(images, n_mc, psf_ee)
        per = max(1, n_samples // len(outs))
        s = torch.cat([self.loss_fn.sample(o, per, g, common) for o in outs]).cpu()
        return s, s.mean(0)

    # ---------------------------------------------------------------- steps
    def batch_loss(self, batch, train: bool) -> torch.Tensor:
        """The loss of a batch; while training, the label scale is fitted on its first batches and,
        with ``augment=d4``, every image is turned by a random symmetry of the grid, its labels
        with it (:func:`lensexp.labels.d4_forward_each`). A ``psf_input`` network is told each
        image's PSF (the batch's ``psf_ee``), withheld from a ``psf_dropout`` share of the training
        images so that it also serves lenses of unknown PSF."""
        images, y = batch["image"], batch["labels"]
        psf_ee = self.batch_psf(batch, train)
        if train and self.hparams.get("augment", "none") == "d4":
            turns = random_turns(y.shape[0], y.device)
            images, y = d4_image_each(images, turns), d4_forward_each(y, self.labels, turns)
        if train:
            self.scaler.update(y)
        return float32(self.loss_fn, self(images, psf_ee), self.to_net(y))

    def batch_psf(self, batch: dict, train: bool = False) -> torch.Tensor | None:
        """The batch's PSF descriptions for a ``psf_input`` network (None otherwise); in training,
        rows withheld (NaN: unknown) with probability ``psf_dropout``. Training data without them
        are refused: the network would learn nothing of the PSF."""
        if not self.psf_input:
            return None
        ee = batch.get("psf_ee")
        if ee is None:
            if train:
                raise ConfigError(
                    "model.psf_input needs samples that describe their PSF (meta psf_ee_*): "
                    "simulate the shard set again with this version of lensexp.simulate"
                )
            return None
        p = float(self.hparams.get("psf_dropout", 0.0))
        if train and p > 0:
            ee = ee.masked_fill((torch.rand(ee.shape[0], device=ee.device) < p)[:, None], float("nan"))
        return ee

    def _eval_step(self, batch, batch_idx: int, prefix: str):
        y = batch["labels"]
        self._eval_loss(batch, prefix)
        t0 = time.perf_counter()
        samples, centre = self.posterior(
            batch["image"],
            self.hparams.n_mc_val,
            VAL_SAMPLES,
            0,
            common=True,
            centre=self.eval_centre(),
            psf_ee=self.batch_psf(batch),
        )
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
        self.last_metrics = metrics.validation_metrics(self, samples, centre, truth, prefix)
        n, dt = self._infer
        if dt > 0:  # single forward passes per second (each MC pass counts once)
            self.last_metrics[f"{prefix}/infer_img_per_s"] = n / dt
        self._infer = [0, 0.0]
        for k, v in self.last_metrics.items():
            self.log(k, v)

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


@dataclass
class LRPlan:
    """Steps of the learning-rate schedule: linear warm-up over ``warm`` steps, then cosine decay
    to 1 % of the peak at ``total``; ``total=None`` holds the peak after the warm-up (a
    :class:`~lensexp.callbacks.TimeBudget` run before it has measured its speed).

    A revised plan keeps the rate continuous: from ``anchor_step`` on, the cosine's progress
    (0 after the warm-up, 1 at the end) runs linearly from ``anchor_progress`` to 1 at the new
    ``total`` (:meth:`revise`), so the decay is stretched or compressed, never jumps."""

    warm: int
    total: int | None
    anchor_step: int | None = None
    anchor_progress: float = 0.0

    def progress(self, step: int) -> float:
        """Where ``step`` lies on the cosine, in [0, 1] (``total`` set, after the warm-up)."""
        if self.anchor_step is not None and step >= self.anchor_step:
            p0 = self.anchor_progress
            return min(1.0, p0 + (1.0 - p0) * (step - self.anchor_step) / max(1, self.total - self.anchor_step))
        return min(1.0, (step - self.warm) / max(1, self.total - self.warm))

    def factor(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / self.warm
        if self.total is None:
            return 1.0
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def revise(self, step: int, total: int) -> None:
        """End the decay at ``total`` instead, continuing from the rate at ``step``."""
        if self.total is not None and step >= self.warm:
            self.anchor_step, self.anchor_progress = int(step), self.progress(step)
        self.total = int(total)


def warmup_cosine(module: pl.LightningModule) -> dict:
    """AdamW over ``module``'s parameters (``hparams.lr``, ``hparams.weight_decay``); linear
    warm-up over 5 % of the steps, then cosine decay to 1 % of ``lr`` (:class:`LRPlan`, kept as
    ``module.lr_plan``, which a :class:`~lensexp.callbacks.TimeBudget` may reset).

    The schedule is a function of the step alone (LambdaLR), so resuming with more epochs
    stretches it instead of failing.
    """
    hp = module.hparams
    opt = torch.optim.AdamW(module.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    total = max(int(module.trainer.estimated_stepping_batches), 1) if module._trainer is not None else 1000
    module.lr_plan = LRPlan(warm=max(1, total // 20), total=total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: module.lr_plan.factor(step))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
