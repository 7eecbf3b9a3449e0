"""Endpoint models against real HTTP servers on 127.0.0.1 and SageMaker through the moto server."""

from __future__ import annotations

import hashlib
import json
import pickle
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self

import numpy as np
import pytest

from mr.detections import Detections
from mr.metrics import Metrics
from mr.models.base import Model, TileFailure
from mr.models.endpoint import HttpEndpointModel, RetryPolicy, SageMakerModel, _client_failure, session_name

pytest.importorskip("mr.encoding")

FAST = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, timeout=1.0)


def osml_reply(n: int = 2) -> dict:
    """What an OSML model container answers: pixel geometry in imageGeometry/imageBBox, geometry null."""
    features = []
    for i in range(n):
        box = [4.0 + 10 * i, 6.0, 12.0 + 10 * i, 16.0]
        x0, y0, x1, y1 = box
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        features.append({"type": "Feature", "geometry": None, "properties": {
            "imageGeometry": {"type": "Polygon", "coordinates": [ring]}, "imageBBox": box,
            "featureClasses": [{"iri": "ship" if i % 2 else "car", "score": 0.5 + 0.1 * i}]}})
    legacy = {"type": "Feature", "geometry": None,
              "properties": {"bounds_imcoords": [40, 40, 50, 48], "feature_types": {"plane": 0.75}}}
    return {"type": "FeatureCollection", "features": features + [legacy]}


def tiles(n: int) -> np.ndarray:
    """n distinct single-band tiles (distinct bodies let a server tell them apart)."""
    return np.stack([np.full((1, 64, 64), i, np.uint8) for i in range(n)])


class Server:
    """A threaded HTTP server whose ``respond(server, body)`` returns (status, body bytes); it counts calls."""

    def __init__(self, respond, delay: float = 0.0) -> None:
        self.respond, self.delay = respond, delay
        self.lock = threading.Lock()
        self.calls = self.in_flight = self.peak = 0
        self.bodies: dict[str, int] = {}
        self.content_types: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with server.lock:
                    server.calls += 1
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                    server.content_types.add(self.headers["Content-Type"])
                time.sleep(server.delay)
                try:
                    status, reply = server.respond(server, body)
                finally:
                    with server.lock:  # before the reply: the client may send its next request right after it
                        server.in_flight -= 1
                try:
                    if status is None:  # a hand-written reply
                        self.wfile.write(reply)
                        return
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/invocations"

    def attempt(self, body: bytes) -> int:
        """How many times this body was sent before (0 on its first call)."""
        key = hashlib.sha1(body).hexdigest()
        with self.lock:
            self.bodies[key] = self.bodies.get(key, 0) + 1
            return self.bodies[key] - 1

    def __enter__(self) -> Self:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def healthy(server, body):
    return 200, json.dumps(osml_reply()).encode()


def test_healthy_server_replies_are_parsed_into_detections():
    with Server(healthy) as server:
        model = HttpEndpointModel(server.url, retry=FAST, name="healthy")
        results = model(tiles(3))
    assert isinstance(model, Model) and len(results) == 3 and server.calls == 3
    assert server.content_types == {"image/nitf"}
    for result in results:
        assert isinstance(result, Detections)
        np.testing.assert_allclose(result.boxes, [[4, 6, 12, 16], [14, 6, 22, 16], [40, 40, 50, 48]])
        np.testing.assert_allclose(result.scores, [0.5, 0.6, 0.75], rtol=1e-6)
        assert list(result.labels) == ["car", "ship", "plane"]
        assert result.geometry[0].bounds == (4, 6, 12, 16)
    stats = model.stats()
    assert stats["calls"] >= 3 and stats["retries"] == 0 and stats["failed_tiles"] == 0 and stats["latency_s"] > 0


def test_flaky_server_every_tile_succeeds_through_retries():
    modes = ["503", "slow", "malformed", "empty"]
    failures = []

    def flaky(server, body):
        if server.attempt(body) > 0:  # each tile's first call fails, the retry succeeds: half the calls fail
            return healthy(server, body)
        with server.lock:
            mode = modes[len(failures) % len(modes)]
            failures.append(mode)
        if mode == "503":
            return 503, b"busy"
        if mode == "slow":
            time.sleep(FAST.timeout + 0.5)
            return healthy(server, body)
        return 200, b"{not json" if mode == "malformed" else b""

    with Server(flaky) as server:
        model = HttpEndpointModel(server.url, retry=FAST, name="flaky")
        start = time.perf_counter()
        results = model(tiles(8))
        elapsed = time.perf_counter() - start
    assert all(isinstance(r, Detections) and len(r) == 3 for r in results)
    assert sorted(failures) == sorted(modes * 2) and server.calls == 16
    stats = model.stats()
    assert (stats["calls"], stats["errors"], stats["retries"], stats["failed_tiles"]) == (16, 8, 8, 0)
    assert elapsed < 5


