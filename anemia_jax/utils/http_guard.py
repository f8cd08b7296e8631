"""What a local HTTP server must check before it trusts a request: its body's length, its Host, its origin; and a
threading server that queues a burst of connections instead of dropping them.

The standard library's ``http.server`` does none of this: ``int(headers['Content-Length'])`` accepts ``-1``, with
which ``rfile.read`` reads to the end of the stream past any limit; every ``Host`` is served, so a web page whose
host name is made to resolve to 127.0.0.1 (DNS rebinding) can script the server; a cross-origin ``text/plain`` form
post reaches it without a CORS preflight; and a listen backlog of 5 drops the connections of a burst of uploads.

* `content_length`: the declared body length, or the HTTP status and message that refuse it.
* `allowed_hosts` / `host_allowed`: the host names a ``Host`` header may carry for a server bound to an address.
* `foreign_origin`: the other site a browser says a request came from (``Origin``, ``Sec-Fetch-Site``), or None.
* `QueueingHTTPServer`: `ThreadingHTTPServer` with a long backlog and a bounded number of requests served at once.
* `drain_available`: reads what a client already sent without waiting, so that closing after a refusal does not
  reset the connection before the client reads the answer.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import threading
from collections.abc import Iterable
from email.message import Message
from http import HTTPStatus
from http.server import ThreadingHTTPServer

__all__ = ["BACKLOG", "MAX_WORKERS", "QueueingHTTPServer", "allowed_hosts", "content_length", "drain_available",
           "foreign_origin", "host_allowed", "split_host"]

BACKLOG = 128  # connections the kernel holds while every worker is busy (the standard library's default: 5)
MAX_WORKERS = 32  # requests served at once: bounds the memory of bodies being read (workers x the upload limit)


def content_length(headers: Message) -> tuple[int | None, HTTPStatus | None, str]:
    """``(length, None, '')`` for a body of one declared non-negative length; else ``(None, status, message)``:
    411 without a ``Content-Length`` or with a ``Transfer-Encoding`` (chunked bodies are not read), 400 for a length
    that is negative, not a whole number, or given twice with different values."""
    if headers.get("Transfer-Encoding"):
        return None, HTTPStatus.LENGTH_REQUIRED, "Send the body with a Content-Length, not chunked."
    values = {v.strip() for v in headers.get_all("Content-Length") or []}
    if not values:
        return None, HTTPStatus.LENGTH_REQUIRED, "Send the body with its Content-Length."
    value = values.pop()
    if values or not (value.isascii() and value.isdigit()):
        return None, HTTPStatus.BAD_REQUEST, "The Content-Length must be one whole, non-negative number of bytes."
    return int(value), None, ""


def split_host(host: str) -> tuple[str | None, int | None]:
    """``('localhost', 8000)`` of a Host header ``'LocalHost:8000'`` (``'[::1]:8000'`` -> ``('::1', 8000)``; no
    port -> None); ``(None, None)`` when malformed."""
    host = host.strip().lower()
    name, port = host, None
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        if rest and not rest.startswith(":"):
            return None, None
        port = rest[1:] or None
    elif host.count(":") == 1:
        name, port = host.split(":")
    elif ":" in host:
        return None, None  # an IPv6 address without brackets
    if not name or (port is not None and not (port.isascii() and port.isdigit())):
        return None, None
    return name.rstrip("."), None if port is None else int(port)


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The host names (lower case, no port) that a Host header may carry for a server bound to ``bound``: that
    address or name; for a loopback address also ``localhost``, ``127.0.0.1`` and ``::1``; for the wildcard
    (``0.0.0.0``, ``::``) also this machine's names (`host_allowed` then accepts any IP literal too); and ``extra``
    (e.g. the machine's name on the LAN)."""
    names = {bound.lower().strip("[]"), *(e.lower().strip("[]") for e in extra)}
    address = _address(bound)
    if bound.lower() == "localhost" or (address is not None and address.is_loopback):
        names |= {"localhost", "127.0.0.1", "::1"}
    if address is not None and address.is_unspecified:
        names |= {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(names)


def host_allowed(host_header: str | None, names: frozenset[str], port: int, *, any_ip: bool = False) -> bool:
    """Whether a request's Host header names this server: a name of ``names`` (or, with ``any_ip``, any IP
    literal) and no port or ``port``. A missing header (HTTP/1.0; browsers always send one) is allowed."""
    if host_header is None:
        return True
    name, given = split_host(host_header)
    if name is None or given not in (None, port):
        return False
    return name in names or (any_ip and _address(name) is not None)


def foreign_origin(headers: Message) -> str | None:
    """The other site a browser says sent this request (``Origin`` other than ``http://<Host>``, or a
    ``Sec-Fetch-Site`` other than same-origin / none), or None for the server's own page and for clients that are
    not browsers (they send neither header)."""
    origin, site = headers.get("Origin"), headers.get("Sec-Fetch-Site")
    if origin is not None and origin != f"http://{headers.get('Host', '')}":
        return origin
    if site is not None and site not in ("same-origin", "none"):
        return f"a {site} page"
    return None


def drain_available(connection: socket.socket, limit: int = 1 << 20) -> None:
    """Reads and drops what the peer has already sent (at most ``limit`` bytes), without waiting for more. Closing a
    socket with unread bytes makes the kernel send a reset, which can destroy the answer before the client reads it.
    """
    left = limit
    try:
        while left > 0 and select.select([connection], [], [], 0)[0]:
            chunk = connection.recv(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)
    except OSError:
        pass


class QueueingHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with a listen backlog of `BACKLOG` and at most ``max_workers`` requests served at
    once: the accept loop waits for a free worker, so the connections of a burst wait in the kernel's backlog rather
    than being refused or reset, and each gets its answer in turn."""

    request_queue_size = BACKLOG
    daemon_threads = True

    def __init__(self, address, handler, *, max_workers: int = MAX_WORKERS):
        self._workers = threading.BoundedSemaphore(max_workers)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        self._workers.acquire()
        try:
            super().process_request(request, client_address)  # starts the request's thread
        except BaseException:
            self._workers.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._workers.release()
