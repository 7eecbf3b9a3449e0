"""Sinks: file, S3 (single put and multipart, nothing visible on failure), Kinesis (batches, limits, retries).

Every AWS call goes over HTTP to the moto server of ``conftest.moto_server``; faults are injected by wrapping
methods of the clients the sinks create.
"""

from __future__ import annotations

import json
import pickle
import types
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest

from mr import sinks
from mr.detections import Detections
from mr.errors import InvalidInputError, SinkError
from mr.features import OutputMetadata, geolocate, iter_geojson_features
from mr.geo import Georeference
from mr.sinks import (
    FileSink,
    KinesisSink,
    KinesisSinkError,
    PublishError,
    S3Sink,
    object_key,
    publish,
    role_session_name,
    sink_for,
)
from tests.rasters import UTM_AFFINE, UTM_CRS

JOB = "job-7f3a"
BUCKET = "results"
STREAM = "features"
ROLE = "arn:aws:iam::123456789012:role/writer"


def make_table(n: int, *, georef: bool = True, seed: int = 0, **properties: np.ndarray):
    """``n`` boxes in a 10k x 10k UTM image (0.5 m pixels), three classes, optional extra columns."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 9_000, (n, 2))
    boxes = np.column_stack([xy, xy + rng.uniform(5, 50, (n, 2))])
    detections = Detections(boxes, rng.uniform(0.3, 1, n), rng.integers(0, 3, n), ("car", "ship", "tank"),
                            properties=properties)
    reference = Georeference(width=10_000, height=10_000, crs=UTM_CRS, transform=UTM_AFFINE.to_gdal())
    return geolocate(detections, reference if georef else None)


META = OutputMetadata(job_id=JOB, image_id="image-1", model_name="detector", inference_time="2024-01-02T03:04:05Z")


def expected(table, meta=META) -> list[dict]:
    return [json.loads(json.dumps(f)) for f in iter_geojson_features(table, meta)]


@pytest.fixture
def aws(moto_server):
    """A clean moto account with one bucket and one single-shard stream."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")).close()
    s3, kinesis = boto3.client("s3"), boto3.client("kinesis")
    s3.create_bucket(Bucket=BUCKET)
    kinesis.create_stream(StreamName=STREAM, ShardCount=1)
    return types.SimpleNamespace(s3=s3, kinesis=kinesis)


@pytest.fixture
def wrap(monkeypatch):
    """``wrap(method, fn)``: clients the sinks create call ``fn(original, **kwargs)`` instead of ``method``."""
    wrappers: dict[str, object] = {}
    real = sinks._aws_client

    def client_factory(*args):
        client = real(*args)
        for method, fn in wrappers.items():
            original = getattr(client, method)
            setattr(client, method, lambda _o=original, _f=fn, **kw: _f(_o, **kw))
        return client

    monkeypatch.setattr(sinks, "_aws_client", client_factory)
    return wrappers.__setitem__


