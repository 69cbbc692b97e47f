"""Lens light first: a light-only fit of the lens galaxy, and mass starts from the ring it leaves.

Real lenses (SLACS) are bright ellipticals whose arcs are a few per cent of the peak: a joint fit
started from prior draws mostly fits the galaxy. As modellers do by hand, the light is fitted
alone first (``n_light`` concentric elliptical Sérsics from moment-based starts: a de
Vaucouleurs-like body at the half-light radius, a core at 0.3x and an exponential envelope at
3x it; amplitudes profiled, arcs down-weighted as outliers), then the mass is started from the
ring the light model leaves in the residual: theta_E at the flux-weighted median radius of the
significant positive residual pixels around the light centre, the mass centre and ellipticity
from the light.
"""

from __future__ import annotations

import logging
import math

import torch

from lensexp.fit.lbfgs import minimise
from lensexp.fit.model import (
    LensModel,
    Observation,
    ParamSpace,
    extra_light_starts,
    light_names,
    rho,
    solve_amplitudes,
)
from lensexp.sim.trace import pixel_grid

log = logging.getLogger(__name__)


def weighted_median(values: torch.Tensor, weights: torch.Tensor, q: float = 0.5) -> torch.Tensor:
    """Per image [B] the weighted median (``q`` quantile) of ``values`` [B, N, N] under ``weights``
    >= 0 [B, N, N]."""
    v, w = values.flatten(1), weights.flatten(1)
    order = v.argsort(1)
    cum = torch.gather(w, 1, order).cumsum(1)
    k = (cum / cum[:, -1:].clamp(min=1e-30) < q).sum(1).clamp(max=v.shape[1] - 1)
    return torch.gather(v, 1, order)[torch.arange(len(v)), k]


def moment_start(obs: Observation, model: LensModel) -> dict:
    """Light starts per lens [B]: centroid, ellipticity (lenstronomy e1, e2 from the flux-weighted
    second moments) and half-light radius of the positive flux within a third of the field."""
    x, y = pixel_grid(model.npix, model.pixscale, 1, obs.data.dtype, obs.data.device)
    fov = model.npix * model.pixscale
    w = (obs.data.clamp(min=0) * obs.use) * (torch.hypot(x, y) < fov / 3)
    tot = w.sum((1, 2)).clamp(min=1e-30)
    cx, cy = (w * x).sum((1, 2)) / tot, (w * y).sum((1, 2)) / tot
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    q11, q22, q12 = ((w * a * b).sum((1, 2)) / tot for a, b in ((dx, dx), (dy, dy), (dx, dy)))
    det = (q11 * q22 - q12**2).clamp(min=0)
    denom = q11 + q22 + 2 * torch.sqrt(det)
    e1, e2 = (q11 - q22) / denom, 2 * q12 / denom  # = (1 - q) / (1 + q) (cos 2phi, sin 2phi)
    half = weighted_median(torch.hypot(dx, dy), w)
    return {"ll_x": cx, "ll_y": cy, "e1": 0.7 * e1, "e2": 0.7 * e2, "R": half.clamp(min=2 * model.pixscale)}


# light_starts > 1: the first component's start (half-light radius factor, Sérsic n), tried in this
# order (the further components follow it as in EXTRA_LIGHT_STARTS): the light fit of bright
# ellipticals has several local optima, and which one a single start reaches moved with float
# rounding alone (SLACS J0822: robust chi-square 13 445 against 14 026, both converged)
LIGHT_START_VARIANTS = ((1.0, 4.0), (0.6, 6.0), (1.6, 2.5))


def _light_columns(space: ParamSpace, n_light: int) -> list[int]:
    return [space.names.index(n) for n in light_names(n_light)]


