"""Compose lensed images: ray tracing on a supersampled grid, sources, lens light, PSF, detector.

:class:`Simulator` is built once from a data preset (``conf/data/*.yaml``; banks loaded once) and
draws batches ``(images [n, bands, N, N], labels [n, 8])`` that depend only on (config, seed).
Images are sky-subtracted and in e-/s per pixel; the pixel grid follows
``../shared/conventions.md`` (``x = (col - (N-1)/2) * pixscale``, ``y`` likewise with row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from lensexp.errors import ConfigError
from lensexp.runtime import compile_cache_dir
from lensexp.sim import instrument as inst
from lensexp.sim import lens as lensmod
from lensexp.sim import mass as massmod
from lensexp.sim.priors import LABELS, check_range, draw
from lensexp.sim.psf import DIRECT_MAX, PSFBank, direct_convolve, fast_fft_size, fft_convolve, kernel_rfft
from lensexp.sim.source import (
    GalaxyBank,
    gaussian_clumps_sb,
    sersic_amp_from_flux,
    sersic_coefficients,
    sersic_sb_rotated,
    source_plane_grid,
)

SOURCE_KINDS = ("sersic", "cosmos", "mix")
# parameters of GalaxyBank.grid_coefficients, in its order
GALAXY_KEYS = ("gal_index", "src_x", "src_y", "gal_cos", "gal_sin", "gal_flip", "gal_scale")


def pixel_grid(npix: int, pixscale: float, supersample: int = 1, dtype=torch.float64, device=None):
    """Sub-pixel centre coordinates (x, y) [arcsec], each [N*s, N*s] (row, col).

    Pixel (row, col) has centre ``((col - (N-1)/2) p, (row - (N-1)/2) p)``; its ``s x s``
    sub-pixels are spaced ``p / s`` around it.
    """
    s = int(supersample)
    idx = (torch.arange(npix * s, dtype=dtype, device=device) + 0.5) / s - 0.5  # in pixel units
    c = (idx - (npix - 1) / 2.0) * pixscale
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def subpixel_planes(npix: int, pixscale: float, supersample: int = 1, dtype=torch.float64, device=None):
    """The :func:`pixel_grid` sub-pixels ordered as planes: (x, y) each [s*s * N*N], plane-major.

    Plane ``k = i s + j`` holds, for every pixel in row-major order, the sub-pixel at offset
    (row i, col j) inside it. Summing over planes bins to pixels with unit-stride memory access,
    which lets the fused ray-tracing kernel vectorise.
    """
    s = int(supersample)
    x, y = pixel_grid(npix, pixscale, s, dtype, device)

    def planes(a):
        return a.reshape(npix, s, npix, s).permute(1, 3, 0, 2).reshape(-1)

    return planes(x), planes(y)


def bin_supersampled(sb: torch.Tensor, npix: int, supersample: int, pixscale: float) -> torch.Tensor:
    """Surface brightness on :func:`subpixel_planes` [B, s*s*N*N] -> flux per pixel [B, N, N] (e-/s)."""
    s = supersample
    area = (pixscale / s) ** 2
    return sb.reshape(sb.shape[0], s * s, npix, npix).sum(1) * area


@dataclass
class SimBatch:
    """One simulated batch: ``images`` [B, C, N, N] float32 e-/s, ``labels`` [B, 8] float32
    (order ``LABELS``), ``meta`` per-image extras (tensors [B] or [B, C, N, N]), and optionally
    ``clean`` (noiseless, artefact-free, PSF-convolved) and ``source`` (lensed source, no PSF)."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict = field(default_factory=dict)
    clean: torch.Tensor | None = None
    source: torch.Tensor | None = None


