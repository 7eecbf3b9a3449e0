"""Remote models: an HTTP endpoint (an OversightML model container's ``/invocations``) or a SageMaker endpoint.

Each tile is encoded (``mr.encoding``, NITF by default, as OSML ModelRunner sends it), sent on its own, and the
reply, an OSML FeatureCollection in tile pixels, is parsed by :func:`mr.models.callable.to_detections`. Tiles are
sent concurrently by the process's long-lived call threads for the endpoint (:mod:`mr.models.inflight`), shared by
every batch; ``submit`` queues a batch without waiting, so a task can keep the endpoint busy across batches. Each
call is retried per a :class:`RetryPolicy` (throttling, 5xx, timeouts, broken connections, malformed or empty
replies); a 4xx that can never succeed is not retried. A tile that still fails becomes a
:class:`~mr.models.base.TileFailure`: recorded, never dropped, and the rest of the batch goes on.

Concurrency: with ``max_in_flight=n`` no more than ``n`` calls are in flight at once. On a Dask worker the limit
is cluster-wide: each call is made under a lease of ``distributed.Semaphore(max_leases=n, name="mr-endpoint-<name>")``
kept by the scheduler, so all workers together stay under it. Elsewhere (a plain thread or process) it is a
process-local ``threading.BoundedSemaphore``. A call thread keeps its lease from call to call while it has work
(two scheduler round trips per busy spell, not per tile), never through a back-off, and gives it back soon after
its work runs out.

Models pickle to their constructor arguments; HTTP connections (one per call thread) and boto3 clients are created
lazily and kept, as are the call threads and the per-endpoint counters behind ``stats()``, once per process.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import numpy as np

from mr.detections import Detections
from mr.errors import InvalidInputError, ModelError
from mr.metrics import Metrics, Operation, current
from mr.models.base import TileFailure
from mr.models.calls import (  # noqa: F401  (re-exported: part of this module's interface)
    MAX_REPLY_BYTES,
    Breaker,
    EndpointStats,
    RetryPolicy,
    _cached,
    _CallFailed,
    _Circuit,
    _within_limit,
    endpoint_stats,
    parse_reply,
)
from mr.models.inflight import CallPool, Lease, Pending

DEFAULT_THREADS = 4
"""Calls in flight at once per process and endpoint when the model sets no ``max_in_flight``."""
MAX_THREADS = 32
"""Most call threads (each with its own connection) per process and endpoint, whatever ``max_in_flight``."""
SAGEMAKER_PARAMETERS = frozenset({"TargetVariant", "TargetModel", "CustomAttributes", "ContentType", "Accept",
                                  "InferenceId", "TargetContainerHostname", "InferenceComponentName"})
_RETRY_STATUS = frozenset({408, 429})
_THROTTLED_CODES = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException"})
_THROTTLING_CODES = _THROTTLED_CODES | {"ServiceUnavailable", "InternalFailure", "ModelNotReadyException"}
"""Error codes worth retrying: throttles, and an endpoint that is not ready or failed inside."""


class _EndpointModel:
    """What both endpoint models share: encoding, the call threads, retries, the in-flight limit, counters."""

    name: str
    records_invocations = True
    """Each call is recorded as a ModelInvocation (with its errors, throttles and retries) by the model itself."""

    def __init__(self, name: str, tile_format: str, tile_compression: str, retry: RetryPolicy,
                 max_in_flight: int | None, breaker: Breaker | None = None) -> None:
        if not isinstance(retry, RetryPolicy):
            raise InvalidInputError("retry", retry, "must be a RetryPolicy, e.g. RetryPolicy(max_attempts=3)")
        if breaker is not None and not isinstance(breaker, Breaker):
            raise InvalidInputError("breaker", breaker, "must be a Breaker, e.g. Breaker(failures=8, seconds=30)")
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise InvalidInputError("max_in_flight", max_in_flight, "must be an integer >= 1, or None for no limit")
        if not isinstance(tile_format, str) or not tile_format:
            raise InvalidInputError("tile_format", tile_format, "must be a format name such as 'NITF' or 'PNG'")
        self.name = name
        self.tile_format = tile_format
        self.tile_compression = tile_compression
        self.retry = retry
        self.max_in_flight = max_in_flight
        self.breaker = breaker

    _ARGUMENTS: tuple[str, ...] = ()
    """Constructor arguments, kept as attributes of the same names: what the model pickles to."""

    def __reduce__(self) -> tuple:
        return (_construct, (type(self), {key: getattr(self, key) for key in self._ARGUMENTS}))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def _invoke(self, payload: bytes, content_type: str) -> bytes:
        """One call: the reply body, or _CallFailed."""
        raise NotImplementedError

    def stats(self) -> dict:
        """This process's counters for this endpoint (see EndpointStats.snapshot)."""
        return endpoint_stats(self.name).snapshot()

    def __call__(self, tiles: np.ndarray) -> list[Detections | TileFailure]:
        """One table, or a TileFailure, per tile of a (n, bands, h, w) batch, in order."""
        return self.submit(tiles).result()

    def submit(self, tiles: np.ndarray) -> Pending[Detections | TileFailure]:
        """Start the calls of a (n, bands, h, w) batch and return at once; ``.result()`` is what ``__call__`` gives.

        So a region task can queue all its batches and the endpoint stays busy from one batch to the next.
        """
        if not isinstance(tiles, np.ndarray) or tiles.ndim != 4:
            shape = getattr(tiles, "shape", type(tiles).__name__)
            raise InvalidInputError("tiles", shape, "must be a numpy array of shape (n, bands, height, width)")
        calls = self._calls()  # resolved here: a worker is only known in the task's own thread
        metrics = current()  # likewise: the pool's threads do not see the task's context
        return Pending([calls.submit(partial(self._process, tile, metrics=metrics)) for tile in tiles])

    def _calls(self) -> CallPool:
        """This process's call threads for this endpoint and its limiter, made on first use and kept."""
        key, limiter = self._limit()
        threads = min(self.max_in_flight or DEFAULT_THREADS, MAX_THREADS)
        return _cached(("calls", self.name, threads, *key),
                       lambda: CallPool(threads, limiter, f"mr-endpoint-{self.name}"))

    def _limiter(self) -> Any:
        """A cluster-wide distributed.Semaphore on a worker, a process-local semaphore elsewhere, or no limit."""
        return self._limit()[1]

    def _limit(self) -> tuple[tuple, Any]:
        """(cache key, limiter) of :meth:`_limiter`; the limiter is made once per key and process."""
        if self.max_in_flight is None:
            return ("no-limit",), None
        try:
            from distributed import Semaphore, get_worker

            worker = get_worker()
        except (ImportError, ValueError):
            key = ("local-semaphore", self.name, self.max_in_flight)
            return key, _cached(key, lambda: threading.BoundedSemaphore(self.max_in_flight))
        name = f"mr-endpoint-{self.name}"
        key = ("semaphore", worker.id, name, self.max_in_flight)
        return key, _cached(key, lambda: Semaphore(max_leases=self.max_in_flight, name=name))

    def _process(self, tile: np.ndarray, lease: Lease, *, metrics: Metrics) -> Detections | TileFailure:
        """Encode one tile, call the endpoint until it succeeds, fails for good or runs out of attempts."""
        from mr.encoding import content_type, encode_tile

        stats = endpoint_stats(self.name)
        circuit = _cached(("circuit", self.name), _Circuit) if self.breaker else None
        refused = circuit.refuses(self.breaker) if circuit else None
        if refused:
            stats.add(failed_tiles=1)
            metrics.add(Operation.MODEL_INVOCATION, invocations=0, errors=1, model_name=self.name)
            return TileFailure(f"{self.name}: {refused}")
        payload = encode_tile(tile, fmt=self.tile_format, compression=self.tile_compression)
        media_type = content_type(self.tile_format)
        for attempt in range(1, self.retry.max_attempts + 1):
            try:
                detections = self._attempt(payload, media_type, lease, stats, metrics)
                if circuit:
                    circuit.record(True, self.breaker)
                return detections
            except _CallFailed as e:
                if not e.retryable or attempt == self.retry.max_attempts:
                    stats.add(failed_tiles=1)
                    if circuit and e.retryable:  # a request the endpoint rejects for good says nothing of its health
                        circuit.record(False, self.breaker, e.reason)
                    plural = "s" if attempt > 1 else ""
                    return TileFailure(f"{self.name}: {e.reason} after {attempt} attempt{plural}")
            stats.add(retries=1)
            metrics.add(Operation.MODEL_INVOCATION, invocations=0, retries=1, model_name=self.name)
            lease.give_back()  # no lease is held through a back-off
            time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def _attempt(
        self, payload: bytes, media_type: str, lease: Lease, stats: EndpointStats, metrics: Metrics
    ) -> Detections:
        """One call and the parse of its reply, both counted (a ModelInvocation each)."""
        start = time.perf_counter()
        try:
            lease.take()  # kept by the thread for its next call (see mr.models.inflight)
            body = self._invoke(payload, media_type)
            detections = parse_reply(body)
        except _CallFailed as e:
            seconds = time.perf_counter() - start
            stats.add(calls=1, errors=1, latency_s=seconds)
            metrics.add(Operation.MODEL_INVOCATION, seconds, errors=1, throttles=int(e.throttled),
                        model_name=self.name)
            raise
        seconds = time.perf_counter() - start
        stats.add(calls=1, latency_s=seconds)
        metrics.add(Operation.MODEL_INVOCATION, seconds, model_name=self.name)
        return detections


