"""Job and region state: one contract, run against the SQLite store and the DynamoDB store (on a moto server);
SNS notices received through an SQS queue; log notices; the store and notifier URLs."""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import pickle
import threading
from datetime import datetime, timezone

import pytest

from mr.errors import InvalidInputError
from mr.state import (
    DynamoStore,
    JobRecord,
    JobStatus,
    LogNotifier,
    RegionRecord,
    SnsNotifier,
    SqliteStore,
    StateStore,
    StatusTransitionError,
    UnknownJobError,
    open_notifier,
    open_store,
)

URL = "s3://imagery/scene.tif"
REQUEST = json.dumps({"jobId": "job-1", "imageUrls": [URL]})
FAILED_TILE = {"region": "r0-c1", "bounds": [[0, 512], [512, 512]], "reason": "endpoint timed out"}
_prefixes = itertools.count()


def start(store, job_id="job-1", **fields) -> JobRecord:
    return store.start_job(job_id, f"{job_id}:{URL}", URL, REQUEST, **fields)


# --- the contract, for both stores -----------------------------------------------------------------------------

def test_store_follows_the_protocol(store):
    assert isinstance(store, StateStore)


def test_start_job_records_a_started_job(store):
    job = start(store, region_count=4, width=1000, height=800)
    assert job.status is JobStatus.STARTED and job.attempts == 1 and job.request == REQUEST
    assert (job.region_count, job.width, job.height, job.regions_done) == (4, 1000, 800, 0)
    assert datetime.fromisoformat(job.started_at).utcoffset() == timezone.utc.utcoffset(None)
    assert store.get_job("job-1") == job


def test_start_job_again_finds_the_existing_record(store):
    first = start(store, region_count=4)
    again = start(store, region_count=99, message="ignored")
    assert again.attempts == 2 and again.region_count == 4 and again.message is None
    assert again.started_at == first.started_at
    assert store.get_job("job-1") == again


def test_start_job_with_another_image_is_refused(store):
    start(store)
    with pytest.raises(InvalidInputError, match="own jobId") as caught:
        store.start_job("job-1", "job-1:other", "s3://imagery/other.tif", REQUEST)
    assert caught.value.field == "job_id"


def test_update_job_round_trips_every_field(store):
    start(store)
    changes = {
        "status": "IN_PROGRESS", "message": "tiling", "region_count": 6, "tile_count": 96, "feature_count": 17,
        "width": 4096, "height": 2048, "extents": (10.5, -3.25, 11.0, -2.75), "outputs": ["s3://out/job-1.geojson"],
        "summary": {"model": "builtin", "megapixels_per_second": 12.5, "nested": {"tiles": [1, 2]}},
        "failed_tiles": [FAILED_TILE],
    }
    updated = store.update_job("job-1", **changes)
    assert updated.status is JobStatus.IN_PROGRESS and updated.extents == (10.5, -3.25, 11.0, -2.75)
    assert updated.updated_at >= updated.started_at and updated.finished_at is None
    assert updated.processing_seconds >= 0
    assert store.get_job("job-1") == updated
    cleared = store.update_job("job-1", message=None, extents=None)
    assert cleared.message is None and cleared.extents is None and store.get_job("job-1") == cleared


@pytest.mark.parametrize("final", ["SUCCESS", "PARTIAL", "FAILED"])
def test_finished_job_is_final(store, final):
    start(store)
    store.update_job("job-1", status="IN_PROGRESS")
    done = store.update_job("job-1", status=final, message="over")
    assert done.finished and done.finished_at is not None and done.processing_seconds >= 0
    for other in ("STARTED", "IN_PROGRESS", *({"SUCCESS", "PARTIAL", "FAILED"} - {final})):
        with pytest.raises(StatusTransitionError, match="final"):
            store.update_job("job-1", status=other)
    again = store.update_job("job-1", status=final, outputs=["file:///tmp/out.geojson"])
    assert again.finished_at == done.finished_at and again.processing_seconds == done.processing_seconds
    restarted = start(store)
    assert restarted.status.value == final and restarted.attempts == 2
    assert store.get_job("job-1").outputs == ["file:///tmp/out.geojson"]


