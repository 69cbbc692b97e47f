"""Image model and likelihood of the fit: parameter boxes, unit-amplitude component images
through the simulator's forward model, linear amplitudes, the noise model and the robust
Gaussian likelihood (lenstronomy's ImSim + Likelihood rooms)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lensexp.sim.priors import LABELS
from lensexp.sim.trace import EAGER, Pointwise, render_sersic
from lensexp.sim.source import sersic_total_flux

MASS = LABELS[:-1]
SOURCE = ("src_R", "src_n", "src_e1", "src_e2", "src_x", "src_y")
SOURCE2 = tuple("src2" + n[3:] for n in SOURCE)  # a second source Sérsic (source_components=2)
SOURCE_PREFIXES = ("src_", "src2_")
LIGHT = ("ll_x", "ll_y", "ll_R", "ll_n", "ll_e1", "ll_e2")  # centre shared by the light components
LIGHT2 = ("ll2_R", "ll2_n", "ll2_e1", "ll2_e2")
LIGHT3 = tuple("ll3" + n[3:] for n in LIGHT2)
LIGHT_PREFIXES = ("ll_", "ll2_", "ll3_")
# unlensed Sérsics with their own centres: neighbouring galaxies (companions) left unmasked in the data
COMPANION = ("cp_x", "cp_y", "cp_R", "cp_n", "cp_e1", "cp_e2")
COMPANION2 = tuple("cp2" + n[2:] for n in COMPANION)
COMPANION_PREFIXES = ("cp_", "cp2_")
# starts of the further light components relative to the first: (R / R_first, Sérsic n): a core and
# an envelope (ellipticals' outer light falls off unlike their body), same centre and ellipticity
EXTRA_LIGHT_STARTS = {"ll2_": (0.3, 1.0), "ll3_": (3.0, 1.0)}


def extra_light_starts(first: dict, n_light: int) -> dict:
    """Start values of lens-light components 2..``n_light`` from the first one's ``ll_R``,
    ``ll_e1``, ``ll_e2`` (tensors [M]), by parameter name."""
    out = {}
    for prefix in LIGHT_PREFIXES[1 : int(n_light)]:
        ratio, n = EXTRA_LIGHT_STARTS[prefix]
        out[prefix + "R"] = ratio * first["ll_R"]
        out[prefix + "n"] = torch.full_like(first["ll_R"], n)
        out[prefix + "e1"], out[prefix + "e2"] = first["ll_e1"], first["ll_e2"]
    return out


def light_names(n_light: int) -> tuple:
    """Lens-light parameters of ``n_light`` (0-3) concentric elliptical Sérsic components."""
    return (LIGHT if n_light >= 1 else ()) + (LIGHT2 if n_light >= 2 else ()) + (LIGHT3 if n_light >= 3 else ())


def source_names(n_src: int) -> tuple:
    """Source parameters of ``n_src`` (1, 2) elliptical Sérsic components, each with its own centre."""
    return SOURCE + (SOURCE2 if n_src >= 2 else ())


def companion_names(n_comp: int) -> tuple:
    """Parameters of ``n_comp`` (0-2) unlensed companion Sérsics, each with its own centre."""
    return (COMPANION if n_comp >= 1 else ()) + (COMPANION2 if n_comp >= 2 else ())


def param_names(n_light: int, n_src: int = 1, n_comp: int = 0) -> tuple:
    """Non-linear parameters fitted: mass, source shapes and positions (+ lens light, companions)."""
    return MASS + source_names(int(n_src)) + light_names(int(n_light)) + companion_names(int(n_comp))


def amp_names(n_light: int, n_src: int = 1, n_comp: int = 0) -> list[str]:
    """Linear amplitudes, in the order of :meth:`LensModel.templates`: sources, lens light, companions."""
    prefixes = SOURCE_PREFIXES[: int(n_src)] + LIGHT_PREFIXES[: int(n_light)] + COMPANION_PREFIXES[: int(n_comp)]
    return [k + "amp" for k in prefixes]


@dataclass
class ParamSpace:
    """Non-linear parameters in boxes ``[lo, hi]``, optimised as ``u`` with
    ``p = lo + (hi - lo) sigmoid(u)`` (so every step stays physical)."""

    names: tuple
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def for_grid(
        cls,
        npix: int,
        pixscale: float,
        n_light: int,
        dtype=torch.float64,
        shear_max: float = 0.3,
        theta_E_range: tuple[float, float] | None = None,
        src_R_max: float | None = None,
        n_src: int = 1,
        n_comp: int = 0,
    ) -> ParamSpace:
        """Bounds for an ``npix`` grid of ``pixscale`` arcsec/px (field of view ``F``): theta_E in
        [0.05", F/2] (within ``theta_E_range`` when given: the CLI takes the data preset's prior),
        |e| components within +-0.7 (the mass's modulus below 0.7, q > 0.18, by
        :func:`ellipticity_wall`), lens (and lens-light) centre within F/8 of
        the cut-out's centre (0.8" at 64 x 0.1"), |gamma1|, |gamma2| < ``shear_max`` (the CLI
        takes it from the data preset's shear prior), source in the field, R_sersic in
        [pixscale/4, F/4] (at most ``src_R_max`` when given), n in [0.3, 6] (a second source
        component, ``n_src=2``, in the same boxes); lens light R in [pixscale/2, F/2], n in
        [0.5, 8] for every component; companions (``n_comp``) anywhere in the field, R in
        [pixscale/2, F/8], n in [0.5, 8]."""
        fov = npix * pixscale
        t_lo, t_hi = 0.05, fov / 2
        if theta_E_range is not None:
            t_lo, t_hi = max(t_lo, float(theta_E_range[0])), min(t_hi, float(theta_E_range[1]))
            if not t_lo < t_hi:
                raise ValueError(
                    f"theta_E range {tuple(theta_E_range)} leaves nothing inside [0.05, {fov / 2:.3g}] arcsec"
                )
        r_lo, r_hi = pixscale / 4, fov / 4
        if src_R_max is not None:
            r_hi = min(r_hi, float(src_R_max))
            if not r_lo < r_hi:
                raise ValueError(f"source R_sersic bound {src_R_max} arcsec is below a quarter pixel ({r_lo:.3g})")
        b = {
            "theta_E": (t_lo, t_hi),
            "e1": (-0.7, 0.7),
            "e2": (-0.7, 0.7),
            "center_x": (-fov / 8, fov / 8),
            "center_y": (-fov / 8, fov / 8),
            "gamma1": (-shear_max, shear_max),
            "gamma2": (-shear_max, shear_max),
            "src_R": (r_lo, r_hi),
            "src_n": (0.3, 6.0),
            "src_e1": (-0.7, 0.7),
            "src_e2": (-0.7, 0.7),
            "src_x": (-fov / 2, fov / 2),
            "src_y": (-fov / 2, fov / 2),
            "ll_x": (-fov / 8, fov / 8),
            "ll_y": (-fov / 8, fov / 8),
            "ll_R": (pixscale / 2, fov / 2),
            "ll_n": (0.5, 8.0),
            "ll_e1": (-0.7, 0.7),
            "ll_e2": (-0.7, 0.7),
        }
        b.update({c + k[3:]: b[k] for k in ("ll_R", "ll_n", "ll_e1", "ll_e2") for c in LIGHT_PREFIXES[1:]})
        b.update({"src2" + k[3:]: b[k] for k in SOURCE})
        b.update({"cp_x": b["src_x"], "cp_y": b["src_y"], "cp_R": (pixscale / 2, fov / 8), "cp_n": b["ll_n"]})
        b.update({"cp_e1": b["ll_e1"], "cp_e2": b["ll_e2"]})
        b.update({"cp2" + k[2:]: b[k] for k in COMPANION})
        names = param_names(n_light, n_src, n_comp)
        lo = torch.tensor([b[n][0] for n in names], dtype=dtype)
        hi = torch.tensor([b[n][1] for n in names], dtype=dtype)
        return cls(names, lo, hi)

    def to(self, dtype=None, device=None) -> ParamSpace:
        return ParamSpace(self.names, self.lo.to(device, dtype), self.hi.to(device, dtype))

    def fixing(self, values: dict) -> ParamSpace:
        """The same space with the parameters ``values`` (name -> value) held fixed: a box of zero
        width, so :meth:`to_p` returns the value whatever ``u`` is and its gradient is zero."""
        lo, hi = self.lo.clone(), self.hi.clone()
        for name, v in values.items():
            i = self.names.index(name)
            lo[i] = hi[i] = float(v)
        return ParamSpace(self.names, lo, hi)

    @property
    def free(self) -> torch.Tensor:
        """Which parameters [P] bool are free (a box of non-zero width)."""
        return self.hi > self.lo

    def to_u(self, p: torch.Tensor) -> torch.Tensor:
        """Physical [M, P] -> unconstrained (clipped just inside the box; 0 for fixed parameters)."""
        width = self.hi - self.lo
        f = ((p - self.lo) / torch.where(width > 0, width, 1.0)).clamp(1e-6, 1 - 1e-6)
        return torch.where(width > 0, torch.logit(f), 0.0)

    def to_p(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.sigmoid(u)

    def as_dict(self, p: torch.Tensor) -> dict:
        return {n: p[..., i] for i, n in enumerate(self.names)}


# ---------------------------------------------------------------------------- forward model
class LensModel:
    """Unit-amplitude component images [M, K, N, N] on one grid: K = ``n_src`` lensed source
    Sérsics (1 or 2) + ``n_light`` (0-3) concentric Sérsic lens-light components (centre ``ll_x,
    ll_y``, free of the mass centre) + ``n_comp`` (0-2) unlensed companion Sérsics, rendered
    with the per-ray functions ``pw`` (``lensexp.fit.kernels``: compiled or the library's)."""

    def __init__(
        self,
        npix: int,
        pixscale: float,
        supersample: int,
        n_light: int,
        n_src: int = 1,
        n_comp: int = 0,
        pw: Pointwise = EAGER,
    ):
        self.npix, self.pixscale, self.ss = int(npix), float(pixscale), int(supersample)
        self.n_light, self.n_src, self.n_comp = int(n_light), int(n_src), int(n_comp)
        self.lens_light = self.n_light > 0
        self.K = self.n_src + self.n_light + self.n_comp
        self.pw = pw

    def like(self, npix: int | None = None, supersample: int | None = None, pw: Pointwise | None = None) -> LensModel:
        """The same components on another (centred) grid or supersampling, or with other per-ray
        functions (``pw=EAGER`` for second derivatives: compiled kernels have a first backward only)."""
        grid = (npix or self.npix, self.pixscale, supersample or self.ss)
        return LensModel(*grid, self.n_light, self.n_src, self.n_comp, pw or self.pw)

    def light_templates(self, p: dict, psf: torch.Tensor | None) -> torch.Tensor:
        """The lens-light components alone [M, n_light, N, N] (one centre, ``ll_x, ll_y``)."""
        return self._unlensed(p, psf, LIGHT_PREFIXES[: self.n_light], lambda prefix: "ll_")

    def companion_templates(self, p: dict, psf: torch.Tensor | None) -> torch.Tensor:
        """The unlensed companions alone [M, n_comp, N, N] (each its own centre)."""
        return self._unlensed(p, psf, COMPANION_PREFIXES[: self.n_comp], lambda prefix: prefix)

    def _unlensed(self, p: dict, psf, prefixes, centre_of) -> torch.Tensor:
        """Unit Sérsics ``<prefix>R, n, e1, e2`` centred on ``<centre_of(prefix)>x, y``, not lensed."""
        out = []
        for prefix in prefixes:
            c = centre_of(prefix)
            light = _unit_sersic(p, prefix, p[c + "x"], p[c + "y"])
            out.append(render_sersic(None, light, self.npix, self.pixscale, self.ss, psf, p[c + "x"].dtype, self.pw))
        return torch.stack(out, 1)

    def source_templates(self, p: dict, psf: torch.Tensor | None) -> torch.Tensor:
        """The lensed source components alone [M, n_src, N, N]."""
        lens = {k: p[k] for k in MASS}
        out = []
        for prefix in SOURCE_PREFIXES[: self.n_src]:
            src = _unit_sersic(p, prefix, p[prefix + "x"], p[prefix + "y"])
            out.append(render_sersic(lens, src, self.npix, self.pixscale, self.ss, psf, p["theta_E"].dtype, self.pw))
        return torch.stack(out, 1)

    def templates(self, p: dict, psf: torch.Tensor | None) -> torch.Tensor:
        out = self.source_templates(p, psf)
        if self.lens_light:
            out = torch.cat([out, self.light_templates(p, psf)], 1)
        if self.n_comp:
            out = torch.cat([out, self.companion_templates(p, psf)], 1)
        return out

    def mu_F(self, p: dict, amps: torch.Tensor | None = None, extra=(0.0, 0.0)) -> torch.Tensor:
        """Flux magnification of the fitted source: lensed flux in the field (before the PSF) over
        its total intrinsic flux (the label convention); with two source components weighted by
        their amplitudes ``amps`` [M, >= n_src]; ``extra`` = (lensed, intrinsic) flux of further
        source light (e.g. shapelets), added to both."""
        T = self.source_templates(p, None).sum((2, 3))  # [M, n_src]
        one = torch.ones_like(p["src_R"])
        F = torch.stack([sersic_total_flux(one, p[k + "R"], p[k + "n"]) for k in SOURCE_PREFIXES[: self.n_src]], 1)
        a = torch.ones_like(T) if amps is None else amps[:, : self.n_src].to(T)
        intrinsic = (a * F).sum(1) + extra[1]
        mu = ((a * T).sum(1) + extra[0]) / intrinsic.clamp(min=torch.finfo(T.dtype).tiny)
        return torch.where(intrinsic < 0, torch.full_like(mu, math.nan), mu)  # signed extra light: no magnification


def _unit_sersic(p: dict, prefix: str, center_x, center_y) -> dict:
    """lenstronomy ``SERSIC_ELLIPSE`` keywords of unit amplitude from fit parameters ``<prefix>R``,
    ``n``, ``e1``, ``e2``."""
    return {
        "amp": torch.ones_like(center_x),
        "R_sersic": p[prefix + "R"],
        "n_sersic": p[prefix + "n"],
        "e1": p[prefix + "e1"],
        "e2": p[prefix + "e2"],
        "center_x": center_x,
        "center_y": center_y,
    }


def solve_amplitudes(T: torch.Tensor, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares amplitudes [M, K] of templates T [M, K, N, N] for data d and
    inverse-variance weights w [M, N, N] (differentiable; clamped at >= 0)."""
    Tf = T.flatten(2)
    Tw = Tf * w.flatten(1)[:, None]  # as batched matrix products: a three-operand einsum formed [M, K, K, P]
    A = torch.bmm(Tw, Tf.transpose(1, 2))
    b = torch.bmm(Tw, d.flatten(1)[:, :, None])[..., 0]
    diag = A.diagonal(dim1=1, dim2=2)
    eye = torch.eye(T.shape[1], dtype=T.dtype, device=T.device)
    # a component with no flux on the used pixels (e.g. a source mapped off the data) gets amplitude 0
    dead = ~(diag > 1e-9 * diag.amax(1, keepdim=True).clamp(min=torch.finfo(T.dtype).tiny))
    rel = 1e-7 if T.dtype == torch.float32 else 1e-12
    ridge = rel * diag.amax(1).clamp(min=torch.finfo(T.dtype).tiny)
    A = torch.where(dead[:, :, None] | dead[:, None, :], eye.expand_as(A), A) + ridge[:, None, None] * eye
    b = torch.where(dead, torch.zeros_like(b), b)
    x, info = torch.linalg.solve_ex(A, b)
    return torch.where((info == 0)[:, None], x, torch.zeros_like(x)).nan_to_num(0.0, 0.0, 0.0).clamp(min=0)


@dataclass
class Observation:
    """A batch of lenses: data [B, N, N] (e-/s), ``use`` [B, N, N] (pixels in the likelihood), PSF
    kernels [B, k, k] and the noise model ``variance = bg_var + model * inv_t`` (each [B])."""

    data: torch.Tensor
    use: torch.Tensor
    psf: torch.Tensor
    bg_var: torch.Tensor
    inv_t: torch.Tensor

    def variance(self, model: torch.Tensor, idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Pixel variance [(e-/s)^2] of the lenses ``idx`` for model (or data) images;
        ``bg_var`` is one number per lens [B] or a map per lens [B, N, N] (noise maps)."""
        bg = self.bg_var[idx]
        if bg.ndim == 1:
            bg = bg[:, None, None]
        return bg + model.clamp(min=0) * self.inv_t[idx, None, None]

    def select(self, idx: torch.Tensor) -> Observation:
        """The lenses ``idx`` [M] (repeats allowed: e.g. one row per start)."""
        return Observation(self.data[idx], self.use[idx], self.psf[idx], self.bg_var[idx], self.inv_t[idx])

    def to(self, dtype=None, device=None) -> Observation:
        return Observation(
            *(
                t.to(device, dtype) if t.is_floating_point() else t.to(device)
                for t in (self.data, self.use, self.psf, self.bg_var, self.inv_t)
            )
        )

    def crop(self, n: int) -> Observation:
        """The centred ``n`` x ``n`` cut-out (``n`` of the grid's parity, so the pixel-grid centre
        and every pixel centre stay where they were)."""
        N = self.data.shape[-1]
        k = (N - n) // 2
        if k <= 0:
            return self
        sl = (slice(None), slice(k, N - k), slice(k, N - k))
        bg = self.bg_var[sl] if self.bg_var.ndim == 3 else self.bg_var
        return Observation(self.data[sl], self.use[sl], self.psf, bg, self.inv_t)

    def weights(self) -> torch.Tensor:
        """Inverse variance from the data themselves (fixed; for the Adam stage)."""
        return self.use / self.variance(self.data)


def rho(z2: torch.Tensor, outlier_sigma: float | None) -> torch.Tensor:
    """Per-pixel ``-ln L`` of a normalised squared residual ``z^2``: Gaussian ``z^2 / 2`` or, with
    ``outlier_sigma = c``, a Gaussian plus a flat outlier term (cosmic rays, hot pixels, source
    structure the model lacks), ``-ln(exp(-z^2/2) + exp(-c^2/2))``: quadratic well inside ``c``
    sigma, constant far outside, smooth in between."""
    if not outlier_sigma:
        return 0.5 * z2
    return -torch.logaddexp(-0.5 * z2, torch.full_like(z2, -0.5 * outlier_sigma**2))


E_MAX = 0.7  # largest mass ellipticity modulus |e| = (1 - q) / (1 + q): q > 0.18
E_WALL = 0.002  # width of the wall beyond E_MAX (-ln prior 12.5 at |e| = E_MAX + 5 E_WALL)


def ellipticity_wall(p: dict):
    """``-ln`` of the prior |e| < :data:`E_MAX` on the mass ellipticity: 0 inside, a steep
    quadratic wall outside (``0.5 ((|e| - E_MAX) / E_WALL)^2`` to first order, written in |e|^2 so
    the gradient is finite at e = 0). The box of ``e1``, ``e2`` alone (each within +-0.7) lets its
    corners reach |e| = 0.99, q = 0.005: a simulated SLACS-like lens fitted a cosmic-ray streak
    with a q = 0.09 mass there."""
    excess = torch.relu(p["e1"] ** 2 + p["e2"] ** 2 - E_MAX**2) / (2 * E_MAX * E_WALL)
    return 0.5 * excess**2


def prior_penalty(p: dict, center_sigma: float | None):
    """``-ln`` of the fit's priors beyond its boxes: :func:`center_penalty` + :func:`ellipticity_wall`."""
    return center_penalty(p, center_sigma) + ellipticity_wall(p)


def center_penalty(p: dict, sigma: float | None):
    """``-ln`` of a Gaussian prior of width ``sigma`` [arcsec] on the offset between the mass
    centre and the lens light's centre (0 without lens light or prior): an elliptical's light
    traces the stellar mass that dominates inside theta_E, so the mass centre does not wander
    onto an arc or a neighbour. Shape of ``p``'s entries (``[M]`` or scalar); ``sigma`` a float
    or one per entry [M]."""
    if sigma is None or (not torch.is_tensor(sigma) and not sigma) or "ll_x" not in p:
        return 0.0
    d2 = (p["center_x"] - p["ll_x"]) ** 2 + (p["center_y"] - p["ll_y"]) ** 2
    # per-entry sigmas squared in float64 and then rounded, as a Python float's square is: the same numbers either way
    var = sigma.to(torch.float64).square().to(d2.dtype) if torch.is_tensor(sigma) else sigma**2
    return 0.5 * d2 / var


def likelihood_terms(model, data, use, var, outlier_sigma) -> dict:
    """``nll`` (robust Gaussian ``-ln L`` without the 2 pi constant), ``chi2`` and ``n_pix`` over
    the inlier pixels (``|z| < outlier_sigma``), ``n_out`` outliers; each [M]."""
    z2 = (data - model) ** 2 / var
    inlier = use & (z2 < outlier_sigma**2) if outlier_sigma else use
    return {
        "nll": ((rho(z2, outlier_sigma) + 0.5 * torch.log(var)) * use).sum((1, 2)),
        "chi2": (z2 * inlier).sum((1, 2)),
        "n_pix": inlier.sum((1, 2)),
        "n_out": (use & ~inlier).sum((1, 2)),
    }
