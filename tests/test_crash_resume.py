"""Fault tolerance: the listener SIGKILLed at random points and restarted, and a Dask worker killed mid-graph.

Everything is real: listener processes with their own LocalCluster, the embedded SQLite queue and state store,
region checkpoints on disk, SIGKILL. Each outcome is compared with a clean run of the same requests.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import psutil

from mr.queues.base import DEFAULT_MAX_RECEIVES
from mr.synthetic import write_scene

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240611
REQUESTS = 20
KILLS = 8
"""Each kill lands a random 1-12 new regions (plus up to 0.3 s) after a restart: at most ~100 of the 180 regions pass
in the kill cycles, so every kill falls while work is left, however fast or slow the machine."""
LEASE_S = 3.0
LISTENER_ENV = {
    "DASK_MR__SERVICE__VISIBILITY_TIMEOUT": str(LEASE_S),
    "DASK_MR__SERVICE__POLL_SECONDS": "0.5",
    "DASK_MR__TILING__REGION_SIZE": "256",
    "PYTHONWARNINGS": "ignore",
}


def osml_request(job_id: str, image: Path, out: Path, tile: int = 256, overlap: int = 32) -> dict:
    """An OversightML image request for one local image, written to one GeoJSON file."""
    return {
        "jobId": job_id,
        "imageUrls": [str(image)],
        "outputs": [{"type": "File", "path": str(out)}],
        "imageProcessor": {"name": "builtin", "type": "LOCAL"},
        "imageProcessorTileSize": tile,
        "imageProcessorTileOverlap": overlap,
    }


def comparable(path: Path) -> list[dict]:
    """An output's features by id, without the one field that differs between runs (the inference time)."""
    features = json.loads(path.read_text())["features"]
    for feature in features:
        feature["properties"]["inferenceMetadata"].pop("inferenceDT", None)
    return sorted(features, key=lambda f: f["id"])


def listener_command(database: str, data_dir: Path, *extra: str) -> list[str]:
    """``python -m mr.listen`` on the embedded SQLite queue and store, one local worker, two requests at once."""
    return [
        sys.executable, "-m", "mr.listen", "--queue", database, "--store", database, "--data-dir", str(data_dir),
        "--workers", "1", "--max-in-flight", "2", *extra,
    ]


def run_once(database: str, data_dir: Path, log: Path) -> None:
    """One listener run with ``--once``, to completion."""
    with log.open("w") as stream:
        done = subprocess.run(
            listener_command(database, data_dir, "--once"), cwd=ROOT, env={**os.environ, **LISTENER_ENV},
            stdout=subprocess.DEVNULL, stderr=stream, timeout=240,
        )
    assert done.returncode == 0, log.read_text()[-3000:]


def checkpoints(work: Path) -> dict[str, tuple[int, int]]:
    """Every region checkpoint file: (inode, mtime in ns). A recomputed region is saved again under a new inode."""
    found = {}
    for path in work.rglob("r*-c*.parquet"):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        found[str(path.relative_to(work))] = (stat.st_ino, stat.st_mtime_ns)
    return found


def finished_jobs(db_path: Path) -> dict[str, tuple[str, str]]:
    """Finished jobs in the state store: job id → (status, finished_at)."""
    with sqlite3.connect(db_path, timeout=30) as db:
        try:
            rows = db.execute("SELECT job_id, status, finished_at FROM jobs WHERE finished_at IS NOT NULL")
            return {job: (status, at) for job, status, at in rows}
        except sqlite3.OperationalError:  # no table yet: the listener has not opened the store
            return {}


def leased_on_last_delivery(db_path: Path) -> bool:
    """Whether a message is leased on its last allowed delivery (killing now would dead-letter it by design)."""
    with sqlite3.connect(db_path, timeout=30) as db:
        row = db.execute(
            "SELECT count(*) FROM queue_messages WHERE visible_at > ? AND receive_count >= ?",
            (time.time(), DEFAULT_MAX_RECEIVES),
        ).fetchone()
    return bool(row[0])


def lease_ends(db_path: Path) -> float:
    """When the last leased message becomes visible again (0 when none is leased)."""
    with sqlite3.connect(db_path, timeout=30) as db:
        row = db.execute("SELECT max(visible_at) FROM queue_messages WHERE receive_count > 0").fetchone()
    return float(row[0] or 0.0)


