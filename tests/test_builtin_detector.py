"""The built-in detector against planted ground truth, and the callable-model adapter's normalisation."""

from __future__ import annotations

import functools
import pickle
import time

import numpy as np
import pytest
import shapely

from mr.detections import Detections
from mr.errors import InvalidInputError, ModelError
from mr.models.base import Model
from mr.models.builtin import BRIGHT_LABEL, CLASS_NAMES, DARK_LABEL, BuiltinDetector
from mr.models.callable import CallableModel
from mr.synthetic import PlantedObject, box_iou, make_scene, match_detections, planted_boxes


def detect(tile: np.ndarray, **kwargs: object) -> Detections:
    """Run a detector on one (bands, h, w) tile."""
    return BuiltinDetector(**kwargs)(tile[None])[0]


@functools.lru_cache(maxsize=None)
def scene(width: int = 1024, height: int = 1024, **kwargs: object) -> tuple[np.ndarray, list[PlantedObject]]:
    """A cached synthetic scene (tests must not modify it)."""
    return make_scene(width, height, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("bands", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_finds_planted_objects(dtype: type, bands: int, seed: int) -> None:
    image, objects = scene(dtype=dtype, bands=bands, seed=seed)
    found = detect(image)
    match = match_detections(found.boxes, planted_boxes(objects), min_iou=0.3)
    assert len(objects) == 40
    assert match.recall >= 0.95
    assert match.precision >= 0.95
    iou = box_iou(found.boxes[match.pairs[:, 0]], planted_boxes(objects)[match.pairs[:, 1]])
    assert iou.min() >= 0.5


def test_labels_follow_polarity_and_scores_are_in_range() -> None:
    image, objects = scene(seed=2)
    found = detect(image)
    match = match_detections(found, objects)
    truth = np.array([o.label for o in objects])[match.pairs[:, 1]]
    assert (found.labels[match.pairs[:, 0]] == truth).all()
    assert found.class_names == CLASS_NAMES
    assert {BRIGHT_LABEL, DARK_LABEL} <= set(found.labels)
    assert ((found.scores > 0) & (found.scores <= 1)).all()


def test_score_rises_with_contrast() -> None:
    boxes = [PlantedObject(100 + 60 * i, 100, 116 + 60 * i, 112, contrast=c) for i, c in enumerate((15, 30, 60))]
    image, _ = make_scene(512, 256, objects=boxes, seed=3)
    found = detect(image)
    order = np.argsort(found.boxes[:, 0])
    assert len(found) == 3
    assert np.all(np.diff(found.scores[order]) > 0)


def test_float_tiles_work_like_integer_ones() -> None:
    image, objects = scene(dtype=np.float32, seed=4)
    match = match_detections(detect(image), objects)
    assert match.recall >= 0.95 and match.precision >= 0.95


@pytest.mark.parametrize("bands", [1, 3])
@pytest.mark.parametrize("background", ["terrain", "flat"])
def test_no_detections_on_empty_scenes(bands: int, background: str) -> None:
    false_positives = sum(
        len(detect(make_scene(1024, 1024, bands=bands, n_objects=0, seed=50 + s, background=background)[0]))
        for s in range(3)
    )
    assert false_positives <= 3  # at most 1 per megapixel


def test_odd_tile_sizes_and_tiles_smaller_than_the_window() -> None:
    image, objects = scene(1000, 700, seed=5)
    match = match_detections(detect(image), objects)
    assert match.recall >= 0.95 and match.precision >= 0.95
    tiny = np.full((1, 20, 30), 100, np.uint8)
    tiny[0, 5:12, 8:16] = 180
    found = detect(tiny)
    assert found.boxes.tolist() == [[8.0, 5.0, 16.0, 12.0]]


@pytest.mark.parametrize("height", [300, 1000])  # strips of 128 rows: a short last strip, and several
@pytest.mark.parametrize("nodata", [None, 0])
def test_strip_by_strip_threshold_matches_the_whole_significance_map(height: int, nodata: float | None) -> None:
    """The detector never makes the whole map; what it keeps must be exactly what the map holds beyond the threshold,
    and its components exactly those of a full-size labelling of each polarity."""
    from scipy import ndimage

    from mr.models.builtin import _noise_floor, beyond, local_levels, signed_components, significance, tile_intensity

    image, _ = scene(1000, height, bands=3, seed=7)
    tile = image.copy()
    tile[:, :40, :] = 0  # a nodata collar where nodata is 0
    intensity, valid = tile_intensity(tile, nodata)
    z = significance(intensity, valid, 64, _noise_floor(tile))
    flat, value = beyond(intensity, valid, local_levels(intensity, valid, 64, _noise_floor(tile)), 2.5)
    expected = np.flatnonzero(np.abs(z) > np.float32(2.5))
    assert np.array_equal(flat, expected) and np.array_equal(value, z.ravel()[expected])
    positive, area, _, boxes = signed_components(flat, value, z.shape[1], 4.0, 1, 10**9)
    for polarity, mask in ((True, z > 2.5), (False, z < -2.5)):
        labels, n = ndimage.label(mask)  # 4-connected
        seeded = [i for i, found in enumerate(ndimage.find_objects(labels))
                  if np.abs(z[found][labels[found] == i + 1]).max() >= 4.0]
        want = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)]
        assert boxes[positive == polarity].tolist() == [want[i] for i in seeded]
        assert area[positive == polarity].tolist() == [int((labels == i + 1).sum()) for i in seeded]


