"""The embedded state store: one SQLite file in WAL mode, shared by threads and processes.

Each thread of each process opens its own connection on first use; every call is one short ``BEGIN IMMEDIATE``
transaction, and a busy timeout makes concurrent writers wait for each other instead of failing. The store pickles
to its path, so it can be sent to Dask workers.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from mr.state.base import (
    JOB_UPDATE_FIELDS,
    REGION_FIELDS,
    JobRecord,
    JobStatus,
    RegionRecord,
    StateError,
    UnknownJobError,
    check_id,
    check_limit,
    check_same_image,
    clean_fields,
    job_changes,
    new_job,
    region_changes,
    region_sort_key,
    stalled,
    stalled_changes,
    utc_now,
)

BUSY_TIMEOUT_S = 30.0
"""How long a write waits for another writer before it fails."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, image_id TEXT NOT NULL, image_url TEXT NOT NULL, status TEXT NOT NULL,
    request TEXT NOT NULL, message TEXT, region_count INTEGER, regions_done INTEGER NOT NULL DEFAULT 0,
    tile_count INTEGER, failed_tiles TEXT, feature_count INTEGER, width INTEGER, height INTEGER, extents TEXT,
    started_at TEXT NOT NULL, updated_at TEXT NOT NULL, finished_at TEXT, processing_seconds REAL, outputs TEXT,
    summary TEXT, attempts INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_by_start ON jobs (started_at);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, started_at);
CREATE INDEX IF NOT EXISTS jobs_by_progress ON jobs (status, updated_at);
CREATE TABLE IF NOT EXISTS regions (
    job_id TEXT NOT NULL, region_id TEXT NOT NULL, image_id TEXT, status TEXT NOT NULL, tiles INTEGER,
    failed_tiles TEXT, features INTEGER, seconds REAL, message TEXT, updated_at TEXT NOT NULL,
    PRIMARY KEY (job_id, region_id)
);
"""
_JSON_COLUMNS = ("failed_tiles", "extents", "outputs", "summary")
_UNFINISHED = (JobStatus.STARTED.value, JobStatus.IN_PROGRESS.value)


class SqliteStore:
    """Job and region state in one SQLite file (the embedded default)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(Path(path).expanduser())
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []

    def __reduce__(self):
        return (SqliteStore, (self.path,))

    def __repr__(self) -> str:
        return f"SqliteStore({self.path!r})"

    # --- jobs ---

    def start_job(self, job_id: str, image_id: str, image_url: str, request_text: str, **fields: Any) -> JobRecord:
        record = new_job(job_id, image_id, image_url, request_text, fields)
        with self._write() as conn:
            existing = _job(conn, job_id)
            if existing is not None:
                check_same_image(existing, image_url)
                updated_at = existing.updated_at if existing.finished else record.updated_at
                conn.execute("UPDATE jobs SET attempts = attempts + 1, updated_at = ? WHERE job_id = ?",
                             (updated_at, job_id))
                return replace(existing, attempts=existing.attempts + 1, updated_at=updated_at)
            _insert(conn, "jobs", record.to_dict())
            return record

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        values = clean_fields(fields, JOB_UPDATE_FIELDS, "update_job")
        with self._write() as conn:
            current = _job(conn, job_id)
            if current is None:
                raise UnknownJobError(job_id)
            changes = job_changes(current, values, utc_now())
            _update(conn, "jobs", changes, job_id=job_id)
            return replace(current, **changes)

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._read() as conn:
            return _job(conn, job_id)

    def list_jobs(self, status: JobStatus | str | None = None, limit: int = 100) -> list[JobRecord]:
        check_limit(limit)
        where, args = ("WHERE status = ?", [JobStatus.parse(status).value]) if status is not None else ("", [])
        sql = f"SELECT * FROM jobs {where} ORDER BY started_at DESC, job_id LIMIT ?"
        with self._read() as conn:
            return [_job_from_row(row) for row in conn.execute(sql, [*args, limit])]

    def touch_job(self, job_id: str) -> JobRecord:
        with self._write() as conn:
            current = _job(conn, job_id)
            if current is None:
                raise UnknownJobError(job_id)
            if current.finished:
                return current
            now = utc_now()
            conn.execute("UPDATE jobs SET updated_at = ? WHERE job_id = ?", (now, job_id))
            return replace(current, updated_at=now)

    def stalled_jobs(self, updated_before: str, limit: int = 100) -> list[JobRecord]:
        check_limit(limit)
        sql = "SELECT * FROM jobs WHERE status IN (?, ?) AND updated_at < ? ORDER BY updated_at, job_id LIMIT ?"
        with self._read() as conn:
            return [_job_from_row(row) for row in conn.execute(sql, (*_UNFINISHED, updated_before, limit))]

    def fail_stalled_job(self, job_id: str, updated_at: str, reason: str) -> JobRecord | None:
        with self._write() as conn:
            current = _job(conn, job_id)
            if current is None or not stalled(current, updated_at):
                return None
            changes = stalled_changes(current, reason, utc_now())
            _update(conn, "jobs", changes, job_id=job_id)
            return replace(current, **changes)

    # --- regions ---

    def mark_region(self, job_id: str, region_id: str, status: JobStatus | str, **fields: Any) -> RegionRecord:
        check_id("region_id", region_id)
        status = JobStatus.parse(status)
        values = clean_fields(fields, REGION_FIELDS, "mark_region")
        with self._write() as conn:
            job = _job(conn, job_id)
            if job is None:
                raise UnknownJobError(job_id)
            current = _region(conn, job_id, region_id)
            now = utc_now()
            changes, newly_done = region_changes(job_id, region_id, current, status, values, now)
            if current is None:
                record = RegionRecord(job_id=job_id, region_id=region_id, image_id=job.image_id, **changes)
                _insert(conn, "regions", record.to_dict())
            else:
                record = replace(current, **changes)
                _update(conn, "regions", changes, job_id=job_id, region_id=region_id)
            conn.execute(  # any region mark is progress of its job
                "UPDATE jobs SET regions_done = regions_done + ?, updated_at = ? WHERE job_id = ?",
                (int(newly_done), now, job_id),
            )
            return record

    def regions(self, job_id: str) -> list[RegionRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM regions WHERE job_id = ?", (job_id,)).fetchall()
        return sorted((_region_from_row(row) for row in rows), key=lambda r: region_sort_key(r.region_id))

    def done_regions(self, job_id: str) -> set[str]:
        done = (JobStatus.SUCCESS.value, JobStatus.PARTIAL.value)
        with self._read() as conn:
            rows = conn.execute("SELECT region_id FROM regions WHERE job_id = ? AND status IN (?, ?)", (job_id, *done))
            return {row[0] for row in rows}

    # --- connections ---

    def close(self) -> None:
        """Close every connection this store opened, in every thread; the next call opens a new one."""
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            conn = self._open()
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _open(self) -> sqlite3.Connection:
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"cannot open the state store {self.path}: {e}") from e
        with self._lock:
            self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; the write lock is taken at the start, so what it reads stays true until commit."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StateError(f"state store {self.path}: {e}") from e
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StateError(f"state store {self.path}: {e}") from e
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._connection()
        except sqlite3.Error as e:
            raise StateError(f"state store {self.path}: {e}") from e