def queue_counts(db_path: Path) -> tuple[int, int]:
    """(messages still queued, dead letters)."""
    with sqlite3.connect(db_path, timeout=30) as db:
        left = db.execute("SELECT count(*) FROM queue_messages").fetchone()[0]
        dead = db.execute("SELECT count(*) FROM queue_dead_letters").fetchone()[0]
    return int(left), int(dead)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (not zombie) processes of a process group."""
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def group_semaphores(pgid: int) -> set[str]:
    """The named POSIX semaphores (/dev/shm/sem.*) that a process group has mapped."""
    found = set()
    for process in group_members(pgid):
        try:
            with open(f"/proc/{process.pid}/maps") as maps:
                found.update(line.split()[-1] for line in maps if "/dev/shm/sem." in line and "(deleted)" not in line)
        except OSError:
            continue
    return found


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the listener and its LocalCluster (scheduler, nanny, worker) at once; wait until all are gone.

    The group's multiprocessing resource tracker dies with it, so the semaphores it would have unlinked are
    unlinked here: only those the group itself had mapped.
    """
    semaphores = group_semaphores(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    deadline = time.monotonic() + 10
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_members(process.pid), "a process of the killed listener lived on"
    for name in semaphores:
        Path(name).unlink(missing_ok=True)


@dataclass
class KillLog:
    """What the kill loop saw."""

    kills: int = 0
    deferred: int = 0
    """Kills put off until no message was on its last allowed delivery."""
    mid_request: int = 0
    """Kills that left a job with checkpointed regions unfinished."""
    regions_reused: int = 0
    """Regions checkpointed for an unfinished job at a kill: the next listener must load, not compute, them."""
    early_outputs: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Outputs found written for a job not yet recorded finished (killed between publishing and recording): the
    redelivered request publishes again, the same features (at least once, as the design says)."""
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Checkpoint files seen at some kill: (inode, mtime) must never change."""
    final: dict[str, tuple] = field(default_factory=dict)
    """Jobs finished at some kill: status, finish time, output inode and mtime must never change."""


def queue_requests(folder: Path, images: list[Path]) -> str:
    """One request per image on a fresh embedded queue in ``folder``; returns its URL."""
    from mr.queues import open_queue

    folder.mkdir()
    database = f"sqlite:///{folder / 'mr.db'}"
    queue = open_queue(database)
    for i, image in enumerate(images):
        queue.send(json.dumps(osml_request(f"job-{i:02d}", image, folder / f"out-{i:02d}.geojson")))
    queue.close()
    return database


def kill_at_random_points(folder: Path, rng: random.Random) -> KillLog:
    """Start the listener, SIGKILL it (with its cluster) a random 1-12 regions plus 0-0.3 s later, KILLS times."""
    seen, db_path, work = KillLog(), folder / "mr.db", folder / "work"
    while seen.kills < KILLS and len(finished_jobs(db_path)) < REQUESTS:
        target = len(checkpoints(work)) + rng.randint(1, 12)
        log = folder / f"listener-{seen.kills}.log"
        with log.open("w") as stream:
            listener = subprocess.Popen(
                listener_command(f"sqlite:///{db_path}", folder), cwd=ROOT, env={**os.environ, **LISTENER_ENV},
                stdout=subprocess.DEVNULL, stderr=stream, start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 90
                # the target may lie past the work left: finishing every request is progress too
                while len(checkpoints(work)) < target and len(finished_jobs(db_path)) < REQUESTS:
                    assert listener.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, "the restarted listener made no progress"
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.3))
                if leased_on_last_delivery(db_path):  # a third crash on one message dead-letters it, by design
                    seen.deferred += 1
                    while leased_on_last_delivery(db_path) and time.monotonic() < deadline:
                        time.sleep(0.02)
            finally:
                kill_group(listener)
        seen.kills += 1
        take_stock(folder, seen)
    return seen


