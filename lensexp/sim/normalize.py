"""Per-image normalisation of network inputs: flux units drop out, zero stays zero.

Used by the networks (``input_norm``), the look-up bank and the simulator's optional
``instrument.normalize``. Real images in any unit and simulations pass the same function.
"""

from __future__ import annotations

import math

import torch

NORMALIZE = ("none", "peak", "std", "quantile", "asinh")  # the methods of :func:`normalize`


def normalize(images, method: str = "none", quantile: float = 0.99, eps: float = 1e-12):
    """Per-image network normalisation of [B, C, N, N] images (zero stays zero, flux units drop
    out, so a FITS in any unit can be analysed).

    ``none``; ``peak`` (divide by max |x|); ``std`` (divide by the standard deviation);
    ``quantile`` (divide by the ``quantile`` of |x| over all bands - robust to cosmic rays);
    ``asinh``: ``asinh(x / sigma)`` per band, ``sigma`` the pixel noise measured on the image
    (:func:`noise_sigma`) - a Lupton-style stretch that keeps arcs a few sigma bright visible next
    to a lens galaxy thousands of sigma bright (bounded below by 1e-6 of the band's peak for
    noiseless images).
    """
    if method == "none":
        return images
    if method == "asinh":
        peak = images.abs().amax((-2, -1), keepdim=True)
        sigma = torch.maximum(noise_sigma(images), 1e-6 * peak).clamp(min=eps)
        return torch.asinh(images / sigma)
    flat = images.reshape(images.shape[0], -1)
    if method == "peak":
        s = flat.abs().amax(1)
    elif method == "std":
        s = flat.std(1)
    elif method == "quantile":
        s = torch.quantile(flat.abs().float(), quantile, dim=1).to(images.dtype)
    else:
        raise ValueError(f"normalize must be one of {NORMALIZE}; got '{method}'")
    return images / (s.clamp(min=eps)[:, None, None, None])


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Pixel noise sigma [B, C, 1, 1] of images [B, C, N, N], measured on the image itself: the
    MAD of second differences along rows, ``x[j-1] - 2 x[j] + x[j+1]``, over the fainter half of
    the pixels as judged by their vertical neighbours (independent of that pixel's noise) - the
    sky: a galaxy's steep core is left out, smooth light cancels, outliers such as cosmic rays
    do not move a median - as ``1.4826 MAD / sqrt(6)``. Pixels exactly zero (masked, as
    ``predict`` and the simulated masks leave them) take no part; an image without any other
    pixels reads 0. Noise correlated between neighbours (drizzle, PSF) reads lower, the same in
    simulations and real images."""
    x = images.float()
    left, mid, right = x[..., 1:-1, :-2], x[..., 1:-1, 1:-1], x[..., 1:-1, 2:]
    up, down = x[..., :-2, 1:-1], x[..., 2:, 1:-1]
    valid = ((left != 0) & (mid != 0) & (right != 0) & (up != 0) & (down != 0)).flatten(-2)
    level = torch.where(valid, (up + down).flatten(-2), torch.nan)
    sky = valid & (level <= level.nanmedian(-1, keepdim=True).values)
    d = torch.where(sky, (left - 2.0 * mid + right).flatten(-2), torch.nan)
    mad = (d - d.nanmedian(-1, keepdim=True).values).abs().nanmedian(-1).values
    return torch.nan_to_num(1.4826 / math.sqrt(6.0) * mad, nan=0.0).to(images.dtype)[..., None, None]
