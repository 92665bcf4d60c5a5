"""imunet: the Implicit U-Net (Marimont & Tarroni, MIUA 2022) for volumetric segmentation.

This package imports nothing heavy: ``import imunet.runtime`` works without torch.
The PyTorch side lives in ``imunet.model``, ``imunet.train`` and friends; the exporter in
``imunet.export``; the lean runtime in ``imunet.runtime``.
"""

__version__ = "0.1.0"
