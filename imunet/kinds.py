"""What each model kind does in training: its network and its loss on a batch (with the implicit
model's point sampling). The runtime side of a kind (graphs, how a backend runs it) is
:class:`imunet.runtime.contract.kinds.ModelKind`; :func:`training_kind` joins the two."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from imunet.runtime.contract.kinds import IMPLICIT, UNET, ModelKind

from .losses import deep_supervision_loss, point_loss
from .sampling import point_labels, sample_points

if TYPE_CHECKING:  # pragma: no cover
    from .config import ModelConfig, RunConfig


@dataclass(frozen=True)
class Batch:
    """An (augmented) training batch: ``image`` ``(B, 1, Z, Y, X)``, ``label`` ``(B, Z, Y, X)`` and
    which classes each patch's case annotated, ``known`` ``(B, C)`` (None: all of them)."""

    image: torch.Tensor
    label: torch.Tensor
    known: torch.Tensor | None = None


class TrainingKind(Protocol):
    """A model kind's training behaviour."""

    kind: ModelKind

    def build(self, cfg: ModelConfig) -> torch.nn.Module: ...

    def loss(self, net: torch.nn.Module, batch: Batch, cfg: RunConfig, rng: np.random.Generator) -> torch.Tensor: ...


def points_for_batch(labels: np.ndarray, cfg: RunConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points ``(B, k, 3)`` and their labels ``(B, k)`` for a batch of label patches."""
    t = cfg.train
    pts, tgt = [], []
    for lbl in labels:
        p, _ = sample_points(lbl, t.points, t.boundary_fraction, t.boundary_sigma, rng, t.class_balanced)
        pts.append(p)
        tgt.append(point_labels(lbl, p))
    return np.stack(pts), np.stack(tgt).astype(np.int64)


class ImplicitTraining:
    """The Implicit U-Net: points sampled on the batch's labels (boundary oversampling), the loss
    on the decoded points."""

    kind = IMPLICIT

    def build(self, cfg: ModelConfig) -> torch.nn.Module:
        from .model.network import ImplicitUNet

        return ImplicitUNet(cfg)

    def loss(self, net: torch.nn.Module, batch: Batch, cfg: RunConfig, rng: np.random.Generator) -> torch.Tensor:
        device = batch.image.device
        pts, tgt = points_for_batch(batch.label.to(torch.uint8).cpu().numpy(), cfg, rng)
        logits = net(batch.image, torch.from_numpy(pts).to(device))
        return point_loss(logits, torch.from_numpy(tgt).to(device), batch.known)


class DenseTraining:
    """The U-Net baseline: the whole patch, with deep supervision."""

    kind = UNET

    def build(self, cfg: ModelConfig) -> torch.nn.Module:
        from .model.unet import UNet

        return UNet(cfg)

    def loss(self, net: torch.nn.Module, batch: Batch, cfg: RunConfig, rng: np.random.Generator) -> torch.Tensor:
        return deep_supervision_loss(net(batch.image), batch.label, batch.known)


TRAINING: dict[str, TrainingKind] = {t.kind.name: t for t in (ImplicitTraining(), DenseTraining())}


def training_kind(cfg: ModelConfig) -> TrainingKind:
    """The training behaviour of ``cfg``'s model kind."""
    return TRAINING[cfg.model_kind.name]


def build_model(cfg: ModelConfig) -> torch.nn.Module:
    """The network a :class:`ModelConfig` describes."""
    return training_kind(cfg).build(cfg)
