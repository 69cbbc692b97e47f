"""Image-to-image network for density (convergence, kappa) maps: a timm encoder and a light decoder.

The encoder is any timm model created with ``features_only=True`` (never pretrained); the
decoder upsamples its deepest features step by step, joining the encoder's feature map of the
same stride (U-Net skip connections), then adds two coordinate channels (x, y of the pixel
centres in units of the half field; ``coord_channels=false`` leaves them out) before the output
layers, so that maps tied to positions (a profile centred somewhere) are easy to form. The
output layers run at ``head_stride`` (2: half the input's resolution, 4x cheaper) and are
upsampled bilinearly to the input's grid: per pixel the mean and log sigma of log kappa.
Dropout sits before every weight layer and is kept on at test time for MC sampling
(:func:`lensexp.models.add_dropout_before_weights`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lensexp.errors import ConfigError
from lensexp.models import DROPOUT_WHERE, add_dropout_before_weights, float32, use_channels_last

LOG_SIGMA_RANGE = (-7.0, 3.0)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class KappaUNet(nn.Module):
    """``backbone``: a timm name that supports ``features_only`` (e.g. ``test_resnet``,
    ``resnet18``, ``efficientnet_b0``); ``decoder_channels``: widths of the decoder steps from the
    deepest up (one per encoder stage); ``dropout``/``dropout_where`` as for the regressor.
    ``forward``: images [B, C, H, W] (normalised) -> [B, 2, H, W] (mean, log sigma)."""

    def __init__(
        self,
        backbone: str,
        in_chans: int,
        decoder_channels: tuple = (96, 64, 48, 32, 32),
        head_channels: int = 32,
        dropout: float = 0.05,
        dropout_where: str = "all",
        backbone_kwargs: dict | None = None,
        head_stride: int = 2,
        channels_last: bool = True,
        coord_channels: bool = True,
    ):
        super().__init__()
        import timm

        if dropout_where not in (*DROPOUT_WHERE, "decoder"):
            raise ConfigError(
                f"model.dropout_where must be one of {(*DROPOUT_WHERE, 'decoder')}, got '{dropout_where}'"
            )
        try:
            self.encoder = timm.create_model(
                backbone, pretrained=False, features_only=True, in_chans=int(in_chans), **dict(backbone_kwargs or {})
            )
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ConfigError(f"unknown timm backbone '{backbone}' (see timm.list_models())") from exc
            raise ConfigError(f"timm backbone '{backbone}' cannot give feature maps: {exc}") from exc
        chans = list(self.encoder.feature_info.channels())
        dec = list(decoder_channels)
        if len(dec) != len(chans):
            raise ConfigError(
                f"model.decoder_channels needs one width per encoder stage ({len(chans)} for {backbone}), got {dec}"
            )
        self.entry = nn.Conv2d(chans[-1], dec[0], 1)
        self.head_stride = int(head_stride)
        if self.head_stride < 1:
            raise ConfigError(f"model.head_stride must be >= 1, got {head_stride}")
        skips = chans[-2::-1]  # the shallower stages, deepest first
        self.up = nn.ModuleList(_block(dec[i] + skips[i], dec[i + 1]) for i in range(len(skips)))
        self.coord_channels = bool(coord_channels)
        self.head = nn.Sequential(
            _block(dec[-1] + 2 * self.coord_channels, head_channels),
            nn.Conv2d(head_channels, head_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(head_channels, 2, 1),
        )
        self.n_dropout = 0
        if dropout_where == "all":
            self.n_dropout = add_dropout_before_weights(self, dropout)
        elif dropout_where == "decoder":  # every weight layer after the encoder
            self.n_dropout = sum(add_dropout_before_weights(m, dropout) for m in (self.entry, self.up, self.head))
        elif dropout_where == "head":
            self.n_dropout = add_dropout_before_weights(self.head, dropout)
        self.channels_last = use_channels_last(self, channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.encoder(x)
        d = self.entry(feats[-1])
        for block, skip in zip(self.up, feats[-2::-1]):
            d = F.interpolate(d, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            d = block(torch.cat([d, skip], 1))
        size = (-(-H // self.head_stride), -(-W // self.head_stride))
        if d.shape[-2:] != size:
            d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        h = self.head[:-1](torch.cat([d, coordinate_channels(d)], 1) if self.coord_channels else d)
        out = float32(self.head[-1], h)  # the map and its log sigma in float32 under mixed precision
        if out.shape[-2:] != (H, W):  # smooth maps: the last step is a bilinear upsampling
            out = F.interpolate(out, size=(H, W), mode="bilinear", align_corners=False)
        return torch.cat([out[:, :1], out[:, 1:].clamp(*LOG_SIGMA_RANGE)], 1).contiguous()


def coordinate_channels(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, H, W]: pixel-centre x (column) and y (row) in units of the half field, 0 at the
    image centre (the grid of conventions.md scaled to [-1, 1])."""
    B, _, H, W = x.shape
    cy = (torch.arange(H, device=x.device, dtype=x.dtype) - (H - 1) / 2) / (H / 2)
    cx = (torch.arange(W, device=x.device, dtype=x.dtype) - (W - 1) / 2) / (W / 2)
    yy, xx = torch.meshgrid(cy, cx, indexing="ij")
    return torch.stack([xx, yy])[None].expand(B, 2, H, W)