def _job(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return _job_from_row(row) if row is not None else None


def _region(conn: sqlite3.Connection, job_id: str, region_id: str) -> RegionRecord | None:
    row = conn.execute("SELECT * FROM regions WHERE job_id = ? AND region_id = ?", (job_id, region_id)).fetchone()
    return _region_from_row(row) if row is not None else None


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord.from_dict(_decoded(row))


def _region_from_row(row: sqlite3.Row) -> RegionRecord:
    return RegionRecord.from_dict(_decoded(row))


def _decoded(row: sqlite3.Row) -> dict[str, Any]:
    data = dict(row)
    for name in _JSON_COLUMNS:
        if data.get(name) is not None:
            data[name] = json.loads(data[name])
    return data


def _encoded(values: dict[str, Any]) -> dict[str, Any]:
    data = {}
    for name, value in values.items():
        if isinstance(value, JobStatus):
            value = value.value
        elif name in _JSON_COLUMNS and value is not None:
            value = json.dumps(list(value) if isinstance(value, tuple) else value)
        data[name] = value
    return data


def _insert(conn: sqlite3.Connection, table: str, values: dict[str, Any]) -> None:
    data = _encoded(values)
    columns = ", ".join(data)
    conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(data))})", list(data.values()))


def _update(conn: sqlite3.Connection, table: str, values: dict[str, Any], **key: str) -> None:
    data = _encoded(values)
    assignments = ", ".join(f"{name} = ?" for name in data)
    where = " AND ".join(f"{name} = ?" for name in key)
    conn.execute(f"UPDATE {table} SET {assignments} WHERE {where}", [*data.values(), *key.values()])
