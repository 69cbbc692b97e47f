"""Point-spread functions: GalSim-drawn kernel banks, empirical FITS PSFs, batched FFT convolution.

A :class:`PSFBank` holds ``K`` normalised kernels [K, k, k] at the image pixel scale and their
FFTs at the padded size of one image grid, so that a batch convolves with one gather, one rfft2
of the images and one irfft2 - no per-image Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from lensexp.errors import ConfigError
from lensexp.paths import resolve_path

log = logging.getLogger(__name__)

PROFILES = ("gaussian", "moffat", "airy")
EE_RADII = (0.05, 0.1, 0.2, 0.3, 0.5)  # arcsec: the encircled-energy radii that describe a PSF to a network
EE_KEYS = tuple(f"psf_ee_{r:g}" for r in EE_RADII)  # their names in the samples' meta.json


def encircled_energy(kernels, pixscale: float, radii=EE_RADII, sub: int = 8) -> torch.Tensor:
    """Fraction of each kernel's flux within ``radii`` [arcsec] of its centre pixel's centre:
    [K, R] float64 for kernels [K, k, k] (or [k, k]: [R]), any odd k at ``pixscale`` arcsec/px.

    Each pixel's flux is spread evenly over ``sub`` x ``sub`` sub-pixels, which count when their
    centre lies inside the radius; the fractions are of the kernel's sum. Physical radii make the
    description independent of the pixel scale (a 0.05"/px HST PSF and its 0.1"/px binning agree to
    the sub-pixel sampling). Radially symmetric, so unchanged by turns of the grid."""
    k = torch.as_tensor(np.asarray(kernels), dtype=torch.float64)
    single = k.dim() == 2
    k = k[None] if single else k
    n = k.shape[-1]
    if k.dim() != 3 or k.shape[-2] != n or n % 2 == 0 or not pixscale > 0:
        raise ConfigError(f"encircled_energy needs odd square kernels and a pixel scale > 0, got {tuple(k.shape)}")
    c = (torch.arange(n * sub, dtype=torch.float64) + 0.5) / sub - n / 2.0  # sub-pixel centres, px from the centre
    r = torch.hypot(c[:, None], c[None, :]) * float(pixscale)
    inside = torch.stack([(r < float(rad)).double() for rad in radii])  # [R, n*sub, n*sub]
    frac = inside.reshape(len(radii), n, sub, n, sub).mean((2, 4))  # share of each pixel inside each radius
    ee = torch.einsum("kij,rij->kr", k, frac) / k.sum((1, 2))[:, None]
    return ee[0] if single else ee


def _galsim_profile(kind: str, fwhm: float, moffat_beta: float):
    import galsim

    if kind == "gaussian":
        return galsim.Gaussian(fwhm=fwhm)
    if kind == "moffat":
        return galsim.Moffat(beta=moffat_beta, fwhm=fwhm)
    if kind == "airy":
        # Airy FWHM ~ 1.028 lambda/D
        return galsim.Airy(lam_over_diam=fwhm / 1.028)
    raise ConfigError(f"unknown PSF kind '{kind}'; choose one of {PROFILES + ('empirical',)}")


def _betas(beta, n: int) -> list[float]:
    """Moffat beta per kernel: one value, or a range [low, high] spread over ``n`` kernels in a
    scrambled order (so that beta does not follow the FWHM)."""
    if isinstance(beta, (int, float)):
        return [float(beta)] * max(n, 1)
    lo, hi = (float(v) for v in beta)
    if not 1.0 < lo <= hi:
        raise ConfigError(f"psf.moffat_beta must be > 1 (a value or a range low <= high), got [{lo}, {hi}]")
    vals = np.linspace(lo, hi, max(n, 1))
    return [float(v) for v in vals[np.random.default_rng(0).permutation(len(vals))]]


def draw_kernel(kind: str, fwhm_arcsec: float, pixscale: float, size: int, moffat_beta: float = 3.5) -> np.ndarray:
    """Draw one pixel-integrated PSF kernel [size, size] of unit sum with GalSim."""
    if not fwhm_arcsec > 0:
        raise ConfigError(f"PSF FWHM must be positive, got {fwhm_arcsec} arcsec")
    im = _galsim_profile(kind, fwhm_arcsec, moffat_beta).drawImage(nx=size, ny=size, scale=pixscale)
    k = np.clip(im.array.astype(np.float64), 0.0, None)  # drop FFT ringing below zero
    return (k / k.sum()).astype(np.float32)


def load_empirical(path: str, psf_pixscale: float, pixscale: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a FITS cube [n, h, w] (or one 2-D PSF) and resample each to ``pixscale``.

    Returns kernels [n, size, size] (unit sum) and their FWHMs [n] in arcsec, measured on the
    finely sampled input.

    The FITS PSFs are taken as effective (pixel-convolved) PSFs sampled at ``psf_pixscale``
    arcsec/px; GalSim's ``InterpolatedImage`` resamples them with flux conserved.
    """
    import galsim
    from astropy.io import fits

    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"empirical PSF file not found: '{path}'")
    with fits.open(p) as hdul:
        data = hdul[0].data
    if data is None or data.ndim not in (2, 3):
        raise ConfigError(f"empirical PSF file '{path}' must hold a 2-D PSF or a 3-D cube")
    cube = np.asarray(data, dtype=np.float64).reshape((-1,) + data.shape[-2:])
    # STDPSF cubes flag unusable grid positions with large negative pixels: skip those PSFs
    valid = [k for k in cube if np.all(np.isfinite(k)) and k.sum() > 0 and k.min() > -0.01 * k.max()]
    if not valid:
        raise ConfigError(f"empirical PSF file '{path}' holds no usable PSF (all non-finite, flagged or non-positive)")
    if len(valid) < len(cube):
        log.info("empirical PSFs: kept %d of %d in %s (others flagged)", len(valid), len(cube), path)
    out, fwhm = [], []
    for k in valid:
        k = np.clip(k, 0.0, None)
        fwhm.append(measure_fwhm(k, psf_pixscale))
        ii = galsim.InterpolatedImage(galsim.Image(k / k.sum(), scale=psf_pixscale))
        arr = np.clip(ii.drawImage(nx=size, ny=size, scale=pixscale, method="no_pixel").array, 0.0, None)
        out.append(arr / arr.sum())
    return np.asarray(out, dtype=np.float32), np.asarray(fwhm)


