"""Export-only modules: trace-friendly, batch 1, fixed input and output names.

They wrap the training model without changing it: weight normalisation is folded into plain
weights and dropout disappears in eval mode. The gather, the coordinate normalisation and the
positional encoding are traced into the decoder graph, so feature maps never leave the device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from imunet.model.decoder import normalise_coordinates, positional_encoding
from imunet.model.network import ImplicitUNet


def feature_names(levels: int) -> list[str]:
    return [f"f{b}" for b in range(levels)]


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode with every weight-normalised ``Linear`` made plain.

    ``parametrize.remove_parametrizations`` is not used on a deep copy: the copy shares its
    parametrised class with the original, and removal breaks the original (torch 2.13).
    """
    folded = copy.deepcopy(module).eval()
    for parent in list(folded.modules()):
        for name, child in list(parent.named_children()):
            if not parametrize.is_parametrized(child, "weight"):
                continue
            if not isinstance(child, nn.Linear):
                raise TypeError(f"cannot fold weight normalisation of {type(child).__name__}")
            plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            with torch.no_grad():
                plain.weight.copy_(child.weight)
                if child.bias is not None:
                    plain.bias.copy_(child.bias)
            setattr(parent, name, plain.eval())
    return folded


class EncoderExport(nn.Module):
    """``image`` ``(1, 1, Z, Y, X)`` -> ``f0 .. f{L-1}`` ``(1, C_b, Z/2^b, Y/2^b, X/2^b)``."""

    def __init__(self, model: ImplicitUNet) -> None:
        super().__init__()
        self.encoder = fold_weight_norm(model.encoder)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.encoder(image))


class DecoderExport(nn.Module):
    """``f0 .. f{L-1}`` + ``points`` ``(N, 3)`` int32 voxel indices ``(z, y, x)`` -> ``logits`` ``(N, C)``.

    The gather uses a flat ``Gather`` on each ``(C_b, Z_b*Y_b*X_b)`` map; cell indices are
    computed in float32 with ``Floor`` (exact for indices below 2**24) rather than an integer
    floor division, which older TensorRT parsers lower through the unsupported ``Mod``.
    """

    def __init__(self, model: ImplicitUNet) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.mlp = fold_weight_norm(model.decoder)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *features, points = inputs
        pts = points.to(torch.float32)
        gathered = []
        for b, f in enumerate(features):
            _, c, zs, ys, xs = f.shape
            scale = float(2**b)
            if self.cfg.gather == "floor":
                cell = torch.floor(pts / scale)
            else:
                cell = torch.floor((pts + float(2**b // 2)) / scale)
            upper = torch.tensor([zs - 1, ys - 1, xs - 1], dtype=torch.float32)
            cell = torch.minimum(cell, upper)
            cell = cell.to(torch.int64)
            flat = (cell[:, 0] * ys + cell[:, 1]) * xs + cell[:, 2]
            gathered.append(torch.index_select(f.reshape(c, zs * ys * xs), 1, flat).transpose(0, 1))
        enc = positional_encoding(normalise_coordinates(points, self.cfg.patch_size), self.cfg.pe_frequencies)
        return self.mlp(torch.cat([*gathered, enc], dim=-1))


class DenseExport(nn.Module):
    """The U-Net baseline: ``image`` ``(1, 1, Z, Y, X)`` -> ``logits`` ``(1, C, Z, Y, X)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = fold_weight_norm(model)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)
