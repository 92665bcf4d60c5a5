"""A model bundle on disk: ``NAME.imunet/`` with ``manifest.json``, the graphs and optional engines.

A bundle is checked on load: format version, a typed manifest, every file it names inside the
bundle folder (no absolute paths, no ``..``, no symbolic link that leaves it) and listed with its
sha256, and the sha256 of every file. Backends read graphs and engines through :meth:`Bundle.read`,
which hashes the very bytes it returns. No graph may name an external-data file (ONNX lets a tensor's
values live in a separate file, which a runtime would read from the working folder, outside every
hash and signature): every graph is scanned when the bundle loads and again as it is read
(:mod:`.onnx_refs`). Nothing is unpickled. A signature, if present, is checked
against trusted keys when the caller gives them (:mod:`.signature`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import BundleError
from .manifest import Manifest, Variant
from .onnx_refs import MalformedGraph, external_data_refs
from .safe_json import load_object
from .signature import SIGNATURE, SignatureInfo, read_signature, verify_signature

MANIFEST = "manifest.json"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def inside(root: Path, name: str, what: str = "file") -> Path:
    """``root / name`` if it stays inside ``root`` (after symbolic links), else :class:`BundleError`."""
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts:
        raise BundleError(f"{root}: the manifest names {what} {name!r}, which is outside the bundle folder")
    target = root / name
    if not target.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {what} {name!r} is a link that leaves the bundle folder")
    return target


@dataclass(frozen=True)
class Bundle:
    """A checked bundle: its folder, typed manifest and signature (None when unsigned)."""

    path: Path
    manifest: Manifest
    signature: SignatureInfo | None = None

    def read(self, name: str) -> bytes:
        """The bytes of bundle file ``name`` after checking them against the manifest's sha256."""
        digest = self.manifest.files.get(name)
        if digest is None:
            raise BundleError(f"{self.path}: {name} is not covered by the manifest's sha256 list")
        path = inside(self.path, name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"{self.path}: cannot read {name} ({exc.strerror})") from None
        if sha256_bytes(data) != digest:
            raise BundleError(f"{self.path}: {name} does not match its sha256 in the manifest; the bundle is corrupt")
        if name in graph_files(self.manifest):
            check_self_contained(self.path, name, data)
        return data

    def graph_file(self, graph: str, precision: str | None = None) -> str:
        """The file of ``graph`` ("encoder", "decoder", "model"), or of its variant of ``precision``."""
        if graph not in self.manifest.graphs:
            have = ", ".join(self.manifest.graphs)
            raise BundleError(f"{self.path}: bundle has no '{graph}' graph (it has {have})")
        variant = self.variant_for(graph, precision) if precision not in (None, "fp32") else None
        return variant.file if variant else self.manifest.graphs[graph].file

    def variant_for(self, graph: str, precision: str | None) -> Variant | None:
        """The variant of ``graph`` at ``precision``, if the bundle has one."""
        return next(
            (v for v in self.manifest.variants.values() if v.replaces == graph and v.precision == precision), None
        )

    def has_precision(self, precision: str) -> bool:
        return any(v.precision == precision for v in self.manifest.variants.values())


def check_contained(path: Path, m: Manifest) -> None:
    """Every file the manifest names lies inside the bundle, and every graph and engine is hashed."""
    if not m.files:
        raise BundleError(f"{path}: manifest lists no files with their sha256")
    graphs = [(g.file, f"the {k} graph") for k, g in m.graphs.items()]
    graphs += [(v.file, f"variant {k}") for k, v in m.variants.items()]
    engines = [(e.dir, "engine folder") for e in m.engines]
    for name, what in [*graphs, *engines, *((f, "file") for f in m.files)]:
        inside(path, name, what)
    for name, what in graphs:
        if name not in m.files:
            raise BundleError(f"{path}: {what} {name} is not covered by the manifest's sha256 list")
    for folder, _ in engines:
        if not any(PurePosixPath(f).parent == PurePosixPath(folder) for f in m.files):
            raise BundleError(f"{path}: engine folder {folder} has no files covered by the manifest's sha256 list")


def graph_files(m: Manifest) -> set[str]:
    """The ONNX files a manifest names: its graphs and their precision variants."""
    return {g.file for g in m.graphs.values()} | {v.file for v in m.variants.values()}


