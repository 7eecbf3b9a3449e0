"""Request queues: one contract, run against the embedded SQLite queue and SQS (on the moto server)."""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from mr.errors import InvalidInputError
from mr.queues import (
    Message,
    QueueError,
    RequestQueue,
    SqliteQueue,
    SqsQueue,
    StaleReceiptError,
    ensure_queue,
    open_queue,
)

_serial = itertools.count()


@pytest.fixture(params=["sqlite", "sqs"])
def make_queue(request, tmp_path):
    """Opens a fresh queue of the parametrized kind; a second call with ``same=True`` opens another consumer of it."""
    opened: list[RequestQueue] = []
    target: dict = {}

    def make(visibility_timeout: float = 1, max_receives: int = 3, same: bool = False) -> RequestQueue:
        if request.param == "sqlite":
            queue = SqliteQueue(tmp_path / "queue.db", visibility_timeout=visibility_timeout, max_receives=max_receives)
        else:
            request.getfixturevalue("moto_server")
            if not same or "url" not in target:
                name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:60] + f"-{next(_serial)}"
                target["url"] = ensure_queue(name, max_receives, visibility_timeout=visibility_timeout)
            queue = SqsQueue(target["url"], max_receives=max_receives, visibility_timeout=visibility_timeout)
        opened.append(queue)
        return queue

    yield make
    for queue in opened:
        queue.close()


def test_send_receive_delete(make_queue):
    queue = make_queue()
    assert isinstance(queue, RequestQueue)
    sent = {queue.send('{"jobId": "a"}'): b'{"jobId": "a"}', queue.send(b"\xc3\xa9t\xc3\xa9"): "été".encode()}
    messages = queue.receive(max_messages=10)
    assert {m.message_id: m.body for m in messages} == sent
    now = datetime.now(timezone.utc)
    for message in messages:
        assert message.receive_count == 1
        assert now - timedelta(seconds=30) < message.sent_at <= now + timedelta(seconds=1)
        queue.delete(message)
    assert queue.receive() == []
    time.sleep(1.2)  # past the lease: deleted messages stay gone
    assert queue.receive(max_messages=10) == []
    assert queue.dead_letter_count() == 0


def test_leased_message_is_redelivered_after_its_timeout(make_queue):
    queue = make_queue(visibility_timeout=1)
    message_id = queue.send("job")
    [first] = queue.receive()
    assert queue.receive() == []
    time.sleep(1.2)
    [again] = queue.receive()
    assert again.message_id == message_id and again.body == b"job"
    assert again.receive_count == 2 and again.receipt != first.receipt
    queue.delete(again)


def test_extend_keeps_the_message_leased(make_queue):
    queue = make_queue(visibility_timeout=1)
    queue.send("job")
    [message] = queue.receive()
    queue.extend(message, 3)
    time.sleep(1.3)
    assert queue.receive() == []
    queue.delete(message)  # still held: the lease was extended


def test_extend_to_zero_gives_the_message_back(make_queue):
    queue = make_queue(visibility_timeout=30)
    queue.send("job")
    [message] = queue.receive()
    queue.extend(message, 0)
    time.sleep(0.01)
    [again] = queue.receive()
    assert again.message_id == message.message_id and again.receive_count == 2


def test_stale_receipt_never_touches_a_message_another_consumer_holds(make_queue):
    first, second = make_queue(visibility_timeout=1), make_queue(visibility_timeout=1, same=True)
    first.send("job")
    [old] = first.receive()
    time.sleep(1.2)
    with pytest.raises(StaleReceiptError, match="lease has run out"):
        first.extend(old, 10)  # expired, though nobody holds it yet
    [new] = second.receive(visibility_timeout=5)
    assert new.message_id == old.message_id and new.receive_count == 2
    with pytest.raises(StaleReceiptError):
        first.delete(old)
    with pytest.raises(StaleReceiptError):
        first.extend(old, 10)
    second.extend(new, 5)  # proves the message is still there, held by the second consumer
    second.delete(new)


def test_message_goes_to_the_dead_letter_queue_after_max_receives(make_queue):
    queue = make_queue(visibility_timeout=30, max_receives=2)
    queue.send("poison")
    for count in (1, 2):
        [message] = queue.receive()
        assert message.receive_count == count
        queue.extend(message, 0)  # a failed attempt gives the message back
        time.sleep(0.01)
    assert queue.receive() == []
    assert queue.dead_letter_count() == 1
    assert queue.receive() == []


def test_long_polling_returns_as_soon_as_a_message_arrives(make_queue):
    queue = make_queue()
    started = time.monotonic()
    assert queue.receive(wait_seconds=1) == []
    assert 0.9 <= time.monotonic() - started < 3
    sender = threading.Timer(0.3, queue.send, args=("late",))
    sender.start()
    started = time.monotonic()
    messages = queue.receive(wait_seconds=10)
    elapsed = time.monotonic() - started
    sender.join()
    assert [m.body for m in messages] == [b"late"]
    assert 0.25 <= elapsed < 2.5


def test_receive_arguments_are_checked(make_queue):
    queue = make_queue()
    for kwargs in ({"max_messages": 0}, {"max_messages": 11}, {"wait_seconds": 21}, {"visibility_timeout": -1}):
        with pytest.raises(InvalidInputError):
            queue.receive(**kwargs)
    with pytest.raises(InvalidInputError, match="body"):
        queue.send(123)


