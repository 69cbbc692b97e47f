"""Mass profiles beyond the SIE, and the mass families of density-map (kappa) presets.

Profiles, in lenstronomy's conventions (1.14), pure and batched like :mod:`lensexp.sim.lens`:

* :func:`sis_deflection`, :func:`sis_convergence`: singular isothermal sphere (lenstronomy
  ``SIS``), ``theta_E`` [arcsec], ``kappa = theta_E / (2 r)``.
* :func:`gaussian_deflection`, :func:`gaussian_convergence`: circular Gaussian convergence
  (lenstronomy ``GAUSSIAN``), ``kappa = amp / (2 pi sigma^2) exp(-r^2 / (2 sigma^2))``, ``amp``
  its total mass [arcsec^2] (a point mass of Einstein radius ``sqrt(amp / pi)``).
* :func:`epl_deflection`, :func:`epl_convergence`: elliptical power law (lenstronomy ``EPL``,
  Tessore & Metcalf 2015): ``kappa = (3 - gamma) / 2 (theta_E / sqrt(q x'^2 + y'^2 / q))^(gamma-1)``,
  ``gamma`` the 3-D slope (2 = SIE), ``e1, e2`` as for the SIE.

Families (``data.mass.kind``): ``epl_narrow`` (the main lens a power law with a slope near
isothermal, 2 +- 0.15, + shear: the training family of ``data=kappa``), ``sie`` (SIE + shear: a
training family on request, the default before 2026-12-06), ``sie_pair`` (a
second SIE beside the main one), ``sie_subhalo`` (an SIS subhalo near the Einstein ring),
``epl`` (the main lens a power law with a slope away from isothermal, 2 +- 0.25-0.5) and
``sie_blobs`` (SIE + shear + :data:`N_BLOBS` Gaussian convergence clumps anywhere within 1.5
theta_E: a training family that shows the network mass off the main profile in a shape none of
the test classes has). The eight
labels always describe the main lens (for the power laws its theta_E, e1, e2, centre) and the
shear; the other components travel in the parameter dict under ``m2_*`` / ``sub_*`` / ``epl_gamma``
/ ``blob<j>_*``.
"""

from __future__ import annotations

import math

import torch

from lensexp.errors import ConfigError
from lensexp.sim import lens as lensmod
from lensexp.sim.ranges import check_range, draw

MASS_KINDS = ("sie", "epl_narrow", "sie_pair", "sie_subhalo", "epl", "sie_blobs")
N_BLOBS = 2  # Gaussian clumps per lens in ``sie_blobs`` (masses drawn from 0: some lenses are nearly plain SIEs)
BLOB_KEYS = tuple(f"blob{j}_{k}" for j in range(N_BLOBS) for k in ("amp", "sigma", "center_x", "center_y"))
EPL_KINDS = ("epl", "epl_narrow")  # the main lens a power law (its own gamma_offset range each)
# parameters each family adds to the eight labels (kept in the samples' meta)
COMPONENT_KEYS = {
    "sie": (),
    "sie_pair": ("m2_theta_E", "m2_e1", "m2_e2", "m2_center_x", "m2_center_y"),
    "sie_subhalo": ("sub_theta_E", "sub_center_x", "sub_center_y"),
    "epl": ("epl_gamma",),
    "epl_narrow": ("epl_gamma",),
    "sie_blobs": BLOB_KEYS,
}
# the config block (``data.mass.<block>``) of each family's ranges; only the drawn family's shapes the data
FAMILY_BLOCKS = {
    "sie_pair": "pair",
    "sie_subhalo": "subhalo",
    "epl_narrow": "epl_narrow",
    "epl": "epl",
    "sie_blobs": "blobs",
}
# most terms of the hypergeometric series (|z| = (1-q)/(1+q) = 0.82 at q = 0.1 needs ~130 for 1e-11)
_EPL_TERMS = 160


def sis_deflection(x, y, theta_E, center_x=0.0, center_y=0.0):
    """SIS deflection ``theta_E (dx, dy) / r`` [arcsec]; zero at the centre itself."""
    x, y, theta_E, center_x, center_y = lensmod._as_tensors(x, y, theta_E, center_x, center_y)
    dx, dy = x - center_x, y - center_y
    r = torch.sqrt(dx * dx + dy * dy)
    inv = torch.where(r > 0, theta_E / torch.where(r > 0, r, 1.0), 0.0)
    return dx * inv, dy * inv


