"""The benchmark suite's shared harness: the machine a figure was measured on, one configuration per
fresh process, peak memory, medians, and the report as JSON.

Every tool in ``tools/`` runs as a script (``tools/`` is then on ``sys.path``, so ``import harness``
works) and ends with :func:`emit`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("IMUNET_DATA", REPO.parent / "shared" / "data" / "hippocampus"))
SPLIT = REPO / "docs" / "results" / "hippocampus_split.json"
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


def machine() -> dict[str, Any]:
    """CPU model and the instruction-set flags that decide which kernels run, cores, library versions."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {}
    for name in ("numpy", "onnxruntime", "SimpleITK", "torch", "openvino"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a library that is not installed is simply not listed
            continue
    return {
        "cpu": model,
        "flags": [f for f in FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fresh_process(script: str | Path, args: Iterable[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python SCRIPT ARGS`` in a new process and return the JSON object its last stdout line holds."""
    res = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if res.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def median(values: Iterable[float], digits: int = 4) -> float:
    return round(statistics.median(list(values)), digits)


def case_names(spec: str) -> list[str]:
    """``a,b,c`` or ``@split.json:key``."""
    if spec.startswith("@"):
        path, _, key = spec[1:].rpartition(":")
        return list(json.loads(Path(path).read_text())[key])
    return [c for c in spec.split(",") if c]


def emit(report: dict, path: Path | None) -> None:
    """Print ``report`` as indented JSON and write the same text to ``path`` (folders made) if given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
