"""Endpoint call threads (``mr.models.inflight``) and how a region task keeps them busy (``mr.regions.run_tiles``)."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest

from mr.detections import Detections
from mr.errors import ModelError
from mr.metrics import Metrics, Operation
from mr.models.inflight import CallPool, Lease, Pending
from mr.regions import RegionTask, run_tiles
from mr.strips import RegionPixels
from mr.tiling import TileGrid, tile_grid


class CountingLimiter:
    """A semaphore of ``n`` leases that counts its acquisitions and the leases out now."""

    def __init__(self, n: int) -> None:
        self._leases = threading.BoundedSemaphore(n)
        self._lock = threading.Lock()
        self.acquired = self.out = 0

    def acquire(self) -> None:
        self._leases.acquire()
        with self._lock:
            self.acquired += 1
            self.out += 1

    def release(self) -> None:
        with self._lock:
            self.out -= 1
        self._leases.release()


def test_a_thread_keeps_its_lease_while_work_is_queued_and_gives_it_back_when_idle():
    limiter = CountingLimiter(2)
    pool = CallPool(2, limiter, "test-leases", linger=0.05)
    lock, busy = threading.Lock(), {"now": 0, "peak": 0}

    def call(lease: Lease) -> str:
        lease.take()
        with lock:
            busy["now"] += 1
            busy["peak"] = max(busy["peak"], busy["now"])
        time.sleep(0.005)
        with lock:
            busy["now"] -= 1
        return threading.current_thread().name

    names = {future.result() for future in [pool.submit(call) for _ in range(20)]}
    assert names == {"test-leases-0", "test-leases-1"} and busy["peak"] == 2
    assert limiter.acquired <= 4  # a lease per thread and busy spell, not one per call
    time.sleep(0.3)
    assert limiter.out == 0  # given back once idle for longer than the linger
    assert {future.result() for future in [pool.submit(call) for _ in range(4)]} <= names  # the same threads


def test_a_failure_reaches_its_caller_and_cancelled_work_never_runs():
    pool = CallPool(1, None, "test-cancel")
    started, gate, ran = threading.Event(), threading.Event(), []

    def hold(lease: Lease) -> str:
        started.set()
        gate.wait(5)
        return "held"

    held = pool.submit(hold)
    started.wait(5)
    failing = pool.submit(lambda lease: 1 / 0)
    dropped = Pending([pool.submit(lambda lease: ran.append(1))])
    dropped.cancel()
    gate.set()
    assert held.result(timeout=5) == "held"
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    assert pool.submit(lambda lease: "alive").result(timeout=5) == "alive"  # the thread outlived the failure
    assert ran == [] and dropped.futures[0].cancelled()


def test_submit_waits_while_the_queue_of_waiting_calls_is_full():
    pool = CallPool(1, None, "test-room", queued=2)
    started, gate = threading.Event(), threading.Event()

    def hold(lease: Lease) -> str:
        started.set()
        gate.wait(5)
        return "held"

    held = pool.submit(hold)
    started.wait(5)  # the only thread is busy: what comes next waits in the queue
    queued = [pool.submit(lambda lease: "queued") for _ in range(2)]
    late: list = []
    submitter = threading.Thread(target=lambda: late.append(pool.submit(lambda lease: "late")))
    submitter.start()
    submitter.join(0.3)
    assert submitter.is_alive() and not late  # the queue is full: submit waits (back-pressure on the reader)
    gate.set()
    submitter.join(5)
    assert [f.result(timeout=5) for f in [held, *queued, *late]] == ["held", "queued", "queued", "late"]


_FORKED_POOL = CallPool(1, None, "test-fork")


def _submit_in_child(results: "multiprocessing.Queue") -> None:
    results.put(_FORKED_POOL.submit(lambda lease: "served").result(timeout=5))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_starts_its_own_threads():
    assert _FORKED_POOL.submit(lambda lease: "parent").result(timeout=5) == "parent"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_submit_in_child, args=(results,))
    child.start()
    assert results.get(timeout=10) == "served"
    child.join(10)


def one_box_per_tile(tiles: np.ndarray) -> list[Detections]:
    """One box near each tile's corner."""
    return [Detections.from_labels(np.array([[1.0, 1.0, 5.0, 5.0]]), [0.5], ["thing"]) for _ in range(len(tiles))]


