"""Job and region state: the records, the status rules and the store protocol that every store shares.

Statuses are OversightML's (``RequestStatus`` in ``aws/osml/model_runner/common/typing.py``). The rules are pure
functions here, so that the SQLite and the DynamoDB store enforce exactly the same ones: a store reads the current
record, asks :func:`job_changes` or :func:`region_changes` what to write, and writes that in one transaction
(SQLite) or in one write conditional on the status it read (DynamoDB).

The rules:

- A job starts STARTED. ``start_job`` of a job that exists (a redelivered request) returns the existing record
  unchanged, whatever its status, except that ``attempts`` goes up by one (and an unfinished job's ``updated_at``
  becomes now); the caller resumes a running job and acknowledges a finished one.
- A finished job (SUCCESS, PARTIAL, FAILED) is final: it never moves back to STARTED or IN_PROGRESS, nor to another
  finished status. Writing its own status again is allowed and changes only the other fields given.
- A region whose output is kept (SUCCESS, PARTIAL: "done") is final in the same way. A FAILED region may be marked
  again: a redelivered request retries it while its job still runs.
- ``regions_done`` is kept by the store: it counts the job's regions that became done, each once.
- ``updated_at`` is the job's last sign of progress: every write to an unfinished job sets it (``update_job``,
  ``mark_region`` of any of its regions, ``touch_job`` from the listener's keepalive, and ``start_job`` of a
  redelivered request). A job whose ``updated_at`` grows old while it is unfinished lost its request: the sweeper
  (:mod:`mr.sweeper`) finds it with ``stalled_jobs`` and fails it with ``fail_stalled_job``, a write conditional on
  ``updated_at`` being unchanged, so a job that made progress meanwhile is never failed.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from decimal import Decimal
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from mr.errors import InvalidInputError, MrError
from mr.redact import redact


class JobStatus(str, Enum):
    """OversightML's request statuses; the value is the name, as OSML writes it."""

    STARTED = "STARTED"
    IN_PROGRESS = "IN_PROGRESS"
    PARTIAL = "PARTIAL"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """Nothing will run for this job or region any more."""
        return self in (JobStatus.SUCCESS, JobStatus.PARTIAL, JobStatus.FAILED)

    @property
    def done(self) -> bool:
        """Finished with its output kept: a resumed request skips a region in this status."""
        return self in (JobStatus.SUCCESS, JobStatus.PARTIAL)

    @classmethod
    def parse(cls, value: JobStatus | str, field_name: str = "status") -> JobStatus:
        if isinstance(value, JobStatus):
            return value
        try:
            return cls(str(value).strip().upper())
        except ValueError:
            allowed = ", ".join(member.value for member in cls)
            raise InvalidInputError(field_name, value, f"allowed: {allowed}") from None


class StateError(MrError):
    """A state store that could not be read or written; the cause is chained."""


class UnknownJobError(StateError):
    """A job id the store has no record of: call ``start_job`` first."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job {job_id!r} in the state store: start_job() records it first")


class StatusTransitionError(StateError):
    """A status change the rules refuse, e.g. a finished job moved back to running."""


def utc_now() -> str:
    """Now, as UTC ISO 8601 with microseconds (sorts as text in the order of time)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def utc_text(seconds: float) -> str:
    """A POSIX time as :func:`utc_now` writes times, so that it compares with stored times as text."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds")


def seconds_between(start: str, end: str) -> float:
    return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


@dataclass(frozen=True)
class JobRecord:
    """One image request as the job table holds it."""

    job_id: str
    image_id: str
    """OSML's image id, usually ``"<jobId>:<imageUrl>"``."""
    image_url: str
    status: JobStatus
    request: str = ""
    """The original request message, as JSON text."""
    message: str | None = None
    """Why the job has its status (the reason of a failure, a short summary of a success)."""
    region_count: int | None = None
    regions_done: int = 0
    """Regions that finished with their output kept (SUCCESS or PARTIAL); kept by ``mark_region``."""
    tile_count: int | None = None
    failed_tiles: list[dict] = field(default_factory=list)
    """One dict per tile that failed: ``{"region": "r0-c1", "bounds": [[row, col], [width, height]], "reason": …}``."""
    feature_count: int | None = None
    width: int | None = None
    height: int | None = None
    extents: tuple[float, float, float, float] | None = None
    """WGS84 bounding box (min lon, min lat, max lon, max lat), or None when the image is not georeferenced."""
    started_at: str = ""
    updated_at: str = ""
    finished_at: str | None = None
    processing_seconds: float | None = None
    """From ``started_at`` to the last update while running, to ``finished_at`` once finished."""
    outputs: list[str] = field(default_factory=list)
    """Locations the results were written to."""
    summary: dict = field(default_factory=dict)
    """Free JSON-like details (timings, model, tiling) for people and dashboards."""
    attempts: int = 1
    """How many times ``start_job`` saw this job: more than one means the request was redelivered."""

    @property
    def finished(self) -> bool:
        return self.status.finished

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-like values (the status as its string, extents as a list)."""
        data = asdict(self)
        data["status"] = self.status.value
        data["extents"] = list(self.extents) if self.extents is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        """The inverse of :meth:`to_dict`; keys it does not know are ignored, missing ones take their defaults."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        values["status"] = JobStatus.parse(values["status"])
        if "extents" in values:
            values["extents"] = tuple(float(v) for v in values["extents"])
        if "processing_seconds" in values:
            values["processing_seconds"] = float(values["processing_seconds"])
        return cls(**values)


