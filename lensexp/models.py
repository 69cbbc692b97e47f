"""Network: any timm backbone plus a regression head, with MC dropout before every weight layer.

Perreault Levasseur et al. (2017) place dropout before every weight layer and keep it on at test
time; :func:`add_dropout_before_weights` does this for every ``Conv2d`` and ``Linear`` of a model
(``dropout_where='all'``), of the head only (``'head'``) or not at all (``'none'``), through
forward pre-hooks so that timm's module structure and state dicts are untouched.
:func:`set_mc_dropout` switches the dropout on in evaluation mode for Monte Carlo sampling.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from lensexp.errors import ConfigError

log = logging.getLogger(__name__)
DROPOUT_WHERE = ("all", "head", "none")
PSF_INPUT = ("none", "head", "channels", "film")  # model.psf_input: where the network is told the PSF


class _SelfAdjoint(torch.autograd.Function):
    """``op(x, mask, *args)`` for an element-wise linear ``op`` that is its own adjoint (a dropout's
    mask and scale), with ``op(grad, mask, *args)`` as its gradient: one autograd node saving only
    ``mask``, as ``F.dropout``'s own."""

    @staticmethod
    def forward(ctx, x, op, mask, *args):
        ctx.save_for_backward(mask)
        ctx.op, ctx.args = op, args
        return op(x, mask, *args)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return ctx.op(grad, mask, *ctx.args), None, None, *(None,) * len(ctx.args)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (NHWC) and not also plain contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _keep_times(t: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * keep * scale`` for a boolean mask ``keep``."""
    return (t * keep).mul_(scale)


def _bits_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Element-wise dropout for CPU tensors, ~5x faster than ``F.dropout`` there (2 M elements:
    2.8 against 14.5 ms on a 2-core AMD EPYC, where dropout before every layer took 3/4 of the
    forward pass). Each 64-bit draw of torch's generator (``randint`` over the whole int64
    range) gives four 16-bit uniforms; an element is dropped when its uniform is among the lowest
    ``k = round(65536 p)`` codes, so the rate is ``k / 65536`` (within 8e-6 of ``p``) and the kept
    elements are scaled by ``1 / (1 - k / 65536)``: unbiased, like ``F.dropout``. The mask is laid
    out like ``x`` (NCHW or channels-last), deterministic by torch's seed."""
    k = min(round(p * 65536), 65535)  # p < 1 keeps at least one code: no division by zero
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = words.view(torch.int16)[:n] >= k - 32768  # int16 codes are uniform on [-32768, 32767]
    if _channels_last(x):
        b, c, h, w = x.shape
        keep = keep.view(b, h, w, c).permute(0, 3, 1, 2)
    else:
        keep = keep.view(x.shape)
    return _SelfAdjoint.apply(x, _keep_times, keep, 65536.0 / (65536 - k))


# The CPU dropout draws the dropped positions (:func:`_sparse_dropout`) up to this rate and a
# 16-bit uniform per element (:func:`_bits_dropout`) above it. Measured (2-core AMD EPYC Zen 4,
# 2026-12-08, the inputs of the quickstart network's 17 dropout-equipped layers, 5 M elements,
# forward and backward, three runs): the drawn positions add ~0-3 / 3-5 / 7 / 7-11 /
# 11-18 ms at p = 0.02 / 0.05 / 0.1 / 0.2 / 0.3, the 16-bit masks 15-20 ms at any rate.
SPARSE_MAX = 0.2


def _zero_at(t: torch.Tensor, pos: torch.Tensor, scale: float, fmt) -> torch.Tensor:
    """``t * scale`` laid out as ``fmt`` with the elements at memory-order indices ``pos`` set to 0."""
    t = (t * scale).contiguous(memory_format=fmt)  # no copy when t * scale is already so laid out
    (t.permute(0, 2, 3, 1) if fmt is torch.channels_last else t).reshape(-1).index_fill_(0, pos, 0)
    return t


def drop_positions(n: int, p: float) -> torch.Tensor:
    """The sorted indices in ``range(n)`` that independent Bernoulli(``p``) trials drop, drawn as
    the gaps between them: each gap is geometric, ``floor(log(V) / log(1 - p)) + 1`` with ``V``
    uniform on (0, 1] (float64, torch's generator), so ~``n p`` draws instead of ``n`` (uniforms
    and a log: ~5 ns a draw on 2 AMD EPYC cores, ``exponential_`` 18 ns)."""
    log_q = math.log1p(-p)
    parts, last = [], -1
    while last < n - 1:  # enough gaps drawn at once in all but ~1e-9 of calls; else more
        k = _gaps_to_draw(n * p, more=bool(parts))
        v = torch.rand(k, dtype=torch.float64).neg_().add_(1.0)  # (0, 1]: a finite log
        # a gap past the tensor's end is as good as a longer one (and a tiny p cannot overflow int64)
        gaps = v.log_().div_(log_q).floor_().clamp_(max=n).to(torch.int64).add_(1)
        pos = gaps.cumsum_(0).add_(last)
        parts.append(pos)
        last = int(pos[-1])
    if not parts:  # n == 0
        return torch.empty(0, dtype=torch.int64)
    pos = parts[0] if len(parts) == 1 else torch.cat(parts)
    return pos[: int(torch.searchsorted(pos, n))]


def _gaps_to_draw(mean: float, more: bool) -> int:
    """How many gaps :func:`drop_positions` draws: the mean count and 6 of its sigmas at first,
    a tenth of the mean more on the rare call whose gaps fell short of the tensor."""
    return int(0.1 * mean + 64) if more else int(mean + 6 * math.sqrt(mean) + 16)


def _sparse_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Element-wise dropout for CPU tensors at small rates: the dropped positions are drawn
    (:func:`drop_positions`, exactly rate ``p``), the rest scaled by ``1 / (1 - p)`` (unbiased,
    like ``F.dropout``); one pass over ``x`` forward and one backward, no per-element random
    numbers. At p = 0.02 (the quickstart) dropout before the 17 weight layers of the quickstart
    network adds ~1 instead of ~17 ms to a training step of ~60 ms (2-core AMD EPYC).
    Deterministic by torch's seed; channels-last inputs keep their layout."""
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return _SelfAdjoint.apply(x, _zero_at, drop_positions(x.numel(), p), 1.0 / (1.0 - p), fmt)


def _cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """The CPU dropout: :func:`_sparse_dropout` up to :data:`SPARSE_MAX`, else :func:`_bits_dropout`."""
    return _sparse_dropout(x, p) if p <= SPARSE_MAX else _bits_dropout(x, p)


class MCDropout(nn.Module):
    """Element-wise dropout active in training, or always when ``mc`` is set (MC sampling); on
    CPU through :func:`_cpu_dropout`, elsewhere ``F.dropout``."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout rate must be in [0, 1), got {p}")
        self.p, self.mc = float(p), False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0 or not (self.training or self.mc):
            return x
        if x.device.type == "cpu":
            return _cpu_dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _dropout_pre_hook(module: nn.Module, args):
    return (module.mc_dropout(args[0]), *args[1:])


def add_dropout_before_weights(module: nn.Module, p: float) -> int:
    """Give every ``Conv2d``/``Linear`` in ``module`` an :class:`MCDropout` on its input.

    The dropout is a child called ``mc_dropout`` of the weight layer (visible in ``print``), run
    by a forward pre-hook. Returns the number of layers so equipped.
    """
    n = 0
    for m in list(module.modules()):
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not hasattr(m, "mc_dropout"):
            m.mc_dropout = MCDropout(p)
            m.register_forward_pre_hook(_dropout_pre_hook)
            n += 1
    return n


def set_mc_dropout(model: nn.Module, on: bool = True) -> int:
    """Keep every :class:`MCDropout` active (``on``) even in eval mode; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, MCDropout):
            m.mc = bool(on)
            n += 1
    return n


