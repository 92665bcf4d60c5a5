"""The lean runtime: numpy + SimpleITK + an inference backend; never torch.

Public API::

    from imunet.runtime import Segmenter
    seg = Segmenter("model.imunet")            # or Segmenter() for the shipped default
    label_image = seg.predict(sitk_image)      # SimpleITK in, SimpleITK out, same geometry
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from .errors import BackendError, BundleError, ImunetError, InputError

# The inference libraries' own telemetry stays off: a hospital node must not write usage records
# into the user's home folder (onnxruntime's ~/.cache/Microsoft/DeveloperTools, OpenVINO's
# ~/intel) nor report usage anywhere. OpenVINO's Python package falls back to its stub when the
# telemetry module cannot be imported. IMUNET_LIBRARY_TELEMETRY=1 leaves both as they ship.
if os.environ.get("IMUNET_LIBRARY_TELEMETRY") != "1":
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

__all__ = ["Segmenter", "Bundle", "load_bundle", "ImunetError", "InputError", "BundleError", "BackendError"]

if TYPE_CHECKING:  # pragma: no cover
    from .app.pipeline import Segmenter
    from .contract.bundle import Bundle, load_bundle


def __getattr__(name: str) -> Any:
    # Lazy: `import imunet.runtime` stays cheap (no SimpleITK / onnxruntime until used).
    if name == "Segmenter":
        from .app.pipeline import Segmenter

        return Segmenter
    if name in ("Bundle", "load_bundle"):
        from .contract import bundle

        return getattr(bundle, name)
    raise AttributeError(name)
