"""Write a model bundle from a training run: graphs, verification figures and the typed manifest."""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from imunet.config import ModelConfig, RunConfig
from imunet.kinds import build_model
from imunet.run_dir import RunDir
from imunet.runtime.contract.bundle import MANIFEST, load_bundle, sha256_file
from imunet.runtime.contract.laterality import lateral_pairs
from imunet.runtime.contract.manifest import (
    MAX_POINTS,
    DecoderSpec,
    EncoderSpec,
    GraphSpec,
    Manifest,
    Provenance,
    Variant,
)
from imunet.runtime.contract.settings import InferenceSettings
from imunet.runtime.errors import BundleError
from imunet.runtime.imaging.atomic import atomic_output, refuse_existing
from imunet.runtime.imaging.prepare import Preprocessing

from .decoder_quantization import TAIL, quantize_decoder, quantize_dynamic_decoder
from .onnx import (
    DEFAULT_OPSET,
    export_dense,
    export_implicit,
    fp16_decoder_problems,
    parity_ok,
    unsupported_by_tensorrt,
    verify_parity,
)
from .variants import cpu_session, quantize_convolutions, store_weights_fp16, variant_parity
from .wrappers import feature_layouts, feature_names, feature_shape

PARITY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ExportOptions:
    """How a run becomes a bundle.

    ``opset``: the ONNX opset. ``max_points``: decoder points per call. ``feature_layout``: how
    ``encoder.onnx`` hands each level's feature map to ``decoder.onnx`` (None: the default per
    level; the runtime reads any). ``overlap``: the bundle's default window overlap (None: the
    runtime's default; ``--overlap`` overrides it at run time); ``stride`` likewise for the broad mesh
    (small structures at coarse spacing need a finer one), ``blend_above`` for adaptive mode's second
    pass, ``refine_below`` for its refinement of uncertain lattice points. ``keep_largest``: labels the runtime
    reduces to their largest component (None: the run's validation decision, if it made one).
    ``int8_convolutions``: add the encoder's (U-Net's) static int8 twin for OpenVINO, calibrated on
    the run's training cases (the dataset must be where the run found it; the int8 decoder's
    activation ranges are calibrated there too when it is). ``fp16_weights``: store
    the fp32 graphs' weights as float16, computed in float32 (half the size; checked against the
    exact graphs)."""

    opset: int = DEFAULT_OPSET
    max_points: int = MAX_POINTS
    feature_layout: str | Sequence[str] | None = None
    overlap: float | None = None
    stride: int | None = None
    blend_above: float | None = None
    refine_below: float | None = None
    keep_largest: tuple[int, ...] | None = None
    int8_convolutions: bool = False
    fp16_weights: bool = False


FP16_BACKENDS = "tensorrt,ort-trt,ort-cuda,ort-cpu"  # onnxruntime's CPU runs them too (slowly): checks, tests


def load_run(run_dir: Path) -> tuple[RunConfig, dict[str, Any], torch.nn.Module]:
    """The run's configuration, dataset statistics and trained model (weights only, no pickles)."""
    run = RunDir(run_dir)
    ckpt_path, cfg_path = run.checkpoint, run.config
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


