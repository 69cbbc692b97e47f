"""The "dictionary look-up?" test: ``python -m lensexp.lookup ckpt=CKPT bank=BANK out=OUT``.

Hezaveh et al.'s talk asks whether networks merely look up the nearest training example. The
baseline here does exactly that: :class:`LookupBank` holds a simulated bank of the training
preset (``python -m lensexp.simulate data=kappa n=20000 seed=11 out=BANK``), per-image normalised
like the network's input, and returns the convergence map of the nearest image (Euclidean
distance in pixel space; scikit-learn's brute-force nearest neighbours). The command simulates
test sets of each mass class (``classes``, by default the checkpoint's training family and the
families never used in training, ``sie_pair``, ``sie_subhalo``, ``epl``; :mod:`lensexp.sim.mass`) with a seed of
their own, predicts their maps with the network and with the look-up, and writes per class the
mean |kappa error| (kappa clipped at 3, 0.3-2" annulus), the ratio network / look-up, the
Einstein-radius error and the network's per-pixel coverage: ``OUT/lookup.csv``, ``.md``,
``.json``, ``per_lens.csv`` and ``OUT/lookup.png`` (observed image / true kappa / network kappa
/ look-up kappa, one row per class, as in the talk).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lensexp import kappa_maps
from lensexp.errors import ConfigError
from lensexp.kappa_module import evaluate_maps
from lensexp.sim.normalize import normalize

log = logging.getLogger("lensexp.lookup")

CLASSES = ("sie", "epl_narrow", "sie_blobs", "sie_pair", "sie_subhalo", "epl")
UNSEEN = ("sie_pair", "sie_subhalo", "epl")  # never in a training family of data=kappa


def default_classes(train_kind: str) -> list[str]:
    """The classes compared when none are given: the checkpoint's training family first, then the
    unseen ones."""
    return [train_kind, *[k for k in UNSEEN if k != train_kind]]


def bank_family(root: str | Path) -> str | None:
    """The mass family (``data.mass.kind``) a shard set was simulated with, from its manifest;
    ``None`` when the manifest does not say."""
    from lensexp.shard_set import MANIFEST

    try:
        cfg = json.loads(Path(root, MANIFEST).read_text())["config"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str((cfg.get("mass") or {}).get("kind", "sie"))


class LookupBank:
    """Nearest-image look-up of convergence maps over a shard set with ``kappa.npy`` samples
    (all its splits, at most ``max_n`` samples); images normalised with ``input_norm``."""

    def __init__(self, root: str | Path, input_norm: str = "quantile", max_n: int | None = None):
        from sklearn.neighbors import NearestNeighbors

        from lensexp.data import shard_dataset, shard_urls
        from lensexp.shard_set import SPLITS

        urls = []
        for split in SPLITS:
            try:
                urls += shard_urls(root, split)
            except ConfigError:
                continue
        if not urls:
            raise ConfigError(f"look-up bank '{root}' has no shards")
        images, maps = [], []
        for s in shard_dataset(urls):
            if "kappa" not in s:
                raise ConfigError(f"look-up bank '{root}' holds no kappa maps: simulate it with data=kappa")
            images.append(s["image"])
            maps.append(s["kappa"])
            if max_n and len(images) >= max_n:
                break
        self.input_norm = input_norm
        self.family = bank_family(root)
        self.shape = tuple(images[0].shape)
        self.kappa = torch.stack(maps)
        self.vectors = self._vectors(torch.stack(images))
        self.index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(self.vectors)

    def __len__(self) -> int:
        return self.kappa.shape[0]

    def _vectors(self, images: torch.Tensor) -> np.ndarray:
        return normalize(images.float(), self.input_norm).reshape(images.shape[0], -1).numpy()

    def query(self, images: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Maps [B, N, N] of the nearest bank images to ``images`` [B, C, N, N], and their indices."""
        if tuple(images.shape[1:]) != self.shape:
            raise ConfigError(f"images of shape {tuple(images.shape[1:])} do not match the bank's {self.shape}")
        _, idx = self.index.kneighbors(self._vectors(images))
        return self.kappa[idx[:, 0]], idx[:, 0]


