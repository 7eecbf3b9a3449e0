"""Geolocated features: a detection table plus its world geometry, and its OversightML-style outputs.

World geometry is computed on the workers, per block, through the one geolocation routine (`mr.geo`). Tables stay
columnar until a sink asks for GeoJSON or a GeoDataFrame.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import shapely

from mr.detections import Detections
from mr.geo import Georeference, pixel_to_world


@dataclass(frozen=True)
class FeatureTable:
    """Detections in full-image pixels with their WGS84 geometry (None where the image has no georeference)."""

    detections: Detections
    world: np.ndarray
    """object (n,): shapely geometry in lon/lat, or None."""
    centers: np.ndarray
    """float64 (n, 2): lon, lat of each box centre (NaN without georeference)."""
    failed_tiles: tuple = ()
    """Tiles the model could not process (see `mr.regions.failed_tile`): their features are missing."""
    metrics: Any = None
    """A `mr.metrics.Metrics` of the work that produced these rows, or None."""

    def __len__(self) -> int:
        return len(self.detections)

    @staticmethod
    def concat(tables: Iterable["FeatureTable"]) -> "FeatureTable":
        tables = list(tables)
        if not tables:
            return geolocate(Detections.empty(), None)
        return FeatureTable(
            Detections.concat([t.detections for t in tables]),
            np.concatenate([t.world for t in tables]),
            np.concatenate([t.centers for t in tables]).reshape(-1, 2),
            tuple(tile for t in tables for tile in t.failed_tiles),
            _combined_metrics(tables),
        )


def _combined_metrics(tables: list[FeatureTable]):
    """The metrics of many parts as one, or None when no part carries any."""
    measured = [t.metrics for t in tables if t.metrics is not None]
    if not measured:
        return None
    from mr.metrics import Metrics

    return Metrics.combine(measured)


def pixel_geometry(detections: Detections) -> np.ndarray:
    """Each row's geometry in full-image pixels: its own geometry where the model gave one, else its box."""
    boxes = detections.boxes
    geometry = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], ccw=False)
    given = np.array([g is not None for g in detections.geometry], dtype=bool)
    if given.any():
        geometry = geometry.astype(object)
        geometry[given] = detections.geometry[given]
    return np.asarray(geometry, dtype=object)


def geolocate(detections: Detections, georef: Georeference | None) -> FeatureTable:
    """Project every row's pixel geometry and centre to WGS84 (vectorised: one transformer call per table)."""
    n = len(detections)
    if georef is None or georef.kind is None or n == 0:
        return FeatureTable(detections, np.full(n, None, dtype=object), np.full((n, 2), np.nan))
    centers = detections.centers
    lon, lat = pixel_to_world(georef, centers[:, 0], centers[:, 1])
    pixels = pixel_geometry(detections)
    world = shapely.transform(pixels, lambda xy: np.column_stack(pixel_to_world(georef, xy[:, 0], xy[:, 1])))
    return FeatureTable(detections, np.asarray(world, dtype=object), np.column_stack([lon, lat]))


@dataclass(frozen=True)
class OutputMetadata:
    """What every output feature carries besides its own geometry and class (OversightML property names)."""

    job_id: str = ""
    image_id: str = ""
    model_name: str = ""
    inference_time: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    feature_properties: Mapping[str, Any] = field(default_factory=dict)
    source_metadata: Mapping[str, Any] | None = None


def _ring(coords: np.ndarray) -> list[list[float]]:
    return [[float(x), float(y)] for x, y in coords]


def _geojson(geometry: Any, elevation: bool = False) -> dict | None:
    if geometry is None:
        return None
    mapping = shapely.geometry.mapping(geometry)
    if elevation:
        mapping = _with_elevation(mapping)
    return _plain(mapping)


def _with_elevation(mapping: dict) -> dict:
    def lift(coords: Any) -> Any:
        if coords and isinstance(coords[0], (int, float)):
            return list(coords) + [0.0] if len(coords) == 2 else list(coords)
        return [lift(c) for c in coords]

    out = dict(mapping)
    if "coordinates" in out:
        out["coordinates"] = lift(out["coordinates"])
    return out


def _plain(value: Any) -> Any:
    """Tuples to lists and numpy scalars to Python numbers, so the result is plain JSON."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def feature_id(image_id: str, box: np.ndarray, label: str) -> str:
    """A stable id: the same image, box and class always give the same id (re-runs publish the same ids)."""
    text = f"{image_id}:{label}:{box[0]:.3f},{box[1]:.3f},{box[2]:.3f},{box[3]:.3f}"
    return hashlib.sha1(text.encode()).hexdigest()


def iter_geojson_features(table: FeatureTable, meta: OutputMetadata) -> Iterator[dict]:
    """GeoJSON features with OversightML's properties, one at a time (sinks stream them)."""
    det = table.detections
    labels = det.labels
    pixels = pixel_geometry(det)
    for i in range(len(det)):
        box = det.boxes[i]
        properties: dict[str, Any] = dict(meta.feature_properties)
        properties.update(
            {
                "imageGeometry": _geojson(pixels[i]),
                "imageBBox": [float(v) for v in box],
                "featureClasses": [{"iri": str(labels[i]), "score": float(det.scores[i])}],
                "center_longitude": _number(table.centers[i, 0]),
                "center_latitude": _number(table.centers[i, 1]),
                "inferenceMetadata": {"jobId": meta.job_id, "inferenceDT": meta.inference_time},
                "modelName": meta.model_name,
                "tileId": int(det.tile_ids[i]),
            }
        )
        for key, column in det.properties.items():
            properties[key] = _plain(column[i].item() if isinstance(column[i], np.generic) else column[i])
        if meta.source_metadata:
            properties["sourceMetadata"] = [dict(meta.source_metadata)]
        yield {
            "type": "Feature",
            "id": feature_id(meta.image_id, box, str(labels[i])),
            "geometry": _geojson(table.world[i], elevation=True),
            "properties": properties,
        }


def _number(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def to_geodataframe(table: FeatureTable, meta: OutputMetadata | None = None):
    """A GeoDataFrame in WGS84 with the image-pixel geometry kept as a second geometry column."""
    import geopandas as gpd
    import pandas as pd

    det = table.detections
    columns: dict[str, Any] = {
        "label": pd.Categorical(det.labels.astype(str)),
        "score": det.scores,
        "image_x0": det.boxes[:, 0],
        "image_y0": det.boxes[:, 1],
        "image_x1": det.boxes[:, 2],
        "image_y1": det.boxes[:, 3],
        "center_longitude": table.centers[:, 0],
        "center_latitude": table.centers[:, 1],
        "tile_id": det.tile_ids,
    }
    for key, column in det.properties.items():
        columns[key] = column
    frame = gpd.GeoDataFrame(columns, geometry=gpd.GeoSeries(table.world, crs="EPSG:4326"))
    frame["image_geometry"] = gpd.GeoSeries(pixel_geometry(det), crs=None)
    if meta is not None:
        frame.attrs.update({"job_id": meta.job_id, "image_id": meta.image_id, "model": meta.model_name})
    return frame
