"""The backend protocol: how the inference loop talks to a model, whatever runs it.

An implicit model is two graphs: ``encode(patch) -> features`` and ``decode(features, points)
-> logits``. The features are an opaque handle: a CPU backend keeps numpy arrays, a GPU backend
keeps device buffers, so feature maps never cross to the host. A dense model (the U-Net
baseline) has one graph, ``predict_dense(patch) -> logits``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """What the inference loop needs from a backend.

    ``patch`` is ``(Z, Y, X)`` float32 at the bundle's patch size; ``points`` ``(N, 3)`` int32
    voxel indices ``(z, y, x)`` in that patch with ``N <= max_points``; logits are float32,
    ``(N, C)`` from ``decode`` and ``(C, Z, Y, X)`` from ``predict_dense``.

    Declared by every backend: ``name`` (``ort-cpu``, ``openvino``, ...); ``max_points`` per decoder
    call; ``features_reusable``: features that ``encode`` returned stay valid after later ``encode``
    calls (the loop then lets windows of one value, such as air, share one encoding);
    ``precision``: what runs at which precision, e.g. ``fp32`` or ``decoder int8``; ``skipped``:
    for a backend that ``auto`` chose, why each backend tried before it was passed over.
    """

    name: str
    max_points: int
    features_reusable: bool
    precision: str
    skipped: list[str]

    def encode(self, patch: np.ndarray) -> Any: ...

    def decode(self, features: Any, points: np.ndarray) -> np.ndarray: ...

    def predict_dense(self, patch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...
