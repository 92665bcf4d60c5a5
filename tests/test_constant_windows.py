"""Constant windows (padding, air): one encoding per value, shared by every such window, exactly."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from imunet.runtime.backends import open_backend
from imunet.runtime.contract.bundle import load_bundle
from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.kernels.boxes import owner_boxes
from imunet.runtime.kernels.constant_windows import SharedFeatures, constant_value
from imunet.runtime.kernels.inference import Loop, predict_probabilities

from conftest import ROOT

SHIPPED = ROOT / "runtime" / "default" / "hippocampus.imunet"


class CountingBackend:
    """The real backend, counting encoder calls, with ``features_reusable`` as given."""

    def __init__(self, backend, reusable: bool) -> None:
        self.backend, self.features_reusable, self.encodes = backend, reusable, 0
        self.name, self.max_points = backend.name, backend.max_points
        self.precision, self.skipped = backend.precision, []
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


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_air_around_a_scan_is_encoded_once_and_the_probabilities_do_not_change(precision):
    bundle = load_bundle(SHIPPED)
    backend = open_backend(bundle, "ort-cpu", precision=precision, cpu_threads=1, callers=2)
    rng = np.random.default_rng(0)
    volume = np.zeros((56, 150, 120), np.float32)  # air (a constant) around a block of structure
    volume[8:48, 40:100, 30:80] = rng.normal(size=(40, 60, 50)).astype(np.float32)
    patch = tuple(bundle.manifest.patch_size)
    settings = InferenceSettings(smoothing=1)
    shared, plain = CountingBackend(backend, True), CountingBackend(backend, False)
    got, s_shared = predict_probabilities(volume, Loop(shared, patch, settings, workers=2))
    want, s_plain = predict_probabilities(volume, Loop(plain, patch, settings, workers=2))
    np.testing.assert_array_equal(got, want)  # the same decoder calls on the same features
    boxes = owner_boxes(volume.shape, patch, settings.overlap, settings.stride)
    windows = [volume[tuple(slice(o, o + p) for o, p in zip(b.window, patch))] for b in boxes]
    constant = sum(constant_value(w) is not None for w in windows)
    assert constant >= 6 and s_shared.features_reused == constant - 1 - s_shared.windows_reused
    assert shared.encodes == len(windows) - constant + 1  # one encoding for all the air
    assert s_plain.features_reused == 0 and s_shared.points_decoded == s_plain.points_decoded


def test_one_encoding_per_value_whatever_the_threads():
    calls: list[float] = []
    gate = threading.Event()

    def encode(patch):
        calls.append(float(patch.flat[0]))
        gate.wait(1.0)  # hold the first encoding so the other threads must wait for it
        return {"f": patch.copy()}

    shared = SharedFeatures(encode)
    air = np.full((3, 3, 3), -2.0, np.float32)
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(shared.encode(air, -2.0))) for _ in range(6)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == [-2.0] and shared.shared == 5
    assert all(r is results[0] for r in results)
    structure = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    shared.encode(structure, None), shared.encode(structure, None)
    assert calls == [-2.0, 0.0, 0.0]  # a window with structure is always encoded


def test_values_beyond_the_limit_are_encoded_every_time():
    calls: list[float] = []
    shared = SharedFeatures(lambda p: calls.append(float(p.flat[0])) or len(calls), limit=2)
    for value in (0.0, -1.0, 5.0, 0.0, -1.0, 5.0):
        shared.encode(np.full((2, 2, 2), value, np.float32), value)
    assert calls == [0.0, -1.0, 5.0, 5.0] and shared.shared == 2


def test_a_failed_encoding_is_not_shared():
    attempts = []

    def encode(patch):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("device lost")
        return "features"

    shared = SharedFeatures(encode)
    air = np.zeros((2, 2, 2), np.float32)
    with pytest.raises(RuntimeError):
        shared.encode(air, 0.0)
    assert shared.encode(air, 0.0) == "features" and len(attempts) == 2 and shared.shared == 0
