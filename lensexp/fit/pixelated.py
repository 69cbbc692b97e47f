"""A pixelated, regularised source: the fit's optional last stage (``source_pixels=N``).

The source is an ``N`` x ``N`` grid of nodes in the source plane [e-/s per arcsec^2], read by
bilinear interpolation at every traced ray (Warren & Dye 2003; Suyu et al. 2006). The node values
and the amplitudes of the unlensed components (lens light, companions) are linear: for given
mass and light shapes they are solved at once, with a gradient regularisation of strength
``lambda`` on the nodes (``lambda s^T H s``, ``H = Dx^T Dx + Dy^T Dy``, differences to zero beyond
the grid's edge, so ``H`` is positive definite). The non-linear parameters and ``ln lambda`` are
chosen by the Bayesian evidence of the linear inversion (Suyu et al. 2006, eq. 19) with flat
priors on the unregularised amplitudes:

``-ln E = chi^2 / 2 + lambda s^T H s / 2 + ln det(F + R) / 2 - N^2 ln(lambda) / 2 - ln det(H) / 2
+ sum ln(2 pi var) / 2``

(``F = X^T W X`` for the design matrix ``X``, ``R`` = ``lambda H`` on the nodes, 0 elsewhere), which
penalises a source that is more complex than the data need, so a flexible source does not
simply absorb any misfit. The grid covers the source-plane positions of the pixels where the
starting model's lensed source is brighter than the noise, and stays fixed during the stage.
The multiple images of a bright source point of the start may not be traced apart
(:mod:`lensexp.fit.positions`), which rules out the demagnified-source modes of a flexible source.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from lensexp.fit.lbfgs import minimise
from lensexp.fit.model import MASS, likelihood_terms, prior_penalty
from lensexp.fit.positions import penalty_from, traced
from lensexp.sim.trace import convolve_psf, subpixel_planes

log = logging.getLogger(__name__)


def regularisation(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Gradient regularisation matrix ``H`` [n^2, n^2] of an ``n`` x ``n`` node grid (row-major,
    row = y): squared differences between horizontal and vertical neighbours and of each edge
    node to zero beyond the grid (positive definite)."""
    eye = torch.eye(n, dtype=dtype, device=device)
    d = eye - torch.diag(torch.ones(n - 1, dtype=dtype, device=device), -1)  # (D s)_i = s_i - s_{i-1}, s_{-1} = 0
    d = torch.cat([d, -eye[-1:]])  # and 0 - s_{n-1}: the far edge
    dtd = d.T @ d
    return torch.kron(eye, dtd) + torch.kron(dtd, eye)


def source_grid(bx: torch.Tensor, by: torch.Tensor, weight: torch.Tensor, n: int, reach: float = 3.0):
    """``(x0, y0, step)`` of an ``n`` x ``n`` node grid [arcsec] centred on the ``weight``-ed mean of
    the traced positions ``bx, by`` [P] of the arc pixels, reaching ``reach`` times their
    ``weight``-ed rms offset along the wider axis (at least 0.1"): the nodes go where the source's
    light is, not to the faint wings that a largest offset would chase."""
    w = weight / weight.sum()
    cx, cy = (w * bx).sum(), (w * by).sum()
    rms = torch.maximum((w * (bx - cx) ** 2).sum(), (w * (by - cy) ** 2).sum()).sqrt()
    half = (reach * rms).clamp(min=0.1)
    step = 2 * half / (n - 1)
    return cx - half, cy - half, step


def bilinear_mapping(bx, by, pix, n_pix: int, grid, n: int, scale: float) -> torch.Tensor:
    """Mapping [n^2, n_pix]: image pixel ``pix[r]`` gets ``scale`` times the bilinear weights of
    ray ``r`` at source position ``(bx[r], by[r])`` on the ``grid`` = (x0, y0, step) nodes. Beyond
    the grid the source is zero, read through a ring of zero nodes, so a ray leaving the grid
    fades out continuously (no jump in the likelihood as the mass moves). Differentiable in
    ``bx``, ``by`` and the grid."""
    x0, y0, step = grid
    fx, fy = (bx - x0) / step, (by - y0) / step
    i0, j0 = fx.detach().floor(), fy.detach().floor()
    near = (i0 >= -1) & (i0 <= n - 1) & (j0 >= -1) & (j0 <= n - 1)
    fx, fy, i0, j0, p = fx[near], fy[near], i0[near].long(), j0[near].long(), pix[near]
    tx, ty = fx - i0, fy - j0
    rows, cols, vals = [], [], []
    for di, dj, wt in ((0, 0, (1 - tx) * (1 - ty)), (1, 0, tx * (1 - ty)), (0, 1, (1 - tx) * ty), (1, 1, tx * ty)):
        i, j = i0 + di, j0 + dj
        real = (i >= 0) & (i < n) & (j >= 0) & (j < n)  # the zero ring carries nothing
        rows.append((j * n + i)[real])
        cols.append(p[real])
        vals.append(scale * wt[real])
    M = torch.zeros(n * n, n_pix, dtype=bx.dtype, device=bx.device)
    return M.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(vals), accumulate=True)


