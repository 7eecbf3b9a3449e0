"""``python -m mr.listen``: take requests from the queue and run each as one Dask graph, a bounded few at a time.

receive → validate → record → build the graph → compute on the cluster → publish → record → delete. A bad
request is recorded FAILED with its reason and deleted; the listener goes on. On SIGTERM it takes nothing new;
running requests are abandoned before publishing and left on the queue to be delivered again, where their
checkpointed regions are not recomputed. A request whose job already finished is deleted without running again,
so nothing is published twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

from mr import config
from mr.errors import MrError
from mr.jobs import (
    Interrupted,
    combined_output,
    counters_since,
    endpoint_counters,
    job_summary,
    model_for_request,
    process_images,
)
from mr.logs import log_context
from mr.metrics import Metrics, Operation
from mr.monitor import MonitorServer, ServiceMetrics, parse_address
from mr.service import ServiceSettings, resolve_service

log = logging.getLogger("mr.listen")

FINISHED = ("SUCCESS", "PARTIAL", "FAILED")
RECEIVE_RETRY_S = 2.0
"""Seconds the listener waits before receiving again after the queue failed to answer."""


def _status_name(status) -> str:
    return getattr(status, "value", status)


def _job_id_of(body: bytes, fallback: str) -> str:
    """The jobId of a message that failed validation, when it can be read at all."""
    try:
        value = json.loads(body).get("jobId")
        if not (isinstance(value, str) and value.strip() and len(value) <= 256):
            return fallback
        value.encode("utf-8")  # a lone surrogate ("\ud800") cannot be stored (UnicodeEncodeError): fall back
        return value
    except Exception:  # noqa: BLE001 - any unreadable body falls back to the message id
        return fallback


class Listener:
    """Receives requests and runs them; one instance per process."""

    def __init__(self, settings: ServiceSettings, client) -> None:
        from mr.queues import open_queue
        from mr.state import open_notifier, open_store

        self.settings = settings
        self.client = client
        self.queue = open_queue(settings.queue)
        self.store = open_store(settings.store)
        self.notifier = open_notifier(settings.notices)
        self.stop = threading.Event()
        self.leases = _LeaseKeeper(self.queue, settings.visibility_timeout)
        self.metrics = ServiceMetrics()
        self.emf = bool(config.get("observability.emf"))
        self.monitor: MonitorServer | None = None
        self._next_sweep = 0.0  # monotonic time of the next sweep for stuck jobs (0: sweep at start)

    def health_checks(self) -> dict:
        """What ``/healthz`` asks: can the queue, the store and the cluster each answer now?"""
        return {
            "queue": self.queue.dead_letter_count,
            "store": lambda: self.store.get_job("mr-healthz-probe"),
            "cluster": lambda: _cluster_answers(self.client),
        }

    def serve_monitoring(self, address: str | None) -> MonitorServer | None:
        """Serve ``/metrics`` and ``/healthz`` at ``host:port`` (any free port when that one is taken)."""
        if not address:
            return None
        host, port = parse_address(address)
        timeout = float(config.get("observability.health-timeout"))
        try:
            self.monitor = MonitorServer(self.metrics, self.health_checks(), host, port, timeout).start()
        except OSError as error:
            log.warning("cannot serve metrics on %s (%s): using a free port instead", address, error)
            self.monitor = MonitorServer(self.metrics, self.health_checks(), host, 0, timeout).start()
        log.info("metrics on %s/metrics, health on %s/healthz", self.monitor.url, self.monitor.url)
        return self.monitor

    def run(self, once: bool = False) -> int:
        """Serve until stopped (or, with ``once``, until the queue is empty); returns the requests handled."""
        handled = 0
        running: set[Future] = set()
        with ThreadPoolExecutor(self.settings.max_in_flight, thread_name_prefix="mr-request") as pool:
            while not self.stop.is_set():
                self._sweep_if_due()
                free = self.settings.max_in_flight - len(running)
                messages = []
                if free > 0:
                    wait_seconds = 0 if (once or running) else self.settings.poll_seconds
                    try:
                        messages = self.queue.receive(
                            max_messages=free,
                            wait_seconds=wait_seconds,
                            visibility_timeout=self.settings.visibility_timeout,
                        )
                    except Exception as error:  # noqa: BLE001 - a queue that cannot answer now must not stop a service
                        if once:
                            raise
                        log.warning("receiving from %s failed (%s: %s); trying again in %g s", self.settings.queue,
                                    type(error).__name__, error, RECEIVE_RETRY_S)
                        self.stop.wait(RECEIVE_RETRY_S)
                        messages = []
                for message in messages:
                    running.add(pool.submit(self.handle, message))
                if once and not messages and not running:
                    break
                if running:
                    done, running = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                        handled += 1
            for future in running:
                future.result()
        return handled

    def _sweep_if_due(self) -> None:
        """Every sweep-every seconds, fail the jobs whose requests were lost (`mr.sweeper`); never raises."""
        if not self.settings.sweep_every or time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.settings.sweep_every
        from mr.sweeper import sweep_stuck_jobs

        try:
            sweep_stuck_jobs(self.store, self.notifier, self.settings.stuck_after)
        except Exception as error:  # noqa: BLE001 - a store that cannot answer now: the next sweep tries again
            log.warning("sweep for stuck jobs failed: %s: %s", type(error).__name__, error)

    def handle(self, message) -> None:
        """One message, start to finish; never raises (a failure is recorded, not thrown)."""
        self.metrics.received.inc()
        self.metrics.in_flight.inc()
        try:
            self._handle(message)
        finally:
            self.metrics.in_flight.dec()

    def _handle(self, message) -> None:
        from mr.policy import check_request
        from mr.request import ImageRequest, RequestError

        started = time.time()
        try:
            request = ImageRequest.from_message(message.body)
            check_request(request)
        except RequestError as error:
            text = _rejected_text(message.body)
            job_id = self._own_job_id(message, text)
            with log_context(job_id=job_id):
                self._fail(job_id, "unknown", text, str(error), started)
            _settle(self.queue.delete, message)
            return
        with log_context(job_id=request.job_id):
            self._handle_valid(request, message, started)

    def _own_job_id(self, message, text: str) -> str:
        """The job an invalid message is recorded under: its jobId, unless that names another request's job (which
        is left alone), else ``invalid-<message id>``."""
        from mr.errors import InvalidInputError
        from mr.redact import redact

        fallback = f"invalid-{message.message_id}"
        job_id = _job_id_of(message.body, fallback)
        if job_id == fallback:
            return fallback
        try:  # atomic: records the job, or returns the one recorded before (raises if recorded for an image)
            record = self.store.start_job(job_id, "unknown", "unknown", text)
        except InvalidInputError:
            return fallback
        return job_id if record.attempts == 1 or record.request == redact(text) else fallback

    def _handle_valid(self, request, message, started: float) -> None:
        from mr.errors import InvalidInputError
        from mr.state.base import check_same_image

        job_id = request.job_id
        try:  # a jobId already recorded for another image names another request: fail this message, not that job
            existing = self.store.get_job(job_id)
            if existing is not None:
                check_same_image(existing, ",".join(request.image_urls))
            if existing is not None and _status_name(existing.status) in FINISHED:
                log.info("job %s already %s: message deleted", job_id, _status_name(existing.status))
                _settle(self.queue.delete, message)
                return
            record = self.store.start_job(
                job_id, request.image_ids[0], ",".join(request.image_urls), _text(message.body)
            )
        except InvalidInputError as error:
            own = f"invalid-{message.message_id}"
            self._fail(own, request.image_ids[0], _text(message.body), f"jobId={job_id!r}: {error.reason}", started)
            _settle(self.queue.delete, message)
            return
        self.notifier.job_status(record, "request received")
        measured = Metrics()
        try:
            with self.leases.held(message):
                self._run(request, message, started, measured)
        except Interrupted:
            log.info("job %s interrupted: left on the queue to be delivered again", job_id)
            return
        except MrError as error:
            self._fail(job_id, request.image_ids[0], _text(message.body), str(error), started, measured)
        except Exception as error:  # noqa: BLE001 - one bad request never stops the listener
            log.exception("job %s failed unexpectedly", job_id)
            reason = f"{type(error).__name__}: {error}"
            self._fail(job_id, request.image_ids[0], _text(message.body), reason, started, measured)
        _settle(self.queue.delete, message)

    def _run(self, request, message, started: float, measured: Metrics) -> None:
        """Compute, publish and record one valid request; ``measured`` collects the client-side metrics."""
        from mr.sinks import publish, sink_for

        job_id = request.job_id
        sinks = [sink_for(output) for output in request.outputs]

        def keepalive() -> None:
            _settle(lambda m: self.queue.extend(m, self.settings.visibility_timeout), message)
            _mark_progress(self.store, job_id)

        def planned(url: str, result) -> None:
            grid, (_, height, width) = result.plan.grid, result.plan.image_shape
            record = self.store.update_job(
                job_id, status="IN_PROGRESS", region_count=grid.region_count, tile_count=result.plan.tile_count,
                width=width, height=height, extents=image_extents(result.georeference, width, height),
            )
            self.notifier.job_status(record, f"processing {url}")

        def region_done(image_id: str, ry: int, rx: int, part) -> None:
            status = "PARTIAL" if part.failed_tiles else "SUCCESS"
            region = self.store.mark_region(
                job_id, f"{image_id}:r{ry}-c{rx}", status, features=len(part), failed_tiles=list(part.failed_tiles)
            )
            self.notifier.region_status(region, f"region r{ry}-c{rx} of {image_id}: {len(part)} features settled")

        model = model_for_request(request)
        before = endpoint_counters(self.client, model)
        outcomes = process_images(
            request.image_urls, request.detect_options(model=model), self.client, self.settings.work_dir, job_id,
            keepalive=keepalive, stop=self.stop, interval=max(1.0, self.settings.visibility_timeout / 3),
            on_planned=planned, on_region=region_done, on_part=lambda part: self.metrics.record(part.metrics),
            metrics=measured,
        )
        if self.stop.is_set():
            raise Interrupted("stopping before publishing")
        table, meta = combined_output(outcomes, job_id)
        failed = list(table.failed_tiles)
        planned_tiles = sum(o.result.plan.tile_count for o in outcomes)
        if failed and len(failed) >= planned_tiles:
            self.store.update_job(job_id, failed_tiles=failed)
            raise AllTilesFailed(f"all {planned_tiles} tiles failed, nothing to publish; first: {failed[0]['reason']}")
        _mark_progress(self.store, job_id)  # a job swept as lost meanwhile is abandoned here, never published
        locations = publish(table, meta, sinks, measured)
        endpoint = counters_since(before, endpoint_counters(self.client, model))
        everything = Metrics.combine([table.metrics, measured])
        summary = job_summary(everything, len(table), len(failed), time.time() - started, endpoint)
        status = "PARTIAL" if failed else "SUCCESS"
        record = self.store.update_job(
            job_id, status=status, feature_count=len(table), outputs=list(locations),
            failed_tiles=failed, summary=summary,
        )
        self._finished(status, everything, request.job_id, meta.image_id, len(table), measured)
        missing = f"; {len(failed)} tile(s) failed, their features are missing" if failed else ""
        self.notifier.job_status(record, f"{len(table)} features published to {', '.join(locations)}{missing}")

    def _finished(self, status: str, everything: Metrics, job_id: str, image_id: str, features: int,
                  client_side: Metrics) -> None:
        """A job's metrics out: the client-side part to Prometheus (regions went there as they came), all as EMF."""
        self.metrics.record(client_side)
        self.metrics.job_finished(status, features)
        if self.emf:
            from mr.emf import write_emf

            write_emf(everything, {"JobId": job_id, "ImageId": image_id})

    def _fail(self, job_id: str, image_id: str, request_text: str, reason: str, started: float,
              measured: Metrics | None = None) -> None:
        log.warning("job %s failed: %s", job_id, reason)
        existing = self.store.get_job(job_id)
        if existing is None:
            self.store.start_job(job_id, image_id, "unknown", request_text)
        elif _status_name(existing.status) in FINISHED:
            return
        measured = measured if measured is not None else Metrics()
        if not measured.stats:
            measured.add(Operation.IMAGE_PROCESSING, time.time() - started, errors=1)
        summary = job_summary(measured, 0, 0, time.time() - started, {})
        record = self.store.update_job(job_id, status="FAILED", message=reason, summary=summary)
        self._finished("FAILED", measured, job_id, image_id, 0, measured)
        self.notifier.job_status(record, reason)


