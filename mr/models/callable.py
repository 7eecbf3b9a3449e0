"""Any Python function as a model: the notebook adapter.

The function takes one tile (bands, h, w) or, with ``batched=True``, the whole batch (n, bands, h, w), and returns
per tile any of:

- a :class:`~mr.detections.Detections`;
- a dict ``{"boxes": (k, 4), "scores": (k,), "labels": (k,)}`` (``scores`` default to 1, ``labels`` to
  ``"object"``), or the tuple ``(boxes, scores)`` / ``(boxes, scores, labels)``; labels are strings, or integer ids
  named by ``class_names`` (else by their decimal string);
- a list of shapely geometries or GeoJSON-like dicts (geometries, Features, or one FeatureCollection) in tile pixels:
  the box is the geometry's bounds and the geometry is kept; a Feature's ``score``/``label`` come from its properties
  (``score``, ``detection_score`` or the best of ``featureClasses``; ``label``, ``class``, that ``featureClasses``
  entry's ``iri``, or ``"object"``) and its other properties become columns.

A batched function returns a list (or tuple) of ``n`` such results. Anything else raises :class:`ModelError` naming
the model, the tile and what was wrong. The model pickles to its constructor arguments, the function by cloudpickle,
so lambdas and notebook closures travel to workers.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mr.detections import Detections
from mr.errors import InvalidInputError, ModelError

DEFAULT_LABEL = "object"


class CallableModel:
    """Adapt ``fn`` to the Model protocol; ``name`` defaults to the function's ``__qualname__``."""

    def __init__(
        self,
        fn: Callable[[np.ndarray], Any],
        *,
        batched: bool = False,
        name: str | None = None,
        class_names: Sequence[str] = (),
    ) -> None:
        if not callable(fn):
            raise InvalidInputError("fn", fn, "must be callable: a function of one tile (or of a batch)")
        if not isinstance(batched, bool):
            raise InvalidInputError("batched", batched, "must be True or False")
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidInputError("name", name, "must be a non-empty string or None")
        if isinstance(class_names, str):
            raise InvalidInputError("class_names", class_names, "must be a sequence of names, e.g. ('car', 'ship')")
        self.fn = fn
        self.batched = batched
        self.name = name or _function_name(fn)
        self.class_names = tuple(str(c) for c in class_names)

    def __repr__(self) -> str:
        return f"CallableModel({self.name!r}, batched={self.batched})"

    def __reduce__(self) -> tuple:
        import cloudpickle

        return (_rebuild, (cloudpickle.dumps(self.fn), self.batched, self.name, self.class_names))

    def __call__(self, tiles: np.ndarray) -> list[Detections]:
        """One table per tile of a (n, bands, h, w) batch."""
        if not isinstance(tiles, np.ndarray) or tiles.ndim != 4:
            shape = getattr(tiles, "shape", type(tiles).__name__)
            raise InvalidInputError("tiles", shape, "must be a numpy array of shape (n, bands, height, width)")
        if self.batched:
            results = self._run(tiles, "the batch")
            if not isinstance(results, (list, tuple)) or len(results) != len(tiles):
                got = f"{len(results)} results" if isinstance(results, (list, tuple)) else type(results).__name__
                raise ModelError(f"model {self.name!r}: a batched function must return a list of {len(tiles)} "
                                 f"results, one per tile; got {got}")
        else:
            results = [self._run(tile, f"tile {i}") for i, tile in enumerate(tiles)]
        return [self._normalise(result, i) for i, result in enumerate(results)]

    def _run(self, data: np.ndarray, what: str) -> Any:
        """Call the function, chaining whatever it raises into a ModelError."""
        try:
            return self.fn(data)
        except Exception as e:
            raise ModelError(f"model {self.name!r} failed on {what}: {type(e).__name__}: {e}") from e

    def _normalise(self, result: Any, index: int) -> Detections:
        """A Detections from any accepted return form, or ModelError."""
        try:
            return to_detections(result, self.class_names)
        except _Malformed as e:
            raise ModelError(f"model {self.name!r}, tile {index}: {e}") from None