def _construct(cls: type, arguments: dict) -> _EndpointModel:
    """Unpickle by calling the constructor."""
    return cls(**arguments)


class HttpEndpointModel(_EndpointModel):
    """POST each encoded tile to ``url`` (an OSML container's ``/invocations``) and parse the OSML reply."""

    _ARGUMENTS = ("url", "tile_format", "tile_compression", "retry", "max_in_flight", "verify_tls", "name", "breaker")

    def __init__(self, url: str, *, tile_format: str = "NITF", tile_compression: str = "NONE",
                 retry: RetryPolicy = RetryPolicy(), max_in_flight: int | None = None, verify_tls: bool = True,
                 name: str | None = None, breaker: Breaker | None = None) -> None:
        if not isinstance(url, str) or not re.match(r"https?://[^/]+", url):
            raise InvalidInputError("url", url, "must be an http(s) URL, e.g. http://model:8080/invocations")
        if not isinstance(verify_tls, bool):
            raise InvalidInputError("verify_tls", verify_tls, "must be True or False")
        super().__init__(name or url, tile_format, tile_compression, retry, max_in_flight, breaker)
        self.url = url
        self.verify_tls = verify_tls

    def _invoke(self, payload: bytes, content_type: str) -> bytes:
        """One POST over this thread's keep-alive connection (``mr.models.keepalive``); no redirects followed."""
        import http.client
        import ssl

        from mr.models.keepalive import connection, target

        link = connection(self.url, self.verify_tls, self.retry.timeout)
        try:
            link.request("POST", target(self.url), body=payload,
                         headers={"Content-Type": content_type, "Accept": "application/json"})
            response = link.getresponse()
        except ssl.SSLError as e:
            link.close()
            raise _CallFailed(f"TLS error ({e}); pass verify_tls=False only for a trusted test endpoint",
                              retryable=False) from None
        except (http.client.HTTPException, OSError) as e:
            link.close()
            raise _CallFailed(f"{type(e).__name__} ({e})", retryable=True) from None
        try:
            return _read_reply(response)
        finally:
            if not response.isclosed():  # a reply not read to its end leaves the connection unusable
                link.close()


