"""Companions: neighbouring galaxies the data's mask left in, fitted as unlensed Sérsics.

A compact galaxy a few arcsec from the lens (a satellite or a projected neighbour) is, after the
lens galaxy, the brightest thing in the residual. Without a component of its own the lensed
source is pulled onto it and the mass moves to make it an image (e.g. SLACS J1134+6027: the mass
centre 0.8" off its light, theta_E +12 to +28 %). With ``companions=K`` the fit adds K unlensed
elliptical Sérsics, each with its own centre, started on the K most significant compact residual
peaks that the light-only fit leaves outside the lens core; the likelihood then decides what is
a neighbour and what is a lensed image (a lensed image needs its counter-images, a neighbour
does not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lensexp.fit.model import COMPANION_PREFIXES, LensModel, Observation
from lensexp.sim.trace import pixel_grid


def residual_peaks(
    obs: Observation,
    light: dict,
    model: LensModel,
    n_peaks: int,
    min_radius: float = 0.3,
    box: int = 5,
    separation: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (x, y) [B, n_peaks] in arcsec of the most significant compact peaks of the
    residual ``data - light["image"]``: the matched-filter significance ``sum(resid) /
    sqrt(sum(var))`` over ``box`` x ``box`` px of usable pixels, the residual first 3 x 3
    median-filtered (single hot pixels and cosmic rays do not count), beyond ``min_radius``
    arcsec of the light centre (where the light model's own residuals sit) and away from the
    edge; each next peak at least ``separation`` arcsec from the ones before."""
    x, y = pixel_grid(model.npix, model.pixscale, 1, obs.data.dtype, obs.data.device)
    names = light["names"]
    cx, cy = light["p"][:, names.index("ll_x")], light["p"][:, names.index("ll_y")]
    use = obs.use.to(obs.data.dtype)
    resid = (obs.data - light["image"]) * use
    var = obs.variance(light["image"]) * use
    pool = lambda t: F.avg_pool2d(t[:, None], box, 1, box // 2, count_include_pad=True)[:, 0]  # noqa: E731
    n = model.npix
    median3 = F.unfold(resid[:, None], 3, padding=1).median(1).values.reshape(-1, n, n)  # one bright pixel: gone
    signif = pool(median3) / torch.sqrt(pool(var).clamp(min=torch.finfo(var.dtype).tiny))
    r = torch.hypot(x - cx[:, None, None], y - cy[:, None, None])
    edge = (model.npix - 1) / 2 * model.pixscale - box * model.pixscale
    ok = (pool(use) > 0.5) & (r > min_radius) & (x.abs() < edge) & (y.abs() < edge)
    score = torch.where(ok, signif, torch.full_like(signif, -torch.inf)).flatten(1)
    xs, ys = [], []
    for _ in range(n_peaks):
        j = score.argmax(1)
        px, py = x.flatten()[j], y.flatten()[j]
        xs.append(px)
        ys.append(py)
        near = torch.hypot(x.flatten()[None] - px[:, None], y.flatten()[None] - py[:, None]) < separation
        score = score.masked_fill(near, -torch.inf)
    return torch.stack(xs, 1), torch.stack(ys, 1)


def place_companions(p: torch.Tensor, space, obs: Observation, light: dict, model: LensModel, idx, e):
    """Fill the companion columns of starts ``p`` [M, P] (``idx`` [M]: lens of each start): on the
    residual peaks of :func:`residual_peaks`, R two pixels, exponential profile, the small
    ellipticities ``e`` [M, 2] (never exactly round, where the angle has no gradient)."""
    if not model.n_comp:
        return p
    px, py = residual_peaks(obs, light, model, model.n_comp)
    col = {n: i for i, n in enumerate(space.names)}
    p = p.clone()
    for k, prefix in enumerate(COMPANION_PREFIXES[: model.n_comp]):
        p[:, col[prefix + "x"]], p[:, col[prefix + "y"]] = px[idx, k].to(p.dtype), py[idx, k].to(p.dtype)
        p[:, col[prefix + "R"]] = 2 * model.pixscale
        p[:, col[prefix + "n"]] = 1.0
        p[:, col[prefix + "e1"]], p[:, col[prefix + "e2"]] = e[:, 0], -e[:, 1]
    return p
