"""Calls to one endpoint from one process: long-lived threads that keep an in-flight lease while they have work.

Every tile an endpoint model is given, from whatever batch or task, is queued here and served by ``threads``
threads that are made once and kept, so no batch pays for a pool of its own and the calls of the next batch start
while the last ones of this batch finish. A call needs a lease of the model's limiter: a ``distributed.Semaphore``
kept by the scheduler on a Dask worker, a ``threading.BoundedSemaphore`` elsewhere, or none. A thread takes one
lease when it starts a busy spell and keeps it from call to call while work is queued, so a cluster-wide limit costs
two scheduler round trips per busy spell instead of per tile. It gives the lease back before a retry's back-off and
after ``LINGER_S`` without work, so an idle process does not sit on the cluster's leases. Each thread holds at most
one lease and makes one call at a time: calls in flight never outnumber leases held, so the limit still holds.

At most ``queued`` calls wait for a thread: ``submit`` blocks past that. That is the back-pressure that lets a region
task hand its tiles over as it reads them and then wait outside its worker's thread pool (:mod:`mr.tasks`): the
next region is read only as fast as the endpoint takes tiles, so a worker holds a few regions, not all of them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

LINGER_S = 0.005
"""Seconds a thread keeps its lease while no work is queued: covers the gap between the batches of a caller that
waits for each, yet hands an idle lease to another worker soon (not the ~50 ms a task spends reading its next region:
a lease held idle through that stalls the other workers)."""


def queued_calls(threads: int) -> int:
    """How many calls may wait for one of ``threads`` threads: two tile rows of a 4096-pixel region at 512-pixel
    tiles, so the endpoint does not wait while its caller reads the next strip, and at least two per thread."""
    return max(2 * threads, 16)


class Lease:
    """One thread's lease of a limiter: taken before a call, kept across calls, given back when idle or backing off."""

    def __init__(self, limiter: Any) -> None:
        self.limiter = limiter
        self.held = False

    def take(self) -> None:
        """Hold a lease (waits for one unless already held; no-op without a limiter)."""
        if self.limiter is not None and not self.held:
            self.limiter.acquire()
            self.held = True

    def give_back(self) -> None:
        """Release the lease if held."""
        if self.held:
            self.held = False
            self.limiter.release()


class Pending(Generic[T]):
    """The started calls of one batch: ``result()`` waits for them in order; ``cancel()`` drops those not begun."""

    def __init__(self, futures: list[Future]) -> None:
        self.futures = futures

    def result(self) -> list[T]:
        """Each call's result in submission order (re-raises a call's exception)."""
        return [future.result() for future in self.futures]

    def cancel(self) -> None:
        """Cancel the calls still queued (those running finish)."""
        for future in self.futures:
            future.cancel()


class CallPool:
    """``threads`` daemon threads serving work for one endpoint and limiter in this process, FIFO."""

    def __init__(
        self, threads: int, limiter: Any, name: str, linger: float = LINGER_S, queued: int | None = None
    ) -> None:
        self.threads = threads
        self.limiter = limiter
        self.name = name
        self.linger = linger
        self.queued = queued if queued is not None else queued_calls(threads)
        self._fresh()

    def _fresh(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._room = threading.Semaphore(self.queued)
        self._lock = threading.Lock()
        self._started: list[threading.Thread] = []
        self._pid = os.getpid()

    def submit(self, work: Callable[[Lease], T]) -> Future:
        """Queue ``work(lease)``, where ``lease`` is the serving thread's: a future of its result. Waits while
        ``queued`` calls are already waiting for a thread."""
        future: Future = Future()
        if self._pid != os.getpid():  # a forked child has none of its parent's threads: start afresh
            self._fresh()
        self._room.acquire()
        self._queue.put((future, work))
        with self._lock:
            while len(self._started) < self.threads:  # all at once, on first use: idle threads cost nothing
                thread = threading.Thread(target=self._serve, name=f"{self.name}-{len(self._started)}", daemon=True)
                thread.start()
                self._started.append(thread)
        return future

    def _serve(self) -> None:
        """Run queued work forever; keep the lease across work, give it back after ``linger`` seconds idle."""
        lease = Lease(self.limiter)
        while True:
            try:
                future, work = self._queue.get(timeout=self.linger if lease.held else None)
            except queue.Empty:
                try:
                    lease.give_back()
                except Exception:  # a scheduler gone away: the lease lapses there; this thread must live on
                    log.warning("%s: could not give an in-flight lease back", self.name, exc_info=True)
                continue
            self._room.release()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(work(lease))
            except BaseException as error:  # the caller sees it through the future
                future.set_exception(error)
            del future, work
