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


def test_the_fit_and_comparison_configs_exist():
    assert {"fit", "compare_fit", "predict", "train", "simulate", "calibrate", "compare"} <= set(PRIMARY)
