"""The local screening page's server: photo bytes in, masks, verdict and Hb estimate out, over HTTP on this machine.

`ScreeningService` decodes an upload with limits (`image_io.decode_photo`), segments it (`Segmenter`) and assesses it
(`photo_report.PhotoAssessor`) under one lock, and keeps recent results for the batch CSV; `make_server` serves it
with the page (`anemia_jax.screening.app_page`) on a `ThreadingHTTPServer`. The command that starts it is
``python -m anemia_jax.app``.

The HTTP layer trusts nothing a client sends:

* **Bodies**: an upload needs a ``Content-Length`` (411 without one, and for ``Transfer-Encoding: chunked``); a
  negative, malformed or repeated-and-different length is a 400; one over the limit a 413, refused before reading.
* **Bursts**: the listen backlog holds `http_guard.BACKLOG` connections and at most `http_guard.MAX_WORKERS` are
  served at once (the others wait in the backlog, not refused), so a burst of uploads is queued and each answered.
* **Where requests come from**: the ``Host`` header must name the address the server is bound to (a DNS-rebinding
  page's host name is refused, 421), and a request that changes state (``POST``) from a page of another origin
  (``Origin`` / ``Sec-Fetch-Site``) is refused (403): a cross-origin ``text/plain`` form post cannot upload.
* **Every response**, errors and the standard library's own 400/501 pages included, carries the Content-Security-
  Policy, ``nosniff``, ``no-store`` and ``no-referrer``; the ``Server`` header names no Python version.
* **CSV cells** are escaped so that a spreadsheet never runs an uploaded file's name as a formula (`csv_cells`).
"""

from __future__ import annotations

import base64
import collections
import csv
import io
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
import PIL.Image

from anemia_jax.inference import segmenter as segmenter_lib
from anemia_jax.screening import app_page, photo_report
from anemia_jax.utils import csv_cells, http_guard, image_io

__all__ = ["PhotoError", "ScreeningService", "make_server"]

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError)
_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")


