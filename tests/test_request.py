"""OSML-compatible request messages: round trips, OSML's defaults, and one clear error for every bad message."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import dask.config
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mr.errors import InvalidInputError
from mr.merge import DedupConfig
from mr.request import (
    MAX_BODY_BYTES,
    MAX_TILE_SIZE,
    FileOutput,
    ImageProcessor,
    ImageRequest,
    KinesisOutput,
    ModelInvokeMode,
    RegionRequest,
    RequestError,
    RequestStatus,
    S3Output,
    SinkType,
    TileCompression,
    TileFormat,
)
from tests.messages import DROP, put

ROLE = "arn:aws:iam::012345678910:role/ModelRunner"
FULL = {
    "jobName": "aircraft-run",
    "jobId": "5b2d1c4e-1f0a-4d5e-9a57-2f1f1f1f1f1f",
    "imageUrls": ["s3://imagery/scene.ntf", "https://example.com/b.tif", "file:///data/c.tif", "/data/d.tif"],
    "imageReadRole": ROLE,
    "outputs": [
        {"type": "S3", "bucket": "results-bucket", "prefix": "aircraft-run/", "assumedRole": ROLE},
        {"type": "Kinesis", "stream": "results-stream", "batchSize": 1000, "assumedRole": ROLE},
        {"type": "File", "path": "out/run.geojson"},
    ],
    "imageProcessor": {"name": "aircraft-detector", "type": "SM_ENDPOINT", "assumedRole": ROLE},
    "imageProcessorParameters": {"TargetVariant": "AllTraffic"},
    "imageProcessorTileSize": 2048,
    "imageProcessorTileOverlap": 100,
    "imageProcessorTileFormat": "GTIFF",
    "imageProcessorTileCompression": "LZW",
    "regionOfInterest": "POLYGON ((10 20, 11 20, 11 21, 10 21, 10 20))",
    "featureProperties": [{"modelName": "aircraft", "modelVersion": "1.2"}, {"team": "geo", "modelVersion": "1.3"}],
    "postProcessing": [{"step": "FEATURE_DISTILLATION", "algorithm": {
        "algorithmType": "SOFT_NMS", "iouThreshold": 0.5, "skipBoxThreshold": 0.05, "sigma": 0.2}}],
}
MINIMAL = {  # MODELRUNNER_API.md's required fields only
    "jobId": "job-1",
    "imageUrls": ["s3://imagery/scene.ntf"],
    "outputs": [{"type": "S3", "bucket": "results-bucket", "prefix": "run/"}],
    "imageProcessor": {"name": "aircraft-detector"},
}
REGION = {  # what OSML puts on its region queue: json.dumps(RegionRequest(...).__dict__)
    "region_id": "(0, 0)(4096, 4096)-job-1", "image_id": "job-1:s3://imagery/scene.ntf", "image_extension": "NITF",
    "job_id": "job-1", "image_url": "s3://imagery/scene.ntf", "image_read_role": ROLE,
    "model_name": "aircraft-detector", "model_invoke_mode": "SM_ENDPOINT", "model_endpoint_parameters": None,
    "model_invocation_role": "", "tile_size": [1024, 1024], "tile_overlap": [50, 50], "tile_format": "NITF",
    "tile_compression": "NONE", "region_bounds": [[0, 0], [4096, 4096]],
}


def with_changes(message: dict, **changes) -> dict:
    """A deep copy of message with changes: a path like outputs__1__bucket → a new value, or DROP to remove it."""
    result = copy.deepcopy(message)
    for path, value in changes.items():
        put(result, path.split("__"), value)
    return result



def test_full_message_round_trips():
    request = ImageRequest.from_message(json.dumps(FULL))
    assert request.to_message() == FULL
    assert ImageRequest.from_message(request.to_message()) == request
    assert ImageRequest.from_message(json.dumps(FULL).encode()) == request
    assert ImageRequest.from_message(FULL) == request
    assert json.loads(json.dumps(request.raw)) == FULL  # frozen, and still plain JSON for the job record
    assert request.image_urls == tuple(FULL["imageUrls"])
    assert request.outputs == (
        S3Output("results-bucket", "aircraft-run/", ROLE), KinesisOutput("results-stream", 1000, ROLE),
        FileOutput("out/run.geojson"))
    assert request.image_processor == ImageProcessor("aircraft-detector", ModelInvokeMode.SM_ENDPOINT, ROLE)
    assert (request.tile_size, request.tile_overlap) == (2048, 100)
    assert (request.tile_format, request.tile_compression) == (TileFormat.GTIFF, TileCompression.LZW)
    assert request.dedup == DedupConfig("soft-nms", 0.5, "iou", True, 0.2, 0.05)
    assert request.image_ids[0] == f"{FULL['jobId']}:s3://imagery/scene.ntf"


def test_parsed_request_is_immutable_hashable_and_picklable():
    request = ImageRequest.from_message(FULL)
    assert pickle.loads(pickle.dumps(request)) == request
    assert hash(pickle.loads(pickle.dumps(request))) == hash(request)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.job_id = "other"
    with pytest.raises(TypeError):
        request.raw["jobId"] = "other"
    with pytest.raises(TypeError):
        request.feature_properties[0]["team"] = "other"
    error = RequestError("outputs[1].bucket", "B", "must be lowercase")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_defaults_match_osml():
    request = ImageRequest.from_message(MINIMAL)
    assert (request.tile_size, request.tile_overlap) == (1024, 50)
    assert (request.tile_format, request.tile_compression) == (TileFormat.NITF, TileCompression.NONE)
    assert request.image_processor.type is ModelInvokeMode.SM_ENDPOINT
    assert request.dedup == DedupConfig(method="nms", threshold=0.75, metric="iou", class_aware=True)
    assert (request.job_name, request.image_read_role, request.region_of_interest) == ("", "", None)
    assert request.feature_properties == () and dict(request.image_processor_parameters) == {}
    again = ImageRequest.from_message(request.to_message())
    assert again == request


def test_osml_spellings_are_accepted():
    request = ImageRequest.from_message(with_changes(
        MINIMAL, imageProcessorTileSize="512", imageProcessorTileOverlap=0, imageProcessorTileFormat="",
        postProcessing=[{"step": "FEATURE_DISTILLATION", "algorithm": {"algorithm_type": "SOFT_NMS"}}]))
    assert (request.tile_size, request.tile_overlap, request.tile_format) == (512, 0, TileFormat.NITF)
    assert request.dedup == DedupConfig("soft-nms", 0.75, "iou", True, sigma=0.1, skip_box_threshold=0.0001)


def test_post_processing_choices():
    assert ImageRequest.from_message({**MINIMAL, "postProcessing": []}).dedup.method == "none"
    nms = {"step": "FEATURE_DISTILLATION", "algorithm": {"algorithmType": "NMS", "iouThreshold": 0.5,
                                                         "skipBoxThreshold": 0.1}}  # MODELRUNNER_API.md's example
    request = ImageRequest.from_message({**MINIMAL, "postProcessing": [nms]})
    assert (request.dedup.method, request.dedup.threshold) == ("nms", 0.5)
    assert request.to_message()["postProcessing"] == [nms]


def test_legacy_output_bucket_and_prefix():
    legacy = {**with_changes(MINIMAL, outputs=DROP), "outputBucket": "legacy-bucket", "outputPrefix": "out/"}
    assert ImageRequest.from_message(legacy).outputs == (S3Output("legacy-bucket", "out/"),)
    assert ImageRequest.from_message({**legacy, "outputs": []}).outputs == (S3Output("legacy-bucket", "out/"),)
    assert ImageRequest.from_message({**legacy, **MINIMAL}).outputs == (S3Output("results-bucket", "run/"),)
    assert ImageRequest.from_message(legacy).to_message()["outputs"] == [
        {"type": "S3", "bucket": "legacy-bucket", "prefix": "out/"}]
    for key, field in (("outputPrefix", "outputPrefix"), ("outputBucket", "outputBucket")):
        with pytest.raises(RequestError) as caught:
            ImageRequest.from_message(with_changes(legacy, **{key: DROP}))
        assert caught.value.field == field
    s3_role = with_changes(MINIMAL, outputs__0__role=ROLE)  # OSML's SinkFactory reads "role" for S3
    assert ImageRequest.from_message(s3_role).outputs[0].assumed_role == ROLE


BAD_FIELDS = [  # (where to change FULL, the bad value, the field the error must name)
    ("jobId", DROP, "jobId"), ("jobId", 5, "jobId"), ("jobId", "a/b", "jobId"), ("jobId", " ", "jobId"),
    ("jobName", 5, "jobName"), ("imageReadRole", "ReadRole", "imageReadRole"),
    ("imageUrls", DROP, "imageUrls"), ("imageUrls", [], "imageUrls"), ("imageUrls", "s3://b/k", "imageUrls"),
    ("imageUrls__1", "ftp://host/x.tif", "imageUrls[1]"), ("imageUrls__0", "s3://bucket-only", "imageUrls[0]"),
    ("imageUrls__0", 7, "imageUrls[0]"), ("imageUrls__3", "/data/\x00.tif", "imageUrls[3]"),
    ("outputs", DROP, "outputs"), ("outputs", [], "outputs"), ("outputs", {"type": "S3"}, "outputs"),
    ("outputs__1", "S3", "outputs[1]"), ("outputs__1__type", "SQS", "outputs[1].type"),
    ("outputs__1__type", "kinesis", "outputs[1].type"), ("outputs__0__bucket", DROP, "outputs[0].bucket"),
    ("outputs__0__bucket", "Bad_Bucket", "outputs[0].bucket"), ("outputs__0__prefix", 3, "outputs[0].prefix"),
    ("outputs__0__assumedRole", "role", "outputs[0].assumedRole"), ("outputs__1__stream", DROP, "outputs[1].stream"),
    ("outputs__1__batchSize", 10**12, "outputs[1].batchSize"), ("outputs__1__batchSize", 0, "outputs[1].batchSize"),
    ("outputs__2__path", "out/run.txt", "outputs[2].path"),
    ("imageProcessor", DROP, "imageProcessor"), ("imageProcessor", "aircraft", "imageProcessor"),
    ("imageProcessor__name", DROP, "imageProcessor.name"), ("imageProcessor__name", "no spaces", "imageProcessor.name"),
    ("imageProcessor__type", "SM_ENDPOINT_ASYNC", "imageProcessor.type"),
    ("imageProcessor__type", "HTTP_ENDPOINT", "imageProcessor.name"),  # the name is no URL
    ("imageProcessor__assumedRole", 5, "imageProcessor.assumedRole"),
    ("imageProcessorParameters", "TargetVariant", "imageProcessorParameters"),
    ("imageProcessorParameters", {"TargetVariant": 1}, "imageProcessorParameters.TargetVariant"),
    *[("imageProcessorTileSize", v, "imageProcessorTileSize")
      for v in (-1, 0, MAX_TILE_SIZE + 1, 10**30, 1e300, "big", 1.5, True, [512])],
    *[("imageProcessorTileOverlap", v, "imageProcessorTileOverlap") for v in (2048, 5000, -5, "x", 0.5)],
    ("imageProcessorTileFormat", "TIFF", "imageProcessorTileFormat"),
    ("imageProcessorTileFormat", "gtiff", "imageProcessorTileFormat"),
    ("imageProcessorTileCompression", "ZIP", "imageProcessorTileCompression"),
    *[("regionOfInterest", v, "regionOfInterest") for v in (
        "POLYGON ((", "POINT (1 2)", "POLYGON EMPTY", "POLYGON ((10 95, 11 95, 11 96, 10 95))", 5, ["POLYGON"])],
    ("featureProperties", {"team": "geo"}, "featureProperties"), ("featureProperties", [1], "featureProperties[0]"),
    ("featureProperties", False, "featureProperties"),
    ("postProcessing", {"step": "FEATURE_DISTILLATION"}, "postProcessing"),
    ("postProcessing__0__step", "OTHER", "postProcessing[0].step"),
    ("postProcessing__0__algorithm", DROP, "postProcessing[0].algorithm"),
    *[(f"postProcessing__0__algorithm__{key}", value, f"postProcessing[0].algorithm.{key}") for key, value in (
        ("algorithmType", "WBF"), ("algorithmType", DROP), ("iouThreshold", 1.5), ("iouThreshold", "0.5"),
        ("sigma", 0), ("skipBoxThreshold", -1), ("iou", 0.5))],
]


@pytest.mark.parametrize("where, value, field", BAD_FIELDS, ids=[f"{f}-{i}" for i, (*_, f) in enumerate(BAD_FIELDS)])
def test_each_invalid_field_is_one_request_error_naming_it(where, value, field):
    with pytest.raises(RequestError) as caught:
        ImageRequest.from_message(json.dumps(with_changes(FULL, **{where: value})))
    error = caught.value
    assert isinstance(error, InvalidInputError) and isinstance(error, ValueError)
    assert error.field == field
    assert str(error).startswith(f"{field}=") and error.reason in str(error)


def test_a_second_distillation_step_is_refused():
    message = {**MINIMAL, "postProcessing": FULL["postProcessing"] * 2}
    with pytest.raises(RequestError, match=r"^postProcessing\[1\]\.step="):
        ImageRequest.from_message(message)


@pytest.mark.parametrize("body", [
    b"\xff\xfe{}", b'{"jobId": "\xc3"}', "not json", "", "[1, 2]", "null", '"text"', "{" * 100_000, 5, None,
    '{"jobId": NaN}', '{"imageProcessorTileSize": Infinity}', '{"imageProcessorTileSize": 1e400}',
    json.dumps({"jobId": "x" * (MAX_BODY_BYTES + 1)}), json.dumps({**MINIMAL, "pad": "x" * MAX_BODY_BYTES}).encode(),
    {**MINIMAL, "pad": "x" * MAX_BODY_BYTES}, {**MINIMAL, "featureProperties": [{"n": float("nan")}]},
    {1: "non-string key"}, '{"a": "\\ud800"}',
    json.dumps({"deep": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
])
def test_bad_bodies_are_request_errors(body):
    with pytest.raises(RequestError) as caught:
        ImageRequest.from_message(body)
    assert len(str(caught.value)) < 600  # a huge body is shown cut short


def test_local_processors_choose_among_registered_names_only():
    local = with_changes(MINIMAL, imageProcessor={"name": "builtin", "type": "LOCAL"})
    assert ImageRequest.from_message(local).image_processor == ImageProcessor("builtin", ModelInvokeMode.LOCAL)
    for name in ("vehicles", "mr.models.builtin:BuiltinDetector", "os:system", "/tmp/model.onnx"):
        with pytest.raises(RequestError, match=r"^imageProcessor\.name=.*registered: builtin$"):
            ImageRequest.from_message(with_changes(local, imageProcessor__name=name))
    with dask.config.set({"mr.model.registry": {"vehicles": "mypackage.models:Vehicles"}}):
        assert ImageRequest.from_message(with_changes(local, imageProcessor__name="vehicles"))
        with pytest.raises(RequestError, match="registered: builtin, vehicles"):
            ImageRequest.from_message(with_changes(local, imageProcessor__name="trucks"))


def test_detect_options_are_mr_detect_keywords():
    local = with_changes(FULL, imageProcessor={"name": "builtin", "type": "LOCAL"})
    options = ImageRequest.from_message(local).detect_options()
    assert options == {
        "model": "builtin", "tile_size": 2048, "overlap": 100, "roi": FULL["regionOfInterest"],
        "nms": DedupConfig("soft-nms", 0.5, "iou", True, 0.2, 0.05), "job_id": FULL["jobId"],
        "feature_properties": {"modelName": "aircraft", "modelVersion": "1.3", "team": "geo"},
    }
    endpoint = ImageRequest.from_message(FULL)
    with pytest.raises(InvalidInputError, match="model"):
        endpoint.detect_options()  # never silently the default model
    assert endpoint.detect_options(model="adapter")["model"] == "adapter"


def test_detect_options_build_a_detection_graph():
    import numpy as np
    import xarray as xr

    from mr.api import detect

    message = with_changes(MINIMAL, imageProcessor={"name": "builtin", "type": "LOCAL"},
                           imageProcessorTileSize=64, imageProcessorTileOverlap=8)
    image = xr.DataArray(np.zeros((1, 200, 300), np.uint8), dims=("band", "y", "x"))
    with pytest.warns(UserWarning, match="no georeference"):
        result = detect(image, **ImageRequest.from_message(message).detect_options())
    assert result.plan.grid.x.tile == 64 and result.metadata.job_id == "job-1"


def test_region_request_round_trips_osml_region_messages():
    region = RegionRequest.from_message(json.dumps(REGION))
    assert region.region_bounds == ((0, 0), (4096, 4096))
    assert (region.tile_size, region.tile_overlap) == ((1024, 1024), (50, 50))
    assert region.image_processor == ImageProcessor("aircraft-detector", ModelInvokeMode.SM_ENDPOINT)
    assert region.to_message() == REGION
    assert pickle.loads(pickle.dumps(region)) == region
    assert RegionRequest.from_message({**REGION, "tile_size": 512, "tile_overlap": 0}).tile_size == (512, 512)


@pytest.mark.parametrize("where, value, field", [
    ("region_bounds", DROP, "region_bounds"), ("region_bounds", [[0, 0], [0, 0]], "region_bounds[1]"),
    ("region_bounds", [[-1, 0], [10, 10]], "region_bounds[0]"), ("region_bounds", [0, 0], "region_bounds"),
    ("image_url", DROP, "image_url"), ("image_id", "", "image_id"), ("job_id", DROP, "job_id"),
    ("model_name", DROP, "model_name"), ("model_invoke_mode", "NONE", "model_invoke_mode"),
    ("tile_size", [1024, 1024, 3], "tile_size"), ("tile_overlap", [50, 2000], "tile_overlap"),
    ("tile_format", "JPG", "tile_format"), ("model_invocation_role", "x", "model_invocation_role"),
])
def test_invalid_region_requests(where, value, field):
    with pytest.raises(RequestError) as caught:
        RegionRequest.from_message(with_changes(REGION, **{where: value}))
    assert caught.value.field == field


def test_enum_values_are_osml_spellings():
    assert [m.value for m in ModelInvokeMode] == ["SM_ENDPOINT", "HTTP_ENDPOINT", "LOCAL"]
    assert [m.value for m in TileFormat] == ["NITF", "GTIFF", "PNG", "JPEG"]
    assert [m.value for m in TileCompression] == ["NONE", "JPEG", "J2K", "LZW"]
    assert [m.value for m in RequestStatus] == ["STARTED", "IN_PROGRESS", "PARTIAL", "SUCCESS", "FAILED"]
    assert [m.value for m in SinkType] == ["S3", "Kinesis", "File"]
    assert pickle.loads(pickle.dumps(TileFormat.PNG)) is TileFormat.PNG


# ---- fuzzing: whatever arrives, the parser returns a request or raises RequestError -------------------------------

def _paths(value, prefix=()):
    """Every path (tuple of keys and indices) into a JSON value."""
    found = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found += _paths(child, prefix + (key,))
    return found


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["S3", "Kinesis", "File", "LOCAL", "NITF", "NONE", "NMS", "SOFT_NMS", "FEATURE_DISTILLATION",
                       "builtin", "nitf", "SM_ENDPOINT ", "s3://", "arn:", "POLYGON ((0 0, 1 0, 1 1, 0 0))", "512"])
    | st.sampled_from([0, -1, 1, 50, 1024, 16384, 16385, 2**31, 10**400, 1e308, -0.0, 0.5, 1.0]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _mutated(data, message):
    """Drop, replace or add fields at random places, up to three times."""
    result = copy.deepcopy(message)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(result)
        if not paths:
            break
        *parents, last = data.draw(st.sampled_from(paths))
        node = result
        for key in parents:
            node = node[key]
        action = data.draw(st.sampled_from(["drop", "replace", "add"]))
        if action == "drop":
            del node[last]
        elif action == "replace":
            node[last] = data.draw(JSON_VALUES)
        elif isinstance(node, dict):
            node[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
    return result


def _parses_or_request_error(parse, body):
    try:
        request = parse(body)
    except RequestError as error:
        assert error.field and str(error).startswith(error.field)
        return
    assert type(request).from_message(request.to_message()) == request  # what parses, round-trips


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_mutated_image_requests_never_raise_anything_but_request_error(data):
    message = _mutated(data, data.draw(st.sampled_from([FULL, MINIMAL])))
    _parses_or_request_error(ImageRequest.from_message, message)
    _parses_or_request_error(ImageRequest.from_message, json.dumps(message))


@FUZZ
@given(st.data())
def test_mutated_region_requests_never_raise_anything_but_request_error(data):
    message = _mutated(data, REGION)
    _parses_or_request_error(RegionRequest.from_message, message)
    _parses_or_request_error(RegionRequest.from_message, json.dumps(message).encode())


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200) | JSON_VALUES)
def test_arbitrary_bodies_never_raise_anything_but_request_error(body):
    _parses_or_request_error(ImageRequest.from_message, body)
    _parses_or_request_error(RegionRequest.from_message, body)
