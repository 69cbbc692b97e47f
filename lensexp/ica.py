"""Lens-light removal by independent component analysis of two bands (Hezaveh et al. 2017).

The red lens galaxy and the blue lensed source mix into the two filters with different ratios;
FastICA (scikit-learn) separates the two components. Rule for the source: of the two mixing
vectors ``a_k = (a_red, a_blue)``, the source's has the larger blue-to-red ratio
``|a_blue| / |a_red|`` (the lens is red). Sign: the component is flipped so that it adds
positively to the red band. Scale: the returned source image is the component's contribution to
the first (red) band, ``a_red * s``, in the image's own units, with its median set to zero
(sky-subtracted images are mostly empty sky).
"""

from __future__ import annotations

import numpy as np


def remove_lens_light(cube: np.ndarray, seed: int = 0, smooth_pix: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Split a (2, H, W) cube into (source [H, W], lens [H, W], info) in band-1 units.

    The unmixing is learned on the cube smoothed by a Gaussian of ``smooth_pix`` pixels (pixel
    noise, independent between the bands, otherwise blurs the separation) and applied to the
    unsmoothed cube, so the outputs keep full resolution.
    """
    from scipy.ndimage import gaussian_filter
    from sklearn.decomposition import FastICA

    if cube.ndim != 3 or cube.shape[0] != 2:
        raise ValueError(f"ICA lens-light removal needs a (2, H, W) cube, got shape {cube.shape}")
    raw = np.nan_to_num(cube.astype(np.float64))
    fit = np.stack([gaussian_filter(b, smooth_pix) for b in raw]) if smooth_pix > 0 else raw
    x_fit = fit.reshape(2, -1).T
    scale = x_fit.std(0)
    scale[scale == 0] = 1.0
    ica = FastICA(n_components=2, whiten="unit-variance", random_state=seed, max_iter=1000, tol=1e-5)
    ica.fit(x_fit / scale)
    s = ica.transform(raw.reshape(2, -1).T / scale)  # [pixels, 2]
    a = ica.mixing_ * scale[:, None]  # [band, component] in image units
    ratio = np.abs(a[1]) / np.maximum(np.abs(a[0]), 1e-30)
    k_src = int(np.argmax(ratio))
    comps = []
    for k in range(2):
        img = (a[0, k] * s[:, k]).reshape(cube.shape[1:])
        comps.append(img - np.median(img))
    info = {"mixing": a.tolist(), "source_component": k_src, "blue_red_ratio": ratio.tolist()}
    return comps[k_src].astype(np.float32), comps[1 - k_src].astype(np.float32), info


def cube_source(cube: np.ndarray, name: str, seed: int = 0) -> np.ndarray:
    """The ICA source [H, W] of a file's two-band cube (``ica=true`` in predict and fit); a
    :class:`~lensexp.io.BadInput` naming the file when it is not a (2, H, W) cube."""
    from lensexp.io import BadInput

    if cube.shape[0] != 2:
        raise BadInput(f"{name}: ica=true needs a (2, H, W) two-band cube, got {cube.shape[0]} band(s)")
    return remove_lens_light(cube, seed=seed)[0]
