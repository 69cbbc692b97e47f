"""Lens mass: singular isothermal ellipsoid (SIE) + external shear, in lenstronomy's conventions.

Conventions (``../shared/conventions.md``, identical to lenstronomy 1.14):

* ``theta_E`` [arcsec]: Einstein radius (product-averaged, lenstronomy ``SIE``).
* ``e1, e2``: ellipticity components, ``e = (1 - q) / (1 + q)``, ``e1 = e cos 2phi``,
  ``e2 = e sin 2phi`` (``phi_q2_ellipticity``); ``phi`` is the major-axis angle from +x.
* ``center_x, center_y`` [arcsec]: lens centre.
* ``gamma1, gamma2``: external shear about the origin (lenstronomy ``SHEAR``, ra_0 = dec_0 = 0).

Every function is pure, takes floats or tensors broadcast against each other (a leading batch
dimension over lenses against a pixel grid, typically) and returns torch tensors. Float64 inputs
give float64 results accurate to ~1e-12; the SIS limit q = 1 and the lens centre are finite.
"""

from __future__ import annotations

import functools

import torch

from lensexp.sim import fastmath as fm

Tensorish = torch.Tensor | float

# sqrt(1 - q^2) is kept above this so that atan(a z) / a -> z smoothly at q = 1 (SIS); the
# relative error this makes is a^2 z^2 / 3 ~ 1e-14, far below float64 needs.
_A_MIN = 1e-7
# lenstronomy clips the ellipticity modulus here (ellipticity2phi_q).
_E_MAX = 0.9999


def _as_tensors(*args: Tensorish) -> list[torch.Tensor]:
    """Convert floats/tensors to tensors of one common floating dtype and device.

    Plain Python floats alone give float64 (their own precision); with tensors present the
    tensors' promoted floating dtype wins, as in torch arithmetic.
    """
    tens = [a for a in args if isinstance(a, torch.Tensor)]
    dtype = torch.float64
    device = None
    if tens:
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in tens])
        if not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        device = tens[0].device
    return [torch.as_tensor(a, dtype=dtype, device=device) for a in args]


def ellipticity_to_q_cos_sin(e1: torch.Tensor, e2: torch.Tensor):
    """(e1, e2) -> (q, cos phi, sin phi, e) without trigonometric calls.

    ``phi = atan2(e2, e1) / 2`` is the major-axis angle; for e = 0 the angle is 0.
    """
    e = torch.sqrt(e1 * e1 + e2 * e2).clamp(max=_E_MAX)
    safe_e = torch.where(e > 0, e, torch.ones_like(e))
    cos2 = torch.where(e > 0, e1 / safe_e, torch.ones_like(e)).clamp(-1.0, 1.0)
    cos_phi = torch.sqrt((1.0 + cos2) / 2.0)
    sin_phi = torch.sqrt((1.0 - cos2) / 2.0)
    sin_phi = torch.where(e2 < 0, -sin_phi, sin_phi)
    q = (1.0 - e) / (1.0 + e)
    return q, cos_phi, sin_phi, e


def phi_q_to_ellipticity(phi: Tensorish, q: Tensorish):
    """Major-axis angle phi [rad] and axis ratio q -> (e1, e2) (lenstronomy ``phi_q2_ellipticity``)."""
    phi, q = _as_tensors(phi, q)
    e = (1.0 - q) / (1.0 + q)
    return e * torch.cos(2.0 * phi), e * torch.sin(2.0 * phi)


def sie_coefficients(theta_E, e1, e2):
    """Per-lens SIE constants (cos phi, sin phi, q^2, b / a, a) with ``a = sqrt(1 - q^2)``.

    ``b = theta_E sqrt(q)`` (lenstronomy's NIE normalisation). Computed once per lens so that the
    per-ray work in :func:`sie_deflection_rotated` is a few multiplications and three
    transcendental calls.
    """
    q, c, s, e = ellipticity_to_q_cos_sin(e1, e2)
    a = (2.0 * torch.sqrt(e) / (1.0 + e)).clamp(min=_A_MIN)  # sqrt(1 - q^2) without cancellation
    return c, s, q * q, theta_E * torch.sqrt(q) / a, a


