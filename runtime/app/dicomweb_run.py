"""``imunet-run --dicomweb URL --study UID``: retrieve the study's image series, segment it, write
the DICOM SEG locally (``--out``) and/or store it back (``--store``). One study, one report entry."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import typer

from ..errors import ImunetError
from .batch import SEG_SUFFIX
from .failures import failure_message
from .memory import default_cap_gib
from .scan_job import RunOptions

RESPONSE_SHARE = 0.25  # of the memory cap: the answer's bytes, its parsed instances and the image coexist


@dataclass(frozen=True)
class StudyRequest:
    """Which study to segment on which server: ``series`` None takes its one image series;
    ``store`` sends the DICOM SEG back to the server."""

    url: str
    study: str
    series: str | None = None
    store: bool = False


def run_dicomweb(seg, request: StudyRequest, out: Path | None, options: RunOptions) -> dict:
    """Segment one series of a DICOMweb study; a failure is reported in one line, never raised."""
    url, study, series, store = request.url, request.study, request.series, request.store
    from ..dicom.dicom_seg import write_segmentation
    from ..dicom.dicomweb import connect, fetch_series, pick_series
    from ..dicom.dicomweb import store as store_instance
    from ..dicom.http_session import redact
    from ..imaging.io import read_image, series_files, write_image_atomic
    from .outputs import dicom_object, keep_labels

    where = f"{redact(url)} study {study}"
    try:
        if out is not None and out.exists() and not options.overwrite:
            raise ImunetError(f"{out}: exists; pass --overwrite to replace it")
        cap_gib = seg.checks.max_memory_gb or default_cap_gib() or 16.0
        client = connect(url, max_bytes=int(cap_gib * 2**30 * RESPONSE_SHARE))
        uid = pick_series(client, url, study, series)
        with tempfile.TemporaryDirectory(prefix="imunet-dicomweb-") as tmp:
            t = time.perf_counter()
            fetch_series(client, url, study, uid, Path(tmp))
            image, files = read_image(Path(tmp), series=uid), series_files(Path(tmp), uid)
            fetch_s = round(time.perf_counter() - t, 4)
            result = seg.segment(image)
            label = keep_labels(result.labels, options.keep)
            t = time.perf_counter()
            dataset = dicom_object(label, files, seg.bundle, options.dicom_format)  # whole, before writing or storing
            seg_s = round(time.perf_counter() - t, 4)
        if out is not None:
            if out.name.lower().endswith(SEG_SUFFIX):
                write_segmentation(dataset, out, options.overwrite)
            else:
                write_image_atomic(label, out, options.overwrite)
        if store:
            store_instance(client, url, dataset)
    except Exception as exc:  # one study's failure is one line, never a traceback
        msg = failure_message(where, exc)
        typer.echo(f"FAILED {msg}", err=True)
        return {"input": where, "ok": False, "error": msg}
    stats = {**result.stats, "fetch_s": fetch_s, "seg_s": seg_s}
    for w in stats["warnings"]:
        typer.echo(f"WARNING {where}: {w}", err=True)
    if not options.quiet:
        dest = " and ".join(x for x in (str(out) if out else "", "stored on the server" if store else "") if x)
        vols = ", ".join(f"{k} {v:.2f} ml" for k, v in stats["volumes_ml"].items())
        what = "RT Structure Set" if options.dicom_format == "rtstruct" else "DICOM SEG"
        typer.echo(f"series {uid} -> {what} {dataset.SeriesInstanceUID} ({dest})  ({vols})")
    return {"input": where, "series": uid, "seg_series": str(dataset.SeriesInstanceUID), "ok": True, **stats}