def _mark_progress(store, job_id: str) -> None:
    """Tell sweepers the job is alive; a job failed meanwhile (declared lost) is abandoned, never published."""
    try:
        record = store.touch_job(job_id)
    except MrError as error:  # a store hiccup must not stop the work: the next keepalive tries again
        log.warning("job %s: progress not recorded: %s", job_id, error)
        return
    if record.finished:
        raise MrError(f"job {job_id} became {record.status.value} while it ran ({record.message}); abandoned")


class AllTilesFailed(MrError):
    """The model answered no tile (an endpoint that never answers, a model that always fails): the job fails."""


def _cluster_answers(client) -> None:
    """Raise unless the scheduler answers now and has at least one worker."""
    info = client.scheduler_info()
    if not info.get("workers"):
        raise RuntimeError(f"scheduler {client.scheduler.address} has no workers")


def image_extents(georef, width: int, height: int) -> tuple[float, float, float, float] | None:
    """The image's WGS84 bounds (west, south, east, north) from its edges, or None without a georeference."""
    if georef is None or georef.kind is None:
        return None
    import numpy as np

    from mr.geo import pixel_to_world

    steps = np.linspace(0.0, 1.0, 17)
    xs = np.concatenate([steps * width, np.full(17, float(width)), steps[::-1] * width, np.zeros(17)])
    ys = np.concatenate([np.zeros(17), steps * height, np.full(17, float(height)), steps[::-1] * height])
    lon, lat = pixel_to_world(georef, xs, ys)
    return (float(np.nanmin(lon)), float(np.nanmin(lat)), float(np.nanmax(lon)), float(np.nanmax(lat)))