def read_object(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def assert_nothing_left(s3, key: str) -> None:
    assert s3.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0, key
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")


def read_stream(kinesis) -> list[dict]:
    shard = kinesis.list_shards(StreamName=STREAM)["Shards"][0]["ShardId"]
    iterator = kinesis.get_shard_iterator(StreamName=STREAM, ShardId=shard, ShardIteratorType="TRIM_HORIZON")
    iterator, records = iterator["ShardIterator"], []
    while True:
        reply = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
        if not reply["Records"]:
            return records
        records += reply["Records"]
        iterator = reply["NextShardIterator"]


def stream_features(kinesis) -> list[dict]:
    features = []
    for record in read_stream(kinesis):
        assert record["PartitionKey"] == JOB
        collection = json.loads(record["Data"])
        assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 1
        features += collection["features"]
    return features


# --- S3 -------------------------------------------------------------------------------------------------------

def test_object_key_is_osmls():
    assert object_key("out/runs", JOB) == f"out/runs/{JOB}.geojson"
    assert object_key("out/", JOB) == f"out/{JOB}.geojson"
    assert object_key("", JOB) == f"{JOB}.geojson"
    assert object_key("out", "batch/job-1") == "out/job-1.geojson"


@pytest.mark.parametrize("georef", [True, False])
def test_s3_small_result_is_one_put(aws, wrap, georef):
    calls = []
    wrap("create_multipart_upload", lambda original, **kw: calls.append(kw) or original(**kw))
    table = make_table(50, georef=georef)
    where = S3Sink(BUCKET, "runs/today").write(table, META)
    assert where == f"s3://{BUCKET}/runs/today/{JOB}.geojson" and not calls
    collection = read_object(aws.s3, f"runs/today/{JOB}.geojson")
    assert collection["type"] == "FeatureCollection" and collection["features"] == expected(table)
    assert (collection["features"][0]["geometry"] is None) is (not georef)
    head = aws.s3.head_object(Bucket=BUCKET, Key=f"runs/today/{JOB}.geojson")
    assert head["ContentType"] == "application/geo+json" and "-" not in head["ETag"]


def test_s3_large_result_is_a_multipart_upload(aws):
    table = make_table(12_000)  # ~11 MiB of GeoJSON: parts of 5 MiB, 5 MiB and the rest
    S3Sink(BUCKET, "big", part_size=sinks.MIN_PART_SIZE).write(table, META)
    head = aws.s3.head_object(Bucket=BUCKET, Key=f"big/{JOB}.geojson")
    assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] > 2 * sinks.MIN_PART_SIZE
    assert read_object(aws.s3, f"big/{JOB}.geojson")["features"] == expected(table)


def test_s3_missing_bucket_is_a_sink_error(aws):
    with pytest.raises(SinkError, match="S3 s3://no-such-bucket/x.*could not write"):
        S3Sink("no-such-bucket", "x").write(make_table(5), META)
    with pytest.raises(SinkError, match="no-such-bucket"):
        S3Sink("no-such-bucket", "x", part_size=sinks.MIN_PART_SIZE).write(make_table(7_000), META)
    assert [b["Name"] for b in aws.s3.list_buckets()["Buckets"]] == [BUCKET]


def test_s3_failed_part_aborts_the_upload(aws, wrap):
    parts = []

    def flaky(original, **kw):
        parts.append(kw["PartNumber"])
        if kw["PartNumber"] == 2:
            raise ConnectionError("network down")
        return original(**kw)

    wrap("upload_part", flaky)
    with pytest.raises(SinkError, match="network down") as caught:
        S3Sink(BUCKET, "big", part_size=sinks.MIN_PART_SIZE).write(make_table(12_000), META)
    assert parts == [1, 2] and isinstance(caught.value.__cause__, ConnectionError)
    assert_nothing_left(aws.s3, f"big/{JOB}.geojson")


def test_s3_feature_that_cannot_serialise_aborts_after_parts_went_up(aws):
    values = np.zeros(7_000)
    values[-1] = np.nan  # JSON has no NaN: the last feature fails after the first part is uploaded
    with pytest.raises(SinkError, match="could not write"):
        S3Sink(BUCKET, "big", part_size=sinks.MIN_PART_SIZE).write(make_table(7_000, weight=values), META)
    assert_nothing_left(aws.s3, f"big/{JOB}.geojson")


def test_s3_assumed_role_writes_as_a_session_named_for_the_job(aws):
    S3Sink(BUCKET, "as-role", assumed_role=ROLE).write(make_table(3), META)
    assert len(read_object(aws.s3, f"as-role/{JOB}.geojson")["features"]) == 3
    identity = sinks._aws_client("sts", ROLE, None, "batch/job 9").get_caller_identity()
    assert "assumed-role/writer/mr-batch-job-9-" in identity["Arn"]  # changed names get a hash suffix
    assert len(role_session_name("x" * 100)) == 64


def test_empty_job_id_is_refused_before_writing(aws):
    with pytest.raises(SinkError, match="job id"):
        S3Sink(BUCKET).write(make_table(3), OutputMetadata(job_id=""))


# --- Kinesis --------------------------------------------------------------------------------------------------