def test_a_crop_finds_what_the_whole_image_finds_in_its_interior() -> None:
    image, _ = scene(seed=14, n_objects=150)
    whole = detect(image)
    x0, y0, size = 300, 200, 512
    crop = detect(image[:, y0 : y0 + size, x0 : x0 + size].copy()).shifted(x0, y0)
    margin = 64
    inner = (x0 + margin, y0 + margin, x0 + size - margin, y0 + size - margin)
    inside = whole.take(np.array([_within(b, inner) for b in whole.boxes], bool))
    crop_inside = crop.take(np.array([_within(b, inner) for b in crop.boxes], bool))
    assert len(inside) >= 10
    match = match_detections(crop_inside, inside, min_iou=0.9)
    assert match.recall == 1.0 and match.precision == 1.0


def test_quiet_areas_keep_their_own_noise_level() -> None:
    rng = np.random.default_rng(15)
    tile = rng.normal(1000, 4, (1, 512, 512))
    tile[:, :, 256:] += rng.normal(0, 40, (1, 512, 256))  # a busy right half
    for y in range(40, 480, 60):
        tile[:, y : y + 10, 100:110] += 40  # 10 sigma in the quiet half, 1 sigma in the busy one
    found = detect(tile.astype(np.uint16))
    assert len(found) == 8
    assert (found.boxes[:, 2] <= 256).all()


def _within(box: np.ndarray, area: tuple[float, float, float, float]) -> bool:
    return box[0] >= area[0] and box[1] >= area[1] and box[2] <= area[2] and box[3] <= area[3]


def test_constant_tile_gives_nothing() -> None:
    assert len(detect(np.full((1, 256, 256), 77, np.uint16))) == 0


def test_objects_cut_by_the_tile_border_are_reported() -> None:
    image, _ = make_scene(256, 256, objects=[PlantedObject(-6, 100, 14, 116, contrast=40)], seed=6)
    found = detect(image)
    assert len(found) == 1
    assert found.boxes[0].tolist() == [0.0, 100.0, 14.0, 116.0]


# --------------------------------------------------------------------------------------------------------------
# Nodata and padding


def test_nodata_regions_give_nothing() -> None:
    image, objects = scene(seed=7)
    tile = image.copy()
    tile[:, :, 600:] = 0  # padding to the right, as an edge tile would carry
    found = detect(tile, nodata=0)
    assert (found.boxes[:, 2] <= 600).all()
    left = [o for o in objects if o.x1 < 595]
    match = match_detections(found, left)
    assert match.recall >= 0.95 and match.precision >= 0.95


def test_nodata_in_any_band_is_ignored_and_all_nodata_is_empty() -> None:
    image, _ = scene(bands=3, seed=8)
    tile = image.copy()
    tile[1, 300:500, 300:500] = 0
    assert not any(_overlaps(b, (300, 300, 500, 500)) for b in detect(tile, nodata=0).boxes)
    assert len(detect(np.zeros((3, 512, 512), np.uint8), nodata=0)) == 0


def test_nan_pixels_in_float_tiles_are_invalid() -> None:
    image, objects = scene(dtype=np.float32, seed=9)
    tile = image.copy()
    tile[:, 512:, :] = np.nan
    found = detect(tile)
    assert (found.boxes[:, 3] <= 512).all()
    assert match_detections(found, [o for o in objects if o.y1 < 505]).recall >= 0.95


def test_nodata_collar_of_a_scene_gives_nothing() -> None:
    image, objects = make_scene(1024, 1024, nodata=0, collar=300, seed=10)
    match = match_detections(detect(image, nodata=0), objects)
    assert match.recall >= 0.95 and match.precision >= 0.95


def _overlaps(box: np.ndarray, other: tuple[float, float, float, float]) -> bool:
    return box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]


# --------------------------------------------------------------------------------------------------------------
# Contract: protocol, determinism, pickling, validation, speed


