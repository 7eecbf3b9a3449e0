"""Synthetic scenes: reproducible, objects where they are said to be, files with a real georeference, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st

from mr.detections import Detections
from mr.errors import InvalidInputError
from mr.models.builtin import BRIGHT_LABEL, DARK_LABEL
from mr.synthetic import (
    LOOKS,
    PlantedObject,
    box_iou,
    make_scene,
    match_detections,
    objects_to_geojson,
    planted_boxes,
    write_scene,
)


def test_reproducible_from_seed() -> None:
    first, objects = make_scene(700, 500, bands=3, seed=7)
    second, again = make_scene(700, 500, bands=3, seed=7)
    other, different = make_scene(700, 500, bands=3, seed=8)
    np.testing.assert_array_equal(first, second)
    assert objects == again
    assert objects != different and not np.array_equal(first, other)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("bands", [1, 3])
def test_shape_dtype_and_range(dtype: type, bands: int) -> None:
    image, objects = make_scene(640, 384, bands=bands, dtype=dtype, seed=1)
    look = LOOKS[np.dtype(dtype)]
    assert image.shape == (bands, 384, 640) and image.dtype == dtype
    assert len(objects) == round(40 * 640 * 384 / 1024**2)
    span = look.terrain + 14 * look.clutter + 6 * look.noise
    assert look.level - span < image.min() and image.max() < look.level + span
    if np.dtype(dtype).kind == "u":
        assert image.min() > 0 and image.max() < np.iinfo(dtype).max


def test_noise_and_texture_match_the_look() -> None:
    image, _ = make_scene(1024, 1024, n_objects=0, background="flat", seed=2)
    look = LOOKS[np.dtype(np.uint8)]
    assert abs(image.mean() - look.level) < 0.5
    assert image.std() == pytest.approx(look.noise, rel=0.1)
    terrain, _ = make_scene(1024, 1024, n_objects=0, seed=2)
    fine = terrain[0, :, 1:].astype(float) - terrain[0, :, :-1]
    assert fine.std() / np.sqrt(2) == pytest.approx(look.clutter, rel=0.25)


@pytest.mark.parametrize("bands", [1, 3])
def test_objects_are_where_they_are_said_to_be(bands: int) -> None:
    image, objects = make_scene(1024, 1024, bands=bands, seed=3, background="flat")
    intensity = image.mean(axis=0)
    level = np.median(intensity)  # band gains make the mean level differ per band
    labels = {o.label for o in objects}
    assert labels == {BRIGHT_LABEL, DARK_LABEL}
    for obj in objects:
        assert 6 <= max(obj.x1 - obj.x0, obj.y1 - obj.y0) <= 24 * np.sqrt(2)
        cx, cy = int((obj.x0 + obj.x1) / 2), int((obj.y0 + obj.y1) / 2)
        centre = intensity[cy - 1 : cy + 2, cx - 1 : cx + 2].mean()
        assert (centre - intensity.mean()) * np.sign(obj.contrast) > 0.5 * abs(obj.contrast)
        assert (obj.contrast > 0) == (obj.label == BRIGHT_LABEL)
        x0, y0, x1, y1 = int(np.floor(obj.x0)), int(np.floor(obj.y0)), int(np.ceil(obj.x1)), int(np.ceil(obj.y1))
        ring = np.concatenate([intensity[y0 - 3 : y0 - 1, x0:x1].ravel(), intensity[y1 + 1 : y1 + 3, x0:x1].ravel(),
                               intensity[y0:y1, x0 - 3 : x0 - 1].ravel(), intensity[y0:y1, x1 + 1 : x1 + 3].ravel()])
        assert abs(ring.mean() - level) < 3  # nothing of the object leaks outside its box
    assert bands == 1 or len(objects) == 40


def test_explicit_objects_are_drawn_as_given() -> None:
    objects = [PlantedObject(10, 20, 30, 28, "car", 50.0), PlantedObject(100, 100, 106, 112, "hole", -40.0)]
    image, returned = make_scene(200, 150, objects=objects, background="flat", seed=4)
    assert returned == objects
    level = LOOKS[np.dtype(np.uint8)].level
    assert image[0, 20:28, 10:30].mean() == pytest.approx(level + 50, abs=1.5)
    assert image[0, 100:112, 100:106].mean() == pytest.approx(level - 40, abs=1.5)
    outside = np.ones(image.shape[1:], bool)
    outside[20:28, 10:30] = outside[100:112, 100:106] = False
    assert image[0][outside].mean() == pytest.approx(level, abs=0.5)


def test_nodata_collar() -> None:
    image, objects = make_scene(800, 600, nodata=0, collar=150, seed=5)
    assert (image[:, 0, :150] == 0).all() and (image[:, -1, -150:] == 0).all()
    assert image[0, 0, 150] != 0 and image[0, 300, 0] != 0
    assert (image == 0).sum() == 4 * 150 * 151 // 2
    for obj in objects:
        for x, y in ((obj.x0, obj.y0), (obj.x1, obj.y0), (obj.x0, obj.y1), (obj.x1, obj.y1)):
            assert min(x + y, 800 - x + y, x + 600 - y, 800 - x + 600 - y) >= 150


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(40, 400),
    height=st.integers(40, 400),
    seed=st.integers(0, 2**32 - 1),
    size=st.tuples(st.floats(3, 12), st.floats(0, 12)).map(lambda t: (t[0], t[0] + t[1])),
    separation=st.floats(0, 10),
)
def test_random_objects_are_inside_and_apart(width, height, seed, size, separation) -> None:
    cell = int(np.ceil(size[1] * np.sqrt(2))) + 2 + int(np.ceil(separation))
    capacity = (width // cell) * (height // cell)
    image, objects = make_scene(width, height, n_objects=capacity // 2, seed=seed, object_size=size,
                                min_separation=separation)
    boxes = planted_boxes(objects)
    assert len(objects) == capacity // 2
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    for i in range(len(boxes)):
        gap_x = np.maximum(boxes[:, 0] - boxes[i, 2], boxes[i, 0] - boxes[:, 2])
        gap_y = np.maximum(boxes[:, 1] - boxes[i, 3], boxes[i, 1] - boxes[:, 3])
        gap = np.delete(np.maximum(gap_x, gap_y), i)
        assert (gap >= separation - 1e-9).all()


def test_rows_do_not_depend_on_how_they_are_cut(tmp_path) -> None:
    image, objects = make_scene(300, 1000, bands=3, seed=6)
    written = write_scene(tmp_path / "a.tif", 300, 1000, bands=3, seed=6, blocksize=96)
    with rasterio.open(tmp_path / "a.tif") as src:
        np.testing.assert_array_equal(src.read(), image)
    assert written == objects


@pytest.mark.parametrize(
    "driver, compress, suffix",
    [("GTiff", None, "tif"), ("COG", None, "tif"), ("NITF", None, "ntf"), ("NITF", "jpeg2000", "ntf"),
     ("JP2OpenJPEG", None, "jp2")],
)
def test_write_scene_formats(tmp_path, driver: str, compress: str | None, suffix: str) -> None:
    path = tmp_path / f"scene.{suffix}"
    objects = write_scene(path, 700, 600, driver=driver, compress=compress, seed=9, dtype=np.uint16, nodata=0,
                          collar=64, blocksize=256, origin=(400000.0, 4100000.0), resolution=0.5)
    image, expected = make_scene(700, 600, seed=9, dtype=np.uint16, nodata=0, collar=64)
    assert objects == expected
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(src.read(), image)
        assert src.crs.to_epsg() == 32616
        assert src.nodata == 0 and src.block_shapes[0] == (256, 256)
        tolerance = 1.0 if driver == "NITF" else 1e-6  # NITF IGEOLO keeps whole metres
        assert src.transform.c == pytest.approx(400000.0, abs=tolerance)
        assert src.transform.f == pytest.approx(4100000.0, abs=tolerance)
        assert src.res[0] == pytest.approx(0.5, rel=2e-3)
        if driver == "COG":
            assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.overviews(1)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".aux.xml")) == [path.name]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(driver="PNG"), "driver"),
        (dict(driver="NITF", compress="deflate"), "compress"),
        (dict(driver="NITF", crs="EPSG:3857"), "crs"),
        (dict(blocksize=100), "blocksize"),
        (dict(colour="red"), "colour"),
    ],
)
def test_write_scene_validation(tmp_path, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        write_scene(tmp_path / "x.tif", 64, 64, **kwargs)
    assert info.value.field == field
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(width=0), "width"),
        (dict(bands=0), "bands"),
        (dict(dtype=np.int8), "dtype"),
        (dict(dtype="nonsense"), "dtype"),
        (dict(background="desert"), "background"),
        (dict(n_objects=10_000), "n_objects"),
        (dict(n_objects=-1), "n_objects"),
        (dict(object_size=(10, 5)), "object_size"),
        (dict(contrast="high"), "contrast"),
        (dict(bright_fraction=2.0), "bright_fraction"),
        (dict(collar=10), "collar"),
        (dict(objects=[PlantedObject(5, 5, 4, 9)]), "objects"),
    ],
)
def test_make_scene_validation(kwargs: dict, field: str) -> None:
    args = {"width": 256, "height": 256, **kwargs}
    with pytest.raises(InvalidInputError) as info:
        make_scene(args.pop("width"), args.pop("height"), **args)
    assert info.value.field == field


def test_geojson_in_pixels_and_map_coordinates() -> None:
    from rasterio.transform import from_origin

    objects = [PlantedObject(10, 20, 30, 28, "car", 50.0)]
    pixels = objects_to_geojson(objects)
    assert pixels["features"][0]["geometry"]["coordinates"][0][:3] == [[10, 20], [30, 20], [30, 28]]
    assert pixels["features"][0]["properties"] == {"label": "car", "contrast": 50.0, "imageBBox": [10, 20, 30, 28]}
    mapped = objects_to_geojson(objects, from_origin(500000, 4500000, 0.5, 0.5))
    assert mapped["features"][0]["geometry"]["coordinates"][0][0] == [500005.0, 4499990.0]


def test_match_detections() -> None:
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], float)
    pred = np.array([[1, 1, 11, 11], [0, 0, 10, 10], [21, 19, 31, 29], [100, 100, 110, 110]], float)
    match = match_detections(pred, truth)
    assert match.recall == pytest.approx(2 / 3) and match.precision == pytest.approx(2 / 4)
    assert sorted(map(tuple, match.pairs.tolist())) == [(1, 0), (2, 1)]  # one-to-one, best IoU wins
    recall, precision, pairs = match_detections(pred, truth, min_iou=0.9)
    assert (recall, precision, pairs.tolist()) == (1 / 3, 1 / 4, [[1, 0]])
    assert match_detections(np.empty((0, 4)), truth)[:2] == (0.0, 1.0)
    assert match_detections(pred, np.empty((0, 4)))[:2] == (1.0, 0.0)
    assert match_detections(Detections.from_labels(truth, [1, 1, 1], list("abc")), truth).recall == 1.0
    with pytest.raises(InvalidInputError, match="min_iou"):
        match_detections(pred, truth, min_iou=0)


def test_box_iou() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], float)
    np.testing.assert_allclose(box_iou(a, b), [1.0, 1 / 3, 0.0])