def test_unknown_jobs(store):
    assert store.get_job("nobody") is None
    with pytest.raises(UnknownJobError):
        store.update_job("nobody", status="FAILED")
    with pytest.raises(UnknownJobError):
        store.mark_region("nobody", "r0-c0", "SUCCESS")


@pytest.mark.parametrize(
    "fields, field",
    [({"regions_done": 3}, "regions_done"), ({"colour": "red"}, "colour"), ({"width": -1}, "width"),
     ({"width": 2.5}, "width"), ({"status": "DONE"}, "status"), ({"extents": (1, 2, 3)}, "extents"),
     ({"outputs": "s3://one"}, "outputs"), ({"processing_seconds": float("nan")}, "processing_seconds")],
)
def test_update_job_rejects_bad_fields(store, fields, field):
    start(store)
    with pytest.raises(InvalidInputError) as caught:
        store.update_job("job-1", **fields)
    assert caught.value.field == field


def test_regions_and_done_regions(store):
    start(store, region_count=5)
    store.mark_region("job-1", "r0-c0", "STARTED")
    first = store.mark_region("job-1", "r0-c1", "SUCCESS", tiles=16, features=3, seconds=2.5)
    store.mark_region("job-1", "r0-c2", JobStatus.PARTIAL, tiles=16, failed_tiles=[FAILED_TILE])
    store.mark_region("job-1", "r1-c0", "FAILED", message="model error")
    store.mark_region("job-1", "r10-c0", "IN_PROGRESS")
    store.mark_region("job-1", "r10-c0", "SUCCESS", tiles=4)
    assert [r.region_id for r in store.regions("job-1")] == ["r0-c0", "r0-c1", "r0-c2", "r1-c0", "r10-c0"]
    assert store.done_regions("job-1") == {"r0-c1", "r0-c2", "r10-c0"}
    assert store.get_job("job-1").regions_done == 3
    assert first == RegionRecord(job_id="job-1", region_id="r0-c1", status=JobStatus.SUCCESS,
                                 image_id=f"job-1:{URL}", tiles=16, features=3, seconds=2.5,
                                 updated_at=first.updated_at)
    regions = {r.region_id: r for r in store.regions("job-1")}
    assert regions["r0-c1"] == first and regions["r0-c2"].failed_tiles == [FAILED_TILE]
    assert regions["r1-c0"].message == "model error"


def test_done_region_is_final_and_failed_region_retries(store):
    start(store)
    store.mark_region("job-1", "r0-c0", "SUCCESS", features=2)
    store.mark_region("job-1", "r0-c0", "SUCCESS", features=2)  # again: no second count
    with pytest.raises(StatusTransitionError, match="done_regions"):
        store.mark_region("job-1", "r0-c0", "STARTED")
    store.mark_region("job-1", "r0-c1", "FAILED")
    store.mark_region("job-1", "r0-c1", "STARTED")
    store.mark_region("job-1", "r0-c1", "PARTIAL")
    assert store.get_job("job-1").regions_done == 2
    assert store.done_regions("job-1") == {"r0-c0", "r0-c1"}
    assert store.regions("job-2") == [] and store.done_regions("job-2") == set()


def test_list_jobs(store):
    for name in ("a", "b", "c"):
        start(store, name)
    store.update_job("b", status="SUCCESS")
    assert [job.job_id for job in store.list_jobs()] == ["c", "b", "a"]
    assert [job.job_id for job in store.list_jobs(limit=2)] == ["c", "b"]
    assert [job.job_id for job in store.list_jobs(status=JobStatus.SUCCESS)] == ["b"]
    assert [job.job_id for job in store.list_jobs(status="started")] == ["c", "a"]
    assert store.list_jobs(status="FAILED") == []
    with pytest.raises(InvalidInputError):
        store.list_jobs(status="DONE")
    with pytest.raises(InvalidInputError):
        store.list_jobs(limit=0)