@pytest.fixture
def put_calls(wrap):
    calls: list[list[dict]] = []
    wrap("put_records", lambda original, **kw: calls.append(kw["Records"]) or original(**kw))
    return calls


def test_kinesis_one_feature_per_record_in_batches_of_500(aws, put_calls):
    table = make_table(1_200)
    where = KinesisSink(STREAM).write(table, META)
    assert where == f"kinesis://{STREAM} (1200 records)"
    assert [len(c) for c in put_calls] == [500, 500, 200]
    assert stream_features(aws.kinesis) == expected(table)


def test_kinesis_batches_stay_under_5_mib(aws, put_calls):
    table = make_table(40, blob=np.array(["x" * 300_000] * 40, dtype=object))  # ~12 MB in all
    KinesisSink(STREAM, batch_size=100).write(table, META)
    sizes = [sum(len(r["Data"]) + len(r["PartitionKey"]) for r in call) for call in put_calls]
    assert len(sizes) >= 3 and max(sizes) <= sinks.KINESIS_MAX_BATCH_BYTES
    assert stream_features(aws.kinesis) == expected(table)


def test_kinesis_oversized_feature_is_named_and_nothing_is_sent(aws, put_calls):
    table = make_table(3, blob=np.array(["x" * 1_100_000, "", ""], dtype=object))
    first = expected(table)[0]["id"]
    with pytest.raises(KinesisSinkError, match=f"feature {first} is .* over the 1048576-byte limit") as caught:
        KinesisSink(STREAM).write(table, META)
    assert caught.value.written == 0 and not put_calls and not read_stream(aws.kinesis)


def put_failing(original, kwargs: dict, fail: list[bool], code: str) -> dict:
    """Put the records not marked in ``fail``; answer as PutRecords does when the marked ones failed."""
    keep = [r for r, f in zip(kwargs["Records"], fail) if not f]
    sent = iter(original(StreamName=kwargs["StreamName"], Records=keep)["Records"] if keep else [])
    error = {"ErrorCode": code, "ErrorMessage": "injected"}
    return {"FailedRecordCount": sum(fail), "Records": [error if f else next(sent) for f in fail]}


def test_kinesis_failed_records_are_retried(aws, wrap):
    failed_once: set[bytes] = set()
    calls = []

    def flaky(original, **kw):
        """Every third record new to us fails once, with Kinesis's throttling code; the rest go through."""
        calls.append(len(kw["Records"]))
        fail = [i % 3 == 0 and r["Data"] not in failed_once for i, r in enumerate(kw["Records"])]
        failed_once.update(r["Data"] for r, f in zip(kw["Records"], fail) if f)
        return put_failing(original, kw, fail, "ProvisionedThroughputExceededException")

    wrap("put_records", flaky)
    table = make_table(1_200)
    KinesisSink(STREAM, backoff_s=0.001).write(table, META)
    assert calls == [500, 167, 500, 167, 200, 67]
    received = stream_features(aws.kinesis)
    assert len(received) == 1_200 and sorted(f["id"] for f in received) == sorted(f["id"] for f in expected(table))


def test_kinesis_records_that_keep_failing_fail_the_job_with_the_count(aws, wrap):
    bad = expected(make_table(600))[10]["id"]

    def always_fails_one(original, **kw):
        fail = [bad.encode() in r["Data"] for r in kw["Records"]]
        return put_failing(original, kw, fail, "InternalFailure")

    wrap("put_records", always_fails_one)
    with pytest.raises(KinesisSinkError, match="1 records still failed after 2 retries .*InternalFailure") as caught:
        KinesisSink(STREAM, max_retries=2, backoff_s=0.001).write(make_table(600), META)
    assert (caught.value.written, caught.value.total) == (499, 600)
    assert "499 of 600 records were written" in str(caught.value)


