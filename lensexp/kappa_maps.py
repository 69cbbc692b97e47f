"""Convergence-map metrics and summaries: annulus error, per-pixel coverage, Einstein radius.

Maps are [B, N, N] on the conventions.md grid (``x = (col - (N-1)/2) p``, ``y`` likewise with
row, ``p`` [arcsec/px]). The score of issue 15: the mean |kappa error| with kappa clipped at
``clip`` (3) in the annulus ``r_in <= r <= r_out`` (0.3-2") around the image centre.
"""

from __future__ import annotations

import math

import torch

ANNULUS = (0.3, 2.0)  # arcsec
KAPPA_CLIP = 3.0


def radius_grid(npix: int, pixscale: float, center=(0.0, 0.0), device=None) -> torch.Tensor:
    """Distance [N, N] (arcsec) of each pixel centre from ``center`` (x, y) [arcsec]."""
    c = (torch.arange(npix, dtype=torch.float64, device=device) - (npix - 1) / 2.0) * pixscale
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.hypot(x - center[0], y - center[1])


def annulus_mask(npix: int, pixscale: float, annulus=ANNULUS, device=None) -> torch.Tensor:
    """Boolean [N, N]: pixel centres with ``annulus[0] <= r <= annulus[1]`` from the image centre."""
    r = radius_grid(npix, pixscale, device=device)
    return (r >= annulus[0]) & (r <= annulus[1])


def annulus_error(pred: torch.Tensor, truth: torch.Tensor, pixscale: float, annulus=ANNULUS, clip=KAPPA_CLIP):
    """Mean |min(pred, clip) - min(truth, clip)| per map [B] over the annulus pixels."""
    m = annulus_mask(truth.shape[-1], pixscale, annulus, truth.device)
    err = (pred.clamp(max=clip) - truth.clamp(max=clip)).abs()
    return err[..., m].mean(-1)


def map_errors(pred: torch.Tensor, truth: torch.Tensor, pixscale: float, true_radius: torch.Tensor | None = None):
    """Per-map scores [B] of predicted maps [B, N, N] against true ones: ``kappa_mae``
    (:func:`annulus_error`) and ``theta_E_frac``, the |fractional error| of the Einstein radius
    against the true map's (``true_radius`` [B] when already known; NaN where either has none)."""
    if true_radius is None:
        true_radius = einstein_radius(truth, pixscale)
    return {
        "kappa_mae": annulus_error(pred, truth, pixscale),
        "theta_E_frac": (einstein_radius(pred, pixscale) / true_radius - 1).abs().float(),
    }


def annulus_coverage(samples: torch.Tensor, truth: torch.Tensor, pixscale: float, level: float, clip=KAPPA_CLIP):
    """Fraction [B] of annulus pixels whose clipped truth lies in the central ``level`` interval of
    the clipped map samples [S, B, N, N]."""
    m = annulus_mask(truth.shape[-1], pixscale, device=truth.device)
    s = samples.clamp(max=clip)[..., m]
    lo, hi = torch.quantile(s.float(), torch.tensor([(1 - level) / 2, (1 + level) / 2], device=s.device), dim=0)
    t = truth.clamp(max=clip)[..., m]
    return ((t >= lo) & (t <= hi)).float().mean(-1)


