"""Datasets in the Medical Segmentation Decathlon / nnU-Net layout, preprocessed once and cached.

Preprocessing (resampling, normalisation) is the runtime's, so training and inference agree.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from imunet.runtime.contract.label_names import dataset_labels
from imunet.runtime.errors import InputError
from imunet.runtime.imaging.atomic import atomic_output
from imunet.runtime.imaging.domain import fingerprint, summarise
from imunet.runtime.imaging.io import read_image, to_array
from imunet.runtime.imaging.orientation import dominant_orientation, reorient
from imunet.runtime.imaging.prepare import Preprocessing, prepare, prepare_label
from imunet.runtime.imaging.preprocess import Normalization, ct_statistics


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetInfo:
    """What ``dataset.json`` and the folders say: labels ``{index: name}`` with 0 = background.

    ``annotated``: for a partially annotated dataset (an ``annotated.json`` beside ``dataset.json``
    listing per case the label names that were contoured), the label indices annotated per case; a
    case not listed there, or a dataset without the file, has every label annotated."""

    name: str
    root: Path
    labels: dict[int, str]
    modality: str
    cases: tuple[Case, ...]
    annotated: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def known(self, case: str) -> np.ndarray:
        """Which classes ``(C,)`` bool were annotated in ``case`` (background always)."""
        out = np.ones(len(self.labels), dtype=bool)
        if case in self.annotated:
            out[1:] = False
            out[list(self.annotated[case])] = True
        return out


ANNOTATED = "annotated.json"


def _annotated(root: Path, labels: dict[int, str], cases: list[Case]) -> dict[str, tuple[int, ...]]:
    """``annotated.json`` as label indices per case (empty when the dataset has no such file)."""
    path = root / ANNOTATED
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected {{case: [label names]}}, got a {type(raw).__name__}")
    index = {name: i for i, name in labels.items() if i}
    known_cases = {c.name for c in cases}
    out = {}
    for case, names in raw.items():
        if case not in known_cases:
            continue
        if not isinstance(names, list) or any(n not in index for n in names):
            raise InputError(f"{path}: {case}: {names!r} is not a list of label names from {sorted(index)}")
        out[case] = tuple(sorted(index[n] for n in names))
    return out


def read_dataset(root: str | Path) -> DatasetInfo:
    """Read an MSD (v1 ``training`` list) or nnU-Net v2 (``_0000`` naming) dataset folder."""
    root = Path(root)
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise InputError(f"{root}: no dataset.json (expected the MSD / nnU-Net layout)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{meta_path}: not valid JSON ({exc})") from None
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "unknown"}
    if len(channels) != 1:
        raise InputError(f"{root}: {len(channels)} input channels {channels}; imunet trains single-channel models")
    modality = str(next(iter(channels.values())))
    cases = []
    if meta.get("training"):  # MSD v1
        for entry in meta["training"]:
            image, label = root / entry["image"], root / entry["label"]
            name = label.name.split(".")[0]
            if not image.exists() and (root / "imagesTr" / f"{name}_0000{_ending(image.name)}").exists():
                image = root / "imagesTr" / f"{name}_0000{_ending(image.name)}"
            cases.append(Case(name, image, label))
    else:  # nnU-Net v2
        ending = meta.get("file_ending", ".nii.gz")
        for label in sorted((root / "labelsTr").glob(f"*{ending}")):
            if label.name.startswith("."):
                continue
            name = label.name[: -len(ending)]
            cases.append(Case(name, root / "imagesTr" / f"{name}_0000{ending}", label))
    missing = [str(c.image) for c in cases if not c.image.exists()]
    if missing:
        raise InputError(f"{root}: {len(missing)} images missing, e.g. {missing[0]}")
    if not cases:
        raise InputError(f"{root}: no training cases found in labelsTr/")
    labels = dataset_labels(meta)
    return DatasetInfo(
        str(meta.get("name", root.name)), root, labels, modality, tuple(cases), _annotated(root, labels, cases)
    )


def _ending(name: str) -> str:
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def read_split(spec: str | Path, cases: tuple[Case, ...]) -> tuple[list[str], list[str]]:
    """The (train, validation) case names of a split file, checked against the dataset's ``cases``:
    known, disjoint, training not empty. ``spec`` is a JSON object with ``train`` and ``val`` lists
    (a run's ``split.json``), or ``FILE:N`` for fold N of a list of such objects (nnU-Net's
    ``splits_final.json``)."""
    path, fold = Path(spec), None
    head, _, tail = str(spec).rpartition(":")
    if not path.is_file() and head and tail.isdigit():
        path, fold = Path(head), int(tail)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"split {spec}: cannot be read as JSON ({exc})") from exc
    if isinstance(data, list):
        if fold is None:
            raise ValueError(f"split {spec}: a list of {len(data)} folds; name one as {path}:N")
        if not 0 <= fold < len(data):
            raise ValueError(f"split {spec}: no fold {fold} (the file has folds 0 to {len(data) - 1})")
        data = data[fold]
    elif fold is not None:
        raise ValueError(f"split {spec}: {path} holds one split, not a list of folds")
    try:
        train, val = [str(n) for n in data["train"]], [str(n) for n in data["val"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"split {spec}: not a JSON object with 'train' and 'val' lists of case names") from exc
    known = {c.name for c in cases}
    unknown = [n for n in train + val if n not in known]
    if unknown:
        more = " ..." if len(unknown) > 5 else ""
        raise ValueError(f"split {spec}: {len(unknown)} cases not in the dataset: {', '.join(unknown[:5])}{more}")
    both = sorted(set(train) & set(val))
    if both:
        raise ValueError(f"split {spec}: {len(both)} cases in both train and val: {', '.join(both[:5])}")
    if not train:
        raise ValueError(f"split {spec}: no training cases")
    return sorted(set(train)), sorted(set(val))


def split_cases(cases: tuple[Case, ...], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic (train, validation) split of case names."""
    names = sorted(c.name for c in cases)
    random.Random(seed).shuffle(names)
    n_val = int(round(len(names) * val_fraction))
    if val_fraction > 0 and len(names) > 1:
        n_val = max(1, min(n_val, len(names) - 1))
    return sorted(names[n_val:]), sorted(names[:n_val])


