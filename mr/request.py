"""Requests in the OversightML ModelRunner (OSML) message format: parse, validate, freeze, and hand to ``mr.detect``.

Field names, enum values and defaults follow OSML (``api/image_request.py``, ``api/region_request.py``,
``common/typing.py``, ``common/mr_post_processing.py``, ``MODELRUNNER_API.md``) so an OSML client can switch
unchanged. Every invalid message raises one exception, :class:`RequestError`, naming the field by its path in the
message (``outputs[1].bucket``), the bad value and what is allowed; nothing else escapes the parsers.

This module holds the two requests and is the import point for everything about them: the field readers live in
:mod:`mr.request_fields`, the enums and parts (outputs, processor, post-processing) in :mod:`mr.request_parts`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mr.errors import InvalidInputError
from mr.merge import DedupConfig
from mr.request_fields import (
    MAX_BODY_BYTES,
    MAX_DEPTH,
    MAX_TILE_SIZE,
    Body,
    FrozenDict,
    RequestError,
    _choice,
    _image_url,
    _integer,
    _job_id,
    _load,
    _present,
    _required,
    _roi,
    _role,
    _string,
    _string_map,
    _thaw,
    _tiling,
    _typed,
)
from mr.request_parts import (
    DistillationAlgorithm,
    FileOutput,
    ImageProcessor,
    KinesisOutput,
    ModelInvokeMode,
    Output,
    PostProcessing,
    RequestStatus,
    S3Output,
    SinkType,
    TileCompression,
    TileFormat,
    _outputs,
)

__all__ = [
    "MAX_BODY_BYTES", "MAX_DEPTH", "MAX_TILE_SIZE", "Body", "DistillationAlgorithm", "FileOutput", "FrozenDict",
    "ImageProcessor", "ImageRequest", "KinesisOutput", "ModelInvokeMode", "Output", "PostProcessing", "RegionRequest",
    "RequestError", "RequestStatus", "S3Output", "SinkType", "TileCompression", "TileFormat",
]


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
    post_processing: PostProcessing = PostProcessing()  # noqa: RUF009 (a frozen dataclass: one shared default is safe)
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
