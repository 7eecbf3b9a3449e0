"""The AWS request queue: SQS with long polling, visibility extension and a redrive policy to a dead-letter queue.

SQS accepts an old receipt handle for DeleteMessage and ChangeMessageVisibility (the real service may report
success and do nothing; moto carries the call out), so the lease rule of :mod:`mr.queues.base` is kept here: each
``SqsQueue`` remembers when the leases it handed out end, and refuses a receipt whose lease has run out before
calling SQS. A receipt this object did not hand out (e.g. received by another process) goes to SQS as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from mr.errors import InvalidInputError
from mr.queues.base import (
    DEFAULT_VISIBILITY_TIMEOUT,
    MAX_VISIBILITY_TIMEOUT,
    Message,
    QueueError,
    StaleReceiptError,
    check_max_receives,
    check_receive,
    check_seconds,
    encode_body,
)

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
"""Names SQS accepts for a standard queue."""

_AWS_HOST = re.compile(r"^(?:sqs\.(?P<region>[a-z0-9-]+)|(?P<legacy>[a-z0-9-]+)\.queue)\.amazonaws\.com(?:\.cn)?$")
_MISSING_CODES = {"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"}
_STALE_CODES = {"ReceiptHandleIsInvalid", "MessageNotInflight", "AWS.SimpleQueueService.MessageNotInflight"}
LEASE_MARGIN = 0.5
"""Seconds before its end that a lease counts as lost here, so that a call in flight cannot reach SQS after the
message was leased again."""
_FORGET_AFTER = MAX_VISIBILITY_TIMEOUT
"""Seconds after its end that a lost lease is still remembered (receipts are useless after 12 hours anyway)."""


class SqsQueue:
    """An SQS queue, by URL or by name (resolved with GetQueueUrl on first use).

    ``endpoint_url`` defaults to the queue URL's own host when that is not an AWS host (moto, LocalStack), else
    to boto3's default (which honours ``AWS_ENDPOINT_URL``). ``max_receives``, when given, is checked once against
    the queue's RedrivePolicy: SQS enforces the limit, so a queue without a matching policy is an error that
    names the fix (:func:`ensure_queue`). SQS counts whole seconds: fractional timeouts are rounded up for SQS,
    while this object's own lease bookkeeping uses the exact value.
    """

    def __init__(
        self,
        queue: str,
        *,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        max_receives: int | None = None,
        visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
    ) -> None:
        self._url, self.name, host_region, host_endpoint = _parse_queue(queue)
        self.queue = queue
        self.endpoint_url = endpoint_url
        self.region_name = region_name
        self.max_receives = None if max_receives is None else check_max_receives(max_receives)
        self.visibility_timeout = check_seconds("visibility_timeout", visibility_timeout, MAX_VISIBILITY_TIMEOUT)
        self._client_args = {
            "endpoint_url": endpoint_url or host_endpoint,
            "region_name": region_name or host_region,
        }
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid = os.getpid()
        self._dead_letter_url: str | None = None
        self._checked = False
        self._leases: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"SqsQueue({self.queue!r})"

    def __reduce__(self) -> tuple:
        kwargs = {
            "endpoint_url": self.endpoint_url, "region_name": self.region_name,
            "max_receives": self.max_receives, "visibility_timeout": self.visibility_timeout,
        }
        return (_rebuild, (self.queue, kwargs))

    @property
    def url(self) -> str:
        """The queue URL, resolved from the name on first use."""
        if self._url is None:
            url = self._lookup()
            if url is None:
                raise QueueError(
                    f"SQS queue {self.name!r} does not exist; create it with its dead-letter queue: "
                    f"mr.queues.ensure_queue({self.name!r}, max_receives=3)"
                )
            self._url = url
        return self._url

    def send(self, body: bytes | str) -> str:
        data = encode_body(body)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInputError("body", data[:40], "SQS carries text: send UTF-8 (base64-encode binary)") from error
        return self._call("SendMessage", QueueUrl=self.url, MessageBody=text)["MessageId"]

    def receive(
        self, max_messages: int = 1, wait_seconds: float = 0, visibility_timeout: float | None = None
    ) -> list[Message]:
        check_receive(max_messages, wait_seconds, visibility_timeout)
        lease = self.visibility_timeout if visibility_timeout is None else float(visibility_timeout)
        self._check_redrive()
        started = time.monotonic()
        reply = self._call(
            "ReceiveMessage", QueueUrl=self.url, MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=math.ceil(wait_seconds), VisibilityTimeout=math.ceil(lease),
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        messages = [_message(item) for item in reply.get("Messages", [])]
        with self._lock:
            self._forget_old(started)
            self._leases.update((m.receipt, started + lease) for m in messages)
        return messages

    def extend(self, message: Message, seconds: float) -> None:
        seconds = check_seconds("seconds", seconds, MAX_VISIBILITY_TIMEOUT)
        self._check_lease(message, "extend")
        started = time.monotonic()
        self._leased_call(message, "extend", "ChangeMessageVisibility", VisibilityTimeout=math.ceil(seconds))
        with self._lock:
            if message.receipt in self._leases:
                self._leases[message.receipt] = started + seconds

    def delete(self, message: Message) -> None:
        self._check_lease(message, "delete")
        self._leased_call(message, "delete", "DeleteMessage")
        with self._lock:
            self._leases.pop(message.receipt, None)

    def dead_letter_count(self) -> int:
        dead_letter_url = self._redrive()[0]
        if dead_letter_url is None:
            return 0
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attributes = self._call("GetQueueAttributes", QueueUrl=dead_letter_url, AttributeNames=names)["Attributes"]
        return sum(int(attributes.get(name, 0)) for name in names)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _client_for_calls(self) -> Any:
        with self._lock:
            if self._client is None or self._pid != os.getpid():  # a client inherited through fork is not ours
                self._client, self._pid = make_client(**self._client_args), os.getpid()
            return self._client

    def _call(self, operation: str, **params: Any) -> dict:
        """One SQS call; failures become QueueError with the botocore error as cause."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self._client_for_calls()
        method = getattr(client, _snake(operation))
        try:
            return method(**params)
        except (BotoCoreError, ClientError) as error:
            where = params.get("QueueUrl") or params.get("QueueName")
            raise QueueError(f"SQS {operation} on {where} failed: {error}") from error

    def _lookup(self) -> str | None:
        """GetQueueUrl of this name, or None when no such queue exists."""
        try:
            return self._call("GetQueueUrl", QueueName=self.name)["QueueUrl"]
        except QueueError as error:
            if _codes(error.__cause__) & _MISSING_CODES:
                return None
            raise

    def _leased_call(self, message: Message, verb: str, operation: str, **params: Any) -> None:
        try:
            self._call(operation, QueueUrl=self.url, ReceiptHandle=message.receipt, **params)
        except QueueError as error:
            if _codes(error.__cause__) & _STALE_CODES or "not available for visibility" in str(error):
                raise StaleReceiptError(message.message_id, verb) from error.__cause__
            raise

    def _check_lease(self, message: Message, verb: str) -> None:
        with self._lock:
            ends = self._leases.get(message.receipt)
        if ends is not None and ends - LEASE_MARGIN <= time.monotonic():
            raise StaleReceiptError(message.message_id, verb)

    def _forget_old(self, now: float) -> None:
        old = [receipt for receipt, ends in self._leases.items() if ends < now - _FORGET_AFTER]
        for receipt in old:
            del self._leases[receipt]

    def _redrive(self) -> tuple[str | None, int | None]:
        """The dead-letter queue URL and maxReceiveCount from the queue's RedrivePolicy (None, None without)."""
        reply = self._call("GetQueueAttributes", QueueUrl=self.url, AttributeNames=["RedrivePolicy"])
        policy = reply.get("Attributes", {}).get("RedrivePolicy")
        if not policy:
            return None, None
        policy = json.loads(policy)
        if self._dead_letter_url is None:
            _, _, _, _, account, name = policy["deadLetterTargetArn"].split(":", 5)
            self._dead_letter_url = self._call(
                "GetQueueUrl", QueueName=name, QueueOwnerAWSAccountId=account
            )["QueueUrl"]
        return self._dead_letter_url, int(policy["maxReceiveCount"])

    def _check_redrive(self) -> None:
        """Once per object: the queue's redrive policy matches ``max_receives``, when that was given."""
        if self._checked or self.max_receives is None:
            return
        limit = self._redrive()[1]
        if limit != self.max_receives:
            found = "no dead-letter queue" if limit is None else f"maxReceiveCount={limit}"
            raise QueueError(
                f"SQS queue {self.url} has {found}, expected max_receives={self.max_receives}; set its redrive "
                f"policy, e.g. mr.queues.ensure_queue({self.name!r}, max_receives={self.max_receives})"
            )
        self._checked = True


