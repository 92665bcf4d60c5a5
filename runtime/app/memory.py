"""How much memory a scan may take: the default cap on a scan's working memory, from what this
process may use (the cgroup's limit where a container sets one, else the memory available)."""

from __future__ import annotations

from pathlib import Path

SHARE = 0.75  # of what is available: leave room for the libraries, the backend and the outputs
CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def available_gib() -> float | None:
    """Memory this process may use in GiB: MemAvailable, lowered to a cgroup limit (None: unknown)."""
    found: list[float] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024 / 2**30)
    except (OSError, ValueError):
        pass
    for limit in CGROUP_LIMITS:
        try:
            text = limit.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max" or a huge number: no limit
            found.append(int(text) / 2**30)
    return min(found) if found else None


def default_cap_gib(scans_at_once: int = 1) -> float | None:
    """The working memory one scan may take when the user set no ``--max-memory``: a share of what
    is available, divided among the scans processed at once."""
    available = available_gib()
    return None if available is None else SHARE * available / max(1, scans_at_once)
