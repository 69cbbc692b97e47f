"""Multiple-image positions and the penalty that keeps a flexible source from unphysical mass models.

A pixelated source can reproduce the arcs with a wrong mass model: the source becomes a
(demagnified) copy of the lensed images, and the evidence surface has such modes. The remedy of
PyAutoLens (Nightingale et al. 2018; Etherington et al. 2022, its "positions likelihood") is used
here: the image-plane positions of one source point are solved under the starting (parametric)
model, and a mass model that traces them further apart in the source plane than a threshold
(``max(factor x`` their separation at the start, ``floor)``, PyAutoLens's defaults 3 and 0.2") is
penalised. Solutions that keep the images together pay nothing.

Coordinates as everywhere: arcsec, x = column, y = row, origin at the grid's centre.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lensexp.fit.model import MASS
from lensexp.sim.trace import lens_coefficients, pixel_grid, shoot


def traced(p: dict, x: torch.Tensor, y: torch.Tensor, pw) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-plane positions [K] of image-plane points ``x, y`` [K] under the mass of ``p`` (scalars)."""
    bx, by = shoot(x[None], y[None], lens_coefficients({k: p[k].reshape(1) for k in MASS}), pw=pw)
    return bx[0], by[0]


def max_separation(p: dict, xy: torch.Tensor, pw) -> torch.Tensor:
    """Largest source-plane distance [arcsec] between the traced images ``xy`` [K, 2] (differentiable in ``p``)."""
    bx, by = traced(p, xy[:, 0], xy[:, 1], pw)
    d2 = (bx[:, None] - bx[None]) ** 2 + (by[:, None] - by[None]) ** 2
    return (d2.amax() + 1e-24).sqrt()


def solve_images(p: dict, beta: tuple, npix: int, pixscale: float, pw, tol: float = 1e-6, iters: int = 30):
    """Image-plane solutions [K, 2] (arcsec) of ``beta(theta) = beta`` under the mass of ``p``:
    local minima of ``|beta(theta) - beta|`` on the ``npix`` pixel grid (within two pixels),
    refined by Newton steps (finite-difference Jacobian, float64) until the traced point is within
    ``tol`` arcsec; non-converged points, and points within a pixel of the mass centre (the SIE
    has no central image), are dropped; duplicates within half a pixel merged."""
    with torch.no_grad():
        p = {k: p[k].detach().to(torch.float64).reshape(()) for k in MASS}
        x, y = pixel_grid(npix, pixscale, 1, torch.float64, p["theta_E"].device)
        bx, by = traced(p, x.flatten(), y.flatten(), pw)
        d = torch.hypot(bx - beta[0], by - beta[1]).reshape(1, 1, npix, npix)
        low = (d == -F.max_pool2d(-d, 3, 1, 1)) & (d < 2 * pixscale)
        t = torch.stack([x.flatten(), y.flatten()], 1)[low.flatten()]
        target = torch.tensor(beta, dtype=torch.float64, device=t.device)
        h = 1e-6
        for _ in range(iters):
            b0 = torch.stack(traced(p, t[:, 0], t[:, 1], pw), 1)
            bxh = torch.stack(traced(p, t[:, 0] + h, t[:, 1], pw), 1)
            byh = torch.stack(traced(p, t[:, 0], t[:, 1] + h, pw), 1)
            J = torch.stack([(bxh - b0) / h, (byh - b0) / h], 2)  # [K, 2 (beta), 2 (theta)]
            step = torch.linalg.solve(J + 1e-12 * torch.eye(2, dtype=J.dtype), (b0 - target)[..., None])[..., 0]
            t = t - step.clamp(-pixscale, pixscale)  # at most a pixel a step
        res = (torch.stack(traced(p, t[:, 0], t[:, 1], pw), 1) - target).norm(dim=1)
        centre = torch.stack([p["center_x"], p["center_y"]])
        ok = (res < tol) & ((t - centre).norm(dim=1) > pixscale) & (t.abs() <= npix * pixscale / 2).all(1)
        out: list[torch.Tensor] = []
        for q in t[ok]:
            if all(float((q - o).norm()) > pixscale / 2 for o in out):
                out.append(q)
        return torch.stack(out) if out else t[:0]


class PositionsPenalty:
    """``penalty(p)`` = ``((s - threshold) / (0.01 threshold))^2 / 2`` for ``s`` =
    :func:`max_separation` of the images ``xy`` [K, 2] above ``threshold`` [arcsec], else 0: a
    steep wall (50 at 10 % over the threshold), so the optimiser may not cross it, but smooth.
    With fewer than two images it is always 0."""

    def __init__(self, xy: torch.Tensor, threshold: float, pw):
        self.xy, self.threshold, self.pw = xy, float(threshold), pw

    def __call__(self, p: dict) -> torch.Tensor:
        zero = torch.zeros((), dtype=p["theta_E"].dtype, device=p["theta_E"].device)
        if len(self.xy) < 2:
            return zero
        over = (max_separation(p, self.xy.to(zero.dtype), self.pw) - self.threshold).clamp(min=0)
        return 0.5 * (over / (0.01 * self.threshold)) ** 2


def penalty_from(p: dict, peaks, npix: int, pixscale: float, pw, factor: float = 3.0, floor: float = 0.2,
                 tries: int = 50) -> PositionsPenalty:  # fmt: skip
    """The penalty of the images of the source point that an image-plane point of ``peaks``
    ([K, 2] or a list of (x, y) [arcsec]: the start's lensed-source pixels, brightest first)
    traces to under the start's mass ``p``: the first that is multiply imaged (a bright pixel may
    lie where the source is seen once, e.g. a companion taken for an arc), trying at most
    ``tries`` source points at least a pixel apart; no constraint when none is."""
    with torch.no_grad():
        pd = {k: p[k].detach().to(torch.float64) for k in MASS}
        t = torch.as_tensor(peaks, dtype=torch.float64, device=pd["theta_E"].device).reshape(-1, 2)
        beta = torch.stack(traced(pd, t[:, 0], t[:, 1], pw), 1)
        xy, tried = t[:0], []
        for q in beta:
            if len(tried) == tries:
                break
            if any(float((q - o).norm()) < pixscale for o in tried):
                continue
            tried.append(q)
            xy = solve_images(pd, (float(q[0]), float(q[1])), npix, pixscale, pw)
            if len(xy) > 1:
                break
        sep = float(max_separation(pd, xy, pw)) if len(xy) > 1 else 0.0
    return PositionsPenalty(xy, max(factor * sep, floor), pw)
