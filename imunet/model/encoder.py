"""The shared 3D CNN encoder (nnU-Net style), used by the implicit model and the U-Net baseline."""

from __future__ import annotations

import torch
from torch import nn


class ConvNormAct(nn.Sequential):
    """3x3x3 convolution, instance norm (affine), leaky ReLU(0.01)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.InstanceNorm3d(cout, affine=True, eps=1e-5),
            nn.LeakyReLU(0.01, inplace=True),
        )


class Encoder(nn.Module):
    """Blocks of ``convs_per_block[b]`` convolutions with ``channels[b]`` channels.

    Block 0 keeps the input resolution; every later block starts with a stride-2 convolution, so
    block ``b`` has spatial size ``(Z, Y, X) / 2**b``. Input ``(B, in_channels, Z, Y, X)``;
    output the list of every block's feature map.
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...], convs_per_block: tuple[int, ...]) -> None:
        super().__init__()
        blocks = []
        cin = in_channels
        for b, (c, n) in enumerate(zip(channels, convs_per_block)):
            layers = [ConvNormAct(cin, c, stride=1 if b == 0 else 2)]
            layers += [ConvNormAct(c, c) for _ in range(n - 1)]
            blocks.append(nn.Sequential(*layers))
            cin = c
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features