@dataclass(frozen=True)
class RegionRecord:
    """One region of a job (a Dask block of many tiles) as the region table holds it."""

    job_id: str
    region_id: str
    """Grid position of the region, e.g. ``"r3-c5"`` (row 3, column 5)."""
    status: JobStatus
    image_id: str | None = None
    """The job's image id, copied so that a region notice carries it as OSML's does."""
    tiles: int | None = None
    failed_tiles: list[dict] = field(default_factory=list)
    features: int | None = None
    seconds: float | None = None
    message: str | None = None
    updated_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegionRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known and v is not None}
        values["status"] = JobStatus.parse(values["status"])
        if "seconds" in values:
            values["seconds"] = float(values["seconds"])
        return cls(**values)


@runtime_checkable
class StateStore(Protocol):
    """Where job and region state lives; every method is one short transaction, safe from threads and processes."""

    def start_job(self, job_id: str, image_id: str, image_url: str, request_text: str, **fields: Any) -> JobRecord:
        """Record a new job as STARTED with ``fields``, or return the existing record (``attempts`` + 1)."""

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        """Change some fields (status included, under the rules above) and return the new record."""

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(self, status: JobStatus | str | None = None, limit: int = 100) -> list[JobRecord]:
        """The most recently started jobs first, optionally only those in one status."""

    def mark_region(self, job_id: str, region_id: str, status: JobStatus | str, **fields: Any) -> RegionRecord:
        """Record a region's status and details (tiles, failed_tiles, features, seconds, message)."""

    def regions(self, job_id: str) -> list[RegionRecord]:
        """The job's regions in grid order (``r2-c10`` after ``r2-c9``)."""

    def done_regions(self, job_id: str) -> set[str]:
        """Ids of the regions that a resumed request does not need to run again."""

    def touch_job(self, job_id: str) -> JobRecord:
        """Set an unfinished job's ``updated_at`` to now (a sign of progress) and return the record; a finished
        job is returned unchanged."""

    def stalled_jobs(self, updated_before: str, limit: int = 100) -> list[JobRecord]:
        """Unfinished jobs whose ``updated_at`` is before ``updated_before`` (UTC ISO 8601), oldest first."""

    def fail_stalled_job(self, job_id: str, updated_at: str, reason: str) -> JobRecord | None:
        """Mark a job FAILED with ``reason`` if it is unfinished and its ``updated_at`` is still ``updated_at``;
        the new record, or None when the job finished or made progress meanwhile."""

    def close(self) -> None: ...


# --- field validation, shared by both stores -------------------------------------------------------------------

_COUNTS = ("region_count", "tile_count", "feature_count", "width", "height", "tiles", "features")
_DURATIONS = ("processing_seconds", "seconds")
JOB_UPDATE_FIELDS = frozenset(
    {"status", "message", "region_count", "tile_count", "failed_tiles", "feature_count", "width", "height",
     "extents", "outputs", "summary", "processing_seconds"}
)
JOB_START_FIELDS = JOB_UPDATE_FIELDS - {"status", "processing_seconds"}
REGION_FIELDS = frozenset({"tiles", "failed_tiles", "features", "seconds", "message"})


def clean_fields(fields_: dict[str, Any], allowed: frozenset[str], what: str) -> dict[str, Any]:
    """Check names and types of the fields a caller gives and return them as plain values."""
    for name, value in fields_.items():
        if name not in allowed:
            hint = " (mark_region keeps it)" if name == "regions_done" else ""
            raise InvalidInputError(name, value, f"not a field {what} sets{hint}; known: {', '.join(sorted(allowed))}")
    return {name: _clean(name, value) for name, value in fields_.items()}


