"""The HTTP session every DICOMweb call goes through, holding the server to what a hospital job needs:

- a **deadline per request**, from its start to its last byte (``IMUNET_DICOMWEB_TIMEOUT``): a
  server that answers a byte at a time cannot hold a run, as a per-read timeout would let it;
- a **bound on the bytes** of one answer, so that a huge response is refused, not held in memory;
- **redirects only within the server's origin** (scheme, host and port): a study fetched from
  another server is not the one asked for;
- **no credentials in any message**: ``user:password@`` in a URL is redacted wherever it is shown;
- the server's ``Warning`` header, which the DICOMweb client logs, stripped of control characters.

The request runs in a daemon thread that the caller waits for until the deadline; a request still
stuck then is abandoned (its connection closed with the session, the thread ends with the process).
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

MAX_REDIRECTS = 5
CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class RedirectRefused(requests.exceptions.RequestException):
    """The server redirected to another origin."""


class ResponseTooLarge(requests.exceptions.RequestException):
    """The answer exceeded the byte bound."""


class DeadlinePassed(requests.exceptions.Timeout):
    """The request did not end within its deadline."""


def redact(url: str) -> str:
    """``url`` without the ``user:password@`` part, if it has one."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of ``url`` (the port made explicit for http and https)."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port or default


def printable(text: str, limit: int = 300) -> str:
    """``text`` without control characters (ANSI escapes included), at most ``limit`` characters."""
    clean = _CONTROL.sub("?", text)
    return clean if len(clean) <= limit else clean[:limit] + "..."


class BoundedSession(requests.Session):
    """A :class:`requests.Session` whose every request obeys the rules in the module's docstring."""

    def __init__(self, base_url: str, deadline_s: float, max_bytes: int) -> None:
        super().__init__()
        self.origin, self.deadline_s, self.max_bytes = origin(base_url), deadline_s, max_bytes

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["response"] = self._bounded(method, url, *args, **kwargs)
            except requests.exceptions.Timeout:  # the socket's own timeout is the same deadline:
                result["error"] = DeadlinePassed(f"no complete answer within {self.deadline_s:g} s")
            except BaseException as exc:  # handed to the waiting thread
                result["error"] = exc

        worker = threading.Thread(target=work, name="imunet-dicomweb-request", daemon=True)
        worker.start()
        worker.join(self.deadline_s)
        if worker.is_alive():
            self.close()  # pooled connections go; the stuck one ends with its thread or the process
            raise DeadlinePassed(f"no complete answer within {self.deadline_s:g} s")
        if "error" in result:
            raise result["error"]
        return result["response"]

    def _bounded(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        start = time.monotonic()
        kwargs.update(allow_redirects=False, stream=True)
        kwargs.setdefault("timeout", self.deadline_s)
        for _ in range(MAX_REDIRECTS + 1):
            response = super().request(method, url, *args, **kwargs)
            if not response.is_redirect:
                break
            target = urljoin(response.url, response.headers["location"])
            response.close()
            if origin(target) != self.origin:
                where = "{}://{}:{}".format(*origin(target))
                raise RedirectRefused(f"redirected to another server ({redact(where)}); refused")
            url = target
            if response.status_code == 303:
                method, kwargs = "GET", {k: v for k, v in kwargs.items() if k not in ("data", "files", "json")}
        else:
            raise RedirectRefused(f"more than {MAX_REDIRECTS} redirects")
        self._read(response, start)
        if "Warning" in response.headers:
            response.headers["Warning"] = printable(response.headers["Warning"])
        return response

    def _read(self, response: requests.Response, start: float) -> None:
        """Read the whole body now, within the byte bound, so that nothing later reads the network."""
        chunks, total = [], 0
        for chunk in response.iter_content(CHUNK):
            total += len(chunk)
            if total > self.max_bytes:
                response.close()
                raise ResponseTooLarge(f"the answer exceeds {self.max_bytes / 2**30:.2g} GiB")
            if time.monotonic() - start > self.deadline_s:
                response.close()
                raise DeadlinePassed(f"no complete answer within {self.deadline_s:g} s")
            chunks.append(chunk)
        response._content = b"".join(chunks)  # requests' own cache of a read body: .content and
        response._content_consumed = True  # iter_content then serve it without the network
