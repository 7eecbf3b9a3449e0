"""The whole engine on real files: planted objects found once across tile and region seams, on a LocalCluster."""

from __future__ import annotations

import itertools
import time
import warnings

import dask
import numpy as np
import pytest
import xarray as xr

import mr
from mr.merge import pair_overlap, overlapping_pairs
from mr.synthetic import PlantedObject, make_scene, match_detections, planted_boxes, write_scene
from mr.tiling import tile_grid
from tests.rasters import write_sparse_geotiff

TILING = dict(tile_size=512, overlap=64, region_size=1400)
WIDTH, HEIGHT = 2600, 2200


def seam_objects(grid, contrast: float = 45.0) -> list[PlantedObject]:
    """Objects centred on every tile cut (so also on every region cut and every cut crossing), plus a lattice."""
    objects = []
    xs = list(grid.x.cuts) + [150.0, 1250.0, 2450.0]
    ys = list(grid.y.cuts) + [120.0, 1111.0, 2050.0]
    for i, (cx, cy) in enumerate(itertools.product(xs, ys)):
        half_w, half_h = 4 + (i * 7) % 9, 4 + (i * 5) % 8
        sign = 1 if i % 2 else -1
        objects.append(PlantedObject(cx - half_w, cy - half_h, cx + half_w, cy + half_h, contrast=sign * contrast))
    for cx, cy in itertools.product(np.arange(300, WIDTH - 100, 403.0), np.arange(330, HEIGHT - 100, 377.0)):
        if min(abs(cx - np.array(xs))) > 40 and min(abs(cy - np.array(ys))) > 40:
            objects.append(PlantedObject(cx - 6, cy - 5, cx + 6, cy + 5, contrast=contrast))
    return objects


@pytest.fixture(scope="module")
def seam_scene(tmp_path_factory):
    grid = tile_grid(WIDTH, HEIGHT, 512, 64, 1400)
    assert grid.region_count >= 4, "the scene must have region seams"
    path = tmp_path_factory.mktemp("scene") / "seams.tif"
    planted = write_scene(path, WIDTH, HEIGHT, objects=seam_objects(grid), seed=11)
    return path, planted, grid


def boxes_of(frame) -> np.ndarray:
    return frame[["image_x0", "image_y0", "image_x1", "image_y1"]].to_numpy()


def assert_no_duplicates(boxes: np.ndarray, threshold: float = 0.5) -> None:
    i, j = overlapping_pairs(boxes)
    if len(i):
        overlap = pair_overlap(boxes, i, j, "ios")
        assert not np.any(overlap > threshold), f"duplicate features: {boxes[i[overlap > threshold]]}"


def test_seam_objects_are_reported_exactly_once(seam_scene, client):
    path, planted, grid = seam_scene
    result = mr.detect(mr.open_image(path), "builtin", **TILING)
    assert result.plan.grid.region_count == grid.region_count
    frame = client.compute(result).result()
    boxes = boxes_of(frame)
    match = match_detections(boxes, planted_boxes(planted))
    assert match.recall >= 0.97 and match.precision >= 0.97, match[:2]
    truth = planted_boxes(planted)
    for k, obj in enumerate(truth):
        hits = np.sum(_iou_one(boxes, obj) > 0.3)
        assert hits <= 1, f"planted object {obj} reported {hits} times"
    assert_no_duplicates(boxes)
    assert frame.crs.to_epsg() == 4326 and frame.geometry.notna().all()


def _iou_one(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = ix * iy
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area - inter)


def test_distributed_and_sync_give_the_same_features(seam_scene, client):
    path, _, _ = seam_scene
    result = mr.detect(mr.open_image(path), "builtin", **TILING)
    on_cluster = client.compute(result).result()
    local = result.compute(scheduler="sync")
    key = ["image_x0", "image_y0", "image_x1", "image_y1", "score"]
    a = on_cluster[key].sort_values(key).to_numpy()
    b = local[key].sort_values(key).to_numpy()
    np.testing.assert_allclose(a, b)


def test_same_request_gives_the_same_graph(seam_scene):
    path, _, _ = seam_scene
    first = mr.detect(mr.open_image(path), "builtin", **TILING)
    second = mr.detect(mr.open_image(path), "builtin", **TILING)
    assert list(first.__dask_keys__()) == list(second.__dask_keys__())


