"""Calibrating a bundle's per-scan Dice estimate (manifest ``quality``) on labelled cases.

The bundle segments each validation case through the runtime exactly as ``imunet-run`` would; the
features of every label (:mod:`imunet.runtime.app.quality`) are paired with the Dice the label
really scored. A linear model (ridge least squares) maps features to Dice; which features it uses,
and whether each label gets its own offset, is chosen by leave-one-scan-out error of the per-scan
mean estimate, the figure a reviewer sorts by: the fewest parameters within one standard error of
the lowest. The training cases' label volumes are summarised for
the ``volume_z`` feature and for labels a scan's map does not hold.

Partially annotated data (``annotated.json`` beside ``dataset.json``): a label is scored only on
the cases that contoured it, and its volumes are taken only from those.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from imunet.runtime.app.quality import absent_estimate, volume_z
from imunet.runtime.contract.quality_model import FEATURES, LabelVolumes, QualityModel
from imunet.runtime.errors import InputError
from imunet.runtime.imaging.io import image_suffix, read_image
from imunet.runtime.imaging.metrics import dice

RIDGE_FEATURES = 1e-3  # shrinkage of the feature weights (features are in 0..1 or 0..5)
MIN_CASES = 5  # fewer validation cases cannot rank anything
RIDGE_LABELS = 2.0  # shrinkage of per-label offsets toward 0: a label seen in few cases keeps little of its own


@dataclass(frozen=True)
class Observation:
    """One label of one validation case: the Dice it scored, its features (None: the map did not hold
    it) and, when it is empty, its probability mass (the voxels the model expected of it)."""

    case: str
    label: str
    dice: float
    features: dict[str, float] | None
    mass: float = 0.0


def dataset_pairs(dataset: Path, cases: Iterable[str]) -> list[tuple[str, Path, Path]]:
    """``(case, image, label)`` of each case in an MSD / nnU-Net layout dataset."""
    images, labels = dataset / "imagesTr", dataset / "labelsTr"
    found = {}
    for p in sorted(images.iterdir()) if images.is_dir() else []:
        suffix = image_suffix(p)
        if suffix:
            stem = p.name[: -len(suffix)]
            found[stem[:-5] if stem.endswith("_0000") else stem] = (p, labels / f"{stem.removesuffix('_0000')}{suffix}")
    missing = [c for c in cases if c not in found or not found[c][1].is_file()]
    if missing:
        raise InputError(
            f"{dataset}: no image and label for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        )
    return [(c, *found[c]) for c in cases]


def annotated_labels(dataset: Path) -> dict[str, list[str]] | None:
    """Per case, the label names contoured (``annotated.json``), or None for a fully annotated dataset."""
    path = dataset / "annotated.json"
    return json.loads(path.read_text()) if path.is_file() else None


def training_volumes(
    dataset: Path, cases: Sequence[str], names: dict[int, str], annotated: dict[str, list[str]] | None = None
) -> dict[str, LabelVolumes]:
    """Per foreground label name, its volume (ml) over the training ``cases`` that contoured it."""
    ml: dict[str, list[float]] = {n: [] for k, n in names.items() if k}
    for case, _, label_path in dataset_pairs(dataset, cases):
        label = read_image(label_path)
        values = np.rint(sitk.GetArrayViewFromImage(label)).astype(np.int64).ravel()  # label maps stored as floats too
        counts = np.bincount(values[(values >= 0) & (values < len(names))], minlength=len(names))
        voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
        for k, name in names.items():
            if k and (annotated is None or name in annotated.get(case, ())):
                ml[name].append(float(counts[k]) * voxel_ml)
    out = {}
    for name, values in ml.items():
        present = np.log([v for v in values if v > 0]) if any(v > 0 for v in values) else np.zeros(0)
        out[name] = LabelVolumes(
            cases=len(values),
            absent=sum(v == 0 for v in values),
            log_mean=float(present.mean()) if len(present) else 0.0,
            log_std=float(present.std()) if len(present) > 1 else 0.0,
        )
    return out


def observe(
    segmenter: object,
    dataset: Path,
    cases: Sequence[str],
    annotated: dict[str, list[str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Observation]:
    """Segment each case with ``segmenter`` (a :class:`imunet.runtime.Segmenter`) and pair each scored
    label's features with its true Dice."""
    m = segmenter.bundle.manifest  # type: ignore[attr-defined]
    segmenter.every_quality_feature = True  # type: ignore[attr-defined]
    out = []
    for case, image_path, label_path in dataset_pairs(dataset, cases):
        result = segmenter.segment(image_path)  # type: ignore[attr-defined]
        pred = sitk.GetArrayFromImage(result.labels)
        ref = sitk.GetArrayFromImage(read_image(label_path))
        if pred.shape != ref.shape:
            raise InputError(f"{case}: the label map's grid {ref.shape} is not the image's {pred.shape}")
        q = result.quality
        for k, name in m.labels.items():
            if k == 0 or (annotated is not None and name not in annotated.get(case, ())):
                continue
            out.append(Observation(case, name, dice(pred, ref, k), q.features.get(name), q.empty.get(name, 0.0)))
        if progress is not None:
            progress(case)
    return out


