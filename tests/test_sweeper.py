"""The stuck-job sweeper, against the SQLite store and the DynamoDB store (on a moto server): stuck jobs fail with
their reason and a notice, live and finished jobs are left alone, races with progress and with a second sweeper
fail a job at most once; and ``python -m mr sweep`` end to end."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask.config
import pytest

from mr.errors import InvalidInputError
from mr.service import resolve_service, resolve_sweep
from mr.state import DynamoStore, JobRecord, JobStatus, SqliteStore, UnknownJobError
from mr.state.base import utc_text
from mr.sweeper import stuck_reason, sweep_stuck_jobs

ROOT = Path(__file__).resolve().parents[1]
URL = "s3://imagery/scene.tif"
HOUR = 3600.0
_prefixes = itertools.count()


class Notices:
    """A notifier that keeps what it is told."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()

    def job_status(self, record: JobRecord, message: str | None = None) -> None:
        with self._lock:
            self.jobs.append((record.job_id, record.status.value, message))

    def region_status(self, record, message: str | None = None) -> None:
        raise AssertionError("the sweeper sends no region notices")


def start(store, job_id: str, status: str | None = "IN_PROGRESS") -> JobRecord:
    store.start_job(job_id, f"{job_id}:{URL}", URL, json.dumps({"jobId": job_id}))
    return store.update_job(job_id, status=status) if status else store.get_job(job_id)


def age(store, job_id: str, seconds: float) -> JobRecord:
    """Move the job's last progress ``seconds`` into the past, behind the store's back."""
    when = utc_text(time.time() - seconds)
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE jobs SET updated_at = ? WHERE job_id = ?", (when, job_id))
        conn.close()
    else:
        store._client().update_item(TableName=store.jobs_table, Key={"job_id": {"S": job_id}},
                                    UpdateExpression="SET updated_at = :t",
                                    ExpressionAttributeValues={":t": {"S": when}})
    return store.get_job(job_id)


# --- the store methods -----------------------------------------------------------------------------------------

def test_stalled_jobs_are_the_unfinished_ones_without_recent_progress(store):
    for job_id, status, seconds in (("old", "IN_PROGRESS", 3 * HOUR), ("older", None, 5 * HOUR),
                                    ("fresh", "IN_PROGRESS", 60), ("done", "SUCCESS", 5 * HOUR),
                                    ("failed", "FAILED", 5 * HOUR)):
        start(store, job_id, status)
        age(store, job_id, seconds)
    cutoff = utc_text(time.time() - HOUR)
    assert [job.job_id for job in store.stalled_jobs(cutoff)] == ["older", "old"]
    assert [job.job_id for job in store.stalled_jobs(cutoff, limit=1)] == ["older"]
    assert store.stalled_jobs(utc_text(time.time() - 6 * HOUR)) == []
    with pytest.raises(InvalidInputError):
        store.stalled_jobs(cutoff, limit=0)


def test_every_write_to_a_running_job_is_progress(store):
    start(store, "job-1")
    last = age(store, "job-1", HOUR).updated_at
    for write in (lambda: store.touch_job("job-1"), lambda: store.mark_region("job-1", "r0-c0", "STARTED"),
                  lambda: store.mark_region("job-1", "r0-c0", "SUCCESS"),
                  lambda: store.start_job("job-1", f"job-1:{URL}", URL, "{}"),
                  lambda: store.update_job("job-1", message="still going")):
        write()
        now = store.get_job("job-1").updated_at
        assert now > last
        last = age(store, "job-1", HOUR).updated_at
    assert store.get_job("job-1").attempts == 2 and store.get_job("job-1").regions_done == 1


def test_touch_job(store):
    start(store, "job-1")
    before = age(store, "job-1", HOUR)
    touched = store.touch_job("job-1")
    assert touched.updated_at > before.updated_at and touched.status is JobStatus.IN_PROGRESS
    assert store.get_job("job-1") == touched
    done = store.update_job("job-1", status="SUCCESS")
    assert store.touch_job("job-1") == done == store.get_job("job-1")
    with pytest.raises(UnknownJobError):
        store.touch_job("nobody")


def test_a_finished_job_started_again_keeps_its_time(store):
    start(store, "job-1", "SUCCESS")
    before = age(store, "job-1", HOUR)
    again = store.start_job("job-1", f"job-1:{URL}", URL, "{}")
    assert again.updated_at == before.updated_at and again.attempts == 2 and again == store.get_job("job-1")


