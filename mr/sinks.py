"""Where finished features go: a local file, an S3 object, a Kinesis stream — OversightML's layouts.

Each sink is a small frozen dataclass (it pickles as its constructor arguments) that opens its AWS client
per write, under an assumed role where one is given. Features stream from :func:`iter_geojson_features`
one at a time, so no sink ever holds the whole GeoJSON text of a large result.

Completeness: a file is renamed into place and an S3 object appears only when its upload completes (a
failed multipart upload is aborted), so both are all or nothing. Kinesis cannot take records back: a
Kinesis write either puts every record or raises :class:`KinesisSinkError` saying how many went out.
"""

from __future__ import annotations

import json
import logging
import posixpath
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any, Protocol, runtime_checkable

from mr.errors import InvalidInputError, SinkError
from mr.features import FeatureTable, OutputMetadata, iter_geojson_features
from mr.output import write_features

logger = logging.getLogger(__name__)

MIN_PART_SIZE, MAX_PART_SIZE = 5 * 2**20, 5 * 2**30
"""S3's multipart part sizes (every part but the last is at least the minimum)."""
KINESIS_MAX_RECORDS, KINESIS_MAX_BATCH_BYTES, KINESIS_MAX_RECORD_BYTES = 500, 5 * 2**20, 2**20
"""PutRecords limits (OSML's ServiceConfig values): records per call, bytes per call, bytes per record
(a record's bytes are its data plus its partition key)."""
_BOTO_CONFIG = {"retries": {"mode": "standard", "max_attempts": 5}}


@runtime_checkable
class Sink(Protocol):
    """One output of a job: writes a whole feature table, or raises :class:`SinkError`."""

    @property
    def name(self) -> str:
        """What the sink is and where it writes, for messages (e.g. ``S3 s3://bucket/prefix``)."""
        ...

    def write(self, table: FeatureTable, meta: OutputMetadata) -> str:
        """Write every feature; return where they went. Raises :class:`SinkError` naming sink and reason."""
        ...


class KinesisSinkError(SinkError):
    """A Kinesis write that stopped part way: ``written`` of ``total`` records are already on the stream."""

    def __init__(self, message: str, written: int, total: int) -> None:
        self.written = written
        self.total = total
        super().__init__(f"{message}; {written} of {total} records were written and cannot be withdrawn")


class PublishError(SinkError):
    """Some sinks of a job failed: ``succeeded`` holds (name, where), ``failed`` holds (name, error)."""

    def __init__(self, succeeded: list[tuple[str, str]], failed: list[tuple[str, Exception]]) -> None:
        self.succeeded = succeeded
        self.failed = failed
        done = ", ".join(f"{name} -> {where}" for name, where in succeeded) or "none"
        errors = "; ".join(f"{name}: {error}" for name, error in failed)
        super().__init__(f"{len(failed)} of {len(succeeded) + len(failed)} sinks failed ({errors}); succeeded: {done}")


@dataclass(frozen=True)
class FileSink:
    """A local GeoJSON or GeoParquet file (by extension), renamed into place when complete."""

    path: str

    @property
    def name(self) -> str:
        return f"File {self.path}"

    def write(self, table: FeatureTable, meta: OutputMetadata) -> str:
        return str(write_features(table, meta, self.path))