def take_stock(folder: Path, seen: KillLog) -> None:
    """After a kill: remember every checkpoint and every finished job, to check later that none changes."""
    done, files = finished_jobs(folder / "mr.db"), checkpoints(folder / "work")
    for job, state in done.items():
        out = folder / f"out-{job[4:]}.geojson"
        seen.final.setdefault(job, (*state, out.stat().st_ino, out.stat().st_mtime_ns))
    unfinished = {name for name in files if name.split("/", 1)[0] not in done}
    seen.mid_request += bool(unfinished)
    seen.regions_reused += len(unfinished - set(seen.kept))
    for i in range(REQUESTS):
        out = folder / f"out-{i:02d}.geojson"
        if out.exists() and f"job-{i:02d}" not in done:
            seen.early_outputs.setdefault(out.name, (out.stat().st_ino, out.stat().st_mtime_ns))
    seen.kept.update({name: files[name] for name in files if name not in seen.kept})


def test_listener_killed_at_random_points_finishes_every_request_once(tmp_path):
    """20 requests; the listener (and its workers) SIGKILLed at seeded random points and restarted each time.

    Every job ends SUCCESS once, with output identical to a clean run and no duplicated feature; no checkpointed
    region is computed again after a kill (its file keeps its inode and mtime); a finished job is never published
    again; nothing is left on the queue or dead-lettered.
    """
    images = [tmp_path / f"scene-{i:02d}.tif" for i in range(REQUESTS)]
    for i, image in enumerate(images):
        write_scene(image, 600, 600, n_objects=14, seed=SEED + i)
    clean, crash = tmp_path / "clean", tmp_path / "crash"
    started = time.monotonic()
    run_once(queue_requests(clean, images), clean, tmp_path / "clean.log")
    clean_seconds = time.monotonic() - started

    database = queue_requests(crash, images)
    seen = kill_at_random_points(crash, random.Random(SEED))
    time.sleep(max(0.0, lease_ends(crash / "mr.db") - time.time()) + 0.2)  # the leases of the last kill run out
    run_once(database, crash, crash / "listener-final.log")
    elapsed = time.monotonic() - started

    from mr.state import SqliteStore

    store = SqliteStore(crash / "mr.db")
    jobs = store.list_jobs(limit=1000)
    assert sorted(j.job_id for j in jobs) == [f"job-{i:02d}" for i in range(REQUESTS)]
    for job in jobs:
        assert job.status.value == "SUCCESS", (job.job_id, job.status, job.message)
        assert job.region_count == 9 and job.regions_done == 9, "each region counted done exactly once"
        regions = store.regions(job.job_id)
        assert len(regions) == 9 and all(r.status.value == "SUCCESS" for r in regions)
    assert queue_counts(crash / "mr.db") == (0, 0), "nothing left on the queue, nothing dead-lettered"
    for i in range(REQUESTS):
        resumed = comparable(crash / f"out-{i:02d}.geojson")
        assert resumed == comparable(clean / f"out-{i:02d}.geojson"), f"job-{i:02d} differs from the clean run"
        assert len({f["id"] for f in resumed}) == len(resumed), "no duplicated feature"
        record = store.get_job(f"job-{i:02d}")
        assert record.feature_count == len(resumed) and record.outputs == [str(crash / f"out-{i:02d}.geojson")]
    now = checkpoints(crash / "work")
    changed = sorted(name for name, stamp in seen.kept.items() if now.get(name) != stamp)
    assert not changed, f"regions checkpointed before a kill were computed again: {changed[:5]}"
    assert len(now) == REQUESTS * 9
    for job, (status, finished_at, inode, mtime) in seen.final.items():
        out = crash / f"out-{job[4:]}.geojson"
        again = (*finished_jobs(crash / "mr.db")[job], out.stat().st_ino, out.stat().st_mtime_ns)
        assert again == (status, finished_at, inode, mtime), f"{job} finished or was published a second time"
    assert seen.kills == KILLS and seen.mid_request >= KILLS // 2 and seen.regions_reused > 0, seen
    rewritten = [name for name, (inode, _) in seen.early_outputs.items() if (crash / name).stat().st_ino != inode]
    print(
        f"\ncrash-resume: {REQUESTS} requests ({sum(j.attempts for j in jobs)} deliveries started), "
        f"{seen.kills} kills ({seen.mid_request} mid-request, {seen.deferred} put off a last delivery), "
        f"{seen.regions_reused} checkpointed regions reused; {len(seen.early_outputs)} outputs written before a kill "
        f"and their job recorded finished, {len(rewritten)} of them written again (same features); clean run "
        f"{clean_seconds:.1f} s, whole test {elapsed:.1f} s"
    )


