"""Outputs: OversightML feature properties in GeoJSON, GeoParquet, atomic writes; and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest

import mr
from mr.errors import SinkError
from mr.output import write_features
from mr.run import compute_table
from mr.synthetic import match_detections, planted_boxes, write_scene


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("out") / "scene.tif"
    planted = write_scene(path, 1200, 1000, n_objects=40, seed=21)
    return path, planted


@pytest.fixture(scope="module")
def result(scene):
    return mr.detect(mr.open_image(scene[0]), tile_size=400, overlap=40, region_size=800, job_id="job-1",
                     feature_properties={"mission": "test"})


def test_geojson_has_oversightml_properties(result, tmp_path, scene):
    table = compute_table(result)
    out = write_features(table, result.metadata, tmp_path / "f.geojson")
    collection = json.loads(out.read_text())
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(table) >= 38
    feature = collection["features"][0]
    props = feature["properties"]
    assert feature["geometry"]["type"] == "Polygon" and len(feature["geometry"]["coordinates"][0][0]) == 3
    assert props["imageGeometry"]["type"] == "Polygon"
    x0, y0, x1, y1 = props["imageBBox"]
    assert x0 < x1 and y0 < y1
    assert props["featureClasses"][0]["iri"] in ("bright-object", "dark-object")
    assert 0 < props["featureClasses"][0]["score"] <= 1
    assert -90 < props["center_latitude"] < 90 and -180 < props["center_longitude"] < 180
    assert props["inferenceMetadata"]["jobId"] == "job-1" and props["inferenceMetadata"]["inferenceDT"]
    assert props["mission"] == "test"
    # the world polygon is the pixel box projected: its centre is the feature's centre
    ring = np.array(feature["geometry"]["coordinates"][0])[:, :2]
    assert np.allclose(ring[:4].mean(axis=0), [props["center_longitude"], props["center_latitude"]], atol=1e-7)
    boxes = np.array([f["properties"]["imageBBox"] for f in collection["features"]])
    assert match_detections(boxes, planted_boxes(scene[1])).recall >= 0.95
    ids = [f["id"] for f in collection["features"]]
    assert len(set(ids)) == len(ids)


def test_geoparquet_round_trip(result, tmp_path):
    table = compute_table(result)
    out = write_features(table, result.metadata, tmp_path / "f.parquet")
    frame = gpd.read_parquet(out)
    assert len(frame) == len(table) and frame.crs.to_epsg() == 4326
    assert {"label", "score", "image_x0", "center_longitude", "image_geometry"} <= set(frame.columns)


def test_a_failed_write_leaves_nothing(result, tmp_path):
    table = compute_table(result)
    target = tmp_path / "f.geojson"
    broken = table.detections.properties
    object.__setattr__(table.detections, "properties", {"bad": np.array([object()] * len(table), dtype=object)})
    try:
        with pytest.raises(SinkError):
            write_features(table, result.metadata, target)
    finally:
        object.__setattr__(table.detections, "properties", broken)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_unknown_output_format_is_an_input_error(result, tmp_path):
    with pytest.raises(mr.InvalidInputError, match="output path"):
        write_features(compute_table(result), result.metadata, tmp_path / "f.csv")


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mr", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=240)


def test_cli_run_writes_features_and_a_summary(scene, tmp_path):
    out = tmp_path / "cli.geojson"
    done = _cli("run", str(scene[0]), "--out", str(out), "--tile-size", "400", "--overlap", "40",
                "--region-size", "800", "--workers", "1", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert "tiles in" in done.stdout and "features" in done.stdout and "MP/s" in done.stdout
    assert len(json.loads(out.read_text())["features"]) >= 38


@pytest.mark.parametrize("content", [None, b"", b"not an image at all\n"])
def test_cli_bad_image_is_one_clear_line(tmp_path, content):
    image = tmp_path / "broken.tif"
    if content is not None:
        image.write_bytes(content)
    done = _cli("run", str(image), "--out", str(tmp_path / "x.geojson"), "--workers", "1")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "broken.tif" in lines[0] and lines[0].startswith("mr: error:")
    assert not (tmp_path / "x.geojson").exists()


def test_cli_bad_option_names_it(scene, tmp_path):
    done = _cli("run", str(scene[0]), "--out", str(tmp_path / "x.geojson"), "--overlap", "5000", "--workers", "1")
    assert done.returncode == 2 and "overlap" in done.stderr


def test_cli_runs_on_a_given_scheduler(scene, tmp_path, client):
    out = tmp_path / "remote.parquet"
    done = _cli("run", str(scene[0]), "--out", str(out), "--tile-size", "400", "--overlap", "40",
                "--region-size", "800", "--scheduler", client.scheduler.address, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert len(gpd.read_parquet(out)) >= 38
    assert any("read-infer-region" in str(key) for key in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
