"""Optimisation: batched Adam over every start with profiled amplitudes, L-BFGS polish by
iteratively reweighted fits, and the Laplace approximation (lenstronomy's Sampling room)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from lensexp.fit import pixelated, shapelets
from lensexp.fit.lbfgs import minimise
from lensexp.fit.light import fit_light, ring_starts
from lensexp.fit.model import (
    MASS,
    LensModel,
    Observation,
    ParamSpace,
    amp_names,
    likelihood_terms,
    prior_penalty,
    rho,
    solve_amplitudes,
)
from lensexp.fit.results import off_light, source_shift, warned
from lensexp.fit.starts import init_source
from lensexp.sim.trace import EAGER

log = logging.getLogger(__name__)


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
    light_steps: int = 0  # > 0 (with lens light): fit the light alone first (lensexp.fit.light)
    light_lbfgs_iters: int = 0  # then L-BFGS on the light alone, to convergence (at most this many iterations)
    light_starts: int = 1  # starts of the light-only fit per lens (lensexp.fit.light.LIGHT_START_VARIANTS), best kept
    light_screen_iters: int = 0  # light_starts > 1: L-BFGS iterations per start before the best is finished; 0 = all
    adam_supersample: int | None = None  # rays per pixel per axis while exploring; None = the model's
    adam_half_width: float | None = None  # arcsec: explore and rank starts on the centred cut-out of this half-width
    ring_start: bool = False  # with light_steps: mass starts from the residual ring, not the given ones
    center_sigma: float | None = None  # arcsec: Gaussian prior on mass centre - light centre (with lens light)
    anchored_starts: int = 0  # with lens light and center_sigma: first starts copied onto the light (:func:`anchored`)
    anchor_sigma: float = 0.02  # arcsec: their centre prior while exploring
    anchored_polish: int = 1  # the best distinct anchored starts polished beside the free ones
    shapelets: int | None = None  # n_max of a shapelet source added last (lensexp.fit.shapelets), kept by BIC
    pixels: int | None = None  # nodes per side of a pixelated source fitted last (lensexp.fit.pixelated)
    pixels_when: str = "warned"  # "warned": only for fits the log warns about (lensexp.fit.results.warned); "always"
    positions_floor: float | None = 0.2  # arcsec: least positions threshold of the pixelated stage; None: no penalty
    shear: bool = True  # False: the search keeps the shear, the final model (polish from the best, shapelets) is an SIE
    sie_direct: bool = True  # shear=False: the explored starts polished as SIEs at once (False: the older path below)
    sie_candidates: int = 1  # shear=False, not direct: this many SIE + shear polishes (best first) redone as SIEs


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
    light = None
    # exploration (light-only fit, Adam over every start) may trace fewer rays; ranking and polish use `model`
    ss_explore = fs.adam_supersample or model.ss
    if model.lens_light and fs.light_steps > 0:
        light = light_stage(obs, space, model, fs)
        if fs.ring_start:
            starts = ring_starts(obs, light, model, S, rngs)
        log.debug("light-only fit of %d lenses: %.1f s, robust chi-square per start %s", B, time.perf_counter() - t0,
                  light["chi2"].tolist())  # fmt: skip
    idx = torch.arange(B, device=dev).repeat_interleave(S)
    p0 = torch.zeros(B * S, len(space.names), dtype=dt, device=dev)
    p0[:, : len(MASS)] = starts.reshape(B * S, -1).to(dt)
    jitter = torch.cat([2 * torch.rand(S, 4, generator=r, dtype=dt) - 1 for r in rngs]).to(dev)
    A = min(fs.anchored_starts, S) if light is not None and fs.center_sigma else 0
    p0, jitter, sigma = anchored(p0, jitter, B, S, A, fs, light)
    idx = torch.arange(B, device=dev).repeat_interleave(S + A)
    p0 = init_source(space, p0.clamp(space.lo, space.hi), obs, idx, model, jitter, light)

    # stage 1: Adam over every start at once (in fs.adam_dtype), amplitudes profiled, data-based variance,
    # on the cut-out where the arcs are (the light outside it was fitted above and is refitted in stage 2)
    # (never tighter than 1.6 x the typical theta_E start, so arcs of wide lenses stay inside)
    # each lens on its own cut-out (a batch shares the largest; pixels outside a lens's own are unused),
    # so a lens's fit does not depend on which lenses share its batch
    sides = [arc_npix(model, fs, float(t)) for t in starts[..., 0].median(1).values]
    n_c = max(sides)
    ocut = own_cutouts(obs.crop(n_c), sides)
    coarse = model.like(n_c, ss_explore)
    fine = model.like(n_c)
    o1, s1 = ocut.to(fs.adam_dtype), space.to(fs.adam_dtype)
    u = s1.to_u(p0.to(fs.adam_dtype)).requires_grad_(True)
    opt = torch.optim.Adam([u], lr=fs.adam_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(fs.adam_steps, 1), eta_min=fs.adam_lr / 20)
    w, d = o1.weights()[idx], o1.data[idx]
    n_mass = len(MASS)
    for step in range(fs.adam_steps):
        opt.zero_grad(set_to_none=True)
        loss = _profiled_loss(s1.to_p(u), o1, idx, w, d, s1, coarse, fs.outlier_sigma, sigma)
        loss.sum().backward()
        u.grad.nan_to_num_(0.0, 0.0, 0.0)
        if step < fs.source_steps:  # first fit the light to the starting mass model
            u.grad[:, :n_mass] = 0.0
        opt.step()
        sched.step()
    with torch.no_grad():
        p1 = s1.to_p(u).to(dt).clamp(space.lo, space.hi)
        loss1 = _profiled_loss(p1, ocut, idx, ocut.weights()[idx], ocut.data[idx], space, fine, fs.outlier_sigma, sigma)
    loss1 = torch.where(torch.isfinite(loss1), loss1, torch.full_like(loss1, math.inf)).reshape(B, S + A)
    order = loss1[:, :S].argsort(1)
    shared = (time.perf_counter() - t0) / B
    log.debug(
        "exploration of %d starts (%d steps) done at %.1f s", B * (S + A), fs.adam_steps, time.perf_counter() - t0
    )

    results = []
    for b in range(B):
        t1 = time.perf_counter()
        best, polished = None, []
        direct = not fs.shear and fs.sie_direct
        sp = space.fixing({"gamma1": 0.0, "gamma2": 0.0}) if direct else space
        theta = p1[b * (S + A) : (b + 1) * (S + A), 0].tolist()
        picks = distinct_starts(order[b].tolist(), theta[:S], max(1, fs.polish))
        if A:  # the best distinct anchored starts, polished with the others
            ranked = loss1[b, S:].argsort(stable=True).tolist()
            picks += [S + j for j in distinct_starts(ranked, theta[S:], fs.anchored_polish)]
        for j in picks:
            res = _polish(p1[b * (S + A) + j].clamp(sp.lo, sp.hi), obs, b, sp, model, fs)
            res["start"] = j
            log.debug("lens %d start %d: explored loss %.1f, polished theta_E %.4f nll %.1f", b, j,
                      float(loss1[b, j]), float(res["p"]["theta_E"]), res["nll"])  # fmt: skip
            polished.append(res)
            if best is None or res["nll"] < best["nll"]:
                best = res
        if not fs.shear and not direct:
            rest = sorted((r for r in polished if r is not best), key=lambda r: _finite_or_inf(r["nll"]))
            best, sp = _without_shear([best, *rest][: max(1, fs.sie_candidates)], obs, b, space, model, fs)
        n_sh = 0
        if fs.shapelets is not None:
            best, n_sh = _add_shapelets(best, obs, b, sp, model, fs)
        if needs_pixels(best, fs):
            best = _add_pixels(best, polished, S, obs, b, sp, model, fs)
        if fs.laplace and "px_nle" in best:  # no Laplace approximation of the pixelated source's evidence
            best["std"] = dict.fromkeys(_std_names(sp, model, n_sh), math.nan)
        elif fs.laplace:
            best["std"] = _laplace(best, obs, b, sp, model, fs, n_sh)
        n_free = int(sp.free.sum())
        n_lin = model.K + (n_sh and shapelets.n_basis(n_sh) + 1)
        if "px_n_eff" in best:  # the pixelated source's effective number of parameters replaces the source's
            n_lin = model.K - model.n_src + best["px_n_eff"]
        best["dof"] = max(best["n_pix"] - n_free - n_lin, 1)
        best["seconds"] = shared + time.perf_counter() - t1
        with torch.no_grad():
            # (lensed, intrinsic) flux of the kept shapelets or of the pixelated source that replaces them
            extra = best["sh_flux"] if best.get("sh_n_max") and "px_flux" not in best else (0.0, 0.0)
            extra = best.get("px_flux", extra)
            best["p"]["mu_F"] = model.mu_F({k: v[None] for k, v in best["p"].items()}, best["amps"][None], extra)[0]
        results.append(best)
    return results


def anchored(p: torch.Tensor, jitter: torch.Tensor, B: int, S: int, A: int, fs: FitSettings, light: dict | None):
    """Starts ``p`` [B * S, P] and their ``jitter`` [B * S, 4] followed, per lens, by copies of its
    first ``A`` (the ring start and its first jittered copies) with the mass centre moved onto the
    light-only fit's, and the centre prior of each start: ``fs.center_sigma`` for the free starts,
    ``fs.anchor_sigma`` for the copies, which explore with the mass tied to the light. Returns
    ``(p, jitter, sigma)``. The free starts can all drift into a basin where the mass sits off the
    light with a neighbour galaxy taken for an image (SLACS J1134 at seed 2: 0.9" off, theta_E
    +34 %, -ln posterior 382 worse than its anchored fit); the ``fs.anchored_polish`` best
    distinct anchored starts are polished beside them under the same posterior, so such a basin
    is kept only when it is the more probable."""
    if not A:
        return p, jitter, fs.center_sigma

    def with_copies(t: torch.Tensor) -> torch.Tensor:
        q = t.reshape(B, S, -1)
        return torch.cat([q, q[:, :A]], 1).reshape(B * (S + A), -1)

    p, jitter = with_copies(p), with_copies(jitter)
    centre = light["p"][:, [light["names"].index("ll_x"), light["names"].index("ll_y")]]
    p.view(B, S + A, -1)[:, S:, 3:5] = centre[:, None].to(p)  # columns 3, 4 of MASS: the mass centre
    sigma = torch.tensor([fs.center_sigma] * S + [fs.anchor_sigma] * A, dtype=torch.float64, device=p.device)
    return p, jitter, sigma.repeat(B)


def light_stage(obs: Observation, space: ParamSpace, model: LensModel, fs: FitSettings) -> dict:
    """The light-only fit as :func:`fit_batch` runs it first (:func:`lensexp.fit.light.fit_light`
    in ``fs.adam_dtype`` with the exploration's supersampling); ``p`` and ``image`` returned in
    ``obs``'s dtype."""
    whole = model.like(supersample=fs.adam_supersample or model.ss)
    light = fit_light(
        obs.to(fs.adam_dtype),
        space.to(fs.adam_dtype),
        whole,
        fs.light_steps,
        fs.adam_lr,
        fs.outlier_sigma,
        fs.light_lbfgs_iters,
        fs.light_starts,
        fs.light_screen_iters,
    )
    dt = obs.data.dtype
    return {**light, "p": light["p"].to(dt), "image": light["image"].to(dt)}


def _finite_or_inf(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else math.inf


def _without_shear(cands: list[dict], obs, b: int, space, model, fs) -> tuple[dict, ParamSpace]:
    """The SIE model (``mass_model=sie``): each SIE + shear fit of ``cands`` (best first; the
    ``lbfgs.sie_candidates`` best) polished again with the shear set and held at zero; the best
    SIE ``-ln L`` is kept. Searching with the shear free and dropping it last keeps the basins the
    richer model found (an SIE search alone let lens-light and source structure pull the mass
    centre or grow the source instead); the best SIE + shear fit need not give the best SIE.
    Returns the result and the space with the shear fixed."""
    sp = space.fixing({"gamma1": 0.0, "gamma2": 0.0})
    best = None
    for c in cands:
        p0 = torch.stack([c["p"][n] for n in space.names]).clamp(sp.lo, sp.hi)
        res = _polish(p0, obs, b, sp, model, fs)
        res["start"] = c["start"]
        log.debug("lens %d start %d: SIE + shear -ln L %.1f, SIE %.1f, theta_E %.4f", b, c["start"], c["nll"],
                  res["nll"], float(res["p"]["theta_E"]))  # fmt: skip
        if best is None or res["nll"] < best["nll"]:
            best = res
    return best, sp


def _add_shapelets(best: dict, obs, b: int, space, model, fs) -> tuple[dict, int]:
    """The shapelet stage (:func:`shapelets.refine`) from the polished best; kept when the BIC
    prefers it. Returns the result (with ``sh_n_max``, ``sh_dnll``, ``sh_theta_E0`` - the Sérsic-
    source fit's theta_E the stage started from - and ``p['sh_beta']``, NaN when not kept) and
    the adopted n_max (0: not kept)."""
    n_max = int(fs.shapelets)
    fov = model.npix * model.pixscale
    n_sh = arc_npix(model, fs, float(best["p"]["theta_E"]))  # drawn where the arcs are, as Adam explores
    sh = shapelets.refine(best, obs, b, space, model, fs, n_max, (model.pixscale / 4, fov / 8), n_sh)
    gain = best["nll"] - sh["nll"]
    keep = gain > shapelets.bic_threshold(n_max, best["n_pix"])
    log.debug("lens %d shapelets n_max %d: -ln L %.1f better (kept: %s)", b, n_max, gain, keep)
    out = sh if keep else best
    out.update(sh_n_max=n_max if keep else 0, sh_dnll=gain, sh_npix=n_sh, sh_theta_E0=float(best["p"]["theta_E"]))
    out["p"].setdefault("sh_beta", torch.tensor(math.nan, dtype=obs.data.dtype))
    out["start"] = best["start"]
    return out, n_max if keep else 0


def needs_pixels(best: dict, fs: FitSettings) -> bool:
    """Whether the fit ``best`` goes on to the pixelated source: with ``fs.pixels``, always
    (``pixels_when='always'``) or when the log warns about it (``'warned'``: its shapelets moved
    theta_E by > 5 % or its mass left the light, :func:`lensexp.fit.results.warned`): the fits
    whose source model is the suspect."""
    if not fs.pixels:
        return False
    return fs.pixels_when == "always" or warned(source_shift(best), off_light(best["p"]))


def _add_pixels(best: dict, polished: list[dict], S: int, obs, b: int, space, model, fs) -> dict:
    """The pixelated stage (:func:`pixelated.refine`) from the best fit and, when another won the
    polish of the anchored starts (mass on the light), from that one too; the more probable by
    the evidence is kept (columns ``px_*``)."""
    cands = [best]
    anchored_fits = [r for r in polished if r["start"] >= S and r["start"] != best["start"]]
    if anchored_fits:
        cands.append(min(anchored_fits, key=lambda r: _finite_or_inf(r["nll"])))
    n_c = arc_npix(model, fs, float(best["p"]["theta_E"]))
    out = pixelated.refine(cands, obs, b, space, model, fs, int(fs.pixels), n_c)
    log.debug("lens %d pixelated source (%d^2 nodes): theta_E %.4f from %.4f, -ln E %.1f, ln lambda %.2f", b,
              fs.pixels, float(out["p"]["theta_E"]), out["px_theta_E0"], out["px_nle"], out["px_log_lam"])  # fmt: skip
    return out


def distinct_starts(order: list[int], theta_E: list[float], k: int, min_sep: float = 0.05) -> list[int]:
    """``k`` starts to polish, best first (``order``: by exploration loss): the best, then the next
    best whose theta_E differs by more than ``min_sep`` (relative) from every one taken, so the
    polish samples different rings rather than one basin twice; filled up in loss order when
    there are fewer distinct ones."""
    picked: list[int] = []
    for j in order:
        if len(picked) < k and all(abs(theta_E[j] / theta_E[i] - 1) > min_sep for i in picked):
            picked.append(j)
    picked += [j for j in order if j not in picked][: k - len(picked)]
    return picked


def arc_npix(model: LensModel, fs: FitSettings, theta_E: float) -> int:
    """Side [px] of the centred cut-out where a lens of ``theta_E`` [arcsec] has its arcs: half-width
    ``fs.adam_half_width``, never under 1.6 theta_E (so arcs of wide lenses stay inside); the whole
    grid when it is None. Adam explores, the shapelets and the pixelated source are drawn there."""
    return explore_npix(model, fs.adam_half_width and max(fs.adam_half_width, 1.6 * theta_E))


def explore_npix(model: LensModel, half_width: float | None) -> int:
    """Side [px] of the centred cut-out explored by Adam: ``2 half_width / pixscale`` rounded up
    to the grid's parity, at most the grid (``None``: the whole grid)."""
    if not half_width:
        return model.npix
    n = math.ceil(2 * half_width / model.pixscale)
    n += (model.npix - n) % 2
    return min(n, model.npix)


def own_cutouts(obs: Observation, sides: list[int]) -> Observation:
    """``obs`` (a centred cut-out) with only each lens's centred ``sides[b]`` x ``sides[b]``
    pixels in use."""
    n = obs.data.shape[-1]
    keep = torch.zeros_like(obs.use)
    for b, s in enumerate(sides):
        k = (n - s) // 2
        keep[b, k : n - k, k : n - k] = True
    return Observation(obs.data, obs.use & keep, obs.psf, obs.bg_var, obs.inv_t)


def _profiled_loss(p, obs, idx, w, d, space, model, outlier_sigma, center_sigma=None):
    """Stage-1 loss [M]: robust chi-square with data-based weights ``w``, amplitudes solved by
    weighted least squares (outliers of the current model down-weighted, as in IRLS), plus the
    priors (:func:`prior_penalty`: mass centre near the light, mass |e| < 0.7)."""
    pd = space.as_dict(p)
    T = model.templates(pd, obs.psf[idx])
    amps = solve_amplitudes(T, d, w)
    z2 = w * (d - (amps[:, :, None, None] * T).sum(1)) ** 2
    if outlier_sigma:
        inlier = torch.exp(-0.5 * z2.detach() + rho(z2.detach(), outlier_sigma))  # P(inlier | z)
        amps = solve_amplitudes(T, d, w * inlier)
        z2 = w * (d - (amps[:, :, None, None] * T).sum(1)) ** 2
    return (rho(z2, outlier_sigma) * (w > 0)).sum((1, 2)) + prior_penalty(pd, center_sigma)


def _component_model(p, amps, obs, b, space, model):
    """Model image [1, N, N] of lens ``b`` for physical parameters p [P] and amplitudes [K]."""
    T = model.templates(space.as_dict(p[None]), obs.psf[b : b + 1])
    return (amps[None, :, None, None] * T).sum(1)


def _lens_loss(p, amps, w, obs, b, space, model, outlier_sigma, center_sigma):
    """``-ln`` posterior of lens ``b`` for physical parameters p [P] and amplitudes [K] with the
    pixel weights ``w`` held fixed: robust chi-square plus the priors (what the polish
    minimises and the Laplace approximation differentiates)."""
    d, use = obs.data[b : b + 1], obs.use[b : b + 1]
    chi = (rho(w * (d - _component_model(p, amps, obs, b, space, model)) ** 2, outlier_sigma) * use).sum()
    return chi + prior_penalty(space.as_dict(p), center_sigma)


def _polish(p_start, obs, b, space, model, fs):
    """L-BFGS from one start, amplitudes free, by iteratively reweighted fits: each round
    minimises the robust chi-square with the pixel variance of the previous round's model held
    fixed (the model's own noise, ``Observation.variance``), so a noiseless image is fitted
    exactly and the estimate is unbiased for noisy ones; one round when the variance does not
    depend on the model (a noise map without a Poisson term). Returns parameters, amplitudes and
    :func:`likelihood_terms` with the final model's variance."""
    d, use, sl = obs.data[b : b + 1], obs.use[b : b + 1], slice(b, b + 1)
    with torch.no_grad():
        T = model.templates(space.as_dict(p_start[None]), obs.psf[sl])
        amps = solve_amplitudes(T, d, use / obs.variance(d, sl))[0]  # first weights: the data's
        var = obs.variance((amps[None, :, None, None] * T).sum(1), sl)
    u = space.to_u(p_start).clone().requires_grad_(True)
    la = torch.log(amps.clamp(min=1e-30)).clone().requires_grad_(True)
    # a variance without the model's Poisson term (noise maps, inv_t = 0) is fixed: one round is the fit
    rounds = fs.irls_rounds if float(obs.inv_t[b]) > 0 else 1
    for _ in range(rounds):
        w = use / var
        loss = lambda w=w: _lens_loss(  # noqa: E731
            space.to_p(u), torch.exp(la), w, obs, b, space, model, fs.outlier_sigma, fs.center_sigma
        )
        minimise([u, la], loss, fs.lbfgs_iters)
        with torch.no_grad():
            m = _component_model(space.to_p(u), torch.exp(la), obs, b, space, model)
            var = obs.variance(m, sl)
    with torch.no_grad():
        terms = likelihood_terms(m, d, use, var, fs.outlier_sigma)
        p_fit = space.as_dict(space.to_p(u).detach())
        terms["nll"] = terms["nll"] + prior_penalty(p_fit, fs.center_sigma)  # -ln posterior: ranks the polished starts
    return {
        "p": p_fit,
        "amps": torch.exp(la).detach(),
        **{k: (float(v[0]) if v.is_floating_point() else int(v[0])) for k, v in terms.items()},
        "var": var[0],
    }


def _laplace(res, obs, b, space, model, fs, n_sh: int = 0) -> dict:
    """Laplace approximation: std of each physical parameter (amplitudes included) from the
    inverse Hessian of the fitted loss (centre prior included) at the optimum, pixel variance
    held at the model's; with kept shapelets (``n_sh``) their scale joins, the coefficients
    profiled."""
    x0 = torch.cat([torch.stack([res["p"][n] for n in space.names]), res["amps"]]).detach()
    P, w = len(space.names), obs.use[b : b + 1] / res["var"]
    args = (obs, b, space, model.like(pw=EAGER))  # a Hessian: second derivatives, eager
    if n_sh:
        x0 = torch.cat([x0, res["p"]["sh_beta"].reshape(1).to(x0)])
        f = lambda x: shapelets.profiled_loss(x, w, *args, n_sh, fs.outlier_sigma, fs.center_sigma, res["sh_npix"])  # noqa: E731
    else:
        f = lambda x: _lens_loss(x[:P], x[P:], w, *args, fs.outlier_sigma, fs.center_sigma)  # noqa: E731
    H = torch.autograd.functional.hessian(f, x0)
    free = torch.cat([space.free, torch.ones(x0.numel() - P, dtype=torch.bool, device=x0.device)])
    std = torch.zeros_like(x0)  # fixed parameters (e.g. the shear of an SIE): no spread
    try:
        std[free] = torch.cholesky_inverse(torch.linalg.cholesky(H[free][:, free])).diagonal().sqrt()
    except torch.linalg.LinAlgError:  # not positive definite: no Gaussian approximation
        std[free] = math.nan
    return {n: float(s) for n, s in zip(_std_names(space, model, n_sh), std)}


def _std_names(space, model, n_sh: int) -> list[str]:
    """Names of the Laplace approximation's std entries, in its order."""
    return list(space.names) + amp_names(model.n_light, model.n_src, model.n_comp) + (["sh_beta"] if n_sh else [])
