"""The screening page's HTTP layer against hostile and careless clients (a service on the tiny run of _tiny_run.py,
without a screening model): body lengths that lie, a burst of uploads while the server is slow to accept, a foreign
``Host`` (DNS rebinding), cross-origin posts (CSRF), the headers of every response (the standard library's own error
pages included), and file names that a spreadsheet would run as formulas.

Requests are written byte by byte on raw sockets where ``http.client`` would correct them."""

from __future__ import annotations

import csv
import io
import json
import socket
import threading

import jax
import numpy as np
import PIL.Image
import pytest
from _tiny_run import workdir  # noqa: F401 -- pytest fixture

from anemia_jax.inference import segmenter
from anemia_jax.runs import restore
from anemia_jax.screening import app_server
from anemia_jax.utils import parallel

MAX_UPLOAD = 200_000


def _png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(workdir):  # noqa: F811 -- fixture
    run = restore.load_run(workdir, checkpoint="best", mesh=parallel.make_mesh(jax.local_devices()[:1]))
    return app_server.ScreeningService(segmenter.Segmenter([run], batch_size=1))


@pytest.fixture(scope="module")
def server(service):
    server = app_server.make_server(service, "127.0.0.1", 0, max_upload_bytes=MAX_UPLOAD)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _exchange(port: int, request: bytes, *, half_close: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Sends ``request`` raw, then reads the whole answer: (status, headers with lower-case names, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)  # what lets a server that reads "to the end" get there
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _post(port: int, body: bytes, *, headers: dict[str, str] | None = None, name: str = "x.png") -> bytes:
    fields = {"Host": f"127.0.0.1:{port}", "Content-Length": str(len(body)), **(headers or {})}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return f"POST /api/photo?name={name} HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode() + body


def _get(port: int, path: str = "/", host: str | None = None) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\nConnection: close\r\n\r\n".encode()


# ------------------------------------------------------------------------------------------- body length


def test_a_negative_content_length_is_refused_unread(server, service, monkeypatch):
    port = server.server_address[1]
    analysed = []
    monkeypatch.setattr(service, "analyse", lambda data, name, sex=None: analysed.append(len(data)) or {})
    big = _png() + b"\0" * (MAX_UPLOAD + 1000)  # a valid photo, padded past the limit
    status, _, body = _exchange(port, _post(port, big, headers={"Content-Length": "-1"}))
    assert status == 400 and "Content-Length" in json.loads(body)["error"]
    assert analysed == []


@pytest.mark.parametrize("headers, expected", [
    ({"Content-Length": None}, 411),
    ({"Content-Length": None, "Transfer-Encoding": "chunked"}, 411),
    ({"Content-Length": "12abc"}, 400),
    ({"Content-Length": "+5"}, 400),
])
def test_content_lengths_that_cannot_be_trusted(server, headers, expected):
    port = server.server_address[1]
    status, _, body = _exchange(port, _post(port, b"5\r\nhello\r\n0\r\n\r\n", headers=headers))
    assert status == expected and json.loads(body)["error"]


def test_two_different_content_lengths_are_refused(server):
    port = server.server_address[1]
    request = (f"POST /api/photo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 3\r\nContent-Length: 300\r\n"
               "Connection: close\r\n\r\nabc").encode()
    assert _exchange(port, request)[0] == 400


# ----------------------------------------------------------------------------------------------- a burst


def test_a_burst_of_uploads_while_the_server_is_slow_to_accept_is_all_answered(service):
    """20 clients connect while the accept loop is held (a busy server); once it runs, each gets its answer. With the
    standard library's backlog of 5, all but 6 of them could not even connect."""
    server = app_server.make_server(service, "127.0.0.1", 0, max_upload_bytes=MAX_UPLOAD)
    port = server.server_address[1]
    data = _png(1)
    connected, answers, sockets = [], [None] * 20, [None] * 20
    lock = threading.Lock()

    def connect(i):
        try:
            # The kernel completes a handshake while the backlog has room, however busy the machine: this timeout is
            # reached only when the backlog is full.
            sockets[i] = socket.create_connection(("127.0.0.1", port), timeout=20)
            sockets[i].sendall(_post(port, data, name=f"p{i}.png"))
            sockets[i].settimeout(None)
        except OSError as e:
            sockets[i] = e
        with lock:
            connected.append(i)

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        failed = {i: repr(s) for i, s in enumerate(sockets) if isinstance(s, OSError)}
        assert not failed, f"{len(failed)} of 20 clients could not connect: {failed}"

        def read(i):
            with sockets[i] as s:
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
            answers[i] = b"".join(chunks).split(b" ", 2)[1]

        readers = [threading.Thread(target=read, args=(i,)) for i in range(20)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    finally:
        server.shutdown()
        server.server_close()
    assert answers == [b"200"] * 20


# -------------------------------------------------------------------------------------- where from, headers


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1", "[::1]x"])
def test_a_foreign_host_is_refused(server, host):
    port = server.server_address[1]
    status, headers, body = _exchange(port, _get(port, "/api/info", host.format(port=port)))
    assert status == 421 and "not for" in json.loads(body)["error"]
    status, _, _ = _exchange(port, _post(port, _png(), headers={"Host": host.format(port=port)}))
    assert status == 421


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_the_bound_address_and_localhost_are_served(server, host):
    port = server.server_address[1]
    assert _exchange(port, _get(port, "/healthz", host.format(port=port)))[0] == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example", "Content-Type": "text/plain"},
    {"Origin": "null", "Content-Type": "text/plain"},
    {"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"},
    {"Origin": "http://localhost:1", "Sec-Fetch-Site": "same-site"},
])
def test_cross_origin_uploads_are_refused(server, service, monkeypatch, headers):
    port = server.server_address[1]
    monkeypatch.setattr(service, "analyse", lambda *a, **k: pytest.fail("a cross-origin upload was analysed"))
    status, _, body = _exchange(port, _post(port, _png(), headers=headers))
    assert status == 403 and "own page" in json.loads(body)["error"]


