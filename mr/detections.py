"""Columnar detections: one small table per tile, block or image, GeoJSON only at the sink.

Boxes are ``(x0, y0, x1, y1)`` in continuous pixel coordinates ((0, 0) is the outer corner of the first
pixel). Class labels are integer ids into a per-table vocabulary so that de-duplication never touches strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np


def _empty_geometry(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


@dataclass(frozen=True)
class Detections:
    """A table of detections; every column has one row per detection."""

    boxes: np.ndarray
    """float64 (n, 4): x0, y0, x1, y1 in pixels."""
    scores: np.ndarray
    """float32 (n,): confidence in [0, 1]."""
    class_ids: np.ndarray
    """int32 (n,): index into ``class_names``."""
    class_names: tuple[str, ...] = ()
    """The vocabulary of class labels."""
    tile_ids: np.ndarray | None = None
    """int64 (n,): flat index of the tile that found each row (-1 where unknown)."""
    geometry: np.ndarray | None = None
    """object (n,): shapely geometry in pixels (polygons, points, lines) or None where the box says it all."""
    properties: Mapping[str, np.ndarray] = field(default_factory=dict)
    """Free per-row columns (numpy arrays of length n) carried to the output unchanged."""

    def __post_init__(self) -> None:
        n = len(self.scores)
        object.__setattr__(self, "boxes", np.asarray(self.boxes, dtype=np.float64).reshape(n, 4))
        object.__setattr__(self, "scores", np.asarray(self.scores, dtype=np.float32))
        object.__setattr__(self, "class_ids", np.asarray(self.class_ids, dtype=np.int32).reshape(n))
        tile_ids = np.full(n, -1, np.int64) if self.tile_ids is None else np.asarray(self.tile_ids, np.int64)
        object.__setattr__(self, "tile_ids", tile_ids.reshape(n))
        geometry = _empty_geometry(n) if self.geometry is None else np.asarray(self.geometry, dtype=object)
        object.__setattr__(self, "geometry", geometry.reshape(n))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        props = {k: np.asarray(v) for k, v in dict(self.properties).items()}
        for key, column in props.items():
            if len(column) != n:
                raise ValueError(f"property column {key!r} has {len(column)} rows, the table has {n}")
        object.__setattr__(self, "properties", props)
        if n and (self.class_ids.min() < 0 or self.class_ids.max() >= max(len(self.class_names), 1)):
            raise ValueError(
                f"class_ids range {self.class_ids.min()}..{self.class_ids.max()} does not index "
                f"class_names {self.class_names!r}"
            )

    @classmethod
    def empty(cls, class_names: Sequence[str] = ()) -> "Detections":
        """A table with no rows."""
        return cls(np.empty((0, 4)), np.empty(0, np.float32), np.empty(0, np.int32), tuple(class_names))

    @classmethod
    def from_labels(
        cls,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: Sequence[str],
        **columns: object,
    ) -> "Detections":
        """Build a table from string labels (the friendly form for user models)."""
        names, ids = np.unique(np.asarray(labels, dtype=str), return_inverse=True) if len(labels) else ([], [])
        return cls(boxes, scores, np.asarray(ids, np.int32), tuple(str(n) for n in names), **columns)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def labels(self) -> np.ndarray:
        """The class label of every row, as strings."""
        names = np.asarray(self.class_names or ("",), dtype=object)
        return names[self.class_ids]

    @property
    def centers(self) -> np.ndarray:
        """float64 (n, 2): box centres x, y."""
        return np.column_stack(
            ((self.boxes[:, 0] + self.boxes[:, 2]) / 2, (self.boxes[:, 1] + self.boxes[:, 3]) / 2)
        )

    def take(self, index: np.ndarray) -> "Detections":
        """The rows selected by an integer index or a boolean mask, in that order."""
        return Detections(
            self.boxes[index],
            self.scores[index],
            self.class_ids[index],
            self.class_names,
            self.tile_ids[index],
            self.geometry[index],
            {k: v[index] for k, v in self.properties.items()},
        )

    def with_scores(self, scores: np.ndarray) -> "Detections":
        """The same rows with new scores (soft-NMS lowers them)."""
        return Detections(
            self.boxes, scores, self.class_ids, self.class_names, self.tile_ids, self.geometry, self.properties
        )

    def shifted(self, dx: float, dy: float, tile_id: int | None = None) -> "Detections":
        """Rows moved by (dx, dy) pixels, e.g. from tile to image coordinates; geometry moves with them."""
        boxes = self.boxes + np.array([dx, dy, dx, dy], dtype=np.float64)
        geometry = self.geometry
        if any(g is not None for g in geometry):
            import shapely

            present = np.array([g is not None for g in geometry])
            geometry = geometry.copy()
            geometry[present] = shapely.transform(geometry[present], lambda xy: xy + np.array([dx, dy]))
        tile_ids = self.tile_ids if tile_id is None else np.full(len(self), tile_id, np.int64)
        return Detections(boxes, self.scores, self.class_ids, self.class_names, tile_ids, geometry, self.properties)

    @staticmethod
    def concat(tables: Iterable["Detections"]) -> "Detections":
        """One table from many; class vocabularies are united and ids remapped."""
        tables = [t for t in tables if t is not None]
        if not tables:
            return Detections.empty()
        names: list[str] = []
        position: dict[str, int] = {}
        for table in tables:
            for name in table.class_names:
                if name not in position:
                    position[name] = len(names)
                    names.append(name)
        remapped = []
        for table in tables:
            lookup = np.array([position[n] for n in table.class_names] or [0], dtype=np.int32)
            remapped.append(lookup[table.class_ids])
        keys = sorted({k for t in tables for k in t.properties})
        properties = {k: _concat_column([t.properties.get(k) for t in tables], [len(t) for t in tables]) for k in keys}
        return Detections(
            np.concatenate([t.boxes for t in tables]),
            np.concatenate([t.scores for t in tables]),
            np.concatenate(remapped) if remapped else np.empty(0, np.int32),
            tuple(names),
            np.concatenate([t.tile_ids for t in tables]),
            np.concatenate([t.geometry for t in tables]),
            properties,
        )


def _concat_column(columns: list[np.ndarray | None], lengths: list[int]) -> np.ndarray:
    """Concatenate a property column, filling tables that lack it with None."""
    if all(c is not None for c in columns):
        return np.concatenate(columns)
    parts = [c.astype(object) if c is not None else np.full(n, None, dtype=object) for c, n in zip(columns, lengths)]
    return np.concatenate(parts)
