"""The stuck-job sweeper: a job whose every message was lost is found by its age without progress and failed.

A job records progress in ``updated_at`` on every write while it runs (status changes, regions, the listener's
keepalive through ``touch_job``). When a request's message is lost for good (dead-lettered, expired, deleted by
hand) no listener will ever finish its job; the sweeper fails such a job with its reason and announces it, so that
whoever waits on the job learns of it. Each failure is a write conditional on ``updated_at`` being the value the
sweeper read, so two sweepers at once fail a job once, and a job that moved on in between (progress, or finished)
is left alone.

    from mr.sweeper import sweep_stuck_jobs
    failed = sweep_stuck_jobs(store, notifier, stuck_after_s=3600)
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone

from mr.errors import InvalidInputError
from mr.state.base import JobRecord, StateStore, utc_text
from mr.state.notices import NoticeError, Notifier

log = logging.getLogger("mr.sweeper")

SWEEP_LIMIT = 1000
"""Jobs failed by one sweep at most; the next sweep takes the rest."""


def sweep_stuck_jobs(
    store: StateStore, notifier: Notifier | None, stuck_after_s: float, now: float | None = None,
    limit: int = SWEEP_LIMIT,
) -> list[JobRecord]:
    """Fail every unfinished job without progress for ``stuck_after_s`` seconds; return the jobs this sweep failed.

    ``now`` (POSIX seconds) defaults to the clock. A notice goes out for each job failed here; a notice that cannot
    be published is logged, and the sweep goes on (the job's record holds the reason either way).
    """
    now = time.time() if now is None else float(now)
    cutoff = utc_text(now - check_stuck_after(stuck_after_s))
    failed = []
    for job in store.stalled_jobs(cutoff, limit=limit):
        record = store.fail_stalled_job(job.job_id, job.updated_at, stuck_reason(job, stuck_after_s, now))
        if record is None:
            continue  # progress, a finish or another sweeper got there first
        log.warning("job %s failed by the sweeper: %s", record.job_id, record.message)
        _announce(notifier, record)
        failed.append(record)
    return failed


def stuck_reason(job: JobRecord, stuck_after_s: float, now: float) -> str:
    """Why the sweeper failed ``job``: how long without progress, since when, in which status, and what to do."""
    last = datetime.fromisoformat(job.updated_at).astimezone(timezone.utc)
    idle = max(0.0, now - last.timestamp())
    return (f"no progress for {idle:.0f} s (last progress {last:%Y-%m-%dT%H:%M:%SZ}, status {job.status.value}; "
            f"limit {stuck_after_s:g} s): its request was lost; send it again under a new jobId to run it")


def check_stuck_after(value: float) -> float:
    """Seconds without progress after which a job is stuck: a finite number > 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise InvalidInputError("stuck-after", value, "give seconds > 0, e.g. 3600 (mr.service.stuck-after)")
    return seconds


def _announce(notifier: Notifier | None, record: JobRecord) -> None:
    """The job's FAILED notice; a failure to publish is logged, not raised: the record already holds the reason."""
    if notifier is None:
        return
    try:
        notifier.job_status(record, record.message)
    except NoticeError as error:
        log.warning("job %s: its FAILED notice was not published: %s", record.job_id, error)