class Simulator:
    """Batched strong-lens image simulator for one data preset.

    ``cfg``: the ``data`` config (a preset from ``conf/data``). ``device``: torch device.
    ``compile``: fuse the per-ray kernels with ``torch.compile`` (CPU needs a C++ compiler).
    """

    def __init__(self, cfg: DictConfig | dict, device: str | torch.device = "cpu", compile: bool = False):
        self.cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.device = torch.device(device)
        validate_config(self.cfg)
        # plain-Python view for the per-batch code: OmegaConf lookups cost ~10 us each, and a
        # batch makes ~100 of them (63 us per image at batch 64)
        self.c = c = _plain(OmegaConf.to_container(self.cfg, resolve=True))
        self.npix, self.pixscale, self.ss = int(c.npix), float(c.pixscale), int(c.supersample)
        self.dtype = getattr(torch, str(c.get("dtype", "float32")))
        x, y = subpixel_planes(self.npix, self.pixscale, self.ss, self.dtype, self.device)
        self.x, self.y = x.reshape(1, -1), y.reshape(1, -1)
        self.psf = PSFBank.from_config(c.psf, self.pixscale, self.npix).to(self.device)
        kind = str(c.source.kind)
        self.galaxies = None
        if kind in ("cosmos", "mix") and not (kind == "mix" and float(c.source.cosmos_fraction) == 0):
            cc = c.source.cosmos
            self.galaxies = GalaxyBank.from_catalog(str(cc.catalog), cc.get("max_galaxies"), int(cc.stamp))
            self.galaxies.images = self.galaxies.images.to(self.device, self.dtype)
            self.galaxies.pixscale = self.galaxies.pixscale.to(self.device, self.dtype)
        self.n_bands = len(c.bands)
        # mass family (data.mass; absent = SIE + shear) and whether samples carry kappa maps
        self.mass_kind = massmod.check_mass_config(c.get("mass"))
        self.kappa_map = bool((c.get("mass") or {}).get("kappa_map", False))
        if compile:
            compile_cache_dir()  # reruns and worker processes load kernels instead of recompiling
        # batches, their Sersic / COSMOS subsets and the last batch of a shard vary in size:
        # batch-dynamic kernels compile once for every size
        self._trace = _batch_dynamic(_trace_sersic) if compile else _trace_sersic
        self._sersic_image = _batch_dynamic(_sersic_image) if compile else _sersic_image
        self._cosmos_grid = _batch_dynamic(_cosmos_grid) if compile else _cosmos_grid
        self._digitise = _batch_dynamic(inst.digitise_counts) if compile else inst.digitise_counts
        self._mix = _batch_dynamic(inst.mix_bands) if compile else inst.mix_bands

    # ------------------------------------------------------------------ parameters
    def draw_params(self, n: int, rng: torch.Generator) -> dict:
        """Draw lens, source, band and PSF parameters for ``n`` systems (tensors [n] or [n, K])."""
        c, dev, dt = self.c, self.device, self.dtype
        d = lambda lohi, m=n: draw(rng, m, check_range("", lohi), dev, dt)  # noqa: E731
        L, S = c.lens, c.source
        p = {"theta_E": d(L.theta_E)}
        q, phi = d(L.q), d(L.phi)
        p["e1"], p["e2"] = lensmod.phi_q_to_ellipticity(phi, q)
        p["center_x"], p["center_y"] = d(L.center), d(L.center)
        p["gamma1"], p["gamma2"] = d(L.gamma), d(L.gamma)
        # source position: uniform in area in an annulus of radii offset * theta_E
        lo, hi = check_range("", S.offset)
        r = p["theta_E"] * torch.sqrt(
            lo * lo + (hi * hi - lo * lo) * torch.rand(n, generator=rng, device=dev, dtype=dt)
        )
        t = 2 * math.pi * torch.rand(n, generator=rng, device=dev, dtype=dt)
        p["src_x"] = p["center_x"] + r * torch.cos(t)
        p["src_y"] = p["center_y"] + r * torch.sin(t)
        p["src_mag"] = d(S.mag)
        p["src_flux"] = inst.mag_to_flux(p["src_mag"], float(c.instrument.zeropoint))
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
        G = len(self.galaxies) if self.galaxies is not None else 1
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
            p["ll_flux"] = inst.mag_to_flux(d(LL.mag), float(c.instrument.zeropoint))
            p["ll_R"], p["ll_n"] = d(LL.R_sersic), d(LL.n)
        # colours
        p["band_src"] = torch.stack([d(b.source_scale) for b in c.bands], 1)
        p["band_lens"] = torch.stack([d(b.lens_scale) for b in c.bands], 1)
        p["psf_index"] = torch.randint(0, len(self.psf), (n,), generator=rng, device=dev)
        if self.mass_kind != "sie":
            p.update(massmod.draw_components(c.mass, self.mass_kind, p, rng))
        return p

    def _lens(self, p: dict) -> tuple:
        """(SIE + shear coefficients, extra deflection [B, P] or None) of the lenses in ``p``:
        the main SIE is switched off (theta_E 0) where the family replaces it (``epl``)."""
        if self.mass_kind == "sie":
            return _lens_coefficients(p), None
        extra = massmod.extra_deflection(self.mass_kind, p, self.x, self.y)
        sie = p if self.mass_kind != "epl" else {**p, "theta_E": torch.zeros_like(p["theta_E"])}
        return _lens_coefficients(sie), extra

    # ------------------------------------------------------------------ rendering
    def render_source(self, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Lensed source flux per pixel [B, N, N] (e-/s, no PSF) and mu_F [B]."""
        B = p["theta_E"].shape[0]
        cos = p["is_cosmos"] if self.galaxies is not None else torch.zeros_like(p["is_cosmos"])
        real = torch.nonzero(cos).squeeze(1)
        par = torch.nonzero(~cos).squeeze(1)
        img = None
        if par.numel():
            sub = p if par.numel() == B else {k: v[par] for k, v in p.items()}
            col = lambda k: sub[k][:, None]  # noqa: E731
            lens_coef, extra = self._lens(sub)
            amp = sersic_amp_from_flux(col("sersic_flux"), col("src_R"), col("src_n"))
            src_coef = (
                col("src_x"),
                col("src_y"),
                *sersic_coefficients(amp, col("src_R"), col("src_n"), col("src_e1"), col("src_e2")),
            )
            clumps = (sub["clump_flux"], sub["clump_sigma"], sub["clump_x"], sub["clump_y"])
            args = (self.x, self.y, lens_coef, src_coef, clumps, self.npix, self.ss, self.pixscale)
            analytic = self._trace(*args) if extra is None else _trace_sersic(*args, extra=extra)
            if analytic.shape[0] == B:
                img = analytic
            else:
                img = torch.zeros(B, self.npix, self.npix, dtype=self.dtype, device=self.device)
                img[par] = analytic
        if real.numel():
            img = (
                torch.zeros(B, self.npix, self.npix, dtype=self.dtype, device=self.device)
                if img is None
                else img.clone()
            )
            sub = {k: v[real] for k, v in p.items()}
            gal = self.galaxies
            coef = gal.grid_coefficients(*(sub[k] for k in GALAXY_KEYS))
            lens_coef, extra = self._lens(sub)
            if extra is None:
                grid = self._cosmos_grid(self.x, self.y, lens_coef, coef)
            else:
                grid = _cosmos_grid(self.x, self.y, lens_coef, coef, extra)
            mode = str(self.c.source.cosmos.interpolation)
            sb = gal.sample_grid(grid, sub["gal_index"], sub["gal_scale"], sub["src_flux"], mode)
            img[real] = bin_supersampled(sb, self.npix, self.ss, self.pixscale)
        mu = img.sum((1, 2)) / p["src_flux"]
        return img, mu

    def render_lens_light(self, p: dict) -> torch.Tensor | None:
        """Lens-galaxy flux per pixel [B, N, N] (e-/s, no PSF); None when disabled."""
        if not self.c.lens_light.enabled:
            return None
        col = lambda k: p[k][:, None]  # noqa: E731
        amp = sersic_amp_from_flux(col("ll_flux"), col("ll_R"), col("ll_n"))
        coef = (
            col("center_x"),
            col("center_y"),
            *sersic_coefficients(amp, col("ll_R"), col("ll_n"), col("ll_e1"), col("ll_e2")),
        )
        return self._sersic_image(self.x, self.y, coef, self.npix, self.ss, self.pixscale)

    def _draw_lensed(self, b: int, rng, pool: list):
        """Parameters, lensed source [b, N, N] and mu_F [b], redrawing systems below min_mu.

        Candidates come in batches of ``b`` (one tensor shape for compiled kernels); accepted
        systems beyond ``b`` wait in ``pool`` (a list of chunks, joined once when taken) for the
        next batch of the same :meth:`sample` call.
        """
        min_mu = float(self.c.source.get("min_mu", 0.0))
        if min_mu <= 0:
            p = self.draw_params(b, rng)
            return (p, *self.render_source(p))
        for _ in range(100):
            if sum(c["mu"].shape[0] for c in pool) >= b:
                joined = {k: torch.cat([c[k] for c in pool]) if len(pool) > 1 else pool[0][k] for k in pool[0]}
                pool.clear()
                if joined["mu"].shape[0] > b:
                    pool.append({k: v[b:] for k, v in joined.items()})
                take = {k: v[:b] for k, v in joined.items()}
                return {k: v for k, v in take.items() if k not in ("src", "mu")}, take["src"], take["mu"]
            p = self.draw_params(b, rng)
            src, mu = self.render_source(p)
            keep = mu >= min_mu
            if bool(keep.all()):
                pool.append({**p, "src": src, "mu": mu})
            elif bool(keep.any()):
                ok = torch.nonzero(keep).squeeze(1)
                pool.append({**{k: v[ok] for k, v in p.items()}, "src": src[ok], "mu": mu[ok]})
        raise ConfigError(
            f"data.source.min_mu = {min_mu} rejects nearly every system under these priors; "
            "lower it or move data.source.offset closer to the lens"
        )

    def _observe(self, src, lens_light, p, rng, with_artefacts: bool, with_noise: bool, keep_noise_map: bool = False):
        """Bands, PSF, noise and artefacts: returns (images, clean, meta)."""
        I = self.c.instrument
        B, dev, dt = src.shape[0], self.device, self.dtype
        d = lambda lohi, m=B: draw(rng, m, check_range("", lohi), dev, dt)  # noqa: E731
        # convolution is linear: convolve source and lens light once each, then mix the bands
        arc = self.psf.convolve(src[:, None], p["psf_index"])
        lens = None if lens_light is None else self.psf.convolve(lens_light[:, None], p["psf_index"])
        clean = self._mix(arc, p["band_src"], lens, p.get("band_lens"))
        arc = arc[:, 0]
        t = d(I.exposure_time)[:, None, None, None]
        sky = inst.sky_per_pixel(d(I.sky_mag), float(I.zeropoint), self.pixscale)[:, None, None, None]
        read = d(I.read_noise)[:, None, None, None]
        gain = float(I.gain)
        meta = {
            "psf_fwhm": self.psf.fwhm[p["psf_index"]],
            "psf_index": p["psf_index"],
            "is_cosmos": p["is_cosmos"],
            "gal_index": p["gal_index"],
            "src_mag": p["src_mag"],
            "src_x": p["src_x"],
            "src_y": p["src_y"],
            "exposure_time": t.flatten(),
            "sky": sky.flatten(),
            "read_noise": read.flatten(),
        }
        img = clean
        if with_noise and I.noise:
            noisy = inst.add_noise(clean, t, sky, read, gain, rng, str(I.poisson), self._digitise)
            if I.correlated_noise.enabled:
                fw = float(d(I.correlated_noise.fwhm_pix, 1)[0])
                noisy = clean + inst.correlate_noise(noisy - clean, fw)
            img = noisy
            if keep_noise_map:
                meta["noise_var"] = inst.noise_variance(clean, t, sky, read, gain).float()
        if with_artefacts:
            # in place on the image (a fresh tensor): sparse adds, no full-size artefact buffers
            img = img.clone() if img is clean else img
            img += d(I.bias, B * self.n_bands).reshape(B, self.n_bands, 1, 1)
            cr, hp, mk = I.cosmic_rays, I.hot_pixels, I.masks
            if cr.enabled:
                meta["cosmic_rays"] = inst.cosmic_rays(
                    img.shape,
                    float(cr.n_mean),
                    check_range("", cr.length_pix),
                    check_range("", cr.width_pix),
                    check_range("", cr.amplitude),
                    float(cr.worm_fraction),
                    rng,
                    img,
                    into=img,
                    scale=1.0 / t.flatten(),
                )
            if hp.enabled:
                amp = check_range("", hp.amplitude)
                meta["hot_pixels"] = inst.hot_pixels(img.shape, float(hp.fraction), amp, rng, img, into=img)
            if mk.enabled:
                m = inst.circular_masks(
                    arc, check_range("", mk.n), check_range("", mk.radius), self.pixscale, float(mk.keep_arc_flux), rng
                )
                img.masked_fill_(m[:, None], 0.0)
                meta["mask"] = m
        img = inst.normalize(img, str(I.normalize))
        return img, clean, meta

    def sample(
        self,
        n: int,
        seed: int,
        batch_size: int = 64,
        artefacts: bool = True,
        noise: bool = True,
        keep_clean: bool = False,
        keep_noise_map: bool = False,
    ) -> SimBatch:
        """Simulate ``n`` systems, identical for identical (config, seed, batch_size).

        Systems with ``mu_F < source.min_mu`` are redrawn. ``artefacts``/``noise`` switch the
        detector effects off wholesale (e.g. for galleries and tests). ``keep_clean`` returns
        the noiseless images too, ``keep_noise_map`` the expected pixel variance
        ``meta['noise_var']`` [(e-/s)^2].
        """
        if n < 0:
            raise ConfigError(f"number of images must be >= 0, got {n}")
        # Sérsic and Gaussian tails underflow into denormal floats, which x86 CPUs process ~100x
        # slower; flushing them to zero (FTZ/DAZ, this thread) changes values by < 1e-38.
        torch.set_flush_denormal(True)
        rng = torch.Generator(device=self.device)
        rng.manual_seed(int(seed))
        out: list[SimBatch] = []
        done, pool = 0, []
        while done < n:
            b = min(batch_size, n - done)
            out.append(self._one_batch(b, rng, pool, artefacts, noise, keep_clean, keep_noise_map))
            done += b
        if not out:
            return SimBatch(torch.zeros(0, self.n_bands, self.npix, self.npix), torch.zeros(0, len(LABELS)))
        return _concat(out)

    def _one_batch(self, b: int, rng, pool, artefacts, noise, keep_clean, keep_noise_map) -> SimBatch:
        p, src, mu = self._draw_lensed(b, rng, pool)
        images, clean, meta = self._observe(src, self.render_lens_light(p), p, rng, artefacts, noise, keep_noise_map)
        labels = torch.stack([p[k] for k in LABELS[:-1]] + [mu], 1)
        for k in massmod.COMPONENT_KEYS[self.mass_kind]:
            meta[k] = p[k]
        if self.kappa_map:
            x, y = pixel_grid(self.npix, self.pixscale, 1, torch.float64, self.device)
            meta["kappa"] = massmod.convergence_map(self.mass_kind, p, x[None], y[None]).float()
        return SimBatch(
            images.float(),
            labels.float(),
            meta,
            clean.float() if keep_clean else None,
            src.float() if keep_clean else None,
        )


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


def _lens_coefficients(p: dict) -> tuple:
    """(cx, cy, g1, g2) + :func:`lens.sie_coefficients`, each [B, 1], from a parameter dict."""
    col = lambda k: p[k][:, None]  # noqa: E731
    return (
        col("center_x"),
        col("center_y"),
        col("gamma1"),
        col("gamma2"),
        *lensmod.sie_coefficients(col("theta_E"), col("e1"), col("e2")),
    )


class _Plain(dict):
    """A dict whose keys read as attributes (``c.lens.theta_E``), like the DictConfig it mirrors."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _plain(obj):
    """Nested dicts -> :class:`_Plain` (lists kept, their dict items converted)."""
    if isinstance(obj, dict):
        return _Plain({k: _plain(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _batch_dynamic(fn):
    """``torch.compile`` of ``fn`` with the batch size symbolic: dim 0 of every tensor argument
    (also inside tuples) longer than one is marked dynamic, everything else stays static, so one
    kernel serves every batch and subset size (a batch of one specialises once)."""
    compiled = torch.compile(fn)  # automatic dynamic: marked dims symbolic, the others static

    def call(*args, **kw):
        for a in args:
            for t in a if isinstance(a, tuple) else (a,):
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] > 1:
                    torch._dynamo.mark_dynamic(t, 0)
        return compiled(*args, **kw)

    return call


def _cosmos_grid(x, y, lens_coef, gal_coef, extra=None):
    """Ray-shoot the sub-pixel planes x, y [P] and map them to ``grid_sample`` coordinates of each
    image's galaxy stamp [B, P, 2] (:func:`source.source_plane_grid`) in one pass."""
    bx, by = _shoot(x, y, lens_coef, extra)
    return source_plane_grid(bx, by, gal_coef)


def _shoot(x, y, lens_coef, extra=None):
    """Source-plane positions (bx, by) [B, P] of the sub-pixel planes x, y [P] (SIE + shear,
    minus an ``extra`` deflection (ax, ay) [B, P] of further mass components when given)."""
    cx, cy, g1, g2, *sie = lens_coef
    ax, ay = lensmod.sie_deflection_rotated(x - cx, y - cy, *sie)
    bx, by = x - ax - (g1 * x + g2 * y), y - ay - (g2 * x - g1 * y)
    if extra is not None:
        bx, by = bx - extra[0].to(bx.dtype), by - extra[1].to(by.dtype)
    return bx, by


def _sersic_image(x, y, coef, npix, supersample, pixscale):
    """Unlensed Sérsic (e.g. lens light) binned from sub-pixel planes to flux per pixel [B, N, N]."""
    cx, cy, *sc = coef
    planes = supersample * supersample
    xs, ys = x.reshape(planes, 1, -1), y.reshape(planes, 1, -1)
    total = sum(sersic_sb_rotated(xs[k] - cx, ys[k] - cy, *sc) for k in range(planes))
    return (total * (pixscale / supersample) ** 2).reshape(-1, npix, npix)


def _trace_sersic(x, y, lens_coef, src_coef, clumps, npix, supersample, pixscale, extra=None):
    """Ray-trace the sub-pixel grid through SIE + shear, evaluate Sérsic + clumps and bin to flux
    per pixel [B, N, N] (e-/s).

    ``x, y``: :func:`subpixel_planes` [s*s*N*N]; ``lens_coef``: (cx, cy, g1, g2) +
    :func:`lens.sie_coefficients`, ``src_coef``: (sx, sy) + :func:`source.sersic_coefficients`,
    each [B, 1]; ``clumps``: (flux, sigma, x, y) [B, K]; ``extra``: further deflection (ax, ay)
    [B, s*s*N*N] on the same planes, or None. The sub-pixel planes are summed in an
    unrolled loop, so ``torch.compile`` emits one pointwise kernel over pixels with no
    intermediate buffers.
    """
    sx, sy, *sc = src_coef
    planes = supersample * supersample
    xs, ys = x.reshape(planes, 1, -1), y.reshape(planes, 1, -1)
    total = None
    n = xs.shape[-1]
    for k in range(planes):
        ek = None if extra is None else (extra[0][:, k * n : (k + 1) * n], extra[1][:, k * n : (k + 1) * n])
        bx, by = _shoot(xs[k], ys[k], lens_coef, ek)
        sb = sersic_sb_rotated(bx - sx, by - sy, *sc)
        if clumps[0].shape[-1] > 0:
            sb = sb + gaussian_clumps_sb(bx, by, *clumps)
        total = sb if total is None else total + sb
    return (total * (pixscale / supersample) ** 2).reshape(-1, npix, npix)


def _concat(batches: list[SimBatch]) -> SimBatch:
    if len(batches) == 1:
        return batches[0]
    meta = {k: torch.cat([b.meta[k] for b in batches]) for k in batches[0].meta}
    cat = lambda name: None if getattr(batches[0], name) is None else torch.cat([getattr(b, name) for b in batches])  # noqa: E731
    return SimBatch(
        torch.cat([b.images for b in batches]),
        torch.cat([b.labels for b in batches]),
        meta,
        cat("clean"),
        cat("source"),
    )


def magnification_map(lens: dict, npix: int, pixscale: float, dtype=torch.float64) -> torch.Tensor:
    """Signed point magnification 1/det(A) at the pixel centres [B, N, N] for SIE + shear
    parameters ``lens`` (floats or tensors [B]); critical curves are where it changes sign."""
    x, y = pixel_grid(npix, pixscale, 1, dtype)
    args = [torch.as_tensor(lens[k], dtype=dtype).reshape(-1, 1, 1) for k in LABELS[:-1]]
    return lensmod.magnification(x[None], y[None], *args)


def simulate_batch(cfg, n: int, seed: int, device="cpu", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Convenience: ``(images [n, bands, H, W], labels [n, 8])`` for a data config and a seed."""
    sim = Simulator(cfg.data if "data" in cfg else cfg, device=device)
    b = sim.sample(n, seed, **kwargs)
    return b.images, b.labels


def render_sersic(
    lens: dict,
    source: dict,
    npix: int,
    pixscale: float,
    supersample: int = 2,
    psf_kernel: torch.Tensor | None = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """Noiseless image [B, N, N] (e-/s per pixel) of an elliptical Sérsic lensed by SIE + shear.

    ``lens``: ``theta_E, e1, e2, center_x, center_y, gamma1, gamma2`` (floats or tensors [B]);
    ``source``: lenstronomy ``SERSIC_ELLIPSE`` keywords ``amp, R_sersic, n_sersic, e1, e2,
    center_x, center_y``. ``psf_kernel`` [k, k] or [B, k, k] (unit sum) convolves in 'same' mode
    as lenstronomy does. The building block of the simulator and of maximum-likelihood fits.
    """

    def col(v):
        return torch.as_tensor(v, dtype=dtype).reshape(-1, 1)

    lp = {k: col(lens[k]) for k in LABELS[:-1]}
    lens_coef = (
        lp["center_x"],
        lp["center_y"],
        lp["gamma1"],
        lp["gamma2"],
        *lensmod.sie_coefficients(lp["theta_E"], lp["e1"], lp["e2"]),
    )
    src_coef = _source_coefficients(source, dtype)
    B = max(v.shape[0] for v in [*lp.values(), *src_coef])
    x, y = subpixel_planes(npix, pixscale, supersample, dtype, lp["theta_E"].device)
    empty = torch.zeros(B, 0, dtype=dtype, device=x.device)
    lens_coef = tuple(t.expand(B, 1) for t in lens_coef)
    src_coef = tuple(t.expand(B, 1) for t in src_coef)
    img = _trace_sersic(
        x.reshape(1, -1), y.reshape(1, -1), lens_coef, src_coef, (empty,) * 4, npix, supersample, pixscale
    )
    return convolve_psf(img, psf_kernel)


def render_unlensed_sersic(
    source: dict,
    npix: int,
    pixscale: float,
    supersample: int = 2,
    psf_kernel: torch.Tensor | None = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """Noiseless image [B, N, N] (e-/s per pixel) of an elliptical Sérsic seen directly (e.g. the
    lens light); ``source`` and ``psf_kernel`` as in :func:`render_sersic`."""
    coef = _source_coefficients(source, dtype)
    B = max(v.shape[0] for v in coef)
    x, y = subpixel_planes(npix, pixscale, supersample, dtype, coef[0].device)
    img = _sersic_image(x, y, tuple(t.expand(B, 1) for t in coef), npix, supersample, pixscale)
    return convolve_psf(img, psf_kernel)


def _source_coefficients(source: dict, dtype) -> tuple:
    """(center_x, center_y) + :func:`source.sersic_coefficients`, each [B, 1], from lenstronomy
    ``SERSIC_ELLIPSE`` keywords (floats or tensors [B])."""
    sp = {k: torch.as_tensor(v, dtype=dtype).reshape(-1, 1) for k, v in source.items()}
    return (
        sp["center_x"],
        sp["center_y"],
        *sersic_coefficients(sp["amp"], sp["R_sersic"], sp["n_sersic"], sp["e1"], sp["e2"]),
    )


def convolve_psf(img: torch.Tensor, psf_kernel: torch.Tensor | None) -> torch.Tensor:
    """Images [B, N, N] convolved ('same', as lenstronomy) with a unit-sum kernel [k, k] or
    [B, k, k]; returned unchanged for ``None``."""
    if psf_kernel is None:
        return img
    k = torch.as_tensor(psf_kernel, dtype=img.dtype, device=img.device)
    k = k.expand(img.shape[0], *k.shape[-2:]) if k.dim() == 2 else k
    if k.shape[-1] <= DIRECT_MAX:
        return direct_convolve(img[:, None], k)[:, 0]
    size = fast_fft_size(img.shape[-1] + (k.shape[-1] - 1) // 2)
    return fft_convolve(img[:, None], kernel_rfft(k, size), k.shape[-1], size)[:, 0]
