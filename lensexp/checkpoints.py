"""Trained checkpoints, loaded safely: weights-only, hyper-parameters allow-listed.

Checkpoints from others are untrusted: :func:`read_checkpoint` loads them with
``torch.load(weights_only=True)``; :func:`load_module` accepts only known hyper-parameter keys
and model/loss settings before building the network, and turns every failure into one
:class:`ConfigError` naming the file. ``ckpt`` may be a ``.ckpt`` file, an ensemble's
``ensemble.json`` or a run folder holding either.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lensexp.errors import ConfigError


LENS_MODULE_KEYS = frozenset(
    {
        "model",
        "loss",
        "in_chans",
        "lr",
        "weight_decay",
        "n_mc_val",
        "input_norm",
        "label_fit_batches",
        "labels",
        "data_info",
    }
)


def read_checkpoint(ckpt: str | Path) -> dict:
    """A checkpoint's contents, loaded weights-only (no code runs); every failure is one
    :class:`ConfigError` naming the file and the cause."""
    path = Path(ckpt)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: '{ckpt}'")
    if path.stat().st_size == 0:
        raise ConfigError(f"checkpoint '{ckpt}' is an empty file (0 bytes)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - untrusted file: any failure is a bad checkpoint
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds objects that would run code when loaded (refused)"
        raise ConfigError(f"checkpoint '{ckpt}' cannot be loaded weights-only: {reason}") from None
    if not isinstance(ck, dict):
        raise ConfigError(f"checkpoint '{ckpt}' is not a mapping: not a lensexp training checkpoint")
    return ck


KAPPA_MODULE_KEYS = frozenset(
    {
        "model",
        "in_chans",
        "lr",
        "weight_decay",
        "n_mc_val",
        "input_norm",
        "kappa_floor",
        "data_info",
        "task",
        "target",
        "kappa_max",
    }
)


KAPPA_MODEL_KEYS = frozenset(
    {"backbone", "decoder_channels", "head_channels", "dropout", "dropout_where", "backbone_kwargs", "head_stride"}
)


def resolve_ckpt(ckpt: str | Path) -> Path:
    """``ckpt`` itself, or for a run folder its ``checkpoints/ensemble.json`` (an ensemble run)
    or else its ``checkpoints/last.ckpt``."""
    from lensexp.ensemble import MANIFEST

    p = Path(str(ckpt))
    if not p.is_dir():
        return p
    for cand in (p / "checkpoints" / MANIFEST, p / "checkpoints" / "last.ckpt"):
        if cand.is_file():
            return cand
    raise ConfigError(f"'{ckpt}' is a folder without checkpoints/{MANIFEST} or checkpoints/last.ckpt")


def check_loss_hparam(loss, source: str):
    """Allow-list a checkpoint's loss setting: a loss name, or a flow's plain settings."""
    from lensexp.flow import FLOW_KEYS

    if isinstance(loss, str):
        return loss
    plain = (int, float, str)
    if (
        not isinstance(loss, dict)
        or loss.get("name") != "flow_nll"
        or set(loss) - FLOW_KEYS - {"name"}
        or not all(
            isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, int) for x in v))
            for v in loss.values()
        )
    ):
        raise ConfigError(
            f"{source}: refused loss setting {loss!r} (a loss name or flow_nll settings {sorted(FLOW_KEYS)})"
        )
    return loss


def load_module(ckpt: str | Path, device: str = "cpu"):
    """A trained module from a checkpoint, loaded weights-only, its hyper-parameters
    allow-listed (:func:`~lensexp.models.check_model_hparams`): a
    :class:`~lensexp.module.LensModule` (the eight labels) or, for ``task: kappa`` checkpoints, a
    :class:`~lensexp.kappa_module.KappaModule` (density maps); for an ``ensemble.json`` (or a run
    folder holding one) an :class:`~lensexp.ensemble.Ensemble` of its members."""
    from lensexp.ensemble import MANIFEST, Ensemble, read_manifest

    ckpt = resolve_ckpt(ckpt)
    if ckpt.name == MANIFEST:
        members = [load_module(p, device) for p in read_manifest(ckpt)]
        if any(m.hparams.get("task") == "kappa" for m in members):
            raise ConfigError(f"'{ckpt}': ensembles of density-map networks are not supported")
        return Ensemble(members, f"ensemble '{ckpt}'")
    return _load_one(ckpt, device)


def _load_one(ckpt: Path, device: str):
    from lensexp.models import check_model_hparams

    ck = read_checkpoint(ckpt)
    if "hyper_parameters" not in ck or "state_dict" not in ck:
        raise ConfigError(f"'{ckpt}' lacks hyper_parameters/state_dict: not a lensexp training checkpoint")
    hp = dict(ck["hyper_parameters"])
    kappa = hp.get("task") == "kappa"
    unknown = sorted(set(hp) - (KAPPA_MODULE_KEYS if kappa else LENS_MODULE_KEYS))
    if unknown:
        raise ConfigError(f"checkpoint '{ckpt}': refused hyper-parameter(s) {unknown}")
    check_model_hparams(hp.get("model"), f"checkpoint '{ckpt}'", KAPPA_MODEL_KEYS if kappa else None)
    if not kappa and "loss" in hp:
        check_loss_hparam(hp["loss"], f"checkpoint '{ckpt}'")
    if kappa:
        from lensexp.kappa_module import KappaModule as Module
    else:
        from lensexp.module import LensModule as Module
    try:
        module = Module(**hp)
    except ConfigError as exc:
        raise ConfigError(f"checkpoint '{ckpt}': {exc}") from None
    except Exception as exc:  # noqa: BLE001 - settings timm or the module cannot build
        raise ConfigError(
            f"checkpoint '{ckpt}': its settings do not build a network ({type(exc).__name__}: {exc})"
        ) from None
    try:
        module.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
        raise ConfigError(
            f"checkpoint '{ckpt}': its weights do not fit the network its settings describe ({first})"
        ) from None
    return module.to(device).eval()


def run_config(ckpt: str | Path) -> DictConfig | None:
    """The training config of the run that wrote ``ckpt`` (``RUN/.hydra/config.yaml``), if any."""
    cfg = resolve_ckpt(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(cfg) if cfg.is_file() else None