def _rebuild(fn_bytes: bytes, batched: bool, name: str, class_names: tuple[str, ...]) -> CallableModel:
    """Unpickle by calling the constructor."""
    import pickle

    return CallableModel(pickle.loads(fn_bytes), batched=batched, name=name, class_names=class_names)


def _function_name(fn: Callable) -> str:
    """``__qualname__``, looking through functools.partial; the type name for other callables."""
    inner = fn.func if isinstance(fn, functools.partial) else fn
    return getattr(inner, "__qualname__", None) or type(fn).__name__


class _Malformed(Exception):
    """A return value that is none of the accepted forms (turned into ModelError with the model's name)."""


def to_detections(result: Any, class_names: Sequence[str] = ()) -> Detections:
    """Normalise one tile's result (any accepted form, see the module docstring) to a Detections."""
    if isinstance(result, Detections):
        _check_boxes(result.boxes)
        _check_scores(result.scores, len(result))
        return result
    if isinstance(result, Mapping) and result.get("type") == "FeatureCollection":
        return _from_features(result.get("features"))
    if isinstance(result, Mapping) and "boxes" in result:
        return _from_columns(result.get("boxes"), result.get("scores"), result.get("labels"), class_names)
    if _is_column_tuple(result):
        return _from_columns(*result, *([None] * (3 - len(result))), class_names)
    if isinstance(result, (list, tuple)):
        return _from_features(result)
    raise _Malformed(
        f"returned {type(result).__name__}; expected a Detections, a dict with 'boxes', a (boxes, scores[, labels]) "
        "tuple, or a list of shapely geometries / GeoJSON features"
    )


def _is_column_tuple(result: Any) -> bool:
    """(boxes, scores[, labels]): a tuple whose first item is array-like, or a list whose first item is an ndarray."""
    if not isinstance(result, (list, tuple)) or len(result) not in (2, 3):
        return False
    first = result[0]
    if isinstance(result, list):
        return isinstance(first, np.ndarray)
    return isinstance(first, np.ndarray) or (
        isinstance(first, (list, tuple)) and (not first or not _is_geometry_like(first[0]))
    )


def _is_geometry_like(value: Any) -> bool:
    return isinstance(value, Mapping) or hasattr(value, "geom_type")


def _from_columns(boxes: Any, scores: Any, labels: Any, class_names: Sequence[str]) -> Detections:
    """A table from box, score and label columns."""
    try:
        boxes = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise _Malformed(f"boxes are not numeric: {e}") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise _Malformed(f"boxes have shape {boxes.shape}; expected (k, 4) rows of x0, y0, x1, y1")
    k = len(boxes)
    _check_boxes(boxes)
    scores = np.ones(k, np.float32) if scores is None else _column(scores, k, "scores", np.float64)
    _check_scores(scores, k)
    return Detections.from_labels(boxes, scores, _label_column(labels, k, class_names))


def _column(values: Any, k: int, what: str, dtype: Any) -> np.ndarray:
    """A 1-D column of k values."""
    try:
        column = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise _Malformed(f"{what} are not {np.dtype(dtype).name}: {e}") from None
    if column.shape != (k,):
        raise _Malformed(f"{what} have shape {column.shape}; expected ({k},), one per box")
    return column


def _label_column(labels: Any, k: int, class_names: Sequence[str]) -> list[str]:
    """String labels: given strings, integer ids named by class_names (or as decimal strings), or the default."""
    if labels is None:
        return [DEFAULT_LABEL] * k
    if isinstance(labels, str):
        return [labels] * k
    column = _column(labels, k, "labels", object)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in column):
        ids = column.astype(np.int64)
        if class_names and k and (ids.min() < 0 or ids.max() >= len(class_names)):
            raise _Malformed(f"label ids {ids.min()}..{ids.max()} do not index class_names {tuple(class_names)}")
        return [class_names[i] if class_names else str(i) for i in ids]
    if all(isinstance(v, str) for v in column):
        return list(column)
    raise _Malformed("labels must be all strings or all integer class ids")