@dataclass(frozen=True)
class Spec:
    """A candidate calibration: which features, and whether each label gets an offset; ``identity`` is
    the soft Dice taken as it is (nothing fitted)."""

    features: tuple[str, ...]
    label_offsets: bool
    identity: bool = False


IDENTITY = Spec(("soft_dice",), False, identity=True)


def _design(obs: Sequence[Observation], spec: Spec, labels: Sequence[str]) -> np.ndarray:
    cols = [[1.0] * len(obs)]
    cols += [[o.features[f] for o in obs] for f in spec.features]  # type: ignore[index]
    if spec.label_offsets:
        cols += [[1.0 if o.label == name else 0.0 for o in obs] for name in labels]
    return np.asarray(cols, dtype=np.float64).T


def _solve(obs: Sequence[Observation], spec: Spec, labels: Sequence[str]) -> np.ndarray:
    if spec.identity:
        return np.array([0.0, 1.0])
    x, y = _design(obs, spec, labels), np.array([o.dice for o in obs])
    penalty = np.array(
        [0.0] + [RIDGE_FEATURES] * len(spec.features) + [RIDGE_LABELS] * (x.shape[1] - 1 - len(spec.features))
    )
    return np.linalg.solve(x.T @ x + np.diag(penalty), x.T @ y)


def _predict(
    obs: Sequence[Observation], spec: Spec, labels: Sequence[str], coef: np.ndarray, volumes: QualityModel
) -> np.ndarray:
    present = [o for o in obs if o.features is not None]
    values = iter(np.clip(_design(present, spec, labels) @ coef, 0.0, 1.0) if present else [])
    return np.array(
        [next(values) if o.features is not None else absent_estimate(o.label, o.mass, volumes) for o in obs]
    )


