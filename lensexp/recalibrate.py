"""Recalibration of the predictive spread, per label and per image.

One spread scale per label (``method: global``, the earlier ``spread_scale``) fitted on the
training distribution makes intervals too wide on easy images and too narrow on hard ones. The
``conditional`` method scales each image's spread by what makes that image hard:

1. a variance model per label: ``E[(truth - centre)^2 / var] = exp(b0 + b1 log std + b2 log snr)``,
   ``std`` the image's posterior std of that label (network units) and ``snr`` its detection S/N
   (:func:`image_snr`), fitted as a log-link Gamma GLM (:class:`sklearn.linear_model.GammaRegressor`,
   whose estimating equations need only the mean of the squared normalised residual to be right);
2. then one factor per label over the whole coverage curve (:func:`lensexp.metrics.fit_scales`) on the
   rescaled samples, for the residuals' non-Gaussian shape.

Features are clipped to the range seen in calibration, so images unlike the calibration set are
not extrapolated to absurd scales. Stored as plain JSON (``calibration.json``), no pickles.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lensexp.errors import ConfigError
from lensexp.metrics import CURVE, coverage_curve, fit_scales, scaled

METHODS = ("auto", "conditional", "global")
CHOICES = ("none", "global", "conditional")  # what ``auto`` picks from, per label, simplest first
AUTO_MARGIN = 0.002  # a more complex choice must lower the cross-validated mean |coverage - nominal| this much
FEATURES = ("log_std", "log_snr")
SNR_EDGES = (0.0, 30.0, 100.0, 300.0, 1000.0, math.inf)  # detection S/N bins of the report (log-spaced)


def image_snr(images: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Detection signal-to-noise [B] of images [B, C, H, W] in any linear flux unit.

    The noise ``sigma`` is the MAD of first differences along rows (``1.4826 median|dx| / sqrt 2``,
    insensitive to smooth sources and to the sky level); the S/N is
    ``sqrt(sum((x - sky)^2 / sigma^2))`` over pixels more than ``threshold`` sigma above the sky
    (median), less the expected contribution of pure noise, i.e. the matched-filter S/N of everything
    detected (arcs and lens light); masked pixels (set to 0) are flat and count as sky. Bands are
    pooled.
    """
    x = images.detach().float().flatten(0, 1) if images.dim() == 4 else images.detach().float()
    dx = (x[..., 1:] - x[..., :-1]).flatten(1)
    sigma = (1.4826 / math.sqrt(2.0)) * dx.abs().median(1).values
    flat = x.flatten(1)
    sigma = torch.where(sigma > 0, sigma, flat.std(1).clamp(min=1e-30))
    r = (flat - flat.median(1, keepdim=True).values) / sigma[:, None]
    snr2 = torch.where(r > threshold, r * r, torch.zeros_like(r)).sum(1)
    # minus what pure noise puts above the threshold: E[r^2; r > t] = t phi(t) + 1 - Phi(t) per pixel
    t = float(threshold)
    floor = t * math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi) + 0.5 * math.erfc(t / math.sqrt(2))
    snr2 = (snr2 - floor * flat.shape[1]).clamp(min=0.0)
    c = images.shape[1] if images.dim() == 4 else 1
    return snr2.reshape(-1, c).sum(1).sqrt()


def snr_bin_labels(edges=SNR_EDGES) -> list[str]:
    return [f"{a:g}-{b:g}" if math.isfinite(b) else f">{a:g}" for a, b in zip(edges[:-1], edges[1:])]


def _features(std: torch.Tensor, snr: torch.Tensor) -> np.ndarray:
    """[B, D, 2] features: log posterior std per label, log S/N per image."""
    ls = torch.log(std.detach().cpu().clamp(min=1e-12)).double().numpy()
    lsnr = np.log(np.clip(snr.detach().cpu().double().numpy(), 1.0, None))
    return np.stack([ls, np.broadcast_to(lsnr[:, None], ls.shape)], -1)


