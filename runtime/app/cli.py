"""``imunet-run``: segment scans (files, folders, DICOM series directories) with a model bundle."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

from ..errors import ImunetError
from ..imaging.formats import WRITABLE_SUFFIXES
from .batch import (
    DICOM_FORMATS,
    SEG_SUFFIX,
    Job,
    check_destinations,
    check_outputs,
    collect_inputs,
    output_suffix,
    plan,
)
from .tables import TABLE_SUFFIXES, open_table

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


BUNDLE_DEFAULT = "Default: the bundle's."


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"imunet-run {version('imunet')}")
        raise typer.Exit()


def _list_models() -> None:
    """One block per shipped bundle: name, what it is for, labels and measured accuracy."""
    from ..contract.bundle import DEFAULT_MODEL, load_bundle, shipped_bundles

    for name, path in shipped_bundles().items():
        try:
            m = load_bundle(path, verify=False).manifest
        except ImunetError as exc:
            typer.echo(f"{name}: cannot be loaded ({exc})")
            continue
        default = " (default)" if name == DEFAULT_MODEL else ""
        labels = ", ".join(m.labels[k] for k in sorted(m.labels) if k)
        typer.echo(f"{name}{default}: {m.describe()}; {m.kind.name}")
        typer.echo(f"  labels: {labels}")
        acc = m.accuracy
        if acc.get("dice"):
            per = ", ".join(f"{k} {v:.4f}" for k, v in acc["dice"].items() if v is not None)
            typer.echo(f"  validation Dice: mean {acc['mean']:.4f} ({per}); {acc.get('note', '')}".rstrip("; "))
        else:
            typer.echo("  validation Dice: not recorded in the bundle")


def _fail(msg: str) -> None:
    typer.echo(f"imunet-run: error: {msg}", err=True)
    raise typer.Exit(2)


@app.command(help="Segment INPUT scans (NIfTI, NRRD, MHA files, folders of them, or DICOM series directories).")
def run(
    inputs: Optional[list[Path]] = typer.Argument(
        None, help="Scans, folders or DICOM directories.", show_default=False, metavar="SCAN|FOLDER..."
    ),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Bundle folder, or a shipped model's name (--list-models). Default: hippocampus."
    ),
    list_models: bool = typer.Option(False, "--list-models", help="List the shipped models and exit."),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output file (one scan) or folder, created if missing. Default: the current folder."
    ),
    backend: str = typer.Option("auto", help="auto | ort-cpu | openvino | ort-cuda | ort-trt | tensorrt."),
    precision: str = typer.Option(
        "auto",
        help="auto | fp32 | fp16 | int8 | bf16 (openvino). auto: the fastest the bundle and the machine allow.",
    ),
    mode: Optional[str] = typer.Option(None, help=f"adaptive | sparse | dense (implicit bundles). {BUNDLE_DEFAULT}"),
    overlap: Optional[float] = typer.Option(None, help=f"Sliding-window overlap in [0, 1). {BUNDLE_DEFAULT}"),
    stride: Optional[int] = typer.Option(None, help=f"Broad-mesh stride in voxels. {BUNDLE_DEFAULT}"),
    tta: bool = typer.Option(False, "--tta", help="Average over the scan's mirror images (8x the time)."),
    stats: Optional[Path] = typer.Option(
        None,
        "--stats",
        metavar="FILE.json",
        help="Per-scan timings, volumes and warnings as JSON. An existing file from an earlier run is added to "
        "(one entry per scan, every run listed), so a nightly job can keep one path.",
    ),
    table: Optional[Path] = typer.Option(
        None,
        "--table",
        metavar="FILE.csv|FILE.parquet",
        help="One row per scan (input, output, status, error, seconds, node, run, volumes, Dice estimates), "
        "written as each scan ends (Parquet: rewritten whole, atomically); an existing table of the same model "
        "is added to.",
    ),
    preview: Optional[Path] = typer.Option(
        None,
        "--preview",
        metavar="FILE.png|FOLDER",
        help="PNG of three slices through the largest label: FILE.png for one scan, or a FOLDER for CASE.png per scan.",
    ),
    fmt: str = typer.Option(
        ".nii.gz",
        "--format",
        help="Output format in folders: .nii.gz | .nii | .nrrd | .mha | .dcm (DICOM series: see --dicom-format).",
    ),
    dicom_format: str = typer.Option(
        "seg",
        "--dicom-format",
        help="What a .dcm output holds: seg (DICOM Segmentation) | rtstruct (RT Structure Set).",
    ),
    roi: Optional[list[str]] = typer.Option(
        None, "--roi", metavar="LABEL[,LABEL]", help="Write only these labels (names or numbers)."
    ),
    masks: bool = typer.Option(False, "--masks", help="Also one binary mask file per label: CASE_<label>."),
    save_probabilities: bool = typer.Option(
        False, "--save-probabilities", help="Also CASE_probabilities.npz: float16 class probabilities, scan's grid."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    skip_existing: bool = typer.Option(
        False,
        "--skip-existing",
        help="Skip scans whose outputs all exist, make only the missing ones otherwise (nightly runs).",
    ),
    series: Optional[str] = typer.Option(None, help="DICOM series instance UID (a folder's, or with --dicomweb)."),
    dicomweb: Optional[str] = typer.Option(None, "--dicomweb", help="DICOMweb server URL to read --study from."),
    study: Optional[str] = typer.Option(None, "--study", help="Study instance UID on the --dicomweb server."),
    store: bool = typer.Option(False, "--store", help="Store the DICOM SEG back on the --dicomweb server."),
    channel: Optional[int] = typer.Option(None, help="Volume index of a 4D input."),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="Refuse scans needing more GiB than this."),
    workers: Optional[int] = typer.Option(
        None, help="Windows computed at once on a CPU backend. Default: 2 with 2+ cores; GPUs run 1."
    ),
    trusted_keys: Optional[Path] = typer.Option(
        None, "--trusted-keys", help="Folder of public keys; the bundle must be signed by one of them."
    ),
    allow_modality: bool = typer.Option(
        False, "--allow-modality", help="Run DICOM scans of another modality than the model's (refused otherwise)."
    ),
    refuse_out_of_domain: bool = typer.Option(
        False,
        "--refuse-out-of-domain",
        help="Refuse (FAILED, exit 1, no output) a scan whose field of view or intensities lie far outside "
        "the training data, instead of segmenting it with a WARNING.",
    ),
    ray: Optional[str] = typer.Option(
        None,
        "--ray",
        metavar="ADDRESS|auto",
        help="Run the scans on a running Ray cluster (auto: the one this machine belongs to); outputs must be on a "
        "filesystem every node sees.",
    ),
    ray_workers: Optional[int] = typer.Option(
        None, "--ray-workers", help="Ray workers (each holds one model). Default: the cluster's CPUs / --ray-cpus."
    ),
    ray_cpus: int = typer.Option(1, "--ray-cpus", help="CPUs per Ray worker on CPU backends."),
    flag_below: Optional[float] = typer.Option(
        None,
        "--flag-below",
        metavar="DICE",
        help="Flag for review (a WARNING line, 'flagged' in --stats and --table) each scan whose lowest per-label "
        "Dice estimate is under DICE (0..1); the exit code stays 0.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors, warnings and the summary line."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from .pipeline import Segmenter
    from .scan_job import RunOptions, with_extras

    if list_models:
        _list_models()
        return
    if fmt not in (*WRITABLE_SUFFIXES, SEG_SUFFIX):
        _fail(f"--format must be one of {', '.join(WRITABLE_SUFFIXES)}, {SEG_SUFFIX}; got {fmt!r}")
    if overwrite and skip_existing:
        _fail("--overwrite and --skip-existing contradict each other; pass one")
    if table is not None and table.suffix.lower() not in TABLE_SUFFIXES:
        _fail(f"--table {table}: name a .csv or a .parquet file")
    if dicom_format not in DICOM_FORMATS:
        _fail(f"--dicom-format must be one of {', '.join(DICOM_FORMATS)}; got {dicom_format!r}")
    if flag_below is not None and not 0.0 <= flag_below <= 1.0:
        _fail(f"--flag-below {flag_below}: a Dice estimate lies between 0 and 1")
    _check_dicom_options(inputs, out, fmt, dicomweb, study, store, masks or save_probabilities)
    try:
        scans, notes = collect_inputs(inputs or [])
    except ImunetError as exc:
        _fail(str(exc))
    if not scans and not dicomweb:
        typer.echo(f"0 scans: nothing to segment in {', '.join(map(str, inputs or []))}")
        return
    if ray is not None:
        if dicomweb:
            _fail("--ray segments files and folders; --dicomweb reads one study: pass one of them")
        segmenter_options = dict(
            backend=backend, mode=mode, overlap=overlap, stride=stride, max_memory_gb=max_memory,
            precision=precision, trusted_keys=trusted_keys, allow_modality=allow_modality,
            refuse_out_of_domain=refuse_out_of_domain, tta=tta or None,
        )  # fmt: skip
        flags = (overwrite, skip_existing, masks, save_probabilities, series, channel, quiet, dicom_format,
                 flag_below)  # fmt: skip
        _run_on_ray((inputs or [], scans, notes), (model, segmenter_options), (ray, ray_workers, ray_cpus),
                    (out, fmt, preview, roi, stats, table), flags)  # fmt: skip
        return
    try:
        check_destinations(inputs or [], scans, out, preview)
        seg = Segmenter(
            model, backend=backend, mode=mode, overlap=overlap, stride=stride, max_memory_gb=max_memory,
            precision=precision, workers=workers, trusted_keys=trusted_keys, allow_modality=allow_modality,
            refuse_out_of_domain=refuse_out_of_domain, tta=tta or None,
        )  # fmt: skip
        from .outputs import roi_labels

        keep = roi_labels(roi, seg.bundle.manifest.labels) if roi else None
    except (ImunetError, ValueError) as exc:
        _fail(str(exc))
    started = datetime.now().astimezone().isoformat(timespec="milliseconds")
    if not quiet:
        _header(seg, notes)
    options = RunOptions(
        overwrite, skip_existing, keep, masks, save_probabilities, series, channel, quiet, dicom_format, flag_below
    )
    if dicomweb:
        from .dicomweb_run import StudyRequest, run_dicomweb

        request = StudyRequest(dicomweb, study, series, store)  # type: ignore[arg-type]
        ledger, rows = _open_records(seg, stats, table, started, [])
        report = [rows(run_dicomweb(seg, request, out, options))]
    else:
        labels = seg.bundle.manifest.labels
        jobs = [with_extras(job, labels, options) for job in plan(scans, out, fmt, preview)]
        ledger, rows = _open_records(seg, stats, table, started, jobs)
        report = [rows(_one(seg, job, i, len(scans), options)) for i, job in enumerate(jobs)]
    seg.close()
    rows.close()
    _finish(seg, report, (stats, ledger, started), quiet)


class _Rows:
    """Where each scan's report entry goes as it ends: the ``--table``, if one was asked for."""

    def __init__(self, table) -> None:
        self.table = table

    def __call__(self, entry: dict) -> dict:
        if self.table is not None:
            self.table.add(entry)
        return entry

    def close(self) -> None:
        if self.table is not None:
            self.table.close()