def class_set(data_cfg: DictConfig, kind: str, n: int, seed: int):
    """``n`` simulated lenses of mass class ``kind`` on the training grid: (images, true maps).
    Family ranges the training config lacks (a checkpoint older than the family) come from the
    ``kappa`` preset; those it has are kept."""
    from lensexp.config import load_data_preset
    from lensexp.sim.render import Simulator

    cfg = OmegaConf.merge(data_cfg)  # a copy that may take keys the saved config lacks
    OmegaConf.set_struct(cfg, False)
    cfg.mass = OmegaConf.merge(
        load_data_preset("kappa").mass, data_cfg.get("mass") or {}, {"kind": kind, "kappa_map": True}
    )
    b = Simulator(cfg).sample(n, seed=seed)
    return b.images, b.meta["kappa"]


def evaluate_class(pred, bank: LookupBank, images, kappa, pixscale: float, batch: int = 64, seed: int = 0):
    """Per-lens network and look-up scores, and the maps of the first lens, for one class."""
    g = torch.Generator().manual_seed(seed)
    net, look, first = [], [], None
    for i in range(0, images.shape[0], batch):
        im, k = images[i : i + batch], kappa[i : i + batch]
        samples, mean = pred.samples(im, g)
        lk, _ = bank.query(im)
        true_r = kappa_maps.einstein_radius(k, pixscale)  # once for both methods
        net.append(evaluate_maps(samples, k, pixscale, mean, true_r))
        look.append(kappa_maps.map_errors(lk, k, pixscale, true_r))
        if first is None:
            first = {"image": im[0, 0], "true": k[0], "net": mean[0], "lookup": lk[0]}
    cat = lambda rows: {key: torch.cat([r[key] for r in rows]) for key in rows[0]}  # noqa: E731
    return cat(net), cat(look), first


def summary_row(kind: str, net: dict, look: dict, bank_size: int, trained_on: bool) -> dict:
    """One table row: means (and medians) over the lenses of a class."""
    nm, lm = float(net["kappa_mae"].mean()), float(look["kappa_mae"].mean())
    return {
        "class": kind,
        "trained_on": trained_on,
        "n": int(net["kappa_mae"].numel()),
        "network_kappa_mae": nm,
        "network_kappa_mae_median": float(net["kappa_mae"].median()),
        "lookup_kappa_mae": lm,
        "lookup_kappa_mae_median": float(look["kappa_mae"].median()),
        "ratio": nm / lm if lm > 0 else float("nan"),
        "network_theta_E_frac_median": float(np.nanmedian(net["theta_E_frac"].numpy())),
        "lookup_theta_E_frac_median": float(np.nanmedian(look["theta_E_frac"].numpy())),
        "network_cov68": float(net["kappa_cov68"].mean()),
        "network_cov95": float(net["kappa_cov95"].mean()),
        "bank_size": bank_size,
    }