class Recalibration:
    """Per-image, per-label spread scales [B, D] for posterior samples (network units)."""

    def __init__(self, labels, method: str = "conditional", factor=None, coef=None, lo=None, hi=None, n: int = 0):
        if method not in METHODS:
            raise ConfigError(f"recalibration method must be one of {METHODS}, got '{method}'")
        self.labels, self.method, self.n = list(labels), method, int(n)
        d = len(self.labels)
        self.factor = np.ones(d) if factor is None else np.asarray(factor, float)
        self.coef = None if coef is None else np.asarray(coef, float)  # [D, 1 + len(FEATURES)]
        self.lo = None if lo is None else np.asarray(lo, float)  # [D, F] clip range
        self.hi = None if hi is None else np.asarray(hi, float)
        self.choice: list[str] | None = None  # per label, for method auto (CHOICES)

    @classmethod
    def fit(cls, labels, samples, centre, z_truth, snr, method: str = "conditional") -> Recalibration:
        """Fit on a calibration split: posterior ``samples`` [S, N, D] and ``centre`` [N, D]
        (network units), truths ``z_truth`` [N, D] (network units), ``snr`` [N]."""
        from sklearn.linear_model import GammaRegressor

        if method == "auto":
            return cls._fit_auto(labels, samples, centre, z_truth, snr)
        cal = cls(labels, method, n=z_truth.shape[0])
        if method == "conditional":
            std = samples.std(0)
            f = _features(std, snr)
            y = (((z_truth - centre) / std.clamp(min=1e-12)) ** 2).double().numpy()
            y = np.clip(y, 1e-8, 1e4)  # a GLM target must be > 0; cap single outliers
            coef, lo, hi = [], [], []
            for j in range(len(cal.labels)):
                fj = f[:, j]
                lo.append(fj.min(0))
                hi.append(fj.max(0))
                glm = GammaRegressor(alpha=1e-4, max_iter=1000).fit(fj, y[:, j])
                coef.append([float(glm.intercept_), *map(float, glm.coef_)])
            cal.coef, cal.lo, cal.hi = np.array(coef), np.array(lo), np.array(hi)
            samples = cal.apply(samples, centre, snr, with_factor=False)
        cal.factor = fit_scales(samples, centre, z_truth)
        return cal

    @classmethod
    def _fit_auto(cls, labels, samples, centre, z_truth, snr) -> Recalibration:
        """Per label, the simplest of no recalibration, one scale, or the conditional model that
        is best in 2-fold cross-validation on the calibration split (even/odd lenses), scored by
        the mean |coverage - nominal| over the 1-99 % curve (a more complex choice must win by
        :data:`AUTO_MARGIN`); then refitted on the whole split. A posterior already calibrated
        (a flow, say) is left alone instead of being fitted to noise."""
        n = z_truth.shape[0]
        idx = torch.arange(n)
        folds = [(idx % 2 == 0, idx % 2 == 1), (idx % 2 == 1, idx % 2 == 0)]
        score = {c: np.zeros(z_truth.shape[1]) for c in CHOICES}
        for a, b in folds:
            for c in CHOICES:
                sb = samples[:, b]
                if c != "none":
                    sb = cls.fit(labels, samples[:, a], centre[a], z_truth[a], snr[a], c).apply(sb, centre[b], snr[b])
                score[c] += np.abs(coverage_curve(sb, z_truth[b]) - CURVE[:, None]).mean(0) / len(folds)
        choice = []
        for j in range(z_truth.shape[1]):
            best = "none"
            for c in CHOICES[1:]:
                if score[c][j] < score[best][j] - AUTO_MARGIN:
                    best = c
            choice.append(best)
        full = cls.fit(labels, samples, centre, z_truth, snr, "conditional")
        glob = cls.fit(labels, samples, centre, z_truth, snr, "global")
        cond = np.array([c == "conditional" for c in choice])
        cal = cls(labels, "auto", n=n)
        cal.choice = choice
        cal.coef = np.where(cond[:, None], full.coef, 0.0)  # zero coefficients: scale 1
        cal.lo, cal.hi = full.lo, full.hi
        cal.factor = np.where(cond, full.factor, np.where([c == "global" for c in choice], glob.factor, 1.0))
        return cal

    def scales(self, samples, snr) -> torch.Tensor:
        """Spread scale [B, D] of each image and label (``snr`` is read by ``conditional`` only)."""
        b, d = samples.shape[1], samples.shape[2]
        s = torch.ones(b, d, dtype=torch.float64)
        if self.method in ("conditional", "auto") and self.coef is not None:
            f = np.clip(_features(samples.std(0), snr), self.lo, self.hi)
            logvar = self.coef[:, 0] + np.einsum("bdf,df->bd", f, self.coef[:, 1:])
            s = torch.from_numpy(np.exp(0.5 * np.clip(logvar, -20.0, 20.0)))
        return s

    def apply(self, samples, centre, snr, with_factor: bool = True) -> torch.Tensor:
        """Samples [S, B, D] with their spread about ``centre`` [B, D] rescaled per image."""
        s = self.scales(samples, snr)
        if with_factor:
            s = s * torch.from_numpy(self.factor)
        return scaled(samples, centre, s.to(samples.device))

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "n": self.n,
            "scale": {n: float(s) for n, s in zip(self.labels, self.factor)},
        }
        if self.choice is not None:
            out["choice"] = dict(zip(self.labels, self.choice))
        if self.coef is not None:
            out["features"] = list(FEATURES)
            for key, arr in (("coef", self.coef), ("lo", self.lo), ("hi", self.hi)):
                out[key] = {n: [float(v) for v in row] for n, row in zip(self.labels, arr)}
        return out

    @classmethod
    def from_dict(cls, d: dict, labels, source: str = "calibration") -> Recalibration:
        """From ``calibration.json`` (also the earlier one-scale ``spread_scale`` files)."""
        try:
            method = d.get("method", "global")
            method = "global" if method == "spread_scale" else method  # the earlier one-scale files
            factor = [float(d["scale"][n]) for n in labels]
            coef = lo = hi = None
            if method in ("conditional", "auto"):
                if list(d.get("features", [])) != list(FEATURES):
                    raise ConfigError(f"{source}: features {d.get('features')} are not {list(FEATURES)}")
                coef, lo, hi = ([[float(v) for v in d[k][n]] for n in labels] for k in ("coef", "lo", "hi"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: not a lensexp calibration for labels {list(labels)} ({exc})") from None
        cal = cls(labels, method, factor, coef, lo, hi, d.get("n", 0))
        if method == "auto":
            choice = d.get("choice") or {}
            cal.choice = [str(choice.get(n, "conditional")) for n in labels]
        if not np.all(np.isfinite(cal.factor)) or (cal.coef is not None and not np.all(np.isfinite(cal.coef))):
            raise ConfigError(f"{source}: non-finite calibration values")
        return cal


def coverage_by_group(truth, intervals: dict, c: dict, edges=SNR_EDGES, min_n: int = 5) -> dict:
    """Coverage of ``intervals`` ({level: (lo, hi) [N, D]}) for ``truth`` [N, D] per S/N bin
    (``c['snr']``) and, when recorded, per source kind (``c['is_cosmos']``):
    ``{"snr": {bin: {"n", "coverage": {level: [D]}}}, "source": {...}}``; groups under ``min_n``
    lenses are left out."""
    from lensexp.metrics import coverage

    groups = {"snr": {}}
    snr = c["snr"]
    for name, a, b in zip(snr_bin_labels(edges), edges[:-1], edges[1:]):
        groups["snr"][name] = (snr >= a) & (snr < b)
    if "is_cosmos" in c:
        kind = c["is_cosmos"].bool()
        groups["source"] = {"sersic": ~kind, "cosmos": kind}
    out = {}
    for g, sel in groups.items():
        out[g] = {}
        for name, m in sel.items():
            if int(m.sum()) < min_n:
                continue
            cov = coverage(truth[m], {lv: (lo[m], hi[m]) for lv, (lo, hi) in intervals.items()})
            out[g][name] = {"n": int(m.sum()), "coverage": {f"{lv:.3f}": v.tolist() for lv, v in cov.items()}}
    return out
