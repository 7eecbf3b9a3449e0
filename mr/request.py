"""Requests in the OversightML ModelRunner (OSML) message format: parse, validate, freeze, and hand to ``mr.detect``.

Field names, enum values and defaults follow OSML (``api/image_request.py``, ``api/region_request.py``,
``common/typing.py``, ``common/mr_post_processing.py``, ``MODELRUNNER_API.md``) so an OSML client can switch
unchanged. Every invalid message raises one exception, :class:`RequestError`, naming the field by its path in the
message (``outputs[1].bucket``), the bad value and what is allowed; nothing else escapes the parsers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from mr.errors import InvalidInputError
from mr.merge import DedupConfig

MAX_BODY_BYTES = 256 * 1024
MAX_TILE_SIZE = 16384
MAX_DEPTH = 32
_SM_ENDPOINT = re.compile(r"[A-Za-z0-9](-*[A-Za-z0-9]){0,62}")
_HTTP_ENDPOINT = re.compile(r"https?://[^/\s]+(/\S*)?")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KINESIS_STREAM = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_JOB_ID = re.compile(r"[^\s/\\]{1,256}")
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d{1,12}\s*")
_URLS = "a local path, file:///path, s3://bucket/key or http(s)://host/path"
Body = str | bytes | Mapping[str, Any]


class RequestError(InvalidInputError):
    """A request message that can never work as given; ``field`` is the path in the message, in OSML's names."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(field, _thaw(value), reason)
        shown = repr(value)
        if len(shown) > 200:  # a 200 KiB value must not become a 200 KiB log line
            self.args = (f"{field}={shown[:200]}... ({len(shown)} characters): {reason}",)

    def __reduce__(self):
        return type(self), (self.field, self.value, self.reason)


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


class FrozenDict(dict):
    """A dict that cannot change: hashable, picklable, and written by ``json`` as an object."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a parsed request is immutable")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return FrozenDict, (dict(self),)


# ---- the message as frozen JSON ----------------------------------------------------------------------------------

def _freeze(value: Any, where: str = "", depth: int = 0) -> Any:
    """A JSON value as immutable data (objects → FrozenDict, arrays → tuples); anything else is a RequestError."""
    if depth > MAX_DEPTH:
        raise RequestError(where, "...", f"is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        bad = [key for key in value if not isinstance(key, str)]
        if bad:
            raise RequestError(where or "body", bad[0], "object keys must be strings")
        return FrozenDict({k: _freeze(v, f"{where}.{k}" if where else k, depth + 1) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(where, value, "must be valid Unicode text (no lone surrogates)") from None
        return value
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise RequestError(where, value, "must be JSON: an object, array, string, finite number, true, false or null")


def _thaw(value: Any) -> Any:
    """Frozen data back to plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _reject_constant(name: str) -> None:
    raise RequestError("body", name, "NaN and Infinity are not JSON numbers")


def _load(body: Body) -> FrozenDict:
    """The message as a frozen JSON object: UTF-8 JSON text (str or bytes) or a dict, at most MAX_BODY_BYTES."""
    too_big = f"must be at most {MAX_BODY_BYTES} bytes"
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
        if len(body) > MAX_BODY_BYTES:
            raise RequestError("body", f"<{len(body)} bytes>", too_big)
        try:
            body = body.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            bad = body[error.start:error.start + 8]
            raise RequestError("body", bad, f"is not UTF-8 text (byte {error.start})") from None
    if isinstance(body, str):
        if len(body) > MAX_BODY_BYTES or len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
            raise RequestError("body", f"<{len(body)} characters>", too_big)
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except RequestError:
            raise
        except (ValueError, RecursionError) as error:
            raise RequestError("body", body, f"is not valid JSON ({error})") from None
    elif isinstance(body, Mapping):
        data = body
    else:
        raise RequestError("body", type(body).__name__, "give the message as JSON text (str or bytes) or a dict")
    if not isinstance(data, Mapping):
        raise RequestError("body", data, 'must be a JSON object: {"jobId": ..., "imageUrls": [...], ...}')
    message = _freeze(data)
    if not isinstance(body, str) and len(json.dumps(message).encode("utf-8")) > MAX_BODY_BYTES:
        raise RequestError("body", "<dict>", too_big)
    return message


# ---- one field at a time -----------------------------------------------------------------------------------------

def _required(obj: Mapping[str, Any], key: str, where: str, example: str) -> Any:
    if obj.get(key) is None:
        raise RequestError(where, None, f"is required, e.g. {example}")
    return obj[key]


