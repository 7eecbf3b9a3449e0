"""Request queues: an embedded SQLite queue and SQS behind one protocol, opened from a URL.

Accepted URLs (config key ``mr.service.queue``):

* ``sqlite:///ABS/PATH.db`` or ``sqlite:///ABS/PATH.db?name=NAME`` — the embedded queue (default name
  ``requests``);
* ``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`` or any other http(s) SQS queue URL (moto, LocalStack);
* ``sqs://NAME`` — an SQS queue by name, resolved with GetQueueUrl on first use.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from mr.errors import InvalidInputError
from mr.queues.base import Message, QueueError, RequestQueue, StaleReceiptError
from mr.queues.sqlite import SqliteQueue
from mr.queues.sqs import SqsQueue, ensure_queue

__all__ = [
    "Message", "QueueError", "RequestQueue", "SqliteQueue", "SqsQueue", "StaleReceiptError", "ensure_queue",
    "open_queue",
]

ACCEPTED = (
    "sqlite:///ABS/PATH.db[?name=NAME], https://sqs.REGION.amazonaws.com/ACCOUNT/NAME (or another http(s) SQS "
    "queue URL), sqs://NAME"
)


def open_queue(url: str, **options: Any) -> RequestQueue:
    """The queue a URL names; ``options`` (visibility_timeout, max_receives) go to its constructor."""
    if not isinstance(url, str):
        raise InvalidInputError("queue", url, f"must be a URL, one of: {ACCEPTED}")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        return _open_sqlite(url, options)
    if scheme in ("http", "https"):
        return SqsQueue(url, **options)
    if scheme == "sqs":
        parts = urlsplit(url)
        if parts.path.strip("/") or parts.query or not parts.netloc:
            raise InvalidInputError("queue", url, "an SQS queue by name is sqs://NAME")
        return SqsQueue(parts.netloc, **options)
    raise InvalidInputError("queue", url, f"unsupported queue URL; accepted forms: {ACCEPTED}")


def _open_sqlite(url: str, options: dict) -> SqliteQueue:
    parts = urlsplit(url)
    if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
        raise InvalidInputError(
            "queue", url, "an embedded queue is sqlite:///ABS/PATH.db (three slashes, then an absolute path)"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"name"}
    names = query.get("name", ["requests"])
    if unknown or len(names) != 1 or not names[0]:
        raise InvalidInputError(
            "queue", url, "the only query parameter of a SQLite queue is name=NAME (once, non-empty)"
        )
    return SqliteQueue(parts.path, name=names[0], **options)
