"""``imunet-run``: segment scans (files, folders, DICOM series directories) with a model bundle."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from .errors import ImunetError, InputError
from .io import WRITABLE_SUFFIXES, image_suffix

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Expand folders into their image files; a folder without image files is a DICOM series."""
    found: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and image_suffix(f) and not f.name.startswith("."))
            found.extend(files if files else [p])
        else:
            found.append(p)
    return found


def output_path(scan: Path, out: Path | None, many: bool, fmt: str) -> Path:
    """Where the label map of ``scan`` goes: ``--out`` itself for one scan and a file name, else a folder."""
    if out is not None and not many and image_suffix(out):
        return out
    folder = out if out is not None else Path.cwd()
    stem = scan.name[: -len(image_suffix(scan))] if image_suffix(scan) else scan.name
    return folder / f"{stem}_seg{fmt}"


def _stage(timings: dict, key: str, t0: float) -> float:
    t = time.perf_counter()
    timings[key] = round(t - t0, 4)
    return t


@app.command(help="Segment INPUT scans (NIfTI, NRRD, MHA files, folders of them, or DICOM series directories).")
def run(
    inputs: list[Path] = typer.Argument(..., help="Scans, folders or DICOM directories."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Bundle directory (default: the shipped model)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (one scan) or folder (default: .)."),
    backend: str = typer.Option("auto", help="auto | ort-cpu | ort-cuda | ort-trt | tensorrt"),
    precision: str = typer.Option("auto", help="Decoder on onnxruntime: auto (int8 on CPU if shipped) | fp32 | int8."),
    mode: Optional[str] = typer.Option(None, help="adaptive | sparse | dense (implicit bundles only)."),
    overlap: Optional[float] = typer.Option(None, help="Sliding-window overlap in [0, 1)."),
    stride: Optional[int] = typer.Option(None, help="Broad-mesh stride in voxels."),
    stats: Optional[Path] = typer.Option(None, "--stats", help="Write per-scan timings and label volumes as JSON."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="PNG of the segmentation over three slices."),
    fmt: str = typer.Option(".nii.gz", "--format", help="Output format for folders: .nii.gz | .nrrd | .mha"),
    overwrite: bool = typer.Option(False, help="Replace existing output files."),
    series: Optional[str] = typer.Option(None, help="DICOM series instance UID, when a folder holds several."),
    channel: Optional[int] = typer.Option(None, help="Volume index of a 4D input."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Refuse scans needing more GiB than this."),
    workers: Optional[int] = typer.Option(
        None, help="Windows computed at once on the CPU backend (default: 2 with 2+ cores; GPUs run 1)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and the summary."),
) -> None:
    from .io import read_image, write_image_atomic
    from .pipeline import Segmenter

    if fmt not in WRITABLE_SUFFIXES:
        _fail(f"--format must be one of .nii.gz, .nii, .nrrd, .mha; got {fmt!r}")
    scans = collect_inputs(inputs)
    many = len(scans) > 1
    if many and out is not None and image_suffix(out):
        _fail(f"--out {out} names a file but {len(scans)} scans were given; pass a folder")
    try:
        seg = Segmenter(
            model,
            backend=backend,
            mode=mode,
            overlap=overlap,
            stride=stride,
            max_memory_gb=max_memory,
            precision=precision,
            workers=workers,
        )
    except (ImunetError, ValueError) as exc:
        _fail(str(exc))
    if not quiet:
        m = seg.bundle.manifest
        typer.echo(
            f"model {seg.bundle.path.name} ({m.kind}, labels {', '.join(list(m.labels.values())[1:])}); "
            f"backend {seg.backend_name}"
            f"{' (int8 decoder)' if getattr(seg.backend, 'precision', '') == 'int8' else ''}; "
            f"mode {seg.settings.mode if m.kind == 'implicit' else 'dense-model'}; "
            f"{seg.workers} window{'s' if seg.workers > 1 else ''} at a time"
        )
    report, failed = [], []
    for i, scan in enumerate(scans):
        timings: dict = {}
        t = time.perf_counter()
        try:
            dest = output_path(scan, out, many, fmt)
            if dest.resolve() == scan.resolve():
                raise InputError(f"{scan}: output path equals the input; choose another --out")
            if dest.exists() and not overwrite:
                raise InputError(f"{dest}: exists; pass --overwrite to replace it")
            image = read_image(scan, series=series, channel=channel)
            t = _stage(timings, "read_s", t)
            label = _predict(seg, image, scan, quiet)
            t = _stage(timings, "inference_s", t)
            write_image_atomic(label, dest, overwrite=overwrite)
            t = _stage(timings, "write_s", t)
            if preview is not None:
                from .preview import write_preview

                ppath = preview if not many else preview.with_name(f"{dest.name.split('.')[0]}_{preview.name}")
                write_preview(image, label, ppath)
        except Exception as exc:  # one scan's failure must never stop the batch or print a traceback
            known = isinstance(exc, (ImunetError, ValueError, OSError))
            text = str(exc) if known else f"unexpected {type(exc).__name__}: {exc}"
            if isinstance(exc, MemoryError):
                text = "out of memory; try --max-memory to refuse such scans up front"
            msg = text if str(scan) in text else f"{scan}: {text}"
            typer.echo(f"FAILED {msg}", err=True)
            failed.append(str(scan))
            report.append({"input": str(scan), "ok": False, "error": msg})
            continue
        entry = {"input": str(scan), "output": str(dest), "ok": True, **timings, **seg.last_stats}
        report.append(entry)
        vols = ", ".join(f"{k} {v:.2f} ml" for k, v in seg.last_stats["volumes_ml"].items())
        typer.echo(f"[{i + 1}/{len(scans)}] {scan.name} -> {dest}  {sum(timings.values()):.2f} s  ({vols})")
    if stats is not None:
        stats.parent.mkdir(parents=True, exist_ok=True)
        stats.write_text(json.dumps({"backend": seg.backend_name, "scans": report}, indent=2) + "\n")
    seg.close()
    if failed:
        typer.echo(f"{len(scans) - len(failed)} of {len(scans)} scans segmented; failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
    if many and not quiet:
        typer.echo(f"{len(scans)} of {len(scans)} scans segmented")


def _predict(seg, image, scan: Path, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return seg.predict(image)
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"{scan.name}", total=None)
        return seg.predict(image, progress=lambda done, total: bar.update(task, completed=done, total=total))


def _fail(msg: str) -> None:
    typer.echo(f"imunet-run: error: {msg}", err=True)
    raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
