"""``imunet-serve``: imunet as a DICOM node. A scanner or PACS pushes a series (C-STORE); once the
series is complete (no new instance for ``--quiet-seconds``) it is segmented and the result (DICOM
SEG or RT Structure Set) is pushed to ``--send-to``. One log line per series; refusals (another
modality, a scan outside the model's domain: what ``imunet-run --refuse-out-of-domain`` refuses) go
to the log, not to the PACS. The spool (:mod:`..dicom.node`) is the node's state: killed and
restarted on the same spool, it finishes what it had and loses nothing."""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"imunet-serve {version('imunet')}")
        raise typer.Exit()


def _log(message: str) -> None:
    typer.echo(f"{datetime.now().astimezone().isoformat(timespec='seconds')} {message}", err=True)


@app.command(help="Receive DICOM series (C-STORE), segment each, and send the result on.")
def serve(
    port: int = typer.Option(..., "--port", help="TCP port to listen on."),
    ae_title: str = typer.Option("IMUNET", "--ae-title", help="This node's AE title."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address to listen on."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Bundle folder or shipped name."),
    dicom_format: str = typer.Option("seg", "--dicom-format", help="seg | rtstruct: what is sent back."),
    send_to: str = typer.Option(..., "--send-to", metavar="AE@HOST:PORT", help="Where results go (C-STORE)."),
    spool: Path = typer.Option(..., "--spool", help="Folder for received series and results (the node's state)."),
    quiet_seconds: float = typer.Option(10.0, "--quiet-seconds", help="A series is complete after this long quiet."),
    backend: str = typer.Option("auto", help="auto | ort-cpu | openvino | ort-cuda | ort-trt | tensorrt."),
    allow_modality: bool = typer.Option(False, "--allow-modality", help="Segment series of another modality."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from ..dicom.node import Peer, Spool, send, start_scp
    from ..errors import ImunetError
    from .pipeline import Segmenter

    try:
        peer = Peer.parse(send_to)
        if dicom_format not in ("seg", "rtstruct"):
            raise ImunetError(f"--dicom-format must be seg or rtstruct, not {dicom_format!r}")
        folders = Spool(spool)
        seg = Segmenter(model, backend=backend, allow_modality=allow_modality, refuse_out_of_domain=True)
        server = start_scp(folders, ae_title, host, port, _log)
    except (ImunetError, OSError, ValueError) as exc:
        typer.echo(f"imunet-serve: error: {exc}", err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _log(f"{ae_title} listening on {host}:{port}; model {seg.bundle.path.name}; results to {send_to}; spool {spool}")
    retry_at: dict[str, float] = {}  # series whose result could not be sent: when to try again
    try:
        while not stop.is_set():
            for series in folders.ready(quiet_seconds):
                if retry_at.get(series.name, 0.0) <= time.monotonic() and not _handle(
                    seg, folders, series, peer, ae_title, dicom_format, send
                ):
                    retry_at[series.name] = time.monotonic() + RETRY_S
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        seg.close()
        _log("stopped")


RETRY_S = 30.0  # a result the destination did not take is sent again after this long


def _handle(seg, folders, series: Path, peer, ae_title: str, dicom_format: str, send) -> bool:
    """Segment one complete series and send its result; one log line either way. False when the
    result is made but not sent (the destination is down): it stays in the spool for a retry."""
    from ..imaging.atomic import atomic_output
    from ..imaging.io import read_image, series_files
    from .failures import failure_message
    from .outputs import dicom_object

    t = time.perf_counter()
    result = folders.results / f"{series.name}.dcm"
    try:
        files = series_files(series, None)
        study = _study(files[0])
        if not result.exists():  # a result written before a crash is sent as it is
            label = seg.segment(read_image(series)).labels
            with atomic_output(result, overwrite=True) as tmp:
                dicom_object(label, files, seg.bundle, dicom_format).save_as(str(tmp), enforce_file_format=True)
    except Exception as exc:  # a refusal or failure is logged, never sent to the PACS
        message = failure_message(f"series {series.name}", exc)
        _log(f"REFUSED {message}")
        folders.finish(series, {"status": "refused", "reason": message})
        return True
    try:
        send(result, peer, ae_title)
    except Exception as exc:  # the destination is down or said no: keep everything, try again later
        _log(f"NOT SENT {failure_message(f'series {series.name}', exc)}; trying again in {RETRY_S:g} s")
        return False
    _log(f"study {study} series {series.name}: {len(files)} images segmented, {dicom_format} sent to "
         f"{peer.ae_title}@{peer.host}:{peer.port} ({time.perf_counter() - t:.1f} s)")  # fmt: skip
    folders.finish(series, {"status": "sent", "to": f"{peer.ae_title}@{peer.host}:{peer.port}"})
    return True


def _study(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(str(path), stop_before_pixels=True).get("StudyInstanceUID", "?"))


def main() -> None:
    app(prog_name="imunet-serve")


if __name__ == "__main__":
    main()
