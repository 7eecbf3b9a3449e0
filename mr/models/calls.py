"""What one endpoint call may do, apart from how it is made: the retry policy, the circuit breaker, the
per-process counters, and the checks and parse of a reply (an OSML FeatureCollection in tile pixels).

Shared by the HTTP and SageMaker adapters of :mod:`mr.models.endpoint`; no I/O here.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mr.detections import Detections
from mr.errors import InvalidInputError
from mr.models.callable import _Malformed, to_detections

MAX_REPLY_BYTES = 64 * 2**20
"""Largest reply read from an endpoint; a bigger one fails its tile for good."""


@dataclass(frozen=True)
class RetryPolicy:
    """How each endpoint call is retried: exponential back-off with full jitter."""

    max_attempts: int = 5
    """Calls per tile, the first included."""
    base_delay: float = 0.2
    """Seconds; the n-th back-off is uniform in [0, min(max_delay, base_delay * 2**(n-1))]."""
    max_delay: float = 10.0
    """Seconds; cap of one back-off."""
    timeout: float = 30.0
    """Seconds allowed to one call (connect and read)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidInputError("max_attempts", self.max_attempts, "must be an integer >= 1")
        for field in ("base_delay", "max_delay", "timeout"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0 or (field == "timeout" and value == 0):
                raise InvalidInputError(field, value, "must be a number of seconds >= 0 (timeout > 0)")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class Breaker:
    """When a worker stops calling an endpoint that keeps failing: a circuit breaker, per endpoint and process.

    After ``failures`` tiles in a row have failed (every attempt spent), tiles fail at once, without a call, for
    ``seconds``; then one call probes, and a success closes the circuit. So a dead or silent endpoint fails the
    job in bounded time instead of spending every attempt's timeout on every tile.
    """

    failures: int = 8
    seconds: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.failures, int) or self.failures < 1:
            raise InvalidInputError("breaker.failures", self.failures, "must be an integer >= 1")
        if not isinstance(self.seconds, (int, float)) or self.seconds < 0:
            raise InvalidInputError("breaker.seconds", self.seconds, "must be a number of seconds >= 0")


class _Circuit:
    """The breaker's state for one endpoint in this process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_a_row = 0
        self.open_until = 0.0
        self.last_reason = ""

    def refuses(self, breaker: Breaker) -> str | None:
        """Why no call should be made now, or None (when the open period is over, one caller probes)."""
        with self._lock:
            now = time.monotonic()
            if self.in_a_row < breaker.failures:
                return None
            if now >= self.open_until:
                self.open_until = now + breaker.seconds  # this caller probes; the others keep failing fast
                return None
            return (f"not called: the endpoint failed {self.in_a_row} tiles in a row (last: {self.last_reason}); "
                    f"calls resume in {self.open_until - now:.0f} s")

    def record(self, ok: bool, breaker: Breaker, reason: str = "") -> None:
        """Count a tile that succeeded (closes the circuit) or failed for good (opens it at ``failures`` in a row)."""
        with self._lock:
            if ok:
                self.in_a_row, self.open_until = 0, 0.0
                return
            self.in_a_row += 1
            self.last_reason = reason
            if self.in_a_row >= breaker.failures:
                self.open_until = time.monotonic() + breaker.seconds


class EndpointStats:
    """Counters of one endpoint in this process: calls, errors, retries, failed tiles and total call latency."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = self.errors = self.retries = self.failed_tiles = 0
            self.latency_s = 0.0

    def add(self, *, calls: int = 0, errors: int = 0, retries: int = 0, failed_tiles: int = 0,
            latency_s: float = 0.0) -> None:
        """Count events (thread-safe)."""
        with self._lock:
            self.calls += calls
            self.errors += errors
            self.retries += retries
            self.failed_tiles += failed_tiles
            self.latency_s += latency_s

    def snapshot(self) -> dict:
        """The counters now, plus the mean latency of a call in seconds."""
        with self._lock:
            return {"endpoint": self.endpoint, "calls": self.calls, "errors": self.errors, "retries": self.retries,
                    "failed_tiles": self.failed_tiles, "latency_s": self.latency_s,
                    "mean_latency_s": self.latency_s / self.calls if self.calls else 0.0}


class _CallFailed(Exception):
    """One failed attempt; ``retryable`` says whether another attempt may succeed, ``throttled`` whether the
    endpoint refused it for load (HTTP 429, a throttling error code)."""

    def __init__(self, reason: str, retryable: bool, throttled: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.throttled = throttled


_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.RLock()


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    """One object per key in this process (pools, clients, semaphores, stats), made on first use."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def endpoint_stats(name: str) -> EndpointStats:
    """This process's counters for the endpoint called ``name``."""
    return _cached(("stats", name), lambda: EndpointStats(name))


def parse_reply(body: bytes) -> Detections:
    """Detections (tile pixels) from an OSML reply; _CallFailed (retryable) if it is empty or malformed."""
    if not body or not body.strip():
        raise _CallFailed("empty reply", retryable=True)
    try:
        reply = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _CallFailed(f"malformed JSON reply ({e})", retryable=True) from None
    try:
        return to_detections(_in_pixels(reply))
    except _Malformed as e:
        raise _CallFailed(f"malformed reply: {e}", retryable=True) from None


def _in_pixels(reply: Any) -> Any:
    """An OSML FeatureCollection with each feature's geometry in tile pixels (``geometry`` is null or geographic)."""
    features = reply.get("features") if isinstance(reply, Mapping) else None
    if not isinstance(features, list) or reply.get("type") != "FeatureCollection":
        return reply
    return {**reply, "features": [_pixel_feature(f) for f in features]}


def _pixel_feature(feature: Any) -> Any:
    """imageGeometry, else imageBBox / legacy bounds_imcoords, as the geometry; legacy feature_types as classes."""
    if not isinstance(feature, Mapping) or not isinstance(feature.get("properties"), Mapping):
        return feature
    properties = dict(feature["properties"])
    pixels = properties.pop("imageGeometry", None)
    bbox = properties.pop("imageBBox", None) or properties.pop("bounds_imcoords", None)
    properties.pop("bounds_imcoords", None)
    legacy_classes = properties.pop("feature_types", None)
    if "featureClasses" not in properties and isinstance(legacy_classes, Mapping):
        properties["featureClasses"] = [{"iri": k, "score": v} for k, v in legacy_classes.items()]
    if pixels is None and isinstance(bbox, (list, tuple)) and len(bbox) == 4:
        x0, y0, x1, y1 = bbox
        pixels = {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}
    return {**feature, "geometry": pixels if pixels is not None else feature.get("geometry"), "properties": properties}


def _within_limit(body: bytes, announced: int = 0) -> bytes:
    """The body, or a (final) _CallFailed when the reply is, or announces itself, over MAX_REPLY_BYTES."""
    if max(len(body), announced) > MAX_REPLY_BYTES:
        raise _CallFailed(f"reply of {max(len(body), announced)} bytes is over the {MAX_REPLY_BYTES}-byte limit",
                          retryable=False)
    return body