def _open_records(seg, stats: Path | None, table: Path | None, started: str, jobs: list[Job]) -> tuple:
    """Before any work: outputs distinct (:func:`.batch.check_outputs`), the ``--stats`` ledger read
    and the ``--table`` opened; exit 2 with one line if any of them cannot be."""
    from .stats_file import read_ledger

    others = [(p, what) for p, what in ((stats, "--stats"), (table, "--table")) if p is not None]
    try:
        check_outputs(jobs, others)
        ledger = read_ledger(stats) if stats is not None else None
        rows = _Rows(open_table(table, seg.bundle.manifest.labels, started) if table is not None else None)
    except ImunetError as exc:
        seg.close()
        _fail(str(exc))
    return ledger, rows


def _check_dicom_options(inputs, out, fmt, dicomweb, study, store, extras: bool) -> None:
    """Refuse, before any work, what the DICOM outputs cannot do."""
    seg_out = (out is not None and output_suffix(out) == SEG_SUFFIX) or fmt == SEG_SUFFIX
    if dicomweb:
        if inputs:
            _fail("--dicomweb reads its scan from the server; give no input files with it")
        if not study:
            _fail("--dicomweb needs --study UID")
        if not store and out is None:
            _fail("--dicomweb needs --store, --out FILE, or both")
        if out is not None and not output_suffix(out):
            _fail(f"--out {out}: with --dicomweb, name a file (.dcm for a DICOM SEG, or an image format)")
        return
    if not inputs:
        _fail("give scans, folders or DICOM directories, or --dicomweb URL --study UID")
    if study or store:
        _fail("--study and --store go with --dicomweb")
    if seg_out:
        not_dicom = [p for p in inputs if not p.is_dir()]
        if not_dicom:
            _fail(f"{not_dicom[0]}: a DICOM SEG ({SEG_SUFFIX}) references a DICOM series; this input is not one")
        if extras:
            _fail("--masks and --save-probabilities write images beside an image output, not beside a DICOM SEG")