@pytest.mark.parametrize("strategy", ["variable", "fixed"])
def test_tiled_matches_untiled(tmp_path, strategy):
    image, planted = make_scene(1300, 1100, n_objects=60, seed=4)
    untiled = mr.detect(xr.DataArray(image, dims=("band", "y", "x")), "builtin", tile_size=1300, region_size=1300)
    tiled = mr.detect(
        xr.DataArray(image, dims=("band", "y", "x")), "builtin", tile_size=256, overlap=48, region_size=600,
        strategy=strategy,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = boxes_of(untiled.compute(scheduler="sync"))
        found = boxes_of(tiled.compute(scheduler="sync"))
    assert tiled.plan.grid.region_count > 1 and tiled.plan.tile_count > 12
    match = match_detections(found, reference, min_iou=0.7)
    assert match.recall >= 0.98 and match.precision >= 0.98, match[:2]
    assert match_detections(found, planted_boxes(planted)).recall >= 0.97


def test_building_a_100k_graph_reads_nothing(tmp_path):
    path = write_sparse_geotiff(tmp_path / "huge.tif", width=100_000, height=100_000)

    def refuse(*args, **kwargs):
        raise AssertionError("building the graph computed something")

    with dask.config.set(scheduler=refuse):
        started = time.perf_counter()
        result = mr.detect(mr.open_image(path), "builtin")
        seconds = time.perf_counter() - started
    grid = result.plan.grid
    assert grid.region_count == grid.x.region_count * grid.y.region_count > 100
    assert len(result.__dask_graph__()) < 40 * grid.region_count, "graph size must scale with regions, not tiles"
    print(f"graph for 100k²: {seconds:.3f} s, {len(result.__dask_graph__())} tasks, {grid.tile_count} tiles")


def test_region_of_interest_limits_tiles_and_features(seam_scene):
    path, planted, _ = seam_scene
    image = mr.open_image(path)
    from mr.geo import pixel_to_world

    corners = np.array([[300, 250], [1700, 250], [1700, 1500], [300, 1500]], dtype=float)
    lon, lat = pixel_to_world(image.attrs["georeference"], corners[:, 0], corners[:, 1])
    wkt = "POLYGON((" + ", ".join(f"{a} {b}" for a, b in zip(lon, lat)) + f", {lon[0]} {lat[0]}))"
    full = mr.detect(image, "builtin", **TILING)
    limited = mr.detect(image, "builtin", roi=wkt, **TILING)
    assert limited.plan.tile_count < full.plan.tile_count
    frame = limited.compute(scheduler="sync")
    boxes = boxes_of(frame)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert np.all((boxes[:, 2] >= 299) & (boxes[:, 0] <= 1701) & (boxes[:, 3] >= 249) & (boxes[:, 1] <= 1501))
    truth = planted_boxes(planted)
    inside = truth[(truth[:, 0] > 300) & (truth[:, 2] < 1700) & (truth[:, 1] > 250) & (truth[:, 3] < 1500)]
    assert match_detections(boxes, inside).recall >= 0.97
    assert len(centres) < len(full.compute(scheduler="sync"))


def test_roi_outside_the_image_is_an_error(seam_scene):
    path, _, _ = seam_scene
    with pytest.raises(mr.InvalidInputError, match="roi"):
        mr.detect(mr.open_image(path), roi="POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))")
    with pytest.raises(mr.InvalidInputError, match="roi"):
        mr.detect(mr.open_image(path), roi="POLYGON((0 0, 1 0")


def test_image_without_georeference_keeps_pixel_geometry():
    image, planted = make_scene(900, 700, n_objects=20, seed=2)
    with pytest.warns(UserWarning, match="no georeference"):
        result = mr.detect(xr.DataArray(image, dims=("band", "y", "x")), tile_size=256, overlap=32)
    frame = result.compute(scheduler="sync")
    assert len(frame) >= 19 and frame.geometry.isna().all() and frame["image_geometry"].notna().all()
    assert frame["center_longitude"].isna().all()


def test_a_python_callable_is_a_model():
    image, _ = make_scene(768, 768, n_objects=0, seed=1)

    def one_box_per_tile(tile):
        return {"boxes": [[10, 10, 20, 20]], "scores": [0.9], "labels": ["thing"]}

    frame = mr.detect(
        xr.DataArray(image, dims=("band", "y", "x")), one_box_per_tile, tile_size=256, overlap=0, region_size=512,
    ).compute(scheduler="sync")
    assert len(frame) == 9 and set(frame["label"]) == {"thing"}
    assert sorted(set(frame["image_x0"])) == [10.0, 266.0, 522.0]
    assert frame.attrs["model"].endswith("one_box_per_tile")


@pytest.mark.parametrize("method", ["soft-nms", "none"])
def test_other_dedup_methods_run(seam_scene, method):
    path, planted, _ = seam_scene
    frame = mr.detect(mr.open_image(path), "builtin", nms=method, **TILING).compute(scheduler="sync")
    assert match_detections(boxes_of(frame), planted_boxes(planted)).recall >= 0.97


@pytest.mark.parametrize(
    "driver, dtype, bands", [("COG", "uint16", 3), ("NITF", "uint8", 1), ("JP2OpenJPEG", "uint8", 1)]
)
def test_formats_and_pixel_types(tmp_path, driver, dtype, bands):
    suffix = {"COG": ".tif", "NITF": ".ntf", "JP2OpenJPEG": ".jp2"}[driver]
    path = tmp_path / f"scene{suffix}"
    planted = write_scene(path, 1400, 1200, driver=driver, dtype=np.dtype(dtype), bands=bands, n_objects=50, seed=9)
    result = mr.detect(mr.open_image(path), tile_size=400, overlap=48, region_size=900)
    frame = result.compute(scheduler="sync")
    assert match_detections(boxes_of(frame), planted_boxes(planted)).recall >= 0.95
    if driver == "NITF":
        assert result.metadata.source_metadata
