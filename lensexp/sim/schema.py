"""Checks of a ``data`` config (a preset from ``conf/data``) before anything is drawn.

Two layers, each problem one :class:`ConfigError` naming the key:

* the structured schema (:class:`DataSchema`, OmegaConf structured config from dataclasses):
  every key a preset may hold and its type (``data.npix=abc``: "data.npix must be a number, got
  'abc'"; a key added with ``+data.lens.thetaE=...``: "data.lens.thetaE is not a setting");
* :func:`validate_config`: physical domains of the values (``data.lens.q = [0.0, 1.0] is
  outside its domain``), through :func:`lensexp.sim.ranges.check_range`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from lensexp.errors import ConfigError
from lensexp.sim import mass as massmod
from lensexp.sim.normalize import NORMALIZE
from lensexp.sim.ranges import check_range

Range = list[float]  # [low, high]; draws are uniform


@dataclass
class Band:
    name: str = MISSING
    source_scale: Range = MISSING  # multiplier of the source flux in this band
    lens_scale: Range = MISSING  # multiplier of the lens-light flux


@dataclass
class Lens:  # SIE + external shear priors
    theta_E: Range = MISSING  # arcsec
    q: Range = MISSING
    phi: Range = MISSING  # rad
    center: Range = MISSING  # arcsec
    gamma: Range = MISSING


@dataclass
class Sersic:
    R_sersic: Range = MISSING  # arcsec
    n: Range = MISSING
    q: Range = MISSING


@dataclass
class Clumps:
    n: Range = MISSING  # integer range
    sigma: Range = MISSING  # arcsec
    flux_fraction: Range = MISSING
    spread: float = MISSING  # in units of R_sersic


@dataclass
class Cosmos:
    catalog: str = MISSING  # GalSim RealGalaxyCatalog FITS
    max_galaxies: int | None = None
    stamp: int = MISSING  # px
    scale: Range = MISSING
    interpolation: str = "bilinear"


@dataclass
class Source:
    kind: str = MISSING
    cosmos_fraction: float = MISSING
    mag: Range = MISSING  # AB
    offset: Range = MISSING  # in units of theta_E
    offset_in: str = "area"  # area | radius: the offset uniform in area or in radius
    min_mu: float = 0.0
    sersic: Sersic = field(default_factory=Sersic)
    clumps: Clumps = field(default_factory=Clumps)
    cosmos: Cosmos = field(default_factory=Cosmos)


@dataclass
class LensLightComponent:
    flux_fraction: Range = MISSING  # share of the lens galaxy's total flux
    R_scale: Range = MISSING  # R_sersic in units of the main component's
    n: Range = MISSING
    q_jitter: float = 0.1  # axis ratio = the main component's +- this
    twist: float = 0.0  # rad, position angle = the main component's +- this (isophote twist)


@dataclass
class LensLight:
    enabled: bool = MISSING
    mag: Range = MISSING
    R_sersic: Range = MISSING
    n: Range = MISSING
    q_jitter: float = MISSING
    components: list[LensLightComponent] = field(default_factory=list)  # further concentric Sérsics


@dataclass
class EmpiricalPSF:
    file: str = MISSING
    pixscale: float = MISSING  # arcsec/px of the cube


@dataclass
class PSF:
    kind: str = MISSING
    fwhm: Range = MISSING  # arcsec
    n_kernels: int = MISSING
    size: int = MISSING  # px
    moffat_beta: Any = 3.5  # a value or a range
    empirical_fraction: float = 0.5
    empirical: EmpiricalPSF = field(default_factory=EmpiricalPSF)


@dataclass
class CorrelatedNoise:
    enabled: bool = False
    fwhm_pix: Range = field(default_factory=lambda: [1.0, 1.0])


@dataclass
class CosmicRays:
    enabled: bool = False
    n_mean: float = 0.0
    length_pix: Range = field(default_factory=lambda: [1.0, 1.0])
    width_pix: Range = field(default_factory=lambda: [1.0, 1.0])
    amplitude: Range = field(default_factory=lambda: [0.0, 0.0])
    worm_fraction: float = 0.0


@dataclass
class HotPixels:
    enabled: bool = False
    fraction: float = 0.0
    amplitude: Range = field(default_factory=lambda: [0.0, 0.0])


@dataclass
class Masks:
    enabled: bool = False
    n: Range = field(default_factory=lambda: [0, 0])
    radius: Range = field(default_factory=lambda: [0.1, 0.1])  # arcsec
    keep_arc_flux: float = 1.0


@dataclass
class Instrument:
    exposure_time: Range = MISSING  # s
    sky_mag: Range = MISSING  # mag / arcsec^2
    zeropoint: float = MISSING  # AB mag for 1 e-/s
    read_noise: Range = MISSING  # e- rms
    gain: float = MISSING  # e- / ADU
    poisson: str = "exact"
    noise: bool = True
    bias: Range = field(default_factory=lambda: [0.0, 0.0])  # e-/s/px
    correlated_noise: CorrelatedNoise = field(default_factory=CorrelatedNoise)
    cosmic_rays: CosmicRays = field(default_factory=CosmicRays)
    hot_pixels: HotPixels = field(default_factory=HotPixels)
    masks: Masks = field(default_factory=Masks)
    normalize: str = "none"


@dataclass
class Adaptive:
    enabled: bool = False  # supersample only where needed (lensexp/sim/adaptive.py)
    tolerance: float = 0.01  # estimated sampling error allowed per pixel, in units of the lowest sky noise


@dataclass
class DataSchema:
    """Every setting of a data preset and its type (ranges checked by :func:`validate_config`)."""

    name: str = MISSING
    npix: int = MISSING  # px per side
    pixscale: float = MISSING  # arcsec/px
    supersample: int = MISSING  # rays per pixel per axis
    adaptive: Adaptive = field(default_factory=Adaptive)
    dtype: str = "float32"
    bands: list[Band] = MISSING
    labels: list[str] = MISSING
    lens: Lens = field(default_factory=Lens)
    source: Source = field(default_factory=Source)
    lens_light: LensLight = field(default_factory=LensLight)
    psf: PSF = field(default_factory=PSF)
    instrument: Instrument = field(default_factory=Instrument)
    mass: Any | None = None  # density-map families (lensexp/sim/mass.py checks them)


def check_schema(c: DictConfig) -> None:
    """Types and key names of a data config against :class:`DataSchema` (the config itself is
    not changed); one :class:`ConfigError` naming the key."""
    try:
        OmegaConf.merge(OmegaConf.structured(DataSchema), c)
    except ConfigKeyError as exc:
        key = getattr(exc, "full_key", None) or str(exc).splitlines()[0]
        raise ConfigError(f"data.{key} is not a setting of a data preset (see conf/data/tiny.yaml)") from None
    except ValidationError as exc:
        key, value = str(getattr(exc, "full_key", "")), getattr(exc, "value", None)
        expected = str(exc).splitlines()[0]
        if "Integer" in expected:
            try:
                float(value)
                what = "a whole number"
            except (TypeError, ValueError):
                what = "a number"
        elif "Float" in expected:
            what = "a number"
        elif "bool" in expected.lower():
            what = "true or false"
        elif "ListConfig" in expected:
            what = "a list ([low, high] for a range)"
        else:
            raise ConfigError(f"data.{key} has the wrong type ({expected.rstrip('.')})") from None
        raise ConfigError(f"data.{key} must be {what}, got {value!r}") from None


OFFSET_IN = ("area", "radius")  # how data.source.offset is sampled: uniform in area or in radius
SOURCE_KINDS = ("sersic", "cosmos", "mix")


def validate_config(c: DictConfig) -> None:
    """Check a ``data`` config before anything is drawn: one :class:`ConfigError` per problem,
    naming the key (a value of the wrong type included, e.g. ``data.npix=abc``)."""
    for key in ("npix", "pixscale", "supersample", "bands", "lens", "source", "psf", "instrument"):
        if key not in c:
            raise ConfigError(f"data config lacks '{key}'")
    check_schema(c)
    if int(c.npix) < 8:
        raise ConfigError(f"data.npix must be >= 8 pixels, got {c.npix}")
    if not float(c.pixscale) > 0:
        raise ConfigError(f"data.pixscale must be > 0 arcsec/px, got {c.pixscale}")
    if int(c.supersample) < 1:
        raise ConfigError(f"data.supersample must be >= 1, got {c.supersample}")
    ad = c.get("adaptive")
    if ad is not None and ad.get("enabled", False):
        if not float(ad.get("tolerance", 0.01)) > 0:
            raise ConfigError(f"data.adaptive.tolerance must be > 0 (units of the sky noise), got {ad.tolerance}")
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
    if str(S.offset_in) not in OFFSET_IN:
        raise ConfigError(f"data.source.offset_in must be one of {OFFSET_IN}, got '{S.offset_in}'")
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
        for k, comp in enumerate(LL.get("components") or []):
            key = f"data.lens_light.components[{k}]"
            check_range(f"{key}.flux_fraction", comp.flux_fraction, 0.0, 1.0)
            check_range(f"{key}.R_scale", comp.R_scale, 0.0, strict_low=True)
            check_range(f"{key}.n", comp.n, 0.2, 8.0)
        top = sum(max(comp.flux_fraction) for comp in LL.get("components") or [])
        if top >= 1.0:
            raise ConfigError(
                f"data.lens_light.components take up to {top:g} of the lens light's flux together: "
                "their flux_fraction highs must sum to < 1 (the main component keeps the rest)"
            )
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
    if str(I.normalize) not in NORMALIZE:
        raise ConfigError(f"data.instrument.normalize must be one of {NORMALIZE}, got '{I.normalize}'")
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
