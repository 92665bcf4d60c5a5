"""Predictions against reference labels, folder against folder: Dice, HD95 (mm) and volumes (ml)
per case and label (``imunet-evaluate``).

Files are paired by case name: nnU-Net's ``CASE_0000`` image naming, ``CASE`` label naming and
our ``CASE_seg`` outputs all reduce to ``CASE``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..contract.label_names import dataset_labels
from ..errors import ImunetError, InputError
from ..imaging import formats
from ..imaging.formats import CHANNEL_SUFFIX, SEG_STEM_SUFFIX
from ..imaging.io import image_suffix, read_image
from ..imaging.metrics import dice, hd95


def case_name(path: Path) -> str:
    """``CASE`` for ``CASE.nii.gz``, ``CASE_0000.nii.gz`` and ``CASE_seg.nii.gz``."""
    return formats.case_name(path, (CHANNEL_SUFFIX, SEG_STEM_SUFFIX))


def _cases(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    return {case_name(p): p for p in sorted(folder.iterdir()) if image_suffix(p) and not p.name.startswith(".")}


def pair_folders(references: Path, predictions: Path) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """``(case, reference, prediction)`` for every reference with a prediction, the cases predicted
    without a reference and those referenced without a prediction; an error when none pair."""
    refs, preds = _cases(references), _cases(predictions)
    pairs = [(case, r, preds[case]) for case, r in refs.items() if case in preds]
    if not pairs:
        raise InputError(f"no file in {predictions} pairs with a reference in {references} by case name")
    return pairs, sorted(set(preds) - set(refs)), sorted(set(refs) - set(preds))


def reference_labels(references: Path) -> dict[int, str] | None:
    """Label names from the ``dataset.json`` beside a ``labelsTr``-style folder, if there is a readable one."""
    path = references.resolve().parent / "dataset.json"
    try:
        return dataset_labels(json.loads(path.read_text())) if path.is_file() else None
    except (ImunetError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class CaseScore:
    case: str
    label: int
    name: str
    dice: float
    hd95_mm: float
    reference_ml: float
    prediction_ml: float


def score_case(case: str, reference: sitk.Image, prediction: sitk.Image, labels: dict[int, str]) -> list[CaseScore]:
    """Scores of one case for every foreground label; the two images must share a grid."""
    if reference.GetSize() != prediction.GetSize() or not np.allclose(
        reference.GetSpacing(), prediction.GetSpacing(), rtol=1e-4
    ):
        raise InputError(
            f"{case}: prediction grid {prediction.GetSize()} @ {prediction.GetSpacing()} differs from the "
            f"reference's {reference.GetSize()} @ {reference.GetSpacing()}"
        )
    ref = sitk.GetArrayFromImage(reference).astype(np.int64)
    pred = sitk.GetArrayFromImage(prediction).astype(np.int64)
    spacing_zyx = reference.GetSpacing()[::-1]
    ml = float(np.prod(reference.GetSpacing())) / 1000.0
    return [
        CaseScore(
            case,
            k,
            name,
            dice(pred, ref, k),
            hd95(pred, ref, k, spacing_zyx),
            float((ref == k).sum()) * ml,
            float((pred == k).sum()) * ml,
        )  # fmt: skip
        for k, name in labels.items()
        if k != 0
    ]


def score_pairs(pairs: list[tuple[str, Path, Path]], labels: dict[int, str] | None = None) -> list[CaseScore]:
    """Score every ``(case, reference, prediction)`` of :func:`pair_folders`; ``labels`` ``{index: name}``
    default to the values found in each reference."""
    out = []
    for case, r, p in pairs:
        ref, pred = read_image(r), read_image(p)
        names = labels or {int(v): str(int(v)) for v in np.unique(sitk.GetArrayViewFromImage(ref))}
        out.extend(score_case(case, ref, pred, names))
    return out


def summary(scores: list[CaseScore]) -> dict[str, dict[str, float]]:
    """Per label name: mean and standard deviation of Dice, mean HD95 over the cases where it is
    defined (and how many were not), mean volumes."""
    out = {}
    for name in dict.fromkeys(s.name for s in scores):
        rows = [s for s in scores if s.name == name]
        d = [s.dice for s in rows]
        h = [s.hd95_mm for s in rows if np.isfinite(s.hd95_mm)]
        out[name] = {
            "dice_mean": float(np.mean(d)),
            "dice_std": float(np.std(d)),
            "hd95_mean": float(np.mean(h)) if h else float("nan"),
            "hd95_undefined": len(d) - len(h),
            "cases": len(rows),
        }
    return out


def to_csv(scores: list[CaseScore]) -> str:
    """One row per case and label, with a header."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CaseScore.__dataclass_fields__))
    writer.writeheader()
    for s in scores:
        row = asdict(s)
        row.update({k: f"{v:.6g}" for k, v in row.items() if isinstance(v, float)})
        writer.writerow(row)
    return buf.getvalue()
