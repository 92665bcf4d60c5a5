"""The model bundle: ``NAME.imunet/`` with ``manifest.json`` and the ONNX graphs (and engines).

A bundle is verified on load: format version, the sha256 of every file, labels against the
decoder's output width. Nothing is unpickled. The JSON Schema is ``schema/manifest.schema.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError
from .inference import InferenceSettings
from .preprocess import Normalization

INFERENCE_KEYS = (
    "mode",
    "overlap",
    "stride",
    "band",
    "sigma_scale",
    "smoothing",
    "halo",
    "confidence",
    "min_stride",
    "refine",
    "seam",
    "seam_rule",
    "boxes",
)

FORMAT = "imunet-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA_PATH = Path(__file__).parent / "schema" / "manifest.schema.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``; ``raw`` keeps every field, typed ones are read out."""

    raw: dict[str, Any]
    kind: str  # "implicit" | "unet"
    labels: dict[int, str]
    spacing: tuple[float, float, float]  # SimpleITK (x, y, z), mm
    patch_size: tuple[int, int, int]  # (Z, Y, X)
    normalization: Normalization
    inference: InferenceSettings
    feature_names: tuple[str, ...]
    max_points: int

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def feature_layout(self) -> tuple[str, ...]:
        """How each level's feature map passes from encoder to decoder; bundles written before the
        manifest recorded it are channels-first throughout."""
        recorded = self.raw.get("decoder", {}).get("feature_layout")
        return tuple(recorded) if recorded else ("channels_first",) * len(self.feature_names)


def _get(raw: dict[str, Any], key: str, where: str) -> Any:
    if key not in raw:
        raise BundleError(f"{where}: manifest lacks '{key}'")
    return raw[key]


def parse_manifest(raw: dict[str, Any], where: str = "bundle") -> Manifest:
    """Typed view of a manifest dict; :class:`BundleError` on anything missing or inconsistent."""
    if raw.get("format") != FORMAT:
        raise BundleError(f"{where}: not an imunet bundle manifest (format {raw.get('format')!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version} is not supported by this runtime "
            f"(supports {FORMAT_VERSION}); re-export it with a matching imunet-export"
        )
    try:
        labels = {int(k): str(v) for k, v in _get(raw, "labels", where).items()}
        if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
            raise BundleError(f"{where}: labels must be 0..C-1 with C >= 2, got {labels}")
        inf = dict(_get(raw, "inference", where))
        settings = InferenceSettings(**{k: inf[k] for k in INFERENCE_KEYS if k in inf})
        graphs = _get(raw, "graphs", where)
        kind = _get(raw, "model_kind", where)
        if kind not in ("implicit", "unet"):
            raise BundleError(f"{where}: unknown model_kind {kind!r}")
        decoder = raw.get("decoder", {})
        return Manifest(
            raw=raw,
            kind=kind,
            labels=labels,
            spacing=tuple(float(s) for s in _get(raw, "spacing", where)),  # type: ignore[arg-type]
            patch_size=tuple(int(p) for p in _get(raw, "patch_size", where)),  # type: ignore[arg-type]
            normalization=Normalization.from_dict(_get(raw, "normalization", where)),
            inference=settings,
            feature_names=tuple(graphs.get("decoder", {}).get("features", [])),
            max_points=int(decoder.get("max_points", 65536)),
        )
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{where}: malformed manifest ({exc})") from None


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: Manifest

    def graph(self, name: str) -> Path:
        """Path of graph ``name`` ("encoder", "decoder" or "model")."""
        graphs = self.manifest.raw["graphs"]
        if name not in graphs:
            raise BundleError(f"{self.path}: bundle has no '{name}' graph (it has {', '.join(graphs)})")
        return self.path / graphs[name]["file"]

    def variant(self, name: str) -> Path | None:
        """Path of the optional graph variant ``name`` (e.g. "decoder_int8"), or None."""
        entry = self.manifest.raw.get("variants", {}).get(name)
        return None if entry is None else self.path / entry["file"]


def verify_files(path: Path, files: dict[str, str]) -> None:
    """Check that every listed file exists and has the recorded sha256."""
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{path}: bundle file {name} is missing")
        if sha256_file(f) != digest:
            raise BundleError(
                f"{path}: {name} does not match its sha256 in the manifest; the bundle is corrupt or was modified"
            )


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read and verify a bundle directory (``verify=False`` skips the sha256 pass)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: not valid JSON ({exc})") from None
    manifest = parse_manifest(raw, str(path))
    files = raw.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: manifest lists no files with their sha256")
    for g in [*raw["graphs"].values(), *raw.get("variants", {}).values()]:
        if g.get("file") not in files:
            raise BundleError(f"{path}: graph file {g.get('file')} is not covered by the manifest's sha256 list")
    if verify:
        verify_files(path, files)
    return Bundle(path, manifest)


def default_bundle_path() -> Path | None:
    """The bundle shipped inside the package, if this installation has one."""
    root = Path(__file__).parent / "default"
    found = sorted(root.glob("*.imunet")) if root.is_dir() else []
    return found[0] if found else None