#: What a run computes from its training data and the bundle carries: one description, shared with
#: the runtime (``runtime/imaging/prepare.py``).
DatasetStats = Preprocessing


def _orientation_of(path: Path) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection())


def compute_stats(info: DatasetInfo, cases: list[Case], seed: int = 0, samples_per_case: int = 10000) -> DatasetStats:
    """Dominant orientation, median spacing (after reorientation), the normalisation the modality
    calls for (CT: dataset-wide; else per image) and the training data's fingerprint."""
    rng = np.random.default_rng(seed)
    orientation = dominant_orientation(_orientation_of(c.image) for c in cases)
    is_ct = info.modality.strip().upper() == "CT"
    scheme = Normalization("ct", 0.0, 1.0, 0.0, 1.0) if is_ct else Normalization("zscore")
    spacings, values, summaries = [], [], []
    for case in cases:
        image = reorient(read_image(case.image), orientation)
        spacings.append(image.GetSpacing())
        summaries.append(summarise(image, scheme))
        if is_ct:
            label = reorient(read_image(case.label), orientation)
            fg = to_array(image)[to_array(label, np.uint8) > 0]
            if fg.size:
                values.append(rng.choice(fg, size=min(samples_per_case, fg.size), replace=False))
    spacing = tuple(float(s) for s in np.median(np.asarray(spacings), axis=0))
    norm = ct_statistics(np.concatenate(values)) if is_ct and values else Normalization("zscore")
    return DatasetStats(spacing, norm, orientation, fingerprint(info.modality, summaries, norm))  # type: ignore[arg-type]


def preprocess_case(case: Case, stats: DatasetStats) -> tuple[np.ndarray, np.ndarray]:
    """The runtime's preprocessing of the image (float32) and its labels taken along (uint8), both
    ``(Z, Y, X)``."""
    image = read_image(case.image)
    label = read_image(case.label)
    if image.GetSize() != label.GetSize():
        raise InputError(f"{case.name}: image size {image.GetSize()} != label size {label.GetSize()}")
    return prepare(image, stats).volume, prepare_label(label, stats)


class PreprocessedCache:
    """``(image, label)`` arrays per case, computed once into ``cache_dir`` and memory-mapped."""

    def __init__(self, cache_dir: Path, stats: DatasetStats) -> None:
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stats = stats
        stamp = self.dir / "stats.json"
        if stamp.exists() and json.loads(stamp.read_text()) != json.loads(json.dumps(stats.to_dict())):
            for f in self.dir.glob("*.npy"):  # preprocessed with other statistics: stale
                f.unlink(missing_ok=True)
        # Atomic: every process of a distributed run writes the same stamp, and another may be reading it.
        with atomic_output(stamp, overwrite=True) as tmp:
            tmp.write_text(json.dumps(stats.to_dict()))

    def get(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        img_p, lbl_p = self.dir / f"{case.name}_img.npy", self.dir / f"{case.name}_seg.npy"
        if not (img_p.exists() and lbl_p.exists()):
            img, lbl = preprocess_case(case, self.stats)
            for arr, p in ((img, img_p), (lbl, lbl_p)):
                with atomic_output(p, overwrite=True) as tmp:
                    np.save(tmp, arr)
        return np.load(img_p, mmap_mode="r"), np.load(lbl_p, mmap_mode="r")

    def load_all(self, cases: list[Case], progress: Callable[[int, int], None] | None = None):
        out = {}
        for i, case in enumerate(cases):
            out[case.name] = self.get(case)
            if progress:
                progress(i + 1, len(cases))
        return out


def _header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetSpacing()


def auto_patch_size(
    info: DatasetInfo, cap_zyx: tuple[int, int, int] = (96, 160, 160), multiple: int = 8, max_cases: int = 200
) -> tuple[int, int, int]:
    """nnU-Net's rule of thumb: the median case shape at the median spacing, ``(Z, Y, X)``,
    rounded up to a multiple of ``multiple`` and capped at ``cap_zyx`` (the paper's 96x160x160).

    Reads only the image headers.
    """
    headers = [_header(c.image) for c in info.cases[:max_cases]]
    spacing = np.median(np.asarray([h[1][:3] for h in headers]), axis=0)
    extents = np.asarray([np.asarray(h[0][:3]) * np.asarray(h[1][:3]) / spacing for h in headers])
    median_zyx = np.median(extents, axis=0)[::-1]
    rounded = [int(np.ceil(s / multiple) * multiple) for s in median_zyx]
    return tuple(max(multiple, min(r, c)) for r, c in zip(rounded, cap_zyx))  # type: ignore[return-value]