def test_queues_pickle_to_their_constructor_arguments(make_queue):
    queue = make_queue(visibility_timeout=30)  # a lease that cannot run out between receive and delete on a busy box
    queue.send("before")
    clone = pickle.loads(pickle.dumps(queue))  # after use: open handles are not pickled
    assert type(clone) is type(queue) and clone.visibility_timeout == queue.visibility_timeout
    [message] = clone.receive()
    assert message.body == b"before"
    assert pickle.loads(pickle.dumps(message)) == message
    clone.delete(message)
    clone.close()


def test_sqlite_threads_never_share_a_message(tmp_path):
    queue = SqliteQueue(tmp_path / "q.db", visibility_timeout=30)
    sent = {queue.send(f"m{i}") for i in range(80)}
    seen: list[str] = []

    def consume() -> None:
        while messages := queue.receive(max_messages=2):
            seen.extend(m.message_id for m in messages)
            for message in messages:
                queue.delete(message)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.close()
    assert sorted(seen) == sorted(sent)


def _consume_in_process(path: str, ready, go, results) -> None:
    queue = SqliteQueue(path, visibility_timeout=30)
    queue.dead_letter_count()  # open the connection before the race starts
    ready.set()
    go.wait(30)
    taken = []
    while messages := queue.receive(max_messages=1):
        taken.extend(m.message_id for m in messages)
        time.sleep(0.002)  # the work: without it one process may win every claim (SQLite's lock is not fair)
        queue.delete(messages[0])
    results.put(taken)
    queue.close()


def test_sqlite_processes_never_share_a_message(tmp_path):
    path = str(tmp_path / "q.db")
    queue = SqliteQueue(path)
    sent = {queue.send(f"m{i}") for i in range(150)}
    context = multiprocessing.get_context("spawn")
    go, results = context.Event(), context.Queue()
    readies = [context.Event() for _ in range(2)]
    workers = [context.Process(target=_consume_in_process, args=(path, r, go, results)) for r in readies]
    for worker in workers:
        worker.start()
    for ready in readies:
        assert ready.wait(30)
    go.set()
    taken = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    everything = taken[0] + taken[1]
    assert len(everything) == len(set(everything)) and set(everything) == sent
    assert all(taken), "both processes took part"
    assert queue.receive() == []
    queue.close()


def test_open_queue_sqlite_urls(tmp_path):
    default = open_queue(f"sqlite://{tmp_path}/mr.db")
    named = open_queue(f"sqlite://{tmp_path}/mr.db?name=other", visibility_timeout=5, max_receives=4)
    assert isinstance(default, SqliteQueue) and default.name == "requests"
    assert named.name == "other" and named.visibility_timeout == 5 and named.max_receives == 4
    default.send("a")
    assert named.receive() == []  # queues sharing a file are separate
    assert default.receive()[0].body == b"a"
    default.close()
    named.close()


@pytest.mark.parametrize("url", [
    "ftp://host/queue", "queue-name", "", "sqlite://relative.db", "sqlite:relative.db", "sqlite:///tmp/q.db?size=3",
    "sqlite:///tmp/q.db?name=", "sqs://", "sqs://name/extra", "sqs://bad.name!", "https://example.com/only-one",
    "https://sqs.us-east-1.amazonaws.com/123/bad name",
])
def test_open_queue_rejects_other_urls(url):
    with pytest.raises(InvalidInputError) as caught:
        open_queue(url)
    assert caught.value.field == "queue"


def test_open_queue_error_lists_the_accepted_forms():
    with pytest.raises(InvalidInputError, match=r"sqlite:///ABS/PATH\.db.*amazonaws\.com.*sqs://NAME"):
        open_queue("redis://localhost/0")


def test_open_queue_sqs_urls_resolve_without_calls():
    aws = open_queue("https://sqs.eu-west-2.amazonaws.com/123456789012/requests")
    assert isinstance(aws, SqsQueue) and aws.url.endswith("/requests") and aws.name == "requests"
    assert aws._client_args == {"endpoint_url": None, "region_name": "eu-west-2"}
    local = open_queue("http://localhost:4566/000000000000/requests")
    assert local._client_args["endpoint_url"] == "http://localhost:4566"
    by_name = open_queue("sqs://requests", max_receives=3)
    assert isinstance(by_name, SqsQueue) and by_name.name == "requests" and by_name.max_receives == 3


def test_open_queue_sqs_against_moto(moto_server):
    url = ensure_queue("open-queue-forms", max_receives=2, visibility_timeout=1)
    assert ensure_queue("open-queue-forms", max_receives=2, visibility_timeout=1) == url  # idempotent
    by_url, by_name = open_queue(url), open_queue("sqs://open-queue-forms", max_receives=2)
    message_id = by_url.send("hello")
    [message] = by_name.receive()
    assert message.message_id == message_id and by_name.url == url
    by_name.delete(message)
    with pytest.raises(QueueError, match="does not exist.*ensure_queue"):
        open_queue("sqs://no-such-queue").send("x")
    with pytest.raises(QueueError, match="maxReceiveCount=2.*ensure_queue"):
        open_queue(url, max_receives=5).receive()
    for queue in (by_url, by_name):
        queue.close()


def test_message_is_a_frozen_value():
    message = Message("id", b"{}", "receipt", 1, datetime.now(timezone.utc))
    with pytest.raises(AttributeError):
        message.receipt = "other"  # type: ignore[misc]
    assert message.text() == "{}"
