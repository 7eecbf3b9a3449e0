"""Hostile images: truncated, corrupt, empty, bombs, unsupported formats, no georeference, a stalling server.

Each fails quickly with a one-line reason naming the file, at the library level (``open_image`` or the read) and
through the listener, which records FAILED, publishes nothing and goes on to the next request.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import dask
import numpy as np
import pytest

from mr.errors import ImageOpenError, ImageReadError, InvalidInputError
from mr.imagery import open_image
from mr.limits import ImageLimits, RasterHeader, header_problem, require_georeference, resolve_image_limits
from mr.synthetic import write_scene
from tests import rasters

FAST = 2.0
"""Seconds within which every hostile file must fail at the library level."""

# -- hostile files, written in code -----------------------------------------------------------------------------


def tiny_tiff(width: int, height: int, *, bands: int = 1, tile: int | None = None) -> bytes:
    """A deflate GeoTIFF header claiming ``width`` x ``height`` with no pixel data at all (every byte count 0).

    A few hundred bytes for any claimed size: the shape of a decompression bomb's header.
    """
    tags: list[tuple[int, int, list]] = [
        (256, 4, [width]), (257, 4, [height]), (258, 3, [8] * bands), (259, 3, [8]),
        (262, 3, [1 if bands == 1 else 2]), (277, 3, [bands]), (284, 3, [1]),
        (33550, 12, [0.5, 0.5, 0.0]), (33922, 12, [0, 0, 0, 500_000.0, 4_500_000.0, 0]),
        (34735, 3, [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633]),
    ]
    if tile:
        count = -(-width // tile) * -(-height // tile)
        tags += [(322, 4, [tile]), (323, 4, [tile]), (324, 4, [0] * count), (325, 4, [0] * count)]
    else:
        tags += [(273, 4, [0]), (278, 4, [height]), (279, 4, [0])]
    return _tiff_bytes(sorted(tags))


def _tiff_bytes(tags: list[tuple[int, int, list]]) -> bytes:
    """A little-endian classic TIFF: header, one IFD at offset 8, then the values that do not fit in an entry."""
    formats = {3: "H", 4: "I", 12: "d"}
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd, extra = bytearray(struct.pack("<H", len(tags))), bytearray()
    for tag, kind, values in tags:
        packed = struct.pack("<" + formats[kind] * len(values), *values)
        if len(packed) <= 4:
            ifd += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, len(values), data_at + len(extra))
            extra += packed
    return b"II*\0" + struct.pack("<I", 8) + bytes(ifd) + struct.pack("<I", 0) + bytes(extra)


def _valid_deflate(path: Path) -> Path:
    return rasters.write_geotiff(path, tiled=True, blocksize=256, count=3, height=1024, width=1024, COMPRESS="DEFLATE")


def make_empty(d: Path) -> Path:
    (d / "empty.tif").write_bytes(b"")
    return d / "empty.tif"


def make_truncated(d: Path) -> Path:
    """A valid tiled deflate GeoTIFF cut in half."""
    data = _valid_deflate(d / "whole.tif").read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    return d / "truncated.tif"


def make_corrupt(d: Path) -> Path:
    """Header intact, the deflate stream of one tile (rows 512:768, columns 256:512) replaced by noise."""
    import rasterio

    path = _valid_deflate(d / "corrupt.tif")
    with rasterio.open(path) as ds:
        offset, size = (int(ds.get_tag_item(f"BLOCK_{k}_1_2", "TIFF", bidx=1)) for k in ("OFFSET", "SIZE"))
    data = bytearray(path.read_bytes())
    data[offset: offset + size] = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def make_bomb(d: Path) -> Path:
    """A ~300-byte GeoTIFF that claims 10,000,000 x 10,000,000 pixels."""
    (d / "bomb.tif").write_bytes(tiny_tiff(10_000_000, 10_000_000))
    return d / "bomb.tif"


def make_block_bomb(d: Path) -> Path:
    """A modest 16384 x 16384 x 3 image stored as one pixel-interleaved tile: 768 MiB decoded for any read."""
    (d / "one-tile.tif").write_bytes(tiny_tiff(16_384, 16_384, bands=3, tile=16_384))
    return d / "one-tile.tif"


def make_text(d: Path) -> Path:
    (d / "notes.tif").write_text("this is not an image\n" * 20)
    return d / "notes.tif"


def make_garbage_nitf(d: Path) -> Path:
    """A NITF signature followed by noise."""
    noise = np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    (d / "garbage.ntf").write_bytes(b"NITF02.10" + noise)
    return d / "garbage.ntf"


def make_complex(d: Path) -> Path:
    """A SAR-like complex64 GeoTIFF: GDAL reads it, the models cannot take it."""
    return rasters.write_geotiff(d / "complex.tif", dtype="complex64")


def make_png(d: Path) -> Path:
    return rasters.write_raster(d / "photo.png", driver="PNG", count=3, crs=None, transform=None)


def make_jpeg(d: Path) -> Path:
    return rasters.write_raster(d / "photo.jpg", driver="JPEG", count=3, crs=None, transform=None)


def make_no_crs(d: Path) -> Path:
    """A geotransform but no CRS."""
    return rasters.write_raster(d / "no-crs.tif", crs=None, count=3)


def make_plain(d: Path) -> Path:
    """No georeferencing at all."""
    return rasters.write_plain_tiff(d / "plain.tif", count=3, height=512, width=512)


REFUSED_AT_OPEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty": (make_empty, "empty (0 bytes)"),
    "truncated": (make_truncated, "truncated"),
    "bomb": (make_bomb, "claims 10,000,000 × 10,000,000 pixels × 1 band (1e+14), over mr.imagery.max-pixels"),
    "block-bomb": (make_block_bomb, "blocks of 16,384 × 16,384 pixels (768 MiB"),
    "text": (make_text, "not a raster format"),
    "garbage-nitf": (make_garbage_nitf, "NITF"),
    "complex": (make_complex, "complex64 pixels"),
}
"""Hostile files ``open_image`` refuses from their header: (maker, a fragment of the reason)."""

NOT_GEOREFERENCED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "png": (make_png, "no georeference"),
    "jpeg": (make_jpeg, "no georeference"),
    "no-crs": (make_no_crs, "no CRS"),
    "plain": (make_plain, "no georeference"),
}
"""Files that open (a notebook may use them) but that the service refuses: no way to place a feature."""


# -- the library: open_image and the read ---------------------------------------------------------------------


def _one_line_naming(error: BaseException, path: Path) -> str:
    message = str(error)
    assert str(path) in message and "\n" not in message, message
    return message


@pytest.mark.parametrize("case", sorted(REFUSED_AT_OPEN))
def test_open_image_refuses_hostile_files_quickly_naming_file_and_reason(tmp_path, case):
    make, reason = REFUSED_AT_OPEN[case]
    path = make(tmp_path)
    started = time.perf_counter()
    with pytest.raises(ImageOpenError) as caught:
        open_image(path)
    assert time.perf_counter() - started < FAST
    assert reason in _one_line_naming(caught.value, path)


def test_a_bomb_is_refused_before_its_coordinates_exist(tmp_path, monkeypatch):
    """rioxarray would build 10M-long x and y coordinate arrays: the header check comes first."""
    import mr.imagery

    monkeypatch.setattr(mr.imagery, "_rioxarray_template", lambda source: pytest.fail("template built"))
    with pytest.raises(ImageOpenError, match="max-pixels"):
        open_image(make_bomb(tmp_path))


def test_corrupt_tile_data_fails_the_read_with_file_and_window(tmp_path):
    path = make_corrupt(tmp_path)
    image = open_image(path, chunks=512)  # the header is intact
    started = time.perf_counter()
    with pytest.raises(ImageReadError) as caught:
        image.compute(scheduler="sync")
    assert time.perf_counter() - started < FAST
    message = _one_line_naming(caught.value, path)
    assert "cannot read image" in message and "reading rows 512:1024, columns 0:512 failed" in message
    assert "ZIPDecode" in message and "See previous exception" not in message
    assert caught.value.__cause__ is not None


def test_a_read_error_crosses_from_a_dask_worker_intact(tmp_path):
    """distributed pickles a task's error with its causes; rasterio's GDAL errors cannot be rebuilt on the client."""
    from distributed.core import error_message
    from distributed.protocol import pickle as dask_pickle

    image = open_image(make_corrupt(tmp_path), chunks=512)
    with pytest.raises(ImageReadError) as caught:
        image.compute(scheduler="sync")
    back = dask_pickle.loads(error_message(caught.value)["exception"].data)  # what a worker sends the client
    assert type(back) is ImageReadError and str(back) == str(caught.value)


def test_a_file_replaced_after_opening_is_not_misread(tmp_path):
    path = rasters.write_geotiff(tmp_path / "moving.tif", height=48, width=64)
    image = open_image(path)
    rasters.write_geotiff(tmp_path / "moving.tif", height=40, width=64)
    with pytest.raises(ImageReadError, match="changed since it was opened"):
        image.attrs["reader"][:, 0:8, 0:8]


@pytest.mark.parametrize("case", sorted(NOT_GEOREFERENCED))
def test_images_without_georeference_open_but_the_service_refuses_them(tmp_path, case):
    make, reason = NOT_GEOREFERENCED[case]
    path = make(tmp_path)
    image = open_image(path)  # a notebook user may still run a model over it (mr.detect warns)
    with pytest.raises(ImageOpenError) as caught:
        require_georeference(image)
    assert reason in _one_line_naming(caught.value, path)
    assert require_georeference(image, required=False) is image
    with dask.config.set({"mr.imagery.require-georeference": False}):
        assert require_georeference(image) is image


@pytest.mark.parametrize("maker", [rasters.write_geotiff, rasters.write_gcp_geotiff, rasters.write_nitf])
def test_georeferenced_images_pass_the_service_check(tmp_path, maker):
    image = open_image(maker(tmp_path / "ok.tif"))
    assert require_georeference(image) is image


def test_rpc_only_images_pass_the_service_check(tmp_path):
    image = open_image(rasters.write_rpc_geotiff(tmp_path / "rpc.tif", rasters.linear_rpc()))
    assert require_georeference(image) is image


@pytest.fixture
def stalling_server():
    """A TCP server that accepts connections and never answers; yields an http:// URL on it."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/scene.tif"
    server.close()
    for connection in held:
        connection.close()


