"""Windows whose input is one value everywhere (padding, air after a CT clip): computed once.

Two levels of reuse:

- :class:`ConstantWindows`: a later window with the same value *and* the same decoding geometry
  takes the first one's result (its probabilities) exactly, without any graph call;
- :class:`ConstantMaps`: in adaptive mode the owner boxes differ in size and offset, so few such
  keys repeat; instead the first constant window of a value is encoded once and *every* voxel of
  it decoded once, and each later constant window of that value reads its lattice points from
  that map. A point's probabilities are a function of the features (the same for every window of
  that value) and its window-local position, so the map holds what decoding would give, up to the
  int8 decoder's per-call activation scale (tests/test_constant_windows.py).

Neither decides anything from intensities beyond "every voxel equal": a window with any structure
in it is encoded and decoded as usual (docs/DESIGN-NOTES.md, "Air and padding").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Protocol

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

    def lookup(self, index: int, patch: np.ndarray, key: Callable[[float], Hashable]) -> int | None:
        """The index of an earlier window whose result ``index`` reuses, else None (compute it)."""
        value = constant_value(patch)
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


class ConstantMaps:
    """Class probabilities ``(Z, Y, X, C)`` of every voxel of a constant window, one map per value,
    computed once by the first thread that asks for that value and shared with the others.

    ``dense(patch)`` returns the probabilities of every voxel of a patch (encode, then decode every
    voxel). At most ``limit`` values get a map; a window of another value is not served."""

    def __init__(self, dense: Callable[[np.ndarray], np.ndarray], limit: int = 8) -> None:
        self._dense, self._limit = dense, limit
        self._lock = threading.Lock()
        self._done: dict[float, threading.Event] = {}
        self._maps: dict[float, np.ndarray] = {}
        self.served = 0  # windows answered from a map

    def get(self, patch: np.ndarray) -> np.ndarray | None:
        """The map for a constant ``patch`` (computed now if it is the first of its value), else None."""
        value = constant_value(patch)
        if value is None:
            return None
        with self._lock:
            event = self._done.get(value)
            owner = event is None and len(self._done) < self._limit
            if owner:
                event = self._done[value] = threading.Event()
        if event is None:  # more distinct values than the limit
            return None
        if owner:
            try:
                self._maps[value] = self._dense(patch)
            finally:
                event.set()  # if the owner failed, the waiters below decode on their own
        else:
            event.wait()
        found = self._maps.get(value)
        if found is not None:
            with self._lock:
                self.served += 1
        return found