def sis_convergence(x, y, theta_E, center_x=0.0, center_y=0.0):
    """SIS convergence ``theta_E / (2 r)`` (infinite at the centre)."""
    x, y, theta_E, center_x, center_y = lensmod._as_tensors(x, y, theta_E, center_x, center_y)
    return theta_E / (2.0 * torch.hypot(x - center_x, y - center_y))


def gaussian_deflection(x, y, amp, sigma, center_x=0.0, center_y=0.0):
    """Deflection of a circular Gaussian convergence (lenstronomy ``GAUSSIAN``): the mass inside
    r over pi r, ``amp (1 - exp(-u)) / (pi r^2) (dx, dy)`` with ``u = r^2 / (2 sigma^2)``; finite
    (zero) at the centre."""
    x, y, amp, sigma, center_x, center_y = lensmod._as_tensors(x, y, amp, sigma, center_x, center_y)
    dx, dy = x - center_x, y - center_y
    inv2s2 = 0.5 / (sigma * sigma)
    u = (dx * dx + dy * dy) * inv2s2
    # (1 - e^-u) / u, its series below u = 1e-6 (where -expm1(-u) / u rounds)
    f = torch.where(u > 1e-6, -torch.expm1(-u) / torch.where(u > 1e-6, u, 1.0), 1.0 - 0.5 * u)
    scale = amp * inv2s2 / math.pi * f
    return dx * scale, dy * scale


def gaussian_convergence(x, y, amp, sigma, center_x=0.0, center_y=0.0):
    """Circular Gaussian convergence ``amp / (2 pi sigma^2) exp(-r^2 / (2 sigma^2))``."""
    x, y, amp, sigma, center_x, center_y = lensmod._as_tensors(x, y, amp, sigma, center_x, center_y)
    inv2s2 = 0.5 / (sigma * sigma)
    return amp * inv2s2 / math.pi * torch.exp(-((x - center_x) ** 2 + (y - center_y) ** 2) * inv2s2)


def _rotated(x, y, e1, e2, center_x, center_y):
    q, c, s, _ = lensmod.ellipticity_to_q_cos_sin(e1, e2)
    dx, dy = x - center_x, y - center_y
    return q, c, s, c * dx + s * dy, -s * dx + c * dy


def epl_deflection(x, y, theta_E, gamma, e1, e2, center_x=0.0, center_y=0.0):
    """EPL deflection (alpha_x, alpha_y) [arcsec] (lenstronomy ``EPL``).

    In the major-axis frame, with ``Z = q x' + i y'``, ``R = |Z|``, ``b = theta_E sqrt(q)``,
    ``t = gamma - 1``: ``alpha = 2 / (1 + q) (b / R)^t Z 2F1(1, t/2; 2 - t/2; -(1-q)/(1+q) Z/conj(Z))``
    (Tessore & Metcalf 2015, eq. 13); the series is summed until the next term is below 1e-13
    (float64) or 1e-8 (float32) relative, from the flattest lens of the batch.
    """
    x, y, theta_E, gamma, e1, e2, center_x, center_y = lensmod._as_tensors(
        x, y, theta_E, gamma, e1, e2, center_x, center_y
    )
    q, c, s, xr, yr = _rotated(x, y, e1, e2, center_x, center_y)
    t = gamma - 1.0
    b = theta_E * torch.sqrt(q)
    R = torch.hypot(q * xr, yr).clamp(min=1e-9)
    cdt = torch.complex128 if xr.dtype == torch.float64 else torch.complex64
    unit = torch.complex(q * xr / R, yr / R).to(cdt)  # e^{i phi}
    z = (-(1.0 - q) / (1.0 + q)).to(cdt) * unit * unit
    term = torch.ones_like(z)
    total = torch.ones_like(z)
    a, cc = t / 2.0, 2.0 - t / 2.0
    f_max = float(((1.0 - q) / (1.0 + q)).detach().max()) if q.numel() else 0.0
    tol = 1e-13 if xr.dtype == torch.float64 else 1e-8
    n_terms = _EPL_TERMS if f_max >= 1 else min(_EPL_TERMS, int(math.log(tol) / math.log(max(f_max, 1e-300))) + 2)
    in_place = not (torch.is_grad_enabled() and (z.requires_grad or a.requires_grad))  # autograd keeps each term
    for n in range(n_terms):  # in place: 2.3x faster (no allocation per term), the same bits
        coef = ((n + a) / (n + cc)).to(cdt)
        if in_place:
            term.mul_(coef).mul_(z)
            total.add_(term)
        else:
            term = term * coef * z
            total = total + term
    alpha = (2.0 / (1.0 + q) * (b / R) ** t * R).to(cdt) * unit * total
    axr, ayr = alpha.real, alpha.imag
    return c * axr - s * ayr, s * axr + c * ayr


