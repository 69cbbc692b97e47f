"""The lens-model figure of a fit (``save_plots=DIR``): the whole field (data, model, normalised
residual) and, with lens light, a zoom on the Einstein ring with the lens light subtracted
(data - lens light, the lensed-source model, residual) and the fitted Einstein radius drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def fit_figure(
    data: torch.Tensor,
    templates: torch.Tensor,
    amps: torch.Tensor,
    var: torch.Tensor,
    use: torch.Tensor,
    pixscale: float,
    name: str,
    lens: dict,
    out: Path,
    n_src: int = 1,
) -> Path:
    """Write ``out/<name>_fit.png`` for one lens.

    ``data`` [N, N] (e-/s), ``templates`` [K, N, N] unit-amplitude component images (the
    ``n_src`` lensed source components first, then the lens-light components), ``amps`` [K],
    ``var`` the pixel variance, ``use`` the pixels in the likelihood, ``lens``: ``theta_E``,
    ``center_x``, ``center_y`` [arcsec] in the fit grid's centred frame and ``chi2_dof``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    out.mkdir(parents=True, exist_ok=True)
    comp = (amps[:, None, None] * templates).cpu().numpy()
    d, src, light = data.cpu().numpy(), comp[:n_src].sum(0), comp[n_src:].sum(0)
    m = src + light
    ok = use.cpu().numpy().astype(bool)
    z = np.where(ok, (d - m) / np.sqrt(var.cpu().numpy()), np.nan)
    n = d.shape[-1]
    zoom = templates.shape[0] > n_src
    fig, axes = plt.subplots(2 if zoom else 1, 3, figsize=(10, 6.8 if zoom else 3.4), squeeze=False)
    vmax = max(float(np.percentile(np.abs(d[ok]) if ok.any() else np.abs(d), 99.5)), 1e-12)
    ext = np.array([-0.5, n - 0.5, -0.5, n - 0.5]) - (n - 1) / 2
    ext = ext * pixscale  # arcsec, image centre at 0 (conventions.md)
    _panel(axes[0, 0], np.arcsinh(d / (0.05 * vmax)), ext, "data", "magma")
    _panel(axes[0, 1], np.arcsinh(m / (0.05 * vmax)), ext, "model", "magma")
    h = _panel(axes[0, 2], z, ext, "(data − model) / σ", "RdBu_r", (-5, 5))
    fig.colorbar(h, ax=axes[0, 2], fraction=0.046)
    if zoom:
        theta, cx, cy = (float(lens[k]) for k in ("theta_E", "center_x", "center_y"))
        half = max(2.0 * theta, 1.0)
        arcs = np.where(ok, d - light, np.nan)
        hi = max(float(np.nanpercentile(np.abs(src), 99.9)), 1e-12)
        for ax, im, title, cmap, lim in (
            (axes[1, 0], arcs, "data − lens light (zoom)", "magma", (-0.3 * hi, hi)),
            (axes[1, 1], src, "lensed source model", "magma", (-0.3 * hi, hi)),
            (axes[1, 2], z, "(data − model) / σ (zoom)", "RdBu_r", (-5, 5)),
        ):
            h2 = _panel(ax, im, ext, title, cmap, lim)
            ax.set_xlim(cx - half, cx + half)
            ax.set_ylim(cy - half, cy + half)
            ax.add_patch(Ellipse((cx, cy), 2 * theta, 2 * theta, fill=False, ls="--", lw=0.8, color="c"))
            ax.tick_params(labelsize=7)
        fig.colorbar(h2, ax=axes[1, 2], fraction=0.046)
        axes[1, 0].set_ylabel("y [arcsec]", fontsize=8)
        axes[1, 0].set_xlabel("x [arcsec]", fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{name}: θE = {float(lens['theta_E']):.3f}″ (dashed circle), χ²/dof = {float(lens['chi2_dof']):.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    path = out / (name.split(".")[0] + "_fit.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _panel(ax, im, extent, title, cmap, lim=(None, None)):
    h = ax.imshow(im, origin="lower", cmap=cmap, vmin=lim[0], vmax=lim[1], extent=extent, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    return h
