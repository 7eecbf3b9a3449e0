"""Per-pixel models: tiled output equals the untiled model, each pixel from its farthest-from-edge tile."""

from __future__ import annotations


import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mr
from mr.errors import InvalidInputError, ModelError, SinkError
from mr.raster import segment, write_zarr
from mr.tiling import tile_grid
from tests.rasters import UTM_AFFINE, pattern, write_geotiff

HEIGHT, WIDTH = 90, 100


def double_and_mix(tiles: np.ndarray) -> np.ndarray:
    """Pixel-local, 2 bands out: 2·band 0 and band 1 + band 2."""
    return np.stack([tiles[:, 0] * 2, tiles[:, 1] + tiles[:, 2]], axis=1)


def edge_distances(tiles: np.ndarray) -> np.ndarray:
    """Depends on the place in the tile: distance of each pixel centre to the nearest top/bottom and left/right
    tile edge, then the tile's first row and column (read from an image whose bands 0, 1 are row, column)."""
    n, _, h, w = tiles.shape
    row, col = np.arange(h) + 0.5, np.arange(w) + 0.5
    dy = np.broadcast_to(np.minimum(row, h - row)[:, None], (h, w))
    dx = np.broadcast_to(np.minimum(col, w - col)[None, :], (h, w))
    out = np.empty((n, 4, h, w))
    out[:, 0], out[:, 1] = dy, dx
    out[:, 2], out[:, 3] = tiles[:, 0, :1, :1], tiles[:, 1, :1, :1]
    return out


def scene(bands: int = 3, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(bands, height, width)).astype("float32")


def coordinate_image(height: int = HEIGHT, width: int = WIDTH) -> xr.DataArray:
    rows, cols = np.mgrid[:height, :width].astype("float64")
    return xr.DataArray(np.stack([rows, cols]), dims=("band", "y", "x"))


def expected_uncovered(values: np.ndarray, grid) -> np.ndarray:
    """The untiled answer with the far-edge strip no tile covers set to the fill value (NaN)."""
    out = values.astype("float32").copy()
    out[:, grid.y.covered :, :] = np.nan
    out[:, :, grid.x.covered :] = np.nan
    return out


@pytest.mark.parametrize("strategy", ["variable", "fixed"])
@pytest.mark.parametrize("tile,overlap,region", [(32, 4, 54), (16, 5, 16), (24, 0, 48), (40, 13, 100), (128, 8, 256)])
@pytest.mark.parametrize("bands_out", [1, 2])
def test_pixel_local_model_equals_the_model_on_the_whole_image(strategy, tile, overlap, region, bands_out):
    image = scene()
    model = double_and_mix if bands_out == 2 else (lambda t: t[:, :1] * 2)
    out = segment(
        xr.DataArray(image, dims=("band", "y", "x")), model, tile_size=tile, overlap=overlap, region_size=region,
        strategy=strategy, bands_out=bands_out, batch_size=3,
    )
    grid = tile_grid(WIDTH, HEIGHT, tile, overlap, region, strategy)
    whole = model(image[np.newaxis])[0]
    assert out.shape == (bands_out, HEIGHT, WIDTH) and out.dtype == np.float32
    np.testing.assert_array_equal(out.compute(scheduler="sync").values, expected_uncovered(whole, grid))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(5, 70), width=st.integers(5, 70), tile=st.integers(2, 30), overlap_fraction=st.floats(0, 0.9),
    region_tiles=st.integers(1, 4), strategy=st.sampled_from(["variable", "fixed"]), chunk=st.integers(3, 40),
)
def test_any_tiling_of_a_chunked_array_matches_the_untiled_model(
    height, width, tile, overlap_fraction, region_tiles, strategy, chunk
):
    overlap = min(int(tile * overlap_fraction), tile - 1)
    region = tile + (region_tiles - 1) * (tile - overlap)
    image = scene(3, height, width)
    data = xr.DataArray(da.from_array(image, chunks=(1, chunk, chunk)), dims=("band", "y", "x"))
    out = segment(data, double_and_mix, tile_size=tile, overlap=overlap, region_size=region, strategy=strategy,
                  bands_out=2)
    grid = tile_grid(width, height, tile, overlap, region, strategy)
    reference = expected_uncovered(np.stack([image[0] * 2, image[1] + image[2]]), grid)
    np.testing.assert_array_equal(out.compute(scheduler="sync").values, reference)


