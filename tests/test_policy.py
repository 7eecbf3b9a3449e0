"""Allow-lists: a request cannot reach local files, endpoints, buckets or streams the operator did not allow."""

from __future__ import annotations

import json
import os

import pytest

from mr.policy import Policy, check_request
from mr.request import ImageRequest, RequestError


def request(tmp_path, **changes) -> ImageRequest:
    message = {
        "jobId": "job-1",
        "imageUrls": [str(tmp_path / "images" / "a.tif")],
        "outputs": [{"type": "File", "path": str(tmp_path / "out" / "a.geojson")}],
        "imageProcessor": {"name": "builtin", "type": "LOCAL"},
        **changes,
    }
    return ImageRequest.from_message(json.dumps(message))


def test_no_policy_allows_everything(tmp_path):
    check_request(request(tmp_path), Policy())


def test_paths_inside_the_roots_pass_and_escapes_do_not(tmp_path):
    policy = Policy(local_roots=(str(tmp_path.resolve()),))
    check_request(request(tmp_path), policy)
    escapes = [
        {"imageUrls": [str(tmp_path / ".." / "elsewhere.tif")]},
        {"imageUrls": ["file:///etc/passwd"]},
        {"outputs": [{"type": "File", "path": "/tmp/../etc/x.geojson"}]},
    ]
    fields = ["imageUrls[0]", "imageUrls[0]", "outputs[0].path"]
    for change, field in zip(escapes, fields):
        with pytest.raises(RequestError) as error:
            check_request(request(tmp_path, **change), policy)
        assert error.value.field == field


def test_a_symbolic_link_out_of_a_root_is_an_escape(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/etc", root / "link")
    with pytest.raises(RequestError, match="imageUrls"):
        check_request(request(tmp_path, imageUrls=[str(root / "link" / "hosts")]), Policy(local_roots=(str(root),)))


def test_remote_images_are_not_local_paths(tmp_path):
    check_request(request(tmp_path, imageUrls=["s3://bucket/a.tif"]), Policy(local_roots=(str(tmp_path),)))


def test_endpoints_buckets_and_streams(tmp_path):
    policy = Policy(endpoints=("https://models.internal/*",), buckets=("results-*",), streams=("features",))
    ok = request(
        tmp_path,
        imageProcessor={"name": "https://models.internal/vehicles", "type": "HTTP_ENDPOINT"},
        outputs=[{"type": "S3", "bucket": "results-prod"}, {"type": "Kinesis", "stream": "features"}],
    )
    check_request(ok, policy)
    bad = [
        ({"imageProcessor": {"name": "https://evil.example/x", "type": "HTTP_ENDPOINT"}}, "imageProcessor.name"),
        ({"outputs": [{"type": "S3", "bucket": "someone-else"}]}, "outputs[0].bucket"),
        ({"outputs": [{"type": "Kinesis", "stream": "other"}]}, "outputs[0].stream"),
    ]
    for change, field in bad:
        with pytest.raises(RequestError) as error:
            check_request(request(tmp_path, **change), policy)
        assert error.value.field == field
