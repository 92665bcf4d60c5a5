"""``imunet-run INPUTS --out DIR --ray ADDRESS|auto``: the same per-scan work as a local run
(:func:`.scan_job.process`), on a Ray cluster that is already running (imunet starts none).

- One actor per worker holds one opened Segmenter, so the bundle is loaded once per worker. CPU
  backends take ``--ray-cpus`` CPUs an actor (default 1), GPU backends one GPU.
- The backend and precision are pinned for the cohort: the first actor resolves them, and a worker
  whose node resolves anything else is not used (a line says so), so labels never depend on the node.
- Scans go to whichever actor is free (dynamic scheduling), in the order given.
- Outputs go where a local run puts them, written atomically by the worker: ``--out`` must be a
  filesystem every node sees at the same path.
- A worker process or node lost mid-scan: the scan is given to a fresh worker, at most
  :data:`MAX_ATTEMPTS` times; a scan that keeps killing its worker (a memory bomb) becomes a failed
  row. A scan that fails by itself (bad input) is a failed row at once, as locally.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InputError
from .batch import Job
from .scan_job import RunOptions

MAX_ATTEMPTS = 3
GPU_BACKENDS = ("ort-cuda", "ort-trt", "tensorrt")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'imunet[ray]'") from None
    return ray


class ScanWorker:
    """A Ray actor's state: one Segmenter, opened once."""

    def __init__(self, model: str, segmenter_options: dict) -> None:
        from .pipeline import Segmenter

        self.seg = Segmenter(model, **segmenter_options)
        self.node = socket.gethostname()

    def describe(self) -> tuple[str, str, str]:
        """Backend, its precision, and this worker's node."""
        return self.seg.backend_name, self.seg.backend.precision, self.node

    def process(self, job: Job, options: RunOptions) -> dict:
        from .scan_job import process

        return {**process(self.seg, job, options), "node": self.node, "pid": os.getpid()}


@dataclass
class Cluster:
    """The actors of a run, what they were pinned to, and how to start another like them."""

    actors: list[Any]
    backend: str
    precision: str
    notes: list[str]
    remote: Any  # the actor class as Ray starts it (resources set)
    model: str
    options: dict  # the Segmenter's options, backend pinned

    def another(self) -> Any:
        """A fresh worker (after one was lost)."""
        return self.remote.remote(self.model, self.options)


def open_cluster(address: str, model: str, segmenter_options: dict, workers: int | None, cpus: int) -> Cluster:
    """Connect to the cluster and start the workers (:class:`InputError` if none can run the model)."""
    ray = import_ray()
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot connect to a Ray cluster ({str(exc).splitlines()[0]})") from None
    gpu = segmenter_options.get("backend") in GPU_BACKENDS
    resources = {"num_gpus": 1, "num_cpus": 0} if gpu else {"num_cpus": cpus}
    total = ray.cluster_resources().get("GPU" if gpu else "CPU", 0)
    count = workers or max(1, int(total // (1 if gpu else cpus)))
    remote = ray.remote(max_restarts=0, max_task_retries=0, **resources)(ScanWorker)
    # An actor uses the cores Ray granted it, not every core of its node: N actors on a node of N
    # cores would otherwise each start N threads.
    opts = {**segmenter_options, "cpus": None if gpu else cpus}
    first = remote.remote(model, opts)
    try:
        backend, precision, _ = ray.get(first.describe.remote())
    except ray.exceptions.RayError as exc:
        raise InputError(f"the first Ray worker cannot open the model: {_cause(exc)}") from None
    pinned = {**opts, "backend": backend}
    actors, notes = [first], []
    others = [remote.remote(model, pinned) for _ in range(count - 1)]
    for actor in others:
        try:
            got = ray.get(actor.describe.remote())
        except ray.exceptions.RayError as exc:
            notes.append(f"a Ray worker was not used: {_cause(exc)}")
            continue
        if got[:2] != (backend, precision):
            notes.append(f"a Ray worker on {got[2]} runs {got[0]} {got[1]}, not {backend} {precision}: not used")
            ray.kill(actor)
            continue
        actors.append(actor)
    return Cluster(actors, backend, precision, notes, remote, model, pinned)


def _cause(exc: BaseException) -> str:
    text = str(getattr(exc, "cause", None) or exc)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(exc).__name__


def run_jobs(cluster: Cluster, jobs: list[Job], options: RunOptions) -> Iterator[dict]:
    """Each job's entry as its scan ends, in the order scans end."""
    ray = import_ray()
    idle: deque = deque(cluster.actors)
    pending: deque = deque(jobs)
    attempts = dict.fromkeys(range(len(jobs)), 0)
    index = {id(job): i for i, job in enumerate(jobs)}
    ours: set[int] = set()  # jobs whose outputs did not exist before their first attempt
    running: dict[Any, tuple[Job, Any]] = {}
    while pending or running:
        while pending and idle:
            job, actor = pending.popleft(), idle.popleft()
            i = index[id(job)]
            if attempts[i] == 0 and not any(p.exists() or p.is_symlink() for p in job.outputs):
                ours.add(i)
            # a worker killed after writing a scan's outputs leaves them behind: its retry replaces
            # what this run wrote, never what was there before
            retry = replace(options, overwrite=True) if attempts[i] and i in ours else options
            running[actor.process.remote(job, retry)] = (job, actor)
        done, _ = ray.wait(list(running), num_returns=1)
        job, actor = running.pop(done[0])
        try:
            entry = ray.get(done[0])
            idle.append(actor)
        except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as exc:  # worker or node gone
            i = index[id(job)]
            attempts[i] += 1
            idle.append(cluster.another())
            if attempts[i] < MAX_ATTEMPTS:
                pending.appendleft(job)
                continue
            error = f"{job.scan}: its Ray worker died {attempts[i]} times on it (last: {_cause(exc)})"
            entry = _failed(job, error)
        except ray.exceptions.RayError as exc:  # the worker lives; the task itself broke: no retry
            idle.append(actor)
            entry = _failed(job, f"{job.scan}: failed on its Ray worker: {_cause(exc)}")
        yield entry


def _failed(job: Job, error: str) -> dict:
    return {"input": str(job.scan), "output": str(job.dest), "ok": False, "error": error}
