"""Any mr model as an OSML-compatible model container: ``GET /ping`` and ``POST /invocations`` over plain HTTP.

OversightML ModelRunner (and SageMaker) talk to a model container by posting one encoded tile (NITF, GTIFF, PNG or
JPEG) to ``/invocations`` and reading back a GeoJSON FeatureCollection whose features carry the detection in tile
pixels (``imageGeometry``, ``imageBBox``), its classes (``featureClasses``: ``[{iri, score}]``) and the legacy
``bounds_imcoords`` / ``detection_score`` / ``feature_types`` properties; ``geometry`` stays null because the caller
geolocates. Serving an mr model this way lets OSML use it unchanged, and lets mr's own endpoint client be tested
against a real server. Only the standard library is used (``http.server.ThreadingHTTPServer``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import shapely

from mr.detections import Detections
from mr.encoding import decode_tile
from mr.errors import InvalidInputError, ModelError
from mr.features import feature_id, pixel_geometry
from mr.models.base import Model, TileFailure

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
"""Largest request body accepted by default (64 MiB): a 4096 × 4096 × 4-band uint8 tile is 64 MiB raw."""
_MAX_DISCARD_BYTES = 256 << 20
"""Oversized bodies up to this size are read and dropped before the 413; larger ones just close the connection."""


def feature_collection(detections: Detections) -> dict:
    """The OSML model reply for one tile's detections (tile pixel coordinates)."""
    labels = detections.labels
    geometry = pixel_geometry(detections)
    features = []
    for i in range(len(detections)):
        box = [float(v) for v in detections.boxes[i]]
        label, score = str(labels[i]), float(detections.scores[i])
        properties: dict[str, Any] = {
            "imageGeometry": _plain(shapely.geometry.mapping(geometry[i])),
            "imageBBox": box,
            "featureClasses": [{"iri": label, "score": score}],
            "bounds_imcoords": box,
            "detection_score": score,
            "feature_types": {label: score},
        }
        for key, column in detections.properties.items():
            properties[key] = _plain(column[i])
        features.append(
            {
                "type": "Feature",
                "id": feature_id("tile", detections.boxes[i], label),
                "geometry": None,
                "properties": properties,
            }
        )
    return {"type": "FeatureCollection", "features": features}


def run_model_on_tile(model: Model, tile: np.ndarray) -> Detections:
    """The model's detections on one (bands, h, w) tile; a `TileFailure` or a wrong reply raises `ModelError`."""
    reply = list(model(tile[np.newaxis]))
    if len(reply) != 1:
        raise ModelError(f"model {getattr(model, 'name', model)!r} returned {len(reply)} tables for 1 tile")
    if isinstance(reply[0], TileFailure):
        raise ModelError(f"model could not process the tile: {reply[0].reason}")
    return reply[0]


