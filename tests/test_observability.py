"""Observability: OversightML metrics (EMF), Prometheus /metrics and /healthz, job summaries, structured logs."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mr.emf import MAX_VALUES, emf_lines
from mr.metrics import NAMESPACE, Metrics, Operation
from mr.synthetic import write_scene

OPERATIONS = [op.value for op in Operation]


def osml_request(job_id: str, image: Path, out: Path, **extra) -> dict:
    return {
        "jobName": job_id, "jobId": job_id, "imageUrls": [str(image)],
        "outputs": [{"type": "File", "path": str(out)}],
        "imageProcessor": {"name": "builtin", "type": "LOCAL"},
        "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 32, **extra,
    }


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("observe") / "scene.tif"
    write_scene(path, 1100, 900, n_objects=40, seed=5)
    return path


def test_metrics_add_time_merge_and_pickle():
    metrics = Metrics()
    with metrics.timed(Operation.REGION_PROCESSING, model_name="m", input_format="GTIFF"):
        pass
    metrics.add(Operation.MODEL_INVOCATION, [0.1, 0.2], invocations=2, retries=1, throttles=1, model_name="m")
    with pytest.raises(ValueError):
        with metrics.timed(Operation.FEATURE_STORAGE):
            raise ValueError("disk full")
    copy = pickle.loads(pickle.dumps(metrics))
    total = Metrics.combine([metrics, copy])
    summary = total.summary()
    assert summary["ModelInvocation"]["invocations"] == 4 and summary["ModelInvocation"]["retries"] == 2
    assert summary["FeatureStorage"]["errors"] == 2
    assert summary["RegionProcessing"]["samples"] == 2 and summary["RegionProcessing"]["duration_s"] >= 0
    with pytest.raises(ValueError):
        metrics.add("NotAnOperation", 1.0)


def test_emf_lines_follow_the_cloudwatch_format():
    metrics = Metrics()
    metrics.add(Operation.TILE_PROCESSING, [0.01] * 250, invocations=250, errors=3, model_name="det")
    metrics.add(Operation.FEATURE_AGGREGATION, 0.5)
    lines = [json.loads(line) for line in emf_lines(metrics, {"JobId": "j1"}, timestamp_ms=1_700_000_000_000)]
    tiles = [line for line in lines if line["Operation"] == "TileProcessing"]
    assert len(tiles) == 3  # 250 samples, at most 100 per line
    first = tiles[0]
    directive = first["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == NAMESPACE == "OSML/ModelRunner"
    assert directive["Dimensions"] == [["Operation", "ModelName"]]
    assert {m["Name"]: m["Unit"] for m in directive["Metrics"]} == {
        "Duration": "Seconds", "Invocations": "Count", "Errors": "Count", "Throttles": "Count", "Retries": "Count"}
    assert first["ModelName"] == "det" and first["JobId"] == "j1" and first["_aws"]["Timestamp"] == 1_700_000_000_000
    assert first["Invocations"] == 250 and first["Errors"] == 3
    assert sum(len(t["Duration"]) for t in tiles) == 250 and all(len(t["Duration"]) <= MAX_VALUES for t in tiles)
    assert "Invocations" not in tiles[1]  # counts once, so CloudWatch's sums are right
    for line in lines:  # every metric a directive names is present on its line
        for metric in line["_aws"]["CloudWatchMetrics"][0]["Metrics"]:
            assert metric["Name"] in line
    aggregation = next(line for line in lines if line["Operation"] == "FeatureAggregation")
    assert aggregation["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Operation"]]


def test_pipeline_measures_each_operation_where_it_runs(scene, client, tmp_path):
    import mr
    from mr.checkpoint import DirectoryCheckpoint

    result = mr.detect(scene, "builtin", tile_size=256, overlap=32, region_size=512,
                       checkpoint=DirectoryCheckpoint(str(tmp_path), "job", "img"))
    table = result.compute_table()
    summary = table.metrics.summary()
    plan = result.plan
    assert summary["TileProcessing"]["invocations"] == plan.tile_count == summary["ModelInvocation"]["invocations"]
    assert summary["TileGeneration"]["invocations"] == plan.tile_count
    assert summary["RegionProcessing"]["invocations"] == plan.grid.region_count
    assert summary["FeatureStorage"]["invocations"] == plan.grid.region_count
    assert summary["FeatureSelection"]["invocations"] > plan.grid.region_count  # regions plus seam merges
    for operation in ("TileProcessing", "ModelInvocation", "RegionProcessing", "TileGeneration"):
        assert summary[operation]["duration_s"] > 0
    assert summary["ModelInvocation"]["duration_s"] <= summary["TileProcessing"]["duration_s"]
    keys = {key for key in table.metrics.stats}
    assert ("RegionProcessing", "builtin", "GTIFF") in keys
    again = mr.detect(scene, "builtin", tile_size=256, overlap=32, region_size=512,
                      checkpoint=DirectoryCheckpoint(str(tmp_path), "job", "img")).compute_table()
    assert "TileProcessing" not in again.metrics.summary()  # every region came from its checkpoint


def test_task_names_read_as_the_pipeline(scene, client):
    from dask.utils import key_split

    import mr

    result = mr.detect(scene, "builtin", tile_size=256, overlap=32, region_size=512)
    assert {key_split(key) for key in result.built.graph} == {"read-infer-region", "merge-seams"}  # one task each
    result.compute_table()
    prefixes = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    assert {"read-infer-region", "merge-seams"} <= prefixes


def _listen(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mr.listen", "--once", *args], capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
    )


def test_listener_emits_emf_json_logs_and_a_job_summary(scene, tmp_path):
    from mr.queues import open_queue

    database = f"sqlite:///{tmp_path / 'mr.db'}"
    out = tmp_path / "out.geojson"
    open_queue(database).send(json.dumps(osml_request("job-observed", scene, out)))
    done = _listen(
        ["--queue", database, "--store", database, "--data-dir", str(tmp_path), "--workers", "1",
         "--log-format", "json", "--metrics-address", "127.0.0.1:0"],
        {"DASK_MR__OBSERVABILITY__EMF": "true", "DASK_MR__TILING__REGION_SIZE": "512"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    emf = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"_aws"')]
    by_operation: dict[str, list[dict]] = {}
    for line in emf:
        by_operation.setdefault(line["Operation"], []).append(line)
        assert line["JobId"] == "job-observed"
    assert set(OPERATIONS) <= set(by_operation), set(OPERATIONS) - set(by_operation)

    def total(operation: str, name: str) -> float:
        values = [line.get(name, 0) for line in by_operation[operation]]
        return sum(sum(v) if isinstance(v, list) else v for v in values)

    shown = subprocess.run([sys.executable, "-m", "mr", "status", "job-observed", "--store", database],
                           capture_output=True, text=True, timeout=60)
    record = json.loads(shown.stdout)
    summary = record["summary"]
    assert record["status"] == "SUCCESS" and summary["features"] == record["feature_count"] > 0
    assert total("ModelInvocation", "Invocations") == summary["tiles"] == record["tile_count"]
    assert total("TileProcessing", "Invocations") == record["tile_count"]
    assert total("RegionProcessing", "Invocations") == record["region_count"]
    image_seconds = total("ImageProcessing", "Duration")
    assert 0 < image_seconds <= summary["seconds"]
    assert 0 < total("RegionProcessing", "Duration") <= image_seconds  # one worker: regions run one at a time
    assert 0 < total("ModelInvocation", "Duration") <= total("TileProcessing", "Duration")
    for operation in OPERATIONS:
        assert total(operation, "Duration") > 0, operation
    assert by_operation["ImageProcessing"][0]["InputFormat"] == "GTIFF"
    assert by_operation["ModelInvocation"][0]["ModelName"] == "builtin"
    assert set(summary["operations"]) == set(OPERATIONS) and summary["tiles_per_second"] > 0

    logs = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert logs and all({"time", "level", "logger", "message", "process"} <= set(entry) for entry in logs)
    from_workers = [e for e in logs if e["process"] != done_pid(logs) and e.get("region")]
    assert from_workers, "no log line from a worker process"
    assert all(e["job_id"] == "job-observed" and e["image_id"] for e in from_workers)
    assert any(e["logger"] == "mr.listen" and "metrics on http://127.0.0.1:" in e["message"] for e in logs)


def done_pid(logs: list[dict]) -> int:
    """The listener's own process: the one that logged where its metrics are served."""
    return next(e["process"] for e in logs if e["logger"] == "mr.listen")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class _ScrapingNotifier:
    """Passes notices on, scraping /metrics when the first region is announced (mid-job)."""

    def __init__(self, inner, url_of) -> None:
        self.inner, self.url_of, self.during = inner, url_of, None

    def job_status(self, record, message=None) -> None:
        self.inner.job_status(record, message)

    def region_status(self, record, message=None) -> None:
        if self.during is None:
            self.during = _get(self.url_of() + "/metrics")[1]
        self.inner.region_status(record, message)


def test_metrics_endpoint_during_and_after_a_run(scene, client, tmp_path, monkeypatch):
    from mr.listen import Listener
    from mr.queues import open_queue
    from mr.service import resolve_service

    monkeypatch.setenv("DASK_MR__TILING__REGION_SIZE", "512")
    database = f"sqlite:///{tmp_path / 'mr.db'}"
    settings = resolve_service(database, database, None, str(tmp_path), 1)
    listener = Listener(settings, client)
    monitor = listener.serve_monitoring("127.0.0.1:0")
    listener.notifier = _ScrapingNotifier(listener.notifier, lambda: monitor.url)
    try:
        open_queue(database).send(json.dumps(osml_request("job-scraped", scene, tmp_path / "o.geojson")))
        open_queue(database).send(b"{not json")
        assert listener.run(once=True) == 2
        status, after = _get(monitor.url + "/metrics")
    finally:
        monitor.close()
    assert status == 200
    during = listener.notifier.during
    regions = listener.store.get_job("job-scraped").region_count
    assert 1 <= _sample(during, "mr_operation_invocations_total", operation="RegionProcessing") <= regions
    assert _sample(during, "mr_jobs_total", status="SUCCESS") == 0
    assert _sample(during, "mr_requests_in_flight") >= 1
    assert _sample(after, "mr_operation_invocations_total", operation="RegionProcessing") == regions
    assert _sample(after, "mr_jobs_total", status="SUCCESS") == 1
    assert _sample(after, "mr_jobs_total", status="FAILED") == 1
    assert _sample(after, "mr_requests_received_total") == 2 and _sample(after, "mr_requests_in_flight") == 0
    tiles = listener.store.get_job("job-scraped").tile_count
    assert _sample(after, "mr_operation_invocations_total", operation="ModelInvocation", model_name="builtin") == tiles
    assert _sample(after, "mr_operation_duration_seconds_count", operation="TileProcessing") == tiles
    assert _sample(after, "mr_operation_duration_seconds_sum", operation="ImageProcessing") > 0
    assert _sample(after, "mr_features_published_total") > 0


def test_healthz_turns_unhealthy_when_the_store_is_unreachable(client, tmp_path, moto_server, monkeypatch):
    from moto.server import ThreadedMotoServer

    from mr.listen import Listener
    from mr.service import resolve_service
    from mr.state.dynamodb import DynamoStore

    monkeypatch.setenv("DASK_MR__OBSERVABILITY__HEALTH_TIMEOUT", "3")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    database = f"sqlite:///{tmp_path / 'mr.db'}"
    listener = Listener(resolve_service(database, database, None, str(tmp_path), 1), client)
    listener.store = DynamoStore("health", endpoint_url=f"http://{host}:{port}", create=True)
    monitor = listener.serve_monitoring("127.0.0.1:0")
    try:
        status, body = _get(monitor.url + "/healthz")
        assert status == 200, body
        assert json.loads(body) == {"status": "ok", "checks": {"queue": "ok", "store": "ok", "cluster": "ok"}}
        server.stop()
        status, body = _get(monitor.url + "/healthz")
        answer = json.loads(body)
        assert status == 503 and answer["status"] == "unhealthy"
        assert answer["checks"]["store"] != "ok" and answer["checks"]["queue"] == "ok"
        assert _get(monitor.url + "/nothing")[0] == 404
    finally:
        monitor.close()


def test_json_logs_carry_the_work_in_hand_and_never_a_secret():
    from mr.logs import JsonFormatter, TextFormatter, configure_logging, log_context

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    stream = io.StringIO()
    handler = configure_logging("json", "INFO", stream)
    try:
        with log_context(job_id="job-7", image_id="img", region="r1-c2"):
            logging.getLogger("mr.test").info(
                "fetched https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE&X-Amz-Signature=abc123 "
                "with aws_secret_access_key=%s", secret, extra={"notice": {"job_id": "job-7"}})
        logging.getLogger("mr.test").info("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["job_id"] == "job-7" and first["region"] == "r1-c2" and first["level"] == "INFO"
    assert first["notice"] == {"job_id": "job-7"}
    assert secret not in first["message"] and "AKIAIOSFODNN7EXAMPLE" not in first["message"]
    assert "abc123" not in first["message"]
    assert "job_id" not in second
    assert isinstance(JsonFormatter(), logging.Formatter) and isinstance(TextFormatter(), logging.Formatter)


def test_text_logs_show_the_job_in_brackets():
    from mr.logs import configure_logging, log_context

    stream = io.StringIO()
    handler = configure_logging("text", "INFO", stream)
    try:
        with log_context(job_id="job-8"):
            logging.getLogger("mr.test").warning("slow tile")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "WARNING mr.test [job-8]: slow tile" in stream.getvalue()


def test_log_format_auto_is_text_embedded_and_json_on_aws(monkeypatch):
    from mr.errors import InvalidInputError
    from mr.logs import resolve_format

    monkeypatch.delenv("MR_LOG_FORMAT", raising=False)
    assert resolve_format(None, embedded=True) == "text"
    assert resolve_format(None, embedded=False) == "json"
    monkeypatch.setenv("MR_LOG_FORMAT", "json")
    assert resolve_format(None, embedded=True) == "json"
    with pytest.raises(InvalidInputError, match="log-format"):
        resolve_format("xml")


def test_metrics_are_thread_safe():
    metrics = Metrics()

    def work() -> None:
        for _ in range(1000):
            metrics.add(Operation.MODEL_INVOCATION, 0.001, model_name="m")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert metrics.summary()["ModelInvocation"]["invocations"] == 4000
