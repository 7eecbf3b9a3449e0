"""Status notices in OversightML's format, published to SNS or written to the log.

OSML's status monitors (``aws/osml/model_runner/status/image_status_monitor.py`` and
``region_status_monitor.py``, with ``status_message.py``) publish the text
``"StatusMonitor update: {status} {job_id}: {message}"`` with string message attributes ``status``, ``job_id``,
``image_status`` (job notices only), ``image_id``, ``region_id`` (region notices only), ``processing_duration``
(whole seconds) and ``failed_tiles`` (region notices only). Like OSML, an attribute whose value is empty or zero is
left out, and ``failed_tiles`` is written as Python's text of ``[{"1": [[row, col], [width, height]]}, …]``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from typing import Any, Protocol, runtime_checkable

from mr.errors import InvalidInputError, MrError
from mr.redact import redact
from mr.state.base import JobRecord, JobStatus, RegionRecord

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9_-]{1,256}(\.fifo)?$")


class NoticeError(MrError):
    """A status notice that could not be published; the cause is chained."""


@runtime_checkable
class Notifier(Protocol):
    """Where job and region status notices go."""

    def job_status(self, record: JobRecord, message: str | None = None) -> None:
        """Announce a job's status; ``message`` defaults to the record's message or a short progress line."""

    def region_status(self, record: RegionRecord, message: str | None = None) -> None:
        """Announce a region's status."""


def notice_text(status: JobStatus | str, job_id: str, message: str) -> str:
    return redact(f"StatusMonitor update: {JobStatus.parse(status).value} {job_id}: {message}")


def job_attributes(record: JobRecord) -> dict[str, str]:
    """OSML's message attributes for an image (job) notice."""
    return _present({
        "status": record.status.value,
        "job_id": record.job_id,
        "image_status": record.status.value,
        "image_id": record.image_id,
        "processing_duration": _whole_seconds(record.processing_seconds),
    })


def region_attributes(record: RegionRecord) -> dict[str, str]:
    """OSML's message attributes for a region notice."""
    return _present({
        "status": record.status.value,
        "job_id": record.job_id,
        "image_id": record.image_id,
        "region_id": record.region_id,
        "processing_duration": _whole_seconds(record.seconds),
        "failed_tiles": format_failed_tiles(record.failed_tiles),
    })


def format_failed_tiles(failed_tiles: list[dict]) -> str:
    """OSML's text for failed tiles: each tile's bounds as integer pairs, numbered from 1."""
    tiles = [_int_pairs(tile.get("bounds", [])) for tile in failed_tiles]
    return str([{f"{i + 1}": tile} for i, tile in enumerate(tiles)]) if tiles else ""


def job_message(record: JobRecord) -> str:
    if record.message:
        return record.message
    regions = f"{record.regions_done}/{record.region_count}" if record.region_count is not None else record.regions_done
    return f"{regions} regions done, {len(record.failed_tiles)} tiles failed"


def region_message(record: RegionRecord) -> str:
    if record.message:
        return record.message
    return f"region {record.region_id}: {record.tiles} tiles, {len(record.failed_tiles)} failed"


class LogNotifier:
    """Notices as log records (the embedded mode): the OSML text, then the attributes as JSON.

    Each record also carries the attributes as ``record.notice`` for handlers that ship structured logs.
    """

    def __init__(self, logger: str | logging.Logger = "mr.state.notices", level: int = logging.INFO) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level

    def __reduce__(self):
        return (LogNotifier, (self.logger.name, self.level))

    def job_status(self, record: JobRecord, message: str | None = None) -> None:
        self._log(notice_text(record.status, record.job_id, message or job_message(record)), job_attributes(record))

    def region_status(self, record: RegionRecord, message: str | None = None) -> None:
        text = notice_text(record.status, record.job_id, message or region_message(record))
        self._log(text, region_attributes(record))

    def _log(self, text: str, attributes: dict[str, str]) -> None:
        self.logger.log(self.level, "%s %s", text, json.dumps(attributes, sort_keys=True),
                        extra={"notice": attributes})