def check_self_contained(path: Path, name: str, data: bytes) -> None:
    """Refuse ONNX bytes that are malformed or keep tensor values in another file (external data)."""
    try:
        refs = external_data_refs(data)
    except MalformedGraph as exc:
        raise BundleError(f"{path}: {name} is not a valid ONNX graph ({exc})") from None
    if refs:
        raise BundleError(
            f"{path}: {name} keeps weights outside the graph ({refs[0]}{', and more' if len(refs) > 1 else ''}); "
            "external data is not covered "
            "by the manifest's hashes or signature, so the bundle is refused"
        )


def check_graphs(path: Path, m: Manifest) -> None:
    """Every graph and variant of the bundle is one self-contained ONNX file (before any backend opens one)."""
    for name in sorted(graph_files(m)):
        graph = inside(path, name)
        try:
            data = graph.read_bytes() if graph.is_file() else None
        except OSError as exc:
            raise BundleError(f"{path}: cannot read {name} ({exc.strerror})") from None
        if data is None:
            raise BundleError(f"{path}: bundle file {name} is missing or not a regular file")
        check_self_contained(path, name, data)


def verify_files(path: Path, files: dict[str, str]) -> None:
    """Check that every listed file exists and has the recorded sha256."""
    for name, digest in files.items():
        f = inside(path, name)
        if not f.is_file():
            raise BundleError(f"{path}: bundle file {name} is missing")
        if sha256_file(f) != digest:
            raise BundleError(
                f"{path}: {name} does not match its sha256 in the manifest; the bundle is corrupt or was modified"
            )


def load_bundle(path: str | Path, verify: bool = True, trusted_keys: str | Path | None = None) -> Bundle:
    """Read and check a bundle folder. ``verify=False`` skips hashing every file up front (graphs are
    still hashed as they are read); ``trusted_keys`` (a folder of public keys) requires a valid
    signature by one of them."""
    path = Path(path)
    try:
        return _load(path, verify, trusted_keys)
    except OSError as exc:  # a name too long, a permission, a loop of links: one line, never a traceback
        raise BundleError(f"{str(path)[:200]}: cannot be read ({exc.strerror or exc})") from None


def _load(path: Path, verify: bool, trusted_keys: str | Path | None) -> Bundle:
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle directory")
    mpath = inside(path, MANIFEST, "manifest")
    if not mpath.exists():
        raise BundleError(f"{path}: not a bundle (no {MANIFEST})")
    raw, _ = load_object(mpath, "the manifest")  # a regular file, bounded in size and depth
    try:
        manifest = Manifest.from_dict(raw)
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError) as exc:
        raise BundleError(f"{path}: malformed manifest ({exc})") from None
    check_contained(path, manifest)
    sig_path = path / SIGNATURE
    signature = read_signature(sig_path) if sig_path.exists() or sig_path.is_symlink() else None
    if trusted_keys is not None:
        signature = verify_signature(path, raw, signature, Path(trusted_keys))
    check_graphs(path, manifest)
    if verify:
        verify_files(path, manifest.files)
    return Bundle(path, manifest, signature)


SHIPPED = Path(__file__).parents[1] / "default"
DEFAULT_MODEL = "hippocampus"  # what imunet-run and Segmenter() use without a model


def shipped_bundles() -> dict[str, Path]:
    """The bundles shipped inside the package, by name (``runtime/default/NAME.imunet``)."""
    found = sorted(SHIPPED.glob("*.imunet")) if SHIPPED.is_dir() else []
    return {p.name[: -len(".imunet")]: p for p in found if p.is_dir()}


def default_bundle_path() -> Path | None:
    """The default shipped bundle (:data:`DEFAULT_MODEL`), if this installation has it."""
    return shipped_bundles().get(DEFAULT_MODEL)


def resolve_model(model: str | Path | None) -> Path:
    """The bundle folder ``model`` names: an existing path wins, else the name of a shipped bundle,
    else (None) the default one. :class:`BundleError` for anything else, naming what is shipped."""
    if model is None:
        path = default_bundle_path()
        if path is None:
            raise BundleError("no --model given and this installation ships no default bundle")
        return path
    path = Path(model)
    try:
        exists = path.exists()
    except OSError as exc:
        raise BundleError(f"{str(model)[:200]}...: not a usable path ({exc.strerror})") from None
    if exists:
        return path
    shipped = shipped_bundles()
    if str(model) in shipped:
        return shipped[str(model)]
    names = ", ".join(shipped) or "none"
    raise BundleError(f"{model}: no such bundle folder, and not a shipped model (shipped: {names})")
