"""``imunet-export``: training run -> verified model bundle (ONNX graphs, manifest, TensorRT engines).

``imunet-export RUN --out NAME.imunet [--trt fp16] [--sign KEY.pem]`` and ``imunet-export keygen KEY.pem``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from imunet import __version__
from imunet.runtime.contract.manifest import MAX_POINTS, OPSET
from imunet.runtime.contract.settings import InferenceSettings

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
keys_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
calibrate_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"imunet-export: error: {msg}", err=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imunet-export {__version__}")
        raise typer.Exit()


@app.command(help="Export RUN (an imunet-train directory) to a bundle directory NAME.imunet.")
def export(
    run: Path = typer.Argument(..., help="Training run directory (checkpoint.pt, config.json)."),
    out: Path = typer.Option(..., "--out", help="Bundle directory to write, e.g. model.imunet."),
    trt: Optional[str] = typer.Option(None, "--trt", help="Also build TensorRT engines: fp16 | fp32."),
    opset: int = typer.Option(OPSET, help="ONNX opset (TensorRT 10 and 11 parse 9..20)."),
    max_points: int = typer.Option(MAX_POINTS, help="Most points per decoder call (TensorRT profile max)."),
    opt_points: int = typer.Option(16384, help="Points per call TensorRT optimises for (at most --max-points)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --out."),
    feature_layout: str = typer.Option(
        "auto",
        help="How the encoder hands feature maps to the decoder: auto (level 0 channels-first, deeper "
        "levels channels-last; fastest measured on CPU) | channels_first | channels_last.",
    ),
    overlap: Optional[float] = typer.Option(
        None,
        help="Default window overlap recorded in the manifest (imunet-run --overlap overrides it); "
        "default 0.3. 0.25 is the measured choice for adaptive mode on large volumes (docs/BENCHMARKS.md).",
    ),
    stride: Optional[int] = typer.Option(
        None,
        help="Default broad-mesh stride in voxels recorded in the manifest (imunet-run --stride overrides it); "
        "default 4. Structures a few voxels across need 2.",
    ),
    blend_above: Optional[float] = typer.Option(
        None,
        "--blend-above",
        help="Adaptive mode's second pass recorded in the manifest: voxels where no label's probability exceeds "
        "1 minus this are decoded in every window and blended as dense mode blends them (0.05 made CT organs "
        "a few voxels across agree with dense mode; docs/BENCHMARKS.md). Default 1: no second pass.",
    ),
    refine_below: Optional[float] = typer.Option(
        None,
        "--refine-below",
        help="Adaptive mode's refinement recorded in the manifest: lattice points whose largest probability is "
        "under this refine their cells as if labels differed (0.99 found CT spinal cord the stride-4 mesh "
        "passed between; docs/BENCHMARKS.md). Default 0: only differing labels refine.",
    ),
    keep_largest: Optional[str] = typer.Option(
        None,
        "--keep-largest",
        help="Labels (names or numbers, comma-separated, or 'none') the runtime reduces to their largest "
        "component. Default: what the run's validation decided.",
    ),
    fp16_weights: bool = typer.Option(
        False,
        "--fp16-weights",
        help="Store the fp32 graphs' weights as float16, computed in float32: half the bundle's size, checked "
        "against the exact graphs.",
    ),
    int8_encoder: bool = typer.Option(
        False, "--int8-encoder", help="Also a static int8 encoder (U-Net) for OpenVINO, calibrated on training patches."
    ),
    calibrate: bool = typer.Option(
        True,
        "--calibrate/--no-calibrate",
        help="Check the int8 decoder against fp32 (left out if it loses more than 0.005 mean Dice) and calibrate "
        "the per-scan Dice estimate on the run's validation cases (segmented through the runtime; needs the run's "
        "dataset).",
    ),
    calibration_from: Optional[Path] = typer.Option(
        None,
        "--calibration-from",
        metavar="TWIN.imunet",
        help="Take the Dice estimate's calibration from this bundle instead: a split twin (same recipe, trained "
        "without validation cases) of a run that trained on every case.",
    ),
    sign: Optional[Path] = typer.Option(
        None, "--sign", help="Sign the bundle with this ed25519 private key (PEM; see imunet-export keygen)."
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from imunet.runtime.errors import ImunetError

    from .bundle import ExportOptions, accuracy_warnings, run_accuracy, write_bundle

    if trt is not None and trt not in ("fp16", "fp32"):
        _fail(f"--trt must be fp16 or fp32, got {trt!r}")
    if feature_layout not in ("auto", "channels_first", "channels_last"):
        _fail(f"--feature-layout must be auto, channels_first or channels_last, got {feature_layout!r}")
    if not 1 <= opt_points <= max_points:
        _fail(f"--opt-points must be between 1 and --max-points ({max_points}), got {opt_points}")
    try:
        key = _signing_key(sign)
        largest = _labels_option(keep_largest, run)
        options = ExportOptions(
            opset=opset,
            max_points=max_points,
            feature_layout=None if feature_layout == "auto" else feature_layout,
            overlap=overlap,
            stride=stride,
            blend_above=blend_above,
            refine_below=refine_below,
            keep_largest=largest,
            int8_convolutions=int8_encoder,
            fp16_weights=fp16_weights,
        )
        bundle = write_bundle(run, out, options, overwrite, log=typer.echo)
        if calibrate or calibration_from is not None:
            _calibrate_export(run, bundle, calibration_from)
    except (ImunetError, ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {bundle}")
    for warning in accuracy_warnings(run_accuracy(run)):
        typer.echo(f"WARNING: {warning}", err=True)
    code = _engines(bundle, trt, (1, opt_points, max_points)) if trt else 0
    if key is not None:
        from .signing import sign_bundle

        typer.echo(f"signed {bundle} with {sign_bundle(bundle, key)}")
    if code:
        raise typer.Exit(code)


def _calibrate_export(run: Path, bundle_dir: Path, source: Path | None) -> None:
    """With the run's validation cases at hand: the int8 decoder checked against fp32 on them (and
    left out if it loses Dice), then the bundle's Dice estimate calibrated on them, or borrowed from
    ``source``; without reachable data the estimate is left uncalibrated with a note saying so."""
    import json

    from imunet.config import RunConfig
    from imunet.run_dir import RunDir
    from imunet.runtime.contract.bundle import load_bundle
    from imunet.runtime.errors import InputError

    from .bundle import finalize_manifest
    from .calibration import MIN_CASES, borrowed, calibrate
    from .int8_check import check_int8_decoder

    rd = RunDir(run)
    dataset = Path(RunConfig.load(rd.config).dataset) if rd.config.is_file() else None
    split = json.loads(rd.split.read_text()) if rd.split.is_file() else {}
    if dataset is None or not (dataset / "dataset.json").is_file():
        typer.echo(f"note: the Dice estimate is uncalibrated: the run's dataset ({dataset}) is not here; "
                   "imunet-export calibrate adds a calibration later", err=True)  # fmt: skip
        return
    if split.get("val"):  # before the Dice estimate is fitted: it is fitted through the decoder the CPU runs
        try:
            check_int8_decoder(bundle_dir, dataset, split["val"], typer.echo)
        except InputError as exc:  # the bundle is complete without the check: say so, do not fail the export
            typer.echo(f"note: the int8 decoder was not checked on validation cases: {exc}", err=True)
    manifest = load_bundle(bundle_dir).manifest
    training = list(split.get("train", []))
    if source is not None:
        model = borrowed(source, dataset, training, manifest.labels)
    elif len(split.get("val", [])) >= MIN_CASES:
        note = f"{len(split['val'])} validation cases of {rd.path.name}, not trained on"
        try:
            model = calibrate(bundle_dir, dataset, split["val"], training, note, typer.echo)
        except InputError as exc:  # the bundle is complete without it: say so, do not fail the export
            typer.echo(f"note: the Dice estimate is uncalibrated: {exc}", err=True)
            return
    else:
        typer.echo(f"note: the Dice estimate is uncalibrated: the run has fewer than {MIN_CASES} validation "
                   "cases; --calibration-from TWIN.imunet borrows a split twin's", err=True)  # fmt: skip
        return
    finalize_manifest(bundle_dir, replace(manifest, quality=model))


@calibrate_app.command(help="Calibrate BUNDLE's per-scan Dice estimate on labelled cases; write the result to --out.")
def calibrate_bundle(
    bundle: Path = typer.Argument(..., help="The bundle to calibrate (it is not changed)."),
    out: Path = typer.Option(..., "--out", help="The calibrated copy to write, e.g. model-calibrated.imunet."),
    dataset: Path = typer.Option(..., "--dataset", help="Dataset folder (imagesTr/, labelsTr/, dataset.json)."),
    cases: Optional[str] = typer.Option(
        None,
        "--cases",
        metavar="A,B|@split.json:val",
        help="Labelled cases the bundle did not train on (names, or @FILE.json:KEY, or @FILE.txt).",
    ),
    source: Optional[Path] = typer.Option(
        None, "--from", metavar="TWIN.imunet", help="Borrow this split twin's calibration instead of fitting one."
    ),
    offsets: bool = typer.Option(
        False,
        "--logit-offsets",
        help="First fit a logit offset per class on the --cases (the argmax's thresholds where validation Dice "
        "is best) and write them into the manifest; the Dice estimate is then calibrated with them.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle at --out."),
) -> None:
    import shutil

    from imunet.runtime.contract.bundle import load_bundle
    from imunet.runtime.contract.signature import SIGNATURE
    from imunet.runtime.errors import ImunetError

    from .bundle import finalize_manifest
    from .calibration import borrowed, calibrate, parse_cases

    if (cases is None) == (source is None):
        _fail("give --cases to fit a calibration, or --from TWIN.imunet to borrow one")
    if offsets and cases is None:
        _fail("--logit-offsets fits on labelled cases: give --cases")
    tmp = out.with_name(f".{out.name}.part")
    try:
        manifest = load_bundle(bundle).manifest
        if out.resolve() == bundle.resolve():
            raise ValueError("--out must differ from the bundle: the bundle given is not changed")
        if out.exists() and not overwrite:
            raise ValueError(f"{out}: exists; pass --overwrite to replace it")
        training = list(manifest.provenance.training_cases)
        if not training:
            raise ValueError(f"{bundle}: its manifest does not list its training cases (re-export it)")
        val = parse_cases(cases) if cases else []
        overlap = sorted(set(val) & set(training))
        if overlap:
            raise ValueError(f"{len(overlap)} of the cases trained the bundle ({', '.join(overlap[:3])}...): "
                             "calibrating on them would trust it too much")  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle, tmp)
        if (tmp / SIGNATURE).exists():
            (tmp / SIGNATURE).unlink()
            typer.echo(f"note: {out} is unsigned (its manifest changed): sign it again", err=True)
        if offsets:
            inference, accuracy = _fit_offsets(bundle, dataset, val)
            manifest = replace(manifest, inference=inference, accuracy=accuracy)
            finalize_manifest(tmp, manifest)  # the Dice estimate below is fitted with the offsets
        if source is not None:
            model = borrowed(source, dataset, training, manifest.labels)
        else:
            note = f"{len(val)} labelled cases of {dataset.name} the bundle did not train on"
            model = calibrate(tmp, dataset, val, training, note, typer.echo)
        finalize_manifest(tmp, replace(manifest, quality=model))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except (ImunetError, ValueError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _fail(str(exc))
    typer.echo(f"wrote {out}")


def _fit_offsets(bundle: Path, dataset: Path, cases: list[str]) -> tuple[InferenceSettings, dict]:
    """The bundle's inference settings with logit offsets fitted on ``cases`` of ``dataset``, and the
    manifest's ``accuracy`` with them (the Dice per label on those cases)."""
    import numpy as np

    from imunet.runtime import Segmenter

    from .calibration import annotated_labels, dataset_pairs
    from .logit_offsets import collect, fit_offsets

    pairs = dataset_pairs(dataset, cases)
    typer.echo(f"segmenting {len(pairs)} cases for the logit offsets ...")
    with Segmenter(bundle, backend="auto", logit_offsets=()) as seg:
        names, settings = seg.bundle.manifest.labels, seg.bundle.manifest.inference
        found = collect(seg, pairs, annotated_labels(dataset))
    fitted, before, after = fit_offsets(found, len(names), typer.echo)
    for k in sorted(after):
        typer.echo(f"  {names[k]}: offset {fitted[k]:+.2f}, Dice {before[k]:.3f} -> {after[k]:.3f}")
    mean_before, mean_after = np.mean(list(before.values())), np.mean(list(after.values()))
    typer.echo(f"mean Dice over {len(after)} labels {mean_before:.4f} -> {mean_after:.4f} "
               "(probabilities on the scans' grids, before keep-largest)")  # fmt: skip
    accuracy = {
        "dice": {names[k]: round(v, 4) for k, v in after.items()},
        "mean": round(float(mean_after), 4),
        "cases": {names[k]: sum(k in c.scored for c in found) for k in after},
        "note": f"{len(found)} labelled cases the bundle did not train on, through the runtime with the logit "
        "offsets fitted on them (labels from the probabilities on each scan's grid, before keep-largest)",
    }
    return replace(settings, logit_offsets=tuple(float(v) for v in fitted)), accuracy