def lensed_nodes(p: dict, grid, n: int, npix: int, model, psf, margin: int):
    """Unit-node images of lens ``p`` (scalars) on the centred ``npix`` grid, drawn on the square
    box around the pixels whose rays reach the nodes, widened by ``margin`` pixels (the PSF's
    half-width, so the convolution inside the box is the whole grid's): (PSF-convolved
    [n^2, P_box], before the PSF [n^2, P_box], the box pixels' flat indices in the grid [P_box])."""
    dt, dev = p["theta_E"].dtype, p["theta_E"].device
    x, y = subpixel_planes(npix, model.pixscale, model.ss, dt, dev)
    bx, by = traced(p, x, y, model.pw)
    pix = torch.arange(npix * npix, device=dev).repeat(model.ss**2)
    with torch.no_grad():  # the box: pixels with a ray within a cell of the grid (the zero ring included)
        x0, y0, step = grid
        fx, fy = (bx - x0) / step, (by - y0) / step
        hit = pix[(fx >= -1) & (fx < n) & (fy >= -1) & (fy < n)]
        if hit.numel():
            rows, cols = hit // npix, hit % npix
            r0, r1, c0, c1 = int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())
        else:
            r0 = r1 = c0 = c1 = npix // 2
        side = min(max(r1 - r0, c1 - c0) + 1 + 2 * margin, npix)
        r0 = min(max((r0 + r1) // 2 - side // 2, 0), npix - side)
        c0 = min(max((c0 + c1) // 2 - side // 2, 0), npix - side)
        r, c = pix // npix - r0, pix % npix - c0
        inbox = (r >= 0) & (r < side) & (c >= 0) & (c < side)
        idx = ((torch.arange(side, device=dev) + r0)[:, None] * npix + torch.arange(side, device=dev) + c0).flatten()
    box_pix = (r * side + c)[inbox]
    M = bilinear_mapping(bx[inbox], by[inbox], box_pix, side * side, grid, n, (model.pixscale / model.ss) ** 2)
    return convolve_psf(M.reshape(-1, side, side), psf).flatten(1), M, idx


def evidence(S, idx, U, d, w, H, log_lam, logdet_H, var_term):
    """``-ln E`` (module docstring) and the solution: node images S [n^2, P_box] on the pixels
    ``idx`` [P_box] (zero elsewhere), unregularised component images U [K, P], data d [P],
    weights w [P] (0 = unused), ``H`` [n^2, n^2]. Returns (-ln E, node values [n^2], amplitudes
    [K], model [P], Cholesky factor of F + R)."""
    ns = S.shape[0]
    Sw, Uw = S * w[idx], U * w
    SU = Sw @ U[:, idx].T
    G = torch.cat([torch.cat([Sw @ S.T, SU], 1), torch.cat([SU.T, Uw @ U.T], 1)])
    lam = torch.exp(log_lam)
    R = torch.zeros_like(G)
    R[:ns, :ns] = lam * H
    eye = torch.eye(len(G), dtype=G.dtype, device=G.device)
    G = G + R + 1e-10 * G.diagonal().amax().detach() * eye
    L = torch.linalg.cholesky(G)
    x = torch.cholesky_solve(torch.cat([Sw @ d[idx], Uw @ d])[:, None], L)[:, 0]
    s = x[:ns]
    m = (x[ns:] @ U).index_add(0, idx, s @ S)
    chi2 = (w * (d - m) ** 2).sum()
    nle = 0.5 * (chi2 + lam * s @ (H @ s)) + L.diagonal().log().sum() - 0.5 * ns * log_lam - 0.5 * logdet_H + var_term
    return nle, s, x[ns:], m, L


def _no_penalty(p: dict) -> float:
    return 0.0


class PixelatedStage:
    """The stage for one lens ``b`` of ``obs`` on its centred ``npix`` cut-out, from the result
    dict ``start`` (:func:`lensexp.fit.optimise.fit_batch`'s): see :meth:`run`."""

    def __init__(self, obs, b: int, space, model, fs, n: int, npix: int):
        self.cut = obs.crop(npix)
        self.b, self.space, self.n, self.fs = b, space, int(n), fs
        self.model = model.like(self.cut.data.shape[-1])
        self.H = regularisation(self.n, obs.data.dtype, obs.data.device)
        self.logdet_H = float(torch.linalg.slogdet(self.H)[1])
        self.margin = obs.psf.shape[-1] // 2

    def _unlensed(self, pd: dict, psf) -> torch.Tensor:
        """Lens light and companions [K, P] of the cut-out."""
        m, parts = self.model, []
        if m.lens_light:
            parts.append(m.light_templates(pd, psf)[0])
        if m.n_comp:
            parts.append(m.companion_templates(pd, psf)[0])
        if not parts:
            return torch.zeros(0, m.npix * m.npix, dtype=pd["theta_E"].dtype, device=pd["theta_E"].device)
        return torch.cat(parts).flatten(1)

    def grid_for(self, start: dict):
        """Source grid from the start's lensed source (pixels above 1 sigma traced back) and the
        image-plane positions [K, 2] (x, y; arcsec) of those pixels, brightest first."""
        b, m, cut = self.b, self.model, self.cut
        pd = {k: v.reshape(1) for k, v in start["p"].items()}
        src = (start["amps"][: m.n_src, None, None] * m.source_templates(pd, cut.psf[b : b + 1])[0]).sum(0)
        if start.get("sh_image") is not None:
            src = src + self._centred(start["sh_image"])
        sigma = self._centred(start["var"]).sqrt()
        arc = (src > sigma) & cut.use[b]
        if int(arc.sum()) < 4:  # too faint to see: the brightest quarter of the lensed source
            arc = src >= src.quantile(0.75)
        x, y = subpixel_planes(m.npix, m.pixscale, 1, src.dtype, src.device)
        bx, by = traced(start["p"], x, y, m.pw)
        bright = torch.argsort(torch.where(arc, src, -math.inf).flatten(), descending=True)[: int(arc.sum())]
        peaks = torch.stack([x[bright], y[bright]], 1)
        return source_grid(bx, by, (src * arc).flatten().clamp(min=0), self.n), peaks

    def _positions(self, start: dict, peaks):
        """The positions penalty of the start (:func:`lensexp.fit.positions.penalty_from`), or none."""
        m = self.model
        if self.fs.positions_floor is None:
            return _no_penalty
        pen = penalty_from(start["p"], peaks, m.npix, m.pixscale, m.pw, floor=self.fs.positions_floor)
        if len(pen.xy) > 1:
            log.debug('lens %d: %d images of a source point, threshold %.3f"', self.b, len(pen.xy), pen.threshold)
        else:
            log.debug("lens %d: no multiply imaged source point in the start: no positions penalty", self.b)
        return pen

    def _centred(self, a: torch.Tensor) -> torch.Tensor:
        """The stage's centred cut-out of a whole-grid map [N, N] (the start's variance, shapelet image)."""
        k = (a.shape[-1] - self.model.npix) // 2
        return a[k : k + self.model.npix, k : k + self.model.npix] if k else a

    def loss(self, pv, log_lam, grid, w, var_term, pen):
        """``-ln`` posterior: -ln E plus the priors and the positions penalty ``pen``, and the solution."""
        b, cut = self.b, self.cut
        pd = self.space.as_dict(pv[None])
        psf = cut.psf[b : b + 1]
        S, _, idx = lensed_nodes({k: pd[k][0] for k in MASS}, grid, self.n, self.model.npix, self.model, psf[0],
                                 self.margin)  # fmt: skip
        U = self._unlensed(pd, psf)
        nle, s, a, m, L = evidence(S, idx, U, cut.data[b].flatten(), w, self.H, log_lam, self.logdet_H, var_term)
        p1 = self.space.as_dict(pv)
        return nle + prior_penalty(p1, self.fs.center_sigma) + pen(p1), s, a, m, L

    def run(self, start: dict) -> dict:
        """L-BFGS over the non-linear parameters and ``ln lambda`` from ``start``; the node values
        and amplitudes solved at every step. Pixels of the start's outliers (``|z| > outlier_sigma``
        under its own model, at the first solve) are left out. Returns ``p``, ``nle`` (-ln
        posterior), ``log_lam``, ``nodes`` [n, n], ``grid``, ``amps`` (unlensed components),
        ``model`` [N, N] (cut-out) and the fluxes ``(lensed, intrinsic)`` of the source."""
        b, cut, space = self.b, self.cut, self.space
        grid, peaks = self.grid_for(start)
        grid = tuple(t.detach() for t in grid)
        pen = self._positions(start, peaks)
        var = self._centred(start["var"])
        use = cut.use[b].flatten()
        w = use / var.flatten()
        var_term = 0.5 * float((torch.log(2 * math.pi * var.flatten()) * use).sum())
        p0 = torch.stack([start["p"][k] for k in space.names]).to(var.dtype).clamp(space.lo, space.hi)
        with torch.no_grad():  # ln lambda: the best of a coarse scan at the start
            scan = [(float(self.loss(p0, torch.tensor(v, dtype=var.dtype), grid, w, var_term, pen)[0]), v)
                    for v in range(-12, 13, 2)]  # fmt: skip
            log_lam0 = min(scan)[1]
            log.debug("lens %d: start -ln posterior %.1f at ln lambda %d", self.b, min(scan)[0], log_lam0)
            if self.fs.outlier_sigma:
                m = self.loss(p0, torch.tensor(float(log_lam0), dtype=var.dtype), grid, w, var_term, pen)[3]
                z2 = w * (cut.data[b].flatten() - m) ** 2
                w = w * (z2 < self.fs.outlier_sigma**2)
        u = space.to_u(p0).clone().requires_grad_(True)
        ll = torch.tensor(float(log_lam0), dtype=var.dtype, requires_grad=True)
        t0 = time.perf_counter()
        its = minimise([u, ll], lambda: self.loss(space.to_p(u), ll, grid, w, var_term, pen)[0], self.fs.lbfgs_iters)
        with torch.no_grad():
            pv = space.to_p(u)
            log.debug("pixelated source from theta_E %.4f: %d iterations, %d evals, %.1f s, positions penalty %.2f",
                      float(p0[0]), *its, time.perf_counter() - t0, float(pen(space.as_dict(pv))))  # fmt: skip
            nle, s, a, m, L = self.loss(pv, ll, grid, w, var_term, pen)
            # effective number of source parameters (Suyu et al. 2006, eq. 20): n^2 - lambda tr(H (F + R)^-1)
            ns = self.n**2
            n_eff = ns - float(torch.exp(ll) * (self.H * torch.cholesky_inverse(L)[:ns, :ns]).sum())
            pd = space.as_dict(pv)
            _, M, _ = lensed_nodes({k: pd[k] for k in MASS}, grid, self.n, self.model.npix, self.model, None, 0)
            lensed = float((s @ M).sum())
            intrinsic = float(s.sum() * grid[2] ** 2)  # bilinear nodes: each carries one cell's area (edges ~0)
        return {
            "p": pd,
            "nle": float(nle),
            "log_lam": float(ll.detach()),
            "nodes": s.reshape(self.n, self.n),
            "grid": grid,
            "amps": a,
            "model": m.reshape(self.model.npix, self.model.npix),
            "flux": (lensed, intrinsic),
            "n_eff": n_eff,
        }


def refine(cands: list[dict], obs, b: int, space, model, fs, n: int, npix: int) -> dict:
    """The pixelated stage of lens ``b`` from each candidate of ``cands`` (result dicts); the one of
    least ``-ln`` posterior (evidence and priors) is kept. Returns a result dict like the
    candidates' with the Sérsic source's amplitudes set to 0 and ``px_*`` entries added:
    ``px_nle``, ``px_log_lam``, ``px_theta_E0`` (its start's theta_E), ``px_flux``."""
    stage = PixelatedStage(obs, b, space, model, fs, n, npix)
    best, start = None, None
    for c in cands:
        r = stage.run(c)
        log.debug("lens %d: pixelated source from start %d: theta_E %.4f, -ln E %.1f, ln lambda %.2f", b, c["start"],
                  float(r["p"]["theta_E"]), r["nle"], r["log_lam"])  # fmt: skip
        if best is None or r["nle"] < best["nle"]:
            best, start = r, c
    m = stage.model
    full = torch.zeros_like(obs.data[b])
    k = (obs.data.shape[-1] - m.npix) // 2
    full[k : k + m.npix, k : k + m.npix] = best["model"]  # the stage's likelihood (and nll, n_pix) is the cut-out's
    use = torch.zeros_like(obs.use[b])
    use[k : k + m.npix, k : k + m.npix] = obs.use[b, k : k + m.npix, k : k + m.npix]
    var = start["var"]
    terms = likelihood_terms(full[None], obs.data[b : b + 1], use[None], var[None], fs.outlier_sigma)
    amps = torch.cat([torch.zeros(m.n_src, dtype=best["amps"].dtype), best["amps"]])
    out = {
        "p": {**best["p"], "sh_beta": start["p"].get("sh_beta", torch.tensor(math.nan))},
        "amps": amps,
        **{kk: (float(v[0]) if v.is_floating_point() else int(v[0])) for kk, v in terms.items()},
        "var": var,
        "start": start["start"],
        "px_n": int(n),
        "px_nle": best["nle"],
        "px_log_lam": best["log_lam"],
        "px_theta_E0": float(start["p"]["theta_E"]),
        "px_flux": best["flux"],
        "px_nodes": best["nodes"],
        "px_grid": tuple(float(t) for t in best["grid"]),
        "px_n_eff": best["n_eff"],
    }
    out["nll"] = float(out["nll"]) + float(prior_penalty(best["p"], fs.center_sigma))
    for key in ("sh_n_max", "sh_dnll", "sh_npix", "sh_theta_E0"):  # what the shapelet stage said of the start
        if key in start:
            out[key] = start[key]
    return out
