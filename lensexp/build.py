"""From settings to objects: the one place where ``_target_`` is instantiated.

Configs (``conf/model/*.yaml``, ``conf/loss/*.yaml``) name their class with ``_target_`` and are
instantiated by :func:`hydra.utils.instantiate`; checkpoints store the same settings, and
loading one instantiates them again. Settings from a checkpoint are untrusted, so every spec
passes :func:`check_spec` first: the class must be a lensexp network or loss (never another
module's callable), every key a parameter of its constructor, every value plain data, and
``backbone_kwargs`` only shape/regularisation settings for timm (:data:`SAFE_BACKBONE_KWARGS`).
A new network or loss is therefore a class and a YAML file; nothing here changes.
"""

from __future__ import annotations

import importlib
import inspect

from torch import nn

from lensexp.errors import ConfigError
from lensexp.sim.priors import LABELS

REGRESSOR = "lensexp.models.LensRegressor"
KAPPA_NET = "lensexp.kappa_net.KappaUNet"
# what a checkpoint from someone else may pass to timm: shape and regularisation settings only
# (never paths, pretrained-weight or download settings, or anything that runs code)
SAFE_BACKBONE_KWARGS = frozenset(
    {"drop_rate", "drop_path_rate", "img_size", "patch_size", "global_pool", "output_stride", "act_layer", "depth"}
)
SUPPLIED = frozenset({"in_chans", "n_outputs", "n_labels"})  # given by the builder, not by settings
PLAIN = (bool, int, float, str, type(None))
NUMBER = (int, float)
CONFIG = "config"  # the source name of the user's own (trusted) settings


def target_path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_target(target, kind: str, source: str):
    """The class ``target`` names if it is a ``kind`` ('network': an ``nn.Module``; 'loss': a
    class with ``n_outputs``); from a checkpoint (``source`` other than the user's config) it must
    also live in ``lensexp``, so a file from someone else cannot name any other code."""
    mod, _, name = str(target).rpartition(".")
    cls = None
    if source == CONFIG or mod == "lensexp" or mod.startswith("lensexp."):
        try:
            cls = getattr(importlib.import_module(mod), name, None) if mod else None
        except ImportError:
            cls = None
    ok = inspect.isclass(cls) and (
        issubclass(cls, nn.Module) if kind == "network" else callable(getattr(cls, "n_outputs", None))
    )
    if not ok:
        where = "" if source == CONFIG else "lensexp "
        raise ConfigError(f"{source}: refused {kind} class '{target}' (a {where}{kind} class is expected)")
    return cls


def check_spec(cls, settings: dict, kind: str, source: str) -> dict:
    """``settings`` for ``cls``: keys among its constructor's parameters and, unless they come
    from the user's own config (``source == 'config'``), plain values only."""
    label = "model setting(s)" if kind == "network" else "loss setting"
    params = set(inspect.signature(cls.__init__).parameters) - {"self"} - SUPPLIED
    unknown = sorted(set(settings) - params)
    if unknown:
        raise ConfigError(f"{source}: refused {label} {unknown} (allowed: {sorted(params)})")
    for k, v in settings.items() if source != CONFIG else ():
        if k == "backbone_kwargs":
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: backbone_kwargs is not a mapping")
            bad = sorted(a for a, b in v.items() if a not in SAFE_BACKBONE_KWARGS or not isinstance(b, PLAIN))
            if bad:
                raise ConfigError(
                    f"{source}: refused backbone_kwargs {bad}; a checkpoint may set only {sorted(SAFE_BACKBONE_KWARGS)}"
                )
        elif k == "backbone" and not isinstance(v, str):
            raise ConfigError(f"{source}: the backbone must be a timm model name")
        elif not (isinstance(v, PLAIN) or (isinstance(v, (list, tuple)) and all(isinstance(x, NUMBER) for x in v))):
            raise ConfigError(f"{source}: refused {label} {k}={v!r} (plain numbers and names only)")
    return settings


def _instantiate(cls, settings: dict, **supplied):
    from hydra.utils import instantiate

    return instantiate({"_target_": target_path(cls), **settings, **supplied}, _recursive_=False, _convert_="all")


