"""Export-only modules: trace-friendly, batch 1, fixed input and output names.

They wrap the training model without changing it: weight normalisation is folded into plain
weights and dropout disappears in eval mode. The gather, the coordinate normalisation and the
positional encoding are traced into the decoder graph, so feature maps never leave the device.

``precision="fp16"`` writes the same graphs with float16 weights and activations and explicit
casts: inputs and outputs stay float32 (an fp16 graph replaces its fp32 twin one for one), the
normalisation layers compute in float32, and in the decoder the gather, the coordinate arithmetic
and the positional encoding run in float32 and are cast to float16 only after the encoding (its
highest frequency reaches arguments of about 1,600, where float16 steps by 1).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from imunet.model.decoder import normalise_coordinates, positional_encoding
from imunet.model.network import ImplicitUNet
from imunet.runtime.backends.precision import EXPORTED_PRECISIONS

FEATURE_LAYOUTS = ("channels_last", "channels_first")
PRECISIONS = EXPORTED_PRECISIONS


def default_feature_layouts(levels: int) -> tuple[str, ...]:
    """Level 0 channels-first, deeper levels channels-last (measured: docs/DESIGN-NOTES.md, "The gather").

    Transposing a map costs the encoder time in proportion to its size; a channels-last map saves
    the decoder ``C_b`` scattered reads per point. Level 0 is the largest map with the fewest
    channels, so its transpose costs more than it saves."""
    return ("channels_first",) + ("channels_last",) * (levels - 1)


def feature_layouts(layouts: str | Sequence[str] | None, levels: int) -> tuple[str, ...]:
    """One layout name per level: ``None`` is the default, a single name applies to every level."""
    if layouts is None:
        out = default_feature_layouts(levels)
    elif isinstance(layouts, str):
        out = (layouts,) * levels
    else:
        out = tuple(layouts)
    bad = [x for x in out if x not in FEATURE_LAYOUTS]
    if bad or len(out) != levels:
        raise ValueError(f"feature layouts {out!r}: need {levels} of {', '.join(FEATURE_LAYOUTS)}")
    return out


def feature_names(levels: int) -> list[str]:
    return [f"f{b}" for b in range(levels)]


def feature_shape(channels: int, spatial: tuple[int, ...], layout: str) -> list[int]:
    """The shape of one level's feature map as ``encoder.onnx`` emits it in ``layout``."""
    return [*spatial, channels] if layout == "channels_last" else [1, channels, *spatial]


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


