"""Write a model bundle from a training run: graphs, verification figures and the manifest."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch

from imunet.config import RunConfig
from imunet.model import build_model
from imunet.runtime.errors import BundleError
from imunet.runtime.inference import InferenceSettings
from imunet.runtime.manifest import FORMAT, FORMAT_VERSION, MANIFEST, load_bundle, sha256_file

from .onnx import DEFAULT_OPSET, export_dense, export_implicit, unsupported_by_tensorrt, verify_parity
from .quantize import int8_parity, quantize_decoder
from .wrappers import feature_layouts, feature_names, feature_shape

PARITY_TOLERANCE = 1e-4


def load_run(run_dir: Path) -> tuple[RunConfig, dict[str, Any], torch.nn.Module]:
    """The run's configuration, dataset statistics and trained model (weights only, no pickles)."""
    ckpt_path, cfg_path = run_dir / "checkpoint.pt", run_dir / "config.json"
    for p in (ckpt_path, cfg_path):
        if not p.is_file():
            raise BundleError(f"{run_dir}: not a training run (no {p.name})")
    cfg = RunConfig.load(cfg_path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["model"])
    stats = json.loads(ckpt["stats"])
    return cfg, stats, model.eval()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import SimpleITK

    import imunet

    return {
        "imunet": imunet.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "SimpleITK": SimpleITK.Version_VersionString(),
        "python": platform.python_version(),
    }