class SnsNotifier:
    """Notices published to an SNS topic, given by ARN or by name (the ARN is then built for this account)."""

    def __init__(self, topic: str, *, endpoint_url: str | None = None, region_name: str | None = None) -> None:
        if not isinstance(topic, str) or not (_is_sns_arn(topic) or _TOPIC_NAME.match(topic)):
            raise InvalidInputError("topic", topic, "give an SNS topic name or arn:aws:sns:REGION:ACCOUNT:NAME")
        self.topic = topic
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self._lock = threading.Lock()
        self._held: tuple[Any, str, int] | None = None

    def __reduce__(self):
        return (_sns_notifier, (self.topic, self.endpoint_url, self.region_name))

    def __repr__(self) -> str:
        return f"SnsNotifier({self.topic!r})"

    def job_status(self, record: JobRecord, message: str | None = None) -> None:
        self.publish(notice_text(record.status, record.job_id, message or job_message(record)), job_attributes(record))

    def region_status(self, record: RegionRecord, message: str | None = None) -> None:
        text = notice_text(record.status, record.job_id, message or region_message(record))
        self.publish(text, region_attributes(record))

    @property
    def topic_arn(self) -> str:
        return self._connection()[1]

    def publish(self, text: str, attributes: dict[str, str]) -> str:
        """Publish one notice with string attributes, as OSML's SNSHelper does; returns the message id."""
        client, arn = self._connection()
        typed = {name: {"DataType": "String", "StringValue": value} for name, value in attributes.items()}
        try:
            return client.publish(TopicArn=arn, Message=text, MessageAttributes=typed)["MessageId"]
        except Exception as e:
            raise NoticeError(f"cannot publish to SNS topic {arn}: {e}") from e

    def _connection(self) -> tuple[Any, str]:
        with self._lock:
            if self._held is None or self._held[2] != os.getpid():
                import boto3  # lazily: importing mr.state stays light

                session = boto3.session.Session()
                client = session.client("sns", endpoint_url=self.endpoint_url, region_name=self.region_name)
                arn = self.topic if _is_sns_arn(self.topic) else self._arn_for_name(session, client.meta.region_name)
                self._held = (client, arn, os.getpid())
            return self._held[0], self._held[1]

    def _arn_for_name(self, session, region: str) -> str:
        """The topic's ARN in this account and region; GetCallerIdentity needs no permission."""
        try:
            sts = session.client("sts", endpoint_url=self.endpoint_url, region_name=region)
            account = sts.get_caller_identity()["Account"]
        except Exception as e:
            raise NoticeError(f"cannot find the account of SNS topic {self.topic!r}; give its full ARN: {e}") from e
        partition = session.get_partition_for_region(region)
        return f"arn:{partition}:sns:{region}:{account}:{self.topic}"


def _sns_notifier(topic: str, endpoint_url: str | None, region_name: str | None) -> SnsNotifier:
    return SnsNotifier(topic, endpoint_url=endpoint_url, region_name=region_name)


def _is_sns_arn(text: str) -> bool:
    parts = text.split(":", 5)
    return len(parts) == 6 and parts[0] == "arn" and parts[2] == "sns" and bool(_TOPIC_NAME.match(parts[5]))


def _present(attributes: dict[str, str | None]) -> dict[str, str]:
    return {name: redact(value) for name, value in attributes.items() if value}


def _whole_seconds(seconds: float | None) -> str | None:
    whole = int(seconds or 0)
    return str(whole) if whole else None


def _int_pairs(bounds: Any) -> list[list[int]]:
    """Bounds as OSML writes them, ``[[row, col], [width, height]]``; a flat list of four is paired up."""
    values = list(bounds)
    if values and not isinstance(values[0], (list, tuple)):
        values = [values[i:i + 2] for i in range(0, len(values), 2)]
    return [[int(v) for v in pair] for pair in values]
