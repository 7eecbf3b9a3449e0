"""Service settings, resolved once: where requests come from, where state goes, and how much runs at once.

Defaults come from ``mr.service.*`` in ``config/mr.yaml`` (``DASK_MR__SERVICE__…``); OversightML's environment
variables are honoured too, so an existing deployment can swap its container: IMAGE_QUEUE, JOB_TABLE,
IMAGE_STATUS_TOPIC, WORKERS, REGION_SIZE. With nothing configured, embedded mode keeps the queue and the state in
one SQLite file under the data directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mr import config
from mr.errors import InvalidInputError


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the listener and the ``submit``/``status`` commands need."""

    queue: str
    """``sqlite:///PATH``, an SQS queue URL or ``sqs://NAME``."""
    store: str
    """``sqlite:///PATH`` or ``dynamodb://TABLE-PREFIX``."""
    notices: str | None
    """``sns://TOPIC`` or an SNS ARN; None logs the notices."""
    work_dir: str
    """Where finished regions are checkpointed between deliveries of a request."""
    max_in_flight: int
    """Requests processed at once."""
    visibility_timeout: float
    """Seconds a received message stays leased; extended while its request runs."""
    poll_seconds: float
    """Long-polling wait of one receive."""
    stuck_after: float = 3600.0
    """Seconds without progress after which an unfinished job is failed as lost by the sweeper (mr.sweeper)."""
    sweep_every: float = 300.0
    """Seconds between two sweeps for stuck jobs in the listener; 0 sweeps never (run ``python -m mr sweep``)."""


def _oversightml_queue() -> str | None:
    name = os.environ.get("IMAGE_QUEUE")
    if not name:
        return None
    return name if "://" in name else f"sqs://{name}"


def _oversightml_store() -> str | None:
    table = os.environ.get("JOB_TABLE")
    return f"dynamodb://{table}" if table else None


def _oversightml_topic() -> str | None:
    topic = os.environ.get("IMAGE_STATUS_TOPIC")
    if not topic:
        return None
    return topic if topic.startswith(("sns://", "arn:")) else f"sns://{topic}"


def resolve_service(
    queue: str | None = None,
    store: str | None = None,
    notices: str | None = None,
    data_dir: str | None = None,
    max_in_flight: int | None = None,
) -> ServiceSettings:
    """Arguments first, then ``mr.service.*``, then OversightML's variables, then embedded SQLite defaults."""
    folder = Path(os.path.expanduser(str(config.get("service.data-dir", data_dir)))).resolve()
    embedded = f"sqlite:///{folder / 'mr.db'}"
    workers = os.environ.get("WORKERS")
    return ServiceSettings(
        queue=queue or config.get("service.queue") or _oversightml_queue() or embedded,
        store=store or config.get("service.store") or _oversightml_store() or embedded,
        notices=notices or config.get("service.notices") or _oversightml_topic(),
        work_dir=str(config.get("service.work-dir") or folder / "work"),
        max_in_flight=int(max_in_flight or config.get("service.max-in-flight") or workers or 2),
        visibility_timeout=float(config.get("service.visibility-timeout")),
        poll_seconds=float(config.get("service.poll-seconds")),
        **resolve_sweep(),
    )


def resolve_sweep(stuck_after: float | None = None) -> dict[str, float]:
    """``stuck_after`` and ``sweep_every`` from ``mr.service.*``, checked against the visibility timeout.

    The listener marks a running job's progress at each keepalive, every third of the visibility timeout; a limit
    under the visibility timeout would fail jobs that are still being worked on.
    """
    from mr.sweeper import check_stuck_after

    seconds = check_stuck_after(config.get("service.stuck-after", stuck_after))
    visibility = float(config.get("service.visibility-timeout"))
    if seconds <= visibility:
        raise InvalidInputError("stuck-after", seconds, f"give more seconds than the visibility timeout "
                                                        f"({visibility:g} s), e.g. {max(3600.0, 10 * visibility):g}")
    every = float(config.get("service.sweep-every") or 0)
    if every < 0:
        raise InvalidInputError("sweep-every", every, "give seconds >= 0 (0 turns the listener's sweeps off)")
    return {"stuck_after": seconds, "sweep_every": every}