@dataclass(frozen=True)
class S3Sink:
    """One GeoJSON FeatureCollection per job at ``s3://bucket/<prefix>/<jobId>.geojson`` (OSML's key).

    S3 allows 10,000 parts: 8 MiB parts hold 80 GiB of GeoJSON. Give the bucket a lifecycle rule that aborts
    incomplete multipart uploads: a process killed mid-upload cannot abort its own."""

    bucket: str
    prefix: str = ""
    _: KW_ONLY
    assumed_role: str | None = None
    """IAM role ARN to write as (STS AssumeRole, session ``mr-<jobId>``); None: this process's credentials."""
    endpoint_url: str | None = None
    """An S3-compatible endpoint; None: boto3's default (which honours AWS_ENDPOINT_URL)."""
    part_size: int = 8 * 2**20
    """Bytes per multipart part; a result smaller than one part goes up in a single PutObject."""

    def __post_init__(self) -> None:
        if not self.bucket:
            raise InvalidInputError("bucket", self.bucket, "name the S3 bucket to write to")
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise InvalidInputError("part_size", self.part_size, "S3 parts are 5 MiB to 5 GiB")

    @property
    def name(self) -> str:
        return f"S3 s3://{self.bucket}/{self.prefix}"

    def write(self, table: FeatureTable, meta: OutputMetadata) -> str:
        key = object_key(self.prefix, _require_job_id(self, meta))
        url = f"s3://{self.bucket}/{key}"
        try:
            client = _aws_client("s3", self.assumed_role, self.endpoint_url, meta.job_id)
            parts = self._upload(client, key, _geojson_chunks(table, meta))
        except Exception as error:
            raise SinkError(f"{self.name}: could not write {url}: {error}") from error
        logger.info("wrote %d features to %s (%d parts)", len(table), url, parts)
        return url

    def _upload(self, client: Any, key: str, chunks: Iterator[bytes]) -> int:
        """Stream ``chunks`` into ``key``: PutObject if they fit one part, else a multipart upload."""
        target = {"Bucket": self.bucket, "Key": key}
        extra = {"ContentType": "application/geo+json", "ACL": "bucket-owner-full-control"}
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict] = []
        try:
            for chunk in chunks:
                buffer += chunk
                if len(buffer) >= self.part_size:
                    if upload_id is None:
                        upload_id = client.create_multipart_upload(
                            **target, **extra, ChecksumAlgorithm="CRC32"
                        )["UploadId"]
                    parts.append(_upload_part(client, target, upload_id, len(parts) + 1, buffer))
                    buffer.clear()
            if upload_id is None:
                client.put_object(**target, **extra, Body=bytes(buffer))
                return 1
            parts.append(_upload_part(client, target, upload_id, len(parts) + 1, buffer))
            client.complete_multipart_upload(**target, UploadId=upload_id, MultipartUpload={"Parts": parts})
            return len(parts)
        except BaseException:
            if upload_id is not None:
                _abort(client, target, upload_id)
            raise


def object_key(prefix: str, job_id: str) -> str:
    """OSML's key: ``os.path.join(prefix, job_id.split("/")[-1] + ".geojson")`` (sink/s3_sink.py)."""
    return posixpath.join(prefix, job_id.split("/")[-1] + ".geojson")


def _upload_part(client: Any, target: dict, upload_id: str, number: int, data: bytearray) -> dict:
    reply = client.upload_part(**target, UploadId=upload_id, PartNumber=number, Body=bytes(data))
    part = {"PartNumber": number, "ETag": reply["ETag"]}
    if "ChecksumCRC32" in reply:
        part["ChecksumCRC32"] = reply["ChecksumCRC32"]
    return part


def _abort(client: Any, target: dict, upload_id: str) -> None:
    """Abort so no part lingers (billed, invisible); a failed abort is logged, the first error still raised."""
    try:
        client.abort_multipart_upload(**target, UploadId=upload_id)
    except Exception:  # the write's own error is what the caller needs
        logger.warning("could not abort multipart upload %s of s3://%s/%s", upload_id, target["Bucket"],
                       target["Key"], exc_info=True)


def _geojson_chunks(table: FeatureTable, meta: OutputMetadata) -> Iterator[bytes]:
    """The FeatureCollection text in pieces, framed exactly as :func:`mr.output.write_features` frames it."""
    yield b'{"type": "FeatureCollection", "features": ['
    for i, feature in enumerate(iter_geojson_features(table, meta)):
        yield (",\n" if i else "\n").encode() + _dumps(feature)
    yield b"\n]}\n"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


