"""The dense 3D U-Net baseline: the same encoder, a transposed-convolution decoder with skips."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .encoder import ConvNormAct, Encoder


class UNet(nn.Module):
    """Patch ``(B, 1, Z, Y, X)`` -> logits ``(B, C, Z, Y, X)``.

    In training mode ``forward`` returns the deep-supervision list ``[full, 1/2, 1/4, ...]``
    (every decoder level but the deepest); in eval mode only the full-resolution logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.encoder = Encoder(cfg.in_channels, ch, cfg.convs_per_block)
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        self.heads = nn.ModuleList()
        for b in range(len(ch) - 1, 0, -1):
            self.up.append(nn.ConvTranspose3d(ch[b], ch[b - 1], 2, stride=2, bias=False))
            self.blocks.append(nn.Sequential(ConvNormAct(2 * ch[b - 1], ch[b - 1]), ConvNormAct(ch[b - 1], ch[b - 1])))
            self.heads.append(nn.Conv3d(ch[b - 1], cfg.num_classes, 1))

    def forward(self, patch: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        feats = self.encoder(patch)
        x = feats[-1]
        outs = []
        for i, (up, block, head) in enumerate(zip(self.up, self.blocks, self.heads)):
            x = block(torch.cat([up(x), feats[-2 - i]], dim=1))
            outs.append(head(x))
        outs = outs[::-1]  # full resolution first
        return outs if self.training else outs[0]
