"""Dice + cross-entropy, on sampled points (implicit) or on whole patches (U-Net)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice over the foreground classes), computed in float32.

    ``logits`` ``(M, C)``, ``target`` ``(M,)`` class indices; the Dice is pooled over the batch
    (nnU-Net's batch Dice), so a patch without a class does not count as a failure.
    """
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(-1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[-1])[:, 1:].to(probs.dtype)
    inter = (probs * onehot).sum(0)
    denom = probs.sum(0) + onehot.sum(0)
    dice = (2 * inter + smooth) / (denom + smooth)
    return ce + (1 - dice.mean())


def point_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Loss of the implicit model: ``logits`` ``(B, N, C)``, ``target`` ``(B, N)``."""
    return dice_ce(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Loss of the U-Net: outputs ``[(B, C, Z, Y, X), (B, C, Z/2, ...), ...]``, target ``(B, Z, Y, X)``.

    Level ``i`` is weighted ``1 / 2**i`` (normalised), its target subsampled by ``2**i``.
    """
    weights = torch.tensor([1 / 2**i for i in range(len(outputs))])
    weights = weights / weights.sum()
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for i, (out, w) in enumerate(zip(outputs, weights)):
        t = target[:, :: 2**i, :: 2**i, :: 2**i]
        logits = out.movedim(1, -1).reshape(-1, out.shape[1])
        total = total + w * dice_ce(logits, t.reshape(-1))
    return total