class _LeaseKeeper:
    """Keeps the messages being run leased, opening, planning and publishing included (the compute loop's keepalive
    covers only the cluster's part): a lease that lapsed would let a message be delivered again, even to this
    listener, and its job run and publish twice. One thread for all of them, so one queue connection."""

    def __init__(self, queue, seconds: float) -> None:
        self.queue = queue
        self.seconds = seconds
        self._held: dict[str, object] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def held(self, message) -> Iterator[None]:
        with self._lock:
            self._held[message.receipt] = message
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="mr-leases", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:  # waits for an extension in progress: none follows, so a delete after this is clean
                self._held.pop(message.receipt, None)

    def _beat(self) -> None:
        while True:
            time.sleep(max(1.0, self.seconds / 3))
            with self._lock:
                for message in list(self._held.values()):
                    try:
                        _settle(lambda m: self.queue.extend(m, self.seconds), message)
                    except Exception as error:  # noqa: BLE001 - a queue that failed once is tried again next beat
                        log.warning("message %s: could not extend its lease: %s", message.message_id, error)


def _settle(action, message) -> None:
    """Delete or extend a message; a lease that lapsed meanwhile is logged (the message comes back and, its job
    being finished, is then deleted without running again)."""
    from mr.queues.base import StaleReceiptError

    try:
        action(message)
    except StaleReceiptError as error:
        log.warning("message %s: %s", message.message_id, error)