def test_a_stalling_server_fails_within_the_stall_limit(stalling_server):
    started = time.perf_counter()
    with dask.config.set({"mr.imagery.http-stall-seconds": 1}), pytest.raises(ImageOpenError) as caught:
        open_image(stalling_server)
    assert time.perf_counter() - started < 1 + FAST
    assert stalling_server in str(caught.value) and "slow" in str(caught.value).lower()


# -- the limits, pure ---------------------------------------------------------------------------------------

LIMITS = ImageLimits(max_side=1_000_000, max_pixels=1e11, max_bands=512, max_block_mb=512)


def header(width: int = 100_000, height: int = 100_000, count: int = 8, dtype: str = "uint16",
           block: tuple[int, int] = (512, 512), pixel: bool = True) -> RasterHeader:
    return RasterHeader(width, height, count, (dtype,) * count, block, pixel)


def test_a_large_real_satellite_scene_is_within_the_default_limits():
    assert header_problem(header(), LIMITS) is None  # 100k x 100k x 8 bands
    assert header_problem(header(35_000, 400_000, 1), LIMITS) is None  # a long panchromatic strip
    assert header_problem(header(1000, 1000, 224, block=(1, 1000)), LIMITS) is None  # hyperspectral, lines
    assert resolve_image_limits() == LIMITS  # the defaults of config/mr.yaml


