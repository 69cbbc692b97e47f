"""The priors: parameters of every system drawn from a checked ``data`` preset.

:func:`draw_params` returns a dict of tensors [n] (or [n, K]) in the units of the preset
(arcsec, AB mag, e-/s); ``LABELS`` is the network's label order (``../shared/conventions.md``).
"""

from __future__ import annotations

import math

import torch

from lensexp.sim import lens as lensmod
from lensexp.sim import mass as massmod
from lensexp.sim.instrument import mag_to_flux
from lensexp.sim.ranges import check_range, draw

LABELS = ("theta_E", "e1", "e2", "center_x", "center_y", "gamma1", "gamma2", "mu_F")


def draw_params(
    c,
    n: int,
    rng: torch.Generator,
    n_galaxies: int,
    n_psf: int,
    mass_kind: str = "sie",
    device=None,
    dtype=torch.float64,
) -> dict:
    """Lens, source, lens-light, band and PSF parameters of ``n`` systems.

    ``c``: the checked ``data`` config (attribute access); ``n_galaxies``/``n_psf``: sizes of the
    COSMOS and PSF banks the indices point into; ``mass_kind``: the mass family
    (:func:`mass.check_mass_config`). The order of the draws is part of the data's identity.
    """
    dev, dt = device, dtype
    d = lambda lohi, m=n: draw(rng, m, check_range("", lohi), dev, dt)  # noqa: E731
    L, S = c.lens, c.source
    p = {"theta_E": d(L.theta_E)}
    q, phi = d(L.q), d(L.phi)
    p["e1"], p["e2"] = lensmod.phi_q_to_ellipticity(phi, q)
    p["center_x"], p["center_y"] = d(L.center), d(L.center)
    p["gamma1"], p["gamma2"] = d(L.gamma), d(L.gamma)
    # source position in an annulus of radii offset * theta_E: uniform in area, or in radius (more
    # near-centred sources, as in magnification-selected lens samples)
    lo, hi = check_range("", S.offset)
    u = torch.rand(n, generator=rng, device=dev, dtype=dt)
    if str(S.offset_in) == "radius":
        r = p["theta_E"] * (lo + (hi - lo) * u)
    else:
        r = p["theta_E"] * torch.sqrt(lo * lo + (hi * hi - lo * lo) * u)
    t = 2 * math.pi * torch.rand(n, generator=rng, device=dev, dtype=dt)
    p["src_x"] = p["center_x"] + r * torch.cos(t)
    p["src_y"] = p["center_y"] + r * torch.sin(t)
    p["src_mag"] = d(S.mag)
    p["src_flux"] = mag_to_flux(p["src_mag"], float(c.instrument.zeropoint))
    kind = str(S.kind)
    frac = {"sersic": 0.0, "cosmos": 1.0, "mix": float(S.cosmos_fraction)}[kind]
    p["is_cosmos"] = torch.rand(n, generator=rng, device=dev) < frac
    # Sersic + clumps
    p["src_R"], p["src_n"] = d(S.sersic.R_sersic), d(S.sersic.n)
    sq, sphi = d(S.sersic.q), d((0.0, math.pi))
    p["src_e1"], p["src_e2"] = lensmod.phi_q_to_ellipticity(sphi, sq)
    kmin, kmax = (int(v) for v in S.clumps.n)
    p["clump_n"] = torch.randint(kmin, kmax + 1, (n,), generator=rng, device=dev)
    K = kmax
    w = torch.rand(n, K, generator=rng, device=dev, dtype=dt)
    w = w * (torch.arange(K, device=dev)[None] < p["clump_n"][:, None])
    cf = d(S.clumps.flux_fraction) * (p["clump_n"] > 0)
    p["clump_flux"] = p["src_flux"][:, None] * cf[:, None] * w / w.sum(1, keepdim=True).clamp(min=1e-12)
    p["sersic_flux"] = p["src_flux"] * (1 - cf)
    spread = float(S.clumps.spread) * p["src_R"][:, None]
    p["clump_x"] = p["src_x"][:, None] + spread * torch.randn(n, K, generator=rng, device=dev, dtype=dt)
    p["clump_y"] = p["src_y"][:, None] + spread * torch.randn(n, K, generator=rng, device=dev, dtype=dt)
    p["clump_sigma"] = d(S.clumps.sigma, n * K).reshape(n, K)
    # COSMOS
    G = n_galaxies
    p["gal_index"] = torch.randint(0, G, (n,), generator=rng, device=dev)
    ang = 2 * math.pi * torch.rand(n, generator=rng, device=dev, dtype=dt)
    p["gal_cos"], p["gal_sin"] = torch.cos(ang), torch.sin(ang)
    p["gal_flip"] = torch.rand(n, generator=rng, device=dev) < 0.5
    p["gal_scale"] = d(S.cosmos.scale)
    # lens light (aligned with the mass, axis ratio jittered)
    LL = c.lens_light
    if LL.enabled:
        ql = (q + float(LL.q_jitter) * (2 * torch.rand(n, generator=rng, device=dev, dtype=dt) - 1)).clamp(0.2, 1.0)
        p["ll_e1"], p["ll_e2"] = lensmod.phi_q_to_ellipticity(phi, ql)
        p["ll_flux"] = mag_to_flux(d(LL.mag), float(c.instrument.zeropoint))
        p["ll_R"], p["ll_n"] = d(LL.R_sersic), d(LL.n)
        comps = LL.get("components") or []
        if comps:  # further concentric Sérsics [n, K], each a share of the galaxy's flux
            u = lambda: 2 * torch.rand(n, generator=rng, device=dev, dtype=dt) - 1  # noqa: E731
            cols = {k: [] for k in ("llc_flux", "llc_R", "llc_n", "llc_e1", "llc_e2")}
            for comp in comps:
                cols["llc_flux"].append(d(comp.flux_fraction) * p["ll_flux"])
                cols["llc_R"].append(d(comp.R_scale) * p["ll_R"])
                cols["llc_n"].append(d(comp.n))
                qk = (ql + float(comp.q_jitter) * u()).clamp(0.2, 1.0)
                e1, e2 = lensmod.phi_q_to_ellipticity(phi + float(comp.twist) * u(), qk)
                cols["llc_e1"].append(e1)
                cols["llc_e2"].append(e2)
            p.update({k: torch.stack(v, 1) for k, v in cols.items()})
            p["ll_flux"] = p["ll_flux"] - p["llc_flux"].sum(1)
    # colours
    p["band_src"] = torch.stack([d(b.source_scale) for b in c.bands], 1)
    p["band_lens"] = torch.stack([d(b.lens_scale) for b in c.bands], 1)
    p["psf_index"] = torch.randint(0, n_psf, (n,), generator=rng, device=dev)
    if mass_kind != "sie":
        p.update(massmod.draw_components(c.mass, mass_kind, p, rng))
    return p
