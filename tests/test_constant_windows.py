"""Constant windows (padding, air): one encoding and one decoded map per value, shared by every such window."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from imunet.runtime.backends import open_backend
from imunet.runtime.boxes import owner_boxes
from imunet.runtime.bundle import load_bundle
from imunet.runtime.constant_windows import ConstantMaps, constant_value
from imunet.runtime.inference import InferenceStats, PointDecoder, predict_probabilities
from imunet.runtime.lattice import refine_box
from imunet.runtime.settings import InferenceSettings

from conftest import ROOT

SHIPPED = ROOT / "runtime" / "default" / "hippocampus.imunet"


class CountingBackend:
    """The real backend, counting encoder calls."""

    def __init__(self, backend) -> None:
        self.backend, self.encodes = backend, 0
        self.name, self.max_points = backend.name, backend.max_points
        self._lock = threading.Lock()

    def encode(self, patch):
        with self._lock:
            self.encodes += 1
        return self.backend.encode(patch)

    def decode(self, features, points):
        return self.backend.decode(features, points)


def test_constant_value_is_only_for_windows_of_one_value():
    patch = np.full((4, 5, 6), -1.25, np.float32)
    assert constant_value(patch) == -1.25
    patch[3, 4, 5] = np.nextafter(np.float32(-1.25), np.float32(0))
    assert constant_value(patch) is None


def every_box_decoded(volume, backend, patch, stride):
    """Adaptive mode's probabilities with every box encoded and decoded on its own (no maps)."""
    stats = InferenceStats()
    decode = PointDecoder(backend, stats)
    out = None
    for box in owner_boxes(volume.shape, patch, 0.3, stride):
        window = volume[tuple(slice(o, o + p) for o, p in zip(box.window, patch))]
        features = decode.encode(window)
        inside = tuple(min(s - 1, o + p - 1) for s, o, p in zip(volume.shape, box.window, patch))
        probs = refine_box(lambda pts, f=features: decode(f, pts), box, inside, stride)
        out = np.zeros((probs.shape[0], *volume.shape), np.float32) if out is None else out
        out[(slice(None), *(slice(s, s + n) for s, n in zip(box.start, box.size)))] = probs
    return out


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_air_around_a_scan_is_encoded_once_and_gives_what_every_box_would(precision):
    bundle = load_bundle(SHIPPED)
    backend = open_backend(bundle, "ort-cpu", precision=precision, cpu_threads=1, callers=2)
    rng = np.random.default_rng(0)
    volume = np.zeros((56, 150, 120), np.float32)  # air (a constant) around a block of structure
    volume[8:48, 40:100, 30:80] = rng.normal(size=(40, 60, 50)).astype(np.float32)
    patch = tuple(bundle.manifest.patch_size)
    counting = CountingBackend(backend)
    got, stats = predict_probabilities(volume, counting, patch, InferenceSettings(smoothing=1), workers=2)
    want = every_box_decoded(volume, backend, patch, 4)
    windows = [
        volume[tuple(slice(o, o + p) for o, p in zip(b.window, patch))]
        for b in owner_boxes(volume.shape, patch, 0.3, 4)
    ]
    constant = sum(constant_value(w) is not None for w in windows)
    assert constant >= 6 and stats.constant_windows + stats.windows_reused == constant
    assert counting.encodes == len(windows) - constant + 1  # one encoding for all the air
    if precision == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert (got.argmax(0) == want.argmax(0)).all()
    else:  # the int8 decoder scales activations per call: a point's value depends a little on its call
        fp32 = every_box_decoded(volume, open_backend(bundle, "ort-cpu", precision="fp32", cpu_threads=1), patch, 4)
        assert (got.argmax(0) == fp32.argmax(0)).mean() >= 0.998
        assert (want.argmax(0) == fp32.argmax(0)).mean() >= 0.998


def test_one_map_per_value_whatever_the_threads():
    calls: list[float] = []
    gate = threading.Event()

    def dense(patch):
        calls.append(float(patch.flat[0]))
        gate.wait(1.0)  # hold the first computation so the other threads must wait for it
        return np.zeros((*patch.shape, 3), np.float32)

    maps = ConstantMaps(dense)
    air = np.full((3, 3, 3), -2.0, np.float32)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(maps.get(air))) for _ in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == [-2.0] and maps.served == 6
    assert all(r is results[0] for r in results)
    structure = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    assert maps.get(structure) is None and calls == [-2.0]  # a window with structure gets no map


def test_a_failed_map_is_not_served():
    attempts = []

    def dense(patch):
        attempts.append(1)
        raise RuntimeError("device lost")

    maps = ConstantMaps(dense)
    air = np.zeros((2, 2, 2), np.float32)
    with pytest.raises(RuntimeError):
        maps.get(air)
    assert maps.get(air) is None and maps.served == 0  # the window is then encoded as usual
