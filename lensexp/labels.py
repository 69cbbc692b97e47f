"""The label transform between physical units and the network's standardised space.

:class:`LabelScaler` is an ``nn.Module`` whose buffers travel in every checkpoint, so that a
trained network predicts in physical units: ``mu_F`` through its logarithm, then per label a mean
and standard deviation fitted on the first training batches. Training, calibration, prediction
and ensembles all go through :meth:`LabelScaler.to_net` / :meth:`LabelScaler.from_net`.
"""

from __future__ import annotations

import torch
from torch import nn

from lensexp.errors import ConfigError
from lensexp.sim.priors import LABELS

LOG_LABELS = ("mu_F",)
BUFFERS = ("label_mean", "label_std", "label_fitted", "is_log")


class LabelScaler(nn.Module):
    """``labels``: names in the network's output order; ``fit_batches``: training batches the
    mean/std are fitted on (refined at each of them, then fixed)."""

    def __init__(self, labels=LABELS, fit_batches: int = 8):
        super().__init__()
        self.labels = list(labels)
        self.fit_batches = int(fit_batches)
        d = len(self.labels)
        self.register_buffer("label_mean", torch.zeros(d))
        self.register_buffer("label_std", torch.ones(d))
        self.register_buffer("label_fitted", torch.tensor(False))
        self.register_buffer("is_log", torch.tensor([n in LOG_LABELS for n in self.labels]))
        self._fit_buf: list[torch.Tensor] = []

    def log_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Physical labels with the ``LOG_LABELS`` (mu_F) replaced by their logarithm."""
        return torch.where(self.is_log, torch.log(y.clamp(min=1e-6)), y)

    def to_net(self, y: torch.Tensor) -> torch.Tensor:
        """Physical labels [B, D] -> standardised network space."""
        return (self.log_labels(y) - self.label_mean) / self.label_std

    def from_net(self, z: torch.Tensor) -> torch.Tensor:
        """Network space -> physical labels (inverse of :meth:`to_net`, elementwise monotone)."""
        y = z * self.label_std + self.label_mean
        return torch.where(self.is_log, torch.exp(y), y)

    def update(self, y: torch.Tensor) -> None:
        """Fit mean/std on the first ``fit_batches`` training batches (refined each step)."""
        if bool(self.label_fitted):
            return
        self._fit_buf.append(y.detach())
        ys = self.log_labels(torch.cat(self._fit_buf))
        self.label_mean.copy_(ys.mean(0))
        if ys.shape[0] > 1:
            self.label_std.copy_(ys.std(0).clamp(min=1e-6))
        if len(self._fit_buf) >= self.fit_batches:
            self.label_fitted.fill_(True)
            self._fit_buf = []

    def same_units(self, other: LabelScaler) -> bool:
        """Whether ``other`` maps labels to the same network space."""
        return all(torch.equal(getattr(self, k).cpu(), getattr(other, k).cpu()) for k in BUFFERS if k != "label_fitted")


def upgrade_state_dict(sd: dict, prefix: str = "scaler.") -> dict:
    """A module state dict from before the scaler was its own module (buffers ``label_mean``...
    at the top level) with those buffers moved under ``prefix``; others unchanged."""
    for k in BUFFERS:
        if k in sd and prefix + k not in sd:
            sd[prefix + k] = sd.pop(k)
    return sd


# ---------------------------------------------------------------------------- symmetries of the grid
# The 8 symmetries of the square pixel grid (dihedral group D4) as (transpose, flip x, flip y),
# applied to an image [..., H = row = y, W = col = x] in that order. The training priors are
# invariant under them (random orientations; rotation-symmetric analytic PSFs, the empirical HST
# ones only roughly), so a network's prediction on a turned image, turned back, is another
# estimate of the same lens.
D4 = tuple((t, fx, fy) for t in (False, True) for fx in (False, True) for fy in (False, True))
INVARIANT = ("theta_E", "mu_F")
_FLIP = {"x": ("center_x", "e2", "gamma2"), "y": ("center_y", "e2", "gamma2")}
_TRANSPOSE_SIGN = ("e1", "gamma1")  # x <-> y: position angle phi -> pi/2 - phi, so cos 2 phi changes sign


def d4_supported(labels) -> bool:
    """Whether every label has a known behaviour under the grid's symmetries (the centre needs
    both components)."""
    known = set(INVARIANT) | set(_FLIP["x"]) | set(_FLIP["y"]) | set(_TRANSPOSE_SIGN)
    return set(labels) <= known and (("center_x" in labels) == ("center_y" in labels))


def d4_image(images: torch.Tensor, transpose: bool, flip_x: bool, flip_y: bool) -> torch.Tensor:
    """Images [..., H, W] transposed (x <-> y), then mirrored in x (columns), then in y (rows)."""
    if transpose:
        images = images.transpose(-1, -2)
    if flip_x:
        images = images.flip(-1)
    if flip_y:
        images = images.flip(-2)
    return images.contiguous()


def d4_unturn(maps: torch.Tensor, transpose: bool, flip_x: bool, flip_y: bool) -> torch.Tensor:
    """The inverse of :func:`d4_image` for maps [..., H, W] (e.g. a density map predicted on the
    turned image, back on the original grid)."""
    if flip_y:
        maps = maps.flip(-2)
    if flip_x:
        maps = maps.flip(-1)
    if transpose:
        maps = maps.transpose(-1, -2)
    return maps.contiguous()


def d4_back(y: torch.Tensor, labels, transpose: bool, flip_x: bool, flip_y: bool) -> torch.Tensor:
    """Physical labels [..., D] of a lens seen through :func:`d4_image` -> the same lens in the
    original frame (the steps undone in reverse order: a mirror negates its axis's centre and the
    45-degree components e2, gamma2; the transpose swaps the centre and negates e1, gamma1)."""
    y = y.clone()
    col = {n: i for i, n in enumerate(labels)}
    for flip, axis in ((flip_y, "y"), (flip_x, "x")):
        if flip:
            for n in _FLIP[axis]:
                if n in col:
                    y[..., col[n]] = -y[..., col[n]]
    if transpose:
        for n in _TRANSPOSE_SIGN:
            if n in col:
                y[..., col[n]] = -y[..., col[n]]
        if "center_x" in col:
            i, j = col["center_x"], col["center_y"]
            y[..., [i, j]] = y[..., [j, i]]
    return y


# ---------------------------------------------------------------------------- training augmentation
AUGMENT = ("none", "d4")  # training-time augmentation: none, or a random grid symmetry per image


def random_turns(n: int, device=None) -> torch.Tensor:
    """``n`` indices into :data:`D4` (``4 transpose + 2 flip_x + flip_y``), uniform, from torch's
    default generator (seeded by the run's seed)."""
    return torch.randint(0, len(D4), (int(n),), device=device)


def _turn_bits(turns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (turns // 4 % 2).bool(), (turns // 2 % 2).bool(), (turns % 2).bool()


def d4_image_each(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Images [B, ..., H, W] (square), image ``i`` through :func:`d4_image` with ``D4[turns[i]]``."""
    tr, fx, fy = (b.view(-1, *([1] * (images.dim() - 1))) for b in _turn_bits(turns))
    images = torch.where(tr, images.transpose(-1, -2), images)
    images = torch.where(fx, images.flip(-1), images)
    return torch.where(fy, images.flip(-2), images).contiguous()


def d4_forward_each(y: torch.Tensor, labels, turns: torch.Tensor) -> torch.Tensor:
    """Physical labels [B, D] of the lenses -> those of the same lenses seen through
    :func:`d4_image_each` (the inverse of :func:`d4_back`: the transpose first, then the mirrors)."""
    tr, fx, fy = _turn_bits(turns)
    col = {n: i for i, n in enumerate(labels)}
    y = y.clone()
    if "center_x" in col:
        i, j = col["center_x"], col["center_y"]
        y[:, [i, j]] = torch.where(tr[:, None], y[:, [j, i]], y[:, [i, j]])
    for n in _TRANSPOSE_SIGN:
        if n in col:
            y[:, col[n]] = torch.where(tr, -y[:, col[n]], y[:, col[n]])
    for flip, axis in ((fx, "x"), (fy, "y")):
        for n in _FLIP[axis]:
            if n in col:
                y[:, col[n]] = torch.where(flip, -y[:, col[n]], y[:, col[n]])
    return y


def check_augment(augment: str, labels=None) -> None:
    """Refuse an unknown augmentation, or ``d4`` for labels without a known symmetry."""
    if augment not in AUGMENT:
        raise ConfigError(f"augment must be one of {AUGMENT}, got '{augment}'")
    if augment == "d4" and labels is not None and not d4_supported(labels):
        raise ConfigError(f"augment=d4 needs labels whose grid symmetries are known; got {list(labels)}")
