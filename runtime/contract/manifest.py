"""The bundle manifest, ``manifest.json``: one typed contract that the exporter writes and every
backend reads. JSON Schema: ``schema/manifest.schema.json`` (a test keeps the two in step).

Every class converts with ``to_dict`` / ``from_dict``; arrays are ``(Z, Y, X)``, spacing is
SimpleITK's ``(x, y, z)`` in mm. Nothing here imports an inference loop.
"""

from __future__ import annotations

import math
import types
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..imaging.domain import Fingerprint
from ..imaging.orientation import check_code
from ..imaging.prepare import Preprocessing
from ..imaging.preprocess import Normalization
from .kinds import ModelKind, model_kind
from .quality_model import QualityModel
from .settings import InferenceSettings

SCHEMA_PATH = Path(__file__).parents[1] / "schema" / "manifest.schema.json"
FORMAT = "imunet-bundle"
FORMAT_VERSION = 1
OPSET = 17  # the ONNX opset imunet-export writes
MAX_PATCH_SIDE, MAX_PATCH = 1024, 1 << 26  # bounds on a manifest's patch: 64 M voxels, 256 MB in float32
MAX_POINTS = 65536  # decoder points per call a bundle promises unless exported otherwise
FEATURE_LAYOUTS = ("channels_first", "channels_last")
COORDINATES = (
    "points are voxel indices (z, y, x) in the patch; normalised inside the graph to 2 * p / (S - 1) - 1 "
    "per axis, S the patch size"
)


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the bundle: its file (relative to the bundle) and its I/O shapes."""

    file: str
    inputs: dict[str, tuple[Any, ...]]
    outputs: dict[str, tuple[Any, ...]]
    features: tuple[str, ...] = ()  # decoder: the feature-map inputs, in level order


@dataclass(frozen=True)
class EncoderSpec:
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    convs_per_block: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecoderSpec:
    """The implicit decoder's input contract and size."""

    pe_frequencies: int
    gather: str
    width: int
    depth: int
    max_points: int = MAX_POINTS
    feature_layout: tuple[str, ...] = ()  # one per level: channels_first or channels_last
    points_dtype: str = "int32"
    coordinates: str = COORDINATES


@dataclass(frozen=True)
class Provenance:
    dataset: str
    versions: dict[str, str]
    date: str
    run: str = ""
    commit: str | None = None
    train_steps: int | None = None
    training_cases: tuple[str, ...] = ()  # the cases it trained on: scoring on them overstates accuracy


@dataclass(frozen=True)
class Variant:
    """Another graph that can replace ``replaces`` (e.g. an int8 or fp16 decoder), with its parity."""

    file: str
    replaces: str
    precision: str
    backend: str
    parity: dict[str, Any]
    quantization: str | None = None


@dataclass(frozen=True)
class EngineRecord:
    """A set of TensorRT engines under ``dir`` and what they were built for."""

    dir: str
    gpu: str
    compute_capability: str
    tensorrt: str
    precision: str
    graphs_sha256: dict[str, str]
    points_profile: tuple[int, int, int] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] | None = None


