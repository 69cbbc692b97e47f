"""Compose lensed images: ray tracing on a supersampled grid, sources, lens light, PSF, detector.

:class:`Simulator` is built once from a data preset (``conf/data/*.yaml``; banks loaded once) and
draws batches ``(images [n, bands, N, N], labels [n, 8])`` that depend only on (config, seed).
Images are sky-subtracted and in e-/s per pixel; the pixel grid follows
``../shared/conventions.md`` (``x = (col - (N-1)/2) * pixscale``, ``y`` likewise with row).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from lensexp.errors import ConfigError
from lensexp.runtime import compile_cache_dir
from lensexp.sim import instrument as inst
from lensexp.sim import mass as massmod
from lensexp.sim import adaptive
from lensexp.sim.priors import LABELS, draw_params
from lensexp.sim.psf import PSFBank
from lensexp.sim.schema import validate_config
from lensexp.sim.source import GalaxyBank, sersic_amp_from_flux, sersic_coefficients
from lensexp.sim.trace import (
    batch_dynamic,
    bin_supersampled,
    cosmos_grid,
    lens_coefficients,
    lensed_sersic_sb,
    pixel_grid,
    sersic_image,
    sersic_sb,
    subpixel_planes,
    trace_sersic,
)

# sub-pixels (rays) per simulated batch at most: larger batches have full-size buffers over ~32 MB,
# which glibc maps afresh and page-faults on every batch instead of reusing (hst, 192 px,
# supersampling 2, one AMD EPYC core: 162 img/s at batch 256, 180 page faults per image; 300 at
# the cap, 56 images, none). Small images keep the requested batch (tiny: 512 > 256).
MAX_BATCH_RAYS = 1 << 23


def effective_batch_size(batch_size: int, npix: int, supersample: int) -> int:
    """The batch ``Simulator.sample`` really draws: ``batch_size`` capped at :data:`MAX_BATCH_RAYS`
    rays (part of the data's identity, like the seed)."""
    return max(1, min(int(batch_size), MAX_BATCH_RAYS // (int(npix) * int(supersample)) ** 2))


# parameters of GalaxyBank.grid_coefficients, in its order
GALAXY_KEYS = ("gal_index", "src_x", "src_y", "gal_cos", "gal_sin", "gal_flip", "gal_scale")


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
        # adaptive supersampling (lensexp/sim/adaptive.py): one ray per pixel, the full
        # supersampling only where the estimated sampling error exceeds tolerance x the noise floor
        ad = c.get("adaptive") or {}
        self.adaptive = bool(ad.get("enabled", False)) and self.ss > 1
        if self.adaptive:
            x1, y1 = subpixel_planes(self.npix, self.pixscale, 1, self.dtype, self.device)
            self.x1, self.y1 = x1.reshape(1, -1), y1.reshape(1, -1)
            floor = float(ad.get("tolerance", 0.01)) * adaptive.noise_floor(c.instrument, self.pixscale)
            # per component, for the brightest band it is scaled to
            top = lambda key: max(max(b[key]) for b in c.bands)  # noqa: E731
            self._threshold = (floor / top("source_scale"), floor / top("lens_scale"))
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
        self._trace = batch_dynamic(trace_sersic) if compile else trace_sersic
        self._sersic_image = batch_dynamic(sersic_image) if compile else sersic_image
        self._cosmos_grid = batch_dynamic(cosmos_grid) if compile else cosmos_grid
        self._lensed_sb = batch_dynamic(lensed_sersic_sb) if compile else lensed_sersic_sb
        self._sersic_sb = batch_dynamic(sersic_sb) if compile else sersic_sb
        self._error_mask = batch_dynamic(adaptive.sampling_error_mask) if compile else adaptive.sampling_error_mask
        self._digitise = batch_dynamic(inst.digitise_counts) if compile else inst.digitise_counts
        self._mix = batch_dynamic(inst.mix_bands) if compile else inst.mix_bands

    # ------------------------------------------------------------------ parameters
    def draw_params(self, n: int, rng: torch.Generator) -> dict:
        """Draw lens, source, band and PSF parameters for ``n`` systems (:func:`priors.draw_params`)."""
        n_gal = len(self.galaxies) if self.galaxies is not None else 1
        return draw_params(self.c, n, rng, n_gal, len(self.psf), self.mass_kind, self.device, self.dtype)

    def _lens(self, p: dict, x=None, y=None) -> tuple:
        """(SIE + shear coefficients, extra deflection at x, y [default: the sub-pixel planes] or
        None) of the lenses in ``p``: the main SIE is switched off (theta_E 0) where the family
        replaces it (``epl``)."""
        if self.mass_kind == "sie":
            return lens_coefficients(p), None
        x, y = (self.x, self.y) if x is None else (x, y)
        extra = massmod.extra_deflection(self.mass_kind, p, x, y)
        sie = p if self.mass_kind not in massmod.EPL_KINDS else {**p, "theta_E": torch.zeros_like(p["theta_E"])}
        return lens_coefficients(sie), extra

    def _rows_lens(self, p: dict, b: torch.Tensor, x, y) -> tuple:
        """:meth:`_lens` for rays x, y [M, s^2] of refined pixels in images ``b`` [M]."""
        if self.mass_kind == "sie":
            return adaptive.gather_rows(lens_coefficients(p), b), None
        return self._lens({k: v.index_select(0, b) for k, v in p.items()}, x, y)

    @staticmethod
    def _sersic_source(p: dict) -> tuple:
        """(Sérsic coefficients, clumps) of the Sérsic sources in ``p``, each [B, 1] / [B, K]."""
        col = lambda k: p[k][:, None]  # noqa: E731
        amp = sersic_amp_from_flux(col("sersic_flux"), col("src_R"), col("src_n"))
        src = (
            col("src_x"),
            col("src_y"),
            *sersic_coefficients(amp, col("src_R"), col("src_n"), col("src_e1"), col("src_e2")),
        )
        return src, (p["clump_flux"], p["clump_sigma"], p["clump_x"], p["clump_y"])

    # ------------------------------------------------------------------ rendering
    def render_source(self, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Lensed source flux per pixel [B, N, N] (e-/s, no PSF) and mu_F [B]: Sérsic + clumps
        and COSMOS sources each on their subset; with ``data.adaptive`` one ray per pixel, then
        the full supersampling where a pixel needs it (:mod:`lensexp.sim.adaptive`)."""
        B = p["theta_E"].shape[0]
        cos = p["is_cosmos"] if self.galaxies is not None else torch.zeros_like(p["is_cosmos"])
        img = None
        for kind, rows in (("sersic", torch.nonzero(~cos).squeeze(1)), ("cosmos", torch.nonzero(cos).squeeze(1))):
            if not rows.numel():
                continue
            sub = p if rows.numel() == B else {k: v[rows] for k, v in p.items()}
            draw = self._sersic_part if kind == "sersic" else self._cosmos_part
            if self.adaptive:
                part = self._refine(kind, sub, draw(sub, self.x1, self.y1, 1))
            else:
                part = draw(sub, self.x, self.y, self.ss)
            if rows.numel() == B:
                img = part
                break
            if img is None:
                img = torch.zeros(B, self.npix, self.npix, dtype=self.dtype, device=self.device)
            img[rows] = part
        return img, img.sum((1, 2)) / p["src_flux"]

    def _sersic_part(self, sub: dict, x, y, ss: int) -> torch.Tensor:
        """Lensed Sérsic + clumps sources [b, N, N] traced on the sub-pixel planes x, y [1, ss^2 N^2]."""
        lens_coef, extra = self._lens(sub, x, y)
        args = (x, y, lens_coef, *self._sersic_source(sub), self.npix, ss, self.pixscale)
        return self._trace(*args) if extra is None else trace_sersic(*args, extra=extra)

    def _cosmos_part(self, sub: dict, x, y, ss: int) -> torch.Tensor:
        """Lensed COSMOS sources [b, N, N] traced on the sub-pixel planes x, y [1, ss^2 N^2]."""
        gal = self.galaxies
        coef = gal.grid_coefficients(*(sub[k] for k in GALAXY_KEYS))
        lens_coef, extra = self._lens(sub, x, y)
        grid = (self._cosmos_grid if extra is None else cosmos_grid)(x, y, lens_coef, coef, extra)
        mode = str(self.c.source.cosmos.interpolation)
        sb = gal.sample_grid(grid, sub["gal_index"], sub["gal_scale"], sub["src_flux"], mode)
        return bin_supersampled(sb, self.npix, ss, self.pixscale)

    def _refine(self, kind: str, sub: dict, img: torch.Tensor) -> torch.Tensor:
        """The pixels of a coarse image [b, N, N] (lensed ``kind`` sources, or ``lens`` light) that
        need it, re-rendered with the full supersampling (:mod:`lensexp.sim.adaptive`), in place."""
        idx = adaptive.refine_pixels(img, self.ss, self._threshold[kind == "lens"], self._error_mask)
        if not idx.numel():
            return img
        b, x, y = adaptive.subpixel_points(idx, self.npix, self.pixscale, self.ss, self.dtype)
        if kind == "lens":
            sb = sum(self._sersic_sb(x, y, adaptive.gather_rows(coef, b)) for coef in self._lens_light(sub))
        elif kind == "sersic":
            lens_coef, extra = self._rows_lens(sub, b, x, y)
            src_coef, clumps = (adaptive.gather_rows(t, b) for t in self._sersic_source(sub))
            sb = (self._lensed_sb if extra is None else lensed_sersic_sb)(x, y, lens_coef, src_coef, clumps, extra)
        else:
            gal = self.galaxies
            lens_coef, extra = self._rows_lens(sub, b, x, y)
            coef = adaptive.gather_rows(gal.grid_coefficients(*(sub[k] for k in GALAXY_KEYS)), b)
            grid = (self._cosmos_grid if extra is None else cosmos_grid)(x, y, lens_coef, coef, extra)
            mode = str(self.c.source.cosmos.interpolation)
            sb = gal.sample_rows(grid, b, sub["gal_index"], sub["gal_scale"], sub["src_flux"], mode)
        return adaptive.put_refined(img, idx, sb, self.pixscale, self.ss)

    def _lens_light(self, p: dict) -> list[tuple]:
        """Per lens-light component ((cx, cy) + Sérsic coefficients, each [B, 1]): the main one
        and the further concentric ones (``data.lens_light.components``, parameters ``llc_*``)."""
        keys = ("flux", "R", "n", "e1", "e2")
        comps = [[p["ll_" + key][:, None] for key in keys]]
        if "llc_flux" in p:
            comps += [[p["llc_" + key][:, k : k + 1] for key in keys] for k in range(p["llc_flux"].shape[1])]
        out = []
        for flux, R, n, e1, e2 in comps:
            sc = sersic_coefficients(sersic_amp_from_flux(flux, R, n), R, n, e1, e2)
            out.append((p["center_x"][:, None], p["center_y"][:, None], *sc))
        return out

    def render_lens_light(self, p: dict) -> torch.Tensor | None:
        """Lens-galaxy flux per pixel [B, N, N] (e-/s, no PSF); None when disabled."""
        if not self.c.lens_light.enabled:
            return None
        x, y, ss = (self.x1, self.y1, 1) if self.adaptive else (self.x, self.y, self.ss)
        img = None
        for coef in self._lens_light(p):
            part = self._sersic_image(x, y, coef, self.npix, ss, self.pixscale)
            img = part if img is None else img + part
        return self._refine("lens", p, img) if self.adaptive else img

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

    def observe(self, src, lens_light, p: dict, rng, artefacts: bool = True, noise: bool = True, keep_noise_map=False):
        """The detector stage for rendered ``src``/``lens_light`` [B, N, N] (:func:`instrument.observe`):
        returns (images, clean, meta)."""
        return inst.observe(
            self.c.instrument,
            src,
            lens_light,
            p,
            self.psf,
            rng,
            self.pixscale,
            artefacts,
            noise,
            keep_noise_map,
            mix=self._mix,
            digitise=self._digitise,
        )

    def sample(self, n: int, seed: int, batch_size: int = 64, **kwargs) -> SimBatch:
        """Simulate ``n`` systems, identical for identical (config, seed, batch_size): the
        :meth:`batches` joined (keywords as there)."""
        out = list(self.batches(n, seed, batch_size, **kwargs))
        if not out:
            return SimBatch(torch.zeros(0, self.n_bands, self.npix, self.npix), torch.zeros(0, len(LABELS)))
        return _concat(out)

    def batches(
        self,
        n: int,
        seed: int,
        batch_size: int = 64,
        artefacts: bool = True,
        noise: bool = True,
        keep_clean: bool = False,
        keep_noise_map: bool = False,
    ):
        """Yield the batches (:class:`SimBatch`) of ``n`` systems in order; together they are
        :meth:`sample` (consumers that stream them skip one copy of the whole set).

        Batches hold :func:`effective_batch_size` systems (``batch_size``, capped for large
        images). Systems with ``mu_F < source.min_mu`` are redrawn. ``artefacts``/``noise``
        switch the detector effects off wholesale (e.g. for galleries and tests).
        ``keep_clean`` returns the noiseless images too, ``keep_noise_map`` the expected pixel
        variance ``meta['noise_var']`` [(e-/s)^2].
        """
        if n < 0:
            raise ConfigError(f"number of images must be >= 0, got {n}")
        # Sérsic and Gaussian tails underflow into denormal floats, which x86 CPUs process ~100x
        # slower; flushing them to zero (FTZ/DAZ, this thread) changes values by < 1e-38.
        torch.set_flush_denormal(True)
        rng = torch.Generator(device=self.device)
        rng.manual_seed(int(seed))
        done, pool = 0, []
        batch_size = effective_batch_size(batch_size, self.npix, self.ss)
        while done < n:
            b = min(batch_size, n - done)
            yield self._one_batch(b, rng, pool, artefacts, noise, keep_clean, keep_noise_map)
            done += b

    def _one_batch(self, b: int, rng, pool, artefacts, noise, keep_clean, keep_noise_map) -> SimBatch:
        p, src, mu = self._draw_lensed(b, rng, pool)
        images, clean, meta = self.observe(src, self.render_lens_light(p), p, rng, artefacts, noise, keep_noise_map)
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


def simulate_batch(cfg, n: int, seed: int, device="cpu", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Convenience: ``(images [n, bands, H, W], labels [n, 8])`` for a data config and a seed."""
    sim = Simulator(cfg.data if "data" in cfg else cfg, device=device)
    b = sim.sample(n, seed, **kwargs)
    return b.images, b.labels
