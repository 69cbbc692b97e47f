"""Gallery: PNG grids of simulated lenses for each data preset, noiseless and realistic.

python -m lensexp.gallery                        # all presets -> outputs/gallery/*.png
python -m lensexp.gallery presets=[hst] n=8 seed=3
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from lensexp.cli import clean_errors, log
from lensexp.config import load_data_preset
from lensexp.sim.render import Simulator


def _stretch(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """asinh stretch scaled on the noiseless image ``ref`` (so noise and artefacts show)."""
    s = max(float(np.percentile(np.abs(ref), 99.5)), 1e-12)
    return np.arcsinh(img / (0.05 * s)) / np.arcsinh(1.0 / 0.05)


def gallery_figure(preset: str, n: int, seed: int, device: str = "cpu"):
    """Figure with ``n`` systems of ``preset``: per band, noiseless then realistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = load_data_preset(preset)
    sim = Simulator(cfg, device=device)
    real = sim.sample(n, seed=seed, keep_clean=True)
    bands = [b.name for b in cfg.bands]
    ncol = 2 * len(bands)
    fig, axes = plt.subplots(n, ncol, figsize=(max(1.9 * ncol, 5.0), 1.9 * n), squeeze=False)
    for i in range(n):
        lab = real.labels[i].numpy()
        for j, band in enumerate(bands):
            clean = real.clean[i, j].cpu().numpy()
            for k, (img, what) in enumerate(((clean, "noiseless"), (real.images[i, j].cpu().numpy(), "observed"))):
                ax = axes[i, 2 * j + k]
                ax.imshow(_stretch(img, clean), origin="lower", cmap="magma", vmin=-0.2, vmax=1.0)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{band} {what}", fontsize=8)
        src = "COSMOS" if bool(real.meta["is_cosmos"][i]) else "Sérsic"
        axes[i, 0].set_ylabel(f'θE={lab[0]:.2f}" μF={lab[7]:.1f}\n{src}', fontsize=7)
    fig.suptitle(
        f"lensexp preset '{preset}': {cfg.npix}x{cfg.npix} px at {cfg.pixscale}\"/px (asinh stretch)", fontsize=9
    )
    fig.tight_layout()
    return fig


@hydra.main(config_path="../conf", config_name="gallery", version_base="1.3")
@clean_errors
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    out = out if out.is_absolute() else Path(hydra.utils.get_original_cwd()) / out
    out.mkdir(parents=True, exist_ok=True)
    for preset in cfg.presets:
        fig = gallery_figure(str(preset), int(cfg.n), int(cfg.seed), str(cfg.device))
        path = out / f"gallery_{preset}.png"
        fig.savefig(path, dpi=110)
        log.info("wrote %s", path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