def test_client_error_is_not_retried():
    with Server(lambda server, body: (400, b"bad tile format")) as server:
        model = HttpEndpointModel(server.url, retry=FAST, name="always-400")
        results = model(tiles(4))
    assert server.calls == 4
    assert all(isinstance(r, TileFailure) for r in results)
    assert all("HTTP 400" in r.reason and "after 1 attempt" in r.reason for r in results)
    assert results[0].reason.startswith("always-400: ")
    assert model.stats()["retries"] == 0 and model.stats()["failed_tiles"] == 4


def test_server_error_fails_the_tile_after_max_attempts_in_bounded_time():
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, timeout=1.0)
    with Server(lambda server, body: (500, b"")) as server:
        model = HttpEndpointModel(server.url, retry=policy, name="always-500")
        start = time.perf_counter()
        results = model(tiles(4))
        elapsed = time.perf_counter() - start
    assert server.calls == 12 and elapsed < 3
    assert all(isinstance(r, TileFailure) and "HTTP 500 after 3 attempts" in r.reason for r in results)
    assert model.stats()["retries"] == 8


def test_unreachable_endpoint_and_oversized_reply_become_tile_failures():
    refused = HttpEndpointModel("http://127.0.0.1:9/invocations", retry=FAST, name="refused")
    [result] = refused(tiles(1))
    assert isinstance(result, TileFailure) and "after 5 attempts" in result.reason

    def huge(server, body):
        return None, b"HTTP/1.1 200 OK\r\nContent-Length: 70000000\r\n\r\n{}"

    with Server(huge) as server:
        [result] = HttpEndpointModel(server.url, retry=FAST, name="huge")(tiles(1))
    assert isinstance(result, TileFailure) and "limit" in result.reason and server.calls == 1


def test_process_local_limit_on_requests_in_flight():
    with Server(healthy, delay=0.05) as server:
        model = HttpEndpointModel(server.url, retry=FAST, max_in_flight=2, name="limited-local")
        results = [None] * 2
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, model(tiles(6)))) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert server.calls == 12 and server.peak == 2
    assert all(isinstance(r, Detections) for batch in results for r in batch)


def test_cluster_wide_limit_through_a_distributed_semaphore():
    from distributed import Client, LocalCluster

    with Server(healthy, delay=0.05) as server:
        model = HttpEndpointModel(server.url, retry=FAST, max_in_flight=2, name="limited-cluster")
        with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            kinds = client.gather([client.submit(lambda m: type(m._limiter()).__name__, model, pure=False)])
            addresses = list(client.scheduler_info()["workers"])
            futures = [client.submit(model, tiles(6), pure=False, workers=[a]) for a in addresses for _ in range(2)]
            batches = client.gather(futures)
    assert kinds == ["Semaphore"]
    assert server.calls == 24 and server.peak == 2
    assert all(isinstance(r, Detections) for batch in batches for r in batch)


def _pipelined(model: HttpEndpointModel, batches: int) -> list:
    """What a region task does with an endpoint model: submit every batch, then collect them in order."""
    pending = [model.submit(tiles(3)) for _ in range(batches)]
    return [table for batch in pending for table in batch.result()]