class Fp32Norm(nn.Module):
    """A normalisation layer computed in float32 inside a half-precision network: its statistics
    reduce over a whole window (89,600 voxels per channel at 40 x 56 x 40), which float16 can overflow."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).half()


def half_precision(module: nn.Module) -> nn.Module:
    """A float16 copy of ``module`` (eval mode) whose normalisation layers compute in float32."""
    half = copy.deepcopy(module).eval().half()
    for parent in list(half.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.instancenorm._InstanceNorm | nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, Fp32Norm(child))
    return half


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"graph precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


class EncoderExport(nn.Module):
    """``image`` ``(1, 1, Z, Y, X)`` -> ``f0 .. f{L-1}``, one layout per level.

    ``channels_last``: ``(Z/2^b, Y/2^b, X/2^b, C_b)``, so that the decoder's gather copies one
    contiguous row of ``C_b`` numbers per point; ``channels_first``: the convolution's own
    ``(1, C_b, Z/2^b, Y/2^b, X/2^b)``, where each point costs ``C_b`` scattered reads.
    """

    def __init__(
        self, model: ImplicitUNet, layouts: str | Sequence[str] | None = None, precision: str = "fp32"
    ) -> None:
        super().__init__()
        self.layouts = feature_layouts(layouts, model.cfg.levels)
        self.half = check_precision(precision) == "fp16"
        encoder = fold_weight_norm(model.encoder)
        self.encoder = half_precision(encoder) if self.half else encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for f, layout in zip(self.encoder(image.half() if self.half else image), self.layouts):
            if layout == "channels_last":  # a 5-D Transpose, then a free Reshape (no batch-index copy)
                _, c, zs, ys, xs = f.shape
                f = f.permute(0, 2, 3, 4, 1).reshape(zs, ys, xs, c)
            out.append(f.float())  # float32 out whatever the precision: the graphs are interchangeable
        return tuple(out)


class SplitReinjectMLP(nn.Module):
    """The decoder MLP with its re-injection as a sum instead of a concatenation (same function).

    Hidden layer ``r`` takes ``[h, x]``: ``W [h; x] + b = W_h h + (W_x x + b)``. The input's share
    ``W_x x + b`` is its own ``Linear`` of ``x``, added after ``W_h h``, so the graph has no ``Concat``
    of the hidden state with the input (5% of the int8 decoder's time, profiled) and the
    products keep their sizes. Built from a folded decoder (plain ``Linear`` layers, eval mode)."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.reinject_at = r = decoder.reinject_at
        self.hidden = nn.ModuleList(copy.deepcopy(list(decoder.hidden)))
        self.out = copy.deepcopy(decoder.out)
        self.skip: nn.Linear | None = None
        if 0 < r < len(self.hidden):
            joint = decoder.hidden[r]
            width = joint.out_features
            inner = nn.Linear(width, width, bias=False)
            skip = nn.Linear(joint.in_features - width, width, bias=joint.bias is not None)
            with torch.no_grad():
                inner.weight.copy_(joint.weight[:, :width])
                skip.weight.copy_(joint.weight[:, width:])
                if joint.bias is not None:
                    skip.bias.copy_(joint.bias)
            self.hidden[r] = inner
            self.skip = skip
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, layer in enumerate(self.hidden):
            if self.skip is not None and i == self.reinject_at:
                h = torch.relu(layer(h) + self.skip(x))
            else:
                h = torch.relu(layer(h))
        return self.out(h)


class DecoderExport(nn.Module):
    """``f0 .. f{L-1}`` + ``points`` ``(N, 3)`` int32 voxel indices ``(z, y, x)`` -> ``logits`` ``(N, C)``.

    The gather is a flat ``Gather`` of rows of each ``(Z_b*Y_b*X_b, C_b)`` map (columns of
    ``(C_b, Z_b*Y_b*X_b)`` for ``channels_first`` bundles); cell indices are
    computed in float32 with ``Floor`` (exact for indices below 2**24) rather than an integer
    floor division, which older TensorRT parsers lower through the unsupported ``Mod``.
    """

    def __init__(
        self, model: ImplicitUNet, layouts: str | Sequence[str] | None = None, precision: str = "fp32"
    ) -> None:
        super().__init__()
        self.layouts = feature_layouts(layouts, model.cfg.levels)
        self.cfg = model.cfg
        self.half = check_precision(precision) == "fp16"
        mlp = SplitReinjectMLP(fold_weight_norm(model.decoder))
        self.mlp = copy.deepcopy(mlp).half() if self.half else mlp

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *features, points = inputs
        pts = points.to(torch.float32)
        gathered = []
        for b, (f, layout) in enumerate(zip(features, self.layouts)):
            if layout == "channels_last":
                zs, ys, xs, c = f.shape
            else:
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
            if layout == "channels_last":
                gathered.append(torch.index_select(f.reshape(zs * ys * xs, c), 0, flat))
            else:
                gathered.append(torch.index_select(f.reshape(c, zs * ys * xs), 1, flat).transpose(0, 1))
        enc = positional_encoding(normalise_coordinates(points, self.cfg.patch_size), self.cfg.pe_frequencies)
        x = torch.cat([*gathered, enc], dim=-1)  # float32: the gather and the encoding never run in half
        return self.mlp(x.half()).float() if self.half else self.mlp(x)


class DenseExport(nn.Module):
    """The U-Net baseline: ``image`` ``(1, 1, Z, Y, X)`` -> ``logits`` ``(1, C, Z, Y, X)``, float32 in and
    out at either precision."""

    def __init__(self, model: nn.Module, precision: str = "fp32") -> None:
        super().__init__()
        self.half = check_precision(precision) == "fp16"
        folded = fold_weight_norm(model)
        self.model = half_precision(folded) if self.half else folded

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image.half()).float() if self.half else self.model(image)
