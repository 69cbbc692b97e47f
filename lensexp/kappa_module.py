"""Lightning module for density maps: image -> convergence map with per-pixel uncertainty.

The network (:class:`~lensexp.kappa_net.KappaUNet`) predicts, per pixel, a Gaussian in
``u = log kappa`` (kappa clamped to [``kappa_floor``, 1 / ``kappa_floor``]): the logarithm tames
the central cusp (kappa ~ 1/r) and the outskirts alike, and keeps the cusp's mass so that the
Einstein radius of the mean map stays right (clipping kappa at 3 would lose ~8 % of it). The loss
is the Gaussian negative log-likelihood in ``u`` (``weight=kappa``: each pixel's term weighted by
its clipped kappa, as the score counts errors in kappa; ``beta`` > 0: beta-NLL, each term also
times sigma^(2 beta), detached). Maps come from ``n_mc`` MC-dropout passes, each widened by its
aleatoric sigma: samples of ``kappa = exp(u)``, whose mean is the predicted map
and whose spread is its uncertainty. Validation logs the score of issue 15 (mean |kappa error|,
kappa clipped at 3, in the 0.3-2" annulus), the coverage of the per-pixel 68.3/95.5 % intervals
there, and the error of the Einstein radius read off the mean map.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from lensexp import kappa_maps
from lensexp.errors import ConfigError
from torch import nn

from lensexp.labels import D4, check_augment, d4_image_each, d4_unturn, random_turns
from lensexp.losses import beta_weight
from lensexp.module import EvalHooks, check_centre, gather_lenses, warmup_cosine
from lensexp.models import float32, set_mc_dropout
from lensexp.sim.normalize import normalize

TASK = "kappa"
TARGETS = ("log", "linear")
WEIGHTS = ("none", "kappa")


class KappaModule(EvalHooks, pl.LightningModule):
    """``net``: images -> [B, 2, N, N] per-pixel mean and log sigma of the target
    (:class:`~lensexp.kappa_net.KappaUNet`); ``data_info``: the training grid (``npix``, ``pixscale`` [arcsec/px],
    ``bands``, ``name``); ``spec``: the settings that rebuild ``net``
    (:func:`lensexp.build.kappa_module`, stored in the checkpoint)."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        n_mc_val: int = 4,
        input_norm: str = "quantile",
        kappa_floor: float = 1e-3,
        data_info: dict | None = None,
        task: str = TASK,
        target: str = "log",
        kappa_max: float = 10.0,
        spec: dict | None = None,
        posterior_centre: str = "mc_mean",
        augment: str = "none",
        weight: str = "none",
        beta: float = 0.0,
    ):
        super().__init__()
        if target not in TARGETS:
            raise ConfigError(f"kappa target must be one of {TARGETS}, got '{target}'")
        if weight not in WEIGHTS:
            raise ConfigError(f"kappa.weight must be one of {WEIGHTS}, got '{weight}'")
        if not 0.0 <= float(beta) <= 1.0:
            raise ConfigError(f"kappa.beta must be in [0, 1] (0: Gaussian NLL, 0.5: beta-NLL), got {beta}")
        check_centre(posterior_centre)
        check_augment(augment)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self._collected: list[dict] = []

    @property
    def pixscale(self) -> float:
        return float((self.hparams.data_info or {}).get("pixscale", 0.1))

    def to_net(self, kappa: torch.Tensor) -> torch.Tensor:
        """Convergence [B, N, N] -> network target: ``log kappa`` (clamped to [floor, 1/floor])
        or, for ``target='linear'``, kappa clamped to [0, ``kappa_max``]."""
        hp = self.hparams
        if hp.target == "linear":
            return kappa.nan_to_num(hp.kappa_max, posinf=hp.kappa_max).clamp(0.0, hp.kappa_max)
        f = hp.kappa_floor
        return torch.log(kappa.nan_to_num(1.0 / f, posinf=1.0 / f).clamp(f, 1.0 / f))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 2, N, N]: mean and log sigma of log kappa, for images [B, C, N, N] in any flux unit."""
        return self.net(normalize(images, self.hparams.input_norm))

    @staticmethod
    def nll(
        out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, beta: float = 0.0
    ) -> torch.Tensor:
        """Mean Gaussian negative log-likelihood of ``target`` [B, N, N] under ``out`` [B, 2, N, N],
        each pixel's term multiplied by ``weight`` [B, N, N] when given (mean 1 per map) and, for
        ``beta`` > 0, by ``sigma^(2 beta)`` held constant in the gradient (beta-NLL, Seitzer et al.
        2022, as :class:`lensexp.losses.BetaNLL`: pixels the network is unsure of keep their pull on
        the mean; the sigma that minimises each term is unchanged)."""
        mu, log_sigma = out[:, 0], out[:, 1]
        per_pixel = 0.5 * ((target - mu) * torch.exp(-log_sigma)) ** 2 + log_sigma
        if beta:
            per_pixel = per_pixel * beta_weight(log_sigma, beta)
        if weight is not None:
            per_pixel = per_pixel * weight
        return per_pixel.mean() + 0.5 * math.log(2 * math.pi)

    def pixel_weight(self, kappa: torch.Tensor) -> torch.Tensor | None:
        """Per-pixel loss weights [B, N, N] of the true maps, or None (``weight=none``). ``kappa``:
        the convergence clipped at 3 (the score's clip), scaled to mean 1 per map, so that a pixel
        counts as much as an error in log kappa costs in kappa itself (|d kappa| = kappa |d log
        kappa|): the score is an absolute error in kappa, the loss one in log kappa."""
        if self.hparams.get("weight", "none") != "kappa":
            return None
        w = kappa.nan_to_num(kappa_maps.KAPPA_CLIP, posinf=kappa_maps.KAPPA_CLIP).clamp(0.0, kappa_maps.KAPPA_CLIP)
        return w / w.mean(dim=(-2, -1), keepdim=True).clamp(min=1e-6)

    @torch.no_grad()
    def predict_mc(self, images: torch.Tensor, n_mc: int) -> torch.Tensor:
        """MC-dropout passes [n_mc, B, 2, N, N] (dropout on when ``n_mc`` > 1)."""
        was = self.training
        self.eval()
        set_mc_dropout(self, n_mc > 1)
        try:
            return torch.stack([self(images) for _ in range(max(n_mc, 1))])
        finally:
            set_mc_dropout(self, False)
            self.train(was)

    def map_samples(self, passes: torch.Tensor, per_pass: int = 4, generator=None) -> torch.Tensor:
        """Convergence samples [n_mc * per_pass, B, N, N] from MC passes [n_mc, B, 2, N, N]:
        ``mu + sigma eps`` per pixel (aleatoric) and pass (epistemic), mapped back to kappa
        (``exp`` for the log target)."""
        mu, sigma = passes[:, :, 0], passes[:, :, 1].exp()
        eps = torch.randn((per_pass, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device)
        u = (mu[None] + sigma[None] * eps).reshape(-1, *mu.shape[1:])
        return torch.exp(u) if self.hparams.target == "log" else u

    def mean_map(self, passes: torch.Tensor) -> torch.Tensor:
        """Posterior mean convergence [B, N, N] of MC passes [n_mc, B, 2, N, N], without sampling
        noise: the average over passes of each pass's mean, ``exp(mu + sigma^2 / 2)`` for the log
        target (log-normal) or ``mu`` for the linear one."""
        mu, log_sigma = passes[:, :, 0], passes[:, :, 1]
        if self.hparams.target == "log":
            return torch.exp(mu + 0.5 * torch.exp(2 * log_sigma)).mean(0)
        return mu.mean(0)

    @torch.no_grad()
    def point_map(self, images: torch.Tensor, mode: str = "d4") -> torch.Tensor:
        """Mean map [B, N, N] with dropout off (:meth:`mean_map` of one pass): of the image
        (``deterministic``) or (``d4``) averaged over the pixel grid's 8 symmetries, each map
        predicted on the turned image and turned back (:func:`lensexp.labels.d4_unturn`)."""
        turns = D4 if mode == "d4" else D4[:1]
        return self.dropout_off_mean(images, lambda x, t: d4_unturn(self.mean_map(self(x)[None]), *t), turns)

    def centred(self, images, passes, samples, mode=None) -> tuple:
        """(samples, mean map) of MC ``passes`` moved onto the ``posterior_centre`` (``mode``
        overrides it): per pixel scaled (log target) or shifted (linear) so that their centre is
        :meth:`point_map`; ``mc_mean`` (checkpoints from before 2026-12-05) keeps the MC mean."""
        mean = self.mean_map(passes)
        mode = mode or self.hparams.get("posterior_centre", "mc_mean")
        if mode == "mc_mean":
            return samples, mean
        point = self.point_map(images, mode).to(mean)
        if self.hparams.target == "log":
            return samples * (point / mean.clamp(min=1e-30)), point
        return samples + (point - mean), point

    # ---------------------------------------------------------------- steps
    def batch_loss(self, batch, train: bool) -> torch.Tensor:
        """Per-pixel Gaussian NLL of the batch's maps; with ``augment=d4`` each training image and
        its map are turned by the same random symmetry of the grid."""
        images, kappa = batch["image"], batch["kappa"]
        if train and self.hparams.get("augment", "none") == "d4":
            turns = random_turns(kappa.shape[0], kappa.device)
            images, kappa = d4_image_each(images, turns), d4_image_each(kappa, turns)
        w, beta = self.pixel_weight(kappa), float(self.hparams.get("beta", 0.0))
        return float32(lambda out, target: self.nll(out, target, w, beta), self(images), self.to_net(kappa))

    def _eval_step(self, batch, batch_idx: int, prefix: str):
        kappa = batch["kappa"]
        self._eval_loss(batch, prefix)
        g = torch.Generator(device=kappa.device).manual_seed(batch_idx)
        passes = self.predict_mc(batch["image"], self.hparams.n_mc_val)
        samples, mean = self.centred(batch["image"], passes, self.map_samples(passes, 4, g), self.eval_centre())
        self._collected.append(evaluate_maps(samples, kappa, self.pixscale, mean))

    def _log_collected(self, prefix: str):
        if not self._collected:
            return
        # per-lens scores of every rank, so that the means are those of the whole split under DDP
        cat = {k: gather_lenses(self, torch.cat([c[k] for c in self._collected])) for k in self._collected[0]}
        self._collected = []
        self.last_metrics = {f"{prefix}/{k}": float(v.nanmean()) for k, v in cat.items()}
        for k, v in self.last_metrics.items():
            self.log(k, v)

    def configure_optimizers(self):
        return warmup_cosine(self)


def evaluate_maps(
    samples: torch.Tensor,
    kappa: torch.Tensor,
    pixscale: float,
    mean: torch.Tensor | None = None,
    true_radius: torch.Tensor | None = None,
) -> dict:
    """Per-lens scores [B] of map samples [S, B, N, N] (and their ``mean`` map [B, N, N], by
    default the samples' average) against the true maps [B, N, N]:
    ``kappa_mae`` (annulus error of the mean map), ``kappa_cov68`` / ``kappa_cov95`` (per-pixel
    interval coverage in the annulus) and ``theta_E_frac``, the |fractional error| of the mean
    map's Einstein radius against the true map's (:func:`lensexp.kappa_maps.map_errors`; NaN where
    either has none in the field)."""
    mean = samples.mean(0) if mean is None else mean
    return {
        **kappa_maps.map_errors(mean, kappa, pixscale, true_radius),
        "kappa_cov68": kappa_maps.annulus_coverage(samples, kappa, pixscale, 0.683),
        "kappa_cov95": kappa_maps.annulus_coverage(samples, kappa, pixscale, 0.955),
    }
