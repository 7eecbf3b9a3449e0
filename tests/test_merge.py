"""The de-duplication kernels against straightforward O(N²) references written here, on hypothesis box sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mr.detections import Detections
from mr.errors import InvalidInputError
from mr.merge import DedupConfig, deduplicate, nms, overlapping_pairs, pair_overlap, soft_nms

# ---------------------------------------------------------------------------------------------- references


def reference_overlap(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    """IoU or IoS of two boxes, one pair at a time; 0 where the denominator is 0."""
    width = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    height = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = width * height
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    denominator = area_a + area_b - inter if metric == "iou" else min(area_a, area_b)
    return inter / denominator if denominator > 0 else 0.0


def reference_pairs(boxes: np.ndarray, groups: np.ndarray | None) -> set[tuple[int, int]]:
    """Every pair whose interiors intersect, by checking all of them."""
    pairs = set()
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            same = groups is None or groups[i] == groups[j]
            if same and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3] and a[0] < a[2] and a[1] < a[3] \
                    and b[0] < b[2] and b[1] < b[3]:
                pairs.add((i, j))
    return pairs


def visiting_order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def reference_nms(boxes, scores, threshold, metric, groups) -> list[int]:
    """The textbook greedy NMS."""
    kept: list[int] = []
    for i in visiting_order([float(s) for s in scores]):
        if not any((groups is None or groups[k] == groups[i]) and reference_overlap(boxes[k], boxes[i], metric)
                   > threshold for k in kept):
            kept.append(i)
    return sorted(kept)


def reference_soft_nms(boxes, scores, threshold, sigma, skip, metric, groups) -> tuple[list[int], list[float]]:
    """The textbook Gaussian soft-NMS, with a gate at ``threshold`` and boxes below ``skip`` dropped at once."""
    current = [float(s) for s in scores]
    remaining = {i for i in range(len(current)) if current[i] >= skip}
    kept = []
    while remaining:
        m = min(remaining, key=lambda i: (-current[i], i))
        remaining.discard(m)
        kept.append(m)
        for v in sorted(remaining):
            overlap = reference_overlap(boxes[m], boxes[v], metric)
            if (groups is None or groups[m] == groups[v]) and overlap > threshold:
                current[v] *= math.exp(-(overlap * overlap) / sigma)
                if current[v] < skip:
                    remaining.discard(v)
    kept.sort()
    return kept, [current[i] for i in kept]


# ---------------------------------------------------------------------------------------------- box sets


@st.composite
def box_sets(draw, max_size: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes on a coarse lattice (so duplicates, shared and touching edges are common), zero-area boxes, jittered
    copies, sometimes a huge box; scores with many ties; three classes."""
    n = draw(st.integers(0, max_size))
    coordinate = st.one_of(st.integers(0, 10), st.floats(0, 10, allow_nan=False, width=32))
    size = st.one_of(st.integers(0, 5), st.floats(0, 5, allow_nan=False, width=32))
    rows = []
    for _ in range(n):
        x, y, w, h = draw(coordinate), draw(coordinate), draw(size), draw(size)
        rows.append((x, y, x + w, y + h))
    for _ in range(draw(st.integers(0, 4)) if rows else 0):
        x0, y0, x1, y1 = rows[draw(st.integers(0, len(rows) - 1))]
        dx, dy = draw(st.sampled_from([0.0, 0.25, -0.5])), draw(st.sampled_from([0.0, 0.125, -0.25]))
        rows.append((x0 + dx, y0 + dy, x1 + dx, max(y1 + dy - draw(st.sampled_from([0, 1, 2])), y0 + dy)))
    if draw(st.booleans()):
        rows.append(draw(st.sampled_from([(-50.0, -50.0, 500.0, 500.0), (0.0, 4.0, 1000.0, 5.0), (2, 2, 8, 8)])))
    scale = draw(st.sampled_from([1.0, 0.001, 1e4]))
    boxes = np.asarray(rows, dtype=np.float64).reshape(-1, 4) * scale
    scores = np.asarray(draw(st.lists(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]),
                                                st.floats(0, 1, width=32)),
                                      min_size=len(boxes), max_size=len(boxes))), dtype=np.float32)
    groups = np.asarray(draw(st.lists(st.integers(0, 2), min_size=len(boxes), max_size=len(boxes))), np.int32)
    return boxes, scores, groups


thresholds = st.one_of(st.sampled_from([0.1, 0.5, 0.75, 1.0]), st.floats(0.01, 1.0))
metrics = st.sampled_from(["iou", "ios"])


