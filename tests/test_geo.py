"""Geolocation against independent truth, to 0.01 pixel: affine (geotransform maths + PROJ), GCPs sampled from a
known affine, RPCs that encode an analytic mapping; the half-pixel convention; region bounds of curved mappings."""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pyproj
import pytest
import rasterio
import shapely
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mr import geo
from mr.errors import InvalidInputError
from mr.geo import Georeference, georeference_from_dataset, pixel_bounds_of_geometry, pixel_to_world, world_to_pixel
from tests import rasters

TOLERANCE_PX = 0.01
WIDTH, HEIGHT = 64, 48


def _georef(path) -> Georeference:
    with rasterio.open(path) as ds:
        return georeference_from_dataset(ds)


def _without_errors(rpc: dict) -> dict:
    """RPC coefficients without err_bias/err_rand (the NITF TRE stores 0 for what was never given)."""
    return {k: v for k, v in rpc.items() if not k.startswith("err_")}


def _random_pixels(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, WIDTH, n), rng.uniform(0, HEIGHT, n)


def _utm_truth_lonlat(affine, x, y):
    """Independent truth: affine maths written out, then PROJ from UTM 33N."""
    to_wgs84 = pyproj.Transformer.from_crs(rasters.UTM_CRS, "EPSG:4326", always_xy=True)
    return to_wgs84.transform(affine.a * x + affine.b * y + affine.c, affine.d * x + affine.e * y + affine.f)


def _utm_truth_pixel(affine, lon, lat):
    """Independent inverse of `_utm_truth_lonlat`."""
    e, n = pyproj.Transformer.from_crs("EPSG:4326", rasters.UTM_CRS, always_xy=True).transform(lon, lat)
    inverse = ~affine
    e, n = np.asarray(e), np.asarray(n)
    return inverse.a * e + inverse.b * n + inverse.c, inverse.d * e + inverse.e * n + inverse.f


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("geo")
    return {
        "affine": rasters.write_geotiff(d / "affine.tif", transform=rasters.ROTATED_AFFINE),
        "gcp": rasters.write_gcp_geotiff(d / "gcp.tif", affine=rasters.ROTATED_AFFINE),
        "rpc": rasters.write_rpc_geotiff(d / "rpc.tif", rasters.linear_rpc()),
        "nitf": rasters.write_nitf(d / "rpc.ntf", rpcs=rasters.linear_rpc()),
        "plain": rasters.write_plain_tiff(d / "plain.tif"),
    }


# -- Georeference ---------------------------------------------------------------------------------------


def test_georeference_is_hashable_and_pickles_to_an_equal_value(files):
    for name in ("affine", "gcp", "rpc"):
        georef = _georef(files[name])
        clone = pickle.loads(pickle.dumps(georef))
        assert clone == georef and hash(clone) == hash(georef)
        assert {georef: 1}[clone] == 1


def test_rpc_dict_is_normalised_to_tuples_and_back_to_rasterio_form():
    rpc = rasters.linear_rpc()
    georef = Georeference(width=WIDTH, height=HEIGHT, rpcs=rpc.to_dict())
    assert isinstance(georef.rpcs, tuple)
    assert all(not isinstance(value, list) for _, value in georef.rpcs)
    assert rasterio.rpc.RPC(**georef.rpc_dict) == rpc


@pytest.mark.parametrize(
    "fields, kind",
    [
        ({"crs": "EPSG:32633", "transform": (0, 1, 0, 0, 0, -1)}, "affine"),
        ({"transform": (0, 1, 0, 0, 0, -1)}, None),  # a geotransform without a CRS cannot reach WGS84
        ({"crs": "EPSG:32633", "transform": (0, 1, 1, 0, -1, -1)}, None),  # degenerate: not invertible
        ({"gcps": ((0, 0, 1, 1, 0), (0, 5, 2, 1, 0), (5, 0, 1, 2, 0)), "gcp_crs": "EPSG:4326"}, "gcp"),
        ({"gcps": ((0, 0, 1, 1, 0), (0, 5, 2, 1, 0)), "gcp_crs": "EPSG:4326"}, None),  # too few for a fit
        ({"rpcs": rasters.linear_rpc().to_dict(), "crs": "EPSG:4326", "transform": (0, 1, 0, 0, 0, -1)}, "rpc"),
        ({"rpcs": rasters.linear_rpc().to_dict(), "gcps": ((0, 0, 1, 1, 0),) * 3, "gcp_crs": "EPSG:4326"}, "rpc"),
        ({}, None),
    ],
)
def test_kind_prefers_rpc_then_gcp_then_affine(fields, kind):
    assert Georeference(width=10, height=10, **fields).kind == kind