@pytest.mark.parametrize(
    "claimed, reason",
    [
        (header(4_000_000, 4_000_000, 3, "uint8"), "4,000,000 × 4,000,000 pixels × 3 bands (4.8e+13), over mr.imagery"),
        (header(2_000_000, 10, 1), "a side over mr.imagery.max-side (1,000,000)"),
        (header(100, 100, 600), "600 bands, over mr.imagery.max-bands (512)"),
        (header(20_000, 20_000, 4, block=(20_000, 20_000)), "(3,052 MiB decoded each)"),
        (header(0, 10, 1), "at least one pixel"),
        (header(10, 10, 1, "complex_int16"), "complex_int16 pixels"),
        (RasterHeader(10, 10, 2, ("uint8", "float32"), (10, 10), False), "different data types"),
    ],
)
def test_headers_over_the_limits_are_refused_with_the_setting_named(claimed, reason):
    assert reason in header_problem(claimed, LIMITS)


def test_a_block_counts_every_band_only_when_pixel_interleaved():
    small = ImageLimits(max_side=1_000_000, max_pixels=1e11, max_bands=512, max_block_mb=100)
    assert header_problem(header(20_000, 20_000, 4, "uint8", block=(8192, 8192), pixel=False), small) is None
    assert "(256 MiB decoded each)" in header_problem(header(20_000, 20_000, 4, "uint8", block=(8192, 8192)), small)


