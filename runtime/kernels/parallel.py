"""Several windows in flight at once: each on its own thread, results consumed in order.

onnxruntime releases the GIL inside ``run``, so two threads each running a single-threaded session
keep two cores busy, and one window's numpy (refinement, blending) overlaps the other's graph.
On a 2-core CPU that beats one window at a time on a two-threaded session, because small 3-D
convolutions scale poorly across threads (docs/DESIGN-NOTES.md, "Two windows in flight"). Results are yielded in
submission order, so accumulation stays in the caller's thread and is deterministic.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

CPU_BACKENDS = ("ort-cpu", "openvino")


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_workers(backend: str, cpus: int | None = None) -> int:
    """Windows in flight for ``backend``: two on a CPU backend with at least two cores, else one.

    GPU backends share device buffers between the encoder and decoder calls of one window, so they
    run one window at a time."""
    cpus = cpu_count() if cpus is None else cpus
    return 2 if backend in CPU_BACKENDS and cpus >= 2 else 1


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """onnxruntime intra-op threads for each of ``workers`` threads, so that together they fill the CPUs."""
    cpus = cpu_count() if cpus is None else cpus
    return max(1, cpus // max(1, workers))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int = 2) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, yielding in order with at most ``workers * ahead``
    calls in flight (bounded memory). ``workers <= 1`` runs in the calling thread."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future[R]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imunet-window") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= workers * ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:  # an error or an abandoned generator: do not start what is queued
                f.cancel()
