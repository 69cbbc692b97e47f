"""Checks of a ``data`` config (a preset from ``conf/data``) before anything is drawn.

Each problem raises one :class:`ConfigError` naming the key, e.g. ``data.lens.q = [0.0, 1.0] is
outside its domain``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lensexp.errors import ConfigError
from lensexp.sim import mass as massmod
from lensexp.sim.ranges import check_range

SOURCE_KINDS = ("sersic", "cosmos", "mix")


def validate_config(c: DictConfig) -> None:
    """Check a ``data`` config before anything is drawn: one :class:`ConfigError` per problem,
    naming the key (a value of the wrong type included, e.g. ``data.npix=abc``)."""
    for key in ("npix", "pixscale", "supersample", "bands", "lens", "source", "psf", "instrument"):
        if key not in c:
            raise ConfigError(f"data config lacks '{key}'")
    for key, kind in (("npix", int), ("supersample", int), ("pixscale", float), ("instrument.gain", float)):
        v = OmegaConf.select(c, key)
        try:
            kind(v)
        except (TypeError, ValueError):
            raise ConfigError(f"data.{key} must be a number, got {v!r}") from None
        if kind is int and float(v) != int(v):
            raise ConfigError(f"data.{key} must be a whole number, got {v!r}")
    if int(c.npix) < 8:
        raise ConfigError(f"data.npix must be >= 8 pixels, got {c.npix}")
    if not float(c.pixscale) > 0:
        raise ConfigError(f"data.pixscale must be > 0 arcsec/px, got {c.pixscale}")
    if int(c.supersample) < 1:
        raise ConfigError(f"data.supersample must be >= 1, got {c.supersample}")
    if len(c.bands) < 1:
        raise ConfigError("data.bands must list at least one band")
    L = c.lens
    check_range("data.lens.theta_E", L.theta_E, 0.0, strict_low=True)
    check_range("data.lens.q", L.q, 0.0, 1.0, strict_low=True)
    check_range("data.lens.phi", L.phi)
    check_range("data.lens.center", L.center)
    check_range("data.lens.gamma", L.gamma, -0.5, 0.5)
    S = c.source
    if str(S.kind) not in SOURCE_KINDS:
        raise ConfigError(f"data.source.kind must be one of {SOURCE_KINDS}, got '{S.kind}'")
    if not 0.0 <= float(S.cosmos_fraction) <= 1.0:
        raise ConfigError(f"data.source.cosmos_fraction must be in [0, 1], got {S.cosmos_fraction}")
    check_range("data.source.mag", S.mag)
    check_range("data.source.offset", S.offset, 0.0)
    check_range("data.source.sersic.R_sersic", S.sersic.R_sersic, 0.0, strict_low=True)
    check_range("data.source.sersic.n", S.sersic.n, 0.2, 8.0)
    check_range("data.source.sersic.q", S.sersic.q, 0.0, 1.0, strict_low=True)
    check_range("data.source.clumps.n", S.clumps.n, 0, 64)
    check_range("data.source.clumps.sigma", S.clumps.sigma, 0.0, strict_low=True)
    check_range("data.source.clumps.flux_fraction", S.clumps.flux_fraction, 0.0, 1.0)
    check_range("data.source.cosmos.scale", S.cosmos.scale, 0.0, strict_low=True)
    for b in c.bands:
        check_range(f"data.bands[{b.name}].source_scale", b.source_scale, 0.0)
        check_range(f"data.bands[{b.name}].lens_scale", b.lens_scale, 0.0)
    massmod.check_mass_config(c.get("mass"))
    LL = c.lens_light
    if LL.enabled:
        check_range("data.lens_light.mag", LL.mag)
        check_range("data.lens_light.R_sersic", LL.R_sersic, 0.0, strict_low=True)
        check_range("data.lens_light.n", LL.n, 0.2, 8.0)
    P = c.psf
    if str(P.kind) != "empirical":
        check_range("data.psf.fwhm", P.fwhm, 0.0, strict_low=True)
    I = c.instrument
    check_range("data.instrument.exposure_time", I.exposure_time, 0.0, strict_low=True)
    check_range("data.instrument.sky_mag", I.sky_mag)
    check_range("data.instrument.read_noise", I.read_noise, 0.0)
    check_range("data.instrument.bias", I.bias)
    if not float(I.gain) > 0:
        raise ConfigError(f"data.instrument.gain must be > 0 e-/ADU, got {I.gain}")
    if str(I.poisson) not in ("exact", "gaussian"):
        raise ConfigError(f"data.instrument.poisson must be exact or gaussian, got '{I.poisson}'")
    if str(I.normalize) not in ("none", "peak", "std", "quantile"):
        raise ConfigError(f"data.instrument.normalize must be none, peak, std or quantile, got '{I.normalize}'")
    cr, hp, mk = I.cosmic_rays, I.hot_pixels, I.masks
    if cr.enabled:
        check_range("data.instrument.cosmic_rays.length_pix", cr.length_pix, 0.0, strict_low=True)
        check_range("data.instrument.cosmic_rays.width_pix", cr.width_pix, 0.0, strict_low=True)
        check_range("data.instrument.cosmic_rays.amplitude", cr.amplitude, 0.0)
        if float(cr.n_mean) < 0:
            raise ConfigError(f"data.instrument.cosmic_rays.n_mean must be >= 0, got {cr.n_mean}")
    if hp.enabled:
        check_range("data.instrument.hot_pixels.amplitude", hp.amplitude, 0.0)
        if not 0 <= float(hp.fraction) <= 1:
            raise ConfigError(f"data.instrument.hot_pixels.fraction must be in [0, 1], got {hp.fraction}")
    if mk.enabled:
        check_range("data.instrument.masks.n", mk.n, 0, 64)
        check_range("data.instrument.masks.radius", mk.radius, 0.0, strict_low=True)
        if not 0 <= float(mk.keep_arc_flux) <= 1:
            raise ConfigError(f"data.instrument.masks.keep_arc_flux must be in [0, 1], got {mk.keep_arc_flux}")
    if I.correlated_noise.enabled:
        check_range("data.instrument.correlated_noise.fwhm_pix", I.correlated_noise.fwhm_pix, 0.0, strict_low=True)
