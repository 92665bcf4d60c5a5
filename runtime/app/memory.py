"""How much memory a scan may take: the default cap on a scan's working memory, from what this
process may use (the cgroup's limit where a container sets one, else the memory available)."""

from __future__ import annotations

from pathlib import Path

SHARE = 0.75  # of what is available: leave room for the libraries, the backend and the outputs
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_limit_files(proc_cgroup: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The memory limit files of this process's own cgroup and of every cgroup above it (a limit
    set on a parent holds too), for cgroup v2 (``0::/path``) and v1 (``N:memory:/path``), read from
    the text of ``/proc/self/cgroup``. A container that shows its own cgroup as ``/`` finds the root's."""
    files: list[Path] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        steps = [p for p in path.strip().split("/") if p and p != ".."]
        for depth in range(len(steps), -1, -1):
            files.append(base.joinpath(*steps[:depth], name))
    return files


def available_gib() -> float | None:
    """Memory this process may use in GiB: MemAvailable, lowered to a cgroup limit (None: unknown)."""
    found: list[float] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024 / 2**30)
    except (OSError, ValueError):
        pass
    try:
        own = Path("/proc/self/cgroup").read_text()
    except OSError:
        own = "0::/\n1:memory:/"  # unknown: the roots' limits, as a container shows them
    for limit in cgroup_limit_files(own):
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
