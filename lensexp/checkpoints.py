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


# training settings of each module kind; the rest of a checkpoint's hyper-parameters is its
# ``spec`` (what rebuilds the network, loss and label scaler: lensexp.build), checked there
_SHARED = frozenset({"lr", "weight_decay", "n_mc_val", "input_norm", "data_info", "posterior_centre", "augment"})
SETTINGS = {
    "params": _SHARED | {"psf_dropout"},
    "kappa": _SHARED | {"kappa_floor", "task", "target", "kappa_max", "weight", "beta"},
}
SPEC_KEYS = {
    "params": frozenset({"model", "loss", "in_chans", "labels", "label_fit_batches"}),
    "kappa": frozenset({"model", "in_chans"}),
}


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


def load_module(ckpt: str | Path, device: str = "cpu"):
    """A trained module from a checkpoint, loaded weights-only, its hyper-parameters
    allow-listed (:func:`split_hparams`, :func:`lensexp.build.check_spec`): a
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
    from lensexp import build
    from lensexp.labels import upgrade_state_dict

    ck = read_checkpoint(ckpt)
    if "hyper_parameters" not in ck or "state_dict" not in ck:
        raise ConfigError(f"'{ckpt}' lacks hyper_parameters/state_dict: not a lensexp training checkpoint")
    source = f"checkpoint '{ckpt}'"
    settings, spec = split_hparams(dict(ck["hyper_parameters"]), source)
    try:
        if settings.get("task") == "kappa":
            module = build.kappa_module(**spec, source=source, **settings)
        else:
            module = build.lens_module(**spec, source=source, **settings)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    except Exception as exc:  # noqa: BLE001 - settings timm or the module cannot build
        raise ConfigError(f"{source}: its settings do not build a network ({type(exc).__name__}: {exc})") from None
    try:
        module.load_state_dict(upgrade_state_dict(dict(ck["state_dict"])))
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc).splitlines()[0])
        raise ConfigError(f"{source}: its weights do not fit the network its settings describe ({first})") from None
    return module.to(device).eval()


def split_hparams(hp: dict, source: str) -> tuple[dict, dict]:
    """A checkpoint's hyper-parameters as (training settings, spec), both allow-listed by key;
    checkpoints written before ``spec`` existed keep its keys at the top level."""
    kind = "kappa" if hp.get("task") == "kappa" else "params"
    spec = hp.pop("spec", None)
    if spec is None:
        spec = {k: hp.pop(k) for k in SPEC_KEYS[kind] if k in hp}
    unknown = sorted(set(hp) - SETTINGS[kind])
    if unknown:
        raise ConfigError(f"{source}: refused hyper-parameter(s) {unknown}")
    if not isinstance(spec, dict) or set(spec) - SPEC_KEYS[kind] or "model" not in spec:
        raise ConfigError(f"{source}: refused spec {spec!r} (keys {sorted(SPEC_KEYS[kind])})")
    labels = spec.get("labels")
    if labels is not None and not (isinstance(labels, (list, tuple)) and all(isinstance(x, str) for x in labels)):
        raise ConfigError(f"{source}: labels must be a list of names, got {labels!r}")
    return hp, spec


def run_config(ckpt: str | Path) -> DictConfig | None:
    """The training config of the run that wrote ``ckpt`` (``RUN/.hydra/config.yaml``), if any."""
    cfg = resolve_ckpt(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.load(cfg) if cfg.is_file() else None
