"""A runtime backend that runs the PyTorch model, so validation during training goes through
exactly the runtime's sliding-window loop (and tests can compare it with the ONNX graphs)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from imunet.runtime.contract.manifest import MAX_POINTS


class TorchBackend:
    """The :class:`imunet.runtime.backends.base.Backend` protocol over a PyTorch model."""

    name = "torch"
    features_reusable = True  # every encoder call returns new tensors
    precision = "fp32"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", max_points: int = MAX_POINTS) -> None:
        self.skipped: list[str] = []
        self.model = model
        self.device = torch.device(device)
        self.max_points = max_points

    def _patch(self, patch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None, None].to(self.device)

    @torch.no_grad()
    def encode(self, patch: np.ndarray) -> list[torch.Tensor]:
        return self.model.encode(self._patch(patch))

    @torch.no_grad()
    def decode(self, features: list[torch.Tensor], points: np.ndarray) -> np.ndarray:
        pts = torch.from_numpy(points.astype(np.int64))[None].to(self.device)
        return self.model.decode(features, pts)[0].float().cpu().numpy()

    @torch.no_grad()
    def predict_dense(self, patch: np.ndarray) -> np.ndarray:
        return self.model(self._patch(patch))[0].float().cpu().numpy()

    def close(self) -> None:
        pass
