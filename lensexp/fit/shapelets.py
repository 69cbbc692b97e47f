"""A shapelet source on top of the Sérsic: the fit's last stage (lenstronomy's ``SHAPELETS``).

Cartesian shapelets (Refregier 2003) of order ``n1 + n2 <= n_max`` and scale ``beta`` [arcsec],
centred on the first source Sérsic, in lenstronomy's convention (``Shapelets.function``, no
``1/beta`` factor): ``phi_n1((x - xc) / beta) phi_n2((y - yc) / beta)`` with ``phi_n(u) =
(2^n sqrt(pi) n!)^-1/2 H_n(u) exp(-u^2 / 2)`` [e-/s per arcsec^2 per unit coefficient]. Their
coefficients are linear and signed, so they are solved by weighted least squares at every
evaluation (profiled); ``beta`` joins the non-linear parameters. The stage starts from the best
polished Sérsic-only fit, and its result is kept only when the Bayesian information criterion
prefers it (``-ln L`` better by more than ``(K + 1) ln(n_pix) / 2`` for ``K`` coefficients).
"""

from __future__ import annotations

import math

import torch

from lensexp.fit.lbfgs import minimise
from lensexp.fit.model import MASS, likelihood_terms, prior_penalty, rho
from lensexp.sim.trace import EAGER, convolve_psf, lens_coefficients, shoot, subpixel_planes


def n_basis(n_max: int) -> int:
    """Number of shapelets with ``n1 + n2 <= n_max``."""
    return (n_max + 1) * (n_max + 2) // 2


def orders(n_max: int) -> list[tuple[int, int]]:
    """(n1, n2) of every shapelet, by total order then n1."""
    return [(n - k, k) for n in range(n_max + 1) for k in range(n + 1)]


def hermite_functions(u: torch.Tensor, n_max: int) -> list[torch.Tensor]:
    """``phi_0 .. phi_n_max`` at ``u`` by the stable three-term recurrence."""
    phi = [math.pi**-0.25 * torch.exp(-0.5 * u * u)]
    if n_max >= 1:
        phi.append(math.sqrt(2.0) * u * phi[0])
    for n in range(1, n_max):
        phi.append(math.sqrt(2.0 / (n + 1)) * u * phi[n] - math.sqrt(n / (n + 1)) * phi[n - 1])
    return phi


def shapelet_sb(x: torch.Tensor, y: torch.Tensor, beta: torch.Tensor, n_max: int) -> torch.Tensor:
    """Surface brightness [..., K, P] of each unit-coefficient shapelet at offsets x, y [..., P]
    from its centre; ``beta`` [..., 1] arcsec."""
    hx, hy = hermite_functions(x / beta, n_max), hermite_functions(y / beta, n_max)
    return torch.stack([hx[a] * hy[b] for a, b in orders(n_max)], -2)


