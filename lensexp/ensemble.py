"""Deep ensembles (Lakshminarayanan et al. 2017): independently seeded networks combined at prediction.

An ensemble run (``python -m lensexp.train ... ensemble.n=4``) trains its members into
``RUN/members/<k>/`` and then writes ``RUN/checkpoints/ensemble.json``::

    {"members": ["../members/0/checkpoints/last.ckpt", ...]}

(paths relative to that file). Anywhere a checkpoint is expected (``calibrate``, ``predict``,
``compare``), ``ckpt=RUN/checkpoints/ensemble.json`` or ``ckpt=RUN`` loads an :class:`Ensemble`: the
equal-weight mixture of its members' posteriors, each member's own posterior (Gaussian with or
without MC dropout, or a flow) drawn with ``n_samples / members`` samples. Samples are expressed
in the first member's network units (every member standardises labels by an affine map of the
same physical or log quantity, so the conversion is exact).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from lensexp.errors import ConfigError
from lensexp.metrics import as_generator

MANIFEST = "ensemble.json"
MAX_MEMBERS = 64


def read_manifest(path: str | Path) -> list[Path]:
    """Member checkpoint paths listed in an ``ensemble.json`` (untrusted: relative paths inside
    the run folder only, 1 to :data:`MAX_MEMBERS` of them, every one present)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ensemble file '{path}' cannot be read as JSON ({exc})") from None
    members = d.get("members") if isinstance(d, dict) else None
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS:
        raise ConfigError(f"ensemble file '{path}': 'members' must list 1 to {MAX_MEMBERS} checkpoint paths")
    run = path.resolve().parent.parent
    out = []
    for m in members:
        if not isinstance(m, str) or Path(m).is_absolute():
            raise ConfigError(f"ensemble file '{path}': member {m!r} is not a relative path")
        p = (path.parent / m).resolve()
        if not p.is_relative_to(run):
            raise ConfigError(f"ensemble file '{path}': member '{m}' lies outside the run folder {run}")
        if not p.is_file():
            raise ConfigError(f"ensemble file '{path}': member checkpoint '{m}' not found")
        out.append(p)
    return out


def write_manifest(run_dir: Path, member_ckpts: list[Path]) -> Path:
    """``RUN/checkpoints/ensemble.json`` listing the members (written atomically)."""
    from lensexp.files import write_text_atomic

    path = Path(run_dir) / "checkpoints" / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    rel = [str(Path("..") / Path(p).resolve().relative_to(Path(run_dir).resolve())) for p in member_ckpts]
    write_text_atomic(path, json.dumps({"members": rel}, indent=2) + "\n")
    return path


class Ensemble:
    """Equal-weight mixture of trained :class:`~lensexp.module.LensModule` members, with the
    members' posterior-samples interface (:meth:`posterior`) and the first member's labels, grid
    (``hparams``) and label transform (:meth:`to_net`, :meth:`from_net`)."""

    def __init__(self, members: list, source: str = "ensemble"):
        if not members:
            raise ConfigError(f"{source}: an ensemble needs at least one member")
        first = members[0]
        for k, m in enumerate(members[1:], 1):
            if list(m.labels) != list(first.labels):
                raise ConfigError(f"{source}: member {k} predicts {m.labels}, member 0 {first.labels}")
            a, b = dict(m.hparams.get("data_info") or {}), dict(first.hparams.get("data_info") or {})
            if (a.get("npix"), a.get("pixscale"), m.in_chans) != (
                b.get("npix"),
                b.get("pixscale"),
                first.in_chans,
            ):
                raise ConfigError(f"{source}: member {k} was trained on another grid or band count than member 0")
        self.members, self.labels = list(members), list(first.labels)
        self.hparams = copy.copy(first.hparams)  # Lightning's attribute dict: hparams.data_info etc.
        self.hparams["ensemble"] = len(members)

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    @property
    def in_chans(self) -> int:
        return self.members[0].in_chans

    def to_net(self, y: torch.Tensor) -> torch.Tensor:
        return self.members[0].to_net(y)

    def from_net(self, z: torch.Tensor) -> torch.Tensor:
        return self.members[0].from_net(z)

    def mc_passes(self, n_mc: int) -> int:
        return sum(m.mc_passes(n_mc) for m in self.members)

    @property
    def psf_input(self) -> bool:
        return any(getattr(m, "psf_input", False) for m in self.members)

    def eval(self):
        for m in self.members:
            m.eval()
        return self

    def to(self, device):
        for m in self.members:
            m.to(device)
        return self

    @torch.no_grad()
    def posterior(
        self, images: torch.Tensor, n_mc: int, n_samples: int, generator=None, common: bool = False, psf_ee=None
    ):
        """Samples [S, B, D] (first member's network units, CPU) and centre [B, D] of the mixture
        (``common``, ``psf_ee`` as in :meth:`LensModule.posterior`)."""
        g = as_generator(generator)
        per = max(1, n_samples // len(self.members))
        dev = self.device
        samples, centres = [], []
        for m in self.members:
            s, c = m.posterior(images.to(m.device), n_mc, per, g, common, psf_ee=psf_ee)
            # member units -> physical -> first member's (affine per label)
            if not m.scaler.same_units(self.members[0].scaler):
                s, c = (self.to_net(m.from_net(t.to(dev))).cpu() for t in (s, c))
            samples.append(s)
            centres.append(c)
        return torch.cat(samples), torch.stack(centres).mean(0)
