"""Shared fixtures: synthetic phantom datasets, a tiny trained run, tiny bundles, exact fakes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tools"))

HIPPO = SHARED / "hippocampus"
CT_DIR = SHARED / "ct"

TINY_MODEL = dict(
    patch_size=(16, 32, 32),
    channels=(4, 8, 16, 16),
    decoder_width=32,
    decoder_depth=4,
    reinject_at=2,
    decoder_dropout=0.0,
)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from make_phantoms import write_dataset

    return write_dataset(tmp_path_factory.mktemp("phantoms"), cases=6, shape=(24, 40, 40), seed=1)


def _train(dataset: Path, out: Path, kind: str, steps: int, **train_kw):
    import torch

    from imunet.config import ModelConfig, RunConfig, TrainConfig
    from imunet.train import train

    mcfg = ModelConfig(kind=kind, num_classes=3, **TINY_MODEL)
    tcfg = TrainConfig(
        **{
            **dict(
                steps=steps,
                batch_size=2,
                lr=3e-3,
                lr_schedule="constant",
                points=2000,
                augment=False,
                val_fraction=0.34,
                checkpoint_every=1000,
                seed=0,
                # The runtime tests' tolerances were set on this fixture's model: its recipe stays
                # fixed when training defaults change (class-balanced sampling is tested on its own).
                class_balanced=False,
            ),
            **train_kw,
        }
    )
    metrics = train(dataset, out, RunConfig(mcfg, tcfg), torch.device("cpu"), log=lambda _m: None)
    return out, metrics


@pytest.fixture(scope="session")
def trained_run(phantom_dir, tmp_path_factory):
    """A tiny Implicit U-Net trained on the phantoms until it segments them (about 20 s)."""
    if not torch_available():
        pytest.skip("torch is not installed")
    return _train(phantom_dir, tmp_path_factory.mktemp("runs") / "implicit", "implicit", 150)


@pytest.fixture(scope="session")
def trained_unet_run(phantom_dir, tmp_path_factory):
    if not torch_available():
        pytest.skip("torch is not installed")
    return _train(phantom_dir, tmp_path_factory.mktemp("runs") / "unet", "unet", 40)


@pytest.fixture(scope="session")
def bundle_dir(trained_run, tmp_path_factory) -> Path:
    from imunet.export.bundle import write_bundle

    return write_bundle(trained_run[0], tmp_path_factory.mktemp("bundles") / "tiny.imunet", log=lambda _m: None)


@pytest.fixture(scope="session")
def unet_bundle_dir(trained_unet_run, tmp_path_factory) -> Path:
    from imunet.export.bundle import write_bundle

    return write_bundle(trained_unet_run[0], tmp_path_factory.mktemp("bundles") / "unet.imunet", log=lambda _m: None)


class FakeBackend:
    """An exact fake: the 'logits' of point p are a known function of its position in the scan.

    ``encode`` records the window's origin (found from a coordinate ramp written in the patch),
    so decoded values depend on absolute voxel position and stitching must reproduce them.
    """

    name, features_reusable, precision = "fake", False, "fp32"

    def __init__(self, fn, max_points: int = 1000) -> None:
        self.skipped: list[str] = []
        self.fn = fn
        self.max_points = max_points
        self.calls = 0

    def encode(self, patch: np.ndarray):
        return patch  # the patch itself carries the absolute coordinates (see ramp_volume)

    def decode(self, features: np.ndarray, points: np.ndarray) -> np.ndarray:
        self.calls += 1
        absolute = features[points[:, 0], points[:, 1], points[:, 2]]  # encoded linear index
        return self.fn(absolute)

    def predict_dense(self, patch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass
