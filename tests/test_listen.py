"""The listener end to end: OversightML requests from the queue to published features, state and notices."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mr.synthetic import match_detections, planted_boxes, write_scene


def osml_request(job_id: str, image: Path, outputs: list[dict], **extra) -> dict:
    """A request in OversightML ModelRunner's message format."""
    return {
        "jobName": f"test-{job_id}",
        "jobId": job_id,
        "imageUrls": [str(image)],
        "outputs": outputs,
        "imageProcessor": {"name": "builtin", "type": "LOCAL"},
        "imageProcessorTileSize": 512,
        "imageProcessorTileOverlap": 64,
        "imageProcessorTileFormat": "GTIFF",
        "imageProcessorTileCompression": "NONE",
        "featureProperties": [{"mission": "listener-test"}],
        **extra,
    }


def mr_command(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("listen") / "scene.tif"
    planted = write_scene(path, 1600, 1400, n_objects=70, seed=17)
    return path, planted


@pytest.fixture
def embedded(tmp_path):
    """Embedded mode: queue and state in one SQLite file, checkpoints beside it."""
    database = f"sqlite:///{tmp_path / 'mr.db'}"
    return {
        "queue": database, "store": database, "data": tmp_path,
        "args": ["--queue", database, "--store", database, "--data-dir", str(tmp_path), "--workers", "1"],
    }


def features_of(path: Path) -> list[dict]:
    return json.loads(path.read_text())["features"]


@contextlib.contextmanager
def loopback_server(handler) -> Iterator[str]:
    """An http.server with ``handler`` on 127.0.0.1 in a thread: yields its /invocations URL."""
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/invocations"
    finally:
        server.shutdown()
        server.server_close()


def listen_to_endpoint_request(
    job_id: str, endpoint: str, image: Path, out: Path, embedded: dict, env: dict | None = None, timeout: float = 300,
    **extra,
) -> subprocess.CompletedProcess:
    """Submit an HTTP_ENDPOINT request writing to ``out``, then run the listener once; returns the listener's run."""
    request = osml_request(job_id, image, [{"type": "File", "path": str(out)}], **extra)
    request["imageProcessor"] = {"name": endpoint, "type": "HTTP_ENDPOINT"}
    path = out.with_suffix(".request.json")
    path.write_text(json.dumps(request))
    assert mr_command("mr", "submit", str(path), "--queue", embedded["queue"]).returncode == 0
    listened = mr_command("mr.listen", "--once", *embedded["args"], env=env, timeout=timeout)
    assert listened.returncode == 0, listened.stderr
    return listened


def test_embedded_request_end_to_end(scene, embedded, tmp_path):
    out = tmp_path / "found.geojson"
    request = tmp_path / "request.json"
    request.write_text(json.dumps(osml_request("job-embedded", scene[0], [{"type": "File", "path": str(out)}])))
    submitted = mr_command("mr", "submit", str(request), "--queue", embedded["queue"])
    assert submitted.returncode == 0, submitted.stderr
    listened = mr_command("mr.listen", "--once", *embedded["args"])
    assert listened.returncode == 0, listened.stderr
    assert "StatusMonitor update: SUCCESS job-embedded" in listened.stderr
    features = features_of(out)
    boxes = [f["properties"]["imageBBox"] for f in features]
    assert match_detections(boxes, planted_boxes(scene[1])).recall >= 0.95
    assert features[0]["properties"]["mission"] == "listener-test"
    assert features[0]["properties"]["inferenceMetadata"]["jobId"] == "job-embedded"
    shown = mr_command("mr", "status", "job-embedded", "--store", embedded["store"])
    assert shown.returncode == 0 and json.loads(shown.stdout)["status"] == "SUCCESS"
    assert json.loads(shown.stdout)["feature_count"] == len(features)


def test_bad_messages_fail_with_their_reason_and_the_rest_go_on(scene, embedded, tmp_path):
    from mr.queues import open_queue
    from mr.state import open_store

    queue = open_queue(embedded["queue"])
    out = tmp_path / "good.geojson"
    good = osml_request("job-good", scene[0], [{"type": "File", "path": str(out)}])
    bad = {
        "job-no-urls": {k: v for k, v in good.items() if k != "imageUrls"} | {"jobId": "job-no-urls"},
        "job-bad-enum": good | {"jobId": "job-bad-enum", "imageProcessorTileFormat": "BMP"},
        "job-bad-overlap": good | {"jobId": "job-bad-overlap", "imageProcessorTileOverlap": 600},
        "job-missing-image": good | {"jobId": "job-missing-image", "imageUrls": [str(tmp_path / "nope.tif")]},
        "job-bad-model": good | {"jobId": "job-bad-model", "imageProcessor": {"name": "/etc/passwd", "type": "LOCAL"}},
    }
    queue.send(b"{ not json")
    for message in bad.values():
        queue.send(json.dumps(message))
    queue.send(json.dumps(good))
    listened = mr_command("mr.listen", "--once", *embedded["args"])
    assert listened.returncode == 0, listened.stderr
    store = open_store(embedded["store"])
    assert store.get_job("job-good").status.value == "SUCCESS" and features_of(out)
    reasons = {
        "job-no-urls": "imageUrls", "job-bad-enum": "imageProcessorTileFormat",
        "job-bad-overlap": "imageProcessorTileOverlap", "job-missing-image": "nope.tif",
        "job-bad-model": "imageProcessor.name",
    }
    for job_id, field in reasons.items():
        record = store.get_job(job_id)
        assert record.status.value == "FAILED", job_id
        assert field in record.message, (job_id, record.message)
    failed = [r for r in store.list_jobs(status="FAILED") if r.job_id.startswith("invalid-")]
    assert len(failed) == 1 and "JSON" in failed[0].message.upper() or "json" in failed[0].message
    assert queue.receive(max_messages=10, wait_seconds=0) == []


def test_killed_listener_resumes_without_losing_or_duplicating(tmp_path, embedded):
    """SIGKILL the listener mid-request, start it again: the request completes once, identical to a clean run."""
    big = tmp_path / "big.tif"
    planted = write_scene(big, 3000, 3000, n_objects=250, seed=23)
    env = {"DASK_MR__SERVICE__VISIBILITY_TIMEOUT": "3", "DASK_MR__TILING__REGION_SIZE": "600"}
    clean = tmp_path / "clean.geojson"
    resumed = tmp_path / "resumed.geojson"
    clean_db = f"sqlite:///{tmp_path / 'clean.db'}"
    for job_id, out, database in (("job-clean", clean, clean_db), ("job-kill", resumed, embedded["queue"])):
        request = tmp_path / f"{job_id}.json"
        request.write_text(json.dumps(osml_request(job_id, big, [{"type": "File", "path": str(out)}])))
        assert mr_command("mr", "submit", str(request), "--queue", database).returncode == 0
    done = mr_command("mr.listen", "--once", "--queue", clean_db, "--store", clean_db, "--data-dir",
                      str(tmp_path / "clean-data"), "--workers", "1", env=env)
    assert done.returncode == 0, done.stderr
    listener = subprocess.Popen(
        [sys.executable, "-m", "mr.listen", *embedded["args"]], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    work = Path(embedded["data"]) / "work" / "job-kill"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(work.rglob("*.parquet"))) < 3:
        time.sleep(0.05)
    checkpointed = len(list(work.rglob("*.parquet")))
    os.killpg(listener.pid, signal.SIGKILL)
    listener.wait()
    assert checkpointed >= 3 and not resumed.exists(), "killed after some regions and before publishing"
    time.sleep(3.5)  # the lease runs out: the message is delivered again
    again = mr_command("mr.listen", "--once", *embedded["args"], env=env)
    assert again.returncode == 0, again.stderr
    first, second = features_of(clean), features_of(resumed)
    key = lambda f: f["id"]  # noqa: E731
    assert sorted(map(key, first)) == sorted(map(key, second)), "identical features, none lost or duplicated"
    assert len({key(f) for f in second}) == len(second)
    assert match_detections([f["properties"]["imageBBox"] for f in second], planted_boxes(planted)).recall >= 0.95


def test_aws_request_end_to_end(scene, moto_server, client, tmp_path):
    """SQS → listener → GeoJSON in S3, records in Kinesis, SUCCESS in DynamoDB, the SNS notice on a queue."""
    import boto3

    from mr.listen import Listener
    from mr.queues.sqs import ensure_queue
    from mr.service import ServiceSettings
    from mr.state import open_store

    sqs, s3, kinesis, sns = (boto3.client(name) for name in ("sqs", "s3", "kinesis", "sns"))
    queue_url = ensure_queue("mr-e2e-requests", max_receives=3)
    for bucket in ("mr-e2e-images", "mr-e2e-results"):
        s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(scene[0]), "mr-e2e-images", "scenes/scene.tif")
    kinesis.create_stream(StreamName="mr-e2e-features", ShardCount=1)
    topic = sns.create_topic(Name="mr-e2e-status")["TopicArn"]
    watch = sqs.create_queue(QueueName="mr-e2e-status-watch")["QueueUrl"]
    watch_arn = sqs.get_queue_attributes(QueueUrl=watch, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=watch_arn)
    request = osml_request(
        "job-aws", Path("placeholder"),
        [{"type": "S3", "bucket": "mr-e2e-results", "prefix": "out"},
         {"type": "Kinesis", "stream": "mr-e2e-features", "batchSize": 100}],
    ) | {"imageUrls": ["s3://mr-e2e-images/scenes/scene.tif"]}
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(request))
    no_bucket = request | {"jobId": "job-no-bucket", "outputs": [{"type": "S3", "bucket": "mr-e2e-missing"}]}
    sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(no_bucket))
    settings = ServiceSettings(
        queue=queue_url, store="dynamodb://mr-e2e?create=true", notices=topic, work_dir=str(tmp_path / "work"),
        max_in_flight=1, visibility_timeout=30, poll_seconds=0,
    )
    assert Listener(settings, client).run(once=True) == 2

    body = s3.get_object(Bucket="mr-e2e-results", Key="out/job-aws.geojson")["Body"].read()
    features = json.loads(body)["features"]
    boxes = [f["properties"]["imageBBox"] for f in features]
    assert match_detections(boxes, planted_boxes(scene[1])).recall >= 0.95
    shard = kinesis.describe_stream(StreamName="mr-e2e-features")["StreamDescription"]["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(
        StreamName="mr-e2e-features", ShardId=shard, ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    records = kinesis.get_records(ShardIterator=iterator, Limit=10_000)["Records"]
    assert len(records) == len(features) and all(r["PartitionKey"] == "job-aws" for r in records)
    assert json.loads(records[0]["Data"])["type"] == "FeatureCollection"
    record = open_store(settings.store).get_job("job-aws")
    assert record.status.value == "SUCCESS" and record.feature_count == len(features)
    failed = open_store(settings.store).get_job("job-no-bucket")
    assert failed.status.value == "FAILED" and "mr-e2e-missing" in failed.message
    notices = sqs.receive_message(QueueUrl=watch, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    texts = [json.loads(m["Body"])["Message"] for m in notices]
    assert any(t.startswith("StatusMonitor update: SUCCESS job-aws") for t in texts), texts
    assert sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0).get("Messages") is None


def test_sigterm_stops_cleanly_and_leaves_the_request_for_later(tmp_path, embedded):
    big = tmp_path / "big.tif"
    write_scene(big, 3000, 3000, n_objects=200, seed=29)
    out = tmp_path / "out.geojson"
    request = tmp_path / "job.json"
    request.write_text(json.dumps(osml_request("job-term", big, [{"type": "File", "path": str(out)}])))
    assert mr_command("mr", "submit", str(request), "--queue", embedded["queue"]).returncode == 0
    env = {"DASK_MR__SERVICE__VISIBILITY_TIMEOUT": "3", "DASK_MR__TILING__REGION_SIZE": "600"}
    listener = subprocess.Popen(
        [sys.executable, "-m", "mr.listen", *embedded["args"]], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    work = Path(embedded["data"]) / "work" / "job-term"
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.rglob("*.parquet")):
        time.sleep(0.05)
    listener.send_signal(signal.SIGTERM)
    _, stderr = listener.communicate(timeout=60)
    assert listener.returncode == 0, stderr
    from mr.state import open_store

    record = open_store(embedded["store"]).get_job("job-term")
    if record.status.value != "SUCCESS":  # stopped mid-request: nothing published, the request waits
        assert not out.exists() and record.status.value in ("STARTED", "IN_PROGRESS")
        time.sleep(3.5)
        again = mr_command("mr.listen", "--once", *embedded["args"], env=env)
        assert again.returncode == 0, again.stderr
    assert open_store(embedded["store"]).get_job("job-term").status.value == "SUCCESS"
    features = features_of(out)
    assert len({f["id"] for f in features}) == len(features) >= 190


def test_every_image_of_a_request_is_processed(scene, embedded, tmp_path):
    second = tmp_path / "second.tif"
    planted = write_scene(second, 900, 800, n_objects=25, seed=31)
    out = tmp_path / "both.geojson"
    request = osml_request("job-two", scene[0], [{"type": "File", "path": str(out)}])
    request["imageUrls"].append(str(second))
    path = tmp_path / "two.json"
    path.write_text(json.dumps(request))
    assert mr_command("mr", "submit", str(path), "--queue", embedded["queue"]).returncode == 0
    listened = mr_command("mr.listen", "--once", *embedded["args"])
    assert listened.returncode == 0, listened.stderr
    features = features_of(out)
    by_image: dict[str, list] = {}
    for feature in features:
        by_image.setdefault(feature["properties"]["imageId"], []).append(feature["properties"]["imageBBox"])
    assert len(by_image) == 2
    counts = sorted(len(boxes) for boxes in by_image.values())
    assert counts[0] >= 24 and counts[1] >= 67
    small = min(by_image.values(), key=len)
    assert match_detections(small, planted_boxes(planted)).recall >= 0.95


def test_an_http_endpoint_request_through_mr_serve(scene, embedded, tmp_path):
    """HTTP_ENDPOINT requests reach a model container (here `mr serve` on loopback), as OversightML sends them."""
    from mr.models.builtin import BuiltinDetector
    from mr.serve import serve_in_thread

    server, url = serve_in_thread(BuiltinDetector())
    out = tmp_path / "endpoint.geojson"
    try:
        listen_to_endpoint_request("job-http", f"{url}/invocations", scene[0], out, embedded)
    finally:
        server.shutdown()
        server.server_close()
    boxes = [f["properties"]["imageBBox"] for f in features_of(out)]
    assert match_detections(boxes, planted_boxes(scene[1])).recall >= 0.95
    shown = json.loads(mr_command("mr", "status", "job-http", "--store", embedded["store"]).stdout)
    assert shown["status"] == "SUCCESS"
    stats = shown["summary"]["endpoint"]
    assert stats["calls"] >= shown["tile_count"] and stats["errors"] == 0


def test_an_endpoint_failing_30_percent_of_calls_succeeds_through_retries(scene, embedded, tmp_path):
    """A model container that answers 30% of calls with a 500, a reply slower than the timeout, malformed JSON or
    nothing: the job ends SUCCESS through retries (or PARTIAL naming its tiles) with the planted objects found."""
    import http.client
    import http.server
    import random
    from urllib.parse import urlsplit

    from mr.models.builtin import BuiltinDetector
    from mr.serve import serve_in_thread

    model_server, model_url = serve_in_thread(BuiltinDetector())
    target = urlsplit(model_url)
    chance, lock, faults = random.Random(30), threading.Lock(), []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                fault = chance.choice(["500", "slow", "malformed", "empty"]) if chance.random() < 0.3 else None
                faults.append(fault)
            if fault == "500":
                return self._reply(500, b"overloaded")
            if fault == "slow":
                time.sleep(1.5)  # past the 1 s timeout the listener is given
            if fault in ("malformed", "empty"):
                return self._reply(200, b"{not json" if fault == "malformed" else b"")
            upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            upstream.request("POST", "/invocations", body, {"Content-Type": self.headers["Content-Type"]})
            answer = upstream.getresponse()
            self._reply(answer.status, answer.read())
            upstream.close()

        def _reply(self, status: int, body: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up on a slow reply
                pass

        def log_message(self, *args):
            pass

    out = tmp_path / "flaky.geojson"
    try:
        with loopback_server(Flaky) as endpoint:
            listen_to_endpoint_request("job-flaky", endpoint, scene[0], out, embedded,
                                       env={"DASK_MR__MODEL__ENDPOINT_TIMEOUT": "1"},
                                       imageProcessorTileSize=256, imageProcessorTileOverlap=48)
    finally:
        model_server.shutdown()
        model_server.server_close()
    shown = json.loads(mr_command("mr", "status", "job-flaky", "--store", embedded["store"]).stdout)
    failed = sum(1 for f in faults if f)
    assert 0.15 < failed / len(faults) < 0.45 and len(set(faults) - {None}) == 4
    assert shown["status"] in ("SUCCESS", "PARTIAL")
    assert shown["summary"]["retries"] >= failed - len(shown["failed_tiles"])
    assert all(tile["reason"] and tile["bounds"] for tile in shown["failed_tiles"])
    if shown["status"] == "SUCCESS":
        boxes = [f["properties"]["imageBBox"] for f in features_of(out)]
        assert match_detections(boxes, planted_boxes(scene[1])).recall >= 0.95


def test_an_endpoint_that_keeps_failing_fails_the_job_with_the_tiles_named(scene, embedded, tmp_path):
    import http.server

    class AlwaysFailing(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    out = tmp_path / "partial.geojson"
    with loopback_server(AlwaysFailing) as endpoint:
        listen_to_endpoint_request("job-failing", endpoint, scene[0], out, embedded, timeout=240)
    shown = json.loads(mr_command("mr", "status", "job-failing", "--store", embedded["store"]).stdout)
    assert shown["status"] == "FAILED" and f"all {shown['tile_count']} tiles failed" in shown["message"]
    assert len(shown["failed_tiles"]) == shown["tile_count"] > 0
    assert all(("HTTP 500" in tile["reason"] or "not called" in tile["reason"]) and tile["bounds"]
               for tile in shown["failed_tiles"])
    assert not out.exists()  # nothing published for a job whose every tile failed


def test_a_model_that_never_answers_fails_the_job_in_bounded_time(scene, embedded, tmp_path):
    import socket

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(256)
    out = tmp_path / "never.geojson"
    env = {"DASK_MR__MODEL__ENDPOINT_TIMEOUT": "1", "DASK_MR__MODEL__ENDPOINT_MAX_ATTEMPTS": "2",
           "DASK_MR__MODEL__ENDPOINT_BREAKER_FAILURES": "4"}
    try:
        started = time.monotonic()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}/invocations"
        listen_to_endpoint_request("job-silent", endpoint, scene[0], out, embedded, env=env, timeout=120)
        seconds = time.monotonic() - started
    finally:
        silent.close()
    shown = json.loads(mr_command("mr", "status", "job-silent", "--store", embedded["store"]).stdout)
    assert shown["status"] == "FAILED" and "tiles failed" in shown["message"]
    reasons = [tile["reason"] for tile in shown["failed_tiles"]]
    assert len(reasons) == shown["tile_count"] and any("not called" in r for r in reasons)
    assert any("Timeout" in r or "timed out" in r.lower() for r in reasons)
    assert seconds < 90 and not out.exists()


def test_requests_outside_the_allowed_roots_fail(scene, embedded, tmp_path):
    out = tmp_path / "never.geojson"
    request = tmp_path / "outside.json"
    request.write_text(json.dumps(osml_request("job-outside", scene[0], [{"type": "File", "path": str(out)}])))
    assert mr_command("mr", "submit", str(request), "--queue", embedded["queue"]).returncode == 0
    env = {"DASK_MR__SECURITY__LOCAL_ROOTS": json.dumps([str(tmp_path / "allowed")])}
    listened = mr_command("mr.listen", "--once", *embedded["args"], env=env)
    assert listened.returncode == 0, listened.stderr
    shown = json.loads(mr_command("mr", "status", "job-outside", "--store", embedded["store"]).stdout)
    assert shown["status"] == "FAILED" and "imageUrls[0]" in shown["message"] and not out.exists()


def test_a_queue_that_fails_for_a_while_does_not_stop_the_listener(scene, client, tmp_path):
    """Receive errors (an SQS outage) are logged and retried; the request queued meanwhile still runs."""
    from mr.listen import Listener
    from mr.queues import open_queue
    from mr.service import resolve_service

    database = f"sqlite:///{tmp_path / 'mr.db'}"
    out = tmp_path / "after-outage.geojson"
    open_queue(database).send(json.dumps(osml_request("job-outage", scene[0], [{"type": "File", "path": str(out)}])))
    listener = Listener(resolve_service(database, database, None, str(tmp_path), 1), client)
    real_receive, failures = listener.queue.receive, []

    def flaky_receive(**kwargs):
        if len(failures) < 2:
            failures.append(1)
            raise ConnectionError("queue endpoint unreachable")
        messages = real_receive(**kwargs)
        job = listener.store.get_job("job-outage")
        if not messages and job is not None and job.finished:
            listener.stop.set()  # the job ran: end the test's service loop
        return messages

    listener.queue.receive = flaky_receive
    listener.settings = dataclasses.replace(listener.settings, poll_seconds=0)
    runner = threading.Thread(target=listener.run)
    runner.start()
    runner.join(timeout=120)
    assert not runner.is_alive() and len(failures) == 2
    assert listener.store.get_job("job-outage").status.value == "SUCCESS" and out.exists()
