"""Region of interest alone: lon/lat polygon → pixel window and the tiles it touches."""

import numpy as np
import pytest
import shapely
from pyproj import CRS

from mr.errors import InvalidInputError
from mr.geo import Georeference
from mr.roi import resolve_roi
from mr.tiling import tile_grid

# 0.001° pixels from (10 E, 50 N): pixel (x, y) ↔ lon 10 + x/1000, lat 50 - y/1000
GEOREF = Georeference(width=1000, height=800, crs=CRS.from_epsg(4326).to_wkt(), transform=(10, 0.001, 0, 50, 0, -0.001))


def lonlat(x: float, y: float) -> str:
    return f"{10 + x / 1000} {50 - y / 1000}"


def polygon(*points: tuple[float, float]) -> str:
    ring = [lonlat(*p) for p in points + (points[0],)]
    return f"POLYGON(({', '.join(ring)}))"


def test_rectangle_gives_its_pixel_window():
    roi = resolve_roi(polygon((100, 200), (300, 200), (300, 450), (100, 450)), GEOREF, 1000, 800)
    assert roi.window == (100, 200, 300, 450)
    assert np.allclose(roi.pixels.bounds, (100, 200, 300, 450))


def test_triangle_skips_the_tiles_it_misses():
    roi = resolve_roi(polygon((0, 0), (650, 0), (0, 650)), GEOREF, 1000, 800)
    grid = tile_grid(1000, 800, 64, 0, 256, "fixed", window=roi.window)
    mask = roi.tile_mask(grid)
    bounds = grid.tile_bounds()
    assert mask.shape == grid.shape == (11, 11)  # 650 px: ten full tiles and a truncated one
    for iy in range(11):
        for ix in range(11):
            x0, y0, x1, y1 = bounds[iy, ix]
            inside = x0 + y0 < 650  # the tile's top-left corner lies inside the triangle
            assert mask[iy, ix] == inside, (iy, ix)


def test_polygon_is_clipped_to_the_image():
    roi = resolve_roi(polygon((-50, -50), (200, -50), (200, 100), (-50, 100)), GEOREF, 1000, 800)
    assert roi.window == (0, 0, 200, 100)


@pytest.mark.parametrize(
    "wkt, reason",
    [
        ("POINT(10.1 49.9)", "POLYGON"),
        ("POLYGON((10 50", "WKT"),
        (polygon((2000, 2000), (2100, 2000), (2100, 2100)), "does not overlap"),
    ],
)
def test_bad_regions_name_the_field(wkt, reason):
    with pytest.raises(InvalidInputError, match=reason) as error:
        resolve_roi(wkt, GEOREF, 1000, 800)
    assert error.value.field == "roi"


def test_no_region_and_no_georeference():
    assert resolve_roi(None, GEOREF, 1000, 800) is None
    with pytest.raises(InvalidInputError, match="no georeference"):
        resolve_roi(polygon((0, 0), (10, 0), (10, 10)), None, 1000, 800)
    assert isinstance(shapely.from_wkt(polygon((0, 0), (10, 0), (10, 10))), shapely.Polygon)