def epl_convergence(x, y, theta_E, gamma, e1, e2, center_x=0.0, center_y=0.0):
    """EPL convergence ``(3 - gamma) / 2 (theta_E / sqrt(q x'^2 + y'^2 / q))^(gamma - 1)``."""
    x, y, theta_E, gamma, e1, e2, center_x, center_y = lensmod._as_tensors(
        x, y, theta_E, gamma, e1, e2, center_x, center_y
    )
    q, _, _, xr, yr = _rotated(x, y, e1, e2, center_x, center_y)
    return (3.0 - gamma) / 2.0 * (theta_E / torch.sqrt(q * xr * xr + yr * yr / q)) ** (gamma - 1.0)


# ---------------------------------------------------------------------------- families
def check_mass_config(m) -> str:
    """Validate ``data.mass`` (may be absent: plain SIE + shear); returns the family name."""
    if m is None:
        return "sie"
    kind = str(m.get("kind", "sie"))
    if kind not in MASS_KINDS:
        raise ConfigError(f"data.mass.kind must be one of {MASS_KINDS}, got '{kind}'")
    if kind == "sie_pair":
        check_range("data.mass.pair.theta_E_ratio", m.pair.theta_E_ratio, 0.0, strict_low=True)
        check_range("data.mass.pair.separation", m.pair.separation, 0.0)
        check_range("data.mass.pair.q", m.pair.q, 0.0, 1.0, strict_low=True)
    elif kind == "sie_subhalo":
        check_range("data.mass.subhalo.theta_E", m.subhalo.theta_E, 0.0, strict_low=True)
        check_range("data.mass.subhalo.radius", m.subhalo.radius, 0.0)
    elif kind in EPL_KINDS:
        check_range(f"data.mass.{kind}.gamma_offset", m[kind].gamma_offset, 0.0, 0.9)
    elif kind == "sie_blobs":
        check_range("data.mass.blobs.mass", m.blobs.mass, 0.0)
        check_range("data.mass.blobs.sigma", m.blobs.sigma, 0.0, strict_low=True)
        check_range("data.mass.blobs.radius", m.blobs.radius, 0.0)
    return kind


def draw_components(m, kind: str, p: dict, rng: torch.Generator) -> dict:
    """Parameters of the non-SIE components of family ``kind`` for the lenses in ``p`` (tensors
    [n]); distances in units of the main lens's theta_E, angles uniform."""
    n, dev, dt = p["theta_E"].shape[0], p["theta_E"].device, p["theta_E"].dtype
    d = lambda lohi: draw(rng, n, check_range("", lohi), dev, dt)  # noqa: E731
    ang = lambda: 2 * math.pi * torch.rand(n, generator=rng, device=dev, dtype=dt)  # noqa: E731
    out = {}
    if kind == "sie_pair":
        out["m2_theta_E"] = p["theta_E"] * d(m.pair.theta_E_ratio)
        r, a = p["theta_E"] * d(m.pair.separation), ang()
        out["m2_center_x"], out["m2_center_y"] = p["center_x"] + r * torch.cos(a), p["center_y"] + r * torch.sin(a)
        out["m2_e1"], out["m2_e2"] = lensmod.phi_q_to_ellipticity(0.5 * ang(), d(m.pair.q))
    elif kind == "sie_subhalo":
        out["sub_theta_E"] = d(m.subhalo.theta_E)
        r, a = p["theta_E"] * d(m.subhalo.radius), ang()
        out["sub_center_x"], out["sub_center_y"] = p["center_x"] + r * torch.cos(a), p["center_y"] + r * torch.sin(a)
    elif kind in EPL_KINDS:
        sign = torch.where(torch.rand(n, generator=rng, device=dev) < 0.5, -1.0, 1.0).to(dt)
        out["epl_gamma"] = 2.0 + sign * d(m[kind].gamma_offset)
    elif kind == "sie_blobs":
        for j in range(N_BLOBS):  # mass as the Einstein radius of a point of that mass, in theta_E
            out[f"blob{j}_amp"] = math.pi * (p["theta_E"] * d(m.blobs.mass)) ** 2
            out[f"blob{j}_sigma"] = d(m.blobs.sigma)
            r, a = p["theta_E"] * d(m.blobs.radius), ang()
            out[f"blob{j}_center_x"] = p["center_x"] + r * torch.cos(a)
            out[f"blob{j}_center_y"] = p["center_y"] + r * torch.sin(a)
    return out