def test_integer_classes_from_a_one_tile_function_fill_uncovered_pixels_with_zero():
    image = scene(1)
    out = segment(xr.DataArray(image[0], dims=("y", "x")), lambda tile: tile[0] > 0.5, batched=False,
                  dtype="uint8", tile_size=32, overlap=4, region_size=64)
    grid = tile_grid(WIDTH, HEIGHT, 32, 4, 64)
    assert (grid.y.covered, grid.x.covered) == (89, 98)  # variable overlap leaves a strip at the far edges
    values = out.compute(scheduler="sync").values
    assert values.dtype == np.uint8
    np.testing.assert_array_equal(values[:, :89, :98], (image[:, :89, :98] > 0.5).astype("uint8"))
    assert not values[:, 89:, :].any() and not values[:, :, 98:].any()


def farthest_from_edge(starts: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """Brute force, per pixel along one axis: the largest distance to an edge over the tiles holding it."""
    best = np.full(length, np.nan)
    for p in range(length):
        inside = (starts <= p) & (p < ends)
        if inside.any():
            best[p] = np.max(np.minimum(p + 0.5 - starts[inside], ends[inside] - p - 0.5))
    return best


@pytest.mark.parametrize("region", [32, 54, 100])
def test_every_pixel_comes_from_the_tile_where_it_is_farthest_from_an_edge(region):
    out = segment(coordinate_image(), edge_distances, tile_size=32, overlap=4, region_size=region, bands_out=4)
    values = out.compute(scheduler="sync").values
    grid = tile_grid(WIDTH, HEIGHT, 32, 4, region)
    # x: tiles start 0, 22, 44, 66 and end 32, 54, 76, 98 (cuts 27, 49, 71); y: 0, 19, 38, 57 to 32, 51, 70, 89
    assert grid.x.tile_starts.tolist() == [0, 22, 44, 66] and grid.y.tile_starts.tolist() == [0, 19, 38, 57]
    best_y = farthest_from_edge(grid.y.tile_starts, grid.y.tile_ends, HEIGHT)
    best_x = farthest_from_edge(grid.x.tile_starts, grid.x.tile_ends, WIDTH)
    uncovered = best_y[:, None] * 0 + best_x[None, :] * 0  # NaN where either axis is not covered
    np.testing.assert_array_equal(values[0], best_y[:, None] + uncovered)
    np.testing.assert_array_equal(values[1], best_x[None, :] + uncovered)
    by_hand = {  # (y, x): (distance y, distance x, tile row start, tile column start)
        (0, 0): (0.5, 0.5, 0, 0),
        (24, 27): (7.5, 5.5, 0, 22),  # centre 24.5 before the y cut 25.5; 27.5 after the x cut 27
        (25, 26): (6.5, 5.5, 19, 0),  # centre 25.5 on the y cut (a tie): the later tile, as owner_tiles does
        (45, 50): (7.5, 6.5, 38, 44),  # 45.5 after the y cut 44.5; 50.5 after the x cut 49
        (88, 97): (0.5, 0.5, 57, 66),
    }
    for (y, x), expected in by_hand.items():
        assert tuple(values[:, y, x]) == expected, (y, x)
    assert np.isnan(values[:, 89, :]).all() and np.isnan(values[:, :, 98:]).all()


def test_fixed_overlap_truncated_last_tile_owns_its_core():
    out = segment(coordinate_image(20, 40), edge_distances, tile_size=16, overlap=5, region_size=27,
                  strategy="fixed", bands_out=4)
    values = out.compute(scheduler="sync").values
    # x tiles [0, 16) [11, 27) [22, 38) [33, 40): cuts 13.5, 24.5, 35.5
    assert tuple(values[1:4:2, 0, 35]) == (2.5, 33)  # on the cut: a tie, the later tile
    assert tuple(values[1:4:2, 0, 34]) == (3.5, 22)
    assert tuple(values[1:4:2, 0, 36]) == (3.5, 33)
    assert tuple(values[1:4:2, 0, 39]) == (0.5, 33)
    assert not np.isnan(values).any()


@pytest.fixture()
def geotiff(tmp_path):
    return write_geotiff(tmp_path / "scene.tif", data=pattern(3, HEIGHT, WIDTH, "float32"), tiled=True)


def test_output_keeps_the_georeference_through_geotiff_and_zarr(geotiff, tmp_path):
    image = mr.open_image(geotiff)
    out = segment(image, double_and_mix, bands_out=2, tile_size=32, overlap=6, region_size=64, strategy="fixed")
    assert out.rio.crs == image.rio.crs and out.rio.transform() == image.rio.transform() == UTM_AFFINE
    assert out.x.equals(image.x) and out.y.equals(image.y)
    expected = double_and_mix(image.values[np.newaxis])[0]
    out.rio.to_raster(tmp_path / "out.tif")
    tif = mr.open_image(tmp_path / "out.tif")
    assert tif.rio.crs == image.rio.crs and tif.rio.transform() == UTM_AFFINE
    np.testing.assert_array_equal(tif.values, expected)
    assert write_zarr(out, tmp_path / "out.zarr") == str(tmp_path / "out.zarr")
    stored = xr.open_zarr(tmp_path / "out.zarr", decode_coords="all")["segmentation"]
    assert stored.rio.crs == image.rio.crs and stored.rio.transform() == UTM_AFFINE
    np.testing.assert_array_equal(stored.values, expected)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_zarr_writes_everything_or_nothing(tmp_path):
    data = xr.DataArray(scene(1), dims=("band", "y", "x"))
    store = tmp_path / "seg.zarr"

    def fails_on_one_region(tiles):
        if (tiles == data.values[0, 0, 0]).any():
            raise RuntimeError("out of memory")
        return tiles

    broken = segment(data, fails_on_one_region, tile_size=32, overlap=0, region_size=32)
    with pytest.raises(SinkError) as error:
        write_zarr(broken, store)
    assert isinstance(error.value.__cause__, ModelError)
    assert list(tmp_path.iterdir()) == []
    write_zarr(segment(data, lambda t: t, tile_size=32, overlap=0), store)
    with pytest.raises(InvalidInputError, match="overwrite=True"):
        write_zarr(segment(data, lambda t: t * 0, tile_size=32, overlap=0), store)
    write_zarr(segment(data, lambda t: t * 0, tile_size=32, overlap=0), store, overwrite=True)
    assert np.nanmax(np.abs(xr.open_zarr(store)["segmentation"].values)) == 0  # the new one (NaN: uncovered)
    assert [p.name for p in tmp_path.iterdir()] == ["seg.zarr"]


def refuse(*args, **kwargs):
    raise AssertionError("building the segmentation computed something")


def test_building_reads_no_pixel_and_calls_no_model(geotiff):
    def never(tiles):
        raise AssertionError("model called")

    with dask.config.set(scheduler=refuse):
        from_file = segment(mr.open_image(geotiff), never, tile_size=16, overlap=4, region_size=32)
        chunked = xr.DataArray(da.zeros((2, 500, 400), chunks=100), dims=("band", "y", "x"))
        from_array = segment(chunked, never, tile_size=64, overlap=8, bands_out=3, region_size=128)
        assert from_file.rio.crs is not None and from_file.rio.transform() == UTM_AFFINE
        assert from_array.shape == (3, 500, 400)
    assert isinstance(from_file.data, da.Array) and len(from_file.data.dask) == from_file.data.npartitions
    assert from_file.data.name == segment(mr.open_image(geotiff), never, tile_size=16, overlap=4,
                                          region_size=32).data.name  # deterministic task names


@pytest.mark.parametrize(
    "model,batched,shape",
    [
        (lambda t: t[:, :1], True, "(4, 1, 16, 16)"),  # one band, two asked for
        (lambda t: t[:, :2, :8], True, "(4, 2, 8, 16)"),  # cropped
        (lambda tile: tile[0], False, "(4, 16, 16)"),  # (h, w) per tile with bands_out=2
    ],
)
def test_wrong_output_shapes_name_the_model(model, batched, shape):
    image = xr.DataArray(scene(3, 16, 64), dims=("band", "y", "x"))
    out = segment(image, model, bands_out=2, batched=batched, name="road-net", tile_size=16, overlap=0, batch_size=4)
    with pytest.raises(ModelError, match=r"'road-net'.*" + shape.replace("(", r"\(").replace(")", r"\)")):
        out.compute(scheduler="sync")


def test_model_failures_and_bad_options_are_reported():
    class Broken:
        name = "broken-unet"

        def __call__(self, tiles):
            raise ValueError("weights missing")

    image = xr.DataArray(scene(1, 16, 16), dims=("band", "y", "x"))
    with pytest.raises(ModelError, match="broken-unet.*weights missing") as error:
        segment(image, Broken(), tile_size=8, overlap=0).compute(scheduler="sync")
    assert isinstance(error.value.__cause__, ValueError)
    with pytest.raises(InvalidInputError, match="bands_out"):
        segment(image, Broken(), bands_out=0)
    with pytest.raises(InvalidInputError, match="dtype"):
        segment(image, Broken(), dtype="U3")
    with pytest.raises(InvalidInputError, match="model"):
        segment(image, "unet")


def test_mr_segment_is_the_function():
    image = xr.DataArray(np.arange(16 * 16, dtype="float32").reshape(1, 16, 16), dims=("band", "y", "x"))
    out = mr.segment(image, lambda t: t + 1, tile_size=8, overlap=2)
    assert mr.segment is segment and float(out[0, 0, 0]) == 1.0