def _read_reply(response: Any) -> bytes:
    """The body of a 2xx reply, at most MAX_REPLY_BYTES; _CallFailed for any other status."""
    import http.client

    try:
        length = int(response.headers.get("Content-Length", 0))
        body = _within_limit(b"" if length > MAX_REPLY_BYTES else response.read(MAX_REPLY_BYTES + 1), length)
    except (http.client.HTTPException, OSError, ValueError) as e:
        raise _CallFailed(f"{type(e).__name__} while reading the reply ({e})", retryable=True) from None
    status = response.status
    if 200 <= status < 300:
        return body
    detail = body[:200].decode("utf-8", "replace").strip()
    retryable = status in _RETRY_STATUS or status >= 500
    raise _CallFailed(f"HTTP {status}" + (f": {detail}" if detail else ""), retryable=retryable,
                      throttled=status == 429)


class SageMakerModel(_EndpointModel):
    """Invoke the SageMaker endpoint ``endpoint_name`` (sagemaker-runtime InvokeEndpoint) once per tile.

    ``parameters`` go to InvokeEndpoint as given (TargetVariant, TargetModel, CustomAttributes, ContentType, ...);
    ``assumed_role`` is a role ARN assumed through STS with RoleSessionName ``mr-<job_id>`` (``mr-<endpoint>``
    without a job id; see :mod:`mr.aws_roles`), refreshed before it expires. botocore's own retries are off: the
    RetryPolicy decides.
    """

    _ARGUMENTS = ("endpoint_name", "parameters", "assumed_role", "tile_format", "tile_compression", "retry",
                  "max_in_flight", "endpoint_url", "job_id", "breaker")

    def __init__(self, endpoint_name: str, *, parameters: Mapping[str, str] | None = None,
                 assumed_role: str | None = None, tile_format: str = "NITF", tile_compression: str = "NONE",
                 retry: RetryPolicy = RetryPolicy(), max_in_flight: int | None = None,
                 endpoint_url: str | None = None, job_id: str | None = None, breaker: Breaker | None = None) -> None:
        if not isinstance(endpoint_name, str) or not endpoint_name:
            raise InvalidInputError("endpoint_name", endpoint_name, "must be a SageMaker endpoint name")
        if job_id is not None and not isinstance(job_id, str):
            raise InvalidInputError("job_id", job_id, "must be the job id (a string) or None")
        parameters = dict(parameters or {})
        unknown = sorted(set(parameters) - SAGEMAKER_PARAMETERS)
        if unknown:
            raise InvalidInputError("parameters", unknown, f"unknown InvokeEndpoint parameters; use any of "
                                                           f"{sorted(SAGEMAKER_PARAMETERS)}")
        if assumed_role is not None and not str(assumed_role).startswith("arn:"):
            raise InvalidInputError("assumed_role", assumed_role,
                                    "must be a role ARN, arn:aws:iam::<account>:role/<name>")
        super().__init__(endpoint_name, tile_format, tile_compression, retry, max_in_flight, breaker)
        self.endpoint_name = endpoint_name
        self.parameters = parameters
        self.assumed_role = assumed_role
        self.endpoint_url = endpoint_url
        self.job_id = job_id

    def client(self) -> Any:
        """This process's sagemaker-runtime client for this endpoint's role, URL and timeout; ModelError if none."""
        from mr.aws_roles import job_scoped

        role_job = self.job_id if self.assumed_role else None  # a role's session is named for its job
        key = ("sagemaker", self.assumed_role, role_job, self.endpoint_url, self.retry.timeout, self.max_in_flight)
        try:
            return (job_scoped if self.assumed_role else _cached)(key, self._make_client)
        except Exception as e:  # no region, no credentials, a role that cannot be assumed: not one tile's fault
            raise ModelError(f"{self.name}: cannot create a sagemaker-runtime client: {type(e).__name__}: {e}") from e

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        from mr.aws_roles import assumed_role_session, role_session_name

        name = role_session_name(self.job_id) if self.job_id else session_name(self.endpoint_name)
        session = assumed_role_session(self.assumed_role, name) if self.assumed_role else boto3.Session()
        config = Config(retries={"total_max_attempts": 1}, connect_timeout=self.retry.timeout,
                        read_timeout=self.retry.timeout, max_pool_connections=max(10, self.max_in_flight or 0))
        return session.client("sagemaker-runtime", endpoint_url=self.endpoint_url, config=config)

    def _invoke(self, payload: bytes, content_type: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        client, arguments = self.client(), {"ContentType": content_type, **self.parameters}
        try:
            response = client.invoke_endpoint(EndpointName=self.endpoint_name, Body=payload, **arguments)
            return _within_limit(response["Body"].read(MAX_REPLY_BYTES + 1))
        except ClientError as e:
            raise _client_failure(e) from None
        except BotoCoreError as e:  # timeouts, connection errors
            raise _CallFailed(f"{type(e).__name__} ({e})", retryable=True) from None


def _client_failure(error: Any) -> _CallFailed:
    """Classify a botocore ClientError: throttling, 5xx and model 5xx/429 are retried, other 4xx are not."""
    info = error.response.get("Error", {})
    code = info.get("Code", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    original = error.response.get("OriginalStatusCode", 0)
    retryable = (code in _THROTTLING_CODES or status >= 500 or status in _RETRY_STATUS
                 or (code == "ModelError" and (original >= 500 or original in _RETRY_STATUS)))
    throttled = code in _THROTTLED_CODES or status == 429
    return _CallFailed(f"{code or 'error'} (HTTP {status}): {info.get('Message', '')}".rstrip(": "), retryable,
                       throttled)


def session_name(endpoint_name: str) -> str:
    """The STS RoleSessionName that identifies mr: ``mr-<endpoint>``, legal characters, at most 64."""
    return re.sub(r"[^\w+=,.@-]", "-", f"mr-{endpoint_name}")[:64]