def intrinsic_flux(beta: torch.Tensor, n_max: int) -> torch.Tensor:
    """Total flux [..., K] of each unit-coefficient shapelet: ``beta^2 I_n1 I_n2`` with ``I_n =
    int phi_n = sqrt(2 pi) n! / (n/2)! / sqrt(2^n sqrt(pi) n!)`` for even n, 0 for odd n."""

    def integral(n):
        if n % 2:
            return 0.0
        return (
            math.sqrt(2 * math.pi)
            * math.factorial(n)
            / math.factorial(n // 2)
            / math.sqrt(2**n * math.sqrt(math.pi) * math.factorial(n))
        )

    i = torch.tensor([integral(a) * integral(b) for a, b in orders(n_max)], dtype=beta.dtype, device=beta.device)
    return beta[..., None] ** 2 * i


def shapelet_templates(p: dict, n_max: int, npix: int, pixscale: float, supersample: int, psf=None, pw=EAGER):
    """Lensed unit-coefficient shapelet images of one lens: (PSF-convolved [K, N, N], lensed flux
    before the PSF [K]) for parameters ``p`` (scalars: mass, ``src_x``, ``src_y``, ``sh_beta``);
    rays shot with the per-ray functions ``pw``."""
    dt = p["theta_E"].dtype
    x, y = subpixel_planes(npix, pixscale, supersample, dt, p["theta_E"].device)
    coef = lens_coefficients({k: p[k].reshape(1) for k in MASS})
    planes = supersample * supersample
    xs, ys = x.reshape(planes, -1), y.reshape(planes, -1)
    beta = p["sh_beta"].reshape(1, 1)
    total = 0.0
    for k in range(planes):
        bx, by = shoot(xs[k : k + 1], ys[k : k + 1], coef, pw=pw)
        total = total + shapelet_sb(bx - p["src_x"], by - p["src_y"], beta, n_max)[0]
    img = (total * (pixscale / supersample) ** 2).reshape(-1, npix, npix)
    return convolve_psf(img, psf), img.sum((1, 2))


def solve_signed(S: torch.Tensor, r: torch.Tensor, w: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """Weighted least-squares coefficients [K] (signed) of templates S [K, N, N] for the residual
    r [N, N] with weights w [N, N]; a relative ridge keeps shapelets off the data at zero."""
    Sf = S.flatten(1)
    A = (Sf * w.flatten()) @ Sf.T
    b = Sf @ (w * r).flatten()
    diag = A.diagonal()
    A = A + (ridge * diag.amax().clamp(min=torch.finfo(S.dtype).tiny)) * torch.eye(
        len(b), dtype=S.dtype, device=S.device
    )
    return torch.linalg.solve(A, b)


def bic_threshold(n_max: int, n_pix: int) -> float:
    """Improvement in ``-ln L`` the shapelets must bring to be kept: ``(K + 1) ln(n_pix) / 2``."""
    return 0.5 * (n_basis(n_max) + 1) * math.log(max(n_pix, 2))


def profiled_model(pv, amps, beta, w, obs, b, space, model, n_max, outlier_sigma=None, npix_sh=None):
    """Model image [1, N, N] of lens ``b`` for physical parameters pv [P], amplitudes [K_model]
    and shapelet scale ``beta`` with the shapelet coefficients solved for weights w [1, N, N]
    (outliers of a first solve down-weighted, as in IRLS); also returns the coefficients, the
    shapelet templates and their lensed fluxes. The shapelets are drawn on the centred
    ``npix_sh`` cut-out where the arcs are (zero outside; ``None``: the whole grid)."""
    d, sl = obs.data[b : b + 1], slice(b, b + 1)
    pd = space.as_dict(pv[None])
    base = (amps[None, :, None, None] * model.templates(pd, obs.psf[sl])).sum(1)
    q = {k: pd[k][0] for k in (*MASS, "src_x", "src_y")}
    n_c = min(npix_sh or model.npix, model.npix)
    S, flux = shapelet_templates({**q, "sh_beta": beta}, n_max, n_c, model.pixscale, model.ss, obs.psf[b], model.pw)
    k = (model.npix - n_c) // 2
    S = torch.nn.functional.pad(S, (k, k, k, k)) if k else S
    r = (d - base)[0]
    c = solve_signed(S, r, w[0])
    if outlier_sigma:
        z2 = (w[0] * (r - (c[:, None, None] * S).sum(0)) ** 2).detach()
        c = solve_signed(S, r, w[0] * torch.exp(-0.5 * z2 + rho(z2, outlier_sigma)))
    return base + (c[:, None, None] * S).sum(0)[None], c, S, flux


def profiled_loss(x, w, obs, b, space, model, n_max, outlier_sigma, center_sigma, npix_sh=None):
    """``-ln`` posterior of lens ``b`` at x = [physical parameters, amplitudes, beta] with the
    shapelet coefficients profiled and pixel weights w held fixed (what the Laplace
    approximation differentiates when the shapelets are kept)."""
    P = len(space.names)
    m = profiled_model(x[:P], x[P:-1], x[-1], w, obs, b, space, model, n_max, outlier_sigma, npix_sh)[0]
    d, use = obs.data[b : b + 1], obs.use[b : b + 1]
    chi = (rho(w * (d - m) ** 2, outlier_sigma) * use).sum()
    return chi + prior_penalty(space.as_dict(x[:P]), center_sigma)


def refine(best: dict, obs, b: int, space, model, fs, n_max: int, beta_box: tuple[float, float], npix_sh=None) -> dict:
    """The shapelet stage for lens ``b`` from the polished Sérsic-only result ``best``: L-BFGS over
    the non-linear parameters, the log amplitudes and ``sh_beta`` (boxed in ``beta_box``, started
    at the Sérsic radius) with the shapelet coefficients profiled, by reweighted rounds as the
    polish. Returns a result dict like ``best`` with ``p['sh_beta']``, ``sh_coef`` [K],
    ``sh_image`` [N, N] (lensed, convolved) and ``sh_flux`` (lensed, intrinsic) added."""
    d, use, sl = obs.data[b : b + 1], obs.use[b : b + 1], slice(b, b + 1)
    lo, hi = beta_box
    P = len(space.names)
    f0 = (min(max(float(best["p"]["src_R"]), 2 * lo), 0.5 * hi) - lo) / (hi - lo)
    p0 = torch.stack([best["p"][n] for n in space.names]).to(d.dtype)
    u = torch.cat([space.to_u(p0), torch.tensor([math.log(f0 / (1 - f0))], dtype=d.dtype, device=d.device)])
    u = u.clone().requires_grad_(True)
    la = torch.log(best["amps"].clamp(min=1e-30)).clone().requires_grad_(True)
    beta_of = lambda u: lo + (hi - lo) * torch.sigmoid(u[P])  # noqa: E731
    x_of = lambda: torch.cat([space.to_p(u[:P]), torch.exp(la), beta_of(u)[None]])  # noqa: E731
    var = best["var"][None]
    rounds = fs.irls_rounds if float(obs.inv_t[b]) > 0 else 1
    for _ in range(rounds):
        w = use / var
        args = (w, obs, b, space, model, n_max, fs.outlier_sigma, fs.center_sigma, npix_sh)
        minimise([u, la], lambda args=args: profiled_loss(x_of(), *args), fs.lbfgs_iters)
        with torch.no_grad():
            pv, beta = space.to_p(u[:P]), beta_of(u)
            m, c, S, flux = profiled_model(
                pv, torch.exp(la), beta, w, obs, b, space, model, n_max, fs.outlier_sigma, npix_sh
            )
            var = obs.variance(m, sl)
    with torch.no_grad():
        terms = likelihood_terms(m, d, use, var, fs.outlier_sigma)
        p_fit = space.as_dict(pv)
        terms["nll"] = terms["nll"] + prior_penalty(p_fit, fs.center_sigma)
        p_fit["sh_beta"] = beta
        return {
            "p": p_fit,
            "amps": torch.exp(la),
            **{k: (float(v[0]) if v.is_floating_point() else int(v[0])) for k, v in terms.items()},
            "var": var[0],
            "sh_coef": c,
            "sh_image": (c[:, None, None] * S).sum(0),
            "sh_flux": (float((c * flux).sum()), float((c * intrinsic_flux(beta, n_max)).sum())),
        }