def _text(body: bytes | str) -> str:
    return body if isinstance(body, str) else body.decode("utf-8", errors="replace")


REJECTED_TEXT_CHARS = 65536
"""Most characters of a rejected message kept in its job record: a hostile body may be of any size (a DynamoDB item
holds 400 KB, and every stored text is scanned for credentials)."""


def _rejected_text(body: bytes | str) -> str:
    """A message that failed validation, as text for its job record, cut to REJECTED_TEXT_CHARS."""
    text = _text(body)
    return text if len(text) <= REJECTED_TEXT_CHARS else f"{text[:REJECTED_TEXT_CHARS]}... ({len(body)} bytes in all)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mr.listen", description=__doc__.splitlines()[0])
    parser.add_argument("--queue", help="sqlite:///PATH, an SQS queue URL or sqs://NAME")
    parser.add_argument("--store", help="sqlite:///PATH or dynamodb://TABLE-PREFIX")
    parser.add_argument("--notices", help="sns://TOPIC or an SNS topic ARN (default: log them)")
    parser.add_argument("--config", help="a YAML file of mr settings (as config/mr.yaml)")
    parser.add_argument("--data-dir", help="embedded mode: folder of the SQLite file and region checkpoints")
    parser.add_argument("--max-in-flight", type=int, help="requests processed at once")
    parser.add_argument("--workers", type=int, help="local worker processes")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler instead of a local cluster")
    parser.add_argument("--once", action="store_true", help="process what is queued, then exit")
    parser.add_argument("--metrics-address", help="HOST:PORT of /metrics and /healthz (:0 any free port; '' none)")
    parser.add_argument("--log-format", choices=("auto", "text", "json"), help="log lines as text or JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config.load_file(args.config)
    from mr.cluster import get_client, log_like_client
    from mr.logs import configure_logging, quiet_libraries, resolve_format

    settings = resolve_service(args.queue, args.store, args.notices, args.data_dir, args.max_in_flight)
    log_format = resolve_format(args.log_format, embedded=settings.queue.startswith("sqlite:"))
    level = str(config.get("observability.log-level") or "INFO").upper()
    configure_logging(log_format, level)
    quiet_libraries()
    address = args.metrics_address if args.metrics_address is not None else config.get("observability.metrics-address")
    with get_client(args.scheduler, args.workers) as client:
        log_like_client(client, log_format, level)
        listener = Listener(settings, client)
        signal.signal(signal.SIGTERM, lambda *_: listener.stop.set())
        signal.signal(signal.SIGINT, lambda *_: listener.stop.set())
        monitor = listener.serve_monitoring(address or None)
        log.info("listening on %s (state: %s)", settings.queue, settings.store)
        try:
            handled = listener.run(once=args.once)
        finally:
            if monitor is not None:
                monitor.close()
    log.info("stopped after %d request(s)", handled)
    return 0


if __name__ == "__main__":
    sys.exit(main())