def _plain(spec) -> dict:
    from omegaconf import DictConfig, OmegaConf

    spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
    if not isinstance(spec, dict):
        raise ConfigError(f"network or loss settings are not a mapping: {spec!r}")
    return {k: v for k, v in spec.items() if k != "_partial_"}


def build_net(spec, in_chans: int, n_outputs: int | None = None, source: str = CONFIG, default=REGRESSOR):
    """The network a model spec describes (``_target_`` + constructor settings; ``default``
    target when it has none, as in checkpoints written before targets)."""
    spec = _plain(spec)
    cls = resolve_target(spec.pop("_target_", default), "network", source)
    check_spec(cls, spec, "network", source)
    extra = {"n_outputs": n_outputs} if "n_outputs" in inspect.signature(cls.__init__).parameters else {}
    return _instantiate(cls, spec, in_chans=int(in_chans), **extra)


def loss_classes() -> dict:
    """Registered losses by name (``lensexp.losses.LOSSES`` and the flow head)."""
    from lensexp.flow import FlowNLL
    from lensexp.losses import LOSSES

    return {**LOSSES, FlowNLL.name: FlowNLL}


def loss_name(spec) -> str:
    """The registry name of a loss spec: a name, ``{name: ...}`` or ``{_target_: ...}``."""
    if isinstance(spec, str):
        return spec
    spec = _plain(spec)
    if "name" in spec:
        return str(spec["name"])
    by_path = {target_path(c): n for n, c in loss_classes().items()}
    return by_path.get(str(spec.get("_target_")), str(spec.get("_target_")))


def build_loss(spec, n_labels: int = len(LABELS), source: str = CONFIG):
    """The loss a spec describes: a registered name (``gaussian_nll``), or a mapping with
    ``_target_`` (or ``name``) and constructor settings (e.g. the flow's)."""
    classes = loss_classes()
    settings = {} if isinstance(spec, str) else _plain(spec)
    settings.pop("_target_", None)
    name = loss_name(spec)
    settings.pop("name", None)
    if name not in classes:
        if source == CONFIG:
            raise ConfigError(f"unknown loss '{name}'; choose one of {sorted(classes)}")
        raise ConfigError(f"{source}: refused loss setting {spec!r} (a registered loss: {sorted(classes)})")
    cls = classes[name]
    check_spec(cls, settings, "loss", source)
    return _instantiate(cls, settings, n_labels=int(n_labels))


def lens_module(
    model, loss, in_chans: int = 1, labels=LABELS, label_fit_batches: int = 8, source: str = CONFIG, **settings
):
    """A :class:`~lensexp.module.LensModule` from its spec (network, loss, label scaler) and its
    training ``settings`` (lr, weight_decay, n_mc_val, input_norm, data_info)."""
    from lensexp.labels import LabelScaler
    from lensexp.module import LensModule

    labels = [str(x) for x in labels]
    loss_fn = build_loss(loss, len(labels), source)
    net = build_net(model, in_chans, loss_fn.n_outputs(len(labels)), source)
    spec = {
        "model": _with_target(model, REGRESSOR),
        "loss": loss if isinstance(loss, str) else _plain(loss),
        "in_chans": int(in_chans),
        "labels": labels,
        "label_fit_batches": int(label_fit_batches),
    }
    return LensModule(net, loss_fn, LabelScaler(labels, label_fit_batches), spec=spec, **settings)


def kappa_module(model, in_chans: int = 1, source: str = CONFIG, **settings):
    """A :class:`~lensexp.kappa_module.KappaModule` (density maps) from its network spec."""
    from lensexp.kappa_module import KappaModule

    net = build_net(model, in_chans, None, source, default=KAPPA_NET)
    return KappaModule(net, spec={"model": _with_target(model, KAPPA_NET), "in_chans": int(in_chans)}, **settings)


def _with_target(spec, default: str) -> dict:
    spec = _plain(spec)
    return {"_target_": spec.pop("_target_", default), **spec}