def make_app(model: Model, max_body_bytes: int = MAX_BODY_BYTES) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving ``model``: pass it to any ``http.server`` server.

    Model calls are serialised by a lock: one tile at a time, whatever the model's own thread safety.
    """
    lock = threading.Lock()

    class Handler(_OsmlHandler):
        pass

    Handler.model = model
    Handler.model_lock = lock
    Handler.max_body_bytes = max_body_bytes
    return Handler


class _OsmlHandler(BaseHTTPRequestHandler):
    """The two routes of an OSML model container; ``make_app`` binds the model."""

    disable_nagle_algorithm = True  # headers and body go out at once: no ~40 ms delayed-ACK stall per reply
    model: Model
    model_lock: threading.Lock
    max_body_bytes: int
    protocol_version = "HTTP/1.1"
    server_version = "mr-model"

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/ping":
            self._reply(HTTPStatus.OK, b"healthy", "text/plain")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no route GET {self.path}; use GET /ping or POST /invocations")

    def do_POST(self) -> None:
        if self.path.split("?")[0] != "/invocations":
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {self.path}; use POST /invocations")
            return
        body = self._read_body()
        if body is None:
            return
        try:
            tile = decode_tile(body)
        except InvalidInputError as error:
            self._error(HTTPStatus.BAD_REQUEST, str(error), field=error.field)
            return
        try:
            with self.model_lock:
                detections = run_model_on_tile(self.model, tile)
            payload = json.dumps(feature_collection(detections)).encode()
        except Exception as error:  # a model failure is the client's 500, never the server's crash
            logger.exception("model failed on a %s tile", tile.shape)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"model failed: {type(error).__name__}: {error}")
            return
        self._reply(HTTPStatus.OK, payload, "application/json")

    def _read_body(self) -> bytes | None:
        """The request body, or None after replying 411/413/400 for a missing, oversized or malformed length."""
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header with the encoded tile", close=True)
            return None
        try:
            length = int(length_header)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, f"Content-Length {length_header!r} is not a number", close=True)
            return None
        if length < 0 or length > self.max_body_bytes:
            self._discard(length)
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over the limit of {self.max_body_bytes}; send smaller tiles",
                close=True,
            )
            return None
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        """Read and drop an oversized body (up to a bound) so the client sees the 413 rather than a reset."""
        remaining = length if 0 < length <= _MAX_DISCARD_BYTES else 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (``Expect: 100-continue``)."""
        length = self.headers.get("Content-Length", "0")
        if length.isdigit() and int(length) > self.max_body_bytes:
            self._error(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over the limit of {self.max_body_bytes}; send smaller tiles",
                close=True,
            )
            return False
        return super().handle_expect_100()

    def _error(self, status: HTTPStatus, message: str, field: str | None = None, close: bool = False) -> None:
        payload: dict[str, Any] = {"error": message, "status": int(status)}
        if field is not None:
            payload["field"] = field
        self._reply(status, json.dumps(payload).encode(), "application/json", close=close)

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    """A thread per connection, with room for many clients connecting at once.

    The standard backlog of 5 pending connections drops the rest of a burst (every call thread of every worker
    connects when a job starts), and each dropped connection waits a 1 s SYN retransmit: 8 at once stalled 1 s.
    """

    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that drops its connection (a worker shutting down, a load balancer's probe) is routine, not a
        traceback on stderr; anything else goes to the log with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            logger.debug("client %s dropped its connection: %s", client_address, error)
            return
        logger.exception("error serving %s", client_address)


def make_server(model: Model, host: str = "127.0.0.1", port: int = 8080, **options: Any) -> ThreadingHTTPServer:
    """A bound, not yet serving, threaded HTTP server for ``model`` (port 0 picks a free port)."""
    return _Server((host, port), make_app(model, **options))


def serve(model: Model, host: str = "127.0.0.1", port: int = 8080, **options: Any) -> None:
    """Serve ``model`` until interrupted."""
    with make_server(model, host, port, **options) as server:
        logger.info("serving model %r on http://%s:%d", getattr(model, "name", model), *server.server_address[:2])
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def serve_in_thread(
    model: Model, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``model`` from a daemon thread; returns the server and its base URL. Stop it with
    ``server.shutdown(); server.server_close()``.
    """
    server = make_server(model, host, port, **options)
    thread = threading.Thread(target=server.serve_forever, name="mr-serve", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    return server, f"http://{bound_host}:{bound_port}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``mr serve`` (for the integrating CLI's sub-parser)."""
    parser.add_argument("--model", default="builtin", help="registered model name (default: builtin)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument("--max-body-mib", type=int, default=MAX_BODY_BYTES >> 20, help="largest request body, MiB")


def run_from_args(args: argparse.Namespace) -> int:
    """Resolve the model by registered name and serve it (blocks)."""
    from mr.models.registry import resolve_model

    serve(resolve_model(args.model), args.host, args.port, max_body_bytes=args.max_body_mib << 20)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``serve [--model builtin] [--host 127.0.0.1] [--port 8080]``; a leading ``serve`` word is optional."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="mr serve", description="serve a model as an OSML model container")
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def _plain(value: Any) -> Any:
    """Tuples to lists and numpy values to Python ones, so the reply is plain JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


if __name__ == "__main__":
    sys.exit(main())