def test_kinesis_error_mid_batch_counts_what_went(aws, wrap):
    calls = []

    def then_broken(original, **kw):
        calls.append(len(kw["Records"]))
        if len(calls) > 1:
            raise ConnectionError("connection reset")
        return put_failing(original, kw, [i % 2 == 1 for i in range(len(kw["Records"]))], "InternalFailure")

    wrap("put_records", then_broken)
    with pytest.raises(KinesisSinkError, match="connection reset") as caught:
        KinesisSink(STREAM, backoff_s=0.001).write(make_table(500), META)
    assert calls == [500, 250] and caught.value.written == 250 == len(read_stream(aws.kinesis))


def test_kinesis_stream_by_arn(aws):
    arn = aws.kinesis.describe_stream_summary(StreamName=STREAM)["StreamDescriptionSummary"]["StreamARN"]
    assert KinesisSink(arn).write(make_table(4), META) == f"kinesis://{arn} (4 records)"
    assert len(stream_features(aws.kinesis)) == 4


def test_kinesis_missing_stream_is_a_sink_error(aws):
    with pytest.raises(KinesisSinkError, match="Kinesis no-such-stream") as caught:
        KinesisSink("no-such-stream").write(make_table(5), META)
    assert caught.value.written == 0


# --- file, factory, publish -----------------------------------------------------------------------------------

def test_file_sink_writes_the_same_features(tmp_path):
    table = make_table(20)
    where = FileSink(str(tmp_path / "out" / "f.geojson")).write(table, META)
    assert json.loads(Path(where).read_text())["features"] == expected(table)
    assert FileSink(str(tmp_path / "f.parquet")).write(table, META).endswith("f.parquet")


def test_sink_for_osml_outputs_and_objects(tmp_path):
    assert sink_for({"type": "S3", "bucket": "b", "prefix": "p", "assumedRole": ROLE}) == S3Sink(
        "b", "p", assumed_role=ROLE)
    assert sink_for({"type": "S3", "bucket": "b", "prefix": "p", "role": ROLE}).assumed_role == ROLE
    assert sink_for({"type": "Kinesis", "stream": "s", "batchSize": 100}) == KinesisSink("s", batch_size=100)
    assert sink_for({"type": "File", "path": "x.geojson"}) == FileSink("x.geojson")
    ns = types.SimpleNamespace
    assert sink_for(ns(bucket="b", prefix=None, assumed_role=None)) == S3Sink("b", "")
    assert sink_for(ns(stream="s", batch_size=None, assumed_role=ROLE)) == KinesisSink("s", assumed_role=ROLE)
    assert sink_for(ns(path=tmp_path / "f.geojson")) == FileSink(str(tmp_path / "f.geojson"))
    sink = KinesisSink("s", endpoint_url="http://localhost:1")
    assert sink_for(sink) is sink and pickle.loads(pickle.dumps(sink)) == sink


@pytest.mark.parametrize("output, field", [
    ({"type": "SNS", "topic": "t"}, "outputs.type"),
    ({"type": "S3", "prefix": "p"}, "outputs.bucket"),
    ({"type": "Kinesis", "stream": "s", "batchSize": 501}, "batchSize"),
    (types.SimpleNamespace(topic="t"), "outputs"),
])
def test_sink_for_rejects_bad_outputs(output, field):
    with pytest.raises(InvalidInputError) as caught:
        sink_for(output)
    assert caught.value.field == field


def test_publish_writes_everywhere_and_reports_partial_failure(aws, tmp_path):
    table = make_table(10)
    first, last = FileSink(str(tmp_path / "a.geojson")), FileSink(str(tmp_path / "b.geojson"))
    assert publish(table, META, [first, S3Sink(BUCKET, "p")]) == [first.path, f"s3://{BUCKET}/p/{JOB}.geojson"]
    with pytest.raises(PublishError, match="1 of 3 sinks failed") as caught:
        publish(table, META, [first, S3Sink("no-such-bucket", "p"), last])
    error = caught.value
    assert isinstance(error, SinkError) and [name for name, _ in error.failed] == ["S3 s3://no-such-bucket/p"]
    assert [name for name, _ in error.succeeded] == [first.name, last.name]
    assert f"succeeded: {first.name} -> {first.path}, {last.name}" in str(error)
    assert (tmp_path / "b.geojson").exists()