def test_is_a_model_and_batches_match_single_tiles() -> None:
    detector = BuiltinDetector()
    assert isinstance(detector, Model) and detector.name == "builtin"
    image, _ = scene(seed=11)
    batch = np.stack([image, image[:, ::-1].copy()])
    tables = detector(batch)
    assert len(tables) == 2
    np.testing.assert_array_equal(tables[0].boxes, detector(batch[:1])[0].boxes)


def test_deterministic() -> None:
    image, _ = scene(seed=12)
    first, second = detect(image), detect(image.copy())
    np.testing.assert_array_equal(first.boxes, second.boxes)
    np.testing.assert_array_equal(first.scores, second.scores)
    np.testing.assert_array_equal(first.class_ids, second.class_ids)


def test_pickles_to_its_constructor_arguments() -> None:
    detector = BuiltinDetector(threshold_sigma=5.0, min_area=20, nodata=0)
    clone = pickle.loads(pickle.dumps(detector))
    assert clone == detector
    _, args = detector.__reduce__()
    assert args == ({**BuiltinDetector().__dict__, "threshold_sigma": 5.0, "min_area": 20, "nodata": 0},)


@pytest.mark.parametrize(
    "field, value",
    [
        ("threshold_sigma", 0),
        ("threshold_sigma", float("nan")),
        ("grow_sigma", -1.0),
        ("grow_sigma", 9.0),
        ("background_window", 60),
        ("background_window", 8),
        ("background_window", 64.0),
        ("min_area", 0),
        ("min_area", True),
        ("max_area", 4),
        ("min_fill", 1.5),
        ("max_aspect", 0.5),
        ("nodata", "zero"),
    ],
)
def test_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        BuiltinDetector(**{field: value})
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize("tiles", [np.zeros((8, 8)), np.zeros((1, 8, 8)), [[[[0]]]], np.zeros((1, 1, 8, 8), bool)])
def test_bad_batches_are_rejected(tiles: object) -> None:
    with pytest.raises(InvalidInputError):
        BuiltinDetector()(tiles)


def test_fast_enough() -> None:
    image, _ = scene(seed=0)
    detector, batch = BuiltinDetector(), image[None]
    detector(batch)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        detector(batch)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.1  # ~11 ms on one core; generous against a loaded machine


# --------------------------------------------------------------------------------------------------------------
# CallableModel

TILES = np.zeros((2, 1, 32, 32), np.uint8)
BOXES = np.array([[1.0, 2.0, 5.0, 6.0], [10.0, 10.0, 20.0, 14.0]])


def boxes_scores_labels(tile: np.ndarray) -> tuple:
    return BOXES, np.array([0.9, 0.4]), np.array(["car", "ship"])


@pytest.mark.parametrize(
    "result, labels, scores",
    [
        (Detections.from_labels(BOXES, [0.9, 0.4], ["car", "ship"]), ["car", "ship"], [0.9, 0.4]),
        ({"boxes": BOXES, "scores": [0.9, 0.4], "labels": ["car", "ship"]}, ["car", "ship"], [0.9, 0.4]),
        ({"boxes": BOXES.tolist()}, ["object", "object"], [1.0, 1.0]),
        ((BOXES, [0.9, 0.4]), ["object", "object"], [0.9, 0.4]),
        ((BOXES, [0.9, 0.4], [1, 0]), ["1", "0"], [0.9, 0.4]),
        ((BOXES, [0.9, 0.4], "car"), ["car", "car"], [0.9, 0.4]),
        ([BOXES, np.array([0.9, 0.4])], ["object", "object"], [0.9, 0.4]),
    ],
)
def test_callable_column_forms(result: object, labels: list[str], scores: list[float]) -> None:
    tables = CallableModel(lambda tile: result)(TILES)
    assert len(tables) == 2
    for table in tables:
        np.testing.assert_array_equal(table.boxes, BOXES)
        assert table.labels.tolist() == labels
        np.testing.assert_allclose(table.scores, scores, rtol=1e-6)


def test_callable_integer_labels_use_class_names() -> None:
    model = CallableModel(lambda tile: (BOXES, [0.9, 0.4], [1, 0]), class_names=("car", "ship"))
    assert model(TILES[:1])[0].labels.tolist() == ["ship", "car"]


