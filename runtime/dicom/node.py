"""imunet as a DICOM node (pynetdicom, the ``dicom`` extra): a C-STORE SCP that writes every instance
to a spool folder before it acknowledges it, and a C-STORE SCU that sends results on.

The spool is the node's whole state, so a node killed at any moment and restarted on the same spool
finishes what it had::

    SPOOL/incoming/SERIES_UID/SOP_UID.dcm   received instances (each written aside, then renamed)
    SPOOL/results/SERIES_UID.dcm            a series' result, written before it is sent
    SPOOL/done/SERIES_UID.json              what became of a series (sent or refused): never redone

A series is ready once no instance of it arrived for ``quiet_s`` seconds (a released association
alone does not mean it is complete). Results carry UIDs derived from the source series and the
bundle, so a result sent again after a crash is the same object to the receiver, stored once.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from .dicomweb import NON_IMAGE

_UID = re.compile(r"^[0-9.]{1,64}$")


def _pynetdicom() -> Any:
    try:
        import pynetdicom
    except ImportError:
        raise InputError("imunet-serve needs pynetdicom: pip install 'imunet[dicom]'") from None
    return pynetdicom


@dataclass(frozen=True)
class Peer:
    """A DICOM node to send to: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Peer:
        match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text)
        if not match:
            raise InputError(f"--send-to {text!r}: expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104")
        return cls(match[1], match[2], int(match[3]))


class Spool:
    """The node's folders (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming, self.results, self.done = root / "incoming", root / "results", root / "done"
        for folder in (self.incoming, self.results, self.done):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def store(self, dataset: Any) -> Path:
        """Write a received instance durably under its series; its path."""
        series, sop = str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID)
        if not (_UID.match(series) and _UID.match(sop)):
            raise InputError(f"instance with unusable UIDs: series {series[:70]!r}, instance {sop[:70]!r}")
        folder = self.incoming / series
        folder.mkdir(exist_ok=True, mode=0o700)
        final, tmp = folder / f"{sop}.dcm", folder / f".{sop}.{os.getpid()}.part"
        with tmp.open("wb") as fh:
            dataset.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final

    def ready(self, quiet_s: float, now: float | None = None) -> list[Path]:
        """Series folders with no new instance for ``quiet_s`` seconds, oldest first."""
        now = time.time() if now is None else now
        found = []
        for folder in self.incoming.iterdir():
            files = [f for f in folder.iterdir() if f.suffix == ".dcm" and not f.name.startswith(".")]
            if folder.is_dir() and files and now - max(f.stat().st_mtime for f in files) >= quiet_s:
                found.append((max(f.stat().st_mtime for f in files), folder))
        return [folder for _, folder in sorted(found)]

    def finish(self, series: Path, record: dict) -> None:
        """Record what became of ``series`` and remove its instances and result (no patient data is
        kept once a series is dealt with)."""
        marker = self.done / f"{series.name}.json"
        tmp = marker.with_name(f".{marker.name}.part")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, marker)
        for f in series.iterdir():
            f.unlink(missing_ok=True)
        series.rmdir()
        (self.results / f"{series.name}.dcm").unlink(missing_ok=True)

    def is_done(self, series_uid: str) -> bool:
        return (self.done / f"{series_uid}.json").exists()


def start_scp(spool: Spool, ae_title: str, host: str, port: int, log) -> Any:
    """A C-STORE SCP for CT and MR images (and the other storage classes pynetdicom knows) that
    acknowledges an instance only once it is in the spool; the running server."""
    pynetdicom = _pynetdicom()
    from pynetdicom import AE, evt

    ignored: set[str] = set()

    def on_store(event: Any) -> int:
        try:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            series, modality = str(dataset.SeriesInstanceUID), str(dataset.get("Modality", "")).upper()
            if modality in NON_IMAGE:  # segmentations, structure sets, reports: accepted, not segmented
                if series not in ignored:
                    ignored.add(series)
                    log(f"ignored series {series}: {modality} holds no image to segment")
                return 0x0000
            if spool.is_done(series):
                return 0x0000  # a resend of a series already dealt with: nothing to do again
            spool.store(dataset)
        except Exception as exc:  # refuse this instance (the sender keeps it), never crash the node
            log(f"refused an instance from {event.assoc.requestor.ae_title}: {exc}")
            return 0xA700  # out of resources: the sender may retry
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = pynetdicom.AllStoragePresentationContexts
    ae.maximum_pdu_size = 0
    return ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


def send(path: Path, peer: Peer, ae_title: str, timeout_s: float = 60.0) -> None:
    """C-STORE one file to ``peer``; :class:`InputError` unless it was stored."""
    _pynetdicom()
    import pydicom
    from pynetdicom import AE

    dataset = pydicom.dcmread(str(path))
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise InputError(f"cannot associate with {peer.ae_title}@{peer.host}:{peer.port}")
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code not in (0x0000, 0xB000, 0xB007, 0xB006):  # success, or stored with coercion / warnings
        raise InputError(f"{peer.ae_title} did not store the result (status {code if code is None else hex(code)})")
