"""The implicit decoder: gather per-point features, positional encoding, DeepSDF-style MLP.

Points are ``(B, N, 3)`` integer voxel indices ``(z, y, x)`` inside the patch. The same
functions are traced into ``decoder.onnx``, so training and deployment share the arithmetic.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def level_indices(points: torch.Tensor, level: int, shape: tuple[int, int, int], mode: str) -> torch.Tensor:
    """Cell indices ``(..., 3)`` of ``points`` in a feature map of ``level`` with spatial ``shape``.

    ``floor``: the paper's ``p // 2**level``. ``nearest``: the cell whose centre (voxel
    ``j * 2**level`` for stride-2 3x3x3 convolutions) is nearest, clipped to the map.
    """
    scale = 2**level
    if mode == "floor":
        idx = torch.div(points, scale, rounding_mode="floor")
    else:
        idx = torch.div(points + scale // 2, scale, rounding_mode="floor")
    upper = torch.tensor([s - 1 for s in shape], dtype=idx.dtype, device=idx.device)
    return torch.minimum(idx, upper)


def gather_features(features: list[torch.Tensor], points: torch.Tensor, mode: str = "floor") -> torch.Tensor:
    """Concatenate every level's feature vector at each point: ``(B, N, sum(C_b))``."""
    out = []
    for b, f in enumerate(features):
        _, c, zs, ys, xs = f.shape
        idx = level_indices(points, b, (zs, ys, xs), mode)
        flat = (idx[..., 0] * ys + idx[..., 1]) * xs + idx[..., 2]  # (B, N)
        g = torch.gather(f.flatten(2), 2, flat.unsqueeze(1).expand(-1, c, -1))  # (B, C, N)
        out.append(g.transpose(1, 2))
    return torch.cat(out, dim=-1)


def normalise_coordinates(points: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Voxel indices to [-1, 1]: voxel 0 maps to -1 and voxel ``S - 1`` to +1 on each axis."""
    denom = torch.tensor([max(s - 1, 1) for s in patch_size], dtype=torch.float32, device=points.device)
    return points.to(torch.float32) * (2.0 / denom) - 1.0


def positional_encoding(coords: torch.Tensor, frequencies: int) -> torch.Tensor:
    """NeRF encoding ``[sin(2^l pi x), cos(2^l pi x)]`` for l < L, in float32: ``(..., 6 L)``.

    The highest argument reaches ``2^(L-1) pi`` (about 1,600 for L = 10), where float16 steps by 1:
    this must never run in half precision, so autocast is switched off here.
    """
    with torch.autocast(device_type=coords.device.type, enabled=False):
        freq = (2.0 ** torch.arange(frequencies, dtype=torch.float32, device=coords.device)) * math.pi
        arg = coords.to(torch.float32).unsqueeze(-1) * freq  # (..., 3, L)
        arg = arg.flatten(-2)  # (..., 3L), coordinate-major
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


class ImplicitDecoder(nn.Module):
    """MLP of ``depth`` weight-normalised hidden layers of ``width`` units, ReLU, dropout.

    The decoder input is concatenated again to the input of hidden layer ``reinject_at``
    (DeepSDF); unlike DeepSDF's subtractive scheme the width grows to ``width + in_features``
    there, because our input (features + encoding, 540 by default) is wider than 512.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        width: int = 512,
        depth: int = 8,
        dropout: float = 0.2,
        reinject_at: int = 4,
    ) -> None:
        super().__init__()
        self.reinject_at = reinject_at
        layers = []
        for i in range(depth):
            cin = in_features if i == 0 else width
            if i == reinject_at and i > 0:
                cin = width + in_features
            layers.append(weight_norm(nn.Linear(cin, width)))
        self.hidden = nn.ModuleList(layers)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.hidden):
            if i == self.reinject_at and i > 0:
                h = torch.cat([h, x], dim=-1)
            h = self.dropout(self.act(layer(h)))
        return self.out(h)
