"""Dice + cross-entropy, on sampled points (implicit) or on whole patches (U-Net).

Partial annotation: ``known`` says per row which classes were annotated in that row's case. An
organ that was not annotated there is unknown, not background, so the loss is *marginal*: a
background target is scored by the probability of "background or any unannotated organ", and an
unannotated organ's Dice is not counted for those rows. With every class known both reduce to the
ordinary Dice + cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_ce(
    logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None, smooth: float = 1e-5
) -> torch.Tensor:
    """Cross-entropy plus (1 - soft Dice over the foreground classes), computed in float32.

    ``logits`` ``(M, C)``, ``target`` ``(M,)`` class indices, ``known`` ``(M, C)`` bool or None
    (all known). The Dice is pooled over the batch (nnU-Net's batch Dice), so a patch without a
    class does not count as a failure; a class known in no row of the batch is left out of it.
    """
    logits = logits.float()
    n_classes = logits.shape[-1]
    if known is None:
        ce = F.cross_entropy(logits, target)
        weight = None
    else:
        # Classes a row's target stands for: its own, and for background every unannotated organ.
        allowed = F.one_hot(target, n_classes).bool() | ((target == 0)[:, None] & ~known)
        merged = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        ce = (torch.logsumexp(logits, dim=-1) - merged).mean()
        weight = known[:, 1:].to(torch.float32)
    probs = logits.softmax(-1)[:, 1:]
    onehot = F.one_hot(target, n_classes)[:, 1:].to(probs.dtype)
    if weight is not None:
        probs, onehot = probs * weight, onehot * weight
    inter = (probs * onehot).sum(0)
    denom = probs.sum(0) + onehot.sum(0)
    dice = (2 * inter + smooth) / (denom + smooth)
    if weight is not None:
        counted = weight.sum(0) > 0
        dice = dice[counted] if bool(counted.any()) else dice.new_ones(1)
    return ce + (1 - dice.mean())


def point_loss(logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of the implicit model: ``logits`` ``(B, N, C)``, ``target`` ``(B, N)``, ``known`` ``(B, C)``."""
    rows = None if known is None else known.repeat_interleave(target.shape[1], dim=0)
    return dice_ce(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), rows)


def deep_supervision_loss(
    outputs: list[torch.Tensor], target: torch.Tensor, known: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss of the U-Net: outputs ``[(B, C, Z, Y, X), (B, C, Z/2, ...), ...]``, target ``(B, Z, Y, X)``,
    ``known`` ``(B, C)``.

    Level ``i`` is weighted ``1 / 2**i`` (normalised), its target subsampled by ``2**i``.
    """
    weights = torch.tensor([1 / 2**i for i in range(len(outputs))])
    weights = weights / weights.sum()
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for i, (out, w) in enumerate(zip(outputs, weights)):
        t = target[:, :: 2**i, :: 2**i, :: 2**i]
        logits = out.movedim(1, -1).reshape(-1, out.shape[1])
        rows = None
        if known is not None:
            per_case = t[0].numel()
            rows = known.repeat_interleave(per_case, dim=0)
        total = total + w * dice_ce(logits, t.reshape(-1), rows)
    return total