# ---- worker loss ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlowBuiltin:
    """The builtin detector, slowed down so that regions are still running when a worker is killed."""

    delay: float = 0.15
    name: ClassVar[str] = "slow-builtin"

    def __call__(self, tiles: np.ndarray) -> list:
        from mr.models.builtin import BuiltinDetector

        time.sleep(self.delay)
        return BuiltinDetector()(tiles)


def start_listener(client, folder: Path, request: dict) -> tuple[threading.Thread, list[int]]:
    """Queue one request on a fresh embedded queue; an in-process Listener drains it on a thread."""
    from mr.listen import Listener
    from mr.queues import open_queue
    from mr.service import ServiceSettings

    database = f"sqlite:///{folder / 'mr.db'}"
    open_queue(database).send(json.dumps(request))
    settings = ServiceSettings(
        queue=database, store=database, notices=None, work_dir=str(folder / "work"), max_in_flight=1,
        visibility_timeout=30, poll_seconds=0,
    )
    listener, handled = Listener(settings, client), []
    runner = threading.Thread(target=lambda: handled.append(listener.run(once=True)), name=f"listener-{folder.name}")
    runner.start()
    return runner, handled


def test_a_killed_worker_costs_nothing_but_time(tmp_path):
    """A worker process SIGKILLed while region tasks run on it: the request completes, identical to a clean run."""
    import dask.config
    from distributed import Client, LocalCluster

    from mr.state import SqliteStore

    image = tmp_path / "scene.tif"
    write_scene(image, 1200, 1000, n_objects=60, seed=SEED)
    config = {"mr.model.registry": {"slow-builtin": f"{__name__}:SlowBuiltin"}, "mr.tiling.region-size": 256}
    started = time.monotonic()
    with dask.config.set(config), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster) as client:
        for name in ("clean", "killed"):
            request = osml_request("job-loss", image, tmp_path / name / "out.geojson")
            request["imageProcessor"]["name"] = "slow-builtin"
            runner, handled = start_listener(client, tmp_path / name, request)
            if name == "killed":
                address, pid, tasks = kill_a_busy_worker(client, tmp_path / name / "work", runner)
            runner.join(timeout=120)
            assert handled == [1], "the listener handled its one request and returned"
            record = SqliteStore(tmp_path / name / "mr.db").get_job("job-loss")
            assert record.status.value == "SUCCESS", record.message
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert address not in client.scheduler_info()["workers"], "the scheduler saw the worker go"
    lost = [tuple(map(int, m)) for m in re.findall(r"read-infer-region-\w+', (\d+), (\d+)\)", " ".join(tasks))]
    done = {p.stem for p in (tmp_path / "killed" / "work").rglob("r*-c*.parquet")}
    assert lost and all(f"r{ry}-c{rx}" in done for ry, rx in lost), "the killed worker's regions were done after all"
    clean, again = comparable(tmp_path / "clean" / "out.geojson"), comparable(tmp_path / "killed" / "out.geojson")
    assert again == clean and len({f["id"] for f in again}) == len(again) > 50
    print(f"\nworker loss: killed {address} (pid {pid}) running {tasks}; {len(again)} features identical to the "
          f"clean run; {time.monotonic() - started:.1f} s")


def kill_a_busy_worker(client, work: Path, runner: threading.Thread) -> tuple[str, int, list]:
    """Once a few regions are done, SIGKILL a worker process that region tasks are running on right now."""
    deadline = time.monotonic() + 60
    while len(list(work.rglob("r*-c*.parquet"))) < 4:
        assert runner.is_alive() and time.monotonic() < deadline, "the request ended before any worker was killed"
        time.sleep(0.02)
    pids = client.run(os.getpid)
    while time.monotonic() < deadline:
        busy = {
            address: [key for key in keys if "read-infer-region" in str(key)]
            for address, keys in client.processing().items()
        }
        busy = {address: keys for address, keys in busy.items() if keys}
        if busy:
            address = sorted(busy)[0]
            os.kill(pids[address], signal.SIGKILL)
            return address, pids[address], [str(k) for k in busy[address]]
        time.sleep(0.01)
    raise AssertionError("no worker was running a task")
