"""Every primary config in conf/ composes and resolves, alone and with each data preset."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lensexp.config import CONF_DIR, compose_config

PRIMARY = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
DATA = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes(name):
    cfg = compose_config(name)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # every interpolation resolves
    if "data" in cfg:
        for preset in DATA:
            assert compose_config(name, [f"data={preset}"]).data.name == preset


@pytest.mark.parametrize(
    "name, keys",
    [
        ("fit", ["input", "out", "init", "pixscale", "lens_light", "max_npix", "noise.background_rms"]),
        ("predict", ["ckpt", "input", "out", "n_mc", "pixscale", "model_pixscale", "kappa_out"]),
        ("lookup", ["ckpt", "bank", "out", "classes", "n", "seed", "n_mc"]),
        ("compare_real", ["published", "methods", "peer", "systematic", "out"]),
        ("compare_fit", ["truth", "methods", "reference", "out"]),
        ("simulate", ["data.npix", "n", "seed", "out", "format"]),
        ("calibrate", ["ckpt", "out"]),
        ("train", ["model.backbone", "loss._target_", "data.npix", "logger.wandb.mode", "task"]),
    ],
)
def test_entry_point_configs_hold_their_contract_keys(name, keys):
    cfg = compose_config(name)

    def has(key):  # present, even as a required '???' value
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return node is not None and last in node.keys()

    missing = [k for k in keys if not has(k)]
    assert not missing, f"conf/{name}.yaml lacks {missing}"