def test_fail_stalled_job_is_conditional(store):
    start(store, "job-1")
    job = age(store, "job-1", HOUR)
    assert store.fail_stalled_job("nobody", job.updated_at, "lost") is None
    assert store.fail_stalled_job("job-1", utc_text(time.time() - 2 * HOUR), "lost") is None
    failed = store.fail_stalled_job("job-1", job.updated_at, "lost")
    assert failed.status is JobStatus.FAILED and failed.message == "lost" and failed.finished_at is not None
    assert store.get_job("job-1") == failed
    assert store.fail_stalled_job("job-1", job.updated_at, "lost again") is None


# --- the sweeper -----------------------------------------------------------------------------------------------

def test_a_stuck_job_fails_with_its_reason_and_a_notice(store):
    start(store, "stuck")
    start(store, "stuck-at-start", None)
    start(store, "fresh")
    start(store, "finished", "PARTIAL")
    for job_id in ("stuck", "stuck-at-start", "finished"):
        age(store, job_id, 2 * HOUR)
    untouched = {job_id: store.get_job(job_id) for job_id in ("fresh", "finished")}
    notices = Notices()
    failed = sweep_stuck_jobs(store, notices, stuck_after_s=HOUR)
    assert sorted(job.job_id for job in failed) == ["stuck", "stuck-at-start"]
    for job in failed:
        assert store.get_job(job.job_id) == job and job.status is JobStatus.FAILED and job.finished_at
        assert re.fullmatch(r"no progress for 72\d\d s \(last progress \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, status "
                            r"(IN_PROGRESS|STARTED); limit 3600 s\): its request was lost; send it again under a "
                            r"new jobId to run it", job.message), job.message
    assert "status STARTED" in store.get_job("stuck-at-start").message
    assert sorted(notices.jobs) == sorted((job.job_id, "FAILED", job.message) for job in failed)
    assert {job_id: store.get_job(job_id) for job_id in untouched} == untouched
    assert sweep_stuck_jobs(store, notices, stuck_after_s=HOUR) == [] and len(notices.jobs) == 2


def test_the_clock_can_be_given(store):
    start(store, "job-1")
    assert sweep_stuck_jobs(store, None, HOUR) == []
    [failed] = sweep_stuck_jobs(store, None, HOUR, now=time.time() + 2 * HOUR)
    assert failed.job_id == "job-1" and failed.message.startswith("no progress for 72")


class _Meddling:
    """A store whose ``stalled_jobs`` lets something happen to each job found, before the sweeper marks it."""

    def __init__(self, store, meddle=lambda job_id: None) -> None:
        self.store, self.meddle = store, meddle

    def stalled_jobs(self, updated_before: str, limit: int = 100) -> list[JobRecord]:
        found = self.store.stalled_jobs(updated_before, limit)
        for job in found:
            self.meddle(job.job_id)
        return found

    def __getattr__(self, name: str):
        return getattr(self.store, name)


@pytest.mark.parametrize("meddle", ["touch", "region", "update", "finish", "fail"])
def test_a_job_that_moves_on_between_find_and_mark_is_not_failed(store, meddle):
    start(store, "job-1")
    age(store, "job-1", 2 * HOUR)
    action = {
        "touch": lambda job_id: store.touch_job(job_id),
        "region": lambda job_id: store.mark_region(job_id, "r0-c0", "SUCCESS"),
        "update": lambda job_id: store.update_job(job_id, message="planned"),
        "finish": lambda job_id: store.update_job(job_id, status="SUCCESS"),
        "fail": lambda job_id: store.update_job(job_id, status="FAILED", message="the listener's own reason"),
    }[meddle]
    notices = Notices()
    assert sweep_stuck_jobs(_Meddling(store, action), notices, HOUR) == [] and notices.jobs == []
    job = store.get_job("job-1")
    expected = {"finish": JobStatus.SUCCESS, "fail": JobStatus.FAILED}.get(meddle, JobStatus.IN_PROGRESS)
    assert job.status is expected and not (job.message or "").startswith("no progress")