class Plain:
    """A model that is only called."""

    name = "plain"

    def __call__(self, tiles: np.ndarray) -> list[Detections]:
        return one_box_per_tile(tiles)


class Submitting(Plain):
    """A model that can ``submit``, as endpoint adapters do; it logs each submit, result and cancel."""

    name = "submitting"

    def __init__(self, failing_batch: int | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.failing_batch = failing_batch

    def __call__(self, tiles: np.ndarray) -> list[Detections]:
        raise AssertionError("a model that can submit is not called")

    def submit(self, tiles: np.ndarray) -> "Handle":
        index = sum(event == "submit" for event, _ in self.log)
        self.log.append(("submit", index))
        return Handle(self, index, len(tiles))


class Handle:
    """One submitted batch of ``Submitting``."""

    def __init__(self, model: Submitting, index: int, count: int) -> None:
        self.model, self.index, self.count = model, index, count

    def result(self) -> list[Detections]:
        self.model.log.append(("result", self.index))
        if self.index == self.model.failing_batch:
            raise RuntimeError("the endpoint went away")
        return one_box_per_tile(np.empty((self.count, 1, 1, 1)))

    def cancel(self) -> None:
        self.model.log.append(("cancel", self.index))


def region() -> tuple[np.ndarray, TileGrid, RegionTask]:
    """Eight 64² tiles (two rows of four) in one region, no overlap."""
    return np.zeros((1, 128, 256), np.uint8), tile_grid(256, 128, 64, 0, 256), RegionTask(0, 0)


def test_a_model_that_can_submit_gets_every_batch_before_the_first_result_is_awaited():
    block, grid, task = region()
    model, metrics = Submitting(), Metrics()
    found, failed = run_tiles(block, grid, task, model, 2, metrics)
    expected, _ = run_tiles(block, grid, task, Plain(), 2)
    assert [event for event, _ in model.log[:4]] == ["submit"] * 4
    assert [e for e in model.log if e[0] == "result"] == [("result", i) for i in range(4)]  # collected in order
    assert not failed and np.array_equal(found.boxes, expected.boxes) and len(found) == 8
    np.testing.assert_array_equal(found.tile_ids, expected.tile_ids)
    assert metrics.by_operation()[Operation.TILE_PROCESSING.value].invocations == 8


def test_each_tile_row_goes_to_the_model_as_soon_as_its_rows_are_read():
    block, grid, task = region()
    model, events = Submitting(), []

    def read(start: int, stop: int, out: np.ndarray) -> None:
        events.append(("read", start, stop))
        out[...] = block[:, start:stop]

    original_submit = model.submit
    model.submit = lambda tiles: events.append(("submit",)) or original_submit(tiles)
    pixels = RegionPixels(np.empty_like(block), read)
    found, _ = run_tiles(pixels, grid, task, model, 4, on_submitted=lambda: events.append(("submitted",)))
    assert events == [("read", 0, 64), ("submit",), ("read", 64, 128), ("submit",), ("submitted",)]
    assert [e for e, _ in model.log].index("result") == 2  # results are awaited only after the last submit
    assert len(found) == 8


def test_after_a_failed_batch_the_calls_not_begun_are_cancelled():
    block, grid, task = region()
    model = Submitting(failing_batch=1)
    with pytest.raises(ModelError, match="submitting.*the endpoint went away"):
        run_tiles(block, grid, task, model, 2)
    assert {("cancel", i) for i in range(4)} <= set(model.log)