def fit_light(
    obs: Observation,
    space: ParamSpace,
    model: LensModel,
    steps: int,
    lr: float,
    outlier_sigma,
    lbfgs_iters: int = 0,
    n_starts: int = 1,
    screen_iters: int = 0,
) -> dict:
    """Light-only fit of every lens, Adam (``steps``) then, with ``lbfgs_iters``, L-BFGS lens by
    lens in float64 to convergence: ``p`` [B, n light parameters] (physical, in the order of
    :func:`~lensexp.fit.model.light_names`) and the model ``image`` [B, N, N] (``obs``'s dtype).
    With ``n_starts`` > 1 each lens is fitted from the first ``n_starts`` of
    :data:`LIGHT_START_VARIANTS` and the lowest robust chi-square is kept; with ``screen_iters``
    (0 < screen_iters < lbfgs_iters) every start gets only that many L-BFGS iterations and the
    best one per lens is then finished (to ``lbfgs_iters`` in all), so the extra starts cost a
    screen, not a whole fit.

    Adam alone is far from converged after a few hundred steps on bright ellipticals (SLACS: the
    loss still fell by 300-1 700 between 150 and 1 500 steps), and the mass fit inherits that
    light as its start: the L-BFGS finish reaches the light's optimum in a fraction of the time."""
    B, variants = obs.data.shape[0], LIGHT_START_VARIANTS[: max(int(n_starts), 1)]
    m0 = moment_start(obs, model)
    names = light_names(model.n_light)
    cols = _light_columns(space, model.n_light)
    lo, hi = space.lo[cols], space.hi[cols]
    p0 = []
    for r_factor, n_sersic in variants:
        start = {"ll_x": m0["ll_x"], "ll_y": m0["ll_y"], "ll_R": r_factor * m0["R"]}
        start["ll_n"] = torch.full_like(m0["R"], n_sersic)
        start.update({"ll_e1": m0["e1"], "ll_e2": m0["e2"]})
        start.update(extra_light_starts(start, model.n_light))
        p0.append(torch.stack([start[n] for n in names], 1))
    p0 = torch.stack(p0, 1).reshape(B * len(variants), -1).clamp(lo, hi)  # lens-major: lens b's starts together
    obs = obs.select(torch.arange(B, device=p0.device).repeat_interleave(len(variants)))
    u = torch.logit(((p0 - lo) / (hi - lo)).clamp(1e-6, 1 - 1e-6)).requires_grad_(True)
    w, d = obs.weights(), obs.data
    opt = torch.optim.Adam([u], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        light_loss(u, lo, hi, model, names, obs.psf, d, w, outlier_sigma)[0].sum().backward()
        u.grad.nan_to_num_(0.0, 0.0, 0.0)
        opt.step()
    u = u.detach()
    screen = lbfgs_iters
    if len(variants) > 1 and screen_iters > 0:
        screen = min(int(screen_iters), lbfgs_iters)
    if lbfgs_iters > 0:
        o64 = obs.to(torch.float64)
        fit = lambda b, n: _light_lbfgs(u[b], o64, b, lo, hi, model, names, outlier_sigma, n)  # noqa: E731
        u = torch.stack([fit(b, screen) for b in range(len(u))])
    S = len(variants)
    loss = lambda u: light_loss(u, lo, hi, model, names, obs.psf, d, w, outlier_sigma)  # noqa: E731
    with torch.no_grad():
        chi, p, image = loss(u)
    best = torch.arange(B, device=chi.device) * S + chi.reshape(B, S).nan_to_num(math.inf).argmin(1)
    if 0 < screen < lbfgs_iters:  # finish the screen's winner of each lens
        u = u.clone()
        for b in best.tolist():
            u[b] = fit(b, lbfgs_iters - screen)
        with torch.no_grad():
            chi, p, image = loss(u)
    return {"p": p[best], "image": image[best], "names": names, "chi2": chi.reshape(B, S)}


def light_loss(u, lo, hi, model: LensModel, names, psf, d, w, outlier_sigma):
    """(robust chi-square per lens [B], physical parameters [B, P], model image [B, N, N])
    of the light alone at unconstrained parameters ``u`` [B, P] (box ``lo``-``hi``), amplitudes
    profiled by weighted least squares."""
    p = lo + (hi - lo) * torch.sigmoid(u)
    T = model.light_templates(dict(zip(names, p.unbind(1))), psf)
    amps = solve_amplitudes(T, d, w)
    image = (amps[:, :, None, None] * T).sum(1)
    return (rho(w * (d - image) ** 2, outlier_sigma) * (w > 0)).sum((1, 2)), p, image


def _light_lbfgs(u0, o64: Observation, b: int, lo, hi, model: LensModel, names, outlier_sigma, iters: int):
    """Unconstrained light parameters [P] of lens ``b`` after L-BFGS (strong Wolfe) on its
    profiled robust chi-square from ``u0``, in float64 (``o64``: the observation in float64);
    returned in ``u0``'s dtype."""
    f64 = torch.float64
    d, w, psf = o64.data[b : b + 1], o64.weights()[b : b + 1], o64.psf[b : b + 1]
    lo, hi = lo.to(f64), hi.to(f64)
    u = u0.to(f64)[None].clone().requires_grad_(True)
    loss = lambda: light_loss(u, lo, hi, model, names, psf, d, w, outlier_sigma)[0].sum()  # noqa: E731
    n_iter, n_eval = minimise([u], loss, iters, tolerance_grad=1e-7)
    log.debug("light L-BFGS of start %d: %d iterations (of %d), %d evaluations", b, n_iter, iters, n_eval)
    return u.detach()[0].to(u0.dtype)


def ring_theta_E(
    obs: Observation, light: dict, model: LensModel, min_radius: float = 0.3, quantile: float | torch.Tensor = 0.5
) -> torch.Tensor:
    """theta_E starts [B] (or [B, Q] for ``Q`` quantiles): flux-weighted median (quantile) radius,
    around the light centre, of the residual pixels above 3 sigma between ``min_radius`` arcsec
    and the field's edge (the arcs); the field's quarter when there are none."""
    x, y = pixel_grid(model.npix, model.pixscale, 1, obs.data.dtype, obs.data.device)
    fov = model.npix * model.pixscale
    p = dict(zip(light["names"], light["p"].unbind(1)))
    r = torch.hypot(x - p["ll_x"][:, None, None], y - p["ll_y"][:, None, None])
    resid = obs.data - light["image"]
    z = resid * torch.sqrt(obs.weights())
    sel = (z > 3) & obs.use & (r > max(min_radius, 3 * model.pixscale)) & (r < fov / 2 - 2 * model.pixscale)
    wt = torch.where(sel, resid, torch.zeros_like(resid))
    qs = torch.as_tensor(quantile, dtype=r.dtype).reshape(-1)
    theta = torch.stack([weighted_median(r, wt, float(q)) for q in qs], -1)
    theta = torch.where(wt.sum((1, 2))[:, None] > 0, theta, torch.full_like(theta, fov / 4))
    return theta if torch.is_tensor(quantile) else theta[:, 0]


def ring_starts(obs: Observation, light: dict, model: LensModel, n_starts: int, rngs) -> torch.Tensor:
    """Mass starts [B, S, 7]: the ring's theta_E (median radius of the residual flux), the light's
    centre and (damped) ellipticity and no shear first, then ``S - 1`` jittered copies (e +- 0.1,
    centre +- 0.03", shear +- 0.05) whose theta_E run over the quantiles 0.15-0.85 of the residual
    flux's radii (x exp(N(0, 0.1))): arcs, counter-images and light-model residuals sit at
    different radii, and the median alone can fall between them."""
    p = dict(zip(light["names"], light["p"].unbind(1)))
    qs = torch.linspace(0.15, 0.85, max(n_starts - 1, 1), dtype=obs.data.dtype)
    radii = ring_theta_E(obs, light, model, quantile=torch.cat([torch.tensor([0.5], dtype=qs.dtype), qs]))
    theta = radii[:, 0]
    base = torch.stack(
        [
            theta,
            0.7 * p["ll_e1"],
            0.7 * p["ll_e2"],
            p["ll_x"],
            p["ll_y"],
            torch.zeros_like(theta),
            torch.zeros_like(theta),
        ],
        1,
    )
    out = []
    for b, g in enumerate(rngs):
        n = torch.randn(max(n_starts - 1, 0), 7, generator=g, dtype=base.dtype).to(base.device)
        jit = base[b].expand(len(n), 7).clone()
        jit[:, 0] = radii[b, 1 : len(n) + 1] * torch.exp(0.1 * n[:, 0])
        jit[:, 1:3] += 0.1 * n[:, 1:3]
        jit[:, 3:5] += 0.03 * n[:, 3:5]
        jit[:, 5:7] = 0.05 * torch.tanh(n[:, 5:7])
        out.append(torch.cat([base[b : b + 1], jit])[:n_starts])
    return torch.stack(out)


def place_light(p: torch.Tensor, space: ParamSpace, light: dict, idx: torch.Tensor) -> torch.Tensor:
    """Copy the light-only fit into the light columns of starts ``p`` [M, P] (``idx``: lens of each)."""
    p = p.clone()
    p[:, [space.names.index(n) for n in light["names"]]] = light["p"][idx].to(p.dtype)
    return p