def ensure_queue(
    name: str,
    max_receives: int,
    *,
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
    endpoint_url: str | None = None,
    region_name: str | None = None,
) -> str:
    """Create (or update) queue ``name`` and its dead-letter queue ``<name>-dlq``; returns the queue URL.

    Idempotent: an existing queue gets the redrive policy (``max_receives``) and visibility timeout set again.
    """
    if not isinstance(name, str) or not QUEUE_NAME.match(name) or len(name) > 76:
        raise InvalidInputError("name", name, "must be 1-76 letters, digits, '-' or '_' (the DLQ adds '-dlq')")
    check_max_receives(max_receives)
    vt = check_seconds("visibility_timeout", visibility_timeout, MAX_VISIBILITY_TIMEOUT)
    dead = SqsQueue(f"{name}-dlq", endpoint_url=endpoint_url, region_name=region_name)
    dead_url = _get_or_create(dead)
    arn = dead._call("GetQueueAttributes", QueueUrl=dead_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = SqsQueue(name, endpoint_url=endpoint_url, region_name=region_name)
    url = _get_or_create(queue)
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": max_receives})
    attributes = {"RedrivePolicy": policy, "VisibilityTimeout": str(math.ceil(vt))}
    queue._call("SetQueueAttributes", QueueUrl=url, Attributes=attributes)
    queue.close()
    dead.close()
    return url


def make_client(endpoint_url: str | None = None, region_name: str | None = None) -> Any:
    """A boto3 SQS client with standard retries and a read timeout longer than the longest long poll."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "max_attempts": 5}, read_timeout=60)
    return boto3.session.Session().client("sqs", endpoint_url=endpoint_url, region_name=region_name, config=config)


def _get_or_create(queue: SqsQueue) -> str:
    return queue._lookup() or queue._call("CreateQueue", QueueName=queue.name)["QueueUrl"]


def _parse_queue(queue: str) -> tuple[str | None, str, str | None, str | None]:
    """(url or None, name, region from an AWS host, endpoint from a non-AWS host) of a queue URL or name."""
    if not isinstance(queue, str) or not queue:
        raise InvalidInputError("queue", queue, "give an SQS queue URL or a queue name")
    if not queue.startswith(("https://", "http://")):
        if not QUEUE_NAME.match(queue):
            raise InvalidInputError("queue", queue, "an SQS queue name is 1-80 letters, digits, '-' or '_'")
        return None, queue, None, None
    parts = urlsplit(queue)
    segments = [s for s in parts.path.split("/") if s]
    if not parts.hostname or len(segments) != 2 or not QUEUE_NAME.match(segments[1]):
        raise InvalidInputError(
            "queue", queue, "an SQS queue URL looks like https://sqs.REGION.amazonaws.com/ACCOUNT/NAME"
        )
    aws = _AWS_HOST.match(parts.hostname)
    if aws:
        return queue, segments[1], aws.group("region") or aws.group("legacy"), None
    return queue, segments[1], None, f"{parts.scheme}://{parts.netloc}"


def _message(item: dict) -> Message:
    attributes = item.get("Attributes", {})
    sent = datetime.fromtimestamp(int(attributes.get("SentTimestamp", 0)) / 1000, timezone.utc)
    count = int(attributes.get("ApproximateReceiveCount", 1))
    return Message(item["MessageId"], item["Body"].encode("utf-8"), item["ReceiptHandle"], count, sent)


def _codes(error: BaseException | None) -> set[str]:
    """The error code of a botocore ClientError, in both its JSON and its legacy query form."""
    response = getattr(error, "response", None)
    details = response.get("Error", {}) if isinstance(response, dict) else {}
    return {details[key] for key in ("Code", "QueryErrorCode") if details.get(key)}


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def _rebuild(queue: str, kwargs: dict) -> SqsQueue:
    return SqsQueue(queue, **kwargs)