# ---------------------------------------------------------------------------------------------- pairs


@settings(max_examples=100, deadline=None)
@given(box_sets(max_size=40), st.booleans())
def test_overlapping_pairs_match_brute_force(case, grouped):
    boxes, _, groups = case
    groups = groups if grouped else None
    i, j = overlapping_pairs(boxes, groups)
    found = list(zip(i.tolist(), j.tolist()))
    assert len(found) == len(set(found)), "a pair was reported twice"
    assert set(found) == reference_pairs(boxes, groups)


@pytest.mark.parametrize("offset, far", [(0.0, False), (-3e3, False), (1e9, False), (0.0, True)])
def test_overlapping_pairs_with_sizes_spanning_many_levels(offset, far):
    rng = np.random.default_rng(7)
    corners = rng.uniform(0, 2000, (300, 2)) + offset
    corners[:5] += 1e14 * far  # a few boxes very far away force cells coarser than the boxes
    sizes = 2.0 ** rng.uniform(-3, 12, (300, 2))
    boxes = np.c_[corners, corners + sizes]
    groups = rng.integers(0, 2, 300)
    for g in (None, groups, groups * 10**15 - 7, (groups - 1) * 2**62):  # ids far apart are recoded
        i, j = overlapping_pairs(boxes, g)
        assert set(zip(i.tolist(), j.tolist())) == reference_pairs(boxes, g)


def test_one_huge_box_adds_exactly_its_pairs():
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 10_000, (50_000, 2))
    small = np.c_[corners, corners + rng.uniform(5, 20, (50_000, 2))]
    base = len(overlapping_pairs(small)[0])
    with_huge = np.r_[small, [[-1.0, -1.0, 20_000.0, 20_000.0]]]
    i, j = overlapping_pairs(with_huge)
    assert len(i) == base + len(small)
    assert (j[j == len(small)].size == len(small)) and (i < j).all()


def test_touching_boxes_and_zero_area_boxes_do_not_pair():
    boxes = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20], [5, 5, 5, 9], [2, 2, 8, 2]], float)
    assert overlapping_pairs(boxes)[0].size == 0