def _header(seg, notes: list[str]) -> None:
    m = seg.bundle.manifest
    sig = seg.bundle.signature
    labels = ", ".join(v for k, v in m.labels.items() if k)
    windows = f"up to {seg.workers} windows at a time" if seg.workers > 1 else "one window at a time"
    mode = m.kind.mode_of(seg.settings.mode)
    typer.echo(f"model {seg.bundle.path.name}: {m.describe()}; {m.kind.name}, labels {labels}")
    typer.echo(
        f"bundle {sig.describe() if sig else 'unsigned'}; backend {seg.backend_name} ({seg.backend.precision}), "
        f"mode {mode}{', mirrored' if seg.settings.tta else ''}, {windows}"
    )
    for note in [*m.notes, *(f"passed over {s}" for s in seg.backend.skipped), *notes]:
        typer.echo(f"note: {note}", err=True)


def _run_on_ray(given: tuple, model_spec: tuple, cluster_spec: tuple, outputs: tuple, flags: tuple) -> None:
    """``imunet-run --ray``: the driver's side (:mod:`.ray_run`)."""
    from ..contract.bundle import load_bundle, resolve_model
    from .outputs import roi_labels
    from .ray_run import open_cluster, run_jobs
    from .scan_job import RunOptions, with_extras

    (inputs, scans, notes), (model, seg_options), (address, workers, cpus) = given, model_spec, cluster_spec
    out, fmt, preview, roi, stats, table = outputs
    overwrite, skip, masks, probs, series, channel, quiet, dicom_format, flag_below = flags
    try:
        check_destinations(inputs, scans, out, preview)
        path = resolve_model(model).resolve()
        bundle = load_bundle(path, trusted_keys=seg_options["trusted_keys"])
        keep = roi_labels(roi, bundle.manifest.labels) if roi else None
        cluster = open_cluster(address, str(path), seg_options, workers, cpus)
    except (ImunetError, ValueError) as exc:
        _fail(str(exc))
    driver = _Driver(bundle, cluster.backend)
    started = datetime.now().astimezone().isoformat(timespec="milliseconds")
    if not quiet:
        typer.echo(f"model {bundle.path.name}: {bundle.manifest.describe()}; Ray cluster {address}: "
                   f"{len(cluster.actors)} workers, backend {cluster.backend} ({cluster.precision})")  # fmt: skip
    for note in [*cluster.notes, *notes]:
        typer.echo(f"note: {note}", err=True)
    options = RunOptions(overwrite, skip, keep, masks, probs, series, channel, quiet, dicom_format, flag_below)
    jobs = [with_extras(job, bundle.manifest.labels, options) for job in plan(scans, out, fmt, preview)]
    ledger, rows = _open_records(driver, stats, table, started, jobs)
    report = [rows(report_scan(e, i, len(jobs), quiet)) for i, e in enumerate(run_jobs(cluster, jobs, options))]
    rows.close()
    _finish(driver, report, (stats, ledger, started), quiet)