def peak_centre(kappa: torch.Tensor, pixscale: float) -> torch.Tensor:
    """Centre (x, y) [B, 2] arcsec of each map [B, N, N]: the brightest 2x2 pixel block locates
    the peak, refined to sub-pixel by the weighted mean position over the 4x4 pixels around it
    (weights kappa minus the window's minimum), symmetric for a peak between pixels."""
    B, N, _ = kappa.shape
    k = kappa.double()
    block = torch.nn.functional.avg_pool2d(k[:, None], 2, 1)[:, 0]  # [B, N-1, N-1]
    idx = block.reshape(B, -1).argmax(1)
    row, col = (idx // (N - 1)).clamp(1, N - 3), (idx % (N - 1)).clamp(1, N - 3)
    offs = torch.arange(-1, 3, device=kappa.device)
    rr = row[:, None, None] + offs[None, :, None]
    cc = col[:, None, None] + offs[None, None, :]
    w = k[torch.arange(B, device=kappa.device)[:, None, None], rr, cc]
    w = (w - w.amin((1, 2), keepdim=True)).nan_to_num(0.0, posinf=1e30)
    w = w / w.sum((1, 2), keepdim=True).clamp(min=1e-30)
    x = ((w * cc).sum((1, 2)) - (N - 1) / 2.0) * pixscale
    y = ((w * rr).sum((1, 2)) - (N - 1) / 2.0) * pixscale
    return torch.stack([x, y], 1)


def finite_cusp(kappa: torch.Tensor) -> torch.Tensor:
    """Maps [B, N, N] with a pixel centre exactly on a cusp (kappa = inf) given that pixel's mean
    convergence for an isothermal cusp: 4 ln(1 + sqrt 2) = 3.53 times the mean of its four
    neighbours (which sit one pixel from the cusp)."""
    bad = ~torch.isfinite(kappa)
    if not bool(bad.any()):
        return kappa
    k = torch.where(bad, torch.zeros_like(kappa), kappa).double()
    ones = (~bad).double()[:, None]
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)[None, None]
    near = torch.nn.functional.conv2d(k[:, None], kernel, padding=1)[:, 0]
    count = torch.nn.functional.conv2d(ones, kernel, padding=1)[:, 0].clamp(min=1)
    fill = 4 * math.log(1 + math.sqrt(2)) * near / count
    return torch.where(bad, fill.to(kappa.dtype), kappa)


def einstein_radius(kappa: torch.Tensor, pixscale: float, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Radius [B] (arcsec) within which the mean convergence of each map [B, N, N] equals 1,
    about ``centre`` [B, 2] (default :func:`peak_centre`); pixels are summed in order of
    distance and the crossing interpolated linearly in the enclosed mean. NaN where the mean
    never falls to 1 inside the field (or is below 1 from the start).

    Maps sampled at pixel centres misjudge a cusp's mass: for an isothermal lens of theta_E = 1"
    on a 0.1" grid the result is 2.7 % low with the cusp between pixels and 1 % high with it near
    a pixel centre (less for larger theta_E / pixel); errors are therefore quoted against the
    true map's radius measured the same way.
    """
    B, N, _ = kappa.shape
    kappa = finite_cusp(kappa)
    if centre is None:
        centre = peak_centre(kappa, pixscale)
    c = (torch.arange(N, dtype=torch.float64, device=kappa.device) - (N - 1) / 2.0) * pixscale
    y, x = torch.meshgrid(c, c, indexing="ij")
    r = torch.hypot(x[None] - centre[:, 0, None, None], y[None] - centre[:, 1, None, None]).reshape(B, -1)
    order = r.argsort(1)
    rs = r.gather(1, order)
    ks = kappa.double().reshape(B, -1).gather(1, order)
    mean_in = ks.cumsum(1) / torch.arange(1, N * N + 1, device=kappa.device)
    # effective radius of the first n pixels: sqrt(n a / pi), the area they cover
    r_eff = torch.sqrt(torch.arange(1, N * N + 1, device=kappa.device, dtype=torch.float64) * pixscale**2 / torch.pi)
    inside = rs <= (N / 2.0) * pixscale  # whole circles inside the field only
    below = (mean_in < 1.0) & inside
    first = torch.where(below.any(1), below.float().argmax(1), torch.full((B,), -1, device=kappa.device))
    out = torch.full((B,), float("nan"), dtype=torch.float64, device=kappa.device)
    ok = first > 0
    i = first[ok]
    b = torch.nonzero(ok).squeeze(1)
    m0, m1 = mean_in[b, i - 1], mean_in[b, i]
    f = ((m0 - 1.0) / (m0 - m1).clamp(min=1e-30)).clamp(0, 1)
    out[ok] = r_eff[i - 1] + f * (r_eff[i] - r_eff[i - 1])
    return out