def measure_fwhm(kernel: np.ndarray, pixscale: float) -> float:
    """FWHM [arcsec] of a kernel from the area above half maximum (``2 sqrt(A / pi)``)."""
    k = np.asarray(kernel)
    area = float((k >= 0.5 * k.max()).sum()) * pixscale**2
    return 2.0 * np.sqrt(area / np.pi)


@dataclass
class PSFBank:
    """Kernels [K, k, k] (unit sum) with their FWHMs [K] in arcsec and FFTs for an ``npix`` grid."""

    kernels: torch.Tensor
    fwhm: torch.Tensor
    npix: int
    kind: list = field(default_factory=list)
    pixscale: float | None = None  # arcsec/px; when known, ``ee`` [K, R] holds each kernel's :func:`encircled_energy`

    def __post_init__(self):
        self.ee = None if not self.pixscale else encircled_energy(self.kernels, self.pixscale).float()
        k = self.kernels.shape[-1]
        self.fft_size = fast_fft_size(self.npix + (k - 1) // 2)  # enough for the "same" crop
        self.kernel_fft = kernel_rfft(self.kernels, self.fft_size)
        self._kernel_fft_full = None  # full complex spectra for convolve_pair, made on first use

    def __len__(self) -> int:
        return self.kernels.shape[0]

    @classmethod
    def from_config(cls, cfg, pixscale: float, npix: int) -> PSFBank:
        """Build from a ``psf`` config: ``kind`` (gaussian|moffat|airy|empirical|mix|analytic),
        ``fwhm`` range [arcsec], ``n_kernels``, ``size`` [px], ``moffat_beta`` (a value or a range
        [low, high] spread over the kernels), and ``empirical``
        (``file``, ``pixscale``) used by ``kind: empirical`` or, with ``empirical_fraction``, by mix.
        """
        kind = str(cfg.kind)
        size = int(cfg.size)
        if size < 3 or size % 2 == 0:
            raise ConfigError(f"psf.size must be an odd number of pixels >= 3, got {size}")
        kernels, fwhms, kinds = [], [], []
        if kind in PROFILES or kind in ("mix", "analytic"):
            lo, hi = (float(v) for v in cfg.fwhm)
            if not (0 < lo <= hi):
                raise ConfigError(f"psf.fwhm must be a range 0 < low <= high in arcsec, got [{lo}, {hi}]")
            n = int(cfg.n_kernels)
            betas = _betas(cfg.get("moffat_beta", 3.5), n)
            for i, f in enumerate(np.linspace(lo, hi, n) if n > 1 else [lo]):
                # analytic: Gaussian, Moffat and Airy kernels in turn across the FWHM range
                profile = {"mix": "gaussian", "analytic": PROFILES[i % 3]}.get(kind, kind)
                kernels.append(draw_kernel(profile, float(f), pixscale, size, betas[i]))
                fwhms.append(float(f))
                kinds.append(profile)
        if kind in ("empirical", "mix"):
            emp = cfg.empirical
            ek, ef = load_empirical(str(emp.file), float(emp.pixscale), pixscale, size)
            if kind == "mix":
                # replicate so empirical kernels make up ~empirical_fraction of the bank
                frac = float(cfg.get("empirical_fraction", 0.5))
                if not 0 < frac < 1:
                    raise ConfigError(f"psf.empirical_fraction must be in (0, 1), got {frac}")
                want = int(round(len(kernels) * frac / (1 - frac)))
                reps = max(1, int(np.ceil(want / len(ek))))
                ek = np.concatenate([ek] * reps)[: max(want, 1)]
                ef = np.concatenate([ef] * reps)[: max(want, 1)]
            kernels.extend(ek)
            fwhms.extend(float(f) for f in ef)
            kinds.extend(["empirical"] * len(ek))
        if not kernels:
            raise ConfigError(f"unknown psf.kind '{kind}'; choose one of {PROFILES + ('empirical', 'mix', 'analytic')}")
        kernels = torch.from_numpy(np.stack(kernels))
        return cls(kernels, torch.tensor(fwhms, dtype=torch.float32), npix, kinds, float(pixscale))

    def to(self, device):
        self.kernels = self.kernels.to(device)
        self.fwhm = self.fwhm.to(device)
        self.ee = None if self.ee is None else self.ee.to(device)
        self.kernel_fft = self.kernel_fft.to(device)
        self._kernel_fft_full = None
        return self

    def convolve(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Convolve images [B, C, N, N] with kernels ``index`` [B] ('same' size, zero padded).

        Kernels up to ``DIRECT_MAX`` pixels use one grouped direct convolution (faster there),
        larger ones the batched FFT; both equal ``scipy.signal.fftconvolve(..., mode='same')``.
        """
        k = self.kernels.shape[-1]
        if k <= DIRECT_MAX:
            return direct_convolve(images, self.kernels[index])
        return fft_convolve(images, self.kernel_fft[index], k, self.fft_size)

    def convolve_pair(self, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> tuple:
        """Two real image sets [B, 1, N, N] (e.g. lensed source and lens light) convolved with the
        same kernels ``index`` [B]: :meth:`convolve` of each, with large kernels as ONE complex FFT
        of ``a + i b`` (a real kernel keeps the real and imaginary parts apart), 0.44 instead of
        0.62 ms per 192-px pair on one core. Each output then carries float32 FFT rounding of the
        pair's brighter image (~1e-7 of its peak) instead of its own: against separate transforms
        at most 1e-4 of the quietest sky noise at ``hst``, 3e-3 at ``slacs`` (lens peak 5e4 sigma)."""
        k = self.kernels.shape[-1]
        if k <= DIRECT_MAX:
            out = direct_convolve(torch.cat([a, b], 1), self.kernels[index])
            return out[:, :1], out[:, 1:]
        if self._kernel_fft_full is None:
            self._kernel_fft_full = kernel_rfft(self.kernels, self.fft_size, full=True)
        z = fft_convolve(torch.complex(a, b), self._kernel_fft_full[index], k, self.fft_size)
        return z.real.to(a.dtype), z.imag.to(b.dtype)


# kernel sizes [px] up to which one grouped direct convolution beats the FFT on CPU (timed once on
# 64 px, batch 256, one AVX2 core, 2026-12-02: 9 px direct 27 us/img, FFT 96; 11 px direct
# 355-490 us/img, FFT 67 - oneDNN's grouped kernels fall off a cliff above 9 px)
DIRECT_MAX = 9


def direct_convolve(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """'Same'-size convolution of [B, C, N, N] images with per-image odd kernels [B, k, k]."""
    B, C, N, M = images.shape
    k = kernels.shape[-1]
    w = kernels.to(images.dtype).flip(-1, -2)[:, None].repeat_interleave(C, 0)  # conv2d correlates
    out = torch.nn.functional.conv2d(images.reshape(1, B * C, N, M), w, padding=k // 2, groups=B * C)
    return out.reshape(B, C, N, M)


def fast_fft_size(n: int) -> int:
    """Smallest size >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def kernel_rfft(kernels: torch.Tensor, size: int, full: bool = False) -> torch.Tensor:
    """rfft2 [K, size, size/2+1] of kernels [K, k, k] zero-padded to [size, size]; ``full``: the
    complex fft2 [K, size, size] (for complex images, :meth:`PSFBank.convolve_pair`)."""
    k = kernels.shape[-1]
    pad = torch.zeros(kernels.shape[0], size, size, dtype=kernels.dtype, device=kernels.device)
    pad[:, :k, :k] = kernels
    return torch.fft.fft2(pad) if full else torch.fft.rfft2(pad)


def fft_convolve(images: torch.Tensor, kernel_fft: torch.Tensor, ksize: int, size: int) -> torch.Tensor:
    """'Same'-size linear convolution of [B, C, N, N] images with per-image kernel FFTs [B, f, f/2+1]
    (complex images, e.g. two real sets as ``a + i b``: full spectra [B, f, f]).

    Matches ``scipy.signal.fftconvolve(image, kernel, mode='same')`` (lenstronomy's convention).
    A cyclic FFT of ``size >= N + (k - 1) / 2`` suffices: wrap-around only reaches the first
    ``(k - 1) / 2`` rows and columns of the full result, which the 'same' crop drops.
    """
    if size < images.shape[-1] + (ksize - 1) // 2:
        raise ValueError(f"FFT size {size} too small for {images.shape[-1]} px images and {ksize} px kernels")
    n = images.shape[-1]
    padded = torch.nn.functional.pad(images, (0, size - n, 0, size - n))
    if images.is_complex():
        spec = torch.fft.fft2(padded)
        out = torch.fft.ifft2(spec.mul_(kernel_fft[:, None]))
    else:
        out = torch.fft.irfft2(torch.fft.rfft2(padded) * kernel_fft[:, None], s=(size, size))
    o = (ksize - 1) // 2
    return out[..., o : o + n, o : o + n].to(images.dtype)
