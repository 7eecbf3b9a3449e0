"""mr.quicklook: reduced views that never read a huge image whole, boxes drawn where the features are, a map."""

from __future__ import annotations

import sys
import time

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import xarray as xr

import mr
from mr import quicklook as ql
from mr.errors import InvalidInputError
from mr.reader import RasterReader
from mr.synthetic import write_scene
from tests.rasters import write_sparse_geotiff

pytest.importorskip("matplotlib")


def _raising_scheduler(dsk, keys, **kwargs):
    raise AssertionError("the overview computed a dask graph")


@pytest.fixture
def no_full_resolution_reads(monkeypatch):
    """Neither a dask compute nor a full-resolution window read may happen."""

    def refuse(self, key):
        raise AssertionError(f"full-resolution read {key}")

    monkeypatch.setattr(RasterReader, "__getitem__", refuse)
    with dask.config.set(scheduler=_raising_scheduler):
        yield


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 2048 x 1024 RGB scene and its detections (real ones, from the builtin model)."""
    path = tmp_path_factory.mktemp("quicklook") / "scene.tif"
    write_scene(path, 2048, 1024, bands=3, n_objects=30, seed=1)
    image = mr.open_image(path)
    return image, mr.detect(image).compute(scheduler="sync")


def test_overview_of_a_huge_sparse_geotiff_samples_it_without_reading_it(tmp_path, no_full_resolution_reads):
    image = mr.open_image(write_sparse_geotiff(tmp_path / "huge.tif"))  # 100,000 x 100,000, no overviews
    start = time.perf_counter()
    pixels, scale = ql.overview(image)
    assert time.perf_counter() - start < 5
    assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8
    assert scale == pytest.approx(1024 / 100_000)


def test_overview_reads_the_files_own_overviews(tmp_path, no_full_resolution_reads):
    path = write_sparse_geotiff(tmp_path / "huge.tif")  # every full-resolution pixel is 0
    side = (100_000 + 63) // 64
    level = np.full((1, side, side), 50, np.uint8)
    level[:, :, : side // 2] = 200  # only the overview knows: bright left half
    with rasterio.open(f"{path}.ovr", "w", driver="GTiff", width=side, height=side, count=1, dtype="uint8") as ovr:
        ovr.write(level)
    pixels, _ = ql.overview(mr.open_image(path), max_size=500)
    assert pixels.shape == (500, 500)
    assert (pixels[:, :240] == 255).all() and (pixels[:, 260:] == 0).all()


def test_overview_of_a_small_file_at_full_size_is_the_stretched_image(scene):
    image, _ = scene
    pixels, scale = ql.overview(image, max_size=4096)
    assert scale == 1.0
    np.testing.assert_array_equal(pixels, ql.stretch(image.values))


def test_a_compressed_file_without_overviews_gets_advice(scene, monkeypatch):
    monkeypatch.setattr(ql, "FULL_READ_WARN_PIXELS", 1000)
    with pytest.warns(ql.MissingOverviewsWarning, match="gdaladdo"):
        ql.overview(scene[0], max_size=256)


def _planted_array(chunks=None):
    """(3, 3000, 2000) floats: a ramp per band, a nodata block and a NaN stripe."""
    values = np.broadcast_to(np.arange(2000.0), (3, 3000, 2000)).copy()
    values[:, :300, :300] = -9999.0
    values[:, 1500, :] = np.nan
    data = da.from_array(values, chunks=(3, 500, 500)) if chunks else values
    return xr.DataArray(data, dims=("band", "y", "x"), attrs={"nodata": -9999.0})


@pytest.mark.parametrize("lazy", [False, True])
def test_overview_of_an_array_is_strided_and_stretched(lazy):
    pixels, scale = ql.overview(_planted_array(chunks=lazy), max_size=1024)
    assert scale == pytest.approx(1 / 3)
    assert pixels.shape == (1000, 667, 3)
    assert (pixels[:100, :100] == 0).all()  # nodata is black and does not widen the stretch
    assert pixels[600, -1, 0] == 255 and pixels[600, 10, 0] == 0  # beyond the 98th / below the 2nd percentile
    assert pixels[600, 333, 0] == pytest.approx(255 * (999 - 40) / (1960 - 40), abs=2)


def test_overview_of_one_band_is_grey_and_max_size_is_checked():
    grey, scale = ql.overview(xr.DataArray(np.arange(100.0).reshape(10, 10), dims=("y", "x")), max_size=64)
    assert grey.shape == (10, 10) and scale == 1.0
    with pytest.raises(InvalidInputError, match="max_size"):
        ql.overview(xr.DataArray(np.zeros((1, 4, 4)), dims=("band", "y", "x")), max_size=0)


def _box_extents(collection) -> np.ndarray:
    """x0, y0, x1, y1 of each drawn outline."""
    segments = collection.get_segments()
    return np.array([[*s.min(axis=0), *s.max(axis=0)] for s in segments]).reshape(-1, 4)


def test_quicklook_draws_each_feature_once_at_its_scaled_place(scene):
    image, features = scene
    figure = ql.quicklook(image, features, max_size=512)
    ax = figure.axes[0]
    scale = 512 / 2048
    assert ax.images[0].get_array().shape == (256, 512, 3)
    drawn = _box_extents(ax.collections[0])
    boxes = features[list(ql.BOX_COLUMNS)].to_numpy() * scale
    centre, size = (boxes[:, :2] + boxes[:, 2:]) / 2, np.maximum(boxes[:, 2:] - boxes[:, :2], ql.MIN_BOX_PIXELS)
    np.testing.assert_allclose(drawn, np.hstack([centre - size / 2, centre + size / 2]))
    colours = ql.class_colours(features["label"])
    expected = [colours[str(v)] for v in features["label"]]
    np.testing.assert_allclose(ax.collections[0].get_edgecolors()[:, :3], [_rgb(c) for c in expected])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{k} ({(features['label'] == k).sum()})" for k in colours]
    assert ax.get_title().startswith(f"scene.tif: {len(features)} features")


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))


def test_quicklook_takes_boxes_from_image_geometry_alone(scene):
    image, features = scene
    geometry_only = features.drop(columns=list(ql.BOX_COLUMNS))
    drawn = _box_extents(ql.quicklook(image, geometry_only, max_size=512).axes[0].collections[0])
    np.testing.assert_allclose(drawn, _box_extents(ql.quicklook(image, features, max_size=512).axes[0].collections[0]))


def test_quicklook_with_no_features_and_with_thousands(scene):
    image, features = scene
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    empty = ql.quicklook(image, features.iloc[:0], ax=ax, max_size=256)
    assert empty is ax.figure and ax.get_legend() is None
    assert len(ax.collections[0].get_segments()) == 0 and "0 features" in ax.get_title()
    rng = np.random.default_rng(0)
    x0, y0 = rng.uniform(0, 2000, 5000), rng.uniform(0, 1000, 5000)
    many = pd.DataFrame({"image_x0": x0, "image_y0": y0, "image_x1": x0 + 20, "image_y1": y0 + 10,
                         "label": rng.choice(["car", "ship", "plane"], 5000), "score": rng.uniform(size=5000)})
    start = time.perf_counter()
    figure = ql.quicklook(image, many, max_size=256, color_by="score")
    assert len(figure.axes[0].collections[0].get_segments()) == 5000
    assert len(figure.axes) == 2  # the score colour bar
    assert time.perf_counter() - start < 5


def test_save_quicklook_writes_a_png(scene, tmp_path):
    import matplotlib.image

    path = ql.save_quicklook(*scene, tmp_path / "look.png", max_size=256, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).ndim == 3


def test_quicklook_asks_for_computed_features(scene):
    with pytest.raises(InvalidInputError, match="compute"):
        ql.quicklook(scene[0], mr.detect(scene[0]))


def test_explore_maps_the_features_and_the_footprint(scene):
    folium = pytest.importorskip("folium")
    image, features = scene
    m = ql.explore(features, image)
    assert isinstance(m, folium.Map)
    html = m.get_root().render()
    lon, lat = features.geometry.iloc[0].exterior.coords[0]
    assert str(lon) in html and str(lat) in html
    footprint = ql.image_footprint(image)
    assert footprint.contains(shapely.union_all(features.geometry.to_numpy()))
    x0, y0, x1, y1 = footprint.bounds
    assert f"[[{y0}, {x0}], [{y1}, {x1}]]" in html  # the view fits the image
    assert str(footprint.exterior.coords[0][0]) in html
    assert "image footprint" in html and "bright-object" in html


def test_explore_refuses_features_without_world_geometry():
    pytest.importorskip("folium")
    frame = gpd.GeoDataFrame({"label": ["car"]}, geometry=gpd.GeoSeries([None], crs="EPSG:4326"))
    with pytest.raises(InvalidInputError, match="quicklook"):
        ql.explore(frame)


def test_explore_without_folium_says_how_to_install_it(scene, monkeypatch):
    monkeypatch.setitem(sys.modules, "folium", None)
    with pytest.raises(ImportError, match="pip install folium"):
        ql.explore(scene[1])
