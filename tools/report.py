"""How every benchmark tool ends: the report as JSON on stdout and, with ``--json``, in a file."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, path: Path | None) -> None:
    """Print ``report`` as indented JSON and write the same text to ``path`` (folders made) if given."""
    text = json.dumps(report, indent=2)
    print(text)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
