"""Maximum-likelihood lens modelling: ``python -m lensexp.fit input=PATH out=fits.csv``.

The classic baseline the network is measured against. Each image is fitted with SIE + external
shear, an elliptical Sérsic source (and, with ``lens_light=true``, a Sérsic lens light on the lens
centre) through the simulator's own differentiable forward model (supersampled ray tracing and
PSF convolution, :func:`lensexp.sim.render.render_sersic`), maximising the likelihood of the
pixels under the image noise model with torch autograd:

1. **Starts**: ``init=prior`` draws ``n_starts`` mass models from the data preset's priors;
   ``init=cnn ckpt=CKPT`` takes the network's posterior mean and samples (Pearson et al. 2021);
   ``init=truth truth=truth.csv`` starts at the true mass (a diagnostic: the "true optimum").
   The source is placed where the significant pixels map back to (flux-weighted mean of
   ``beta = theta - alpha``), so every start is a plausible lens.
2. **Adam**, batched over lenses and starts, with the linear amplitudes solved exactly at every
   step (weighted least squares, lenstronomy's linear solver), data-based pixel variance.
3. **L-BFGS** (strong Wolfe) polishes the ``lbfgs.polish`` best starts of each lens, amplitudes
   free, with the model's own variance ``sigma^2 = sky/t + read^2/t^2 + gain^2/(12 t^2) +
   model/t`` (``lensexp.sim.instrument``) re-evaluated between rounds.
4. Optionally (``laplace=true``) the Laplace approximation: the inverse Hessian of ``-ln L`` in
   physical parameters gives ``p_std``.

The likelihood is Gaussian plus a flat outlier term beyond ``outlier_sigma`` (cosmic rays, hot
pixels, source knots a Sérsic lacks; :func:`rho`), so every fit of a file is scored on the same
pixels and ``nll`` compares across runs and starting modes. ``chi2_dof`` is over the inliers.

Writes one CSV row per file: ``name``, the seven mass labels, ``chi2_dof``, ``seconds`` (wall
time per lens, batch time shared), then ``mu_F`` of the fitted model, ``nll``, ``n_pix``
(inliers), ``n_out`` (outliers), the source (and lens-light) parameters, and with
``laplace=true`` the ``_std`` columns. Unusable
files go to ``<out>.errors.csv``. Rows are appended to ``<out>.partial`` as lenses finish, so an
interrupted run resumes where it stopped; the CSV appears only when all are done.

Noise model per file: FITS header ``EXPTIME`` [s], ``SKYLEV`` [e-/s/px, subtracted],
``RDNOISE`` [e-], ``GAIN`` [e-/ADU] (written by ``lensexp.simulate format=fits``), overridden by
``noise.*``; when the exposure time is unknown the background rms is estimated from the image
(``astropy.stats.mad_std``) and the Poisson term of the source is dropped. PSF: a ``PSF`` image
extension of the file, else ``psf=FILE``, else a Gaussian of ``psf_fwhm`` arcsec.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lensexp.errors import ConfigError
from lensexp.paths import resolve_path
from lensexp.io import BadInput, check_scale, pixel_scale, read_fits, read_fits_hdus, read_table, stamp_mask, to_grid
from lensexp.sim import instrument as inst
from lensexp.sim import lens as lensmod
from lensexp.sim.priors import LABELS, check_range, draw
from lensexp.sim.render import pixel_grid, render_sersic, render_unlensed_sersic
from lensexp.sim.source import sersic_total_flux

log = logging.getLogger("lensexp.fit")

MASS = LABELS[:-1]
SOURCE = ("src_R", "src_n", "src_e1", "src_e2", "src_x", "src_y")
LIGHT = ("ll_R", "ll_n", "ll_e1", "ll_e2")
INITS = ("prior", "cnn", "truth")


# ---------------------------------------------------------------------------- parameters
@dataclass
class ParamSpace:
    """Non-linear parameters in boxes ``[lo, hi]``, optimised as ``u`` with
    ``p = lo + (hi - lo) sigmoid(u)`` (so every step stays physical)."""

    names: tuple
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def for_grid(cls, npix: int, pixscale: float, lens_light: bool, dtype=torch.float64) -> ParamSpace:
        """Bounds for an ``npix`` grid of ``pixscale`` arcsec/px (field of view ``F``): theta_E in
        [0.05", F/2], |e| components < 0.7 (q > 0.18), lens centre within F/8 of the cut-out's
        centre (0.8" at 64 x 0.1"), |gamma| < 0.3, source
        in the field, R_sersic in [pixscale/4, F/4], n in [0.3, 6]; lens light R in
        [pixscale, F/2], n in [0.5, 8]."""
        fov = npix * pixscale
        b = {
            "theta_E": (0.05, fov / 2),
            "e1": (-0.7, 0.7),
            "e2": (-0.7, 0.7),
            "center_x": (-fov / 8, fov / 8),
            "center_y": (-fov / 8, fov / 8),
            "gamma1": (-0.3, 0.3),
            "gamma2": (-0.3, 0.3),
            "src_R": (pixscale / 4, fov / 4),
            "src_n": (0.3, 6.0),
            "src_e1": (-0.7, 0.7),
            "src_e2": (-0.7, 0.7),
            "src_x": (-fov / 2, fov / 2),
            "src_y": (-fov / 2, fov / 2),
            "ll_R": (pixscale, fov / 2),
            "ll_n": (0.5, 8.0),
            "ll_e1": (-0.7, 0.7),
            "ll_e2": (-0.7, 0.7),
        }
        names = param_names(lens_light)
        lo = torch.tensor([b[n][0] for n in names], dtype=dtype)
        hi = torch.tensor([b[n][1] for n in names], dtype=dtype)
        return cls(names, lo, hi)

    def to(self, dtype=None, device=None) -> ParamSpace:
        return ParamSpace(self.names, self.lo.to(device, dtype), self.hi.to(device, dtype))

    def to_u(self, p: torch.Tensor) -> torch.Tensor:
        """Physical [M, P] -> unconstrained (clipped just inside the box)."""
        f = ((p - self.lo) / (self.hi - self.lo)).clamp(1e-6, 1 - 1e-6)
        return torch.logit(f)

    def to_p(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(u)

    def as_dict(self, p: torch.Tensor) -> dict:
        return {n: p[..., i] for i, n in enumerate(self.names)}


# ---------------------------------------------------------------------------- forward model
class LensModel:
    """Unit-amplitude component images [M, K, N, N] (K = 1 source, + 1 lens light) on one grid."""

    def __init__(self, npix: int, pixscale: float, supersample: int, lens_light: bool):
        self.npix, self.pixscale, self.ss, self.lens_light = int(npix), float(pixscale), int(supersample), lens_light
        self.K = 2 if lens_light else 1

    def templates(self, p: dict, psf: torch.Tensor | None) -> torch.Tensor:
        lens = {k: p[k] for k in MASS}
        src = _unit_sersic(p, "src_", p["src_x"], p["src_y"])
        out = [render_sersic(lens, src, self.npix, self.pixscale, self.ss, psf, p["theta_E"].dtype)]
        if self.lens_light:
            light = _unit_sersic(p, "ll_", p["center_x"], p["center_y"])
            out.append(render_unlensed_sersic(light, self.npix, self.pixscale, self.ss, psf, p["theta_E"].dtype))
        return torch.stack(out, 1)

    def mu_F(self, p: dict) -> torch.Tensor:
        """Flux magnification of the fitted source: lensed flux in the field (before the PSF) over
        its total intrinsic flux (the label convention)."""
        T = self.templates(p, None)[:, 0]
        return T.sum((1, 2)) / sersic_total_flux(torch.ones_like(p["src_R"]), p["src_R"], p["src_n"])


def _unit_sersic(p: dict, prefix: str, center_x, center_y) -> dict:
    """lenstronomy ``SERSIC_ELLIPSE`` keywords of unit amplitude from fit parameters ``<prefix>R``,
    ``n``, ``e1``, ``e2``."""
    return {
        "amp": torch.ones_like(center_x),
        "R_sersic": p[prefix + "R"],
        "n_sersic": p[prefix + "n"],
        "e1": p[prefix + "e1"],
        "e2": p[prefix + "e2"],
        "center_x": center_x,
        "center_y": center_y,
    }


def solve_amplitudes(T: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares amplitudes [M, K] of templates T [M, K, N, N] for data d and
    inverse-variance weights w [M, N, N] (differentiable; clamped at >= 0)."""
    Tf, df, wf = T.flatten(2), d.flatten(1), w.flatten(1)
    A = torch.einsum("mkp,mlp,mp->mkl", Tf, Tf, wf)
    b = torch.einsum("mkp,mp,mp->mk", Tf, df, wf)
    ridge = 1e-12 * A.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-300)
    A = A + ridge[:, None, None] * torch.eye(T.shape[1], dtype=T.dtype, device=T.device)
    return torch.linalg.solve(A, b).clamp(min=0)


