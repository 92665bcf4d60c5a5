"""DICOMweb servers that misbehave, as real HTTP servers on loopback: one that drips its answer a
byte a second, one that redirects elsewhere, one that wants other credentials, one whose Warning
header carries terminal escapes, one whose answer is too large. Each ends in one clear line, in time."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

pytest.importorskip("dicomweb_client")

from imunet.runtime.app.cli import app  # noqa: E402
from imunet.runtime.dicom.dicomweb import DicomWebError, connect, pick_series  # noqa: E402

runner = CliRunner()
STUDY = "1.2.826.0.1.3680043.8.498.1"


def serve(behaviour):
    """A loopback HTTP server whose GET handler is ``behaviour(handler)``; its base URL and the server."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            behaviour(self)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def answer(handler, body=b"[]", status=200, headers=()):
    handler.send_response(status)
    handler.send_header("Content-Type", "application/dicom+json")
    handler.send_header("Content-Length", str(len(body)))
    for k, v in headers:
        handler.send_header(k, v)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture()
def servers():
    started = []

    def start(behaviour):
        url, server = serve(behaviour)
        started.append(server)
        return url

    yield start
    for server in started:
        server.shutdown()


def dripping(delay_s):
    """A handler that promises 1,000 bytes and sends one every ``delay_s`` seconds."""

    def drip(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        try:
            for _ in range(1000):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(delay_s)
        except OSError:
            pass

    return drip


def test_a_dripping_server_is_cut_off_at_the_deadline(servers):
    url = servers(dripping(0.5))
    t = time.monotonic()
    with pytest.raises(DicomWebError, match="no complete answer within 2 s"):
        pick_series(connect(url, timeout=2), url, STUDY, None)
    assert time.monotonic() - t < 4


def test_the_dripping_server_through_the_command_line(servers, tmp_path, monkeypatch):
    url = servers(dripping(1.0))
    monkeypatch.setenv("IMUNET_DICOMWEB_TIMEOUT", "5")
    t = time.monotonic()
    res = runner.invoke(app, ["--dicomweb", url, "--study", STUDY, "--out", str(tmp_path / "o.dcm")])
    assert res.exit_code == 1 and "no complete answer within 5 s" in res.stderr
    assert time.monotonic() - t < 30 and not (tmp_path / "o.dcm").exists()


def test_redirects_stay_on_the_server(servers):
    elsewhere = servers(lambda h: answer(h))
    url = servers(lambda h: answer(h, b"", 302, [("Location", f"{elsewhere}{h.path}")]))
    with pytest.raises(DicomWebError, match=r"redirected to another server \(http://127.0.0.1:\d+\); refused"):
        pick_series(connect(url, timeout=5), url, STUDY, None)

    def within(handler):
        if handler.path.startswith("/moved"):
            answer(handler)  # an empty search: the study is not there
        else:
            answer(handler, b"", 301, [("Location", "/moved" + handler.path)])

    url = servers(within)
    with pytest.raises(DicomWebError, match="not found on the server"):  # followed, and answered
        pick_series(connect(url, timeout=5), url, STUDY, None)


def test_credentials_never_show_and_a_refusal_says_which(servers, tmp_path, monkeypatch):
    url = servers(lambda h: answer(h, b"", 401, [("WWW-Authenticate", 'Basic realm="pacs"')]))
    secret_url = url.replace("http://", "http://bob:s3cret-pw@")
    monkeypatch.delenv("IMUNET_DICOMWEB_USER", raising=False)
    res = runner.invoke(app, ["--dicomweb", secret_url, "--study", STUDY, "--out", str(tmp_path / "o.dcm"),
                              "--stats", str(tmp_path / "s.json")])  # fmt: skip
    assert res.exit_code == 1
    everything = res.stdout + res.stderr + (tmp_path / "s.json").read_text()
    assert "s3cret-pw" not in everything and "bob" not in everything and "***@127.0.0.1" in res.stderr
    assert "the server did not accept the credentials given" in res.stderr
    res = runner.invoke(app, ["--dicomweb", url, "--study", STUDY, "--out", str(tmp_path / "o.dcm")])
    assert "the server wants credentials (set IMUNET_DICOMWEB_USER" in res.stderr


def test_a_servers_warning_header_cannot_drive_the_terminal(servers, caplog):
    url = servers(lambda h: answer(h, b"[]", 200, [("Warning", '299 - "\x1b[2J\x1b[31mowned\x1b[0m"')]))
    with caplog.at_level(logging.WARNING), pytest.raises(DicomWebError, match="not found on the server"):
        pick_series(connect(url, timeout=5), url, STUDY, None)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "owned" in logged and "\x1b" not in logged


def test_an_answer_over_the_bound_is_refused(servers):
    body = json.dumps([{"0020000E": {"vr": "UI", "Value": ["1.2.3"]}}] * 200).encode()
    url = servers(lambda h: answer(h, body))
    with pytest.raises(DicomWebError, match="the answer exceeds"):
        pick_series(connect(url, timeout=5, max_bytes=1000), url, STUDY, None)
