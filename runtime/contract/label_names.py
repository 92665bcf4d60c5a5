"""Labels named by a user: names (any case) or numbers, comma-separated or one per argument."""

from __future__ import annotations

from collections.abc import Iterable


def label_indices(items: Iterable[str], labels: dict[int, str], option: str) -> tuple[int, ...]:
    """The foreground label indices that ``items`` name, in order, each once.

    ``labels`` maps index to name (0 is background). ``ValueError`` names ``option``, the item and
    the labels there are."""
    by_name = {v.lower(): k for k, v in labels.items() if k}
    out: list[int] = []
    for item in (t.strip() for entry in items for t in str(entry).split(",")):
        if not item:
            continue
        k = int(item) if item.isdigit() else by_name.get(item.lower())
        if k is None or k not in labels or k == 0:
            known = ", ".join(f"{v} ({k})" for k, v in labels.items() if k)
            raise ValueError(f"{option} {item}: the model has no such label; it has {known}")
        if k not in out:
            out.append(k)
    return tuple(out)
