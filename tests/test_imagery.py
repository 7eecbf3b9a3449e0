"""open_image: every format and georeferencing kind, lazy opening of a 100k x 100k image, block reads equal to
rasterio's own, re-opening with new chunks, one-line errors, and S3 (moto) read from threads and from processes."""

from __future__ import annotations

import os
import pickle
import re
import time

import dask
import numpy as np
import pytest
import rasterio
import rioxarray._io
import xarray as xr
from rasterio.windows import Window

from mr.errors import ImageOpenError, InvalidInputError
from mr.imagery import GdalEnv, RasterReader, image_id_for, open_image, reopen
from tests import rasters

CHUNK = 16


def _raise_if_computed(*args, **kwargs):
    raise AssertionError("something was computed while building the array")


# -- formats --------------------------------------------------------------------------------------------

FORMATS = {
    "geotiff-striped-u8x1": (rasters.write_geotiff, {}, "affine"),
    "geotiff-tiled-u16x3": (rasters.write_geotiff, {"tiled": True, "count": 3, "dtype": "uint16"}, "affine"),
    "cog-u8x3": (rasters.write_cog, {"count": 3}, "affine"),
    "cog-u16x1": (rasters.write_cog, {"dtype": "uint16"}, "affine"),
    "nitf-rpc-u8x1": (rasters.write_nitf, {"rpcs": rasters.linear_rpc()}, "rpc"),
    "nitf-u16x3": (rasters.write_nitf, {"count": 3, "dtype": "uint16"}, "affine"),
    "jp2-u8x3": (rasters.write_jp2, {"count": 3}, "affine"),
    "jp2-u16x1": (rasters.write_jp2, {"dtype": "uint16"}, "affine"),
    "gcp-geotiff-u8x1": (rasters.write_gcp_geotiff, {}, "gcp"),
    "rpc-geotiff-u16x1": (rasters.write_rpc_geotiff, {"rpcs": rasters.linear_rpc(), "dtype": "uint16"}, "rpc"),
    "plain-tiff-u8x3": (rasters.write_plain_tiff, {"count": 3}, None),
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("imagery")
    suffix = {"nitf": ".ntf", "jp2": ".jp2"}
    return {
        name: writer(d / f"{name}{suffix.get(name.split('-')[0], '.tif')}", **kwargs)
        for name, (writer, kwargs, _) in FORMATS.items()
    }


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_opens_lazily_with_its_pixels_and_georeference(scenes, name):
    _, kwargs, kind = FORMATS[name]
    count, dtype = kwargs.get("count", 1), kwargs.get("dtype", "uint8")
    with dask.config.set(scheduler=_raise_if_computed):
        image = open_image(scenes[name], chunks=CHUNK)
    assert image.dims == ("band", "y", "x") and image.shape == (count, 48, 64)
    assert image.dtype == np.dtype(dtype) and isinstance(image.data, dask.array.Array)
    assert image.chunks == ((count,), (16, 16, 16), (16, 16, 16, 16))
    assert image.attrs["georeference"].kind == kind
    assert image.attrs["dtype"] == dtype and image.attrs["source"] == str(scenes[name])
    assert re.fullmatch("[0-9a-f]{16}", image.attrs["image_id"])
    assert list(image.band.values) == list(range(1, count + 1))
    np.testing.assert_array_equal(image.values, rasters.pattern(count, 48, 64, dtype))


def test_coordinates_are_rioxarrays(scenes):
    image = open_image(scenes["geotiff-tiled-u16x3"])
    affine = rasters.UTM_AFFINE
    np.testing.assert_allclose(image.x.values[:2], [affine.c + 0.5 * affine.a, affine.c + 1.5 * affine.a])
    assert image.rio.crs.to_epsg() == 32633
    assert "x" not in open_image(scenes["gcp-geotiff-u8x1"]).coords  # rioxarray sets no x/y for GCP images


def test_nitf_source_metadata(scenes):
    meta = open_image(scenes["nitf-rpc-u8x1"]).attrs["source_metadata"]
    assert meta["location"] == str(scenes["nitf-rpc-u8x1"]) and meta["format"] == "NITF"
    assert meta["sourceId"] == meta["NITF_FTITLE"] == "TEST IMAGE"
    assert meta["sourceDT"] == "2024-01-02T03:04:05Z" and meta["NITF_IDATIM"] == "20240102030405"
    assert meta["NITF_IID1"] == "MRTEST" and meta["NITF_ISORCE"] == "UNIT TEST" and meta["category"] == "VIS"
    assert open_image(scenes["cog-u8x3"]).attrs["source_metadata"] is None


def test_nodata_is_carried(tmp_path):
    image = open_image(rasters.write_geotiff(tmp_path / "nodata.tif", nodata=7))
    assert image.attrs["nodata"] == 7


# -- reads ----------------------------------------------------------------------------------------------


def test_each_block_equals_rasterios_read_of_the_same_window(scenes):
    path = scenes["geotiff-tiled-u16x3"]
    image = open_image(path, chunks={"y": 20, "x": 24})  # deliberately not aligned to the 16-pixel tiles
    ystarts, xstarts = np.cumsum((0,) + image.chunks[1]), np.cumsum((0,) + image.chunks[2])
    with rasterio.open(path) as ds:
        for i in range(len(image.chunks[1])):
            for j in range(len(image.chunks[2])):
                window = Window(xstarts[j], ystarts[i], xstarts[j + 1] - xstarts[j], ystarts[i + 1] - ystarts[i])
                np.testing.assert_array_equal(image.data.blocks[0, i, j].compute(), ds.read(window=window))


def test_slices_strides_and_integer_indices(scenes):
    image = open_image(scenes["geotiff-tiled-u16x3"], chunks=CHUNK)
    truth = rasters.pattern(3, 48, 64, "uint16")
    for key in [(1, slice(5, 9), slice(3, 30, 3)), (slice(None), -3, slice(None)), (2, 47, 63), (slice(0, 0),)]:
        np.testing.assert_array_equal(image.data[key].compute(), truth[key])


def test_many_threads_read_without_a_lock(scenes):
    image = open_image(scenes["cog-u16x1"], chunks=8)  # 48 chunks; every worker thread keeps its own handle
    for _ in range(3):
        values = image.compute(scheduler="threads", num_workers=8).values
        np.testing.assert_array_equal(values, rasters.pattern(1, 48, 64, "uint16"))


def test_bands_are_selected_in_order_and_may_repeat(scenes):
    image = open_image(scenes["cog-u8x3"], bands=[3, 1], chunks=CHUNK)
    assert list(image.band.values) == [3, 1]
    np.testing.assert_array_equal(image.values, rasters.pattern(3, 48, 64)[[2, 0]])
    grey = open_image(scenes["geotiff-striped-u8x1"], bands=[1, 1, 1])
    np.testing.assert_array_equal(grey.values, np.repeat(rasters.pattern(1, 48, 64), 3, axis=0))


@pytest.mark.parametrize("bands", [[0], [4], [], "1", [1.5], [True]])
def test_bad_bands_are_input_errors(scenes, bands):
    with pytest.raises(InvalidInputError, match="bands"):
        open_image(scenes["cog-u8x3"], bands=bands)


def test_default_chunks_follow_the_file_blocks(scenes):
    image = open_image(scenes["geotiff-tiled-u16x3"])
    assert image.chunks == ((3,), (48,), (64,))  # "auto" within dask's chunk size: whole, block-aligned


@pytest.mark.parametrize("chunks", [{"z": 4}, "big", True, {"y": (10, 10)}, -5])
def test_bad_chunks_are_input_errors(scenes, chunks):
    with pytest.raises(InvalidInputError, match="chunks"):
        open_image(scenes["cog-u8x3"], chunks=chunks)


def test_reopen_gives_new_chunks_without_a_rechunk(scenes):
    image = open_image(scenes["cog-u8x3"], bands=[2, 3], chunks=CHUNK)
    again = reopen(image, {"y": (20, 28), "x": (64,)})
    assert again.chunks == ((2,), (20, 28), (64,)) and list(again.band.values) == [2, 3]
    assert all(name.startswith("open_image-") for name in again.data.__dask_graph__().layers)
    np.testing.assert_array_equal(again.values, image.values)
    assert reopen(image[:, :10], CHUNK) is None  # cropped: re-opening would undo the crop
    assert reopen(image.astype("float32"), CHUNK) is None
    assert reopen(xr.DataArray(np.zeros((1, 4, 4)), dims=("band", "y", "x")), CHUNK) is None


def test_task_names_are_deterministic_and_follow_the_file(tmp_path):
    path = rasters.write_geotiff(tmp_path / "a.tif")
    first, second = open_image(path, chunks=CHUNK), open_image(path, chunks=CHUNK)
    assert first.data.name == second.data.name
    assert open_image(path, chunks=8).data.name != first.data.name
    assert int(first.max().compute(scheduler="sync")) == 250  # this thread now holds a handle on the file
    rasters.write_geotiff(path, data=np.full((1, 48, 64), 9, np.uint8))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    rewritten = open_image(path, chunks=CHUNK)
    assert rewritten.data.name != first.data.name
    assert int(rewritten.max().compute(scheduler="sync")) == 9  # not read through the stale handle


def test_the_array_pickles_small_and_reads_after_unpickling(scenes):
    image = open_image(scenes["nitf-rpc-u8x1"], chunks=CHUNK)
    clone = pickle.loads(pickle.dumps(image))
    np.testing.assert_array_equal(clone.values, image.values)
    task_bytes = pickle.dumps(image.data.__dask_graph__().to_dict())
    assert len(task_bytes) < 50_000


def test_secrets_stay_out_of_repr_and_task_names():
    env = GdalEnv(options=(("AWS_REGION", "us-east-1"),), secrets=(("AWS_SECRET_ACCESS_KEY", "hunter2"),))
    assert "hunter2" not in repr(env)
    assert dask.base.tokenize(env) == dask.base.tokenize(GdalEnv(options=env.options, secrets=()))


def test_url_forms_name_the_same_image(scenes, monkeypatch):
    path = scenes["geotiff-striped-u8x1"]
    monkeypatch.chdir(path.parent)
    forms = [path, str(path), f"file://{path}", path.name]
    ids = {image_id_for(form) for form in forms}
    assert len(ids) == 1 and ids != {image_id_for(scenes["cog-u8x3"])}
    for form in forms:
        np.testing.assert_array_equal(open_image(form).values, rasters.pattern(1, 48, 64))


# -- laziness at scale ----------------------------------------------------------------------------------


def test_a_100k_image_opens_in_well_under_a_second_and_computes_nothing(tmp_path, monkeypatch):
    path = rasters.write_sparse_geotiff(tmp_path / "huge.tif")
    assert os.path.getsize(path) < 2_000_000  # SPARSE_OK: no pixel was written
    for reader in (rioxarray._io.RasterioArrayWrapper, RasterReader):  # no pixel read, by rioxarray or by us
        monkeypatch.setattr(reader, "__getitem__", _raise_if_computed)
    started = time.perf_counter()
    with dask.config.set(scheduler=_raise_if_computed):
        image = open_image(path, chunks=8192)
        graph_size = len(image.data.__dask_graph__())
    elapsed = time.perf_counter() - started
    monkeypatch.undo()
    assert image.shape == (1, 100_000, 100_000)
    assert image.chunks[1][:2] == (8192, 8192) and image.data.npartitions == 13 * 13
    assert graph_size == image.data.npartitions  # one read task per chunk, nothing else
    assert elapsed < 2.0
    assert int(image[0, 50_000:50_004, 50_000:50_004].max()) == 0  # unwritten blocks read as zeros


# -- errors ---------------------------------------------------------------------------------------------


def _missing(d):
    return d / "missing.tif"


def _empty(d):
    (d / "empty.tif").write_bytes(b"")
    return d / "empty.tif"


def _truncated_geotiff(d):
    path = rasters.write_geotiff(d / "truncated.tif", count=3)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _text(d):
    (d / "notes.tif").write_text("this is not an image\n" * 20)
    return d / "notes.tif"


def _directory(d):
    (d / "folder.tif").mkdir()
    return d / "folder.tif"


def _subdatasets(d):
    return rasters.write_raster(d / "multi.nc", driver="netCDF", count=3)


def _cube(d):
    return rasters.write_netcdf_cube(d / "cube.nc")


@pytest.mark.parametrize(
    "make, reason",
    [
        (_missing, "no such file"),
        (_empty, "empty"),
        (_truncated_geotiff, "truncated"),
        (_text, "not a raster format"),
        (_directory, "not a regular file"),
        (_subdatasets, "subdatasets"),
        (_cube, r"\('time', 'y', 'x'\)"),
    ],
)
def test_unopenable_files_raise_one_line_image_open_errors(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageOpenError, match=reason) as caught:
        open_image(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message


def test_a_truncated_nitf_fails_when_read_with_an_image_open_error(tmp_path):
    path = rasters.write_nitf(tmp_path / "truncated.ntf", count=3, height=200, width=300)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    image = open_image(path, chunks=100)  # the NITF header is intact: opening succeeds
    with pytest.raises(ImageOpenError, match="reading rows") as caught:
        image.compute(scheduler="sync")
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("url", ["gs://bucket/key.tif", "s3://bucket", "s3:///key.tif", "file://host/a.tif", ""])
def test_unsupported_urls_are_input_errors(url):
    with pytest.raises(InvalidInputError, match="url"):
        open_image(url)


# -- S3 -------------------------------------------------------------------------------------------------

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
                 "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with one bucket holding a GeoTIFF; yields (endpoint, local copy)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    local = rasters.write_geotiff(tmp_path_factory.mktemp("s3") / "scene.tif", tiled=True, count=3, dtype="uint16")
    with pytest.MonkeyPatch.context() as env:
        for name in AWS_VARIABLES:
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", os.devnull)
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="imagery")
        client.upload_file(str(local), "imagery", "scenes/scene.tif")
        yield endpoint, local
    server.stop()


def test_s3_image_equals_the_local_file(s3):
    endpoint, local = s3
    image = open_image("s3://imagery/scenes/scene.tif", endpoint_url=endpoint, chunks=CHUNK)
    reference = open_image(local, chunks=CHUNK)
    assert image.attrs["georeference"] == reference.attrs["georeference"]
    np.testing.assert_array_equal(image.compute(scheduler="threads").values, reference.values)
    assert image.attrs["open_options"]["endpoint_url"] == endpoint


def test_s3_endpoint_from_the_environment(s3, monkeypatch):
    endpoint, local = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    image = open_image("s3://imagery/scenes/scene.tif", chunks=CHUNK)
    np.testing.assert_array_equal(image.values, rasters.pattern(3, 48, 64, "uint16"))


def test_s3_missing_object_is_an_image_open_error(s3):
    endpoint, _ = s3
    with pytest.raises(ImageOpenError, match="s3://imagery/nope.tif"):
        open_image("s3://imagery/nope.tif", endpoint_url=endpoint)


def test_s3_reads_in_worker_processes_that_have_no_aws_environment(s3, monkeypatch):
    """The GDAL environment (endpoint, credentials) travels with the array into another process."""
    from distributed import Client, LocalCluster

    endpoint, local = s3
    image = open_image("s3://imagery/scenes/scene.tif", endpoint_url=endpoint, chunks=CHUNK)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster) as client:
        worker_env = client.run(lambda: sorted(k for k in os.environ if k in AWS_VARIABLES))
        assert list(worker_env.values()) == [[]]  # no credentials, region or endpoint to inherit
        values = client.compute(image).result().values
    np.testing.assert_array_equal(values, rasters.pattern(3, 48, 64, "uint16"))


def test_nitf_source_metadata_never_carries_a_credential():
    from mr.imagery import nitf_source_metadata

    url = ("https://bucket.s3.amazonaws.com/scene.ntf?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20261125"
           "&X-Amz-Signature=0123456789abcdef&X-Amz-Security-Token=FQoGZXIvYXdzEJr")
    location = nitf_source_metadata(url, {"NITF_FTITLE": "t"})["location"]
    assert location.startswith("https://bucket.s3.amazonaws.com/scene.ntf")
    for secret in ("AKIAIOSFODNN7EXAMPLE", "0123456789abcdef", "FQoGZXIvYXdzEJr"):
        assert secret not in location
