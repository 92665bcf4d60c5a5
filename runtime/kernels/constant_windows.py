"""Windows whose input is one value everywhere (padding, air after a CT clip): computed once.

Two levels of reuse, both exact (the graphs are deterministic functions of their input):

- :class:`ConstantWindows`: a later window with the same value *and* the same decoding geometry
  takes the first one's result (its probabilities) without any graph call;
- :class:`SharedFeatures`: in adaptive mode the owner boxes differ in size and offset, so few such
  keys repeat; a constant window of another geometry takes the first one's encoder features and
  only decodes its box's lattice, with the same calls it would make after its own encoding.

Neither decides anything from intensities beyond "every voxel equal": a window with any structure
in it is encoded as usual (docs/DESIGN-NOTES.md, "Air and padding").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import numpy as np


class ReuseCounts(Protocol):
    """Where :meth:`ConstantWindows.resolve` counts reused windows (the loop's statistics)."""

    windows_reused: int


def constant_value(patch: np.ndarray) -> float | None:
    """The value of a window whose voxels are all equal, else None."""
    first = patch.flat[0]
    if patch.min() != first or patch.max() != first:
        return None
    return float(first)


class ConstantWindows:
    """Windows whose input is one value everywhere (padding, masked air) are computed once per key:
    the first such window is computed, later ones with the same key reuse its exact result."""

    def __init__(self, limit: int = 8) -> None:
        self.first: dict[Hashable, int] = {}
        self.limit = limit
        self.results: dict[int, object] = {}

    def lookup(self, index: int, value: float | None, key: Callable[[float], Hashable]) -> int | None:
        """The index of an earlier window whose result ``index`` reuses, else None (compute it).
        ``value``: the window's :func:`constant_value`."""
        if value is None:
            return None
        k = key(value)
        if k in self.first:
            return self.first[k]
        if len(self.first) < self.limit:
            self.first[k] = index
        return None

    def resolve(self, index: int, result: object | None, same_as: int | None, stats: ReuseCounts) -> object:
        """The result of window ``index``: its own, or the reused one; remembers what may be reused."""
        if result is None:
            stats.windows_reused += 1
            return self.results[same_as]  # type: ignore[index]
        if index in self.first.values():
            self.results[index] = result
        return result


class SharedFeatures:
    """Encoder features of constant windows, one encoding per value, shared across threads.

    ``encode(patch, value)`` encodes a window (``value``: its :func:`constant_value`); a constant one
    is encoded by the first thread that asks for
    its value, and later askers wait for and share that result. Features stay alive for the whole
    volume, so at most ``limit`` values are shared (padding and air are one or two). Only for
    backends whose features stay valid after later encoder calls (``features_reusable``)."""

    def __init__(self, encode: Callable[[np.ndarray], Any], limit: int = 2) -> None:
        self._encode, self._limit = encode, limit
        self._lock = threading.Lock()
        self._done: dict[float, threading.Event] = {}
        self._features: dict[float, Any] = {}
        self.shared = 0  # encoder calls saved

    def encode(self, patch: np.ndarray, value: float | None) -> Any:
        """Features of ``patch``: computed, or those of an earlier constant window of the same value."""
        if value is None:
            return self._encode(patch)
        with self._lock:
            event = self._done.get(value)
            owner = event is None and len(self._done) < self._limit
            if owner:
                event = self._done[value] = threading.Event()
        if event is None:  # more distinct values than the limit
            return self._encode(patch)
        if owner:
            try:
                self._features[value] = self._encode(patch)
            finally:
                event.set()  # if the owner failed, the waiters below encode on their own
            return self._features[value]
        event.wait()
        if value not in self._features:
            return self._encode(patch)
        with self._lock:
            self.shared += 1
        return self._features[value]
