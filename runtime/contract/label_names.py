"""Labels as people meet them: the names a user types (names in any case or numbers, comma-separated
or one per argument), the names a dataset's ``dataset.json`` lists, and the colour each label is
shown in (the preview and the DICOM SEG's recommended display colour agree)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import InputError

# sRGB per label index (index 0, background, is never drawn): distinct, readable over grey anatomy
LABEL_COLOURS = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60),
)  # fmt: skip


def label_colour(k: int) -> tuple[int, int, int]:
    """The sRGB colour of label ``k`` (the palette repeats past its end, skipping background's black)."""
    return LABEL_COLOURS[k] if k < len(LABEL_COLOURS) else LABEL_COLOURS[1 + (k - 1) % (len(LABEL_COLOURS) - 1)]


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


def dataset_labels(meta: dict[str, Any]) -> dict[int, str]:
    """The ``labels`` of a ``dataset.json`` (MSD v1 ``{"1": "name"}`` or nnU-Net v2 ``{"name": 1}``)
    as ``{index: name}``; :class:`InputError` unless they are 0..C-1 with background 0."""
    raw = meta.get("labels")
    if not isinstance(raw, dict) or not raw:
        raise InputError("dataset.json has no 'labels' mapping")
    try:
        if all(str(k).isdigit() for k in raw):  # v1: {"0": "background", "1": "tumour"}
            labels = {int(k): str(v) for k, v in raw.items()}
        else:  # v2: {"background": 0, "tumour": 1}
            labels = {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError):
        raise InputError(f"dataset.json: cannot read labels {raw}") from None
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise InputError(f"dataset.json: labels must be 0..C-1 with background 0 and at least one class, got {labels}")
    return labels