@dataclass(frozen=True)
class KinesisSink:
    """Each feature as a one-feature FeatureCollection record, partition key the job id (as OSML)."""

    stream: str
    """Stream name, or its ARN."""
    _: KW_ONLY
    batch_size: int = KINESIS_MAX_RECORDS
    """Records per PutRecords call at most; a batch is also cut at 5 MiB."""
    assumed_role: str | None = None
    endpoint_url: str | None = None
    max_retries: int = 5
    """Times records that PutRecords reports failed are sent again before the write fails."""
    backoff_s: float = 0.1
    """First retry delay; it doubles per retry (up to 5 s), times a random factor in [0.5, 1)."""

    def __post_init__(self) -> None:
        if not self.stream:
            raise InvalidInputError("stream", self.stream, "name the Kinesis stream to write to")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= KINESIS_MAX_RECORDS:
            raise InvalidInputError("batchSize", self.batch_size, "PutRecords takes 1 to 500 records")
        if self.max_retries < 0:
            raise InvalidInputError("max_retries", self.max_retries, "use 0 or more")

    @property
    def name(self) -> str:
        return f"Kinesis {self.stream}"

    def write(self, table: FeatureTable, meta: OutputMetadata) -> str:
        job_id = _require_job_id(self, meta)
        if len(job_id) > 256:
            raise SinkError(f"{self.name}: job id {job_id[:40]!r}... is over 256 characters, "
                            "too long for a Kinesis partition key")
        written = 0
        try:
            client = _aws_client("kinesis", self.assumed_role, self.endpoint_url, job_id)
            for batch in _batches(_records(table, meta, job_id), self.batch_size):
                written += self._put(client, batch, written, len(table))
        except KinesisSinkError:
            raise
        except Exception as error:
            raise KinesisSinkError(f"{self.name}: {error}", written, len(table)) from error
        logger.info("put %d records on Kinesis stream %s", written, self.stream)
        return f"kinesis://{self.stream} ({written} records)"

    def _put(self, client: Any, batch: list[dict], written: int, total: int) -> int:
        """Put one batch, resending the records that come back with an ErrorCode; return how many went.

        Resent records land after the rest of their batch: order on the shard is not the table's order."""
        target = {"StreamARN": self.stream} if self.stream.startswith("arn:") else {"StreamName": self.stream}
        pending, done = batch, 0
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(5.0, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            try:
                results = client.put_records(Records=pending, **target)["Records"]
            except Exception as error:
                raise KinesisSinkError(f"{self.name}: {error}", written + done, total) from error
            failed = [record for record, result in zip(pending, results) if result.get("ErrorCode")]
            done += len(pending) - len(failed)
            if not failed:
                return done
            first = next(r for r in results if r.get("ErrorCode"))
            pending = failed
        raise KinesisSinkError(
            f"{self.name}: {len(pending)} records still failed after {self.max_retries} retries "
            f"(last: {first['ErrorCode']}: {first.get('ErrorMessage', '')})",
            written + done, total,
        )


def _records(table: FeatureTable, meta: OutputMetadata, job_id: str) -> Iterator[dict]:
    """One PutRecords entry per feature; a feature over Kinesis's 1 MiB record limit is an error."""
    key_bytes = len(job_id.encode())
    for feature in iter_geojson_features(table, meta):
        data = _dumps({"type": "FeatureCollection", "features": [feature]})
        if len(data) + key_bytes > KINESIS_MAX_RECORD_BYTES:
            raise SinkError(
                f"feature {feature['id']} is {len(data) + key_bytes} bytes as a Kinesis record, over the "
                f"{KINESIS_MAX_RECORD_BYTES}-byte limit; trim its properties or send this job to S3"
            )
        yield {"Data": data, "PartitionKey": job_id}


def _batches(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """Group records into PutRecords calls of at most ``size`` records and 5 MiB."""
    batch: list[dict] = []
    nbytes = 0
    for record in records:
        record_bytes = len(record["Data"]) + len(record["PartitionKey"].encode())
        if batch and (len(batch) >= size or nbytes + record_bytes > KINESIS_MAX_BATCH_BYTES):
            yield batch
            batch, nbytes = [], 0
        batch.append(record)
        nbytes += record_bytes
    if batch:
        yield batch


def _require_job_id(sink: Sink, meta: OutputMetadata) -> str:
    if not meta.job_id or not meta.job_id.split("/")[-1]:
        raise SinkError(f"{sink.name}: the job id {meta.job_id!r} is empty; it names the output")
    return meta.job_id


def role_session_name(job_id: str) -> str:
    """``mr-<jobId>`` in the characters and 64-character length STS allows, so CloudTrail shows the job."""
    from mr.aws_roles import role_session_name as for_job

    return for_job(job_id)


def _aws_client(service: str, assumed_role: str | None, endpoint_url: str | None, job_id: str) -> Any:
    """A fresh client (a new session: thread-safe), as ``assumed_role`` where given. Credentials are never logged."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    if assumed_role:
        name = role_session_name(job_id)
        logger.debug("assuming role %s as session %s for %s", assumed_role, name, service)
        sts = session.client("sts", config=Config(**_BOTO_CONFIG))
        credentials = sts.assume_role(RoleArn=assumed_role, RoleSessionName=name)["Credentials"]
        session = boto3.session.Session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
        )
    return session.client(service, endpoint_url=endpoint_url, config=Config(**_BOTO_CONFIG))


def sink_for(output: Any) -> Sink:
    """A sink from an OSML ``outputs`` entry (``{"type": "S3" | "Kinesis" | "File", ...}``) or an object
    with ``bucket``/``prefix``/``assumed_role``, ``stream``/``batch_size``/``assumed_role`` or ``path``."""
    if isinstance(output, (FileSink, S3Sink, KinesisSink)):
        return output
    if isinstance(output, Mapping):
        return _from_mapping(output)
    if getattr(output, "bucket", None) is not None:
        return S3Sink(output.bucket, getattr(output, "prefix", None) or "",
                      assumed_role=getattr(output, "assumed_role", None))
    if getattr(output, "stream", None) is not None:
        return KinesisSink(output.stream, batch_size=getattr(output, "batch_size", None) or KINESIS_MAX_RECORDS,
                           assumed_role=getattr(output, "assumed_role", None))
    if getattr(output, "path", None) is not None:
        return FileSink(str(output.path))
    raise InvalidInputError("outputs", output, "give a bucket (S3), a stream (Kinesis) or a path (File)")


def _from_mapping(output: Mapping) -> Sink:
    kind = str(output.get("type", "")).lower()
    # OSML's SinkFactory reads the S3 role from "role" and the Kinesis one from "assumedRole": accept both.
    role = output.get("assumedRole") or output.get("role")
    if kind == "s3":
        return S3Sink(_field(output, "bucket"), output.get("prefix") or "", assumed_role=role)
    if kind == "kinesis":
        return KinesisSink(_field(output, "stream"), batch_size=output.get("batchSize") or KINESIS_MAX_RECORDS,
                           assumed_role=role)
    if kind == "file":
        return FileSink(str(_field(output, "path")))
    raise InvalidInputError("outputs.type", output.get("type"), "use 'S3', 'Kinesis' or 'File'")


def _field(output: Mapping, key: str) -> Any:
    if not output.get(key):
        raise InvalidInputError(f"outputs.{key}", output.get(key), f"a {output.get('type')} output needs '{key}'")
    return output[key]


def publish(table: FeatureTable, meta: OutputMetadata, sinks: Iterable[Sink], metrics=None) -> list[str]:
    """Write to every sink in order (a failure does not stop the rest); return where each wrote.

    Each write is measured as FeatureDissemination in ``metrics`` (a `mr.metrics.Metrics`) when given.
    Raises :class:`PublishError` (a :class:`SinkError`) naming the sinks that succeeded and those that failed.
    """
    from mr.metrics import Metrics, Operation

    metrics = metrics if metrics is not None else Metrics()
    succeeded: list[tuple[str, str]] = []
    failed: list[tuple[str, Exception]] = []
    for sink in sinks:
        try:
            with metrics.timed(Operation.FEATURE_DISSEMINATION):
                succeeded.append((sink.name, sink.write(table, meta)))
        except Exception as error:  # noqa: BLE001 - every sink gets its chance; all errors are reported
            logger.error("sink %s failed: %s", sink.name, error)
            failed.append((sink.name, error))
    if failed:
        raise PublishError(succeeded, failed) from failed[0][1]
    return [where for _, where in succeeded]
