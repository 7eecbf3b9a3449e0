"""Scoring detections against the objects planted in a scene: pure functions of boxes, no pixels and no files.

:func:`planted_boxes` and :func:`objects_to_geojson` turn planted objects into an (n, 4) array or a GeoJSON
FeatureCollection; :func:`match_detections` pairs predicted with true boxes one-to-one, highest IoU first, with
candidates from an STRtree so a whole large scene scores in O(n log n), and reports recall and precision as a
:class:`Match`. Tests, benchmarks and ``mr demo`` measure the detector with these.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from mr.errors import InvalidInputError
from mr.synthetic.spec import PlantedObject


def planted_boxes(objects: Sequence[PlantedObject]) -> np.ndarray:
    """float64 (n, 4) boxes x0, y0, x1, y1 of the objects."""
    return np.array([(o.x0, o.y0, o.x1, o.y1) for o in objects], dtype=np.float64).reshape(-1, 4)


def objects_to_geojson(objects: Sequence[PlantedObject], transform: object | None = None) -> dict:
    """A GeoJSON FeatureCollection of the objects' boxes: in pixels, or in the raster's CRS given its affine
    ``transform``; properties carry ``label``, ``contrast`` and ``imageBBox`` (pixels)."""
    features = []
    for obj in objects:
        corners = [(obj.x0, obj.y0), (obj.x1, obj.y0), (obj.x1, obj.y1), (obj.x0, obj.y1), (obj.x0, obj.y0)]
        if transform is not None:
            a, b, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e, transform.f)
            corners = [(a * x + b * y + c, d * x + e * y + f) for x, y in corners]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[list(map(float, c)) for c in corners]]},
            "properties": {"label": obj.label, "contrast": obj.contrast,
                           "imageBBox": [obj.x0, obj.y0, obj.x1, obj.y1]},
        })
    return {"type": "FeatureCollection", "features": features}


class Match(NamedTuple):
    """The outcome of :func:`match_detections`."""

    recall: float
    """Matched truths / truths (1.0 when there are none)."""
    precision: float
    """Matched predictions / predictions (1.0 when there are none)."""
    pairs: np.ndarray
    """int64 (m, 2): (prediction index, truth index) of each match, best IoU first."""


def match_detections(pred_boxes: object, true_boxes: object, min_iou: float = 0.3) -> Match:
    """Greedy one-to-one matching of predicted to true boxes, highest IoU first, pairs with IoU ≥ ``min_iou``.

    Accepts (n, 4) arrays, Detections or lists of PlantedObject. Candidate pairs come from an STRtree, so scoring a
    whole large scene costs O(n log n), not an n × n IoU matrix.
    """
    import shapely

    if not 0 < min_iou <= 1:
        raise InvalidInputError("min_iou", min_iou, "must be in (0, 1]")
    pred, true = _as_boxes(pred_boxes), _as_boxes(true_boxes)
    pairs = np.empty((0, 2), np.int64)
    if len(pred) and len(true):
        tree = shapely.STRtree(shapely.box(*true.T))
        candidates = tree.query(shapely.box(*pred.T), predicate="intersects").T.astype(np.int64)
        iou = box_iou(pred[candidates[:, 0]], true[candidates[:, 1]])
        order = np.lexsort((candidates[:, 1], candidates[:, 0], -iou))
        pairs = _greedy(candidates[order][iou[order] >= min_iou], len(pred), len(true))
    recall = len(pairs) / len(true) if len(true) else 1.0
    precision = len(pairs) / len(pred) if len(pred) else 1.0
    return Match(recall, precision, pairs)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of each row of ``a`` with the same row of ``b`` (both (n, 4))."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy(candidates: np.ndarray, n_pred: int, n_true: int) -> np.ndarray:
    """Accept candidate pairs in order, each prediction and truth at most once."""
    used_pred, used_true = np.zeros(n_pred, bool), np.zeros(n_true, bool)
    accepted = []
    for p, t in candidates.tolist():
        if not used_pred[p] and not used_true[t]:
            used_pred[p] = used_true[t] = True
            accepted.append((p, t))
    return np.array(accepted, np.int64).reshape(-1, 2)


def _as_boxes(boxes: object) -> np.ndarray:
    """(n, 4) float64 boxes from an array, a Detections or a list of PlantedObject."""
    if hasattr(boxes, "boxes"):
        return np.asarray(boxes.boxes, np.float64).reshape(-1, 4)
    if isinstance(boxes, (list, tuple)) and boxes and isinstance(boxes[0], PlantedObject):
        return planted_boxes(boxes)
    return np.asarray(boxes, np.float64).reshape(-1, 4)
