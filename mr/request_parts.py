"""The enums and small frozen value types a request is made of: outputs, the image processor, post-processing.

Each part parses its piece of the message (``parse``), reporting problems as :class:`~mr.request_fields.RequestError`
with the field's path, and writes itself back in OSML's form (``to_message``). :mod:`mr.request` assembles them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from mr.errors import InvalidInputError
from mr.merge import DedupConfig
from mr.request_fields import (
    FrozenDict,
    RequestError,
    _choice,
    _integer,
    _number,
    _present,
    _required,
    _role,
    _string,
    _typed,
)

_SM_ENDPOINT = re.compile(r"[A-Za-z0-9](-*[A-Za-z0-9]){0,62}")
_HTTP_ENDPOINT = re.compile(r"https?://[^/\s]+(/\S*)?")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KINESIS_STREAM = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def _enum(name: str, values: str, doc: str) -> Any:
    kind = Enum(name, [(v.upper(), v) for v in values.split()], type=str, module=__name__)
    kind.__doc__ = doc
    return kind


ModelInvokeMode = _enum("ModelInvokeMode", "SM_ENDPOINT HTTP_ENDPOINT LOCAL",
                        "How the model is reached: OSML's endpoint types, and LOCAL, a model registered by name.")
TileFormat = _enum("TileFormat", "NITF GTIFF PNG JPEG", "Encoding of a tile sent to an endpoint (OSML ImageFormats).")
TileCompression = _enum("TileCompression", "NONE JPEG J2K LZW", "Compression of a tile sent to an endpoint.")
RequestStatus = _enum("RequestStatus", "STARTED IN_PROGRESS PARTIAL SUCCESS FAILED", "Job and region statuses.")
SinkType = _enum("SinkType", "S3 Kinesis File", "``outputs[].type`` (OSML spells Kinesis in mixed case).")
DistillationAlgorithm = _enum("DistillationAlgorithm", "NMS SOFT_NMS", "``postProcessing[].algorithm.algorithmType``.")


# ---- parts of a request ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Output:
    """Features as one GeoJSON object under ``s3://bucket/prefix``."""

    bucket: str
    prefix: str = ""
    assumed_role: str = ""

    @classmethod
    def parse(cls, item: FrozenDict, path: Callable[[str], str]) -> S3Output:
        bucket = _string(_required(item, "bucket", path("bucket"), '"my-results"'), path("bucket"))
        if not _S3_BUCKET.fullmatch(bucket) or ".." in bucket:
            raise RequestError(path("bucket"), bucket, "must be an S3 bucket name: 3-63 lowercase letters, digits, "
                               "dots or hyphens")
        prefix = _string(item.get("prefix"), path("prefix"), optional=True)
        role_key = "role" if item.get("assumedRole") is None else "assumedRole"  # OSML's SinkFactory reads "role"
        return cls(bucket, prefix, _role(item.get(role_key), path(role_key)))

    def to_message(self) -> dict:
        return {"type": "S3", "bucket": self.bucket, "prefix": self.prefix, **_present(assumedRole=self.assumed_role)}


@dataclass(frozen=True)
class KinesisOutput:
    """Features as records on a Kinesis stream; ``batch_size`` as asked (the sink caps each PutRecords call)."""

    stream: str
    batch_size: int | None = None
    assumed_role: str = ""

    @classmethod
    def parse(cls, item: FrozenDict, path: Callable[[str], str]) -> KinesisOutput:
        stream = _string(_required(item, "stream", path("stream"), '"my-results"'), path("stream"))
        if not _KINESIS_STREAM.fullmatch(stream):
            raise RequestError(path("stream"), stream, "must be a Kinesis stream name: 1-128 letters, digits, _ . -")
        size = None if item.get("batchSize") is None else _integer(item["batchSize"], path("batchSize"), 1, 10_000)
        return cls(stream, size, _role(item.get("assumedRole"), path("assumedRole")))

    def to_message(self) -> dict:
        return {"type": "Kinesis", "stream": self.stream,
                **_present(batchSize=self.batch_size, assumedRole=self.assumed_role)}


@dataclass(frozen=True)
class FileOutput:
    """Features in a local file, GeoJSON or GeoParquet by extension (embedded mode)."""

    path: str

    @classmethod
    def parse(cls, item: FrozenDict, path: Callable[[str], str]) -> FileOutput:
        from mr.output import output_format

        name = _string(_required(item, "path", path("path"), '"results/job.geojson"'), path("path"), max_len=4096)
        try:
            output_format(name)
        except InvalidInputError as error:
            raise RequestError(path("path"), name, error.reason) from None
        return cls(name)

    def to_message(self) -> dict:
        return {"type": "File", "path": self.path}


Output = S3Output | KinesisOutput | FileOutput
_OUTPUTS = {SinkType.S3: S3Output, SinkType.KINESIS: KinesisOutput, SinkType.FILE: FileOutput}


def _outputs(message: FrozenDict) -> tuple[Output, ...]:
    """``outputs``, or else the legacy ``outputBucket`` + ``outputPrefix`` as one S3 output (as OSML)."""
    items = message.get("outputs")
    if items is not None and _typed(items, "outputs", tuple):
        return tuple(
            _OUTPUTS[_choice(SinkType, _typed(item, f"outputs[{i}]", dict).get("type"), f"outputs[{i}].type")]
            .parse(item, lambda key, i=i: f"outputs[{i}].{key}") for i, item in enumerate(items))
    if message.get("outputBucket") is not None or message.get("outputPrefix") is not None:
        legacy = FrozenDict(bucket=message.get("outputBucket"), prefix=_required(
            message, "outputPrefix", "outputPrefix", '"results/" beside outputBucket'))
        return (S3Output.parse(legacy, lambda key: "output" + key.capitalize()),)
    raise RequestError("outputs", items, 'needs at least one output, e.g. [{"type": "S3", "bucket": "my-results", '
                       '"prefix": "job/"}], or the legacy outputBucket and outputPrefix')