def sie_deflection_rotated(dx, dy, c, s, q2, b_a, a):
    """SIE deflection at offsets (dx, dy) [arcsec] from the centre, given :func:`sie_coefficients`.

    Float32 uses :mod:`lensexp.sim.fastmath` (relative error ~2e-7, float32's own precision);
    float64 the exact library functions.
    """
    xr = c * dx + s * dy
    yr = -s * dx + c * dy
    psi2 = q2 * xr * xr + yr * yr
    at_centre = psi2 == 0
    inv_psi = a * torch.rsqrt(torch.where(at_centre, 1.0, psi2))
    axr = torch.where(at_centre, 0.0, b_a * fm.atan(xr * inv_psi))
    ayr = torch.where(at_centre, 0.0, b_a * fm.atanh(yr * inv_psi))
    return c * axr - s * ayr, s * axr + c * ayr


def sie_deflection(x, y, theta_E, e1, e2, center_x=0.0, center_y=0.0):
    """SIE deflection (alpha_x, alpha_y) [arcsec] at (x, y) [arcsec].

    lenstronomy ``SIE`` (NIE with vanishing core): in the frame of the major axis,
    ``alpha_x' = b / sqrt(1-q^2) atan(sqrt(1-q^2) x' / psi)``,
    ``alpha_y' = b / sqrt(1-q^2) atanh(sqrt(1-q^2) y' / psi)``,
    ``psi = sqrt(q^2 x'^2 + y'^2)``, ``b = theta_E sqrt(q)``. Zero at the centre itself.
    """
    x, y, theta_E, e1, e2, center_x, center_y = _as_tensors(x, y, theta_E, e1, e2, center_x, center_y)
    return sie_deflection_rotated(x - center_x, y - center_y, *sie_coefficients(theta_E, e1, e2))


def sie_convergence(x, y, theta_E, e1, e2, center_x=0.0, center_y=0.0):
    """SIE convergence ``kappa = theta_E / (2 sqrt(q x'^2 + y'^2 / q))`` (infinite at the centre)."""
    x, y, theta_E, e1, e2, center_x, center_y = _as_tensors(x, y, theta_E, e1, e2, center_x, center_y)
    q, c, s, _ = ellipticity_to_q_cos_sin(e1, e2)
    dx, dy = x - center_x, y - center_y
    xr = c * dx + s * dy
    yr = -s * dx + c * dy
    return theta_E / (2.0 * torch.sqrt(q * xr * xr + yr * yr / q))


def shear_deflection(x, y, gamma1, gamma2):
    """External shear deflection about the origin: (g1 x + g2 y, g2 x - g1 y) [arcsec]."""
    x, y, gamma1, gamma2 = _as_tensors(x, y, gamma1, gamma2)
    return gamma1 * x + gamma2 * y, gamma2 * x - gamma1 * y


def deflection(x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2):
    """Total SIE + shear deflection (alpha_x, alpha_y) [arcsec] at (x, y) [arcsec]."""
    ax, ay = sie_deflection(x, y, theta_E, e1, e2, center_x, center_y)
    sx, sy = shear_deflection(x, y, gamma1, gamma2)
    return ax + sx, ay + sy


def convergence(x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2):
    """Total convergence kappa (shear adds none); same arguments as :func:`deflection`."""
    kappa = sie_convergence(x, y, theta_E, e1, e2, center_x, center_y)
    return kappa + 0.0 * _as_tensors(gamma1)[0] + 0.0 * _as_tensors(gamma2)[0]


def hessian(x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2):
    """Lensing-potential Hessian (f_xx, f_xy, f_yy) of SIE + shear.

    The SIE potential is homogeneous of degree one about its centre, so with ``r`` the offset from
    the centre ``f_xx = 2 kappa dy^2 / r^2``, ``f_yy = 2 kappa dx^2 / r^2``,
    ``f_xy = -2 kappa dx dy / r^2``; the shear adds (g1, g2, -g1).
    """
    x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2 = _as_tensors(
        x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2
    )
    kappa = sie_convergence(x, y, theta_E, e1, e2, center_x, center_y)
    dx, dy = x - center_x, y - center_y
    two_k_r2 = 2.0 * kappa / (dx * dx + dy * dy)
    return two_k_r2 * dy * dy + gamma1, -two_k_r2 * dx * dy + gamma2, two_k_r2 * dx * dx - gamma1


def magnification(x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2):
    """Signed point magnification ``1 / det(A)``, ``A = I - Hessian``; same arguments."""
    fxx, fxy, fyy = hessian(x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2)
    return 1.0 / ((1.0 - fxx) * (1.0 - fyy) - fxy * fxy)


def ray_shoot(x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2):
    """Source-plane positions beta = theta - alpha(theta) [arcsec]."""
    ax, ay = deflection(x, y, theta_E, e1, e2, center_x, center_y, gamma1, gamma2)
    return x - ax, y - ay