def test_threads_count_each_done_region_once(store):
    start(store)

    def work(row: int) -> None:
        for col in range(4):
            store.mark_region("job-1", f"r{row}-c{col}", "SUCCESS", tiles=1)

    threads = [threading.Thread(target=work, args=(row,)) for row in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get_job("job-1").regions_done == 16 and len(store.done_regions("job-1")) == 16


def test_store_pickles_to_its_arguments(store):
    start(store)
    copy = pickle.loads(pickle.dumps(store))
    assert type(copy) is type(store) and copy.get_job("job-1") == store.get_job("job-1")
    copy.close()


# --- SQLite from two processes ----------------------------------------------------------------------------------

def _mark_rows(store: SqliteStore, rows: range) -> None:
    for row in rows:
        for col in range(10):
            store.mark_region("job-1", f"r{row}-c{col}", "SUCCESS", tiles=1)
        store.update_job("job-1", status="IN_PROGRESS", message=f"row {row}")
    store.close()


def test_sqlite_is_shared_by_two_processes(tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    start(store)
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_mark_rows, args=(store, rows)) for rows in (range(5), range(5, 10))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    assert store.get_job("job-1").regions_done == 100 and len(store.done_regions("job-1")) == 100
    assert store.get_job("job-1").status is JobStatus.IN_PROGRESS
    store.close()


# --- notices ----------------------------------------------------------------------------------------------------

def _records() -> tuple[JobRecord, RegionRecord]:
    job = JobRecord(job_id="job-1", image_id=f"job-1:{URL}", image_url=URL, status=JobStatus.PARTIAL,
                    processing_seconds=42.7, region_count=2, regions_done=2)
    region = RegionRecord(job_id="job-1", region_id="r0-c1", status=JobStatus.PARTIAL, image_id=job.image_id,
                          tiles=4, failed_tiles=[FAILED_TILE], seconds=3.2)
    return job, region


JOB_ATTRIBUTES = {"status": "PARTIAL", "job_id": "job-1", "image_status": "PARTIAL", "image_id": f"job-1:{URL}",
                  "processing_duration": "42"}
REGION_ATTRIBUTES = {"status": "PARTIAL", "job_id": "job-1", "image_id": f"job-1:{URL}", "region_id": "r0-c1",
                     "processing_duration": "3", "failed_tiles": "[{'1': [[0, 512], [512, 512]]}]"}


def _subscribed_queue(topic: str):
    import boto3

    sns, sqs = boto3.client("sns"), boto3.client("sqs")
    topic_arn = sns.create_topic(Name=topic)["TopicArn"]
    queue_url = sqs.create_queue(QueueName=f"{topic}-q")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn)
    return sqs, queue_url, topic_arn


def _envelopes(sqs, queue_url: str, count: int) -> list[dict]:
    found: list[dict] = []
    for _ in range(10):
        reply = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        found += [json.loads(message["Body"]) for message in reply.get("Messages", [])]
        if len(found) >= count:
            break
    return found


@pytest.mark.parametrize("by", ["name", "arn"])
def test_sns_notices_reach_a_subscribed_queue(moto_server, by):
    sqs, queue_url, topic_arn = _subscribed_queue(f"mr-status-{by}")
    notifier = open_notifier(f"sns://mr-status-{by}" if by == "name" else topic_arn)
    assert isinstance(notifier, SnsNotifier) and notifier.topic_arn == topic_arn
    job, region = _records()
    notifier.job_status(job, "1 of 2 regions had failed tiles")
    pickle.loads(pickle.dumps(notifier)).region_status(region)
    envelopes = sorted(_envelopes(sqs, queue_url, 2), key=lambda e: "region_id" in e["MessageAttributes"])
    assert len(envelopes) == 2
    texts = [envelope["Message"] for envelope in envelopes]
    assert texts == ["StatusMonitor update: PARTIAL job-1: 1 of 2 regions had failed tiles",
                     "StatusMonitor update: PARTIAL job-1: region r0-c1: 4 tiles, 1 failed"]
    for envelope, expected in zip(envelopes, (JOB_ATTRIBUTES, REGION_ATTRIBUTES)):
        attributes = envelope["MessageAttributes"]
        assert {name: value["Value"] for name, value in attributes.items()} == expected
        assert {value["Type"] for value in attributes.values()} == {"String"}


