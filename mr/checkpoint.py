"""Region checkpoints: each finished region's detections persist before the region counts as done.

A redelivered request finds them and skips the work; since what is stored is the region's raw result (settled and
pending rows), the seam tree runs again over exactly the same rows, so the final features are identical and
nothing is counted twice. Files are Parquet (no pickle: nothing read back can execute code), written to a
temporary name and renamed into place, so a checkpoint is whole or absent.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from mr.detections import Detections
from mr.regions import RegionResult

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str) -> str:
    """A single path component made from an id that comes from a message: no separators, never ``.``/``..``."""
    name = _SAFE.sub("_", text)
    return name if name.strip(".") else f"_{name}"


class RegionCheckpoint(Protocol):
    """Where region results are kept between deliveries of one request."""

    def load(self, ry: int, rx: int) -> RegionResult | None: ...

    def save(self, ry: int, rx: int, result: RegionResult) -> None: ...


@dataclass(frozen=True)
class DirectoryCheckpoint:
    """Region results as ``<root>/<job>/<image>/r<ry>-c<rx>.parquet``; pickles to these fields."""

    root: str
    job_id: str
    image_id: str

    @property
    def folder(self) -> Path:
        return Path(self.root) / safe_name(self.job_id) / safe_name(self.image_id)

    def path(self, ry: int, rx: int) -> Path:
        return self.folder / f"r{ry}-c{rx}.parquet"

    def load(self, ry: int, rx: int) -> RegionResult | None:
        path = self.path(ry, rx)
        if not path.exists():
            return None
        return result_from_table(pq.read_table(path))

    def save(self, ry: int, rx: int, result: RegionResult) -> None:
        path = self.path(ry, rx)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        pq.write_table(result_to_table(result), partial)
        os.replace(partial, path)

    def done(self) -> set[str]:
        """Region ids (``r<ry>-c<rx>``) already checkpointed."""
        return {p.stem for p in self.folder.glob("r*-c*.parquet")} if self.folder.exists() else set()


def _detections_table(table: Detections, part: str) -> pa.Table:
    labels = np.asarray(table.class_names or ("",), dtype=object)[table.class_ids] if len(table) else []
    geometry = [None if g is None else shapely.to_wkb(g) for g in table.geometry]
    columns = {
        "part": pa.array([part] * len(table), pa.string()),
        "x0": table.boxes[:, 0], "y0": table.boxes[:, 1], "x1": table.boxes[:, 2], "y1": table.boxes[:, 3],
        "score": table.scores,
        "label": pa.array(list(labels), pa.string()),
        "tile_id": table.tile_ids,
        "geometry": pa.array(geometry, pa.binary()),
    }
    for key, column in table.properties.items():
        columns[f"p:{key}"] = pa.array(list(column)) if column.dtype == object else column
    return pa.table(columns)


def result_to_table(result: RegionResult) -> pa.Table:
    """Settled and pending rows in one Arrow table; counters in the schema metadata."""
    tables = [_detections_table(result.settled, "settled"), _detections_table(result.pending, "pending")]
    table = pa.concat_tables(tables, promote_options="permissive")
    meta = {
        b"tiles": str(result.tiles).encode(),
        b"model_seconds": repr(result.model_seconds).encode(),
        b"failed_tiles": json.dumps(list(result.failed_tiles)).encode(),
    }
    return table.replace_schema_metadata(meta)


def _detections_from(table: pa.Table) -> Detections:
    if table.num_rows == 0:
        return Detections.empty()
    data = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    boxes = np.column_stack([data["x0"], data["y0"], data["x1"], data["y1"]]).astype(np.float64)
    geometry = np.array([None if g is None else shapely.from_wkb(g) for g in data["geometry"]], dtype=object)
    properties = {name[2:]: data[name] for name in data if name.startswith("p:")}
    return Detections.from_labels(
        boxes, data["score"], list(data["label"]), tile_ids=data["tile_id"], geometry=geometry, properties=properties
    )


def result_from_table(table: pa.Table) -> RegionResult:
    """The inverse of `result_to_table`."""
    meta = table.schema.metadata or {}
    parts = table.column("part").to_numpy(zero_copy_only=False)
    settled = _detections_from(table.filter(pa.array(parts == "settled")))
    pending = _detections_from(table.filter(pa.array(parts == "pending")))
    failed = tuple(json.loads(meta.get(b"failed_tiles", b"[]")))
    return RegionResult(
        settled, pending, int(meta.get(b"tiles", b"0")), float(meta.get(b"model_seconds", b"0")), failed
    )