@dataclass(frozen=True)
class ImageProcessor:
    """The model: an endpoint (SageMaker name or HTTP URL) or, for LOCAL, a model the operator registered by name."""

    name: str
    type: ModelInvokeMode = ModelInvokeMode.SM_ENDPOINT
    assumed_role: str = ""

    @classmethod
    def parse(cls, name: Any, kind: Any, role: Any, where: tuple[str, str, str]) -> ImageProcessor:
        kind = _choice(ModelInvokeMode, kind, where[1], ModelInvokeMode.SM_ENDPOINT)  # OSML's default
        name = _string(_required({"name": name}, "name", where[0], '"builtin" with type LOCAL'), where[0])
        if kind is ModelInvokeMode.LOCAL:
            from mr.models.registry import registered_models

            known = sorted(registered_models())  # names only: a message never names code to import
            if name not in known:
                raise RequestError(where[0], name, f"is not a registered model; registered: {', '.join(known)}")
        elif kind is ModelInvokeMode.SM_ENDPOINT and not _SM_ENDPOINT.fullmatch(name):
            raise RequestError(where[0], name, "must be a SageMaker endpoint name (1-63 letters, digits, hyphens)")
        elif kind is ModelInvokeMode.HTTP_ENDPOINT and not _HTTP_ENDPOINT.fullmatch(name):
            raise RequestError(where[0], name, "must be an http(s):// endpoint URL")
        return cls(name, kind, _role(role, where[2]))

    def to_message(self) -> dict:
        return {"name": self.name, "type": self.type.value, **_present(assumedRole=self.assumed_role)}


_ALGORITHM_KEYS = {"iouThreshold": "iou_threshold", "skipBoxThreshold": "skip_box_threshold", "sigma": "sigma"}
_DEDUP_KEYS = {"threshold": "iouThreshold", "skip_box_threshold": "skipBoxThreshold", "sigma": "sigma"}
_OSML_DEFAULTS = {  # common/mr_post_processing.py: FeatureDistillationNMS, FeatureDistillationSoftNMS
    DistillationAlgorithm.NMS: {"threshold": 0.75},
    DistillationAlgorithm.SOFT_NMS: {"threshold": 0.75, "skip_box_threshold": 0.0001, "sigma": 0.1},
}


@dataclass(frozen=True)
class PostProcessing:
    """OSML's FEATURE_DISTILLATION step; ``algorithm`` None means no de-duplication. Unset numbers take OSML's
    defaults (NMS: iou 0.75; SOFT_NMS: iou 0.75, skipBox 0.0001, sigma 0.1); boxes compare by IoU within a class."""

    algorithm: DistillationAlgorithm | None = DistillationAlgorithm.NMS
    iou_threshold: float | None = None
    skip_box_threshold: float | None = None
    sigma: float | None = None

    def dedup(self) -> DedupConfig:
        if self.algorithm is None:
            return DedupConfig(method="none", metric="iou")
        given = {"threshold": self.iou_threshold, "skip_box_threshold": self.skip_box_threshold, "sigma": self.sigma}
        fields = {**_OSML_DEFAULTS[self.algorithm], **{k: v for k, v in given.items() if v is not None}}
        method = "soft-nms" if self.algorithm is DistillationAlgorithm.SOFT_NMS else "nms"
        return DedupConfig(method=method, metric="iou", class_aware=True, **fields)

    @classmethod
    def parse(cls, value: Any) -> PostProcessing:
        """OSML's default NMS when absent; an empty list means no de-duplication."""
        found = cls() if value is None else cls(algorithm=None)
        for i, step in enumerate(() if value is None else _typed(value, "postProcessing", tuple)):
            at = f"postProcessing[{i}]"
            name = _typed(step, at, dict).get("step")
            if name != "FEATURE_DISTILLATION" or found.algorithm is not None:
                raise RequestError(f"{at}.step", name, "must be FEATURE_DISTILLATION, once")
            found = cls._parse_algorithm(_typed(step.get("algorithm"), f"{at}.algorithm", dict), f"{at}.algorithm")
        return found

    @classmethod
    def _parse_algorithm(cls, algorithm: FrozenDict, at: str) -> PostProcessing:
        fields = {}
        for key, value in algorithm.items():  # camelCase as documented; snake_case as OSML also accepts
            name = _ALGORITHM_KEYS.get(key, key if key in _ALGORITHM_KEYS.values() else None)
            if name is not None:
                fields[name] = _number(value, f"{at}.{key}")
            elif key not in ("algorithmType", "algorithm_type"):
                raise RequestError(f"{at}.{key}", value, f"unknown field; allowed: algorithmType, "
                                   f"{', '.join(_ALGORITHM_KEYS)}")
        kind = algorithm.get("algorithmType", algorithm.get("algorithm_type"))
        result = cls(_choice(DistillationAlgorithm, kind, f"{at}.algorithmType"), **fields)
        try:
            result.dedup()
        except InvalidInputError as error:
            raise RequestError(f"{at}.{_DEDUP_KEYS.get(error.field, error.field)}", error.value, error.reason) from None
        return result

    def to_message(self) -> list:
        if self.algorithm is None:
            return []
        numbers = _present(iouThreshold=self.iou_threshold, skipBoxThreshold=self.skip_box_threshold, sigma=self.sigma)
        return [{"step": "FEATURE_DISTILLATION", "algorithm": {"algorithmType": self.algorithm.value, **numbers}}]