def test_callable_geometry_forms_keep_geometry_and_properties() -> None:
    polygon = shapely.Polygon([(1, 2), (5, 2), (3, 6)])
    features = [
        polygon,
        {"type": "Point", "coordinates": [7, 8]},
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[10, 10], [20, 10], [20, 14], [10, 10]]]},
            "properties": {"featureClasses": [{"iri": "ship", "score": 0.7}, {"iri": "boat", "score": 0.2}],
                           "length_m": 12.5},
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]},
         "properties": {"score": 0.3, "label": "car"}},
    ]
    for result in (features, {"type": "FeatureCollection", "features": features}):
        table = CallableModel(lambda tile: result)(TILES[:1])[0]
        assert table.boxes.tolist() == [[1, 2, 5, 6], [7, 8, 7, 8], [10, 10, 20, 14], [3, 3, 3, 3]]
        assert table.labels.tolist() == ["object", "object", "ship", "car"]
        np.testing.assert_allclose(table.scores, [1, 1, 0.7, 0.3], rtol=1e-6)
        assert table.geometry[0].equals(polygon) and table.geometry[1].geom_type == "Point"
        assert table.properties["length_m"].tolist() == [None, None, 12.5, None]


def test_callable_empty_results() -> None:
    for empty in ([], (), {"boxes": np.empty((0, 4))}, (np.empty((0, 4)), np.empty(0)), Detections.empty()):
        tables = CallableModel(lambda tile: empty)(TILES)
        assert [len(t) for t in tables] == [0, 0]


def test_callable_batched() -> None:
    seen = []

    def batch_fn(tiles: np.ndarray) -> list:
        seen.append(tiles.shape)
        return [(BOXES[:1], [0.5]) for _ in tiles]

    tables = CallableModel(batch_fn, batched=True)(TILES)
    assert seen == [(2, 1, 32, 32)]
    assert [len(t) for t in tables] == [1, 1]


@pytest.mark.parametrize(
    "result, message",
    [
        (np.zeros((2, 3)), "expected a Detections"),
        (None, "expected a Detections"),
        ({"boxes": np.zeros((2, 3))}, "shape (2, 3)"),
        ({"boxes": [[0, 0, np.nan, 1]]}, "NaN"),
        ({"boxes": [[5, 0, 1, 1]]}, "x1 < x0"),
        ((BOXES, [0.9]), "scores have shape (1,)"),
        ((BOXES, [0.9, 1.5]), "[0, 1]"),
        ((BOXES, [0.9, 0.4], ["car"]), "labels have shape (1,)"),
        ((BOXES, [0.9, 0.4], ["car", 3]), "all strings or all integer"),
        ({"boxes": "abc"}, "not numeric"),
        (["not a geometry"], "item 0"),
        ([{"type": "Polygon", "coordinates": "x"}], "invalid GeoJSON"),
    ],
)
def test_callable_malformed_results_raise_model_error(result: object, message: str) -> None:
    def my_model(tile: np.ndarray) -> object:
        return result

    with pytest.raises(ModelError) as info:
        CallableModel(my_model)(TILES)
    assert "my_model" in str(info.value) and "tile 0" in str(info.value)
    assert message in str(info.value)


def test_callable_integer_ids_out_of_class_names() -> None:
    with pytest.raises(ModelError, match="do not index"):
        CallableModel(lambda t: (BOXES, [0.9, 0.4], [0, 5]), class_names=("car",))(TILES)


def test_callable_batched_count_must_match() -> None:
    with pytest.raises(ModelError, match="list of 2 results, one per tile; got 1"):
        CallableModel(lambda tiles: [[]], batched=True)(TILES)
    with pytest.raises(ModelError, match="got ndarray"):
        CallableModel(lambda tiles: BOXES, batched=True)(TILES)


def test_callable_failure_is_chained() -> None:
    def broken(tile: np.ndarray) -> None:
        raise RuntimeError("out of memory")

    with pytest.raises(ModelError, match="broken' failed on tile 0: RuntimeError: out of memory") as info:
        CallableModel(broken)(TILES)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_callable_names() -> None:
    assert CallableModel(boxes_scores_labels).name == "boxes_scores_labels"
    assert CallableModel(lambda t: []).name == "test_callable_names.<locals>.<lambda>"
    assert CallableModel(functools.partial(boxes_scores_labels)).name == "boxes_scores_labels"
    assert CallableModel(boxes_scores_labels, name="mine").name == "mine"
    with pytest.raises(InvalidInputError, match="fn"):
        CallableModel("not callable")  # type: ignore[arg-type]


def test_callable_pickles_closures() -> None:
    threshold = 0.5

    def closure(tile: np.ndarray) -> tuple:
        return BOXES, np.array([threshold, threshold])

    model = CallableModel(closure, class_names=("a",))
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone, Model) and clone.name == model.name and clone.class_names == ("a",)
    np.testing.assert_allclose(clone(TILES[:1])[0].scores, [0.5, 0.5])


def test_builtin_detector_through_callable_model() -> None:
    image, objects = scene(seed=13)
    detector = BuiltinDetector()
    table = CallableModel(lambda tile: detector(tile[None])[0])(image[None])[0]
    assert match_detections(table, objects).recall >= 0.95
