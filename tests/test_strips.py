"""A region's pixels read strip by strip (``mr.strips``), and the window reader's shared handles (``mr.reader``)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import rasterio

import mr
from mr import reader as reader_module
from mr.errors import ImageReadError
from mr.imagery import image_reader
from mr.strips import RegionPixels
from tests.rasters import pattern, write_geotiff


class Recording:
    """A row reader over ``source`` that records every (start, stop) it is asked for."""

    def __init__(self, source: np.ndarray) -> None:
        self.source, self.calls = source, []

    def __call__(self, start: int, stop: int, out: np.ndarray) -> None:
        self.calls.append((start, stop))
        out[...] = self.source[:, start:stop]


def test_rows_are_read_on_demand_to_the_end_of_a_file_block():
    source = pattern(2, 300, 40, "uint16")
    read = Recording(source)
    pixels = RegionPixels(np.empty_like(source), read, origin=30, step=64)
    assert read.calls == [] and pixels.seconds == 0.0
    block = pixels.rows(100)  # file rows 30..130 needed: read to the block row ending at file row 192
    assert read.calls == [(0, 162)]
    np.testing.assert_array_equal(block[:, :162], source[:, :162])
    pixels.rows(150)  # already there
    assert read.calls == [(0, 162)]
    pixels.rows(170)
    assert read.calls == [(0, 162), (162, 226)]
    whole = pixels()
    assert read.calls[-1] == (226, 300) and pixels.loaded == 300 and pixels.seconds > 0
    np.testing.assert_array_equal(whole, source)


def test_pixels_already_in_memory_read_nothing():
    block = pattern(1, 10, 12)
    pixels = RegionPixels.ready(block)
    assert pixels.rows(5) is block and pixels() is block and pixels.seconds == 0.0 and pixels.shape == (1, 10, 12)


def test_strips_from_a_file_are_exactly_one_whole_window_read(tmp_path):
    path = write_geotiff(tmp_path / "tiled.tif", tiled=True, blocksize=32, count=3, height=203, width=150,
                         dtype="uint16", compress="deflate")
    reader = image_reader(mr.open_image(path))
    assert reader.block_height() == 32
    y0, y1, x0, x1 = 17, 190, 9, 141
    expected = reader[:, y0:y1, x0:x1]

    def read(start: int, stop: int, out: np.ndarray) -> None:
        reader.read_window((y0 + start, y0 + stop), (x0, x1), out=out)

    pixels = RegionPixels(np.empty_like(expected), read, origin=y0, step=reader.block_height)
    for stop in (1, 40, 41, 100, 173):
        pixels.rows(stop)
        assert (y0 + pixels.loaded) % 32 == 0 or pixels.loaded == y1 - y0
    np.testing.assert_array_equal(pixels(), expected)
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(expected, src.read(window=((y0, y1), (x0, x1))))


def test_a_handle_outlives_the_thread_that_opened_it(tmp_path, monkeypatch):
    path = write_geotiff(tmp_path / "shared.tif", tiled=True, blocksize=16, height=64, width=64)
    reader = image_reader(mr.open_image(path))
    opened = []
    real_open = rasterio.open
    monkeypatch.setattr(reader_module.rasterio, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    reads = []
    for _ in range(5):  # one after another, each on a fresh thread: as region tasks that left their pool's thread
        thread = threading.Thread(target=lambda: reads.append(reader[:, 0:16, 0:16]))
        thread.start()
        thread.join()
    assert len(reads) == 5 and len(opened) <= 1  # opened once (or not at all: still open from an earlier test)
    np.testing.assert_array_equal(reads[-1], pattern(1, 64, 64)[:, :16, :16])


def test_threads_reading_at_once_never_share_a_handle(tmp_path, monkeypatch):
    path = write_geotiff(tmp_path / "busy.tif", tiled=True, blocksize=16, height=256, width=256)
    reader = image_reader(mr.open_image(path))
    expected = pattern(1, 256, 256)
    in_use: set[int] = set()
    clashes = []
    lock = threading.Lock()
    original = reader_module._dataset

    @contextmanager
    def watched(key):
        with original(key) as handle:
            with lock:
                if id(handle) in in_use:
                    clashes.append(id(handle))
                in_use.add(id(handle))
            try:
                yield handle
            finally:
                with lock:
                    in_use.discard(id(handle))

    monkeypatch.setattr(reader_module, "_dataset", watched)
    failures = []

    def work(offset: int) -> None:
        for i in range(40):
            y = (offset * 16 + i * 16) % 240
            if not np.array_equal(reader[:, y : y + 16, :], expected[:, y : y + 16, :]):
                failures.append(y)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not clashes and not failures


def test_a_file_that_changed_is_refused_and_its_handle_dropped(tmp_path):
    path = write_geotiff(tmp_path / "changing.tif", height=40, width=40)
    reader = image_reader(mr.open_image(path))
    reader[:, 0:4, 0:4]
    write_geotiff(path, height=20, width=40)  # rewritten smaller at the same path, same signature if same second
    stale = reader.__class__(**{**reader.__dict__, "signature": None})
    with pytest.raises(ImageReadError, match="changed since it was opened"):
        stale[:, 0:4, 0:4]
    with reader_module._idle_lock:
        assert not reader_module._idle.get((stale.path, stale.env, None))  # closed, not put back