def test_the_pages_own_upload_is_served(server):
    port = server.server_address[1]
    own = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    status, _, body = _exchange(port, _post(port, _png(), headers=own))
    assert status == 200, body


@pytest.mark.parametrize("request_bytes, expected", [
    (b"PUT / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 501),
    (b"BREW /pot HTTP/1.1\r\n\r\n", 501),
    (b"GET / / HTTP/1.1\r\n\r\n", 400),
    (b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n", 404),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n", 200),
])
def test_every_response_carries_the_security_headers(server, request_bytes, expected):
    port = server.server_address[1]
    status, headers, _ = _exchange(port, request_bytes.replace(b"{port}", str(port).encode()))
    assert status == expected
    assert "default-src 'none'" in headers["content-security-policy"], headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["server"] == "anemia_jax", headers["server"]


# ------------------------------------------------------------------------------------------------------- CSV


def test_file_names_reach_the_csv_as_text_never_as_formulas(server):
    port = server.server_address[1]
    name = "=HYPERLINK(%22http://evil.invalid%22,%22x%22)"
    status, _, body = _exchange(port, _post(port, _png(), name=name))
    assert status == 200, body
    result = json.loads(body)
    status, _, csv_body = _exchange(port, _get(port, f"/results.csv?ids={result['id']}"))
    rows = list(csv.DictReader(io.StringIO(csv_body.decode())))
    assert [r["file"] for r in rows] == ['\'=HYPERLINK("http://evil.invalid","x")']


def test_an_unreadable_upload_is_described_not_a_buffer(server):
    port = server.server_address[1]
    status, _, body = _exchange(port, _post(port, b"GIF89a but not really", name="odd.gif"))
    message = json.loads(body)["error"]
    assert status == 415 and "odd.gif" in message and "BytesIO" not in message, message