def redacted(value: Any) -> Any:
    """Every string in a JSON-like value with its credentials masked (mr.redact): none may reach a record."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v) for v in value]
    return value


def _clean(name: str, value: Any) -> Any:
    if name == "status":
        return JobStatus.parse(value)
    if value is None:
        return [] if name in ("failed_tiles", "outputs") else {} if name == "summary" else None
    if name in _COUNTS:
        return _count(name, value)
    if name in _DURATIONS:
        return _duration(name, value)
    if name == "message":
        return redact(str(value))
    if name == "extents":
        return _extents(value)
    if name == "outputs":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidInputError(name, value, "give a list of locations (strings), e.g. ['s3://bucket/out.geojson']")
        return list(value)
    if name == "failed_tiles" and (not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value)):
        raise InvalidInputError(name, value, "give a list of dicts: {'region', 'bounds', 'reason'}")
    if name == "summary" and not isinstance(value, dict):
        raise InvalidInputError(name, value, "give a dict")
    return redacted(plain(value, name))


def _count(name: str, value: Any) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidInputError(name, value, "give a whole number") from None
    if isinstance(value, bool) or number < 0:
        raise InvalidInputError(name, value, "give a whole number >= 0")
    return number


def _duration(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(name, value, "give seconds as a number") from None
    if not math.isfinite(number) or number < 0:
        raise InvalidInputError(name, value, "give seconds as a finite number >= 0")
    return number


def _extents(value: Any) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise InvalidInputError("extents", value, "give (min_lon, min_lat, max_lon, max_lat) in WGS84, or None")
    return box  # type: ignore[return-value]


def plain(value: Any, name: str = "value") -> Any:
    """JSON-like Python values: numpy values unwrapped, tuples as lists, Decimals as int or float, NaN as None.

    Non-finite floats become None because neither JSON nor DynamoDB can hold them, and a status update must not
    fail over one odd number in a summary.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {str(k): plain(v, name) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, name) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return plain(value.tolist(), name)
    raise InvalidInputError(name, value, "give JSON-like values (str, numbers, bool, None, lists, dicts)")


def check_id(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(name, value, "give a non-empty string")
    return value


def check_limit(limit: Any) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidInputError("limit", limit, "give a whole number >= 1")
    return limit


# --- the status rules ------------------------------------------------------------------------------------------

def new_job(job_id: str, image_id: str, image_url: str, request_text: str, fields_: dict[str, Any]) -> JobRecord:
    """The record ``start_job`` writes for a job it has not seen."""
    for name, value in (("job_id", job_id), ("image_id", image_id), ("image_url", image_url)):
        check_id(name, value)
    if not isinstance(request_text, str):
        raise InvalidInputError("request_text", request_text, "give the request message as JSON text")
    now = utc_now()
    values = clean_fields(fields_, JOB_START_FIELDS, "start_job")
    return JobRecord(job_id=job_id, image_id=redact(image_id), image_url=redact(image_url), status=JobStatus.STARTED,
                     request=redact(request_text), started_at=now, updated_at=now, processing_seconds=0.0, **values)


def check_same_image(existing: JobRecord, image_url: str) -> None:
    """A job id names one request: a second start with another image is a mistake, not a redelivery."""
    if existing.image_url != redact(image_url):
        raise InvalidInputError(
            "job_id", existing.job_id,
            f"already recorded for image {existing.image_url!r}, not {redact(image_url)!r}; give each request its own"
            " jobId",
        )


def job_changes(current: JobRecord, fields_: dict[str, Any], now: str) -> dict[str, Any]:
    """What an update writes: the fields given, ``updated_at``, and the finish time and duration when they follow."""
    status = fields_.get("status", current.status)
    if status != current.status and current.status.finished:
        raise StatusTransitionError(
            f"job {current.job_id!r} finished as {current.status} at {current.finished_at}; it cannot become {status}."
            " A finished job is final: send the request again under a new jobId to run it again"
        )
    changes = dict(fields_, updated_at=now)
    if status.finished and not current.status.finished:
        changes["finished_at"] = now
    if not current.status.finished and "processing_seconds" not in fields_:
        changes["processing_seconds"] = seconds_between(current.started_at, now)
    return changes


def stalled(job: JobRecord, updated_at: str) -> bool:
    """Whether a sweeper that read ``updated_at`` may still fail ``job``: unfinished, and no progress since."""
    return not job.status.finished and job.updated_at == updated_at


def stalled_changes(job: JobRecord, reason: str, now: str) -> dict[str, Any]:
    """What failing a stalled job writes: FAILED, the reason, and the finish time (through :func:`job_changes`)."""
    return job_changes(job, {"status": JobStatus.FAILED, "message": str(reason)}, now)


def region_changes(
    job_id: str, region_id: str, current: RegionRecord | None, status: JobStatus, fields_: dict[str, Any], now: str
) -> tuple[dict[str, Any], bool]:
    """What marking a region writes, and whether the region has just become done (so ``regions_done`` grows)."""
    if current is not None and current.status.done and status != current.status:
        raise StatusTransitionError(
            f"region {region_id!r} of job {job_id!r} is done ({current.status}); it cannot become {status}."
            " Its output is kept: skip the regions that done_regions() returns"
        )
    newly_done = status.done and not (current is not None and current.status.done)
    return dict(fields_, status=status, updated_at=now), newly_done


def region_sort_key(region_id: str) -> tuple:
    """Grid order for ids such as ``r2-c10``: numbers compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", region_id))
