"""Detector and observation effects, batched over images [B, C, N, N] in e-/s per pixel.

Every function is pure apart from the random generator it takes; amplitudes are stated in the
units the instrument uses (electrons e-, seconds s, arcsec).
"""

from __future__ import annotations

import math

import torch

from lensexp.sim.normalize import normalize
from lensexp.sim.psf import EE_KEYS
from lensexp.sim.ranges import check_range, draw


def mag_to_flux(mag, zeropoint):
    """AB magnitude -> flux [e-/s] for a zero point [mag giving 1 e-/s]."""
    return 10.0 ** (-0.4 * (mag - zeropoint))


def sky_per_pixel(sky_mag_arcsec2, zeropoint, pixscale):
    """Sky level [e-/s/pixel] from a surface brightness [mag/arcsec^2]."""
    return mag_to_flux(sky_mag_arcsec2, zeropoint) * pixscale**2


def add_noise(image, exposure_time, sky, read_noise, gain, generator, poisson: str = "exact", digitise=None):
    """Sky-subtracted noisy image [e-/s] from a noiseless one [e-/s per pixel].

    Counts ``(image + sky) t`` [e-] get Poisson noise (``poisson='exact'``: ``torch.poisson``;
    ``'gaussian'``: one normal draw with the Poisson + read-noise variance, faster, right above
    ~20 e- per pixel), Gaussian read noise [e- rms] and digitisation by the ``gain`` [e-/ADU];
    then the sky is subtracted and the result divided by ``t``. ``exposure_time``, ``sky``,
    ``read_noise``, ``gain`` broadcast as [B, 1, 1, 1] or scalars. ``digitise`` replaces
    :func:`digitise_counts` (e.g. by its compiled form). Expected variance per pixel
    [(e-/s)^2]: :func:`noise_variance`.
    """
    digitise = digitise or digitise_counts
    z = _randn_like(image, generator)
    if poisson == "exact":
        counts = torch.poisson(((image + sky) * exposure_time).clamp(min=0), generator=generator)
        return digitise(counts, z, exposure_time, sky, read_noise, gain, 0.0)
    if poisson == "gaussian":
        return digitise(image, z, exposure_time, sky, read_noise, gain, 1.0)
    raise ValueError(f"poisson must be 'exact' or 'gaussian', got '{poisson}'")


def digitise_counts(x, z, exposure_time, sky, read_noise, gain, gaussian_poisson: float):
    """Noise arithmetic shared by both Poisson modes (pure, so ``torch.compile`` fuses it).

    ``gaussian_poisson = 1``: ``x`` is the noiseless rate [e-/s] and ``z`` a unit normal carrying
    Poisson and read noise together; ``0``: ``x`` holds Poisson counts [e-] and ``z`` adds read
    noise only. Returns the digitised, sky-subtracted rate [e-/s].
    """
    if gaussian_poisson:
        mean = ((x + sky) * exposure_time).clamp(min=0)
        counts = mean + torch.sqrt(mean + read_noise * read_noise) * z
    else:
        counts = x + read_noise * z
    return torch.round(counts / gain) * gain / exposure_time - sky


def noise_variance(image, exposure_time, sky, read_noise, gain):
    """Expected pixel variance [(e-/s)^2]: ``(image + sky)/t + read^2/t^2 + gain^2/(12 t^2)``."""
    t2 = exposure_time * exposure_time
    return (image + sky).clamp(min=0) / exposure_time + (read_noise * read_noise + gain * gain / 12.0) / t2


def correlate_noise(noise, fwhm_pix, generator=None):
    """Convolve a noise field [B, C, N, N] with a Gaussian of FWHM [px], keeping its variance.

    Mimics drizzled / resampled images whose pixels share noise. The kernel is normalised so that
    the sum of its squares is one, so white noise of variance v stays variance v.
    """
    sigma = fwhm_pix / 2.3548
    r = max(1, int(math.ceil(3 * sigma)))
    ax = torch.arange(-r, r + 1, dtype=noise.dtype, device=noise.device)
    g = torch.exp(-0.5 * (ax / sigma) ** 2)
    k2 = g[:, None] * g[None, :]
    k2 = k2 / torch.sqrt((k2 * k2).sum())
    B, C, N, _ = noise.shape
    x = noise.reshape(B * C, 1, N, N)
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="circular")
    y = torch.nn.functional.conv2d(x, k2[None, None])
    return y.reshape(B, C, N, N)