def test_two_sweepers_at_once_fail_each_job_once(store):
    jobs = [f"job-{n}" for n in range(3)]
    for job_id in jobs:
        start(store, job_id)
        age(store, job_id, 2 * HOUR)
    both_found = threading.Barrier(2, timeout=30)
    notices, results = Notices(), {}

    def sweep(name: str) -> None:
        own = pickle.loads(pickle.dumps(store))  # a store of its own, as another listener has
        found_all = _Meddling(own, lambda job_id: both_found.wait() if job_id == jobs[-1] else None)
        results[name] = sweep_stuck_jobs(found_all, notices, HOUR)
        own.close()

    threads = [threading.Thread(target=sweep, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    swept = [job.job_id for name in ("a", "b") for job in results[name]]
    assert sorted(swept) == jobs
    assert sorted(job_id for job_id, _, _ in notices.jobs) == jobs
    assert all(store.get_job(job_id).status is JobStatus.FAILED for job_id in jobs)


def test_a_notice_that_fails_does_not_stop_the_sweep(store, caplog):
    from mr.state import NoticeError

    class Broken(Notices):
        def job_status(self, record, message=None):
            raise NoticeError("SNS is down")

    for job_id in ("a", "b"):
        start(store, job_id)
        age(store, job_id, 2 * HOUR)
    assert len(sweep_stuck_jobs(store, Broken(), HOUR)) == 2
    assert "not published" in caplog.text


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "soon", None, True])
def test_stuck_after_must_be_positive_seconds(bad):
    with pytest.raises(InvalidInputError, match="stuck-after"):
        sweep_stuck_jobs(SqliteStore("/nonexistent/never-opened.db"), None, bad)


def test_reason_names_the_idle_time_and_the_last_progress():
    job = JobRecord(job_id="j", image_id="j:x", image_url="x", status=JobStatus.IN_PROGRESS,
                    updated_at="2026-01-02T03:04:05.678901+00:00")
    now = 1767323045.678901 + 4000  # 2026-01-02T03:04:05.678901Z + 4000 s
    assert stuck_reason(job, HOUR, now) == (
        "no progress for 4000 s (last progress 2026-01-02T03:04:05Z, status IN_PROGRESS; limit 3600 s): "
        "its request was lost; send it again under a new jobId to run it")


# --- settings and the command ----------------------------------------------------------------------------------

def test_settings(tmp_path):
    settings = resolve_service(data_dir=str(tmp_path))
    assert (settings.stuck_after, settings.sweep_every) == (3600.0, 300.0)
    with dask.config.set({"mr.service.stuck-after": 100, "mr.service.visibility-timeout": 120}):
        with pytest.raises(InvalidInputError, match="visibility timeout"):
            resolve_sweep()
    with dask.config.set({"mr.service.sweep-every": -5}):
        with pytest.raises(InvalidInputError, match="sweep-every"):
            resolve_sweep()
    with dask.config.set({"mr.service.sweep-every": 0}):
        assert resolve_sweep(7200) == {"stuck_after": 7200.0, "sweep_every": 0.0}


def _mr(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_MR__", "AWS_"))}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "mr", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


def test_sweep_command(tmp_path):
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    for job_id in ("stuck", "fresh"):
        start(store, job_id)
    age(store, "stuck", 2 * HOUR)
    run = _mr("sweep", "--store", f"sqlite://{path}", tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    [line] = run.stdout.splitlines()
    printed = json.loads(line)
    assert printed["job_id"] == "stuck" and printed["status"] == "FAILED" and "request" not in printed
    assert printed["message"].startswith("no progress for 72")
    assert "job stuck failed by the sweeper: no progress for" in run.stderr
    assert store.get_job("stuck").status is JobStatus.FAILED
    assert store.get_job("fresh").status is JobStatus.IN_PROGRESS
    again = _mr("sweep", "--store", f"sqlite://{path}", "--stuck-after", "7200", tmp_path=tmp_path)
    assert again.returncode == 0 and again.stdout == ""
    refused = _mr("sweep", "--store", f"sqlite://{path}", "--stuck-after", "10", tmp_path=tmp_path)
    assert refused.returncode == 2 and "visibility timeout" in refused.stderr
    store.close()


def test_dynamo_sweeper_that_read_a_stale_record_does_not_fail_the_job(moto_server):
    """The conditional write, not the read before it, decides: a record read before progress is not failed."""
    store = DynamoStore(f"mr-sweep-{next(_prefixes)}-stale", create=True)
    start(store, "job-1")
    stale = age(store, "job-1", 2 * HOUR)
    store.touch_job("job-1")
    store.get_job = lambda job_id: stale
    assert store.fail_stalled_job("job-1", stale.updated_at, "lost") is None
    del store.get_job
    assert store.get_job("job-1").status is JobStatus.IN_PROGRESS
    store.close()