def _string(value: Any, where: str, *, optional: bool = False, max_len: int = 2048) -> str:
    """Text without control characters; ``optional``: null is "" and "" is fine."""
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(where, value, "must be a string")
    if not optional and not value.strip():
        raise RequestError(where, value, "must not be empty")
    if len(value) > max_len or any(ord(c) < 32 for c in value):
        raise RequestError(where, value, f"must be at most {max_len} characters, with no control characters")
    return value


def _typed(value: Any, where: str, kind: type) -> Any:
    """An object (``FrozenDict``) or an array (``tuple``) of the frozen message."""
    if not isinstance(value, kind):
        raise RequestError(where, value, f"must be a JSON {'object {...}' if kind is dict else 'array [...]'}")
    return value


def _integer(value: Any, where: str, low: int, high: int) -> int:
    """A whole number in [low, high]; like OSML, numeric strings ("512") and integral floats are accepted."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    whole |= (isinstance(value, float) and value.is_integer()) or bool(
        isinstance(value, str) and _INTEGER_TEXT.fullmatch(value))
    number = int(value) if whole else None
    if number is None or not low <= number <= high:
        raise RequestError(where, value, f"must be a whole number from {low} to {high}")
    return number


def _number(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300:
        return float(value)
    raise RequestError(where, value, "must be a number")


def _choice(kind: Any, value: Any, where: str, default: Any = None) -> Any:
    """An enum member by its exact value; null or "" gives the default (as OSML) where there is one."""
    if (value is None or value == "") and default is not None:
        return default
    try:
        return kind(value)
    except (ValueError, TypeError):
        raise RequestError(where, value, f"must be one of {', '.join(m.value for m in kind)}") from None


def _role(value: Any, where: str) -> str:
    """An IAM role ARN, or "" for none (OSML requires the "arn:" prefix)."""
    if value is None or value == "":
        return ""
    if not _string(value, where).startswith("arn:"):
        raise RequestError(where, value, "must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return value


def _job_id(value: Any, where: str) -> str:
    if not _JOB_ID.fullmatch(_string(value, where, max_len=256)) or value in (".", ".."):
        raise RequestError(where, value, "must be 1-256 characters without spaces, '/' or '\\' (e.g. a UUID)")
    return value


def _image_url(value: Any, where: str) -> str:
    text = _string(value, where)
    if "://" not in text:
        return text  # a local path
    try:
        parts = urlsplit(text)
    except ValueError:
        raise RequestError(where, value, f"is not a valid URL; give {_URLS}") from None
    scheme, host, path = parts.scheme.lower(), parts.netloc, parts.path.strip("/")
    if not {"file": host in ("", "localhost") and path, "s3": host and path, "http": host, "https": host}.get(scheme):
        raise RequestError(where, value, f"unsupported image URL; give {_URLS}")
    return text


def _string_map(value: Any, where: str) -> FrozenDict:
    for key, item in _typed(FrozenDict() if value is None else value, where, dict).items():
        if not isinstance(item, str):
            raise RequestError(f"{where}.{key}", item, 'must be a string, e.g. {"TargetVariant": "AllTraffic"}')
    return FrozenDict() if value is None else value


def _tiling(size: Any, overlap: Any, where: tuple[str, str], pair: bool) -> tuple[Any, Any]:
    """Tile size (default 1024, at most MAX_TILE_SIZE) and overlap (default 50, 0 or more, less than the size)."""
    def read(value: Any, at: str, default: int, low: int) -> tuple[int, ...]:
        if value is None:
            return (default, default)
        items = value if pair and isinstance(value, tuple) else (value, value)
        if len(items) != 2:
            raise RequestError(at, value, "must be one size or a [width, height] pair")
        return tuple(_integer(v, at, low, MAX_TILE_SIZE) for v in items)

    sizes, laps = read(size, where[0], 1024, 1), read(overlap, where[1], 50, 0)
    for s, o in zip(sizes, laps):
        if o >= s:
            raise RequestError(where[1], overlap, f"must be less than the tile size ({s})")
    return (sizes, laps) if pair else (sizes[0], laps[0])


def _present(**fields: Any) -> dict[str, Any]:
    """Message fields that carry something (OSML leaves unset ones out)."""
    return {key: value for key, value in fields.items() if value not in (None, "", [], {})}


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


def _roi(value: Any, where: str) -> str | None:
    """A WKT (Multi)Polygon in lon/lat degrees, kept as given; null or "" means the whole image."""
    if value is None or value == "":
        return None
    from mr.roi import parse_polygon

    try:
        x0, y0, x1, y1 = parse_polygon(_string(value, where, max_len=MAX_BODY_BYTES)).bounds
    except InvalidInputError as error:
        raise RequestError(where, value, error.reason) from None
    if not (-180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90):
        raise RequestError(where, value, "coordinates must be longitude in [-180, 180], latitude in [-90, 90]")
    return value


def _shared(m: FrozenDict, names: str, pair: bool) -> dict[str, Any]:
    """The fields both requests carry, under their names in the message (read role, parameters, tiling)."""
    role, parameters, size, overlap, tile_format, compression = names.split()
    tile_size, tile_overlap = _tiling(m.get(size), m.get(overlap), (size, overlap), pair)
    return {
        "image_read_role": _role(m.get(role), role),
        "image_processor_parameters": _string_map(m.get(parameters), parameters),
        "tile_size": tile_size, "tile_overlap": tile_overlap, "raw": m,
        "tile_format": _choice(TileFormat, m.get(tile_format), tile_format, TileFormat.NITF),
        "tile_compression": _choice(TileCompression, m.get(compression), compression, TileCompression.NONE),
    }


# ---- requests ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """An OSML ImageRequest: every image in ``image_urls`` is processed with the same model, tiling and outputs."""

    job_id: str
    job_name: str = ""
    image_urls: tuple[str, ...]
    image_read_role: str = ""
    outputs: tuple[Output, ...]
    image_processor: ImageProcessor
    image_processor_parameters: FrozenDict = field(default_factory=FrozenDict)
    tile_size: int = 1024
    tile_overlap: int = 50
    tile_format: TileFormat = TileFormat.NITF
    tile_compression: TileCompression = TileCompression.NONE
    region_of_interest: str | None = None
    feature_properties: tuple[FrozenDict, ...] = ()
    post_processing: PostProcessing = PostProcessing()
    raw: FrozenDict = field(default_factory=FrozenDict, compare=False, repr=False)
    """The message as received, frozen; ``json.dumps(raw)`` gives it back for the job record."""

    @classmethod
    def from_message(cls, body: Body) -> ImageRequest:
        """Parse and validate an OSML image request; any problem is a :class:`RequestError`."""
        m = _load(body)
        job_id = _job_id(_required(m, "jobId", "jobId", '"6c3a2f0e-..."'), "jobId")
        urls = _typed(_required(m, "imageUrls", "imageUrls", '["s3://bucket/image.ntf"]'), "imageUrls", tuple)
        if not urls:
            raise RequestError("imageUrls", [], 'needs at least one image URL, e.g. ["s3://bucket/image.ntf"]')
        urls, outputs = tuple(_image_url(url, f"imageUrls[{i}]") for i, url in enumerate(urls)), _outputs(m)
        given = _typed(_required(m, "imageProcessor", "imageProcessor", '{"name": "builtin", "type": "LOCAL"}'),
                       "imageProcessor", dict)
        processor = ImageProcessor.parse(given.get("name"), given.get("type"), given.get("assumedRole"),
                                         ("imageProcessor.name", "imageProcessor.type", "imageProcessor.assumedRole"))
        properties = m.get("featureProperties")
        properties = () if properties is None else _typed(properties, "featureProperties", tuple)
        return cls(
            job_id=job_id, job_name=_string(m.get("jobName"), "jobName", optional=True, max_len=1024),
            image_urls=urls, outputs=outputs, image_processor=processor,
            region_of_interest=_roi(m.get("regionOfInterest"), "regionOfInterest"),
            feature_properties=tuple(_typed(p, f"featureProperties[{i}]", dict) for i, p in enumerate(properties)),
            post_processing=PostProcessing.parse(m.get("postProcessing")),
            **_shared(m, "imageReadRole imageProcessorParameters imageProcessorTileSize imageProcessorTileOverlap "
                      "imageProcessorTileFormat imageProcessorTileCompression", pair=False),
        )

    @property
    def dedup(self) -> DedupConfig:
        """How features found twice where tiles overlap are merged (OSML's postProcessing)."""
        return self.post_processing.dedup()

    @property
    def image_ids(self) -> tuple[str, ...]:
        """OSML's image ids, ``<jobId>:<imageUrl>``, one per image."""
        return tuple(f"{self.job_id}:{url}" for url in self.image_urls)

    def detect_options(self, model: Any = None) -> dict[str, Any]:
        """Keyword arguments for ``mr.detect(url, **options)``, one call per URL in ``image_urls``.

        A LOCAL processor names its registered model. For an endpoint, pass the adapter built from
        ``image_processor`` as ``model``: an endpoint request must never silently run the default model.
        """
        if model is None and self.image_processor.type is not ModelInvokeMode.LOCAL:
            raise InvalidInputError("model", None, f"a {self.image_processor.type.value} processor runs through its "
                                    "endpoint adapter: pass it as model=")
        properties: dict[str, Any] = {}
        for item in self.feature_properties:  # OSML sends a list of objects; later ones win
            properties.update(_thaw(item))
        return {"model": self.image_processor.name if model is None else model, "tile_size": self.tile_size,
                "overlap": self.tile_overlap, "roi": self.region_of_interest, "nms": self.dedup,
                "job_id": self.job_id, "feature_properties": properties}

    def to_message(self) -> dict[str, Any]:
        """The request as an OSML message (outputs always in the ``outputs`` form)."""
        return {
            "jobId": self.job_id,
            "imageUrls": list(self.image_urls),
            "outputs": [output.to_message() for output in self.outputs],
            "imageProcessor": self.image_processor.to_message(),
            "imageProcessorTileSize": self.tile_size,
            "imageProcessorTileOverlap": self.tile_overlap,
            "imageProcessorTileFormat": self.tile_format.value,
            "imageProcessorTileCompression": self.tile_compression.value,
            "postProcessing": self.post_processing.to_message(),
            **_present(jobName=self.job_name, imageReadRole=self.image_read_role,
                       imageProcessorParameters=_thaw(self.image_processor_parameters),
                       regionOfInterest=self.region_of_interest, featureProperties=_thaw(self.feature_properties)),
        }


@dataclass(frozen=True, kw_only=True)
class RegionRequest:
    """An OSML RegionRequest: the region queue's message, in OSML's snake_case names, sizes as (width, height)."""

    region_id: str = ""
    image_id: str
    image_extension: str = ""
    job_id: str
    image_url: str
    image_read_role: str = ""
    image_processor: ImageProcessor
    image_processor_parameters: FrozenDict = field(default_factory=FrozenDict)
    tile_size: tuple[int, int] = (1024, 1024)
    tile_overlap: tuple[int, int] = (50, 50)
    tile_format: TileFormat = TileFormat.NITF
    tile_compression: TileCompression = TileCompression.NONE
    region_bounds: tuple[tuple[int, int], tuple[int, int]]
    """Upper-left corner (row, column) and size (width, height) in pixels, as OSML."""
    raw: FrozenDict = field(default_factory=FrozenDict, compare=False, repr=False)

    @classmethod
    def from_message(cls, body: Body) -> RegionRequest:
        """Parse and validate an OSML region request; any problem is a :class:`RequestError`."""
        m = _load(body)
        names = ("model_name", "model_invoke_mode", "model_invocation_role")
        return cls(
            job_id=_job_id(_required(m, "job_id", "job_id", '"6c3a2f0e-..."'), "job_id"),
            image_id=_string(_required(m, "image_id", "image_id", '"<jobId>:<imageUrl>"'), "image_id"),
            image_url=_image_url(_required(m, "image_url", "image_url", '"s3://bucket/image.ntf"'), "image_url"),
            region_id=_string(m.get("region_id"), "region_id", optional=True),
            image_extension=_string(m.get("image_extension"), "image_extension", optional=True),
            image_processor=ImageProcessor.parse(*(m.get(name) for name in names), names),
            region_bounds=_region_bounds(_required(m, "region_bounds", "region_bounds", "[[0, 0], [4096, 4096]]")),
            **_shared(m, "image_read_role model_endpoint_parameters tile_size tile_overlap tile_format "
                      "tile_compression", pair=True),
        )

    def to_message(self) -> dict[str, Any]:
        """The request as OSML's region message."""
        return {
            "region_id": self.region_id, "image_id": self.image_id, "image_extension": self.image_extension,
            "job_id": self.job_id, "image_url": self.image_url, "image_read_role": self.image_read_role,
            "model_name": self.image_processor.name, "model_invoke_mode": self.image_processor.type.value,
            "model_endpoint_parameters": _thaw(self.image_processor_parameters) or None,
            "model_invocation_role": self.image_processor.assumed_role,
            "tile_size": list(self.tile_size), "tile_overlap": list(self.tile_overlap),
            "tile_format": self.tile_format.value, "tile_compression": self.tile_compression.value,
            "region_bounds": [list(self.region_bounds[0]), list(self.region_bounds[1])],
        }


def _region_bounds(value: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """((row, column), (width, height)) with width and height at least 1."""
    pairs = _typed(value, "region_bounds", tuple)
    if len(pairs) != 2 or any(not isinstance(p, tuple) or len(p) != 2 for p in pairs):
        raise RequestError("region_bounds", value, "must be [[row, column], [width, height]]")
    row, col = (_integer(v, "region_bounds[0]", 0, 2**31 - 1) for v in pairs[0])
    width, height = (_integer(v, "region_bounds[1]", 1, 2**31 - 1) for v in pairs[1])
    return (row, col), (width, height)