def _blobs(c) -> list[tuple]:
    """(amp, sigma, center_x, center_y) of each ``sie_blobs`` clump, from the column getter ``c``."""
    return [tuple(c(f"blob{j}_{k}") for k in ("amp", "sigma", "center_x", "center_y")) for j in range(N_BLOBS)]


def drawn_family(mass: dict) -> dict:
    """A plain ``data.mass`` dict without the range blocks (:data:`FAMILY_BLOCKS`) of the families
    other than its ``kind``: what the draws depend on."""
    mine = FAMILY_BLOCKS.get(str(mass.get("kind", "sie")))
    return {k: v for k, v in mass.items() if k == mine or k not in FAMILY_BLOCKS.values()}


def _col(p: dict, k: str, like: torch.Tensor) -> torch.Tensor:
    return p[k].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def extra_deflection(kind: str, p: dict, x: torch.Tensor, y: torch.Tensor):
    """Deflection [B, P] at positions x, y [1, P] of what family ``kind`` adds to (or, for
    the power laws, puts instead of) the main SIE; ``None`` for ``sie``."""
    if kind == "sie":
        return None
    c = lambda k: _col(p, k, x)  # noqa: E731
    if kind == "sie_pair":
        return lensmod.sie_deflection(x, y, c("m2_theta_E"), c("m2_e1"), c("m2_e2"), c("m2_center_x"), c("m2_center_y"))
    if kind == "sie_subhalo":
        return sis_deflection(x, y, c("sub_theta_E"), c("sub_center_x"), c("sub_center_y"))
    if kind == "sie_blobs":
        parts = [gaussian_deflection(x, y, *b) for b in _blobs(c)]
        return sum(a for a, _ in parts), sum(b for _, b in parts)
    return epl_deflection(x, y, c("theta_E"), c("epl_gamma"), c("e1"), c("e2"), c("center_x"), c("center_y"))


def convergence_map(kind: str, p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Total convergence [B, ...] at positions x, y (e.g. the pixel centres [1, N, N]) of the
    lenses in ``p`` (family ``kind``; the external shear adds none)."""
    c = lambda k: _col(p, k, x)  # noqa: E731
    if kind in EPL_KINDS:
        return epl_convergence(x, y, c("theta_E"), c("epl_gamma"), c("e1"), c("e2"), c("center_x"), c("center_y"))
    kappa = lensmod.sie_convergence(x, y, c("theta_E"), c("e1"), c("e2"), c("center_x"), c("center_y"))
    if kind == "sie_pair":
        kappa = kappa + lensmod.sie_convergence(
            x, y, c("m2_theta_E"), c("m2_e1"), c("m2_e2"), c("m2_center_x"), c("m2_center_y")
        )
    elif kind == "sie_subhalo":
        kappa = kappa + sis_convergence(x, y, c("sub_theta_E"), c("sub_center_x"), c("sub_center_y"))
    elif kind == "sie_blobs":
        kappa = kappa + sum(gaussian_convergence(x, y, *b) for b in _blobs(c))
    return kappa
