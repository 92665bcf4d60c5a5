"""Configuration as frozen dataclasses that round-trip through JSON (stored in every run)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from imunet.runtime.contract.kinds import ModelKind, model_kind

# Partially annotated datasets: "marginal" merges a case's unannotated organs into background in the
# loss; "background" takes their absence as background; "complete" trains only on fully annotated cases.
PARTIAL_LABELS = ("marginal", "background", "complete")
GATHER_MODES = ("floor", "nearest")


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the Implicit U-Net or of the dense U-Net baseline (same encoder)."""

    kind: str = "implicit"
    num_classes: int = 2  # background included
    in_channels: int = 1
    patch_size: tuple[int, int, int] = (96, 160, 160)  # (Z, Y, X), each divisible by 2**(levels-1)
    channels: tuple[int, ...] = (16, 32, 64, 128)  # the shipped recipe; the paper's encoder is 32..256
    convs_per_block: tuple[int, ...] = (2, 2, 4, 4)
    pe_frequencies: int = 10  # L of the NeRF positional encoding: 6 * L numbers per point
    decoder_width: int = 256  # the paper: 512
    decoder_depth: int = 8  # hidden linear layers
    decoder_dropout: float = 0.1
    reinject_at: int = 4  # 0-based hidden layer whose input gets the decoder input concatenated
    gather: str = "floor"  # "floor": the paper's p // 2**b; "nearest": round to the nearest cell centre

    def __post_init__(self) -> None:
        model_kind(self.kind)  # ValueError for an unknown kind
        if self.gather not in GATHER_MODES:
            raise ValueError(f"gather must be one of {GATHER_MODES}, got {self.gather!r}")
        if len(self.channels) != len(self.convs_per_block):
            raise ValueError(f"channels {self.channels} and convs_per_block {self.convs_per_block} differ in length")
        if self.num_classes < 2:
            raise ValueError(f"num_classes counts background and must be >= 2, got {self.num_classes}")
        div = 2 ** (self.levels - 1)
        if len(self.patch_size) != 3 or any(p % div or p <= 0 for p in self.patch_size):
            raise ValueError(f"patch_size must be 3 positive multiples of {div}, got {self.patch_size}")
        if not 0 <= self.reinject_at < self.decoder_depth:
            raise ValueError(f"reinject_at must be in [0, {self.decoder_depth}), got {self.reinject_at}")

    @property
    def model_kind(self) -> ModelKind:
        """What this kind's bundle holds and how the runtime runs it."""
        return model_kind(self.kind)

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def feature_dim(self) -> int:
        """Width of the gathered feature vector (sum of the encoder channels)."""
        return sum(self.channels)

    @property
    def decoder_in(self) -> int:
        return self.feature_dim + 6 * self.pe_frequencies

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: _tuple(v) for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, sampling and augmentation settings of one training run."""

    steps: int = 6000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-5
    points: int = 30000  # k: points per patch
    boundary_fraction: float = 0.5  # alpha
    boundary_sigma: float = 5.0  # sigma, voxels
    positive_fraction: float = 1 / 3  # 1:2 positive:negative patches
    class_balanced: bool = True  # positives centred on a uniformly drawn class; boundary points split per class
    partial_labels: str = "marginal"  # see PARTIAL_LABELS
    augment: bool = True
    amp: bool = True  # mixed precision, used on CUDA only
    val_fraction: float = 0.2
    split: str = ""  # a split file (``train`` / ``val`` case lists) used instead of drawing one
    val_every: int = 0  # 0: only at the end
    val_max_cases: int = 0  # 0: all held-out cases
    checkpoint_every: int = 100
    seed: int = 0
    warmup_steps: int = 0
    lr_schedule: str = "poly"  # nnU-Net's (1 - t)**0.9, or "constant"
    minutes: float = 0.0  # > 0: a time budget; ``steps`` is then set (and re-set) from the measured speed

    def __post_init__(self) -> None:
        if not 0 <= self.boundary_fraction <= 1:
            raise ValueError(f"boundary_fraction must be in [0, 1], got {self.boundary_fraction}")
        if not 0 <= self.positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.steps < 1 or self.batch_size < 1 or self.points < 1:
            raise ValueError(
                f"steps, batch_size and points must be >= 1, got {self.steps}, {self.batch_size}, {self.points}"
            )
        if self.minutes < 0:
            raise ValueError(f"minutes must be >= 0, got {self.minutes}")
        if self.partial_labels not in PARTIAL_LABELS:
            raise ValueError(f"partial_labels must be one of {PARTIAL_LABELS}, got {self.partial_labels!r}")
        if self.lr_schedule not in ("constant", "poly"):
            raise ValueError(f"lr_schedule must be 'constant' or 'poly', got {self.lr_schedule!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run: stored as ``RUN/config.json``."""

    model: ModelConfig
    train: TrainConfig
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": asdict(self.model), "train": asdict(self.train), "dataset": self.dataset, "extra": self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        return cls(
            ModelConfig.from_dict(data["model"]),
            TrainConfig.from_dict(data["train"]),
            data.get("dataset", ""),
            data.get("extra", {}),
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(json.loads(path.read_text()))