@dataclass
class _Driver:
    """What the run's records need of the model when the Segmenters live on the workers."""

    bundle: object
    backend_name: str

    def close(self) -> None:
        pass


def _one(seg, job: Job, i: int, total: int, options) -> dict:
    """Segment one scan and write the outputs it lacks (:func:`.scan_job.process`), and say so."""
    from .scan_job import process

    if not job.dest.parent.exists() and not options.quiet:
        typer.echo(f"creating the output folder {job.dest.parent}")
    return report_scan(process(seg, job, options), i, total, options.quiet)


def report_scan(entry: dict, i: int, total: int, quiet: bool) -> dict:
    """Print one scan's lines (a FAILED line, WARNING lines, its progress line) and return its entry."""
    where = f"[{i + 1}/{total}] {Path(entry['input']).name}"
    if not entry["ok"]:
        typer.echo(f"FAILED {entry['error']}", err=True)
        return entry
    if entry.get("skipped"):
        if not quiet:
            typer.echo(f"{where}: skipped, its outputs exist ({entry['output']})")
        return entry
    for w in entry["warnings"]:
        typer.echo(f"WARNING {entry['input']}: {w}", err=True)
    if entry.get("flagged"):
        f = entry["flagged"]
        low = ", ".join(f"{k} {v:.3f}" for k, v in f["labels"].items())
        typer.echo(f"WARNING {entry['input']}: review: Dice estimate under {f['below']:g} ({low})", err=True)
    if not quiet:
        vols = ", ".join(f"{k} {v:.2f} ml" for k, v in entry["volumes_ml"].items())
        seconds = entry["read_s"] + entry["total_s"] + entry["write_s"]
        typer.echo(f"{where} -> {', '.join(entry['written'])}  {seconds:.2f} s  ({vols}){_lowest(entry)}")
    return entry