def test_kind_from_files(files):
    assert {name: _georef(path).kind for name, path in files.items()} == {
        "affine": "affine", "gcp": "gcp", "rpc": "rpc", "nitf": "rpc", "plain": None,
    }


def test_plain_tiff_identity_transform_is_not_a_georeference(files):
    georef = _georef(files["plain"])
    assert georef.transform is None and georef.crs is None and georef.kind is None


def test_nitf_with_rpc_and_igeolo_keeps_both_and_uses_rpc(files):
    georef = _georef(files["nitf"])
    assert georef.transform is not None  # GDAL's coarse affine from the IGEOLO corners
    assert georef.kind == "rpc"
    assert _without_errors(georef.rpc_dict) == _without_errors(rasters.linear_rpc().to_dict())  # RPC00B round trip


def test_geolocating_without_georeference_is_a_clear_error(files):
    with pytest.raises(InvalidInputError, match="Georeference.kind"):
        pixel_to_world(_georef(files["plain"]), 1.0, 1.0)
    with pytest.raises(InvalidInputError):
        world_to_pixel(_georef(files["plain"]), 15.0, 40.0)


# -- affine ---------------------------------------------------------------------------------------------


def test_affine_agrees_with_geotransform_maths_and_proj(files):
    x, y = _random_pixels()
    lon, lat = pixel_to_world(_georef(files["affine"]), x, y)
    col, row = _utm_truth_pixel(rasters.ROTATED_AFFINE, lon, lat)
    assert np.abs(col - x).max() < TOLERANCE_PX and np.abs(row - y).max() < TOLERANCE_PX
    truth_lon, truth_lat = _utm_truth_lonlat(rasters.ROTATED_AFFINE, x, y)
    np.testing.assert_allclose(lon, truth_lon, rtol=0, atol=1e-9)
    np.testing.assert_allclose(lat, truth_lat, rtol=0, atol=1e-9)


def test_half_pixel_convention(files):
    georef = _georef(files["affine"])
    affine = rasters.ROTATED_AFFINE
    corner = pixel_to_world(georef, 0.0, 0.0)
    np.testing.assert_allclose(corner, _utm_truth_lonlat(affine, 0.0, 0.0), rtol=0, atol=1e-10)
    origin = pyproj.Transformer.from_crs(rasters.UTM_CRS, "EPSG:4326", always_xy=True).transform(affine.c, affine.f)
    np.testing.assert_allclose(corner, origin, rtol=0, atol=1e-10)  # pixel corner (0, 0) is the geotransform origin
    with rasterio.open(files["affine"]) as ds:
        centre_xy = ds.xy(0, 0)  # rasterio: the centre of pixel (row 0, col 0)
    centre = pyproj.Transformer.from_crs(rasters.UTM_CRS, "EPSG:4326", always_xy=True).transform(*centre_xy)
    np.testing.assert_allclose(pixel_to_world(georef, 0.5, 0.5), centre, rtol=0, atol=1e-10)


def test_affine_round_trip(files):
    georef = _georef(files["affine"])
    x, y = _random_pixels(seed=1)
    back_x, back_y = world_to_pixel(georef, *pixel_to_world(georef, x, y))
    assert np.abs(back_x - x).max() < TOLERANCE_PX and np.abs(back_y - y).max() < TOLERANCE_PX


@settings(max_examples=50, deadline=None)
@given(
    dx=st.floats(0.1, 30), dy=st.floats(-30, -0.1), rx=st.floats(-5, 5), ry=st.floats(-5, 5),
    x=st.floats(0, 1000), y=st.floats(0, 1000),
)
def test_affine_round_trip_for_any_geotransform(dx, dy, rx, ry, x, y):
    assume(abs(dx * dy - rx * ry) > 1e-3)  # degenerate geotransforms have kind None
    georef = Georeference(width=1000, height=1000, crs=rasters.UTM_CRS, transform=(400_000, dx, rx, 4_400_000, ry, dy))
    back_x, back_y = world_to_pixel(georef, *pixel_to_world(georef, x, y))
    assert abs(back_x - x) < TOLERANCE_PX and abs(back_y - y) < TOLERANCE_PX


