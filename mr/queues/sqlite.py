"""The embedded request queue: SQLite tables with SQS's lease semantics, shared by threads and processes.

Every claim runs in one ``BEGIN IMMEDIATE`` transaction, so two consumers (threads or processes) never lease the
same message; the database runs in WAL mode so that polling readers never block the writer. Times are wall-clock
seconds (``time.time()``), which all processes on one machine share. The tables carry a ``queue_`` prefix so the
queue can live in the same file as the job store.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from mr.errors import InvalidInputError
from mr.queues.base import (
    DEFAULT_MAX_RECEIVES,
    DEFAULT_VISIBILITY_TIMEOUT,
    MAX_VISIBILITY_TIMEOUT,
    Message,
    QueueError,
    StaleReceiptError,
    check_max_receives,
    check_receive,
    check_seconds,
    encode_body,
)

BUSY_TIMEOUT = 30.0
"""Seconds a connection waits for another's write lock before giving up."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue_messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL,
    sent_at REAL NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT
);
CREATE INDEX IF NOT EXISTS queue_messages_visible ON queue_messages (queue, visible_at);
CREATE INDEX IF NOT EXISTS queue_messages_order ON queue_messages (queue, seq, visible_at);
CREATE INDEX IF NOT EXISTS queue_messages_receives ON queue_messages (queue, receive_count, visible_at);
CREATE TABLE IF NOT EXISTS queue_dead_letters (
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL PRIMARY KEY,
    body BLOB NOT NULL,
    sent_at REAL NOT NULL,
    receive_count INTEGER NOT NULL,
    dead_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS queue_dead_letters_queue ON queue_dead_letters (queue);
"""


class SqliteQueue:
    """A named queue in a SQLite file; many queues may share one file.

    ``max_receives`` is the consumer's setting, not stored in the file: give every consumer of a queue the same.
    Stale receipts raise :class:`~mr.queues.base.StaleReceiptError` (see :mod:`mr.queues.base`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        name: str = "requests",
        visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
        max_receives: int = DEFAULT_MAX_RECEIVES,
        poll_interval: float = 0.05,
    ) -> None:
        if not str(path) or str(path) == ":memory:":
            raise InvalidInputError("path", path, "must name a SQLite file that processes share, e.g. /data/mr.db")
        if not isinstance(name, str) or not name:
            raise InvalidInputError("name", name, "must be a non-empty queue name, e.g. 'requests'")
        self.path = Path(path)
        self.name = name
        self.visibility_timeout = check_seconds("visibility_timeout", visibility_timeout, MAX_VISIBILITY_TIMEOUT)
        self.max_receives = check_max_receives(max_receives)
        self.poll_interval = check_seconds("poll_interval", poll_interval, 5.0)
        if not self.poll_interval:
            raise InvalidInputError("poll_interval", poll_interval, "must be more than 0 seconds, e.g. 0.05")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"SqliteQueue({str(self.path)!r}, name={self.name!r})"

    def __reduce__(self) -> tuple:
        args = (str(self.path), self.name, self.visibility_timeout, self.max_receives, self.poll_interval)
        return (SqliteQueue, args)

    def send(self, body: bytes | str) -> str:
        data = encode_body(body)
        message_id = str(uuid.uuid4())
        with self._transaction("send") as db:
            now = time.time()
            db.execute(
                "INSERT INTO queue_messages (queue, message_id, body, sent_at, visible_at) VALUES (?, ?, ?, ?, ?)",
                (self.name, message_id, data, now, now),
            )
        return message_id

    def receive(
        self, max_messages: int = 1, wait_seconds: float = 0, visibility_timeout: float | None = None
    ) -> list[Message]:
        check_receive(max_messages, wait_seconds, visibility_timeout)
        lease = self.visibility_timeout if visibility_timeout is None else float(visibility_timeout)
        deadline = time.monotonic() + wait_seconds
        while True:
            if self._has_visible():
                messages = self._claim(max_messages, lease)
                if messages:
                    return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(self.poll_interval, remaining))

    def extend(self, message: Message, seconds: float) -> None:
        seconds = check_seconds("seconds", seconds, MAX_VISIBILITY_TIMEOUT)
        with self._transaction("extend") as db:
            now = time.time()
            changed = db.execute(
                "UPDATE queue_messages SET visible_at = ? WHERE message_id = ? AND receipt = ? AND visible_at > ?",
                (now + seconds, message.message_id, message.receipt, now),
            ).rowcount
        if not changed:
            raise StaleReceiptError(message.message_id, "extend")

    def delete(self, message: Message) -> None:
        with self._transaction("delete") as db:
            now = time.time()
            changed = db.execute(
                "DELETE FROM queue_messages WHERE message_id = ? AND receipt = ? AND visible_at > ?",
                (message.message_id, message.receipt, now),
            ).rowcount
        if not changed:
            raise StaleReceiptError(message.message_id, "delete")

    def dead_letter_count(self) -> int:
        with self._errors("count dead letters"):
            row = self._connection().execute(
                "SELECT count(*) FROM queue_dead_letters WHERE queue = ?", (self.name,)
            ).fetchone()
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            self._local = threading.local()
        for connection in connections:
            connection.close()

    def _has_visible(self) -> bool:
        """A cheap read (no write lock) that tells whether a claim could lease or dead-letter anything."""
        with self._errors("poll"):
            row = self._connection().execute(
                "SELECT EXISTS (SELECT 1 FROM queue_messages WHERE queue = ? AND visible_at <= ?)",
                (self.name, time.time()),
            ).fetchone()
        return bool(row[0])

    def _claim(self, max_messages: int, lease: float) -> list[Message]:
        """Dead-letter the exhausted visible messages, then lease up to ``max_messages`` others, atomically."""
        with self._transaction("receive") as db:
            now = time.time()
            self._dead_letter(db, now)
            rows = db.execute(  # in queue order, skipping the leased: not a sort of every visible message
                "SELECT seq, message_id, body, sent_at, receive_count FROM queue_messages INDEXED BY"
                " queue_messages_order WHERE queue = ? AND visible_at <= ? ORDER BY seq LIMIT ?",
                (self.name, now, max_messages),
            ).fetchall()
            messages = []
            for seq, message_id, body, sent_at, count in rows:
                receipt = secrets.token_hex(16)
                db.execute(
                    "UPDATE queue_messages SET receipt = ?, receive_count = ?, visible_at = ? WHERE seq = ?",
                    (receipt, count + 1, now + lease, seq),
                )
                sent = datetime.fromtimestamp(sent_at, timezone.utc)
                messages.append(Message(message_id, bytes(body), receipt, count + 1, sent))
        return messages

    def _dead_letter(self, db: sqlite3.Connection, now: float) -> None:
        """Move the visible messages received ``max_receives`` times; the index finds them without reading the
        backlog (a scan of every visible message made each receive cost O(backlog))."""
        exhausted = "queue = ? AND visible_at <= ? AND receive_count >= ?"
        params = (self.name, now, self.max_receives)
        table = "queue_messages INDEXED BY queue_messages_receives"
        db.execute(
            "INSERT OR REPLACE INTO queue_dead_letters (queue, message_id, body, sent_at, receive_count, dead_at)"
            f" SELECT queue, message_id, body, sent_at, receive_count, ? FROM {table} WHERE {exhausted}",
            (now, *params),
        )
        db.execute(f"DELETE FROM {table} WHERE {exhausted}", params)

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened (and the schema created) on first use."""
        if self._pid != os.getpid():  # inherited through fork: the parent's connections are not ours to use
            self._pid, self._local, self._connections = os.getpid(), threading.local(), []
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._open()
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
            )
            _initialise(connection)
        except (sqlite3.Error, OSError) as error:
            raise QueueError(f"cannot open the SQLite queue {self.path}: {error}") from error
        return connection

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Turns SQLite errors into QueueError naming the file, the queue and the operation."""
        try:
            yield
        except sqlite3.Error as error:
            raise QueueError(f"SQLite queue {self.name!r} in {self.path}: {operation} failed: {error}") from error

    @contextmanager
    def _transaction(self, operation: str) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` on this thread's connection: one writer at a time, across processes."""
        with self._errors(operation):
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise


def _initialise(connection: sqlite3.Connection) -> None:
    """WAL mode and the tables. Switching to WAL can fail at once with "database is locked" (no busy handler) when
    processes create the file together, so that step is retried for up to BUSY_TIMEOUT."""
    give_up = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"database is locked (journal mode stays {mode})")
            connection.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
            return
        except sqlite3.OperationalError as error:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            if "locked" not in str(error) or time.monotonic() > give_up:
                raise
            time.sleep(0.01)
