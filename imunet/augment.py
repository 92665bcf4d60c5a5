"""On-device data augmentation with plain torch ops (runs wherever the batch lives).

One resampling per batch does rotation, scaling and elastic deformation together
(``affine_grid`` + a smooth random displacement + ``grid_sample``); then axis flips, Gaussian
noise and random contrast. Labels are resampled with nearest neighbour. A flip of the left-right
axis swaps the labels of paired organs (and which of them the case annotated), so that a mirrored
right parotid is taught as a left one (:mod:`imunet.runtime.contract.laterality`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    p_spatial: float = 0.5
    max_rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_magnitude: float = 0.03  # displacement std in normalised [-1, 1] units
    elastic_grid: int = 4  # control points per axis of the smooth displacement
    p_flip: float = 0.5  # per axis
    p_noise: float = 0.15
    noise_std: float = 0.1
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(B, 3, 3)`` from angles ``(B, 3)`` in radians about the three axes."""
    b = angles.shape[0]
    mats = []
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        m = torch.eye(3, device=angles.device).repeat(b, 1, 1)
        i, j = [a for a in range(3) if a != axis]
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = c, -s, s, c
        mats.append(m)
    return mats[0] @ mats[1] @ mats[2]


@dataclass(frozen=True)
class LeftRight:
    """The array axis ``(z, y, x) = (0, 1, 2)`` that runs left-right, and the class each class
    becomes in a mirror image along it."""

    axis: int
    swap: tuple[int, ...]


def augment_batch(
    image: torch.Tensor,
    label: torch.Tensor,
    gen: torch.Generator,
    cfg: AugmentConfig = AugmentConfig(),
    known: torch.Tensor | None = None,
    sides: LeftRight | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment ``image`` ``(B, 1, Z, Y, X)`` float and ``label`` ``(B, Z, Y, X)`` integer together;
    ``known`` ``(B, C)`` (the classes each case annotated) follows the labels through ``sides``' swaps.

    ``gen`` must live on the CPU (random numbers are drawn there and moved, so runs are
    reproducible across devices).
    """
    b, dev = image.shape[0], image.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(dev)

    spatial = rand(b) < cfg.p_spatial
    if spatial.any():
        angles = (rand(b, 3) * 2 - 1) * math.radians(cfg.max_rotation_deg)
        lo, hi = cfg.scale_range
        scale = lo + rand(b, 1, 1) * (hi - lo)
        theta = torch.zeros(b, 3, 4, device=dev)
        theta[:, :, :3] = _rotation(angles) * scale
        eye = torch.eye(3, 4, device=dev).expand(b, 3, 4)
        theta = torch.where(spatial[:, None, None], theta, eye)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        g = cfg.elastic_grid
        coarse = torch.randn(b, 3, g, g, g, generator=gen).to(dev) * cfg.elastic_magnitude
        disp = F.interpolate(coarse, size=image.shape[2:], mode="trilinear", align_corners=True)
        grid = grid + disp.movedim(1, -1) * spatial[:, None, None, None, None]
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        label = label[:, 0].to(torch.long)
    for axis in range(3):
        flip = rand(b) < cfg.p_flip
        if flip.any():
            image = torch.where(flip[:, None, None, None, None], image.flip(2 + axis), image)
            mirrored = label.flip(1 + axis)
            if sides is not None and axis == sides.axis:
                swap = torch.tensor(sides.swap, device=dev)
                mirrored = swap[mirrored]
                if known is not None:
                    known = torch.where(flip[:, None], known[:, swap], known)
            label = torch.where(flip[:, None, None, None], mirrored, label)
    noise = (rand(b) < cfg.p_noise)[:, None, None, None, None]
    image = image + noise * torch.randn(image.shape, generator=gen).to(dev) * cfg.noise_std
    lo, hi = cfg.contrast_range
    factor = torch.where(rand(b) < cfg.p_contrast, lo + rand(b) * (hi - lo), torch.ones(b, device=dev))
    mean = image.mean(dim=(1, 2, 3, 4), keepdim=True)
    image = (image - mean) * factor[:, None, None, None, None] + mean
    return image, label, known