@dataclass
class Observation:
    """A batch of lenses: data [B, N, N] (e-/s), ``use`` [B, N, N] (pixels in the likelihood), PSF
    kernels [B, k, k] and the noise model ``variance = bg_var + model * inv_t`` (each [B])."""

    data: torch.Tensor
    use: torch.Tensor
    psf: torch.Tensor
    bg_var: torch.Tensor
    inv_t: torch.Tensor

    def variance(self, model: torch.Tensor, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Pixel variance [(e-/s)^2] of the lenses ``idx`` for model (or data) images."""
        return self.bg_var[idx, None, None] + model.clamp(min=0) * self.inv_t[idx, None, None]

    def to(self, dtype=None, device=None) -> Observation:
        return Observation(
            *(
                t.to(device, dtype) if t.is_floating_point() else t.to(device)
                for t in (self.data, self.use, self.psf, self.bg_var, self.inv_t)
            )
        )

    def weights(self) -> torch.Tensor:
        """Inverse variance from the data themselves (fixed; for the Adam stage)."""
        return self.use / self.variance(self.data)


def rho(z2: torch.Tensor, outlier_sigma: float | None) -> torch.Tensor:
    """Per-pixel ``-ln L`` of a normalised squared residual ``z^2``: Gaussian ``z^2 / 2`` or, with
    ``outlier_sigma = c``, a Gaussian plus a flat outlier term (cosmic rays, hot pixels, source
    structure the model lacks), ``-ln(exp(-z^2/2) + exp(-c^2/2))``: quadratic well inside ``c``
    sigma, constant far outside, smooth in between."""
    if not outlier_sigma:
        return 0.5 * z2
    return -torch.logaddexp(-0.5 * z2, torch.full_like(z2, -0.5 * outlier_sigma**2))


def likelihood_terms(model, data, use, var, outlier_sigma) -> dict:
    """``nll`` (robust Gaussian ``-ln L`` without the 2 pi constant), ``chi2`` and ``n_pix`` over
    the inlier pixels (``|z| < outlier_sigma``), ``n_out`` outliers; each [M]."""
    z2 = (data - model) ** 2 / var
    inlier = use & (z2 < outlier_sigma**2) if outlier_sigma else use
    return {
        "nll": ((rho(z2, outlier_sigma) + 0.5 * torch.log(var)) * use).sum((1, 2)),
        "chi2": (z2 * inlier).sum((1, 2)),
        "n_pix": inlier.sum((1, 2)),
        "n_out": (use & ~inlier).sum((1, 2)),
    }


# ---------------------------------------------------------------------------- starts
def init_source(space: ParamSpace, p: torch.Tensor, obs: Observation, idx: torch.Tensor, model: LensModel, jitter):
    """Fill the source (and lens-light) columns of starts ``p`` [M, P] (mass set; ``idx`` [M]
    maps starts to lenses): the source sits at the flux-weighted mean of ``beta = theta -
    alpha(theta)`` over pixels above 3 sigma, with their spread as size. ``jitter`` [M, 4] in
    [-1, 1] sets small ellipticities (never exactly round, where the angle has no gradient)."""
    x, y = pixel_grid(model.npix, model.pixscale, 1, p.dtype, p.device)
    d = obs.data[idx]
    sig = d * torch.sqrt(obs.weights()[idx])
    w = torch.where(sig > 3, d, torch.zeros_like(d)).flatten(1)
    m = space.as_dict(p)
    bx, by = lensmod.ray_shoot(x.flatten()[None], y.flatten()[None], *(m[k][:, None] for k in MASS))
    tot = w.sum(1).clamp(min=1e-30)
    sx, sy = (w * bx).sum(1) / tot, (w * by).sum(1) / tot
    spread = torch.sqrt((w * ((bx - sx[:, None]) ** 2 + (by - sy[:, None]) ** 2)).sum(1) / tot)
    none = w.sum(1) <= 0
    sx, sy = torch.where(none, m["center_x"], sx), torch.where(none, m["center_y"], sy)
    col = {n: i for i, n in enumerate(space.names)}
    jitter = 0.05 * jitter.to(p.dtype)
    p = p.clone()
    p[:, col["src_x"]], p[:, col["src_y"]] = sx, sy
    p[:, col["src_R"]] = torch.where(none, torch.full_like(sx, 0.2), 0.5 * spread).clamp(0.05, 0.5)
    p[:, col["src_n"]] = 1.0
    p[:, col["src_e1"]], p[:, col["src_e2"]] = jitter[:, 0], jitter[:, 1]
    if model.lens_light:
        p[:, col["ll_R"]] = 0.5 * m["theta_E"].clamp(min=2 * model.pixscale)
        p[:, col["ll_n"]] = 3.0
        p[:, col["ll_e1"]], p[:, col["ll_e2"]] = m["e1"] + jitter[:, 2], m["e2"] + jitter[:, 3]
    return p.clamp(space.lo, space.hi)


def prior_mass(data_cfg: DictConfig, n: int, rng: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """``n`` SIE + shear draws [n, 7] from a data preset's lens priors."""
    L = data_cfg.lens
    d = lambda lohi: draw(rng, n, check_range("", lohi), None, dtype)  # noqa: E731
    theta = d(L.theta_E)
    e1, e2 = lensmod.phi_q_to_ellipticity(d(L.phi), d(L.q))
    return torch.stack([theta, e1, e2, d(L.center), d(L.center), d(L.gamma), d(L.gamma)], 1)


# ---------------------------------------------------------------------------- optimisation
@dataclass
class FitSettings:
    """Optimiser settings (``conf/fit.yaml``: ``adam.*``, ``lbfgs.*``, ``outlier_sigma``, ``laplace``)."""

    adam_steps: int = 300
    adam_lr: float = 0.05
    source_steps: int = 50
    adam_dtype: torch.dtype = torch.float32
    lbfgs_iters: int = 100
    polish: int = 2
    irls_rounds: int = 2
    outlier_sigma: float | None = 10.0
    laplace: bool = False


def fit_batch(obs: Observation, starts: torch.Tensor, space: ParamSpace, model: LensModel, fs: FitSettings, rngs):
    """Fit B lenses from starts [B, S, 7] (mass; the source is initialised here); ``rngs``: one
    generator per lens.

    Returns one dict per lens: ``p`` (best physical parameters by name), ``amps`` [K], ``chi2``,
    ``nll``, ``n_pix``, ``dof``, ``start`` (index of the winning start), ``seconds`` and, with
    ``fs.laplace``, ``std`` (by name; NaN where the Hessian is not positive definite).
    """
    B, S, _ = starts.shape
    t0 = time.perf_counter()
    dt = obs.data.dtype
    dev = obs.data.device
    idx = torch.arange(B, device=dev).repeat_interleave(S)
    p0 = torch.zeros(B * S, len(space.names), dtype=dt, device=dev)
    p0[:, : len(MASS)] = starts.reshape(B * S, -1).to(dt)
    jitter = torch.cat([2 * torch.rand(S, 4, generator=r, dtype=dt) - 1 for r in rngs]).to(dev)
    p0 = init_source(space, p0.clamp(space.lo, space.hi), obs, idx, model, jitter)

    # stage 1: Adam over every start at once (in fs.adam_dtype), amplitudes profiled, data-based variance
    o1, s1 = obs.to(fs.adam_dtype), space.to(fs.adam_dtype)
    u = s1.to_u(p0.to(fs.adam_dtype)).requires_grad_(True)
    opt = torch.optim.Adam([u], lr=fs.adam_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(fs.adam_steps, 1), eta_min=fs.adam_lr / 20)
    w, d = o1.weights()[idx], o1.data[idx]
    n_mass = len(MASS)
    for step in range(fs.adam_steps):
        opt.zero_grad(set_to_none=True)
        loss = _profiled_loss(s1.to_p(u), o1, idx, w, d, s1, model, fs.outlier_sigma)
        loss.sum().backward()
        u.grad.nan_to_num_(0.0, 0.0, 0.0)
        if step < fs.source_steps:  # first fit the light to the starting mass model
            u.grad[:, :n_mass] = 0.0
        opt.step()
        sched.step()
    with torch.no_grad():
        p1 = s1.to_p(u).to(dt).clamp(space.lo, space.hi)
        loss1 = _profiled_loss(p1, obs, idx, obs.weights()[idx], obs.data[idx], space, model, fs.outlier_sigma)
    loss1 = torch.where(torch.isfinite(loss1), loss1, torch.full_like(loss1, math.inf)).reshape(B, S)
    order = loss1.argsort(1)
    shared = (time.perf_counter() - t0) / B

    results = []
    for b in range(B):
        t1 = time.perf_counter()
        best = None
        for j in order[b, : max(1, fs.polish)].tolist():
            res = _polish(p1[b * S + j], obs, b, space, model, fs)
            res["start"] = j
            if best is None or res["nll"] < best["nll"]:
                best = res
        if fs.laplace:
            best["std"] = _laplace(best, obs, b, space, model, fs.outlier_sigma)
        best["dof"] = max(best["n_pix"] - len(space.names) - model.K, 1)
        best["seconds"] = shared + time.perf_counter() - t1
        with torch.no_grad():
            best["p"]["mu_F"] = model.mu_F({k: v[None] for k, v in best["p"].items()})[0]
        results.append(best)
    return results


def _profiled_loss(p, obs, idx, w, d, space, model, outlier_sigma):
    """Stage-1 loss [M]: robust chi-square with data-based weights ``w``, amplitudes solved by
    weighted least squares (outliers of the current model down-weighted, as in IRLS)."""
    T = model.templates(space.as_dict(p), obs.psf[idx])
    amps = solve_amplitudes(T, d, w)
    z2 = w * (d - (amps[:, :, None, None] * T).sum(1)) ** 2
    if outlier_sigma:
        inlier = torch.exp(-0.5 * z2.detach() + rho(z2.detach(), outlier_sigma))  # P(inlier | z)
        amps = solve_amplitudes(T, d, w * inlier)
        z2 = w * (d - (amps[:, :, None, None] * T).sum(1)) ** 2
    return (rho(z2, outlier_sigma) * (w > 0)).sum((1, 2))


def _component_model(p, amps, obs, b, space, model):
    """Model image [1, N, N] of lens ``b`` for physical parameters p [P] and amplitudes [K]."""
    T = model.templates(space.as_dict(p[None]), obs.psf[b : b + 1])
    return (amps[None, :, None, None] * T).sum(1)


def _polish(p_start, obs, b, space, model, fs):
    """L-BFGS from one start, amplitudes free, by iteratively reweighted fits: each round
    minimises the robust chi-square with the pixel variance of the previous round's model held
    fixed (the model's own noise, ``Observation.variance``), so a noiseless image is fitted
    exactly and the estimate is unbiased for noisy ones. Returns parameters, amplitudes and
    :func:`likelihood_terms` with the final model's variance."""
    d, use, sl = obs.data[b : b + 1], obs.use[b : b + 1], slice(b, b + 1)
    with torch.no_grad():
        T = model.templates(space.as_dict(p_start[None]), obs.psf[sl])
        amps = solve_amplitudes(T, d, use / obs.variance(d, sl))[0]  # first weights: the data's
        var = obs.variance((amps[None, :, None, None] * T).sum(1), sl)
    u = space.to_u(p_start).clone().requires_grad_(True)
    la = torch.log(amps.clamp(min=1e-30)).clone().requires_grad_(True)
    for _ in range(fs.irls_rounds):
        w = use / var
        opt = torch.optim.LBFGS(
            [u, la],
            lr=1.0,
            max_iter=fs.lbfgs_iters,
            history_size=20,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-10,
            tolerance_change=1e-9,  # in -ln L units: far below any meaningful change
        )

        def closure(opt=opt, w=w):
            opt.zero_grad(set_to_none=True)
            m = _component_model(space.to_p(u), torch.exp(la), obs, b, space, model)
            loss = (rho(w * (d - m) ** 2, fs.outlier_sigma) * use).sum()
            if not torch.isfinite(loss):
                return torch.tensor(1e300, dtype=loss.dtype, device=loss.device)
            loss.backward()
            for t in (u, la):
                t.grad.nan_to_num_(0.0, 0.0, 0.0)
            return loss

        opt.step(closure)
        with torch.no_grad():
            m = _component_model(space.to_p(u), torch.exp(la), obs, b, space, model)
            var = obs.variance(m, sl)
    with torch.no_grad():
        terms = likelihood_terms(m, d, use, var, fs.outlier_sigma)
    return {
        "p": space.as_dict(space.to_p(u).detach()),
        "amps": torch.exp(la).detach(),
        **{k: (float(v[0]) if v.is_floating_point() else int(v[0])) for k, v in terms.items()},
        "var": var[0],
    }


def _laplace(res, obs, b, space, model, outlier_sigma) -> dict:
    """Laplace approximation: std of each physical parameter (amplitudes included) from the
    inverse Hessian of the fitted loss at the optimum, pixel variance held at the model's."""
    x0 = torch.cat([torch.stack([res["p"][n] for n in space.names]), res["amps"]]).detach()
    P, d, use = len(space.names), obs.data[b : b + 1], obs.use[b : b + 1]
    w = use / res["var"]

    def f(x):
        return (rho(w * (d - _component_model(x[:P], x[P:], obs, b, space, model)) ** 2, outlier_sigma) * use).sum()

    H = torch.autograd.functional.hessian(f, x0)
    try:
        std = torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal().sqrt()
    except torch.linalg.LinAlgError:  # not positive definite: no Gaussian approximation
        std = torch.full((x0.numel(),), math.nan, dtype=x0.dtype)
    names = list(space.names) + ["src_amp", "ll_amp"][: model.K]
    return {n: float(s) for n, s in zip(names, std)}


# ---------------------------------------------------------------------------- files
def noise_from_header(header, img: np.ndarray, use: np.ndarray, cfg: DictConfig, from_image: bool = False):
    """(background variance [(e-/s)^2], 1 / exposure time [1/s]) for one image; ``from_image``
    (e.g. an ICA mixture of bands, whose noise the header does not describe): the background
    from the pixels (``mad_std``), no Poisson term unless ``noise.exposure_time`` is given."""
    nz = cfg.noise
    get = lambda key, hdr: nz[key] if nz.get(key) is not None else (None if from_image else header.get(hdr))  # noqa: E731
    t = get("exposure_time", "EXPTIME")
    if nz.get("background_rms") is not None:
        bg = float(nz.background_rms) ** 2
    elif t is not None:
        t = float(t)
        sky, read, gain = (
            float(get(k, h) or 0.0) for k, h in (("sky", "SKYLEV"), ("read_noise", "RDNOISE"), ("gain", "GAIN"))
        )
        bg = float(inst.noise_variance(torch.tensor(0.0), t, sky, read, gain))
    else:
        from astropy.stats import mad_std

        bg = float(mad_std(img[use])) ** 2
    if not bg > 0:
        raise BadInput("background noise is zero or undefined: give noise.background_rms=E-/S")
    return bg, (1.0 / float(t) if t else 0.0)


@functools.lru_cache(maxsize=8)
def load_psf(path: str, pixscale: float, psf_pixscale: float | None) -> np.ndarray:
    """A unit-sum odd-sized PSF kernel at ``pixscale`` from a FITS image (resampled with GalSim
    when ``psf_pixscale`` differs)."""
    from lensexp.sim.psf import load_empirical

    size = read_fits(path)[0].shape[-1]
    ps = float(psf_pixscale or pixscale)
    n = int(math.ceil(size * ps / pixscale)) | 1
    k, _ = load_empirical(str(path), ps, pixscale, n)
    return k[0]


def _opt_float(v) -> float | None:
    return None if v is None else float(v)


class Loader:
    """Reads one FITS into (data [N, N], use mask, PSF kernel, bg_var, inv_t) for a fit."""

    def __init__(self, cfg: DictConfig, npix: int | None):
        self.cfg, self.npix = cfg, npix

    def __call__(self, path: Path):
        from lensexp.sim.psf import draw_kernel

        img, header, ext = read_fits_hdus(path, ("PSF",))
        scale = float(self.cfg.pixscale) if self.cfg.pixscale else pixel_scale(header)
        if scale is None:
            raise BadInput(f"{path.name}: no pixel scale (header PIXSCALE or WCS); give pixscale=ARCSEC_PER_PX")
        if self.cfg.ica:  # two bands -> the lens-light-free source, in band-1 units
            from lensexp.ica import cube_source

            raw = cube_source(img, path.name, int(self.cfg.seed))[None]
            raw[:, ~np.isfinite(img).all(0)] = np.nan
        else:
            band = int(self.cfg.band)
            if not 0 <= band < img.shape[0]:
                raise BadInput(f"{path.name}: band={band} but the file has {img.shape[0]} band(s)")
            raw = img[band : band + 1]
        npix = self.npix or min(raw.shape[-2:])
        finite = to_grid(np.isfinite(raw).astype(np.float32), npix)[0] > 0
        img = to_grid(raw, npix, path.name)
        use = finite & (img[0] != 0) & ~stamp_mask(img, scale, self.cfg.masks)
        if use.sum() < 50:
            raise BadInput(f"{path.name}: only {int(use.sum())} usable pixels (NaN, zero or masked)")
        psf = ext.get("PSF")
        if psf is None and self.cfg.psf:
            psf = load_psf(str(resolve_path(self.cfg.psf)), scale, _opt_float(self.cfg.psf_pixscale))
        if psf is None and self.cfg.psf_fwhm:
            psf = draw_kernel("gaussian", float(self.cfg.psf_fwhm), scale, int(self.cfg.psf_size))
        if psf is None:
            raise BadInput(f"{path.name}: no PSF (no 'PSF' extension); give psf=FITS or psf_fwhm=ARCSEC")
        psf = np.asarray(psf, np.float64)
        if psf.ndim != 2 or psf.shape[0] != psf.shape[1] or psf.shape[0] % 2 == 0 or not np.isfinite(psf).all():
            raise BadInput(f"{path.name}: the PSF must be a finite, square, odd-sized image, got shape {psf.shape}")
        if not psf.sum() > 0:
            raise BadInput(f"{path.name}: the PSF has no positive flux")
        bg, inv_t = noise_from_header(header, img[0], use, self.cfg, from_image=bool(self.cfg.ica))
        return {"data": img[0], "use": use, "psf": psf / psf.sum(), "bg_var": bg, "inv_t": inv_t, "scale": scale}


def read_truth(path: str | Path) -> dict:
    """Truth mass parameters [7] by file name from a ``truth.csv``."""
    rows = read_table(path, "truth file")
    missing = [k for k in MASS if rows and k not in next(iter(rows.values()))]
    if not rows or missing:
        raise ConfigError(f"truth file '{path}' needs columns name and {', '.join(MASS)}; missing {missing}")
    return {n: [r[k] for k in MASS] for n, r in rows.items()}


def param_names(lens_light: bool) -> tuple:
    """Non-linear parameters fitted: mass, source shape and position (+ lens light)."""
    return MASS + SOURCE + (LIGHT if lens_light else ())


def columns(lens_light: bool, laplace: bool) -> list[str]:
    """CSV columns: the contract's (``name``, mass labels, ``chi2_dof``, ``seconds``) first."""
    extra = [n for n in param_names(lens_light) if n not in MASS] + ["src_amp", "ll_amp"][: 2 if lens_light else 1]
    cols = ["name", *MASS, "chi2_dof", "seconds", "mu_F", "nll", "n_pix", "n_out", "start", *extra]
    if laplace:
        cols += [f"{n}_std" for n in (*MASS, *extra)]
    return cols


def result_row(name: str, res: dict, space: ParamSpace, K: int) -> dict:
    row = {"name": name, **{k: float(res["p"][k]) for k in (*MASS, "mu_F")}}
    row.update(
        chi2_dof=res["chi2"] / res["dof"],
        seconds=res["seconds"],
        nll=res["nll"],
        n_pix=res["n_pix"],
        n_out=res["n_out"],
        start=res["start"],
    )
    row.update({n: float(res["p"][n]) for n in space.names if n not in MASS})
    row.update({n: float(a) for n, a in zip(["src_amp", "ll_amp"][:K], res["amps"])})
    for n, s in res.get("std", {}).items():
        row[f"{n}_std"] = s
    return row


# ---------------------------------------------------------------------------- entry point
def check_config(cfg: DictConfig) -> None:
    if str(cfg.init) not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got '{cfg.init}'")
    if cfg.init == "cnn" and not cfg.ckpt:
        raise ConfigError("init=cnn needs ckpt=CHECKPOINT (a trained lensexp model)")
    if cfg.init == "truth" and not cfg.truth:
        raise ConfigError("init=truth needs truth=TRUTH_CSV (e.g. from lensexp.simulate format=fits)")
    ints = (
        ("n_starts", 1),
        ("batch_size", 1),
        ("adam.steps", 0),
        ("adam.source_steps", 0),
        ("lbfgs.iters", 1),
        ("lbfgs.polish", 1),
        ("lbfgs.irls_rounds", 1),
    )
    for key, lo in ints:
        v = OmegaConf.select(cfg, key)
        if int(v) < lo:
            raise ConfigError(f"{key} must be >= {lo}, got {v}")
    if cfg.psf and not resolve_path(cfg.psf).is_file():
        raise ConfigError(f"psf file not found: '{cfg.psf}'")
    if cfg.psf_fwhm is not None and not float(cfg.psf_fwhm) > 0:
        raise ConfigError(f"psf_fwhm must be > 0 arcsec, got {cfg.psf_fwhm}")
    if cfg.supersample is not None and int(cfg.supersample) < 1:
        raise ConfigError(f"supersample must be >= 1, got {cfg.supersample}")
    for key in ("dtype", "adam.dtype"):
        if str(OmegaConf.select(cfg, key)) not in ("float32", "float64"):
            raise ConfigError(f"{key} must be float32 or float64, got '{OmegaConf.select(cfg, key)}'")


def run(cfg: DictConfig) -> dict:
    """Fit every file of ``cfg.input``; rows to ``cfg.out`` (resumable), failures to ``<out>.errors.csv``."""
    from tqdm import tqdm

    from lensexp.predict import list_inputs

    check_config(cfg)
    files = list_inputs(cfg.input)
    torch.set_flush_denormal(True)
    dtype = getattr(torch, str(cfg.dtype))
    device = str(cfg.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    pred = None
    if cfg.init == "cnn":
        from lensexp.predict import Predictor

        pred = Predictor(str(cfg.ckpt), device, int(cfg.n_mc), max(int(cfg.n_starts), 1024), int(cfg.seed))
    truth = read_truth(cfg.truth) if cfg.init == "truth" else None
    npix = int(cfg.npix) if cfg.npix else (pred.npix if pred is not None else None)
    loader = Loader(cfg, npix)
    ss = int(cfg.supersample or cfg.data.supersample)
    lens_light = bool(cfg.lens_light)
    fs = FitSettings(
        adam_steps=int(cfg.adam.steps),
        adam_lr=float(cfg.adam.lr),
        source_steps=int(cfg.adam.source_steps),
        adam_dtype=getattr(torch, str(cfg.adam.dtype)),
        lbfgs_iters=int(cfg.lbfgs.iters),
        polish=int(cfg.lbfgs.polish),
        irls_rounds=int(cfg.lbfgs.irls_rounds),
        outlier_sigma=float(cfg.outlier_sigma) if cfg.outlier_sigma else None,
        laplace=bool(cfg.laplace),
    )
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    err_path = out.with_name(out.stem + ".errors.csv")
    cols = columns(lens_light, fs.laplace)
    done = _resume(partial, cols) if cfg.resume else set()
    if not cfg.resume:
        partial.unlink(missing_ok=True)
    # batches are fixed chunks of the input list, written whole: a resumed run fits the same batches
    bs = int(cfg.batch_size)
    starts = range(0, len(files), bs)
    chunks = [[(i, f) for i, f in enumerate(files[c : c + bs], c) if f.name not in done] for c in starts]
    chunks = [c for c in chunks if c]
    errors, n_ok = [], len(done)
    bar = tqdm(total=sum(map(len, chunks)), unit="lens", disable=not cfg.progress, desc=f"fit ({cfg.init})")
    for chunk in chunks:
        group = []
        for i, f in chunk:
            try:
                item = loader(f)
                if pred is not None:
                    check_scale(f.name, item["scale"], pred.pixscale)
                if truth is not None and f.name not in truth:
                    raise BadInput(f"{f.name}: not in the truth file {cfg.truth}")
                group.append({**item, "name": f.name, "index": i})
            except BadInput as exc:
                errors.append({"name": f.name, "error": str(exc)})
        # one grid per fit batch: files of other sizes, scales or PSF sizes form their own
        keys = sorted({(g["data"].shape[-1], g["scale"], g["psf"].shape[-1]) for g in group})
        rows = []
        for key in keys:
            sub = [g for g in group if (g["data"].shape[-1], g["scale"], g["psf"].shape[-1]) == key]
            rows += _fit_group(sub, cfg, fs, pred, truth, ss, lens_light, dtype, device)
        if rows:
            new = not partial.is_file()
            with open(partial, "a", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=cols)
                if new:
                    w.writeheader()
                w.writerows(rows)
            n_ok += len(rows)
        bar.update(len(chunk))
    bar.close()
    tmp_err = err_path.with_name(f".{err_path.name}.tmp-{os.getpid()}")
    with open(tmp_err, "w", newline="") as fh:
        ew = csv.DictWriter(fh, fieldnames=["name", "error"])
        ew.writeheader()
        ew.writerows(errors)
    if not partial.is_file():  # nothing could be fitted: an empty table
        with open(partial, "w", newline="") as fh:
            csv.DictWriter(fh, fieldnames=cols).writeheader()
    os.replace(tmp_err, err_path)
    os.replace(partial, out)
    print(f"wrote {out} ({n_ok} lenses) and {err_path} ({len(errors)} skipped)")
    return {"n": n_ok, "errors": errors}


def _resume(partial: Path, cols: list[str]) -> set:
    """Names already fitted in ``partial`` (a previous, interrupted run with the same settings)."""
    if not partial.is_file():
        return set()
    with open(partial, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != cols:
            raise ConfigError(
                f"{partial} was written with other settings (columns differ); delete it or pass resume=false"
            )
        done = {r["name"] for r in reader}
    log.info("resuming: %d lenses already fitted in %s", len(done), partial)
    return done


def _fit_group(group: list[dict], cfg, fs, pred, truth, ss, lens_light, dtype, device) -> list[dict]:
    """Fit loaded files sharing one grid; returns their CSV rows."""
    n, scale = group[0]["data"].shape[-1], group[0]["scale"]
    space = ParamSpace.for_grid(n, scale, lens_light, dtype).to(device=device)
    model = LensModel(n, scale, ss, lens_light)
    stack = lambda key: torch.from_numpy(np.stack([g[key] for g in group]))  # noqa: E731
    obs = Observation(
        stack("data").to(dtype),
        stack("use"),
        stack("psf").to(dtype),
        torch.tensor([g["bg_var"] for g in group], dtype=dtype),
        torch.tensor([g["inv_t"] for g in group], dtype=dtype),
    ).to(device=device)
    # one generator per file (seed, position in the input list): reruns and resumed runs agree
    rngs = [torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + g["index"]) for g in group]
    t0 = time.perf_counter()
    starts = _starts(cfg, group, obs, pred, truth, rngs, dtype).to(device)
    t_init = (time.perf_counter() - t0) / len(group)
    rows = []
    for b, (g, res) in enumerate(zip(group, fit_batch(obs, starts, space, model, fs, rngs))):
        res["seconds"] += t_init
        rows.append(result_row(g["name"], res, space, model.K))
        if cfg.save_plots:
            with torch.no_grad():
                p = torch.stack([res["p"][k] for k in space.names])
                m = _component_model(p, res["amps"], obs, b, space, model)[0]
            residual_png(obs.data[b], m, res["var"], obs.use[b], g["name"], rows[-1], Path(cfg.save_plots))
    return rows


def residual_png(data, model, var, use, name: str, row: dict, out: Path) -> Path:
    """Data, best-fit model and normalised residual ``(data - model) / sigma`` of one lens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    d, m = data.cpu().numpy(), model.cpu().numpy()
    z = np.where(use.cpu().numpy(), (d - m) / np.sqrt(var.cpu().numpy()), np.nan)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    vmax = max(float(np.percentile(np.abs(d), 99.5)), 1e-12)
    for ax, im, title in ((axes[0], d, "data"), (axes[1], m, "model")):
        h = ax.imshow(np.arcsinh(im / (0.05 * vmax)), origin="lower", cmap="magma")
        ax.set_title(title, fontsize=9)
    h = axes[2].imshow(z, origin="lower", cmap="RdBu_r", vmin=-5, vmax=5)
    axes[2].set_title("(data − model) / σ", fontsize=9)
    fig.colorbar(h, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{name}: θE = {row['theta_E']:.3f}″, χ²/dof = {row['chi2_dof']:.2f}", fontsize=10)
    fig.tight_layout()
    path = out / (name.split(".")[0] + "_fit.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _starts(cfg, group, obs, pred, truth, rngs, dtype) -> torch.Tensor:
    """Mass starts [B, S, 7] for one batch."""
    S = int(cfg.n_starts)
    if cfg.init == "truth":
        return torch.tensor([truth[g["name"]] for g in group], dtype=dtype)[:, None]
    if cfg.init == "prior":
        return torch.stack([prior_mass(cfg.data, S, r, dtype) for r in rngs])
    torch.manual_seed(int(cfg.seed) * 1_000_003 + group[0]["index"])  # MC-dropout masks
    return cnn_starts(pred, torch.from_numpy(_cnn_inputs(obs)).float(), S, rngs[0]).to(dtype=dtype)


def cnn_starts(pred, images: torch.Tensor, n_starts: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mass starts [B, S, 7] from a :class:`~lensexp.predict.Predictor`'s recalibrated posterior
    for images [B, C, N, N]: its mean first, then ``S - 1`` posterior samples."""
    post = pred.posterior(images, generator)  # [n_samples, B, labels]
    post = post[..., [pred.labels.index(k) for k in MASS]]
    return torch.cat([post.mean(0)[:, None], post[: n_starts - 1].transpose(0, 1)], 1)[:, :n_starts]


def _cnn_inputs(obs: Observation) -> np.ndarray:
    """Network inputs [B, 1, N, N]: the data with excluded pixels zeroed, as ``predict`` does."""
    return (obs.data * obs.use).cpu().numpy()[:, None]


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors

    hydra.main(config_path="../conf", config_name="fit", version_base="1.3")(clean_errors(run))()