def _check_boxes(boxes: np.ndarray) -> None:
    """Finite boxes with x1 >= x0 and y1 >= y0."""
    if not np.isfinite(boxes).all():
        raise _Malformed(f"{int((~np.isfinite(boxes)).any(axis=1).sum())} boxes hold NaN or infinite coordinates")
    flipped = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if flipped.any():
        raise _Malformed(f"{int(flipped.sum())} boxes have x1 < x0 or y1 < y0, e.g. {boxes[flipped][0].tolist()}; "
                         "boxes are (x0, y0, x1, y1)")


def _check_scores(scores: np.ndarray, k: int) -> None:
    """Scores are finite and in [0, 1]."""
    if len(scores) != k:
        raise _Malformed(f"{len(scores)} scores for {k} boxes")
    if k and (not np.isfinite(scores).all() or scores.min() < 0 or scores.max() > 1):
        raise _Malformed(f"scores must be finite and in [0, 1]; got {scores.min()}..{scores.max()}")


def _from_features(items: Any) -> Detections:
    """A table from shapely geometries and GeoJSON geometries or Features (tile pixels)."""
    import shapely.geometry

    if not isinstance(items, (list, tuple)):
        raise _Malformed(f"features must be a list; got {type(items).__name__}")
    geometries, scores, labels, extra = [], [], [], []
    for i, item in enumerate(items):
        geometry, properties = _split_feature(item, i, shapely.geometry)
        score, label = _score_and_label(properties, i)
        geometries.append(geometry)
        scores.append(score)
        labels.append(label)
        extra.append(properties)
    if not geometries:
        return Detections.empty()
    boxes = np.array([g.bounds for g in geometries], dtype=np.float64)
    _check_boxes(boxes)
    scores = np.asarray(scores, np.float64)
    _check_scores(scores, len(scores))
    column = np.empty(len(geometries), dtype=object)
    column[:] = geometries
    return Detections.from_labels(boxes, scores, labels, geometry=column, properties=_property_columns(extra))


def _split_feature(item: Any, i: int, geometry_module: Any) -> tuple[Any, dict]:
    """(shapely geometry, properties) of a shapely geometry, a GeoJSON geometry or a GeoJSON Feature."""
    if hasattr(item, "geom_type"):
        geometry, properties = item, {}
    elif isinstance(item, Mapping) and item.get("type") == "Feature":
        geometry, properties = _shape(item.get("geometry"), i, geometry_module), dict(item.get("properties") or {})
    elif isinstance(item, Mapping) and "type" in item and "coordinates" in item:
        geometry, properties = _shape(item, i, geometry_module), {}
    else:
        raise _Malformed(f"item {i} is {type(item).__name__}, not a shapely geometry or GeoJSON geometry/Feature")
    if geometry.is_empty:
        raise _Malformed(f"item {i} has an empty geometry")
    return geometry, properties


def _shape(geojson: Any, i: int, geometry_module: Any) -> Any:
    """A shapely geometry from a GeoJSON geometry dict."""
    try:
        return geometry_module.shape(geojson)
    except Exception as e:
        raise _Malformed(f"item {i} has an invalid GeoJSON geometry: {e}") from None


def _score_and_label(properties: dict, i: int) -> tuple[float, str]:
    """Pop the score and label out of a Feature's properties (OversightML names understood)."""
    classes = properties.pop("featureClasses", None) or []
    if not isinstance(classes, list) or not all(isinstance(c, Mapping) for c in classes):
        raise _Malformed(f"item {i} has featureClasses {classes!r}; expected a list of {{iri, score}} objects")
    best = max(classes, key=lambda c: c.get("score", 0.0), default={})
    score = properties.pop("score", properties.pop("detection_score", best.get("score", 1.0)))
    label = properties.pop("label", properties.pop("class", best.get("iri", DEFAULT_LABEL)))
    try:
        score = float(score)
    except (TypeError, ValueError):
        raise _Malformed(f"item {i} has a non-numeric score {score!r}") from None
    if not math.isfinite(score):
        raise _Malformed(f"item {i} has score {score}")
    return score, str(label)


def _property_columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """One object column per property key, None where a feature lacks it."""
    keys = sorted({key for row in rows for key in row})
    columns = {}
    for key in keys:
        column = np.empty(len(rows), dtype=object)
        column[:] = [row.get(key) for row in rows]
        columns[key] = column
    return columns