# -- GCP ------------------------------------------------------------------------------------------------


def test_gcps_sampled_from_an_affine_reproduce_it(files):
    georef = _georef(files["gcp"])
    assert len(georef.gcps) == 9
    x, y = _random_pixels(seed=2)
    lon, lat = pixel_to_world(georef, x, y)
    col, row = _utm_truth_pixel(rasters.ROTATED_AFFINE, lon, lat)
    assert np.abs(col - x).max() < TOLERANCE_PX and np.abs(row - y).max() < TOLERANCE_PX
    back_x, back_y = world_to_pixel(georef, *_utm_truth_lonlat(rasters.ROTATED_AFFINE, x, y))
    assert np.abs(back_x - x).max() < TOLERANCE_PX and np.abs(back_y - y).max() < TOLERANCE_PX


def test_gcp_continuous_coordinates_are_not_shifted(files):
    georef = _georef(files["gcp"])
    np.testing.assert_allclose(
        pixel_to_world(georef, 0.0, 0.0), _utm_truth_lonlat(rasters.ROTATED_AFFINE, 0.0, 0.0), rtol=0, atol=1e-9
    )


# -- RPC ------------------------------------------------------------------------------------------------


def _rpc_pixel_error(rpc, lon, lat, truth_lon, truth_lat) -> float:
    """Largest error in pixels: degrees over degrees-per-pixel on each axis."""
    return max(
        np.abs(lon - truth_lon).max() / (rpc.long_scale / rpc.samp_scale),
        np.abs(lat - truth_lat).max() / (rpc.lat_scale / rpc.line_scale),
    )


@pytest.mark.parametrize("name", ["rpc", "nitf"])
def test_rpc_agrees_with_the_analytic_mapping(files, name):
    rpc = rasters.linear_rpc()
    georef = _georef(files[name])
    x, y = _random_pixels(seed=3)
    lon, lat = pixel_to_world(georef, x, y)
    assert _rpc_pixel_error(rpc, lon, lat, *rasters.linear_rpc_truth(rpc, x, y)) < TOLERANCE_PX
    back_x, back_y = world_to_pixel(georef, lon, lat)
    assert np.abs(back_x - x).max() < TOLERANCE_PX and np.abs(back_y - y).max() < TOLERANCE_PX


def test_rpc_half_pixel_convention(files):
    rpc = rasters.linear_rpc()
    georef = _georef(files["rpc"])
    # the RPC's (line_off, samp_off) is a pixel centre: continuous (samp_off + 0.5, line_off + 0.5)
    lon, lat = pixel_to_world(georef, rpc.samp_off + 0.5, rpc.line_off + 0.5)
    assert abs(lon - rpc.long_off) < 1e-9 and abs(lat - rpc.lat_off) < 1e-9


def test_rpc_height_defaults_to_zero_and_is_used_when_given():
    rpc = rasters.linear_rpc(sample_height_term=0.2)
    georef = Georeference(width=WIDTH, height=HEIGHT, rpcs=rpc.to_dict())
    x, y = _random_pixels(seed=4)
    heights = np.linspace(-50, 400, x.size)
    lon0, lat0 = pixel_to_world(georef, x, y)
    assert _rpc_pixel_error(rpc, lon0, lat0, *rasters.linear_rpc_truth(rpc, x, y, 0.0)) < TOLERANCE_PX
    lon, lat = pixel_to_world(georef, x, y, height=heights)
    assert _rpc_pixel_error(rpc, lon, lat, *rasters.linear_rpc_truth(rpc, x, y, heights)) < TOLERANCE_PX
    back_x, back_y = world_to_pixel(georef, lon, lat, height=heights)
    assert np.abs(back_x - x).max() < TOLERANCE_PX and np.abs(back_y - y).max() < TOLERANCE_PX


