"""Load: 200 requests queued at once on the embedded queue, drained by one listener with four requests in flight.

The listener runs as a real process with its own LocalCluster; the test samples its process tree's memory and the
queue's leases while it works. Memory must stay bounded by the in-flight limit, not grow with the backlog: the
peak with 200 queued stays within 1.3 times the peak with 20 queued. Every request completes; none is lost. And
a receive from the embedded queue costs the same with 20,000 messages waiting as with a few.

``MR_LOAD_REQUESTS`` changes the number (``python -m pytest tests/test_load.py -s`` prints the figures).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from mr.synthetic import write_scene

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = int(os.environ.get("MR_LOAD_REQUESTS", "200"))
BASELINE = 20
IN_FLIGHT = 4
IMAGES = 10
RUNNING = ("STARTED", "IN_PROGRESS")


@dataclass
class Drain:
    """What one listener run looked like from outside."""

    requests: int
    seconds: float = 0.0
    peak_rss: int = 0
    max_leased: int = 0
    max_running: int = 0
    rss: list[int] = field(default_factory=list)


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (the LocalCluster's nanny and worker)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def in_flight(db_path: Path) -> tuple[int, int]:
    """(messages leased right now, jobs started and not finished)."""
    with sqlite3.connect(db_path, timeout=30) as db:
        leased = db.execute("SELECT count(*) FROM queue_messages WHERE visible_at > ?", (time.time(),)).fetchone()[0]
        try:
            running = db.execute(f"SELECT count(*) FROM jobs WHERE status IN {RUNNING}").fetchone()[0]
        except sqlite3.OperationalError:  # no job table until the listener opens the store
            running = 0
    return int(leased), int(running)


def drain(folder: Path, images: list[Path], requests: int) -> Drain:
    """Queue ``requests`` at once, run one listener with ``--once`` until the queue is empty, sampling as it goes."""
    from mr.queues import open_queue

    folder.mkdir()
    database = f"sqlite:///{folder / 'mr.db'}"
    queue = open_queue(database)
    for i in range(requests):
        queue.send(json.dumps({
            "jobId": f"load-{i:04d}", "imageUrls": [str(images[i % len(images)])],
            "outputs": [{"type": "File", "path": str(folder / f"out-{i:04d}.geojson")}],
            "imageProcessor": {"name": "builtin", "type": "LOCAL"},
            "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 32,
        }))
    queue.close()
    seen = Drain(requests)
    started = time.monotonic()
    with (folder / "listener.log").open("w") as log:
        listener = subprocess.Popen(
            [sys.executable, "-m", "mr.listen", "--once", "--queue", database, "--store", database, "--data-dir",
             str(folder), "--workers", "1", "--max-in-flight", str(IN_FLIGHT)],
            cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.DEVNULL, stderr=log,
        )
        process = psutil.Process(listener.pid)
        while listener.poll() is None:
            seen.rss.append(tree_rss(process))
            leased, running = in_flight(folder / "mr.db")
            seen.max_leased, seen.max_running = max(seen.max_leased, leased), max(seen.max_running, running)
            assert time.monotonic() - started < 300, "the listener did not drain the queue"
            time.sleep(0.1)
    seen.seconds = time.monotonic() - started
    seen.peak_rss = max(seen.rss, default=0)
    assert listener.returncode == 0, (folder / "listener.log").read_text()[-3000:]
    return seen


def check_all_done(folder: Path, requests: int) -> list[int]:
    """Every job SUCCESS with its output written; nothing left queued or dead-lettered. Returns feature counts."""
    from mr.state import SqliteStore

    with sqlite3.connect(folder / "mr.db") as db:
        assert db.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0, "a message was left queued"
        assert db.execute("SELECT count(*) FROM queue_dead_letters").fetchone()[0] == 0, "a message was dead-lettered"
    jobs = {job.job_id: job for job in SqliteStore(folder / "mr.db").list_jobs(limit=requests + 10)}
    assert sorted(jobs) == [f"load-{i:04d}" for i in range(requests)], "every request has exactly one job"
    counts = []
    for i in range(requests):
        job = jobs[f"load-{i:04d}"]
        assert job.status.value == "SUCCESS", (job.job_id, job.status, job.message)
        features = json.loads((folder / f"out-{i:04d}.geojson").read_text())["features"]
        assert len(features) == job.feature_count and len({f["id"] for f in features}) == len(features)
        counts.append(len(features))
    return counts


def test_a_backlog_of_200_requests_drains_in_bounded_memory(tmp_path):
    images = [tmp_path / f"scene-{i}.tif" for i in range(IMAGES)]
    for i, image in enumerate(images):
        write_scene(image, 400, 400, n_objects=6, seed=900 + i)
    small = drain(tmp_path / "baseline", images, BASELINE)
    check_all_done(tmp_path / "baseline", BASELINE)
    large = drain(tmp_path / "backlog", images, REQUESTS)
    counts = check_all_done(tmp_path / "backlog", REQUESTS)
    assert counts == [counts[i % IMAGES] for i in range(REQUESTS)], "the same image gives the same features"
    for run in (small, large):
        assert run.max_leased <= IN_FLIGHT and run.max_running <= IN_FLIGHT, run
    assert large.peak_rss <= 1.3 * small.peak_rss, (large.peak_rss, small.peak_rss)
    half = len(large.rss) // 2
    mib = 2**20
    print(
        f"\nload: {REQUESTS} requests in {large.seconds:.1f} s ({BASELINE} in {small.seconds:.1f} s); peak RSS of the "
        f"listener tree {large.peak_rss / mib:.0f} MiB vs {small.peak_rss / mib:.0f} MiB for {BASELINE}; first/second "
        f"half peak {max(large.rss[:half]) / mib:.0f}/{max(large.rss[half:]) / mib:.0f} MiB; at most "
        f"{large.max_leased} leased, {large.max_running} running (limit {IN_FLIGHT}); lost: none"
    )


def test_a_receive_costs_the_same_whatever_the_backlog(queue_dir):
    """Leasing the next messages reads a few index entries, not every waiting message: the first 500 of a 20,000
    backlog drain about as fast as the last 500 (it was 50 times slower: dead-lettering and ordering scanned all)."""
    from mr.queues import SqliteQueue

    queue = SqliteQueue(queue_dir / "mr.db")
    backlog, sample = 20_000, 500
    for i in range(backlog):
        queue.send(b'{"jobId": "backlog"}')

    def seconds_per_message(count: int) -> float:
        """Receive and delete ``count`` messages, four at a time, as the listener does."""
        started, done = time.perf_counter(), 0
        while done < count:
            messages = queue.receive(max_messages=4, visibility_timeout=60)
            for message in messages:
                queue.delete(message)
            done += len(messages)
        return (time.perf_counter() - started) / done

    first = seconds_per_message(sample)
    seconds_per_message(backlog - 2 * sample)
    last = seconds_per_message(sample)
    assert queue.receive(max_messages=1) == [] and queue.dead_letter_count() == 0
    assert first < 4 * last + 1e-4, f"{first * 1e3:.3f} ms a message at {backlog} waiting, {last * 1e3:.3f} at the end"
    print(f"\nbacklog: {first * 1e3:.3f} ms per message with {backlog} waiting, {last * 1e3:.3f} ms with {sample}")