def test_cluster_wide_limit_holds_for_pipelined_batches_at_a_lease_per_busy_spell():
    from distributed import Client, LocalCluster

    with Server(healthy, delay=0.02) as server:
        model = HttpEndpointModel(server.url, retry=FAST, max_in_flight=2, name="limited-pipelined")
        with LocalCluster(n_workers=2, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            addresses = list(client.scheduler_info()["workers"])
            futures = [client.submit(_pipelined, model, 4, pure=False, workers=[a]) for a in addresses for _ in "ab"]
            results = client.gather(futures)
            semaphores = cluster.scheduler.extensions["semaphores"]
            acquired = semaphores.metrics["acquire_total"]["mr-endpoint-limited-pipelined"]
    assert server.calls == 48 and server.peak == 2
    assert all(isinstance(r, Detections) for batch in results for r in batch)
    assert 2 <= acquired <= 12  # a lease per call thread and busy spell, not the 48 of a lease per call


def test_batches_share_the_process_call_threads():
    def call_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("mr-endpoint-shared-threads-")}

    with Server(healthy) as server:
        model = HttpEndpointModel(server.url, retry=FAST, max_in_flight=3, name="shared-threads")
        model(tiles(5))
        first = call_threads()
        model(tiles(7))
        pickle.loads(pickle.dumps(model))(tiles(2))  # as a worker sees the model: a copy, the same threads
    assert len(first) == 3 and call_threads() == first and server.calls == 14


def test_a_worker_reads_its_next_region_while_the_endpoint_answers_the_last(client, tmp_path):
    """A region task steps out of its worker's thread pool once its tiles are with the endpoint: on one-thread
    workers, the next region task starts before the last one has its replies, and the result is unchanged."""
    import mr
    from distributed import get_task_stream
    from mr.run import compute_table
    from tests.rasters import write_geotiff

    path = write_geotiff(tmp_path / "regions.tif", tiled=True, blocksize=64, height=256, width=512)
    with Server(healthy, delay=0.25) as server:
        model = HttpEndpointModel(server.url, retry=FAST, max_in_flight=16, name="stepping-aside")
        result = mr.detect(mr.open_image(path), model, tile_size=64, overlap=0, region_size=128)
        assert result.plan.grid.region_count == 8
        with get_task_stream(client) as stream:
            table = compute_table(result, client)
        expected = compute_table(mr.detect(mr.open_image(path), model, tile_size=64, overlap=0, region_size=128),
                                 scheduler="sync")
    spans: dict[str, list[tuple[float, float]]] = {}
    for task in stream.data:
        if str(task["key"][0]).startswith("read-infer-region"):
            for interval in task["startstops"]:
                if interval["action"] == "compute":
                    spans.setdefault(task["worker"], []).append((interval["start"], interval["stop"]))
    overlapping = [
        (a, b) for worker in spans.values() for a, b in zip(sorted(worker), sorted(worker)[1:]) if b[0] < a[1] - 0.05
    ]
    assert overlapping, spans  # two region tasks at once on a one-thread worker
    assert len(table) == len(expected) == 32 * 3
    np.testing.assert_array_equal(np.sort(table.detections.boxes, axis=0), np.sort(expected.detections.boxes, axis=0))