def _lowest(entry: dict) -> str:
    """``; lowest Dice estimate 0.84 (posterior)`` for the progress line (nothing without an estimate)."""
    q = entry.get("quality") or {}
    low = q.get("lowest")
    if not low:
        return ""
    note = "" if q["calibrated"] else ", uncalibrated"
    return f"; lowest Dice estimate {low['dice_estimate']:.2f} ({low['label']}{note})"


def _finish(seg, report: list[dict], stats: tuple, quiet: bool) -> None:
    from .stats_file import add_run, write_ledger

    path, ledger, started = stats
    failed = [r["input"] for r in report if not r["ok"]]
    skipped = sum(1 for r in report if r.get("skipped"))
    if path is not None:
        sig = seg.bundle.signature
        run = {
            "started": started,
            "model": str(seg.bundle.path),
            "signature": ({"key": sig.fingerprint, "verified": True} if sig.verified else {"verified": False})
            if sig
            else None,
            "backend": seg.backend_name,
        }
        write_ledger(path, add_run(ledger, run, report))
    done = len(report) - len(failed) - skipped
    line = f"{done} of {len(report)} scans segmented" + (f", {skipped} skipped (outputs exist)" if skipped else "")
    if failed:
        typer.echo(f"{line}; failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)
    typer.echo(line)


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM (a scheduler stopping the job) ends the run as an interruption does: temporary files
    and fetched series are removed on the way out instead of being left behind."""
    raise SystemExit(128 + signum)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="imunet-run")


if __name__ == "__main__":
    main()
