"""Reading pixels inside tasks: a window reader that pickles to its fields and opens the file lazily.

A rasterio dataset must not be used by two threads at once, so each read checks a handle out of a small
process-wide pool and puts it back after: reads run in parallel across threads and processes without a lock (like
rioxarray's ``lock=False`` mode), yet a handle outlives the thread that opened it. That matters twice over: a
region task that waits on an endpoint leaves its worker's thread pool (``mr.tasks``), so the next region runs on a
fresh thread, where opening a file costs ~8 ms (GDAL and PROJ set up per thread); and the blocks GDAL has cached
belong to a handle, so the next region, whose window shares block rows and columns with this one, finds them there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import rasterio
import rasterio.errors
from rasterio.windows import Window

from mr.errors import ImageReadError
from mr.sources import GdalEnv

try:  # GDAL errors that rasterio lets through unwrapped (rasterio 1.x keeps them in a private module)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover
    CPLE_BaseError = rasterio.errors.RasterioError  # type: ignore[assignment,misc]

_FILES_KEPT = 16
"""Files with idle handles kept open per process (least recently used closed first)."""
_HANDLES_PER_FILE = 4
"""Idle handles kept per file: as many as threads read it at once, commonly."""

# -- reading pixels inside tasks --------------------------------------------------------------------------

_HandleKey = tuple[str, GdalEnv, "tuple[int, int] | None"]
"""(path, env, file signature): the signature (size, mtime) is part of the key so that a file rewritten at the
same path is opened afresh instead of read through a stale handle."""

_idle: OrderedDict[_HandleKey, list[rasterio.io.DatasetReader]] = OrderedDict()
_idle_lock = threading.Lock()


@contextmanager
def _dataset(key: _HandleKey) -> Iterator[rasterio.io.DatasetReader]:
    """An open dataset for ``key`` that no other thread uses meanwhile: an idle one, or a new one. Called inside
    ``env``. It goes back to the pool unless the block raises (then it is closed, so that a retried task opens
    the file afresh)."""
    with _idle_lock:
        handles = _idle.get(key)
        ds = handles.pop() if handles else None
    if ds is None:
        ds = rasterio.open(key[0], sharing=False)  # no catch_warnings here: it is not thread-safe
    try:
        yield ds
    except BaseException:
        ds.close()
        raise
    closing = []
    with _idle_lock:
        handles = _idle.setdefault(key, [])
        _idle.move_to_end(key)
        (handles if len(handles) < _HANDLES_PER_FILE else closing).append(ds)
        while len(_idle) > _FILES_KEPT:
            closing.extend(_idle.popitem(last=False)[1])
    for old in closing:
        old.close()


def _axis_range(key: object, size: int) -> tuple[range, bool]:
    """One axis of an index (int or slice) as the range it selects, and whether the axis is dropped."""
    if isinstance(key, (int, np.integer)):
        index = int(key) + size if key < 0 else int(key)
        if not 0 <= index < size:
            raise IndexError(f"index {key} is out of bounds for an axis of size {size}")
        return range(index, index + 1), True
    if isinstance(key, slice):
        return range(*key.indices(size)), False
    raise TypeError(f"RasterReader supports int and slice indices, not {type(key).__name__}")


def _expand_key(key: object, ndim: int) -> tuple[object, ...]:
    """An index as a tuple of exactly ``ndim`` entries (Ellipsis and missing trailing axes filled)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (ndim - len(key) + 1) + key[at + 1 :]
    return key + (slice(None),) * (ndim - len(key))


def _local_selection(selected: range) -> slice | np.ndarray:
    """How to pick ``selected`` out of the contiguous window that spans it."""
    low = min(selected)
    if selected.step == 1:
        return slice(0, len(selected))
    return np.asarray(selected) - low