def test_log_notices(caplog):
    job, region = _records()
    notifier = open_notifier(None)
    assert isinstance(notifier, LogNotifier)
    with caplog.at_level(logging.INFO, logger="mr.state.notices"):
        notifier.job_status(job, "half done")
        notifier.region_status(region)
    first, second = caplog.records
    assert first.getMessage().startswith("StatusMonitor update: PARTIAL job-1: half done {")
    assert first.notice == JOB_ATTRIBUTES and second.notice == REGION_ATTRIBUTES
    message = second.getMessage()
    assert json.loads(message[message.index("{"):]) == REGION_ATTRIBUTES


def test_notice_leaves_out_empty_attributes(caplog):
    job = JobRecord(job_id="j", image_id="j:x", image_url="x", status=JobStatus.STARTED, processing_seconds=0.0)
    with caplog.at_level(logging.INFO, logger="mr.state.notices"):
        LogNotifier().job_status(job)
    assert caplog.records[0].notice == {"status": "STARTED", "job_id": "j", "image_status": "STARTED",
                                        "image_id": "j:x"}


# --- URLs -------------------------------------------------------------------------------------------------------

def test_open_store_forms(tmp_path):
    store = open_store(f"sqlite://{tmp_path}/sub/state.db")
    assert isinstance(store, SqliteStore) and store.path == f"{tmp_path}/sub/state.db"
    start(store)
    assert (tmp_path / "sub" / "state.db").exists()
    store.close()
    dynamo = open_store("dynamodb://mr-prod")
    assert isinstance(dynamo, DynamoStore) and (dynamo.jobs_table, dynamo.regions_table) == ("mr-prod-jobs",
                                                                                            "mr-prod-regions")
    assert not dynamo.create and open_store("dynamodb://mr.prod_2?create=true").create


@pytest.mark.parametrize(
    "url", ["postgres://db/x", "sqlite://relative.db", "sqlite:///", "dynamodb://", "dynamodb://bad prefix",
            "dynamodb://mr/extra", "dynamodb://mr?colour=red", "dynamodb://mr?create=maybe", "", None, 5],
)
def test_open_store_rejects_bad_urls(url):
    with pytest.raises(InvalidInputError, match="store") as caught:
        open_store(url)
    assert caught.value.field == "store"


def test_open_notifier_forms():
    assert isinstance(open_notifier("log"), LogNotifier) and isinstance(open_notifier(""), LogNotifier)
    assert open_notifier("sns://mr-status").topic == "mr-status"
    arn = "arn:aws:sns:us-east-1:123456789012:mr-status"
    assert open_notifier(arn).topic == arn and open_notifier(f"sns://{arn}").topic == arn


@pytest.mark.parametrize("url", ["sqs://queue", "sns://", "sns://bad topic", "arn:aws:sqs:us-east-1:1:q", "file:x", 3])
def test_open_notifier_rejects_bad_urls(url):
    with pytest.raises(InvalidInputError, match="sns://TOPIC-NAME") as caught:
        open_notifier(url)
    assert caught.value.field == "notices"


def test_dynamo_region_written_by_another_worker_is_counted_once(moto_server):
    """A worker that read a region before another worker marked it done retries instead of counting it again."""
    store = DynamoStore(f"mr-test-{next(_prefixes)}-race", create=True)
    start(store)
    store.mark_region("job-1", "r0-c0", "SUCCESS")
    read, calls = store._region, []
    store._region = lambda key: None if not calls.append(key) and len(calls) == 1 else read(key)
    store.mark_region("job-1", "r0-c0", "SUCCESS")
    assert len(calls) == 2 and store.get_job("job-1").regions_done == 1
    store.close()