def test_pair_overlap_values():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 5], [3, 3, 3, 3]], float)
    i, j = np.array([0, 0, 0, 3]), np.array([1, 2, 3, 3])
    np.testing.assert_allclose(pair_overlap(boxes, i, j, "iou"), [1 / 3, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(pair_overlap(boxes, i, j, "ios"), [0.5, 1.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------- nms


@settings(max_examples=120, deadline=None)
@given(box_sets(), thresholds, metrics, st.booleans())
def test_nms_matches_textbook(case, threshold, metric, grouped):
    boxes, scores, groups = case
    groups = groups if grouped else None
    kept = nms(boxes, scores, threshold=threshold, metric=metric, groups=groups)
    assert kept.dtype.kind == "i"
    assert kept.tolist() == reference_nms(boxes, scores, threshold, metric, groups)


@settings(max_examples=120, deadline=None)
@given(box_sets(), thresholds, metrics, st.booleans(), st.sampled_from([0.1, 0.5, 3.0]),
       st.sampled_from([0.0, 0.001, 0.3]))
def test_soft_nms_matches_textbook(case, threshold, metric, grouped, sigma, skip):
    boxes, scores, groups = case
    groups = groups if grouped else None
    kept, new_scores = soft_nms(boxes, scores, threshold=threshold, sigma=sigma, skip_box_threshold=skip,
                                metric=metric, groups=groups)
    expected, expected_scores = reference_soft_nms(boxes, scores, threshold, sigma, skip, metric, groups)
    assert kept.tolist() == expected
    np.testing.assert_allclose(new_scores, expected_scores, rtol=1e-12)


def test_soft_nms_leaves_lone_boxes_untouched_and_lowers_duplicates():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [50, 50, 60, 60]], float)
    kept, scores = soft_nms(np.asarray(boxes), np.array([0.9, 0.8, 0.7], np.float32), threshold=0.5, sigma=0.5,
                            skip_box_threshold=0.001)
    iou = 100 / 105
    assert kept.tolist() == [0, 1, 2]
    np.testing.assert_allclose(scores, [np.float32(0.9), np.float32(0.8) * math.exp(-iou * iou / 0.5),
                                        np.float32(0.7)])


# ---------------------------------------------------------------------------------------------- deduplicate


def table(boxes, scores, class_ids, names=("car", "truck")) -> Detections:
    n = len(scores)
    return Detections(np.asarray(boxes, float), np.asarray(scores, np.float32), np.asarray(class_ids, np.int32),
                      names, tile_ids=np.arange(n), properties={"row": np.arange(n)})


def test_class_aware_compares_only_the_same_class():
    detections = table([[0, 0, 10, 10], [0, 0, 10, 10], [0.2, 0, 10.2, 10]], [0.9, 0.8, 0.7], [0, 1, 0])
    aware = deduplicate(detections, DedupConfig(threshold=0.5, class_aware=True))
    agnostic = deduplicate(detections, DedupConfig(threshold=0.5, class_aware=False))
    assert aware.properties["row"].tolist() == [0, 1]
    assert agnostic.properties["row"].tolist() == [0]
    assert aware.labels.tolist() == ["car", "truck"]


def test_ios_catches_a_box_truncated_at_a_tile_edge():
    whole, truncated = [100, 100, 140, 140], [100, 100, 140, 115]  # the tile edge cut the object at y = 115
    detections = table([whole, truncated], [0.9, 0.8], [0, 0])
    by_iou = deduplicate(detections, DedupConfig(threshold=0.5, metric="iou"))
    by_ios = deduplicate(detections, DedupConfig(threshold=0.5, metric="ios"))
    assert len(by_iou) == 2
    assert by_ios.properties["row"].tolist() == [0]


def test_soft_nms_deduplicate_keeps_columns_and_lowers_scores():
    detections = table([[0, 0, 10, 10], [0, 0, 10, 10], [30, 30, 40, 40]], [0.9, 0.8, 0.7], [0, 0, 1])
    result = deduplicate(detections, DedupConfig(method="soft-nms", threshold=0.5, sigma=0.5))
    assert result.properties["row"].tolist() == [0, 1, 2]
    assert result.tile_ids.tolist() == [0, 1, 2]
    assert result.scores.dtype == np.float32
    np.testing.assert_allclose(result.scores, [0.9, 0.8 * math.exp(-2), 0.7], rtol=1e-6)


def test_none_returns_the_table_unchanged():
    detections = table([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])
    assert deduplicate(detections, DedupConfig(method="none")) is detections


def test_empty_input():
    empty = np.empty((0, 4))
    assert [a.size for a in overlapping_pairs(empty)] == [0, 0]
    assert nms(empty, np.empty(0), threshold=0.5).size == 0
    kept, scores = soft_nms(empty, np.empty(0), threshold=0.5, sigma=0.5, skip_box_threshold=0.001)
    assert kept.size == scores.size == 0
    for method in ("nms", "soft-nms", "none"):
        assert len(deduplicate(Detections.empty(("car",)), DedupConfig(method=method))) == 0
    assert nms(np.array([[0, 0, 1, 1]]), np.array([0.5]), threshold=0.5).tolist() == [0]


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field, value",
    [("method", "wbf"), ("threshold", 0.0), ("threshold", 1.5), ("threshold", "0.5"), ("metric", "giou"),
     ("class_aware", "yes"), ("sigma", 0.0), ("sigma", float("inf")), ("skip_box_threshold", -0.1),
     ("skip_box_threshold", 2.0)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(InvalidInputError) as caught:
        DedupConfig(**{field: value})
    assert caught.value.field == field and field in str(caught.value) and repr(value) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_kernel_validation_names_the_field():
    good = np.array([[0, 0, 1, 1], [0, 0, 2, 2]], float)
    cases = [
        ("boxes", lambda: overlapping_pairs(np.zeros((2, 3)))),
        ("boxes", lambda: overlapping_pairs(np.array([[0, 0, -1, 1.0]]))),
        ("boxes", lambda: nms(np.array([[0, 0, np.nan, 1.0]]), [0.5], threshold=0.5)),
        ("groups", lambda: overlapping_pairs(good, np.array([0]))),
        ("groups", lambda: overlapping_pairs(good, np.array([0.5, 1.5]))),
        ("scores", lambda: nms(good, [0.5], threshold=0.5)),
        ("scores", lambda: nms(good, [0.5, np.nan], threshold=0.5)),
        ("threshold", lambda: nms(good, [0.5, 0.4], threshold=0)),
        ("metric", lambda: nms(good, [0.5, 0.4], threshold=0.5, metric="giou")),
        ("sigma", lambda: soft_nms(good, [0.5, 0.4], threshold=0.5, sigma=-1, skip_box_threshold=0)),
    ]
    for field, call in cases:
        with pytest.raises(InvalidInputError) as caught:
            call()
        assert caught.value.field == field