def float32(fn, *tensors: torch.Tensor):
    """``fn(*tensors)`` in float32 even inside a mixed-precision (autocast) region: the network
    outputs a loss reads (means, log sigmas, flow contexts) and the loss itself keep float32
    precision under ``trainer.precision=bf16-mixed``; the layers before them run in bfloat16.
    Half-precision inputs are cast up; float32 and float64 pass unchanged."""
    with torch.autocast(tensors[0].device.type, enabled=False):
        return fn(*(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors))


def use_channels_last(net: nn.Module, on: bool) -> bool:
    """Lay the convolution weights of ``net`` out channels-last (NHWC) when ``on``; its forward
    then hands the convolutions NHWC inputs too. Same numbers up to float rounding; on 2 CPU
    cores (AMD EPYC, batch 64, 64 px) the 0.4 M ``test_resnet`` trains at 791 instead of 547
    img/s and infers at 1 369 instead of 808, resnet10t 240 / 536 instead of 201 / 366, the
    density-map U-Net 235 instead of 216 img/s (batch 32)."""
    if on:
        net.to(memory_format=torch.channels_last)
    return bool(on)


def psf_condition(ee: torch.Tensor | None, batch: int, device=None) -> torch.Tensor:
    """What a ``psf_input`` network is told of each image's PSF: [B, 1 + R] rows ``[1, EE(r)...]``
    (:func:`lensexp.sim.psf.encircled_energy` at ``EE_RADII``) where the PSF is known, zeros where it
    is not (``ee`` None, or a row with a NaN)."""
    from lensexp.sim.psf import EE_RADII

    cond = torch.zeros(batch, 1 + len(EE_RADII), device=device)
    if ee is None:
        return cond
    ee = ee.to(device=cond.device, dtype=cond.dtype)
    if ee.shape != (batch, len(EE_RADII)):
        raise ConfigError(f"PSF description of shape {tuple(ee.shape)}; expected [{batch}, {len(EE_RADII)}]")
    known = torch.isfinite(ee).all(1)
    cond[known, 0] = 1.0
    cond[known, 1:] = ee[known]
    return cond


