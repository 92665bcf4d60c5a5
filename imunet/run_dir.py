"""The training run folder: the one place that names its files.

``imunet-train`` writes a run folder and ``imunet-export`` reads it; both go through
:class:`RunDir`, so a file's name is written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """A run folder ``path``; ``cache`` holds the preprocessed arrays (None: ``RUN/preprocessed``,
    a folder several runs on one dataset may share by naming it)."""

    path: Path
    cache: Path | None = None

    @classmethod
    def of(cls, run: str | Path | RunDir) -> RunDir:
        return run if isinstance(run, RunDir) else cls(Path(run))

    @property
    def config(self) -> Path:
        """:class:`~imunet.config.RunConfig` as JSON."""
        return self.path / "config.json"

    @property
    def split(self) -> Path:
        """The fixed train / validation split of case names."""
        return self.path / "split.json"

    @property
    def dataset_stats(self) -> Path:
        """Spacing, normalisation, orientation and fingerprint of the training data."""
        return self.path / "dataset_stats.json"

    @property
    def checkpoint(self) -> Path:
        """Weights, optimiser and generator states (loads with ``torch.load(weights_only=True)``)."""
        return self.path / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        """Validation Dice per label, the post-processing decision, time, memory and versions."""
        return self.path / "metrics.json"

    @property
    def log(self) -> Path:
        """One CSV row per step: loss, learning rate, seconds, validation Dice when validated."""
        return self.path / "log.csv"

    @property
    def curves(self) -> Path:
        """Loss and validation Dice against step, as a PNG."""
        return self.path / "curves.png"

    @property
    def preprocessed(self) -> Path:
        return self.cache or self.path / "preprocessed"