def per_scan(obs: Sequence[Observation], estimates: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Cases, their mean true Dice and their mean estimate, over the labels scored in each."""
    cases = list(dict.fromkeys(o.case for o in obs))
    true = np.array([np.mean([o.dice for o in obs if o.case == c]) for c in cases])
    est = np.array([np.mean([e for o, e in zip(obs, estimates) if o.case == c]) for c in cases])
    return cases, true, est


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts
    return (first + (counts - 1) / 2)[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 values or a constant."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(ranks(np.asarray(a, float)), ranks(np.asarray(b, float)))[0, 1])


def leave_one_scan_out(
    obs: Sequence[Observation], spec: Spec, labels: Sequence[str], volumes: QualityModel
) -> np.ndarray:
    """Each observation's estimate from a fit on every other case."""
    est = np.zeros(len(obs))
    for case in dict.fromkeys(o.case for o in obs):
        train = [o for o in obs if o.case != case and o.features is not None]
        idx = [i for i, o in enumerate(obs) if o.case == case]
        coef = _solve(train, spec, labels)
        est[idx] = _predict([obs[i] for i in idx], spec, labels, coef, volumes)
    return est


def scores(obs: Sequence[Observation], estimates: np.ndarray) -> dict[str, float]:
    """Per-scan Spearman and mean absolute error of the mean estimate, and per-label MAE."""
    _, true, est = per_scan(obs, estimates)
    return {
        "scans": len(true),
        "spearman": round(spearman(est, true), 4),
        "mae": round(float(np.abs(est - true).mean()), 4),
        "label_mae": round(float(np.mean([abs(e - o.dice) for o, e in zip(obs, estimates)])), 4),
    }


def candidates() -> list[Spec]:
    """The soft Dice as it is, and every feature subset that holds a soft Dice, fitted with and
    without per-label offsets."""
    out = [IDENTITY]
    for r in range(1, len(FEATURES) + 1):
        for subset in combinations(FEATURES, r):
            if "soft_dice" in subset or "soft_dice_near" in subset:
                out += [Spec(subset, False), Spec(subset, True)]
    return out


def fit(
    obs: Sequence[Observation], label_volumes: dict[str, LabelVolumes], note: str, labels: Sequence[str]
) -> QualityModel:
    """The candidate with the fewest parameters among those whose leave-one-scan-out per-scan MAE is
    within one standard error of the lowest, refitted on every case, as a :class:`QualityModel`
    whose ``calibration`` records the check of the chosen candidate and of the uncalibrated soft
    Dice."""
    obs = [with_volume_z(o, label_volumes) for o in obs]
    present = [o for o in obs if o.features is not None]
    cases = {o.case for o in obs}
    if len(cases) < MIN_CASES or len(present) < 2 * MIN_CASES:
        raise InputError(
            f"calibrating the Dice estimate needs at least {MIN_CASES} cases and {2 * MIN_CASES} labels found; "
            f"got {len(cases)} cases, {len(present)} labels found"
        )
    volumes = QualityModel(label_volumes=label_volumes)
    raw = np.array([o.features["soft_dice"] if o.features else absent_estimate(o.label, o.mass, volumes) for o in obs])
    tried = []
    for spec in candidates():
        est = leave_one_scan_out(obs, spec, labels, volumes)
        _, true, mean_est = per_scan(obs, est)
        err = np.abs(mean_est - true)
        tried.append((float(err.mean()), float(err.std(ddof=1) / np.sqrt(len(err))), scores(obs, est), spec))
    best_score, best = _simplest_within_one_error(tried, len(labels))
    coef = _solve(present, best, labels)
    n = len(best.features)
    offsets = {name: round(float(c), 6) for name, c in zip(labels, coef[1 + n :])} if best.label_offsets else {}
    return QualityModel(
        label_volumes=label_volumes,
        features=best.features,
        weights=tuple(round(float(w), 6) for w in coef[1 : 1 + n]),
        bias=round(float(coef[0]), 6),
        label_bias=offsets,
        calibration={
            "note": note,
            "cases": len(cases),
            "labels_scored": len(obs),
            "leave_one_scan_out": best_score,
            "uncalibrated_soft_dice": scores(obs, raw),
            "candidates": len(tried),
            "chosen": {"features": list(best.features), "label_offsets": best.label_offsets, "identity": best.identity},
            "chosen_by": "fewest parameters within one standard error of the lowest leave-one-scan-out MAE",
        },
    )


def parameters(spec: Spec, n_labels: int) -> int:
    """The numbers a candidate fits: a bias, a weight per feature, an offset per label (none for the
    identity)."""
    return 0 if spec.identity else 1 + len(spec.features) + (n_labels if spec.label_offsets else 0)


def _simplest_within_one_error(tried: Sequence[tuple[float, float, dict, Spec]], n_labels: int) -> tuple[dict, Spec]:
    """Of ``(mae, its standard error, scores, spec)``: the candidate with the fewest parameters whose
    leave-one-scan-out MAE is within one standard error of the lowest (the lower MAE among equals).
    Forty validation scans cannot tell apart candidates closer than that, and the larger ones carried
    over worse to another model: on the hippocampus, a calibration with the volume distance and
    label offsets ranked a second twin's scans at 0.26 against the soft Dice alone's 0.33
    (docs/DESIGN-NOTES.md, "The Dice estimate")."""
    lowest, error = min((t[0], t[1]) for t in tried)
    near = [t for t in tried if t[0] <= lowest + error]
    _, _, score, spec = min(near, key=lambda t: (parameters(t[3], n_labels), t[0]))
    return score, spec


def with_volume_z(o: Observation, label_volumes: dict[str, LabelVolumes]) -> Observation:
    """``o`` with ``volume_z`` measured against ``label_volumes`` (the segmenter had none yet)."""
    if o.features is None:
        return o
    z = volume_z(o.features["volume_ml"], label_volumes.get(o.label))
    return replace(o, features={**o.features, "volume_z": z})


def parse_cases(text: str) -> list[str]:
    """``a,b,c`` or ``@split.json:val`` (a list under a key of a JSON file) or ``@cases.txt`` (one per line)."""
    if not text.startswith("@"):
        return [c.strip() for c in text.split(",") if c.strip()]
    path, _, key = text[1:].partition(":")
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--cases {text}: {p} is not a file")
    if p.suffix == ".json":
        data = json.loads(p.read_text())
        if key:
            if not isinstance(data, dict) or key not in data:
                raise InputError(f"--cases {text}: {p} has no list '{key}'")
            data = data[key]
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise InputError(f"--cases {text}: not a list of case names")
        return data
    return [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]


def calibrate(
    bundle_dir: Path,
    dataset: Path,
    val_cases: Sequence[str],
    training: Sequence[str],
    note: str,
    log: Callable[[str], None],
) -> QualityModel:
    """Fit the Dice estimate of the bundle at ``bundle_dir`` on ``val_cases`` of ``dataset`` (segmented
    with the runtime's defaults), with the label volumes of its ``training`` cases."""
    from imunet.runtime import Segmenter

    annotated = annotated_labels(dataset)
    with Segmenter(bundle_dir, backend="auto") as seg:
        names = seg.bundle.manifest.labels
        log(f"label volumes of {len(training)} training cases ...")
        volumes = training_volumes(dataset, training, names, annotated)
        log(f"segmenting {len(val_cases)} validation cases for the Dice estimate ...")
        done = [0]

        def tick(case: str) -> None:
            done[0] += 1
            if done[0] % 10 == 0 or done[0] == len(val_cases):
                log(f"  {done[0]}/{len(val_cases)} ({case})")

        obs = observe(seg, dataset, val_cases, annotated, tick)
    model = fit(obs, volumes, note, [names[k] for k in sorted(names) if k])
    s = model.calibration["leave_one_scan_out"]
    log(
        f"Dice estimate: {', '.join(model.features)}{' + label offsets' if model.label_bias else ''}; "
        f"leave-one-scan-out over {s['scans']} scans: Spearman {s['spearman']:.3f}, mean absolute error {s['mae']:.3f}"
    )
    return model


def borrowed(source_bundle: Path, dataset: Path, training: Sequence[str], names: dict[int, str]) -> QualityModel:
    """The calibration of another bundle (a split twin: the same recipe, trained without the
    validation cases) with the label volumes of this bundle's ``training`` cases of ``dataset``;
    the note says whose it is."""
    from imunet.runtime.contract.bundle import load_bundle

    source, source_name = load_bundle(source_bundle).manifest.quality, source_bundle.name
    if source is None or not source.calibrated:
        raise InputError(f"{source_name}: has no calibrated Dice estimate to borrow")
    label_volumes = training_volumes(dataset, training, names, annotated_labels(dataset))
    note = f"borrowed from {source_name}: {source.calibration.get('note', '')}".rstrip(": ")
    return replace(source, label_volumes=label_volumes, calibration={**source.calibration, "note": note})