class LensRegressor(nn.Module):
    """timm backbone (``num_classes=0``, ``in_chans`` = bands, never pretrained: no downloads) and
    a two-layer head giving ``n_outputs`` numbers (the loss decides their meaning).

    ``psf_input``: the network is told each image's PSF (:func:`psf_condition`: known flag and
    encircled energy at fixed radii in arcsec), so it can undo what the PSF does to the arcs
    instead of guessing the PSF from a faint image: ``head`` (or true) beside the pooled image
    features, ``channels`` as constant input planes beside the image (every convolution can
    then depend on it), ``film`` as a scale and shift of each channel of the first convolution's
    output (Perez et al. 2018; what the constant planes do inside the image, without their
    cost; starts as the identity), ``none`` (or false) not at all.

    Inputs smaller than ``min_input_size`` pixels (e.g. 75 for Inception-v4) are resized up
    bilinearly; a note is logged once. ``channels_last``: see :func:`use_channels_last`.
    """

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        n_outputs: int,
        dropout: float = 0.1,
        dropout_where: str = "all",
        head_hidden: int = 256,
        min_input_size: int | None = None,
        backbone_kwargs: dict | None = None,
        channels_last: bool = True,
        psf_input: bool | str = False,
    ):
        super().__init__()
        import timm

        from lensexp.sim.psf import EE_RADII

        if dropout_where not in DROPOUT_WHERE:
            raise ConfigError(f"model.dropout_where must be one of {DROPOUT_WHERE}, got '{dropout_where}'")
        self.psf_mode = ("head" if psf_input else "none") if isinstance(psf_input, bool) else psf_input
        if self.psf_mode not in PSF_INPUT:
            raise ConfigError(f"model.psf_input must be one of {PSF_INPUT} (or true/false), got '{psf_input}'")
        self.psf_input = self.psf_mode != "none"
        self.n_cond = 1 + len(EE_RADII) if self.psf_input else 0
        planes = self.n_cond if self.psf_mode == "channels" else 0  # the PSF as constant input planes
        try:
            self.backbone = timm.create_model(
                backbone,
                pretrained=False,
                num_classes=0,
                in_chans=int(in_chans) + planes,
                **dict(backbone_kwargs or {}),
            )
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ConfigError(f"unknown timm backbone '{backbone}' (see timm.list_models())") from exc
            raise
        feat = self.backbone.num_features + (self.n_cond if self.psf_mode == "head" else 0)
        self.head = nn.Sequential(nn.Linear(feat, head_hidden), nn.GELU(), nn.Linear(head_hidden, n_outputs))
        self.min_input_size = int(min_input_size) if min_input_size else None
        self._noted = False
        self.n_dropout = 0
        if dropout_where == "all":
            self.n_dropout = add_dropout_before_weights(self, dropout)
        elif dropout_where == "head":
            self.n_dropout = add_dropout_before_weights(self.head, dropout)
        if self.psf_mode == "film":  # after the dropout hooks: the condition itself is not dropped
            first = next(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d))
            self.psf_film = nn.Linear(self.n_cond, 2 * first.out_channels)
            nn.init.zeros_(self.psf_film.weight)
            nn.init.zeros_(self.psf_film.bias)
            first.register_forward_hook(self._film_hook)
        self._cond = None
        self.channels_last = use_channels_last(self, channels_last)

    def _film_hook(self, module, args, out):
        scale, shift = float32(self.psf_film, self._cond).to(out.dtype)[:, :, None, None].chunk(2, 1)
        return out * (1 + scale) + shift

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs for normalised images [B, C, H, W]; ``cond`` [B, n_cond]: the PSF rows of
        :func:`psf_condition` (a ``psf_input`` network takes None as 'unknown')."""
        if self.n_cond:
            cond = psf_condition(None, x.shape[0], x.device) if cond is None else cond
        if self.psf_mode == "channels":
            x = torch.cat([x, cond.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[-2:])], 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.min_input_size and min(x.shape[-2:]) < self.min_input_size:
            if not self._noted:
                log.info("input %s px resized to %d px for this backbone", tuple(x.shape[-2:]), self.min_input_size)
                self._noted = True
            x = F.interpolate(x, size=(self.min_input_size, self.min_input_size), mode="bilinear", align_corners=False)
        self._cond = cond
        try:
            feats = self.backbone(x)
        finally:
            self._cond = None
        if self.psf_mode == "head":
            feats = torch.cat([feats, cond.to(feats.dtype)], 1)
        return float32(self.head, feats)
