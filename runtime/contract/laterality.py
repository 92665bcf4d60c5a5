"""Left and right: which labels are one organ's two sides, and which array axis runs left-right.

A mirror image along the patient's left-right axis turns a right parotid into a left one. Training
that flips that axis without swapping the pair teaches the model that the two sides are one class
half the time, and test-time mirroring that does not swap them averages the sides together. Both
therefore swap each pair whenever the lateral axis is flipped.

Pairs are found from the label names: two names that differ only by a side word (``Left``/``Right``,
``L``/``R``, ``Lt``/``Rt``, as a prefix or a suffix, in any case or separator) are a pair:
``LeftParotid``/``RightParotid``, ``Parotid_L``/``Parotid_R``, ``kidney left``/``kidney right``.
"""

from __future__ import annotations

import re

SIDES = {"left": "L", "l": "L", "lt": "L", "right": "R", "r": "R", "rt": "R"}
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def _side_and_rest(name: str) -> tuple[str, tuple[str, ...]] | None:
    """The side a name carries and its other words, or None when it carries no side (or two)."""
    words = [w.lower() for w in _WORDS.findall(name)]
    sides = [(i, SIDES[w]) for i, w in enumerate(words) if w in SIDES and i in (0, len(words) - 1)]
    if len(sides) != 1 or len(words) < 2:
        return None
    i, side = sides[0]
    return side, tuple(w for j, w in enumerate(words) if j != i)


def lateral_pairs(labels: dict[int, str]) -> tuple[tuple[int, int], ...]:
    """The ``(left, right)`` label index pairs among ``labels`` (background 0 never pairs)."""
    by_rest: dict[tuple[str, ...], dict[str, list[int]]] = {}
    for k in sorted(labels):
        found = _side_and_rest(labels[k]) if k else None
        if found is not None:
            by_rest.setdefault(found[1], {}).setdefault(found[0], []).append(k)
    return tuple(
        (sides["L"][0], sides["R"][0])
        for sides in by_rest.values()
        if len(sides.get("L", ())) == 1 and len(sides.get("R", ())) == 1
    )


def swap_permutation(num_classes: int, pairs: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """``perm`` with ``perm[k]`` the class that ``k`` becomes in a left-right mirror image."""
    perm = list(range(num_classes))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


def lateral_axis(orientation: str | None) -> int | None:
    """The array axis ``(z, y, x) = (0, 1, 2)`` that runs left-right in data of ``orientation`` (a
    SimpleITK code such as ``LPS``, whose letters name the image axes x, y, z); None without one."""
    if orientation is None:
        return None
    index = next(i for i, c in enumerate(orientation.upper()) if c in "LR")
    return 2 - index
