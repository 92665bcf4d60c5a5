"""Fitting a bundle's per-class logit offsets (manifest ``inference.logit_offsets``) on labelled cases.

Training draws points class-balanced, so a small organ is seen far more often than it occurs and
the decoder's probabilities do not sit where the validation Dice is best: on the head-and-neck
model the spinal cord scored 0.606 at the argmax and 0.666 with its logit raised by 0.5
(docs/DESIGN-NOTES.md, "Logit offsets"). An offset per class, added to the log of its smoothed
probability when the label is chosen, moves each organ's threshold without retraining.

Each case is segmented once, without offsets, keeping its smoothed class probabilities; the
offsets are then chosen by coordinate ascent over a grid, a class at a time, to maximise the mean
over classes of the mean Dice over the cases where that class is annotated. Among offsets within
``TOLERANCE`` of the best, the one nearest 0 is kept: the curves are flat near their peak, and a
smaller shift moves less on scans unlike the validation cases. The runtime applies the offsets
where this search does, to the smoothed probabilities where the label is chosen; the search
leaves out the largest-component post-processing, so the figures to quote are the runtime's own
on the cases (``tools/evaluate.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imunet.runtime.errors import InputError
from imunet.runtime.imaging.io import read_image
from imunet.runtime.kernels.labels import choose_labels

GRID = tuple(np.round(np.arange(-2.0, 2.001, 0.25), 2))  # offsets tried per class (natural-log units)
TOLERANCE = 0.002  # mean Dice within this of the best counts as the best
ROUNDS = 2
CANDIDATE = 0.005  # voxels where every organ's probability is under this keep their label


@dataclass
class CaseProbabilities:
    """One labelled case: the voxels some organ could claim (flat indices), their class
    probabilities ``(C, N)``, the labels elsewhere, the reference labels and the classes scored."""

    name: str
    index: np.ndarray
    probs: np.ndarray
    base: np.ndarray
    truth: np.ndarray
    scored: tuple[int, ...]

    def labels(self, offsets: np.ndarray) -> np.ndarray:
        """The flat label map with each class's probabilities scaled by ``exp(offset)``."""
        out = self.base.copy()
        out[self.index] = choose_labels(self.probs, tuple(float(v) for v in offsets))
        return out


def case_probabilities(name: str, probs: np.ndarray, truth: np.ndarray, scored: Sequence[int]) -> CaseProbabilities:
    """Keep what the search needs of one case's ``(C, Z, Y, X)`` probabilities and its ``truth``."""
    if probs.shape[1:] != truth.shape:
        raise InputError(f"{name}: the reference labels' grid {truth.shape} is not the scan's {probs.shape[1:]}")
    flat = probs.reshape(probs.shape[0], -1)
    index = np.flatnonzero((flat[1:] >= CANDIDATE).any(0))
    base = flat.argmax(0).astype(np.uint8)
    return CaseProbabilities(name, index, flat[:, index].astype(np.float32), base, truth.ravel(), tuple(scored))


def per_class_dice(cases: Sequence[CaseProbabilities], offsets: np.ndarray, classes: int) -> dict[int, float]:
    """Per foreground class, its mean Dice over the cases that score it (classes no case scores omitted)."""
    scores: dict[int, list[float]] = {k: [] for k in range(1, classes)}
    for case in cases:
        labels = case.labels(offsets)
        for k in case.scored:
            pred, ref = labels == k, case.truth == k
            total = int(pred.sum()) + int(ref.sum())
            scores[k].append(2.0 * int((pred & ref).sum()) / total if total else 1.0)
    return {k: float(np.mean(v)) for k, v in scores.items() if v}


def fit_offsets(
    cases: Sequence[CaseProbabilities], classes: int, log: Callable[[str], None] | None = None
) -> tuple[np.ndarray, dict[int, float], dict[int, float]]:
    """Offsets ``(C,)`` (background 0) maximising the mean per-class Dice over ``cases``, with the
    per-class Dice before and after."""
    offsets = np.zeros(classes)

    def objective(o: np.ndarray) -> float:
        return float(np.mean(list(per_class_dice(cases, o, classes).values())))

    before = per_class_dice(cases, offsets, classes)
    for _ in range(ROUNDS):
        for k in range(1, classes):
            trials = []
            for value in GRID:
                o = offsets.copy()
                o[k] = value
                trials.append(objective(o))
            best = max(trials)
            near = [(abs(v), v, t) for v, t in zip(GRID, trials) if t >= best - TOLERANCE]
            _, offsets[k], kept = min(near)
            if log is not None:
                log(f"  class {k}: offset {offsets[k]:+.2f} (mean Dice {kept:.4f}; best {best:.4f})")
    return offsets, before, per_class_dice(cases, offsets, classes)


def collect(
    segmenter: object,
    pairs: Sequence[tuple[str, Path, Path]],
    annotated: dict[str, list[str]] | None,
    progress: Callable[[str], None] | None = None,
) -> list[CaseProbabilities]:
    """Segment each ``(case, image, label)`` with ``segmenter`` (an :class:`imunet.runtime.Segmenter`
    without offsets) and keep its probabilities on the scan's grid beside its reference labels."""
    names = segmenter.bundle.manifest.labels  # type: ignore[attr-defined]
    out = []
    for case, image_path, label_path in pairs:
        result = segmenter.segment(image_path, probabilities=True)  # type: ignore[attr-defined]
        truth = np.rint(sitk.GetArrayFromImage(read_image(label_path))).astype(np.uint8)
        scored = [k for k, n in names.items() if k and (annotated is None or n in annotated.get(case, ()))]
        out.append(case_probabilities(case, result.probabilities, truth, scored))
        del result
        if progress is not None:
            progress(case)
    return out
