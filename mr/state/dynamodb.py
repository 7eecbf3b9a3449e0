"""The AWS state store: a job table and a region table in DynamoDB.

``<prefix>-jobs`` is keyed by ``job_id`` and has a ``status-started_at`` index for ``list_jobs``;
``<prefix>-regions`` is keyed by ``job_id`` (partition) and ``region_id`` (sort). The status rules of
:mod:`mr.state.base` are enforced by optimistic writes: read the record, decide, and write on the condition that
the status is still the one read, retrying when another writer got there first. A region that becomes done and the
job's ``regions_done`` counter change in one transaction, so the counter never drifts.

The boto3 client is made on first use (once per process) and the store pickles to its constructor arguments.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from decimal import Decimal
from typing import Any

from mr.errors import InvalidInputError
from mr.state.base import (
    JOB_UPDATE_FIELDS,
    REGION_FIELDS,
    JobRecord,
    JobStatus,
    RegionRecord,
    StateError,
    UnknownJobError,
    check_id,
    check_limit,
    check_same_image,
    clean_fields,
    job_changes,
    new_job,
    plain,
    region_changes,
    region_sort_key,
    stalled,
    stalled_changes,
    utc_now,
)

STATUS_INDEX = "status-started_at"
"""Global secondary index of the job table: partition ``status``, sort ``started_at``."""
RETRIES = 8
"""Optimistic writes retried this often when other writers keep changing the same record."""
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_CONFLICTS = ("ConditionalCheckFailedException", "TransactionCanceledException", "TransactionConflictException")
_UNFINISHED = (JobStatus.STARTED, JobStatus.IN_PROGRESS)
_IS_UNFINISHED = "#status IN (:started, :in_progress)"
_UNFINISHED_VALUES = {":started": JobStatus.STARTED.value, ":in_progress": JobStatus.IN_PROGRESS.value}


class DynamoStore:
    """Job and region state in two DynamoDB tables, ``<table_prefix>-jobs`` and ``<table_prefix>-regions``."""

    def __init__(
        self, table_prefix: str, *, endpoint_url: str | None = None, create: bool = False,
        region_name: str | None = None,
    ) -> None:
        if not isinstance(table_prefix, str) or not _PREFIX.match(table_prefix):
            raise InvalidInputError(
                "table_prefix", table_prefix, "give 1-200 characters of letters, digits, '_', '-' or '.'"
            )
        self.table_prefix = table_prefix
        self.endpoint_url = endpoint_url
        self.create = create
        self.region_name = region_name
        self.jobs_table = f"{table_prefix}-jobs"
        self.regions_table = f"{table_prefix}-regions"
        self._lock = threading.Lock()
        self._client_pid: tuple[Any, int] | None = None
        self._ensured = False

    def __getstate__(self) -> dict[str, Any]:
        return {"table_prefix": self.table_prefix, "endpoint_url": self.endpoint_url, "create": self.create,
                "region_name": self.region_name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("table_prefix"), **state)

    def __repr__(self) -> str:
        return f"DynamoStore({self.table_prefix!r})"

    # --- jobs ---

    def start_job(self, job_id: str, image_id: str, image_url: str, request_text: str, **fields: Any) -> JobRecord:
        record = new_job(job_id, image_id, image_url, request_text, fields)
        try:
            self._call("put_item", TableName=self.jobs_table, Item=_item(record.to_dict()),
                       ConditionExpression="attribute_not_exists(job_id)")
            return record
        except _Conflict:
            pass
        try:  # a redelivered request of an unfinished job is a sign of progress; a finished job keeps its time
            return self._restart(job_id, record.image_url, "ADD attempts :one SET updated_at = :now",
                                 f"image_url = :url AND {_IS_UNFINISHED}",
                                 {":now": record.updated_at, **_UNFINISHED_VALUES})
        except _Conflict:
            pass
        try:
            return self._restart(job_id, record.image_url, "ADD attempts :one", "image_url = :url", {})
        except _Conflict:
            existing = self.get_job(job_id)
            if existing is not None:
                check_same_image(existing, image_url)
            raise StateError(f"job {job_id!r} changed while it was being started again; try again") from None

    def _restart(self, job_id: str, image_url: str, update: str, condition: str, values: dict) -> JobRecord:
        """One conditional write to the record of a job started again; ``_Conflict`` when the condition fails."""
        reply = self._call(
            "update_item", TableName=self.jobs_table, Key=_item({"job_id": job_id}), UpdateExpression=update,
            ConditionExpression=condition, ExpressionAttributeValues=_item({":one": 1, ":url": image_url, **values}),
            ReturnValues="ALL_NEW", **({"ExpressionAttributeNames": {"#status": "status"}} if values else {}),
        )
        return JobRecord.from_dict(_record(reply["Attributes"]))

    def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        values = clean_fields(fields, JOB_UPDATE_FIELDS, "update_job")
        for _ in range(RETRIES):
            current = self.get_job(job_id)
            if current is None:
                raise UnknownJobError(job_id)
            changes = job_changes(current, values, utc_now())
            try:
                self._call("update_item", TableName=self.jobs_table, Key=_item({"job_id": job_id}),
                           **_update(changes, "#status = :expected", {":expected": current.status.value}))
                return replace(current, **changes)
            except _Conflict:
                continue
        raise StateError(f"job {job_id!r} kept changing under {RETRIES} attempts to update it; try again")

    def get_job(self, job_id: str) -> JobRecord | None:
        reply = self._call("get_item", TableName=self.jobs_table, Key=_item({"job_id": job_id}), ConsistentRead=True)
        return JobRecord.from_dict(_record(reply["Item"])) if "Item" in reply else None

    def list_jobs(self, status: JobStatus | str | None = None, limit: int = 100) -> list[JobRecord]:
        """Newest first. Reads the status index, which DynamoDB keeps eventually consistent."""
        check_limit(limit)
        statuses = [JobStatus.parse(status)] if status is not None else list(JobStatus)
        found = [job for one in statuses for job in self._jobs_in(one, limit)]
        found.sort(key=lambda job: (job.started_at, job.job_id), reverse=True)
        return found[:limit]

    def _jobs_in(self, status: JobStatus, limit: int, where: tuple[str, dict] | None = None) -> list[JobRecord]:
        """Jobs in one status from the status index, newest start first; ``where`` is (filter expression, values)."""
        query = {
            "TableName": self.jobs_table, "IndexName": STATUS_INDEX, "KeyConditionExpression": "#status = :status",
            "ExpressionAttributeNames": {"#status": "status"},
            "ExpressionAttributeValues": _item({":status": status.value}), "ScanIndexForward": False,
        }
        if where is not None:
            query["FilterExpression"] = where[0]
            query["ExpressionAttributeValues"].update(_item(where[1]))
        jobs: list[JobRecord] = []
        for item in self._pages("query", query, limit):
            jobs.append(JobRecord.from_dict(_record(item)))
        return jobs

    def touch_job(self, job_id: str) -> JobRecord:
        try:
            reply = self._call(
                "update_item", TableName=self.jobs_table, Key=_item({"job_id": job_id}),
                UpdateExpression="SET updated_at = :now", ConditionExpression=_IS_UNFINISHED,
                ExpressionAttributeNames={"#status": "status"},
                ExpressionAttributeValues=_item({":now": utc_now(), **_UNFINISHED_VALUES}), ReturnValues="ALL_NEW",
            )
        except _Conflict:  # finished, or missing
            current = self.get_job(job_id)
            if current is None:
                raise UnknownJobError(job_id) from None
            return current
        return JobRecord.from_dict(_record(reply["Attributes"]))

    def stalled_jobs(self, updated_before: str, limit: int = 100) -> list[JobRecord]:
        """Oldest progress first. Queries the status index for the unfinished statuses only, so the cost follows
        the number of running jobs, not the size of the table; the index is eventually consistent, which
        ``fail_stalled_job``'s conditional write makes harmless."""
        check_limit(limit)
        where = ("updated_at < :before", {":before": updated_before})
        found = [job for status in _UNFINISHED for job in self._jobs_in(status, limit, where)]
        found.sort(key=lambda job: (job.updated_at, job.job_id))
        return found[:limit]

    def fail_stalled_job(self, job_id: str, updated_at: str, reason: str) -> JobRecord | None:
        current = self.get_job(job_id)
        if current is None or not stalled(current, updated_at):
            return None
        changes = stalled_changes(current, reason, utc_now())
        condition = "#status = :expected AND updated_at = :progress"
        try:
            self._call("update_item", TableName=self.jobs_table, Key=_item({"job_id": job_id}),
                       **_update(changes, condition, {":expected": current.status.value, ":progress": updated_at}))
        except _Conflict:  # another sweeper failed it, or it made progress: either way, not ours to fail
            return None
        return replace(current, **changes)

    # --- regions ---

    def mark_region(self, job_id: str, region_id: str, status: JobStatus | str, **fields: Any) -> RegionRecord:
        check_id("region_id", region_id)
        status = JobStatus.parse(status)
        values = clean_fields(fields, REGION_FIELDS, "mark_region")
        key = _item({"job_id": job_id, "region_id": region_id})
        for _ in range(RETRIES):
            job = self.get_job(job_id)
            if job is None:
                raise UnknownJobError(job_id)
            current = self._region(key)
            now = utc_now()
            changes, newly_done = region_changes(job_id, region_id, current, status, values, now)
            if current is None:
                changes["image_id"] = job.image_id
                write = _update(changes, "attribute_not_exists(region_id)", {})
            else:
                write = _update(changes, "#status = :expected", {":expected": current.status.value})
            write.pop("ReturnValues")
            try:
                self._write_region(job_id, key, write, newly_done, now)
            except _Conflict:
                continue
            if current is None:
                return RegionRecord(job_id=job_id, region_id=region_id, **changes)
            return replace(current, **changes)
        raise StateError(f"region {region_id!r} of job {job_id!r} kept changing under {RETRIES} attempts; try again")

    def _write_region(self, job_id: str, key: dict, write: dict, newly_done: bool, now: str) -> None:
        region = dict(TableName=self.regions_table, Key=key, **write)
        if not newly_done:
            self._call("update_item", **region)
            self._progress(job_id, now)
            return
        counter = {
            "TableName": self.jobs_table, "Key": _item({"job_id": job_id}),
            "UpdateExpression": "ADD regions_done :one SET updated_at = :now",
            "ExpressionAttributeValues": _item({":one": 1, ":now": now}),
        }
        self._call("transact_write_items", TransactItems=[{"Update": region}, {"Update": counter}])

    def _progress(self, job_id: str, now: str) -> None:
        """Set the job's ``updated_at`` (a region was marked: progress); a job deleted meanwhile is left alone."""
        try:
            self._call("update_item", TableName=self.jobs_table, Key=_item({"job_id": job_id}),
                       UpdateExpression="SET updated_at = :now", ConditionExpression="attribute_exists(job_id)",
                       ExpressionAttributeValues=_item({":now": now}))
        except _Conflict:
            pass

    def _region(self, key: dict) -> RegionRecord | None:
        reply = self._call("get_item", TableName=self.regions_table, Key=key, ConsistentRead=True)
        return RegionRecord.from_dict(_record(reply["Item"])) if "Item" in reply else None

    def regions(self, job_id: str) -> list[RegionRecord]:
        found = [RegionRecord.from_dict(_record(item)) for item in self._region_items(job_id)]
        return sorted(found, key=lambda region: region_sort_key(region.region_id))

    def done_regions(self, job_id: str) -> set[str]:
        items = self._region_items(job_id, ProjectionExpression="region_id, #status",
                                   ExpressionAttributeNames={"#status": "status"})
        return {item["region_id"]["S"] for item in items if JobStatus(item["status"]["S"]).done}

    def _region_items(self, job_id: str, **extra: Any) -> Iterator[dict]:
        query = dict(TableName=self.regions_table, KeyConditionExpression="job_id = :job",
                     ExpressionAttributeValues=_item({":job": job_id}), ConsistentRead=True, **extra)
        return self._pages("query", query, None)

    # --- tables and client ---

    def ensure_tables(self) -> None:
        """Create both tables (on-demand billing) where they are missing, and wait until they are active."""
        client = self._client(ensure=False)
        jobs = {
            "TableName": self.jobs_table, "BillingMode": "PAY_PER_REQUEST",
            "KeySchema": [{"AttributeName": "job_id", "KeyType": "HASH"}],
            "AttributeDefinitions": [{"AttributeName": name, "AttributeType": "S"}
                                     for name in ("job_id", "status", "started_at")],
            "GlobalSecondaryIndexes": [{
                "IndexName": STATUS_INDEX, "Projection": {"ProjectionType": "ALL"},
                "KeySchema": [{"AttributeName": "status", "KeyType": "HASH"},
                              {"AttributeName": "started_at", "KeyType": "RANGE"}],
            }],
        }
        regions = {
            "TableName": self.regions_table, "BillingMode": "PAY_PER_REQUEST",
            "KeySchema": [{"AttributeName": "job_id", "KeyType": "HASH"},
                          {"AttributeName": "region_id", "KeyType": "RANGE"}],
            "AttributeDefinitions": [{"AttributeName": name, "AttributeType": "S"} for name in ("job_id", "region_id")],
        }
        for spec in (jobs, regions):
            try:
                client.create_table(**spec)
            except client.exceptions.ResourceInUseException:
                pass  # it exists already, or another process is creating it
            except Exception as e:
                raise StateError(f"cannot create DynamoDB table {spec['TableName']}: {e}") from e
            client.get_waiter("table_exists").wait(TableName=spec["TableName"],
                                                   WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        self._ensured = True

    def close(self) -> None:
        with self._lock:
            held, self._client_pid = self._client_pid, None
        if held is not None and hasattr(held[0], "close"):
            held[0].close()

    def _client(self, ensure: bool = True):
        with self._lock:
            if self._client_pid is None or self._client_pid[1] != os.getpid():
                import boto3  # lazily: importing mr.state stays light

                client = boto3.session.Session().client(
                    "dynamodb", endpoint_url=self.endpoint_url, region_name=self.region_name
                )
                self._client_pid = (client, os.getpid())
            client = self._client_pid[0]
        if ensure and self.create and not self._ensured:
            self.ensure_tables()
        return client

    def _call(self, operation: str, **kwargs: Any) -> dict:
        """One DynamoDB call; a failed condition becomes ``_Conflict``, any other failure a ``StateError``."""
        client = self._client()
        try:
            return getattr(client, operation)(**kwargs)
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in _CONFLICTS:
                raise _Conflict(code) from e
            hint = ""
            if code == "ResourceNotFoundException":
                hint = (f"; create the tables with DynamoStore({self.table_prefix!r}, create=True)"
                        f" or open_store('dynamodb://{self.table_prefix}?create=true')")
            raise StateError(f"DynamoDB {operation} on {self.table_prefix}-*: {e}{hint}") from e

    def _pages(self, operation: str, request: dict, limit: int | None) -> Iterator[dict]:
        count = 0
        while True:
            reply = self._call(operation, **request)
            for item in reply.get("Items", []):
                yield item
                count += 1
                if limit is not None and count >= limit:
                    return
            if "LastEvaluatedKey" not in reply:
                return
            request = dict(request, ExclusiveStartKey=reply["LastEvaluatedKey"])


class _Conflict(Exception):
    """A conditional write that lost to another writer (or found the record changed)."""


def _update(changes: dict[str, Any], condition: str, condition_values: dict[str, Any]) -> dict[str, Any]:
    """UpdateItem arguments: SET the fields that have a value, REMOVE those set to None."""
    names = {"#status": "status"}
    values = dict(condition_values)
    sets, removes = [], []
    for i, (name, value) in enumerate(changes.items()):
        names[f"#f{i}"] = name
        if value is None:
            removes.append(f"#f{i}")
        else:
            values[f":v{i}"] = value
            sets.append(f"#f{i} = :v{i}")
    expression = " ".join(part for part in (
        f"SET {', '.join(sets)}" if sets else "", f"REMOVE {', '.join(removes)}" if removes else "") if part)
    if "#status" not in condition:
        names.pop("#status")
    args = {"UpdateExpression": expression, "ConditionExpression": condition, "ExpressionAttributeNames": names,
            "ReturnValues": "NONE"}
    if values:
        args["ExpressionAttributeValues"] = _item(values)
    return args


def _item(values: dict[str, Any]) -> dict[str, dict]:
    """Python values as DynamoDB attribute values (floats as Decimal, None attributes left out)."""
    from boto3.dynamodb.types import TypeSerializer

    serializer = TypeSerializer()
    return {name: serializer.serialize(_to_dynamo(value)) for name, value in values.items() if value is not None}


def _to_dynamo(value: Any) -> Any:
    if isinstance(value, JobStatus):
        return value.value
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _to_dynamo(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_dynamo(v) for v in value]
    return value


def _record(item: dict[str, dict]) -> dict[str, Any]:
    from boto3.dynamodb.types import TypeDeserializer

    deserializer = TypeDeserializer()
    return {name: plain(deserializer.deserialize(value), name) for name, value in item.items()}