@dataclass(frozen=True)
class Manifest:
    """A bundle's ``manifest.json``, typed. ``notes`` (not serialised) lists what a reader ignored."""

    model_kind: str
    labels: dict[int, str]
    modality: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    normalization: Normalization
    encoder: EncoderSpec
    graphs: dict[str, GraphSpec]
    inference: InferenceSettings
    provenance: Provenance
    parity: dict[str, Any]
    decoder: DecoderSpec | None = None
    orientation: str | None = None  # the training data's axis order and directions (absent: none applied)
    fingerprint: Fingerprint | None = None  # what the model is for (absent: no domain checks)
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # array axes the training flipped (test-time mirroring uses them)
    # (left, right) label pairs that swap in a left-right mirror image (training and test-time mirroring)
    lateral_pairs: tuple[tuple[int, int], ...] = ()
    keep_largest: tuple[int, ...] = ()  # labels reduced to their largest component (decided on validation)
    # coded concepts per label for DICOM SEG: {"category"|"type": {"scheme", "value", "meaning"}}
    label_codes: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)
    # measured accuracy: {"dice": {label name: mean Dice}, "mean": mean over labels, "cases": {label name:
    # validation cases that scored it}, "note": how and on what it was measured}
    accuracy: dict[str, Any] = field(default_factory=dict)
    # the per-scan Dice estimate: training label volumes and the calibration fitted at export
    quality: QualityModel | None = None
    opset: int = OPSET
    variants: dict[str, Variant] = field(default_factory=dict)
    engines: tuple[EngineRecord, ...] = ()
    tensorrt_ops_checked: bool = False
    files: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    spacing_order: str = "x, y, z (SimpleITK), mm"
    array_order: str = "z, y, x"
    notes: tuple[str, ...] = field(default=(), compare=False, metadata={"serialise": False})

    def __post_init__(self) -> None:
        kind = model_kind(self.model_kind)
        if sorted(self.labels) != list(range(len(self.labels))) or not 2 <= len(self.labels) <= 256:
            raise ValueError(f"labels must be 0..C-1 with 2 <= C <= 256 (uint8 label maps), got {self.labels}")
        if any(not 1 <= p <= MAX_PATCH_SIDE for p in self.patch_size) or math.prod(self.patch_size) > MAX_PATCH:
            raise ValueError(
                f"patch_size {self.patch_size}: each side 1..{MAX_PATCH_SIDE} and at most {MAX_PATCH} voxels"
            )
        if any(not (math.isfinite(s) and 1e-3 <= s <= 1e3) for s in self.spacing):
            raise ValueError(f"spacing {self.spacing}: each between 0.001 and 1000 mm")
        missing = [g for g in kind.graphs if g not in self.graphs]
        if missing:
            raise ValueError(f"a {self.model_kind} bundle needs the graphs {', '.join(missing)}")
        if kind.decodes_points and self.decoder is None:
            raise ValueError("an implicit bundle's manifest needs its 'decoder' section")
        for name, v in self.variants.items():
            if v.replaces not in self.graphs:
                raise ValueError(f"variant {name} replaces {v.replaces!r}, which is not a graph of the bundle")
        if self.orientation is not None:
            check_code(self.orientation)
        if self.inference.logit_offsets and len(self.inference.logit_offsets) != len(self.labels):
            raise ValueError(
                f"inference.logit_offsets has {len(self.inference.logit_offsets)} values for {len(self.labels)} classes"
            )
        if any(k not in self.labels or k == 0 for k in self.keep_largest):
            raise ValueError(f"keep_largest names labels the model does not have: {self.keep_largest}")
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ValueError(f"mirror_axes must be array axes 0, 1, 2, got {self.mirror_axes}")
        paired = [k for pair in self.lateral_pairs for k in pair]
        if any(k not in self.labels or k == 0 for k in paired) or len(set(paired)) != len(paired):
            raise ValueError(f"lateral_pairs must pair distinct foreground labels, got {self.lateral_pairs}")
        if paired and self.orientation is None:
            raise ValueError("lateral_pairs needs the manifest's orientation, to know which axis runs left-right")
        if self.quality is not None:
            names = set(self.labels.values())
            stray = [n for n in (*self.quality.label_volumes, *self.quality.label_bias) if n not in names]
            if stray:
                raise ValueError(f"quality names labels the model does not have: {stray}")
        bad = [x for x in self.feature_layout if x not in FEATURE_LAYOUTS]
        if bad or len(self.feature_layout) != len(self.feature_names):
            raise ValueError(f"decoder.feature_layout {self.feature_layout} does not fit {self.feature_names}")

    @property
    def kind(self) -> ModelKind:
        """The model kind: what the bundle holds and how a backend runs it."""
        return model_kind(self.model_kind)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.graphs["decoder"].features if "decoder" in self.graphs else ()

    @property
    def feature_layout(self) -> tuple[str, ...]:
        """How each level's feature map passes from encoder to decoder."""
        return self.decoder.feature_layout if self.decoder else ()

    @property
    def max_points(self) -> int:
        return self.decoder.max_points if self.decoder else 0

    @property
    def preprocessing(self) -> Preprocessing:
        """What the model expects of its input, as training described it (one object for both)."""
        return Preprocessing(self.spacing, self.normalization, self.orientation, self.fingerprint)

    def describe(self) -> str:
        """What the model is for, in a few words (the run header's line)."""
        if self.fingerprint is None:
            return f"{self.provenance.dataset} {self.modality}".strip()
        return self.fingerprint.describe(self.provenance.dataset)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``None`` fields are left out)."""
        return _to_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse a manifest dict; ``ValueError`` (with the field) for anything missing or malformed."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not an imunet bundle manifest (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"bundle format version {data.get('format_version')} is not supported by this runtime "
                f"(supports {FORMAT_VERSION}); re-export it with a matching imunet-export"
            )
        data = dict(data)
        data["inference"] = InferenceSettings.from_dict(dict(_need(data, "inference", "manifest")))
        return _from_mapping(cls, data, "manifest", [])


def _to_json(value: Any) -> Any:
    if isinstance(value, InferenceSettings | Normalization):
        return value.to_dict()
    if is_dataclass(value):
        out = {}
        for f in fields(value):
            v = getattr(value, f.name)
            if f.metadata.get("serialise", True) and v is not None:
                out[f.name] = _to_json(v)
        return out
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


def _need(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ValueError(f"{where} lacks '{key}'")
    return data[key]


def _from_mapping(cls: type, data: Any, where: str, notes: list[str] | None = None) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.metadata.get("serialise", True)}
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in known:
            continue
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{where} lacks '{f.name}'")
    if notes is not None:
        notes.extend(f"{where} key '{k}' is not known to this runtime and was ignored" for k in data if k not in known)
        kwargs["notes"] = tuple(notes)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or isinstance(value, tp if isinstance(tp, type) and is_dataclass(tp) else ()):
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where)
    if tp is Normalization:
        return Normalization.from_dict(value)
    if is_dataclass(tp):
        return _from_mapping(tp, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping")
        key = (lambda k: int(k) if isinstance(k, str) and k.isdigit() else k) if args[0] is int else (lambda k: k)
        return {_convert(args[0], key(k), where): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{where} must have {len(args)} entries, got {len(value)}")
        return tuple(_convert(a, v, where) for a, v in zip(args, value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} must be a number, got {value!r}")
        converted = tp(value)
        if tp is int and converted != float(value):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return converted
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: no conversion for {tp}")  # a programming error in the dataclasses above