class PhotoError(ValueError):
    """An upload that cannot be analysed; the message is for the person who sent it. ``status`` is the HTTP one."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def _data_url(image: np.ndarray, max_side: int, fmt: str = "JPEG") -> str:
    """uint8 ``[H, W, 3]`` (or ``[H, W]``) as a ``data:`` URL, shrunk to at most ``max_side`` pixels."""
    im = PIL.Image.fromarray(image)
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       PIL.Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    # PNG at zlib level 1: a 1024-pixel heat map in a few tens of ms rather than ~0.25 s, for a few % more bytes.
    im.save(buffer, format=fmt, **({"quality": 88} if fmt == "JPEG" else {"compress_level": 1}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _heat(values: np.ndarray) -> np.ndarray:
    """float ``[H, W]`` in [0, 1] -> uint8 RGB: black -> red -> yellow -> white (darker is more certain)."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
    rgb = np.concatenate([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def _finite(value: Any) -> Any:
    """A JSON-able scalar: NumPy to Python, NaN/inf to None."""
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _report_fields(report) -> dict[str, Any]:
    """The page's ``verdict``, ``measures`` and ``screening`` of a `photo_report.PhotoReport`: a photo to retake
    carries no estimate (its fields are null: `photo_report.withhold` emptied them), every photo one answer."""
    m = report.measures
    out: dict[str, Any] = {
        "verdict": {"label": report.verdict.label, "reasons": list(report.verdict.reasons),
                    "codes": list(report.verdict.codes), "target": report.target},
        "measures": {"area_fraction": _finite(m.area_fraction), "mean_uncertainty": _finite(m.mean_uncertainty),
                     "brightness": _finite(m.brightness), "clipped_fraction": _finite(m.clipped_fraction)}}
    s = report.screening
    if s is not None:
        call = {1: "likely anemic", 0: "likely not anemic"}.get(int(s["anemic"]))
        out["screening"] = {
            "answer": s["answer"], "answer_text": s["answer_text"], "answer_why": s["answer_why"],
            "hgb": _finite(s["hgb"]), "hgb_lo": _finite(s["hgb_lo"]), "hgb_hi": _finite(s["hgb_hi"]),
            "coverage": _finite(s["coverage"]), "p_anemia": _finite(s["p_anemia"]), "call": call,
            "threshold": _finite(s["threshold"]), "who_threshold": _finite(s["who_threshold"]),
            "sex": s["sex"], "vs_who": s["hgb_vs_who"], "note": s["reason"], "colour_check": s["detail"],
            "colour_range": _finite(s["colour_range"]), "provenance": s["provenance"]["short"],
            "provenance_kind": s["provenance"]["kind"]}
    return out


class ScreeningService:
    """Photo bytes in, a result dict out: decoding with limits, segmentation and assessment under one lock, and the
    recent results kept for the batch CSV.

    Args:
        segmenter: an `anemia_jax.inference.segmenter.Segmenter`.
        assessor: an `anemia_jax.screening.photo_report.PhotoAssessor` (verdict, and screening if it has a model), or
        None
            for masks and areas only.
        max_megapixels: the largest decoded photo accepted (checked from the header, before decoding).
        display_size: the longest side of the overlay and uncertainty images sent to the page.
        keep: how many results the CSV can still list (the oldest are forgotten first).
    """

    def __init__(self, segmenter, assessor=None, *, max_megapixels: float = 50.0, display_size: int = 1024,
                 keep: int = 1000, description: str = ""):
        self.segmenter = segmenter
        self.assessor = assessor
        self.max_pixels = int(max_megapixels * 1e6)
        self.display_size = display_size
        self.description = description
        self._model_lock = threading.Lock()
        self._results_lock = threading.Lock()
        self._results: collections.OrderedDict[str, list[str]] = collections.OrderedDict()
        self._keep = keep

    @property
    def screening(self) -> bool:
        return self.assessor is not None and getattr(self.assessor, "screening", None) is not None

    def columns(self) -> list[str]:
        """The CSV header: file, size, each target's area fraction, then the assessment's columns."""
        cols = ["file", "width", "height"] + segmenter_lib.fraction_columns(self.segmenter.targets)
        if self.assessor is not None:

            cols += photo_report.csv_header(self.screening)
        return cols

    def info(self, max_upload_bytes: int) -> dict[str, Any]:
        """The page's settings: what it shows, the limits, and with a screening model where that model came from
        (``provenance``: `wording.provenance`), the WHO thresholds and the research-use ``notice``."""
        from anemia_jax.screening import wording  # noqa: PLC0415

        model = self.assessor.screening if self.screening else None
        thresholds = getattr(self.assessor, "thresholds", None)
        return {"targets": list(self.segmenter.targets), "screening": self.screening,
                "verdict": self.assessor is not None, "max_upload_bytes": max_upload_bytes,
                "max_megapixels": self.max_pixels / 1e6, "image_size": list(self.segmenter.image_size),
                "description": self.description, "notice": wording.NOTICE,
                "provenance": None if model is None else wording.provenance(model.training),
                "who_thresholds": None if model is None else dict(model.who_thresholds),
                "coverage": None if model is None else model.coverage,
                "interval_sentence": None if model is None else wording.interval_sentence(model.coverage),
                "max_uncertainty": None if thresholds is None else _finite(thresholds.max_uncertainty)}

    def decode(self, data: bytes, name: str) -> np.ndarray:
        """Upright uint8 RGB of an upload, or `PhotoError` saying why not (checked size first: no bomb is decoded)."""
        if not data:
            raise PhotoError(f"{name} is empty. Choose a photo file (JPEG or PNG).")
        try:
            with image_io.open_image(data) as im:  # its errors describe the bytes, not an in-memory buffer
                width, height = im.size
        except _DECODE_ERRORS as e:
            raise PhotoError(f"{name} is not an image this page can read ({type(e).__name__}: {e}). Send a JPEG or "
                             "PNG photo.", HTTPStatus.UNSUPPORTED_MEDIA_TYPE) from None
        if width * height > self.max_pixels:
            raise PhotoError(f"{name} is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); the "
                             f"limit is {self.max_pixels / 1e6:.0f}. Send a smaller photo.",
                             HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            return image_io.decode_photo(data)
        except _DECODE_ERRORS as e:
            raise PhotoError(f"{name} could not be decoded ({type(e).__name__}: {e}); the file may be truncated or "
                             "damaged. Take or copy the photo again.") from None

    def analyse(self, data: bytes, name: str, sex: str | None = None) -> dict[str, Any]:
        """The page's result for one photo (raises `PhotoError` for a bad upload or sex)."""
        start = time.perf_counter()
        photo = self.decode(data, name)
        if sex:
            from anemia_jax.screening import screening_model  # noqa: PLC0415

            try:
                sex = screening_model.normalise_sex(sex)
            except ValueError as e:
                raise PhotoError(str(e)) from None
        with self._model_lock:
            seg = self.segmenter.segment([photo])[0]
            report = None if self.assessor is None else self.assessor.assess([photo], [seg], [sex])[0]
        masks = seg.masks
        # Drawn at the size the page shows (not at the photo's and then shrunk: seconds on a phone photo).
        small, overlay, uncertainty = seg.display(photo, self.display_size)
        result: dict[str, Any] = {
            "id": secrets.token_hex(8), "name": name, "width": int(photo.shape[1]), "height": int(photo.shape[0]),
            "overlay": _data_url(overlay, self.display_size),
            "targets": [{"name": t, "colour": "#%02x%02x%02x" % image_io.COLORS[c % len(image_io.COLORS)],
                         "fraction": float(masks[..., c].mean()), "pixels": int(masks[..., c].sum())}
                        for c, t in enumerate(self.segmenter.targets)],
            "uncertainty": None, "verdict": None, "screening": None}
        if self.assessor is not None:
            # The verdict's own view: uncertainty only where the verdict reads it, on a dimmed copy of the photo.
            heat = photo_report.uncertainty_image(small, seg, self.assessor.channel)
        else:
            heat = _heat(uncertainty)
        result["uncertainty"] = _data_url(heat, self.display_size, "PNG")
        row = [name, photo.shape[1], photo.shape[0]] + [f"{t['fraction']:.6f}" for t in result["targets"]]
        if report is not None:
            result.update(_report_fields(report))
            row += photo_report.csv_values(report, self.screening)
        with self._results_lock:
            self._results[result["id"]] = [str(v) for v in row]
            while len(self._results) > self._keep:
                self._results.popitem(last=False)
        result["seconds"] = time.perf_counter() - start
        return result

    def csv_text(self, ids: Sequence[str]) -> str:
        """CSV of the results ``ids`` (in that order; ids no longer kept are skipped)."""
        with self._results_lock:
            rows = [self._results[i] for i in ids if i in self._results]
        with io.StringIO(newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns())
            writer.writerows(csv_cells.escape_row(row) for row in rows)
            return f.getvalue()


_SECURITY_HEADERS = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                     "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


class _Handler(BaseHTTPRequestHandler):
    """The routes: ``/`` the page, ``/api/info``, ``POST /api/photo``, ``/results.csv?ids=``, ``/healthz``."""

    server_version = "anemia_jax"
    sys_version = ""  # the Server header names no Python version
    timeout = 60  # seconds a client may stall mid-request before its thread gives up
    service: ScreeningService
    max_upload_bytes: int
    allowed_hosts: frozenset[str] = frozenset()  # host names (lower case, no port) the Host header may carry
    any_ip: bool = False  # bound to the wildcard address: any IP literal is a Host too
    port: int = 0

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
        pass  # absl logging is enough; the default writes every request to stderr

    def version_string(self) -> str:
        return self.server_version

    def end_headers(self) -> None:
        # On every response, the standard library's own error pages (400, 414, 501...) included.
        for key, value in _SECURITY_HEADERS.items():
            self.send_header(key, value)
        super().end_headers()

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload, allow_nan=False).encode(), "application/json")

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answers ``message`` without reading the body, then closes the connection."""
        self.close_connection = True
        self._json(status, {"error": message})
        self.wfile.flush()
        http_guard.drain_available(self.connection)  # so that the close does not reset the answer away

    def _from_here(self, *, changes_state: bool) -> bool:
        """Whether the request is for this server (its Host; else 421: a DNS-rebinding page) and, for one that
        ``changes_state``, from its own page (else 403: a cross-origin post). Answers the refusal itself."""
        host = self.headers.get("Host")
        if not http_guard.host_allowed(host, self.allowed_hosts, self.port, any_ip=self.any_ip):
            names = ", ".join(sorted(self.allowed_hosts))
            self._refuse(HTTPStatus.MISDIRECTED_REQUEST, f"This server answers for {names} on port {self.port}, not "
                         f"for {host!r}. Open the page at the address the app printed.")
            return False
        origin = http_guard.foreign_origin(self.headers) if changes_state else None
        if origin is not None:
            self._refuse(HTTPStatus.FORBIDDEN, f"Uploads are accepted from this server's own page only, not from "
                         f"{origin}. Open the page at http://{host or 'the address the app printed'}/.")
            return False
        return True

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        if not self._from_here(changes_state=False):
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/":
            self._send(HTTPStatus.OK, app_page.PAGE.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/info":
            self._json(HTTPStatus.OK, self.service.info(self.max_upload_bytes))
        elif url.path == "/results.csv":
            ids = [i for part in urllib.parse.parse_qs(url.query).get("ids", []) for i in part.split(",") if i]
            self._send(HTTPStatus.OK, self.service.csv_text(ids).encode("utf-8"), "text/csv; charset=utf-8",
                       {"Content-Disposition": 'attachment; filename="screening.csv"'})
        elif url.path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain")
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._from_here(changes_state=True):
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/api/photo":
            self._refuse(HTTPStatus.NOT_FOUND, f"no page {url.path}")
            return
        query = urllib.parse.parse_qs(url.query)
        name = (query.get("name") or ["photo"])[0][:200]
        length, status, message = http_guard.content_length(self.headers)
        if length is None:
            self._refuse(status, message)
            return
        if length > self.max_upload_bytes:
            self.close_connection = True
            self._drain(length)
            self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": (
                f"{name} is {length / 1e6:.1f} MB; the limit is {self.max_upload_bytes / 1e6:.0f} MB. Send a "
                "smaller photo.")})
            return
        data = self.rfile.read(length)
        if len(data) < length:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"{name} arrived incomplete ({len(data)} of {length} "
                                                         "bytes). Send it again."})
            return
        try:
            self._json(HTTPStatus.OK, self.service.analyse(data, name, (query.get("sex") or [""])[0] or None))
        except PhotoError as e:
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 -- one failed photo must not stop the server
            from absl import logging  # noqa: PLC0415

            logging.exception("Analysing %s failed", name)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{name} could not be analysed ({type(e).__name__}"
                                                                   f": {e}). The server keeps running."})

    def _drain(self, length: int) -> None:
        """Reads (and drops) an oversized body up to twice the limit, so the client can read the refusal."""
        left = min(length, 2 * self.max_upload_bytes)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)


def make_server(service: ScreeningService, host: str = "127.0.0.1", port: int = 8000, *,
                max_upload_bytes: int = 30_000_000, allowed_host_names: Sequence[str] = (),
                max_workers: int = http_guard.MAX_WORKERS) -> http_guard.QueueingHTTPServer:
    """The HTTP server of ``service`` on ``host:port`` (port 0: any free port; see ``server.server_address``).

    Args:
        service: what answers the uploads.
        host, port: the address to listen on.
        max_upload_bytes: the largest body read.
        allowed_host_names: host names the ``Host`` header may carry besides the bound address (and, for a loopback
            address, ``localhost``), e.g. this machine's name on the LAN.
        max_workers: requests served at once (the others wait in the listen backlog, `http_guard.BACKLOG`).
    """
    server = http_guard.QueueingHTTPServer((host, port), _Handler, max_workers=max_workers)
    address = host.strip("[]")
    server.RequestHandlerClass = type("Handler", (_Handler,), {
        "service": service, "max_upload_bytes": max_upload_bytes, "port": server.server_address[1],
        "allowed_hosts": http_guard.allowed_hosts(host, allowed_host_names),
        "any_ip": address in ("0.0.0.0", "::")})
    return server