class KeepAliveServer(Server):
    """An HTTP/1.1 server that keeps connections open, counts them, and can drop one after its next reply."""

    def __init__(self, respond) -> None:
        super().__init__(respond)
        self.connections = 0
        self.drop_next = False
        handler, server = self.httpd.RequestHandlerClass, self

        class KeepAlive(handler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.connections += 1

            def do_POST(self) -> None:
                super().do_POST()
                if server.drop_next:  # as an idle timeout does: closed without a "Connection: close"
                    server.drop_next, self.close_connection = False, True

        self.httpd.RequestHandlerClass = KeepAlive


def test_a_call_thread_keeps_its_connection_and_replaces_one_the_server_closed():
    with KeepAliveServer(healthy) as server:
        model = HttpEndpointModel(server.url, retry=FAST, max_in_flight=1, name="keep-alive")
        model(tiles(3))
        model(tiles(3))
        assert server.connections == 1
        server.drop_next = True
        model(tiles(1))
        time.sleep(0.2)  # the server's close reaches the idle connection
        results = model(tiles(2))
    assert all(isinstance(r, Detections) for r in results)
    assert server.calls == 9 and server.connections == 2
    assert model.stats()["errors"] == 0 and model.stats()["retries"] == 0


def test_no_lease_is_held_through_a_back_off(monkeypatch):
    """Two callers share one lease; the first backs off after a 503 and the second is served meanwhile."""
    from mr.models.inflight import Lease

    order = []

    def first_fails(server, body):
        with server.lock:
            order.append(int(np.frombuffer(body[-1:], np.uint8)[0]))  # the tile's value: its last pixel
        if order[-1] == 0 and server.attempt(body) == 0:
            return 503, b"busy"
        return healthy(server, body)

    monkeypatch.setattr(RetryPolicy, "delay", lambda self, attempt: 0.5)
    limiter = threading.BoundedSemaphore(1)
    with Server(first_fails) as server:
        model = HttpEndpointModel(server.url, retry=FAST, name="backs-off")
        results = {}

        def call(tile: np.ndarray) -> None:
            lease = Lease(limiter)
            results[int(tile.flat[0])] = model._process(tile, lease, metrics=Metrics())
            lease.give_back()  # as its call thread does once idle

        first = threading.Thread(target=call, args=(tiles(1)[0],))
        first.start()
        time.sleep(0.1)
        call(tiles(2)[1])
        first.join()
    assert all(isinstance(r, Detections) for r in results.values()) and order == [0, 1, 0]


def test_models_pickle_to_their_arguments_and_validate_them():
    model = HttpEndpointModel("http://127.0.0.1:1/invocations", max_in_flight=3, retry=FAST, verify_tls=True)
    copy = pickle.loads(pickle.dumps(model))
    assert (copy.url, copy.max_in_flight, copy.retry, copy.verify_tls) == (model.url, 3, FAST, True)
    sagemaker = pickle.loads(pickle.dumps(SageMakerModel("ep", parameters={"TargetVariant": "a"})))
    assert sagemaker.parameters == {"TargetVariant": "a"} and sagemaker.name == "ep"
    with pytest.raises(ValueError, match="max_in_flight"):
        HttpEndpointModel("http://x/invocations", max_in_flight=0)
    with pytest.raises(ValueError, match="url"):
        HttpEndpointModel("ftp://x")
    with pytest.raises(ValueError, match="parameters"):
        SageMakerModel("ep", parameters={"Body": b""})
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    assert all(0 <= FAST.delay(n) <= FAST.max_delay for n in range(1, 20))
    assert session_name("e" * 100) == "mr-" + "e" * 61


def _moto_results(endpoint: str, *bodies: str) -> None:
    payload = {"region": "us-east-1", "results": [
        {"Body": body, "ContentType": "application/json", "InvokedProductionVariant": "blue",
         "CustomAttributes": "seen"} for body in bodies]}
    for path, data in (("reset", b""), ("static/sagemaker/endpoint-results", json.dumps(payload).encode())):
        request = urllib.request.Request(f"{endpoint}/moto-api/{path}", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request).close()


def test_sagemaker_endpoint_through_moto(moto_server):
    _moto_results(moto_server, *[json.dumps(osml_reply(n)) for n in (1, 2)])
    parameters = {"TargetVariant": "blue", "CustomAttributes": "tile=1", "ContentType": "application/x-nitf"}
    model = SageMakerModel("mr-test-endpoint", parameters=parameters, retry=FAST,
                           assumed_role="arn:aws:iam::123456789012:role/mr-runner", endpoint_url=moto_server)
    sent = []
    model.client().meta.events.register("before-send.sagemaker-runtime.InvokeEndpoint",
                                        lambda request, **kw: sent.append({k: v.decode() if isinstance(v, bytes) else v
                                                                          for k, v in request.headers.items()}))
    results = model(tiles(2))
    assert sorted(len(r) for r in results) == [2, 3]
    assert all(isinstance(r, Detections) for r in results)
    assert {tuple(r.labels) for r in results} == {("car", "plane"), ("car", "ship", "plane")}
    assert len(sent) == 2
    for headers in sent:
        assert headers["X-Amzn-SageMaker-Target-Variant"] == "blue"
        assert headers["X-Amzn-SageMaker-Custom-Attributes"] == "tile=1"
        assert headers["Content-Type"] == "application/x-nitf"
    credentials = model.client()._request_signer._credentials
    assert credentials.access_key.startswith("ASIA")  # moto's temporary (assumed-role) keys
    assert model.stats()["calls"] == 2


@pytest.mark.parametrize(("code", "status", "original", "retryable"), [
    ("ThrottlingException", 400, None, True), ("InternalFailure", 500, None, True),
    ("ModelError", 424, 503, True), ("ModelError", 424, 400, False), ("ValidationError", 400, None, False),
])
def test_sagemaker_errors_are_classified(code, status, original, retryable):
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    if original:
        response["OriginalStatusCode"] = original
    failure = _client_failure(ClientError(response, "InvokeEndpoint"))
    assert failure.retryable is retryable and code in failure.reason
