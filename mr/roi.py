"""A region of interest: a lon/lat polygon placed on the image, the window it needs and the tiles it touches."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely

from mr.errors import InvalidInputError
from mr.geo import Georeference, world_to_pixel
from mr.tiling import TileGrid


@dataclass(frozen=True)
class RegionOfInterest:
    """The polygon in lon/lat as given, the same polygon in full-image pixels, and its pixel window."""

    wkt: str
    pixels: Any
    """shapely (Multi)Polygon in continuous full-image pixel coordinates."""
    window: tuple[int, int, int, int]
    """x0, y0, x1, y1: the polygon's pixel bounds clipped to the image."""

    def tile_mask(self, grid: TileGrid) -> np.ndarray:
        """bool (tiles y, tiles x): tiles whose area shares more than an edge with the polygon."""
        b = grid.tile_bounds().reshape(-1, 4)
        boxes = shapely.box(b[:, 0], b[:, 1], b[:, 2], b[:, 3])
        hit = shapely.intersects(boxes, self.pixels) & ~shapely.touches(boxes, self.pixels)
        return hit.reshape(grid.shape)


def parse_polygon(roi: Any) -> Any:
    """A polygon from WKT or a shapely geometry; anything else is an error naming the field."""
    if isinstance(roi, str):
        try:
            geometry = shapely.from_wkt(roi)
        except shapely.errors.GEOSException as error:
            raise InvalidInputError("roi", roi, f"not valid WKT ({error})") from error
    elif isinstance(roi, shapely.Geometry):
        geometry = roi
    else:
        raise InvalidInputError("roi", roi, "give a WKT polygon in lon/lat")
    if geometry is None or geometry.is_empty or geometry.geom_type not in ("Polygon", "MultiPolygon"):
        raise InvalidInputError("roi", roi, "must be a non-empty POLYGON or MULTIPOLYGON in lon/lat")
    if not np.isfinite(shapely.get_coordinates(geometry)).all():  # GEOS raises on NaN/Inf (e.g. 1e400 in WKT)
        raise InvalidInputError("roi", roi, "coordinates must be finite numbers")
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    return geometry


def resolve_roi(roi: Any, georef: Georeference | None, width: int, height: int) -> RegionOfInterest | None:
    """Place the polygon on the image; None when there is no region of interest."""
    if roi is None or (isinstance(roi, str) and not roi.strip()):
        return None
    polygon = parse_polygon(roi)
    if georef is None or georef.kind is None:
        raise InvalidInputError(
            "roi", polygon.wkt, "the image has no georeference, so a lon/lat polygon cannot be placed on it"
        )
    step = _degrees_per_pixel(georef, width, height)
    dense = shapely.segmentize(polygon, max_segment_length=max(step * 16, 1e-9))
    with np.errstate(invalid="ignore", over="ignore"):
        coords = shapely.get_coordinates(dense)
        placed = np.column_stack(world_to_pixel(georef, coords[:, 0], coords[:, 1]))
    if not np.all(np.isfinite(placed)):
        raise InvalidInputError(
            "roi", polygon.wkt, "lies (at least partly) where the image's georeference is undefined"
        )
    pixels = shapely.set_coordinates(dense, placed)
    if not pixels.is_valid:
        pixels = shapely.make_valid(pixels)
    image = shapely.box(0, 0, width, height)
    clipped = pixels.intersection(image)
    if clipped.is_empty or clipped.area == 0:
        raise InvalidInputError("roi", polygon.wkt, f"does not overlap the image ({width}×{height} pixels)")
    x0, y0, x1, y1 = clipped.bounds
    window = (max(0, math.floor(x0)), max(0, math.floor(y0)), min(width, math.ceil(x1)), min(height, math.ceil(y1)))
    return RegionOfInterest(polygon.wkt, clipped, window)


def _degrees_per_pixel(georef: Georeference, width: int, height: int) -> float:
    """Rough ground size of a pixel in degrees, to densify polygon edges before projecting them."""
    from mr.geo import pixel_to_world

    lon, lat = pixel_to_world(georef, np.array([0.0, float(width)]), np.array([0.0, float(height)]))
    return float(math.hypot(lon[1] - lon[0], lat[1] - lat[0]) / math.hypot(width, height))
