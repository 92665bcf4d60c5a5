"""A study on a PACS in, a DICOM SEG back: retrieval (WADO-RS), search (QIDO-RS) and storage
(STOW-RS) through dicomweb-client (the ``dicom`` extra). Every server error becomes one line.

Credentials, where the server asks for them, come from ``IMUNET_DICOMWEB_USER`` and
``IMUNET_DICOMWEB_PASSWORD`` (never from the command line, where other users would see them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import InputError

NON_IMAGE = {"SEG", "SR", "RTSTRUCT", "PR", "KO", "DOC", "REG", "RTPLAN", "RTDOSE", "RTRECORD", "OT-NOIMAGE"}
MODALITY, SERIES_UID = "00080060", "0020000E"


class DicomWebError(InputError):
    """The server said no, or did not answer."""


DEFAULT_MAX_BYTES = 4 << 30


def connect(url: str, timeout: float | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """A DICOMweb client for ``url``: basic authentication from the environment, every request
    bounded by a deadline in seconds from start to end (``timeout``, else ``IMUNET_DICOMWEB_TIMEOUT``,
    default 60) and by ``max_bytes``, redirects only within the server (:mod:`.http_session`)."""
    timeout = timeout if timeout is not None else float(os.environ.get("IMUNET_DICOMWEB_TIMEOUT", "60"))
    try:
        from dicomweb_client.api import DICOMwebClient

        from .http_session import BoundedSession
    except ImportError:
        raise InputError("DICOMweb needs the dicom extra: pip install 'imunet[dicom]'") from None
    session = BoundedSession(url, timeout, max_bytes)
    user = os.environ.get("IMUNET_DICOMWEB_USER")
    if user:
        session.auth = (user, os.environ.get("IMUNET_DICOMWEB_PASSWORD", ""))
    client = DICOMwebClient(url, session=session, timeout=timeout)
    # The client would retry any failed request up to 5 times with growing waits (about 40 s for a
    # 2 s deadline): a study fails in one line instead, and the next run is the retry.
    client.set_http_retry_params(retry=False)
    return client


@contextmanager
def server_errors(url: str, what: str) -> Iterator[None]:
    """Turn the ways a DICOMweb call fails into one :class:`DicomWebError` line (credentials in
    ``url`` never shown)."""
    import requests

    from .http_session import DeadlinePassed, RedirectRefused, ResponseTooLarge, redact

    where = redact(url)
    try:
        yield
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        with_credentials = bool(os.environ.get("IMUNET_DICOMWEB_USER")) or "@" in urlsplit(url).netloc
        unauthorised = (
            "the server did not accept the credentials given"
            if with_credentials
            else "the server wants credentials (set IMUNET_DICOMWEB_USER and IMUNET_DICOMWEB_PASSWORD)"
        )
        reason = {401: unauthorised, 403: "the server refused the credentials", 404: "not found on the server"}.get(
            code, f"the server answered HTTP {code}"
        )
        raise DicomWebError(f"{where}: {what}: {reason}") from None
    except (DeadlinePassed, RedirectRefused, ResponseTooLarge) as exc:
        raise DicomWebError(f"{where}: {what}: {exc}") from None
    except requests.exceptions.Timeout:
        raise DicomWebError(f"{where}: {what}: no answer in time") from None
    except requests.exceptions.RequestException as exc:
        raise DicomWebError(f"{where}: {what}: cannot reach the server ({type(exc).__name__})") from None


def _value(entry: dict, tag: str) -> str:
    return str((entry.get(tag, {}).get("Value") or [""])[0])


def pick_series(client: Any, url: str, study: str, series: str | None) -> str:
    """The series to segment: ``series`` if it is an image series of ``study``, else the study's one
    image series (several: an error that lists them)."""
    with server_errors(url, f"study {study}"):
        found = client.search_for_series(study_instance_uid=study, fields=["Modality"])
    if not found:
        raise DicomWebError(f"{url}: study {study}: not found on the server")
    modalities = {_value(e, SERIES_UID): _value(e, MODALITY).upper() for e in found}
    if series is not None:
        if series not in modalities:
            raise DicomWebError(f"{url}: series {series} is not in study {study}")
        if modalities[series] in NON_IMAGE:
            raise DicomWebError(f"{url}: series {series} is not an image series (Modality {modalities[series]})")
        return series
    images = [uid for uid, mod in modalities.items() if mod not in NON_IMAGE]
    if len(images) != 1:
        listing = ", ".join(f"{uid} ({modalities[uid]})" for uid in images) or "none"
        raise DicomWebError(f"{url}: study {study} has {len(images)} image series; pick one with --series: {listing}")
    return images[0]


def fetch_series(client: Any, url: str, study: str, series: str, folder: Path) -> list[Path]:
    """Retrieve every instance of a series into ``folder``; their paths."""
    with server_errors(url, f"series {series}"):
        datasets = client.retrieve_series(study, series)
    if not datasets or not all("PixelData" in ds for ds in datasets):
        raise DicomWebError(f"{url}: series {series} is not an image series (no pixel data)")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = folder / f"{i:05d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def store(client: Any, url: str, dataset: Any) -> None:
    """Store one instance (STOW-RS); an error if the server does not accept it."""
    with server_errors(url, "storing the segmentation"):
        response = client.store_instances([dataset])
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        raise DicomWebError(f"{url}: the server refused the segmentation ({len(failed)} instance failed)")