def _labels_option(text: str | None, run: Path) -> tuple[int, ...] | None:
    """``--keep-largest``: label names or numbers of the run's dataset; None when not given."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    from imunet.config import RunConfig
    from imunet.run_dir import RunDir
    from imunet.runtime.contract.label_names import label_indices

    cfg_path = RunDir(run).config
    names = RunConfig.load(cfg_path).extra.get("labels", {}) if cfg_path.is_file() else {}
    return label_indices([text], {int(k): v for k, v in names.items()}, "--keep-largest")


def _signing_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    from .signing import read_private_key

    return read_private_key(path)


def _engines(bundle_dir: Path, precision: str, profile: tuple[int, int, int]) -> int:
    """Build, record and check TensorRT engines; 0, or 3 when they could not be built or checked."""
    from imunet.runtime.contract.bundle import load_bundle
    from imunet.runtime.errors import ImunetError

    from .bundle import finalize_manifest
    from .tensorrt import build_engines, engine_parity, with_engine

    bundle = load_bundle(bundle_dir)
    try:
        record = build_engines(bundle, precision, profile)
        manifest = finalize_manifest(bundle_dir, with_engine(bundle.manifest, record))
        record = replace(record, parity=engine_parity(load_bundle(bundle_dir), precision))
        finalize_manifest(bundle_dir, with_engine(manifest, record))
    except (ImunetError, ValueError, OSError) as exc:
        typer.echo(
            f"imunet-export: --trt {precision}: {exc}; the ONNX bundle at {bundle_dir} is complete without engines",
            err=True,
        )
        return 3
    p = record.parity or {}
    typer.echo(
        f"TensorRT {precision} vs onnxruntime: max |p| difference {p.get('max_abs_prob_diff', float('nan')):.2e}, "
        f"argmax agreement {p.get('argmax_agreement', float('nan')):.4%}"
    )
    times = ", ".join(f"{name} {facts['build_s']} s" for name, facts in record.build.items())
    typer.echo(f"built TensorRT {precision} engines in {record.dir} ({times})")
    return 0


@keys_app.command(help="Write a new ed25519 signing key KEY.pem (mode 0600) and its public key KEY.pub.pem.")
def keygen(
    key: Path = typer.Argument(..., help="Private key file to write, e.g. site.pem."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing key files."),
) -> None:
    from imunet.runtime.errors import ImunetError

    from .signing import keygen as make_keys

    try:
        private, public, fp = make_keys(key, overwrite)
    except (ImunetError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {private} (private: keep it off shared disks) and {public}; key {fp}")
    typer.echo(f"hand {public.name} to the sites that run your bundles: imunet-run --trusted-keys FOLDER")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "keygen":
        sys.argv.pop(1)
        keys_app(prog_name="imunet-export keygen")
    elif len(sys.argv) > 1 and sys.argv[1] == "calibrate":
        sys.argv.pop(1)
        calibrate_app(prog_name="imunet-export calibrate")
    else:
        app(prog_name="imunet-export")


if __name__ == "__main__":
    main()