def _randn_like(t, generator):
    # normal_ on a fresh buffer is ~1.5x faster than torch.randn on CPU
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).normal_(generator=generator)


def _rand(shape, generator, like):
    return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)


def uniform(lo, hi, shape, generator, like):
    """Uniform draws in [lo, hi) of ``shape`` on ``like``'s dtype/device."""
    return lo + (hi - lo) * _rand(shape, generator, like)


def cosmic_rays(
    shape,
    n_mean,
    length_pix,
    width_pix,
    amplitude,
    worm_fraction,
    generator,
    like,
    n_points: int = 48,
    into=None,
    scale=None,
):
    """Cosmic-ray deposits [e-] for images of ``shape`` (B, C, N, N).

    Per image and band the number of hits is Poisson(``n_mean``). Each hit is a track of length
    ``length_pix`` (range, pixels), width ``width_pix`` (range, pixels) and peak deposit
    ``amplitude`` (range, e- per pixel). A fraction ``worm_fraction`` are curved 'worms' whose
    direction random-walks along the track. Tracks are drawn as ``n_points`` samples along their
    length, each spread across the width, and splatted bilinearly - all batched.

    With ``into`` (a contiguous [B, C, N, N] image) the deposits, times ``scale`` [B] (e.g.
    1 / exposure time), are added to it in place - no full-size buffer - and the number of tracks
    per image [B] (over its bands) is returned instead.
    """
    B, C, N, _ = shape
    dev, dt = like.device, like.dtype
    counts = torch.poisson(torch.full((B * C,), float(n_mean), device=dev, dtype=dt), generator=generator).long()
    T = int(counts.sum())
    tracks = counts.reshape(B, C).sum(1)
    out = torch.zeros(B * C * N * N, device=dev, dtype=dt) if into is None else into.view(-1)
    if T == 0:
        return out.reshape(shape) if into is None else tracks
    owner = torch.repeat_interleave(torch.arange(B * C, device=dev), counts)
    x0 = uniform(0, N - 1, (T,), generator, like)
    y0 = uniform(0, N - 1, (T,), generator, like)
    theta = uniform(0, math.pi, (T,), generator, like)
    length = uniform(*length_pix, (T,), generator, like)
    width = uniform(*width_pix, (T,), generator, like)
    amp = uniform(*amplitude, (T,), generator, like)
    worm = _rand((T,), generator, like) < worm_fraction
    step = length / (n_points - 1)  # px per sample along the track
    turn = _randn_like(torch.empty(T, n_points, device=dev, dtype=dt), generator) * 0.35
    turn = torch.where(worm[:, None], turn, torch.zeros_like(turn))
    ang = theta[:, None] + torch.cumsum(turn, dim=1)
    xs = (
        x0[:, None]
        + torch.cumsum(step[:, None] * torch.cos(ang), dim=1)
        - length[:, None] / 2 * torch.cos(theta)[:, None]
    )
    ys = (
        y0[:, None]
        + torch.cumsum(step[:, None] * torch.sin(ang), dim=1)
        - length[:, None] / 2 * torch.sin(theta)[:, None]
    )
    # spread across the width: W offsets perpendicular to the local direction
    W = 5
    off = torch.linspace(-0.5, 0.5, W, device=dev, dtype=dt)
    px = xs[:, :, None] - torch.sin(ang)[:, :, None] * off * width[:, None, None]
    py = ys[:, :, None] + torch.cos(ang)[:, :, None] * off * width[:, None, None]
    # deposit per sample so that a pixel crossed along the track receives ~amp
    samples_per_pix = 1.0 / step.clamp(min=1e-3) * W / width.clamp(min=1.0)
    w_track = amp / samples_per_pix
    if scale is not None:
        w_track = w_track * scale[owner // C]
    w_sample = w_track[:, None, None].expand_as(px)
    idx_img = owner[:, None, None].expand_as(px)
    _splat(out, idx_img.reshape(-1), px.reshape(-1), py.reshape(-1), w_sample.reshape(-1), N)
    return out.reshape(shape) if into is None else tracks


def _splat(flat, img, x, y, w, N):
    """Bilinear scatter-add of weights ``w`` at (x, y) [px] into flat images [M * N * N]."""
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = x - x0, y - y0
    xi0, yi0 = x0.long(), y0.long()
    idx, val = [], []
    for dx, dy, ww in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = xi0 + dx, yi0 + dy
        ok = (xi >= 0) & (xi < N) & (yi >= 0) & (yi < N)
        # corners off the image add 0 to pixel 0 instead of being compacted away (the same sums;
        # boolean indexing cost a third of the cosmic-ray stage at hst size)
        idx.append(torch.where(ok, img * N * N + yi.clamp(0, N - 1) * N + xi.clamp(0, N - 1), 0))
        val.append(torch.where(ok, w * ww, 0.0))
    # one scatter, the corners in the order four scatters would add them: the same sums, fewer passes
    flat.index_add_(0, torch.cat(idx), torch.cat(val))


def mix_bands(arc, band_src, lens=None, band_lens=None):
    """Noiseless bands [B, C, N, N] from the PSF-convolved source ``arc`` [B, 1, N, N] and lens
    light ``lens`` (or None), scaled per band by ``band_src`` / ``band_lens`` [B, C] (pure: one
    fused pass under ``torch.compile``)."""
    clean = arc * band_src[:, :, None, None]
    if lens is not None:
        clean = clean + lens * band_lens[:, :, None, None]
    return clean


def hot_pixels(shape, fraction, amplitude, generator, like, into=None):
    """Hot-pixel image [e-/s] and mask: each pixel hot with probability ``fraction`` (a binomial
    number of hot pixels at uniformly random places), level U(amplitude). With ``into`` (a
    contiguous image of ``shape``) the levels are added to it in place and the number of hot
    pixels per image [B] (over its bands) is returned instead."""
    total = math.prod(shape)
    n = torch.tensor(float(total), dtype=torch.float64)
    k = int(torch.binomial(n, torch.tensor(float(fraction), dtype=torch.float64), generator=_cpu(generator)))
    flat = (
        torch.randperm(total, generator=generator, device=like.device)[:k]
        if k > total // 8
        else _distinct_randint(total, k, generator, like.device)
    )
    level = uniform(*amplitude, (k,), generator, like)
    if into is not None:
        into.view(-1).index_add_(0, flat, level)
        return torch.bincount(flat // math.prod(shape[1:]), minlength=shape[0])
    img = torch.zeros(total, dtype=like.dtype, device=like.device)
    img[flat] = level
    hot = torch.zeros(total, dtype=torch.bool, device=like.device)
    hot[flat] = True
    return img.reshape(shape), hot.reshape(shape)


def _cpu(generator):
    """``torch.binomial`` samples on the CPU: a CPU generator seeded from ``generator``."""
    if generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator().manual_seed(seed)


def _distinct_randint(total: int, k: int, generator, device):
    """``k`` distinct integers in [0, total) (redraws the rare collisions)."""
    idx = torch.unique(torch.randint(0, total, (k,), generator=generator, device=device))
    while idx.numel() < k:
        more = torch.randint(0, total, (k - idx.numel(),), generator=generator, device=device)
        idx = torch.unique(torch.cat([idx, more]))
    return idx


def circular_masks(arc, n_range, radius_arcsec, pixscale, keep_fraction, generator):
    """Random circular masks [B, N, N] bool that keep >= ``keep_fraction`` of the arc flux.

    ``arc`` [B, N, N] is the noiseless lensed source (any band sum). Up to ``n_range[1]``
    candidate discs of radius ``radius_arcsec`` (range) are placed uniformly in the field; in a
    random order, a disc is kept while the summed arc flux under the kept discs stays below
    ``1 - keep_fraction`` of the total (overlaps are counted twice, so the bound is safe).
    At least ``n_range[0]`` discs are tried.
    """
    B, N, _ = arc.shape
    dev, dt = arc.device, arc.dtype
    kmax = int(n_range[1])
    if kmax <= 0:
        return torch.zeros(B, N, N, dtype=torch.bool, device=dev)
    n = torch.randint(int(n_range[0]), kmax + 1, (B,), generator=generator, device=dev)
    cx = uniform(0, N - 1, (B, kmax), generator, arc)
    cy = uniform(0, N - 1, (B, kmax), generator, arc)
    r = uniform(*radius_arcsec, (B, kmax), generator, arc) / pixscale
    active = torch.arange(kmax, device=dev)[None, :] < n[:, None]
    r2 = torch.where(active, r * r, -1.0)  # inactive discs cover nothing
    # each disc lives in an S x S window around its centre: work on windows, not whole images
    w = int(math.ceil(float(r.max()))) if r.numel() else 0
    off = torch.arange(-w, w + 1, device=dev)
    ix = torch.round(cx).long()[..., None] + off  # [B, K, S]
    iy = torch.round(cy).long()[..., None] + off
    d2 = (ix.to(dt) - cx[..., None])[..., None, :] ** 2 + (iy.to(dt) - cy[..., None])[..., :, None] ** 2
    inside = (d2 <= r2[..., None, None]) & ((ix >= 0) & (ix < N))[..., None, :] & ((iy >= 0) & (iy < N))[..., :, None]
    flat = (iy.clamp(0, N - 1)[..., :, None] * N + ix.clamp(0, N - 1)[..., None, :]).reshape(B, -1)
    pos = arc.clamp(min=0).reshape(B, N * N)
    total = pos.sum(1).clamp(min=1e-30)
    covered = torch.where(inside.reshape(B, -1), pos.gather(1, flat), 0.0).reshape(inside.shape)
    frac = covered.sum((-1, -2)) / total[:, None]
    ok = torch.cumsum(frac, dim=1) <= (1.0 - keep_fraction)
    keep = (inside & ok[..., None, None]).reshape(B, -1)
    mask = torch.zeros(B, N * N, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)[:, None].expand_as(flat)
    mask[rows[keep], flat[keep]] = True
    return mask.reshape(B, N, N)


def observe(
    I,
    src,
    lens_light,
    p: dict,
    psf,
    rng,
    pixscale: float,
    with_artefacts: bool = True,
    with_noise: bool = True,
    keep_noise_map: bool = False,
    mix=None,
    digitise=None,
):
    """The detector stage: PSF, bands, noise, artefacts and normalisation of one batch.

    ``I``: the ``data.instrument`` config (checked, plain or DictConfig); ``src``, ``lens_light``:
    lensed source and lens light [B, N, N] (e-/s, no PSF; lens light may be None); ``p``: the
    drawn parameters (``psf_index``, ``band_src``, ``band_lens``, ...); ``psf``: a
    :class:`psf.PSFBank`; ``mix``/``digitise`` replace :func:`mix_bands`/:func:`digitise_counts`
    (e.g. by compiled forms). Returns (images [B, C, N, N], clean [B, C, N, N], meta).
    """
    mix = mix or mix_bands
    B, dev, dt = src.shape[0], src.device, src.dtype
    d = lambda lohi, m=B: draw(rng, m, check_range("", lohi), dev, dt)  # noqa: E731
    # convolution is linear: convolve source and lens light once each, then mix the bands
    if lens_light is None:
        arc, lens = psf.convolve(src[:, None], p["psf_index"]), None
    else:
        arc, lens = psf.convolve_pair(src[:, None], lens_light[:, None], p["psf_index"])
    clean = mix(arc, p["band_src"], lens, p.get("band_lens"))
    arc = arc[:, 0]
    n_bands = clean.shape[1]
    t = d(I.exposure_time)[:, None, None, None]
    sky = sky_per_pixel(d(I.sky_mag), float(I.zeropoint), pixscale)[:, None, None, None]
    read = d(I.read_noise)[:, None, None, None]
    gain = float(I.gain)
    meta = {
        "psf_fwhm": psf.fwhm[p["psf_index"]],
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
    if psf.ee is not None:  # the PSF described to networks that take it (model.psf_input)
        meta.update({key: psf.ee[p["psf_index"], j] for j, key in enumerate(EE_KEYS)})
    img = clean
    if with_noise and I.noise:
        noisy = add_noise(clean, t, sky, read, gain, rng, str(I.poisson), digitise)
        if I.correlated_noise.enabled:
            fw = float(d(I.correlated_noise.fwhm_pix, 1)[0])
            noisy = clean + correlate_noise(noisy - clean, fw)
        img = noisy
        if keep_noise_map:
            meta["noise_var"] = noise_variance(clean, t, sky, read, gain).float()
    if with_artefacts:
        # in place on the image (a fresh tensor): sparse adds, no full-size artefact buffers
        img = img.clone() if img is clean else img
        img += d(I.bias, B * n_bands).reshape(B, n_bands, 1, 1)
        cr, hp, mk = I.cosmic_rays, I.hot_pixels, I.masks
        if cr.enabled:
            meta["cosmic_rays"] = cosmic_rays(
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
            meta["hot_pixels"] = hot_pixels(img.shape, float(hp.fraction), amp, rng, img, into=img)
        if mk.enabled:
            m = circular_masks(
                arc, check_range("", mk.n), check_range("", mk.radius), pixscale, float(mk.keep_arc_flux), rng
            )
            img.masked_fill_(m[:, None], 0.0)
            meta["mask"] = m
    img = normalize(img, str(I.normalize))
    return img, clean, meta
