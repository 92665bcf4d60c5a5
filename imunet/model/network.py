"""The Implicit U-Net: the encoder composed with the implicit decoder, and the model factory."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .decoder import ImplicitDecoder, gather_features, normalise_coordinates, positional_encoding
from .encoder import Encoder


class ImplicitUNet(nn.Module):
    """Patch ``(B, 1, Z, Y, X)`` + points ``(B, N, 3)`` voxel indices -> logits ``(B, N, C)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.in_channels, cfg.channels, cfg.convs_per_block)
        self.decoder = ImplicitDecoder(
            cfg.decoder_in,
            cfg.num_classes,
            cfg.decoder_width,
            cfg.decoder_depth,
            cfg.decoder_dropout,
            cfg.reinject_at,
        )

    def encode(self, patch: torch.Tensor) -> list[torch.Tensor]:
        return self.encoder(patch)

    def decode(self, features: list[torch.Tensor], points: torch.Tensor) -> torch.Tensor:
        gathered = gather_features(features, points, self.cfg.gather)
        coords = normalise_coordinates(points, self.cfg.patch_size)
        enc = positional_encoding(coords, self.cfg.pe_frequencies)
        return self.decoder(torch.cat([gathered, enc], dim=-1))  # cat promotes half features to float32

    def forward(self, patch: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(patch), points)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
