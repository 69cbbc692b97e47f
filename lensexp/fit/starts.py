"""Starting points of the fit: prior draws, the network's posterior, the source placed where
the bright pixels map back to."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from lensexp.fit.model import MASS, LensModel, Observation, ParamSpace, extra_light_starts
from lensexp.sim import lens as lensmod
from lensexp.sim.ranges import check_range, draw
from lensexp.sim.trace import pixel_grid


def init_source(
    space: ParamSpace, p: torch.Tensor, obs: Observation, idx: torch.Tensor, model: LensModel, jitter, light=None
):
    """Fill the source (and lens-light) columns of starts ``p`` [M, P] (mass set; ``idx`` [M]
    maps starts to lenses): the source sits at the flux-weighted mean of ``beta = theta -
    alpha(theta)`` over pixels above 3 sigma (of the data less the light-only model ``light``,
    :func:`lensexp.fit.light.fit_light`, when given, which also places the companions), with their
    spread as size. ``jitter`` [M, 4]
    in [-1, 1] sets small ellipticities (never exactly round, where the angle has no gradient)."""
    x, y = pixel_grid(model.npix, model.pixscale, 1, p.dtype, p.device)
    d = obs.data[idx] if light is None else (obs.data - light["image"])[idx]
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
    if "src2_R" in col:  # a compact second component on the first (a bright core or knot to find)
        p[:, col["src2_x"]], p[:, col["src2_y"]] = sx, sy
        p[:, col["src2_R"]] = 0.5 * p[:, col["src_R"]]
        p[:, col["src2_n"]] = 1.0
        p[:, col["src2_e1"]], p[:, col["src2_e2"]] = -jitter[:, 1], jitter[:, 0]
    if light is not None:
        from lensexp.fit.companions import place_companions
        from lensexp.fit.light import place_light

        p = place_light(p, space, light, idx)
        p = place_companions(p, space, obs, light, model, idx, jitter[:, 2:4])
    elif model.lens_light:
        p[:, col["ll_x"]], p[:, col["ll_y"]] = m["center_x"], m["center_y"]
        p[:, col["ll_R"]] = 0.5 * m["theta_E"].clamp(min=2 * model.pixscale)
        p[:, col["ll_n"]] = 3.0
        p[:, col["ll_e1"]], p[:, col["ll_e2"]] = m["e1"] + jitter[:, 2], m["e2"] + jitter[:, 3]
        first = {k: p[:, col[k]] for k in ("ll_R", "ll_e1", "ll_e2")}
        for k, v in extra_light_starts(first, model.n_light).items():
            p[:, col[k]] = v
    return p.clamp(space.lo, space.hi)


def prior_mass(data_cfg: DictConfig, n: int, rng: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """``n`` SIE + shear draws [n, 7] from a data preset's lens priors."""
    L = data_cfg.lens
    d = lambda lohi: draw(rng, n, check_range("", lohi), None, dtype)  # noqa: E731
    theta = d(L.theta_E)
    e1, e2 = lensmod.phi_q_to_ellipticity(d(L.phi), d(L.q))
    return torch.stack([theta, e1, e2, d(L.center), d(L.center), d(L.gamma), d(L.gamma)], 1)


def starts_for(cfg, group, pred, truth, rngs, dtype) -> torch.Tensor:
    """Mass starts [B, S, 7] for one batch, on each lens's fit grid (centres moved from the file's
    frame by the cut-out ``offset``)."""
    S = int(cfg.n_starts)
    if cfg.init == "prior":
        return torch.stack([prior_mass(cfg.data, S, r, dtype) for r in rngs])
    if cfg.init == "truth":
        m = torch.tensor([truth[g["name"]] for g in group], dtype=dtype)[:, None]
        shift = torch.tensor([g["offset"] for g in group], dtype=dtype)[:, None]
    else:
        torch.manual_seed(int(cfg.seed) * 1_000_003 + group[0]["index"])  # MC-dropout masks
        images = torch.from_numpy(np.stack([g["cnn"] for g in group])).float()
        psf_ee = torch.from_numpy(np.stack([g["cnn_psf"] for g in group]))  # read by psf_input networks only
        m = cnn_starts(pred, images, S, rngs[0], psf_ee).to(dtype=dtype)
        shift = torch.tensor(np.array([np.subtract(g["offset"], g["cnn_offset"]) for g in group]), dtype=dtype)[:, None]
    m = m.clone()
    m[..., 3:5] -= shift  # file frame (network frame + its offset) -> fit frame
    return m


def cnn_starts(
    pred, images: torch.Tensor, n_starts: int, generator: torch.Generator | None = None, psf_ee=None
) -> torch.Tensor:
    """Mass starts [B, S, 7] from a :class:`~lensexp.predict.Predictor`'s recalibrated posterior
    for images [B, C, N, N] (``psf_ee``: their PSFs, for a network that takes them): its mean
    first, then ``S - 1`` posterior samples."""
    post = pred.posterior(images, generator, psf_ee)  # [n_samples, B, labels]
    post = post[..., [pred.labels.index(k) for k in MASS]]
    return torch.cat([post.mean(0)[:, None], post[: n_starts - 1].transpose(0, 1)], 1)[:, :n_starts]