def test_limits_come_from_configuration(tmp_path):
    path = rasters.write_geotiff(tmp_path / "small.tif", count=3, height=48, width=64)
    with dask.config.set({"mr.imagery.max-pixels": 1000}):
        with pytest.raises(ImageOpenError, match=r"64 × 48 pixels × 3 bands \(9.2e\+03\), over mr.imagery.max-pixels"):
            open_image(path)
    with dask.config.set({"mr.imagery.max-bands": 2}), pytest.raises(ImageOpenError, match="max-bands"):
        open_image(path)
    assert open_image(path).shape == (3, 48, 64)


@pytest.mark.parametrize("bad", [0, -5, "lots", True, None])
def test_bad_limit_settings_are_input_errors(bad):
    with dask.config.set({"mr.imagery.max-side": bad}), pytest.raises(InvalidInputError, match="max-side"):
        resolve_image_limits()


@pytest.mark.parametrize("error", [ImageOpenError("s3://b/x.tif", "bad"), ImageReadError("x.tif", "rows 0:8"),
                                   InvalidInputError("bands", [0], "1-based")])
def test_errors_survive_pickling_as_themselves(error):
    """Errors raised in Dask workers are pickled to the client: they must arrive as the same type and text."""
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.__dict__ == error.__dict__


# -- the listener, end to end -------------------------------------------------------------------------------

LISTENER_SECONDS = 120
"""The whole listener run (startup, a local cluster, every request) must finish within this."""
PEAK_RSS_MB = 1_500
"""The listener and its worker process together, at their peak."""

SERVICE_REASONS = {
    **{case: reason for case, (_, reason) in REFUSED_AT_OPEN.items()},
    "corrupt": "reading rows",
    "stalled": "slow",
    **{case: reason for case, (_, reason) in NOT_GEOREFERENCED.items()},
}
"""Every hostile request and a fragment of the FAILED reason the listener records for it."""


def osml_request(job_id: str, image: str, outputs: list[dict]) -> dict:
    """A request in OversightML ModelRunner's message format (as tests/test_listen.py sends)."""
    return {
        "jobName": f"test-{job_id}", "jobId": job_id, "imageUrls": [image], "outputs": outputs,
        "imageProcessor": {"name": "builtin", "type": "LOCAL"}, "imageProcessorTileSize": 512,
        "imageProcessorTileOverlap": 64, "imageProcessorTileFormat": "GTIFF", "imageProcessorTileCompression": "NONE",
    }


