"""Composing configs outside Hydra entry points (tests, benchmarks, notebooks)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from lensexp.errors import ConfigError
from lensexp.paths import PROJECT_ROOT

CONF_DIR = PROJECT_ROOT / "conf"


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose the primary config ``conf/<name>.yaml`` with Hydra overrides.

    Inside a running ``hydra.main`` (whose search path is ``conf/``) the active instance is used.
    """
    if GlobalHydra.instance().is_initialized():
        return compose(config_name=name, overrides=list(overrides or []))
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides or []))


def load_data_preset(name: str, overrides: list[str] | None = None) -> DictConfig:
    """The resolved ``data`` group preset ``conf/data/<name>.yaml`` (``overrides`` like
    ``['data.psf.kind=moffat']``)."""
    if not (CONF_DIR / "data" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
        raise ConfigError(f"unknown data preset '{name}'; choose one of {known}")
    cfg = compose_config("data_only", [f"data={name}", *(overrides or [])])
    return cfg.data
