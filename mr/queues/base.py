"""The request-queue boundary: what a listener needs from a queue, whichever system holds the messages.

Lease semantics, shared by every implementation:

* ``receive`` leases each message it returns: the message stays invisible to every other consumer until its
  visibility timeout runs out, then it is delivered again, with ``receive_count`` one higher and a new receipt.
* A lease belongs to the receipt it was handed out with. ``extend`` and ``delete`` take the message as
  received; once the lease has run out the receipt is *stale* (whether or not someone else has received the
  message since) and both raise :class:`StaleReceiptError` and change nothing. A stale receipt therefore never
  deletes or extends a message that another consumer now holds.
* A message already received ``max_receives`` times is not delivered again: the next ``receive`` that would
  deliver it moves it to the dead-letter queue instead, and ``dead_letter_count`` counts it.
* Delivery is at least once: delete a message only after its outcome is recorded, so that a redelivered
  request finds the outcome instead of running twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from mr.errors import InvalidInputError, MrError

DEFAULT_VISIBILITY_TIMEOUT = 30.0
"""Seconds a received message stays leased unless the caller asks otherwise (SQS's own default)."""

DEFAULT_MAX_RECEIVES = 3
"""Receives after which a message goes to the dead-letter queue instead of being delivered again."""

MAX_MESSAGES = 10
"""Most messages one ``receive`` returns (SQS's limit, kept for every implementation)."""

MAX_WAIT_SECONDS = 20.0
"""Longest long-polling wait of one ``receive`` (SQS's limit, kept for every implementation)."""

MAX_VISIBILITY_TIMEOUT = 43200.0
"""Longest lease, in seconds (SQS's limit of 12 hours, kept for every implementation)."""


class QueueError(MrError):
    """A queue that could not be reached, or refused an operation for an operational reason."""


class StaleReceiptError(QueueError):
    """The lease behind a receipt has run out: the message may be leased by another consumer now."""

    def __init__(self, message_id: str, operation: str) -> None:
        self.message_id = message_id
        self.operation = operation
        super().__init__(
            f"cannot {operation} message {message_id}: its lease has run out, so another consumer may hold it; "
            "extend the lease before its visibility timeout runs out"
        )


@dataclass(frozen=True)
class Message:
    """One delivery of a message: its receipt identifies this lease, not the message."""

    message_id: str
    """Stable across deliveries."""
    body: bytes
    """The payload as sent (``str`` bodies are UTF-8 encoded)."""
    receipt: str
    """Opaque handle of this lease; it changes on every delivery."""
    receive_count: int
    """1 on the first delivery, 2 on the second, …"""
    sent_at: datetime
    """When the message was sent, timezone-aware UTC."""

    def text(self) -> str:
        """The body decoded as UTF-8 (requests are JSON)."""
        return self.body.decode("utf-8")


@runtime_checkable
class RequestQueue(Protocol):
    """Where requests wait to be processed: an embedded SQLite queue or SQS.

    Objects pickle to their constructor arguments and open their connections lazily, so one can be handed to
    another thread or process.
    """

    def send(self, body: bytes | str) -> str:
        """Enqueue a message; returns its message id."""
        ...

    def receive(
        self, max_messages: int = 1, wait_seconds: float = 0, visibility_timeout: float | None = None
    ) -> list[Message]:
        """Lease up to ``max_messages`` (1–10) visible messages, waiting up to ``wait_seconds`` (0–20) for one.

        Returns as soon as at least one message is leased, or an empty list when the wait ends. The lease lasts
        ``visibility_timeout`` seconds (the queue's default when None).
        """
        ...

    def extend(self, message: Message, seconds: float) -> None:
        """Keep ``message`` leased for ``seconds`` from now (0 gives it back at once); StaleReceiptError if lost."""
        ...

    def delete(self, message: Message) -> None:
        """Remove ``message`` for good, once its outcome is recorded; StaleReceiptError if the lease was lost."""
        ...

    def dead_letter_count(self) -> int:
        """How many messages this queue has moved to its dead-letter queue (and are still there)."""
        ...

    def close(self) -> None:
        """Release connections; the object reopens them if used again."""
        ...


def encode_body(body: bytes | str) -> bytes:
    """A message body as bytes: ``str`` is UTF-8 encoded."""
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise InvalidInputError("body", type(body).__name__, "must be bytes or str (e.g. the request's JSON text)")


def check_receive(max_messages: int, wait_seconds: float, visibility_timeout: float | None) -> None:
    """Validate ``receive`` arguments against the limits every implementation keeps."""
    if isinstance(max_messages, bool) or not isinstance(max_messages, int) or not 1 <= max_messages <= MAX_MESSAGES:
        raise InvalidInputError("max_messages", max_messages, f"must be a whole number from 1 to {MAX_MESSAGES}")
    check_seconds("wait_seconds", wait_seconds, MAX_WAIT_SECONDS)
    if visibility_timeout is not None:
        check_seconds("visibility_timeout", visibility_timeout, MAX_VISIBILITY_TIMEOUT)


def check_seconds(field: str, value: object, limit: float) -> float:
    """A duration in seconds from 0 to ``limit``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= limit:
        raise InvalidInputError(field, value, f"must be a number of seconds from 0 to {limit:g}")
    return float(value)


def check_max_receives(value: object) -> int:
    """A positive whole number of receives."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError("max_receives", value, "must be a whole number of receives, at least 1")
    return value