def run_watched(args: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``python -m ARGS``; return the result, its wall seconds and the peak RSS (MiB) of its process tree."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
    )
    peak = 0.0
    output: list[str] = []
    watcher = threading.Thread(target=lambda: output.extend(process.communicate(timeout=timeout)), daemon=True)
    watcher.start()
    root = psutil.Process(process.pid)
    while watcher.is_alive():
        peak = max(peak, _tree_rss_mb(root))
        watcher.join(0.05)
    result = subprocess.CompletedProcess(args, process.returncode, *(output or ["", ""]))
    return result, time.perf_counter() - started, peak


def _tree_rss_mb(root) -> float:
    """Resident MiB of a process and all its descendants now (0 for any that already exited)."""
    import psutil

    total = 0
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


@pytest.fixture(scope="module")
def listened(tmp_path_factory):
    """Queue every hostile request plus one valid one, run ``python -m mr.listen --once`` over them, watched."""
    from mr.queues import open_queue

    d = tmp_path_factory.mktemp("hostile")
    images = {case: str(make(d)) for case, (make, _) in {**REFUSED_AT_OPEN, **NOT_GEOREFERENCED}.items()}
    images["corrupt"] = str(make_corrupt(d))
    write_scene(d / "valid.tif", 700, 600, n_objects=12, seed=5)
    images["valid"] = str(d / "valid.tif")
    server = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    images["stalled"] = f"http://127.0.0.1:{server.getsockname()[1]}/scene.tif"
    database = f"sqlite:///{d / 'mr.db'}"
    queue = open_queue(database)
    for case, image in images.items():
        queue.send(json.dumps(osml_request(f"job-{case}", image, [{"type": "File", "path": str(d / f"{case}.json")}])))
    args = ["mr.listen", "--once", "--queue", database, "--store", database, "--data-dir", str(d), "--workers", "1"]
    try:
        result, seconds, peak = run_watched(args, {"DASK_MR__IMAGERY__HTTP_STALL_SECONDS": "2"}, LISTENER_SECONDS)
    finally:
        server.close()
    return {"dir": d, "db": database, "images": images, "result": result, "seconds": seconds, "peak_mb": peak}


def job(listened, case: str):
    from mr.state import open_store

    return open_store(listened["db"]).get_job(f"job-{case}")


def test_the_listener_handles_everything_in_bounded_time_and_memory(listened):
    result = listened["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = {case: job(listened, case).status.value for case in listened["images"]}
    assert set(statuses.values()) == {"FAILED", "SUCCESS"}, statuses  # every request finished, none left running
    assert listened["seconds"] < LISTENER_SECONDS and 0 < listened["peak_mb"] < PEAK_RSS_MB, listened["peak_mb"]
    assert "failed unexpectedly" not in result.stderr  # every failure is an mr error with its reason


def test_the_valid_request_succeeds_among_the_hostile_ones(listened):
    record = job(listened, "valid")
    assert record.status.value == "SUCCESS", record.message
    published = json.loads((listened["dir"] / "valid.json").read_text())["features"]
    assert len(published) == record.feature_count > 0


@pytest.mark.parametrize("case", sorted(SERVICE_REASONS))
def test_each_hostile_request_fails_with_its_reason_and_publishes_nothing(listened, case):
    record = job(listened, case)
    wiring = " (mr.jobs.process_images must call mr.limits.require_georeference)" if case in NOT_GEOREFERENCED else ""
    assert record.status.value == "FAILED", f"{case}: {record.status.value} {record.message}{wiring}"
    image = listened["images"][case]
    assert image in record.message and SERVICE_REASONS[case] in record.message, record.message
    assert "\n" not in record.message and not record.message.startswith("Exception")
    assert not (listened["dir"] / f"{case}.json").exists()
    assert record.processing_seconds is None or record.processing_seconds < 30