def build_manifest(
    cfg: RunConfig,
    stats: dict[str, Any],
    graphs: dict[str, Path],
    parity: dict[str, Any],
    max_points: int,
    opset: int,
    run_dir: Path,
    feature_layout: str | Sequence[str] | None = None,
    overlap: float | None = None,
) -> dict[str, Any]:
    """The manifest dict (without the ``files`` digests, added last). ``overlap``: the bundle's default
    window overlap (None: :class:`InferenceSettings`' default)."""
    m = cfg.model
    inference = InferenceSettings() if overlap is None else InferenceSettings(overlap=overlap)
    layouts = feature_layouts(feature_layout, m.levels)
    shapes = [
        feature_shape(c, tuple(p // 2**b for p in m.patch_size), lay)
        for b, (c, lay) in enumerate(zip(m.channels, layouts))
    ]
    names = feature_names(m.levels)
    if m.kind == "implicit":
        graph_info = {
            "encoder": {
                "file": graphs["encoder"].name,
                "inputs": {"image": [1, 1, *m.patch_size]},
                "outputs": dict(zip(names, shapes)),
            },
            "decoder": {
                "file": graphs["decoder"].name,
                "features": names,
                "inputs": {**dict(zip(names, shapes)), "points": ["N", 3]},
                "outputs": {"logits": ["N", m.num_classes]},
            },
        }
    else:
        graph_info = {
            "model": {
                "file": graphs["model"].name,
                "inputs": {"image": [1, 1, *m.patch_size]},
                "outputs": {"logits": [1, m.num_classes, *m.patch_size]},
            }
        }
    extra = cfg.extra
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_kind": m.kind,
        "labels": extra.get("labels") or {str(i): f"label_{i}" for i in range(m.num_classes)},
        "modality": extra.get("modality", "unknown"),
        "spacing": list(stats["spacing"]),
        "spacing_order": "x, y, z (SimpleITK), mm",
        "patch_size": list(m.patch_size),
        "array_order": "z, y, x",
        "normalization": stats["normalization"],
        "encoder": {
            "channels": list(m.channels),
            "convs_per_block": list(m.convs_per_block),
            "strides": [1] + [2] * (m.levels - 1),
        },
        "decoder": {
            "pe_frequencies": m.pe_frequencies,
            "gather": m.gather,
            "feature_layout": list(layouts),
            "points_dtype": "int32",
            "coordinates": "points are voxel indices (z, y, x) in the patch; normalised inside the graph "
            "to 2 * p / (S - 1) - 1 per axis, S the patch size",
            "width": m.decoder_width,
            "depth": m.decoder_depth,
            "max_points": max_points,
        }
        if m.kind == "implicit"
        else {},
        "graphs": graph_info,
        "opset": opset,
        "inference": {
            "mode": inference.mode if m.kind == "implicit" else "dense",
            "overlap": inference.overlap,
            "stride": inference.stride,
            "band": inference.band,
            "sigma_scale": inference.sigma_scale,
            "smoothing": inference.smoothing,
        },
        "provenance": {
            "run": run_dir.name,
            "dataset": extra.get("dataset_name", cfg.dataset),
            "commit": _git_commit(),
            "versions": _versions(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "train_steps": cfg.train.steps,
        },
        "parity": parity,
        "engines": [],
    }


def finalize_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> None:
    """Hash every file of the bundle into ``manifest["files"]`` and write ``manifest.json``."""
    manifest["files"] = {
        str(p.relative_to(bundle_dir)): sha256_file(p)
        for p in sorted(bundle_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def write_bundle(
    run_dir: Path,
    out: Path,
    opset: int = DEFAULT_OPSET,
    max_points: int = 65536,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    int8: bool = True,
    feature_layout: str | Sequence[str] | None = None,
    overlap: float | None = None,
) -> Path:
    """Export ``run_dir`` to the bundle directory ``out`` (written aside, then renamed into place).

    ``int8`` adds an int8 decoder variant for onnxruntime on CPUs (implicit bundles only).
    ``feature_layout`` is how ``encoder.onnx`` hands each level's feature map to ``decoder.onnx``
    (None: the default per level; ``"channels_first"`` writes the layout of bundles before session 6;
    the runtime reads any). ``overlap`` is written as the bundle's default window overlap (the runtime's
    ``--overlap`` overrides it)."""
    if overlap is not None and not 0 <= overlap < 1:
        raise BundleError(f"overlap must be in [0, 1), got {overlap}")
    if out.exists() and not overwrite:
        raise BundleError(f"{out}: exists; pass --overwrite to replace it")
    cfg, stats, model = load_run(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if cfg.model.kind == "implicit":
            graphs = export_implicit(model, cfg.model, tmp, opset, feature_layout)
        else:
            graphs = export_dense(model, cfg.model, tmp, opset)
        log(f"exported {', '.join(p.name for p in graphs.values())} (opset {opset})")
        parity = verify_parity(model, cfg.model, graphs, feature_layout=feature_layout)
        worst = max(parity["max_abs_diff"].values())
        parity["tolerance"] = PARITY_TOLERANCE
        parity["passed"] = bool(worst < PARITY_TOLERANCE)
        log("parity torch vs onnxruntime: " + ", ".join(f"{k} {v:.2e}" for k, v in parity["max_abs_diff"].items()))
        if not parity["passed"]:
            raise BundleError(
                f"ONNX graphs differ from PyTorch by {worst:.3g} > {PARITY_TOLERANCE}; bundle not written"
            )
        unsupported = {name: unsupported_by_tensorrt(p) for name, p in graphs.items()}
        bad = {k: v for k, v in unsupported.items() if v}
        if bad:
            raise BundleError(f"graphs use operators TensorRT cannot parse: {bad}")
        manifest = build_manifest(
            cfg, stats, graphs, {"onnx": parity}, max_points, opset, run_dir, feature_layout, overlap
        )
        manifest["tensorrt_ops_checked"] = True
        if int8 and cfg.model.kind == "implicit":
            q = quantize_decoder(graphs["decoder"], tmp / "decoder_int8.onnx")
            check = int8_parity(graphs["encoder"], graphs["decoder"], q, cfg.model.patch_size)
            log(
                f"int8 decoder: max logit difference {check['max_abs_logit_diff']:.3f}, "
                f"argmax agreement {check['argmax_agreement']:.4f}"
            )
            manifest["variants"] = {
                "decoder_int8": {
                    "file": q.name,
                    "replaces": "decoder",
                    "precision": "int8",
                    "backend": "ort-cpu",
                    "quantization": "onnxruntime dynamic: int8 weights per output channel, uint8 activations",
                    "parity": check,
                }
            }
        finalize_manifest(tmp, manifest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    load_bundle(out)  # what we wrote must load
    return out
