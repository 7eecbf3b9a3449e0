"""Job and region state, and status notices: an embedded and an AWS implementation of each, chosen by URL.

    store = open_store("sqlite:///var/lib/mr/state.db")      # or "dynamodb://mr-prod"
    notify = open_notifier("sns://mr-status")                 # or an SNS ARN, or None / "log"
    job = store.start_job(job_id, image_id, image_url, request_text)
    ...
    notify.job_status(store.update_job(job_id, status="SUCCESS"))
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from mr.errors import InvalidInputError
from mr.state.base import (
    JobRecord,
    JobStatus,
    RegionRecord,
    StateError,
    StateStore,
    StatusTransitionError,
    UnknownJobError,
)
from mr.state.dynamodb import DynamoStore
from mr.state.notices import LogNotifier, NoticeError, Notifier, SnsNotifier
from mr.state.sqlite import SqliteStore

__all__ = [
    "DynamoStore", "JobRecord", "JobStatus", "LogNotifier", "NoticeError", "Notifier", "RegionRecord",
    "SnsNotifier", "SqliteStore", "StateError", "StateStore", "StatusTransitionError", "UnknownJobError",
    "open_notifier", "open_store",
]

STORE_FORMS = (
    "sqlite:///ABS/PATH.db (embedded, one file), "
    "dynamodb://TABLE-PREFIX[?create=true] (tables TABLE-PREFIX-jobs and TABLE-PREFIX-regions)"
)
NOTICE_FORMS = "sns://TOPIC-NAME, sns://TOPIC-ARN, an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME), 'log' or None"


def open_store(url: str) -> StateStore:
    """The state store a URL names: ``sqlite:///ABS/PATH.db`` or ``dynamodb://TABLE-PREFIX[?create=true]``."""
    if not isinstance(url, str):
        raise InvalidInputError("store", url, f"accepted: {STORE_FORMS}")
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/") or path.strip("/") == "":
            raise InvalidInputError("store", url, "give an absolute file path, e.g. sqlite:///var/lib/mr/state.db")
        return SqliteStore("/" + path.lstrip("/"))
    if url.startswith("dynamodb://"):
        return _dynamo_store(url)
    raise InvalidInputError("store", url, f"accepted: {STORE_FORMS}")


def _dynamo_store(url: str) -> DynamoStore:
    parts = urlsplit(url)
    options = parse_qs(parts.query)
    unknown = set(options) - {"create"}
    if parts.path not in ("", "/") or unknown or not parts.netloc:
        raise InvalidInputError("store", url, f"accepted: {STORE_FORMS}")
    create = options.get("create", ["false"])[-1].lower()
    if create not in ("true", "false", "1", "0", "yes", "no"):
        raise InvalidInputError("store", url, "create must be true or false")
    try:
        return DynamoStore(parts.netloc, create=create in ("true", "1", "yes"))
    except InvalidInputError as e:
        raise InvalidInputError("store", url, f"bad table prefix: {e.reason}; accepted: {STORE_FORMS}") from None


def open_notifier(url: str | None = None) -> Notifier:
    """Where notices go: ``sns://TOPIC-NAME-or-ARN`` or an SNS ARN publish to SNS; None or ``"log"`` logs them."""
    if url is None or (isinstance(url, str) and url.strip().lower() in ("", "log")):
        return LogNotifier()
    if isinstance(url, str):
        topic = url[len("sns://"):] if url.startswith("sns://") else url if url.startswith("arn:") else None
        if topic:
            try:
                return SnsNotifier(topic)
            except InvalidInputError as e:
                raise InvalidInputError("notices", url, f"{e.reason}; accepted: {NOTICE_FORMS}") from None
    raise InvalidInputError("notices", url, f"accepted: {NOTICE_FORMS}")