def graph_specs(m: ModelConfig, graphs: dict[str, Path], layouts: Sequence[str]) -> dict[str, GraphSpec]:
    """The manifest's ``graphs`` section: each graph's file and I/O shapes."""
    image = {"image": (1, 1, *m.patch_size)}
    if not m.model_kind.decodes_points:
        return {"model": GraphSpec(graphs["model"].name, image, {"logits": (1, m.num_classes, *m.patch_size)})}
    names = feature_names(m.levels)
    shapes = [
        tuple(feature_shape(c, tuple(p // 2**b for p in m.patch_size), lay))
        for b, (c, lay) in enumerate(zip(m.channels, layouts))
    ]
    features = dict(zip(names, shapes))
    return {
        "encoder": GraphSpec(graphs["encoder"].name, image, features),
        "decoder": GraphSpec(
            graphs["decoder"].name,
            {**features, "points": ("N", 3)},
            {"logits": ("N", m.num_classes)},
            features=tuple(names),
        ),
    }


def build_manifest(
    cfg: RunConfig,
    stats: dict[str, Any],
    graphs: dict[str, Path],
    parity: dict[str, Any],
    run_dir: Path,
    options: ExportOptions,
) -> Manifest:
    """The manifest (without the ``files`` digests, added last)."""
    m, extra, kind = cfg.model, cfg.extra, cfg.model.model_kind
    layouts = feature_layouts(options.feature_layout, m.levels)
    inference = InferenceSettings(mode=kind.default_mode)
    if options.overlap is not None:
        inference = replace(inference, overlap=options.overlap)
    if options.stride is not None:
        inference = replace(inference, stride=options.stride)
    if options.blend_above is not None:
        inference = replace(inference, blend_above=options.blend_above)
    if options.refine_below is not None:
        inference = replace(inference, refine_below=options.refine_below)
    decoder = None
    if kind.decodes_points:
        decoder = DecoderSpec(m.pe_frequencies, m.gather, m.decoder_width, m.decoder_depth, options.max_points, layouts)
    pre = Preprocessing.from_dict(stats)  # the run's description of its input, as the manifest carries it
    names = extra.get("labels") or {str(i): f"label_{i}" for i in range(m.num_classes)}
    labels = {int(k): v for k, v in names.items()}
    return Manifest(
        model_kind=m.kind,
        labels=labels,
        modality=extra.get("modality", "unknown"),
        spacing=pre.spacing,
        patch_size=m.patch_size,
        normalization=pre.normalization,
        encoder=EncoderSpec(m.channels, (1,) + (2,) * (m.levels - 1), m.convs_per_block),
        decoder=decoder,
        orientation=pre.orientation,
        lateral_pairs=lateral_pairs(labels) if pre.orientation is not None else (),
        fingerprint=pre.fingerprint,
        graphs=graph_specs(m, graphs, layouts),
        opset=options.opset,
        inference=inference,
        provenance=Provenance(
            dataset=extra.get("dataset_name", cfg.dataset),
            versions=_versions(),
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            run=run_dir.name,
            commit=_git_commit(),
            train_steps=cfg.train.steps,
            training_cases=training_cases(run_dir),
        ),
        parity=parity,
        accuracy=run_accuracy(run_dir),
        label_codes=anatomy_codes(labels, extra.get("dataset_name", cfg.dataset)),
    )


ANATOMY_CODES = Path(__file__).with_name("anatomy_codes.json")


def anatomy_codes(labels: dict[int, str], dataset: str = "") -> dict[int, dict[str, dict[str, str]]]:
    """Coded concepts (SNOMED CT: category, type and a modifier where the name says one) for the
    labels whose names ``export/anatomy_codes.json`` knows, ``DATASET/NAME`` before ``NAME``."""
    table = json.loads(ANATOMY_CODES.read_text())

    def key(name: str) -> str:
        return "".join(c for c in name.lower() if c.isalnum())

    codes = {}
    for k, name in labels.items():
        entry = table["types"].get(f"{key(dataset)}/{key(name)}") or table["types"].get(key(name))
        if k and entry:
            codes[k] = {"category": dict(table["category"]), **{part: dict(code) for part, code in entry.items()}}
    return codes


def run_accuracy(run_dir: Path) -> dict[str, Any]:
    """The run's validation Dice per label name (scored where each label was annotated), for the
    manifest's ``accuracy``; empty when the run did not validate."""
    metrics = RunDir(run_dir).metrics
    if not metrics.is_file():
        return {}
    data = json.loads(metrics.read_text())
    dice = data.get("val_dice_by_name")
    if not dice:
        return {}
    names = list(dice)
    cases = data.get("val_cases_per_label", {})
    per_label_cases = {name: int(n) for name, n in zip(names, cases.values())} if len(cases) == len(names) else {}
    clean = {k: (None if v != v else round(float(v), 4)) for k, v in dice.items()}  # NaN: no case annotated it
    mean = data.get("val_dice_mean")
    return {
        "dice": clean,
        "mean": None if mean is None or mean != mean else round(float(mean), 4),
        "cases": per_label_cases,
        "note": f"the run's validation split ({len(data.get('per_case', {}))} cases), through the runtime's loop "
        f"in PyTorch after {data.get('steps', '?')} steps",
    }


def training_cases(run_dir: Path) -> tuple[str, ...]:
    """The case names the run trained on (its split's training part), sorted."""
    split = RunDir(run_dir).split
    if not split.is_file():
        return ()
    return tuple(sorted(str(c) for c in json.loads(split.read_text()).get("train", [])))


NEAR_ZERO_DICE = 0.05


def accuracy_warnings(accuracy: dict[str, Any]) -> list[str]:
    """What an exporter must hear about a run's validation Dice (:func:`run_accuracy`): a model that
    found nothing, or labels it never learnt to find."""
    mean, dice = accuracy.get("mean"), accuracy.get("dice") or {}
    if mean is not None and mean < NEAR_ZERO_DICE:
        return [f"the run's validation Dice is {mean:.3f}: the model has not learnt to segment, and its bundle "
                "will label little or nothing"]  # fmt: skip
    weak = [f"{k} {v:.3f}" for k, v in dice.items() if v is not None and v < NEAR_ZERO_DICE]
    if weak:
        return [f"validation Dice near zero for {', '.join(weak)}: the bundle will rarely find these labels"]
    return []


def validation_decision(run_dir: Path) -> list[int]:
    """The labels the run's validation chose to reduce to their largest component (none if it did not decide)."""
    metrics = RunDir(run_dir).metrics
    if not metrics.is_file():
        return []
    return list(json.loads(metrics.read_text()).get("postprocess", {}).get("keep_largest", []))


def hash_files(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file in the bundle but the manifest and its signature, by relative path."""
    return {
        p.relative_to(bundle_dir).as_posix(): sha256_file(p)
        for p in sorted(bundle_dir.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, f"{MANIFEST}.sig")
    }


def finalize_manifest(bundle_dir: Path, manifest: Manifest) -> Manifest:
    """Hash every file of the bundle into the manifest and write ``manifest.json`` (atomically)."""
    manifest = replace(manifest, files=hash_files(bundle_dir))
    with atomic_output(bundle_dir / MANIFEST, overwrite=True) as tmp:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def _int8_variant(
    run_dir: Path, cfg: RunConfig, graphs: dict[str, Path], folder: Path, log: Callable
) -> dict[str, Variant]:
    """The int8 decoder for the CPU, and its parity against the fp32 graphs: activation ranges
    calibrated on training patches, or, when the run's training data cannot be read, scaled per call
    (onnxruntime's dynamic quantisation; a voxel's probabilities then depend on its call)."""
    out = folder / "decoder_int8.onnx"
    if Path(cfg.dataset).is_dir():
        feeds = decoder_calibration_feeds(run_dir, cfg, graphs["encoder"])
        q, ranges = quantize_decoder(graphs["decoder"], out, feeds)
        quantization = (
            f"int8 weights per output channel; uint8 activations with fixed ranges, calibrated on {len(feeds)} "
            f"training patches (each leaving out the top and bottom {TAIL:g} of its values; onnxruntime "
            "MatMulIntegerToFloat)"
        )
    else:
        log(f"training data not found at {cfg.dataset}: the int8 decoder scales activations per call (dynamic)")
        q, ranges = quantize_dynamic_decoder(graphs["decoder"], out), {}
        quantization = "onnxruntime dynamic: int8 weights per output channel, uint8 activations scaled per call"
    check = variant_parity(graphs, {"decoder": q}, cfg.model.patch_size)
    log(f"int8 decoder: max logit difference {check['max_abs_logit_diff']:.3f}, argmax {check['argmax_agreement']:.4f}")
    if ranges:
        check["activation_ranges"] = {name: [round(lo, 5), round(hi, 5)] for name, (lo, hi) in ranges.items()}
    return {"decoder_int8": Variant(q.name, "decoder", "int8", "ort-cpu", check, quantization)}


def training_patches(run_dir: Path, cfg: RunConfig, count: int = 32, seed: int = 0) -> list[tuple]:
    """``(image, label)`` patches of the run's training cases, preprocessed as in training, half of
    them centred on foreground (a class drawn uniformly, then one of its voxels)."""
    import numpy as np

    from imunet.data import DatasetStats, PreprocessedCache, read_dataset
    from imunet.sampling import class_locations, sample_patch

    split = json.loads(RunDir(run_dir).split.read_text())
    stats = DatasetStats.from_dict(json.loads(RunDir(run_dir).dataset_stats.read_text()))
    info = read_dataset(cfg.dataset)
    by_name = {c.name: c for c in info.cases}
    cache = PreprocessedCache(run_dir / "preprocessed", stats)
    rng = np.random.default_rng(seed)
    names = sorted(split["train"])
    picked = [names[i] for i in rng.choice(len(names), size=min(count, len(names)), replace=False)]
    classes = list(range(1, cfg.model.num_classes))
    patches = []
    for i, name in enumerate(picked):
        image, label = (np.asarray(a) for a in cache.get(by_name[name]))
        where = class_locations(label, classes, rng) if i % 2 == 0 else None
        patches.append(sample_patch(image, label, cfg.model.patch_size, i % 2 == 0, rng, where))
    return patches


def calibration_patches(run_dir: Path, cfg: RunConfig, count: int = 32, seed: int = 0) -> list:
    """Image patches of :func:`training_patches`: what static int8 convolutions calibrate their
    activation ranges on."""
    return [image for image, _ in training_patches(run_dir, cfg, count, seed)]


def decoder_calibration_feeds(run_dir: Path, cfg: RunConfig, encoder: Path, count: int = 32, seed: int = 0) -> list:
    """The decoder's inputs on :func:`training_patches`: the fp32 encoder's feature maps and points
    sampled as training samples them (a share on label boundaries, class-balanced when training was)."""
    import numpy as np

    from imunet.sampling import sample_points

    sess = cpu_session(encoder)
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(seed + 1)
    t = cfg.train
    feeds = []
    for image, label in training_patches(run_dir, cfg, count, seed):
        features = dict(zip(names, sess.run(names, {"image": image[None, None].astype(np.float32)})))
        points, _ = sample_points(label, t.points, t.boundary_fraction, t.boundary_sigma, rng, t.class_balanced)
        feeds.append({**features, "points": points.astype(np.int32)})
    return feeds


def _int8_convolutions(
    run_dir: Path, cfg: RunConfig, graphs: dict[str, Path], folder: Path, log: Callable
) -> dict[str, Variant]:
    """The encoder's (or U-Net's) static int8 twin for OpenVINO, and its parity against fp32."""
    graph = cfg.model.model_kind.entry_graph
    q = quantize_convolutions(graphs[graph], folder / f"{graph}_int8.onnx", calibration_patches(run_dir, cfg))
    check = variant_parity(graphs, {graph: q}, cfg.model.patch_size)
    log(f"int8 {graph}: max logit difference {check['max_abs_logit_diff']:.3f}, argmax {check['argmax_agreement']:.4f}")
    method = "onnxruntime static QDQ: int8 weights per output channel, uint8 activations, 32 training patches"
    return {f"{graph}_int8": Variant(q.name, graph, "int8", "openvino", check, method)}


def _fp16_variants(
    model: torch.nn.Module, cfg: RunConfig, graphs: dict[str, Path], folder: Path, options: ExportOptions,
    log: Callable,
) -> dict[str, Variant]:  # fmt: skip
    """fp16 twins of every graph (float32 in and out), checked: TensorRT's operators, the decoder's
    precision boundary, parity against the fp32 graphs."""
    opset, layout = options.opset, options.feature_layout
    if cfg.model.model_kind.decodes_points:
        half = export_implicit(model, cfg.model, folder, opset, layout, precision="fp16")
        problems = fp16_decoder_problems(half["decoder"])
        if problems:
            raise BundleError(f"the fp16 decoder graph is wrong: {'; '.join(problems)}")
    else:
        half = export_dense(model, cfg.model, folder, opset, precision="fp16")
    bad = {name: ops for name, p in half.items() if (ops := unsupported_by_tensorrt(p))}
    if bad:
        raise BundleError(f"fp16 graphs use operators TensorRT cannot parse: {bad}")
    check = variant_parity(graphs, half, cfg.model.patch_size)
    log(f"fp16 graphs: max logit difference {check['max_abs_logit_diff']:.3f}, argmax {check['argmax_agreement']:.4f}")
    return {
        f"{g}_fp16": Variant(p.name, g, "fp16", FP16_BACKENDS, check, "float16 weights and activations, explicit "
                             "casts; normalisation, gather and encoding in float32")
        for g, p in half.items()
    }  # fmt: skip


FP16_WEIGHTS_AGREEMENT = 0.999  # argmax agreement with the exact graphs a bundle storing fp16 weights needs


def _store_fp16(graphs: dict[str, Path], patch: tuple[int, int, int], log: Callable) -> dict[str, Any]:
    """Replace each fp32 graph by its twin with float16-stored weights; its parity against the exact
    graphs (:class:`BundleError` below :data:`FP16_WEIGHTS_AGREEMENT`)."""
    with tempfile.TemporaryDirectory(prefix="imunet-exact-") as exact_dir:
        exact = {g: Path(shutil.copy(p, Path(exact_dir) / p.name)) for g, p in graphs.items()}
        for g, p in graphs.items():
            store_weights_fp16(exact[g], p)
        check = variant_parity(exact, graphs, patch)
    log(f"fp16-stored weights: max logit difference {check['max_abs_logit_diff']:.4f}, "
        f"argmax {check['argmax_agreement']:.4f}")  # fmt: skip
    if check["argmax_agreement"] < FP16_WEIGHTS_AGREEMENT:
        changed = 1 - check["argmax_agreement"]
        raise BundleError(f"fp16-stored weights change {changed:.2%} of the labels; bundle not written")
    return check


def _export_graphs(
    model: torch.nn.Module, cfg: RunConfig, folder: Path, opset: int, layout: str | Sequence[str] | None, log: Callable
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the fp32 graphs and check them: parity against PyTorch, TensorRT's operator list."""
    if cfg.model.model_kind.decodes_points:
        graphs = export_implicit(model, cfg.model, folder, opset, layout)
    else:
        graphs = export_dense(model, cfg.model, folder, opset)
    log(f"exported {', '.join(p.name for p in graphs.values())} (opset {opset})")
    parity = verify_parity(model, cfg.model, graphs, feature_layout=layout)
    parity.update(tolerance=PARITY_TOLERANCE, tolerance_is="relative to max(1, max |output|)")
    parity["passed"] = parity_ok(parity, PARITY_TOLERANCE)
    log("parity torch vs onnxruntime: " + ", ".join(f"{k} {v:.2e}" for k, v in parity["max_abs_diff"].items()))
    if not parity["passed"]:
        raise BundleError(
            f"ONNX graphs differ from PyTorch by {parity['max_abs_diff']} (outputs up to "
            f"{parity['max_abs_reference']}), more than {PARITY_TOLERANCE} relative; bundle not written"
        )
    bad = {name: ops for name, p in graphs.items() if (ops := unsupported_by_tensorrt(p))}
    if bad:
        raise BundleError(f"graphs use operators TensorRT cannot parse: {bad}")
    return graphs, parity


def write_bundle(
    run_dir: Path,
    out: Path,
    options: ExportOptions | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Export ``run_dir`` to the bundle directory ``out`` (written aside, then renamed into place):
    the fp32 graphs checked against PyTorch, an int8 decoder for onnxruntime on CPUs (point-decoding
    kinds), fp16 twins of every graph (GPUs: TensorRT engines and onnxruntime's GPU providers) and
    what ``options`` add."""
    options = options or ExportOptions()
    if options.overlap is not None and not 0 <= options.overlap < 1:
        raise BundleError(f"overlap must be in [0, 1), got {options.overlap}")
    if options.blend_above is not None and not 0 <= options.blend_above <= 1:
        raise BundleError(f"blend_above must be in [0, 1], got {options.blend_above}")
    if options.refine_below is not None and not 0 <= options.refine_below < 1:
        raise BundleError(f"refine_below must be in [0, 1), got {options.refine_below}")
    refuse_existing(out, overwrite)
    cfg, stats, model = load_run(run_dir)
    with atomic_output(out, overwrite, directory=True) as tmp:
        graphs, parity = _export_graphs(model, cfg, tmp, options.opset, options.feature_layout, log)
        manifest = build_manifest(cfg, stats, graphs, {"onnx": parity}, run_dir, options)
        variants: dict[str, Variant] = {}
        if cfg.model.model_kind.decodes_points:
            variants.update(_int8_variant(run_dir, cfg, graphs, tmp, log))
        variants.update(_fp16_variants(model, cfg, graphs, tmp, options, log))
        if options.int8_convolutions:
            variants.update(_int8_convolutions(run_dir, cfg, graphs, tmp, log))
        keep_largest = options.keep_largest
        if keep_largest is None:
            keep_largest = tuple(validation_decision(run_dir))
        manifest = replace(manifest, tensorrt_ops_checked=True, variants=variants, keep_largest=keep_largest)
        if options.fp16_weights:
            stored = _store_fp16(graphs, cfg.model.patch_size, log)
            manifest = replace(manifest, parity={**manifest.parity, "fp16_weights": stored})
        finalize_manifest(tmp, manifest)
        load_bundle(tmp)  # what we wrote must load
    return out