def panels(firsts: dict, pixscale: float, path: Path) -> None:
    """The talk's figure: per class, observed image / true kappa / network kappa / look-up kappa."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n = len(firsts)
    fig, axes = plt.subplots(n, 4, figsize=(10.4, 2.6 * n), squeeze=False, layout="constrained")
    half = firsts[next(iter(firsts))]["true"].shape[-1] * pixscale / 2
    ext = (-half, half, -half, half)
    norm = LogNorm(vmin=0.05, vmax=5.0)
    for r, (kind, f) in enumerate(firsts.items()):
        im = f["image"].numpy()
        s = max(float(np.percentile(np.abs(im), 99.5)), 1e-12)
        axes[r, 0].imshow(np.arcsinh(im / (0.1 * s)), origin="lower", cmap="magma", extent=ext)
        last = None
        for c, key in enumerate(("true", "net", "lookup"), 1):
            last = axes[r, c].imshow(
                f[key].clamp(min=0.05).numpy(), origin="lower", cmap="viridis", norm=norm, extent=ext
            )
            err = float(kappa_maps.annulus_error(f[key][None], f["true"][None], pixscale)) if key != "true" else None
            axes[r, c].set_title(f"{key} kappa" + (f"  |err| {err:.3f}" if err is not None else ""), fontsize=9)
        axes[r, 0].set_title(f"{kind}: observed", fontsize=9)
    fig.colorbar(last, ax=axes[:, 1:].ravel().tolist(), fraction=0.03, label="convergence kappa")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(cfg: DictConfig) -> list[dict]:
    """Network against look-up per mass class; writes the tables and the figure into ``cfg.out``."""
    from lensexp.checkpoints import load_module, run_config
    from lensexp.config import load_data_preset
    from lensexp.kappa_predict import KappaPredictor
    from lensexp.runtime import resolve_device, set_threads

    set_threads()
    torch.manual_seed(int(cfg.seed))  # MC dropout draws from torch's global generator: same seed, same table
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    module = load_module(cfg.ckpt, resolve_device(cfg.device))
    if module.hparams.get("task") != "kappa":
        raise ConfigError(f"'{cfg.ckpt}' predicts labels, not maps: the look-up test needs a task=kappa checkpoint")
    info = module.hparams.data_info or {}
    rc = run_config(cfg.ckpt)
    data_cfg = rc.data if rc is not None else load_data_preset(str(info.get("name", "kappa")))
    pixscale = float(info.get("pixscale", data_cfg.pixscale))
    pred = KappaPredictor(module, int(data_cfg.npix), pixscale, int(cfg.n_mc))
    bank = LookupBank(cfg.bank, str(module.hparams.input_norm), cfg.get("max_bank"))
    train_kind = str(OmegaConf.select(data_cfg, "mass.kind", default="sie"))
    if bank.family is not None and bank.family != train_kind:
        log.warning(
            "look-up bank '%s' holds mass family '%s' but the network was trained on '%s': the test "
            "compares against a bank of the training family (simulate one with data.mass.kind=%s)",
            cfg.bank,
            bank.family,
            train_kind,
            train_kind,
        )
    classes = list(cfg.classes) if cfg.classes else default_classes(train_kind)
    rows, firsts, per_lens = [], {}, []
    for j, kind in enumerate(classes):
        if kind not in CLASSES:
            raise ConfigError(f"unknown mass class '{kind}'; choose from {list(CLASSES)}")
        images, kappa = class_set(data_cfg, kind, int(cfg.n), int(cfg.seed) + j)
        net, look, firsts[kind] = evaluate_class(pred, bank, images, kappa, pixscale, seed=int(cfg.seed))
        rows.append(summary_row(kind, net, look, len(bank), kind == train_kind))
        per_lens += [
            {
                "class": kind,
                "index": i,
                "network_kappa_mae": float(net["kappa_mae"][i]),
                "lookup_kappa_mae": float(look["kappa_mae"][i]),
            }
            for i in range(images.shape[0])
        ]
        print(
            f"{kind}: network {rows[-1]['network_kappa_mae']:.4f}, look-up {rows[-1]['lookup_kappa_mae']:.4f}, "
            f"ratio {rows[-1]['ratio']:.2f}"
        )
    write_tables(out, rows, per_lens)
    panels(firsts, pixscale, out / "lookup.png")
    print(f"wrote {out}/lookup.csv, lookup.md, lookup.json, per_lens.csv and lookup.png")
    return rows


def write_tables(out: Path, rows: list[dict], per_lens: list[dict]) -> None:
    for name, table in (("lookup.csv", rows), ("per_lens.csv", per_lens)):
        with open(out / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    (out / "lookup.json").write_text(json.dumps(rows, indent=2))
    cols = [
        "class",
        "trained_on",
        "n",
        "network_kappa_mae",
        "lookup_kappa_mae",
        "ratio",
        "network_theta_E_frac_median",
        "lookup_theta_E_frac_median",
        "network_cov68",
        "network_cov95",
    ]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    (out / "lookup.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    import hydra

    from lensexp.cli import clean_errors

    hydra.main(config_path="../conf", config_name="lookup", version_base="1.3")(clean_errors(run))()