@dataclass(frozen=True)
class RasterReader:
    """Array-like window reader that dask slices; pickles to these fields, opens lazily once per thread."""

    url: str
    """The image as the caller named it (for error messages)."""
    path: str
    """What GDAL opens."""
    env: GdalEnv
    bands: tuple[int, ...]
    """1-based band indexes of the file, in output order."""
    height: int
    width: int
    dtype_name: str
    signature: tuple[int, int] | None = None
    """Size and mtime of a local file when opened (None for remote files)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.bands), self.height, self.width)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dtype_name)

    @property
    def ndim(self) -> int:
        return 3

    def __getitem__(self, key: object) -> np.ndarray:
        """Read the pixels ``key`` selects (ints and slices per axis)."""
        key = _expand_key(key, 3)
        (bands, drop_b), (rows, drop_y), (cols, drop_x) = (_axis_range(k, n) for k, n in zip(key, self.shape))
        if not (len(bands) and len(rows) and len(cols)):
            data = np.empty((len(bands), len(rows), len(cols)), self.dtype)
        else:
            data = self._read(bands, rows, cols)
        drop = tuple(0 if d else slice(None) for d in (drop_b, drop_y, drop_x))
        return data[drop]

    def read_reduced(self, count: int, out_shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
        """The first ``count`` bands of the whole image at ``out_shape``, and whether GDAL had to decode it whole.

        GDAL reads from the nearest overview when the file has them (average resampling); for an uncompressed
        GeoTIFF without overviews GTIFF_DIRECT_IO reads only the sampled pixels; otherwise every block is decoded.
        """
        from rasterio.enums import Resampling

        try:
            with (
                self.env.activate(),
                rasterio.Env(GTIFF_DIRECT_IO="YES"),
                rasterio.open(self.path, sharing=False) as ds,
            ):
                has_overviews = bool(ds.overviews(self.bands[0]))
                direct = ds.driver == "GTiff" and ds.compression is None
                resampling = Resampling.average if has_overviews else Resampling.nearest
                data = ds.read(indexes=list(self.bands[:count]), out_shape=(count, *out_shape), resampling=resampling)
                return data, not (has_overviews or direct)
        except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
            raise ImageReadError(self.url, f"reading a reduced view failed: {_one_line(e)}") from e

    def _check_unchanged(self, ds: rasterio.io.DatasetReader) -> None:
        """Refuse to read a file whose size or band count is no longer what was opened (and checked)."""
        if (ds.height, ds.width) != (self.height, self.width) or ds.count < max(self.bands):
            now = f"{ds.width:,} × {ds.height:,} × {ds.count} bands"
            was = f"{self.width:,} × {self.height:,} with band {max(self.bands)}"
            raise ImageReadError(self.url, f"changed since it was opened: now {now}, was {was}")

    def block_height(self) -> int:
        """Rows per block of the file's first band (what one strip read should end on: GDAL decodes whole
        blocks, so a read that ends mid-block decodes that block again for the next one)."""
        with self.env.activate(), _dataset((self.path, self.env, self.signature)) as ds:
            return int(ds.block_shapes[0][0])

    def read_window(self, rows: tuple[int, int], cols: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
        """Every band of rows ``rows[0]:rows[1]`` and columns ``cols[0]:cols[1]``, written into ``out`` when given
        (any view of the right shape and dtype: GDAL writes through its strides, so no copy is made)."""
        (r0, r1), (c0, c1) = rows, cols
        return self._read(range(len(self.bands)), range(r0, r1), range(c0, c1), out)

    def _read(self, bands: range, rows: range, cols: range, out: np.ndarray | None = None) -> np.ndarray:
        """Read the window spanning ``rows`` x ``cols`` for ``bands`` (into ``out`` if given: unit steps only),
        then pick strided selections."""
        r0, c0 = min(rows), min(cols)
        window = Window(c0, r0, max(cols) - c0 + 1, max(rows) - r0 + 1)
        indexes = [self.bands[i] for i in bands]
        key = (self.path, self.env, self.signature)
        failure: ImageReadError | None = None
        try:
            with self.env.activate(), _dataset(key) as ds:
                self._check_unchanged(ds)
                data = ds.read(indexes=indexes, window=window, out=out)
        except ImageReadError as e:
            failure = e
        except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
            where = f"rows {r0}:{r0 + window.height}, columns {c0}:{c0 + window.width}"
            failure = read_failure(self.url, f"reading {where} failed (corrupt or truncated data?)", e)
        if failure is not None:  # raised here, outside the handler, so that no GDAL error rides along as context
            raise failure
        if rows.step != 1:
            data = data[:, _local_selection(rows), :]
        if cols.step != 1:
            data = data[:, :, _local_selection(cols)]
        return data


class GdalError(RuntimeError):
    """GDAL's own account of a failure, as a cause that pickles.

    rasterio's GDAL errors do not survive the trip from a Dask worker to the client (distributed pickles an error
    with its causes, and theirs cannot be rebuilt), which would turn a clear read error into an anonymous one.
    """


def read_failure(url: str, reason: str, cause: BaseException) -> ImageReadError:
    """An ImageReadError whose reason ends with GDAL's detail from ``cause``, chained as a picklable GdalError.

    Raise it outside the ``except`` block that caught ``cause``, or Python chains ``cause`` as its context.
    """
    detail = _one_line(cause)
    error = ImageReadError(url, f"{reason}: {detail}")
    error.__cause__ = GdalError(detail)
    return error


def _one_line(e: BaseException) -> str:
    """An exception and its causes (rasterio chains GDAL's detail) as one line, without repeats or pointers."""
    parts: list[str] = []
    while e is not None and len(parts) < 6:
        text = " ".join(str(e).split()).strip("; ")
        if text and "See previous exception" not in text and not any(text in part for part in parts):
            parts.append(text)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return "; ".join(parts[:4]) or "unknown error"
