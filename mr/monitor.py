"""The listener's monitoring endpoint: Prometheus ``/metrics`` and ``/healthz`` over plain HTTP.

`ServiceMetrics` keeps the process's totals in a prometheus_client registry (the exposition format is theirs,
so every Prometheus-compatible scraper reads it). Region metrics are added as regions finish, so a scrape during
a job already shows its progress. ``/healthz`` runs each named check (queue, store, cluster) under a time limit
and answers 200 when all pass, 503 naming what failed.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mr.metrics import Metrics

log = logging.getLogger(__name__)

LABELS = ("operation", "model_name", "input_format")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class ServiceMetrics:
    """The listener's metrics since it started, in Prometheus form."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = {"registry": self.registry}
        self.duration = Histogram("mr_operation_duration_seconds", "Duration of one unit of each operation",
                                  LABELS, buckets=BUCKETS, **reg)
        self.invocations = Counter("mr_operation_invocations", "Units of work done, per operation", LABELS, **reg)
        self.errors = Counter("mr_operation_errors", "Units of work that failed, per operation", LABELS, **reg)
        self.throttles = Counter("mr_operation_throttles", "Calls refused by the model for load", LABELS, **reg)
        self.retries = Counter("mr_operation_retries", "Calls tried again", LABELS, **reg)
        self.jobs = Counter("mr_jobs", "Jobs finished, by final status", ("status",), **reg)
        self.features = Counter("mr_features_published", "Features published", **reg)
        self.in_flight = Gauge("mr_requests_in_flight", "Requests being processed now", **reg)
        self.received = Counter("mr_requests_received", "Messages taken from the queue", **reg)

    def record(self, metrics: Metrics | None) -> None:
        """Add measurements (a region's, or a job's client-side operations) to the totals."""
        if metrics is None:
            return
        for (operation, model_name, input_format), stats in list(metrics.stats.items()):
            labels = (operation, model_name, input_format)
            for seconds in stats.durations:
                self.duration.labels(*labels).observe(seconds)
            for counter, value in ((self.invocations, stats.invocations), (self.errors, stats.errors),
                                   (self.throttles, stats.throttles), (self.retries, stats.retries)):
                counter.labels(*labels).inc(value)

    def job_finished(self, status: str, features: int = 0) -> None:
        self.jobs.labels(status).inc()
        self.features.inc(features)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


Check = Callable[[], object]


def run_checks(checks: Mapping[str, Check], timeout: float) -> dict[str, str]:
    """Each check's outcome: "ok", or why it failed (its error, or that it took longer than ``timeout`` s)."""
    results: dict[str, str] = {}
    pool = ThreadPoolExecutor(max(1, len(checks)), thread_name_prefix="mr-healthz")
    futures = {name: pool.submit(check) for name, check in checks.items()}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            results[name] = "ok"
        except FutureTimeout:
            results[name] = f"no answer within {timeout:g} s"
        except Exception as error:  # noqa: BLE001 - any failure makes the component unhealthy, with its reason
            results[name] = f"{type(error).__name__}: {error}"
    pool.shutdown(wait=False, cancel_futures=True)
    return results


class MonitorServer:
    """``/metrics`` and ``/healthz`` on a loopback (or configured) address, served from a daemon thread."""

    def __init__(self, metrics: ServiceMetrics, checks: Mapping[str, Check], host: str = "127.0.0.1",
                 port: int = 0, check_timeout: float = 5.0) -> None:
        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                monitor._answer(self)

            def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
                log.debug("monitor: " + format, *args)

        self.metrics = metrics
        self.checks = dict(checks)
        self.check_timeout = check_timeout
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="mr-monitor", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "MonitorServer":
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def health(self) -> tuple[bool, dict[str, str]]:
        results = run_checks(self.checks, self.check_timeout)
        return all(v == "ok" for v in results.values()), results

    def _answer(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(request, 200, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/health"):
            healthy, results = self.health()
            body = json.dumps({"status": "ok" if healthy else "unhealthy", "checks": results}).encode()
            self._send(request, 200 if healthy else 503, body, "application/json")
        else:
            self._send(request, 404, b'{"error": "not found: try /metrics or /healthz"}', "application/json")

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str) -> None:
        request.send_response(status)
        request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``:0`` for any free port) as a pair; an error names the setting when it is malformed."""
    from mr.errors import InvalidInputError

    host, sep, port = str(address).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInputError("mr.observability.metrics-address", address, "use HOST:PORT, e.g. 127.0.0.1:9400")
    return host.strip("[]") or "127.0.0.1", int(port)