def test_curved_rpc_round_trip():
    rpc = rasters.linear_rpc(sample_lat2_term=0.3)
    georef = Georeference(width=800, height=1000, rpcs=rpc.to_dict())
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, 800, 500), rng.uniform(0, 1000, 500)
    lon, lat = pixel_to_world(georef, x, y)
    assert _rpc_pixel_error(rpc, lon, lat, *rasters.linear_rpc_truth(rpc, x, y)) < TOLERANCE_PX
    back_x, back_y = world_to_pixel(georef, lon, lat)
    assert np.abs(back_x - x).max() < TOLERANCE_PX and np.abs(back_y - y).max() < TOLERANCE_PX


def test_rpc_points_that_do_not_map_back_become_nan():
    rpc = rasters.linear_rpc()
    georef = Georeference(width=WIDTH, height=HEIGHT, rpcs=rpc.to_dict())
    x, y = np.array([10.0, 20.0]), np.array([10.0, 20.0])
    lon, lat = rasters.linear_rpc_truth(rpc, x, y)
    lon[1] += rpc.long_scale / rpc.samp_scale  # one pixel off: what a diverged iteration would return
    masked_lon, masked_lat = geo._mask_rpc_failures(georef, x, y, np.zeros(2), lon, lat)
    assert np.isfinite(masked_lon[0]) and np.isnan(masked_lon[1]) and np.isnan(masked_lat[1])


# -- shapes, bounds, caching ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["affine", "gcp", "rpc"])
def test_shapes_are_kept(files, name):
    georef = _georef(files[name])
    lon, lat = pixel_to_world(georef, 3.0, 4.0)
    assert lon.shape == () and lat.shape == ()
    grid_x, grid_y = np.meshgrid(np.arange(5.0), np.arange(3.0))
    lon, lat = pixel_to_world(georef, grid_x, grid_y)
    assert lon.shape == (3, 5) and lat.shape == (3, 5)
    x, y = world_to_pixel(georef, lon, lat)
    np.testing.assert_allclose(x, grid_x, atol=TOLERANCE_PX)
    empty = pixel_to_world(georef, np.empty(0), np.empty(0))
    assert empty[0].shape == (0,)


def test_pixel_bounds_of_the_image_footprint(files):
    georef = _georef(files["affine"])
    corners_x, corners_y = np.array([0.0, WIDTH, WIDTH, 0.0]), np.array([0.0, 0.0, HEIGHT, HEIGHT])
    footprint = shapely.Polygon(np.column_stack(pixel_to_world(georef, corners_x, corners_y)))
    bounds = pixel_bounds_of_geometry(georef, footprint)
    np.testing.assert_allclose(bounds, (0, 0, WIDTH, HEIGHT), atol=TOLERANCE_PX)


def test_pixel_bounds_follow_curved_edges():
    # sample = L + 0.5 P^2: along a lon/lat box's west edge the smallest sample is mid-edge (P = 0), not a corner
    rpc = rasters.linear_rpc(sample_lat2_term=0.5)
    georef = Georeference(width=800, height=1000, rpcs=rpc.to_dict())
    box = shapely.box(
        rpc.long_off - rpc.long_scale, rpc.lat_off - rpc.lat_scale, rpc.long_off + rpc.long_scale,
        rpc.lat_off + rpc.lat_scale,
    )
    x0, y0, x1, y1 = pixel_bounds_of_geometry(georef, box)
    assert abs(x0 - (rpc.samp_off - rpc.samp_scale + 0.5)) < 0.1  # corners alone: 200 px further east
    assert abs(x1 - (rpc.samp_off + 1.5 * rpc.samp_scale + 0.5)) < TOLERANCE_PX
    assert abs(y0 - (rpc.line_off - rpc.line_scale + 0.5)) < TOLERANCE_PX
    assert abs(y1 - (rpc.line_off + rpc.line_scale + 0.5)) < TOLERANCE_PX


def test_pixel_bounds_of_an_empty_geometry_is_an_input_error(files):
    with pytest.raises(InvalidInputError):
        pixel_bounds_of_geometry(_georef(files["affine"]), shapely.Polygon())


def test_transformers_are_cached_per_process_and_thread(files):
    georef = _georef(files["rpc"])
    assert geo._gdal_transformer(georef) is geo._gdal_transformer(pickle.loads(pickle.dumps(georef)))
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(geo._gdal_transformer(georef)))
    thread.start()
    thread.join()
    assert other[0] is not geo._gdal_transformer(georef)
    affine = _georef(files["affine"])
    assert geo._to_wgs84(affine.crs) is geo._to_wgs84(affine.crs)
