"""Reading pixels inside tasks: a window reader that pickles to its fields and opens lazily once per thread.

rasterio datasets must not be shared between threads, so each thread keeps its own small LRU of open datasets;
reads run in parallel across threads and processes without a lock, like rioxarray's ``lock=False`` mode.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

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

_HANDLES_PER_THREAD = 16

# -- reading pixels inside tasks --------------------------------------------------------------------------

_thread_handles = threading.local()


_HandleKey = tuple[str, GdalEnv, "tuple[int, int] | None"]


def _dataset(key: _HandleKey) -> rasterio.io.DatasetReader:
    """This thread's open dataset for ``(path, env, file signature)``: a small LRU per thread.

    The file signature (size, mtime) is part of the key so that a file rewritten at the same path is
    opened afresh instead of read through a stale handle. Called inside ``env``.
    """
    handles: OrderedDict[_HandleKey, Any] = getattr(_thread_handles, "handles", None) or OrderedDict()
    _thread_handles.handles = handles
    if key in handles:
        handles.move_to_end(key)
        return handles[key]
    handles[key] = rasterio.open(key[0], sharing=False)  # no catch_warnings here: it is not thread-safe
    while len(handles) > _HANDLES_PER_THREAD:
        handles.popitem(last=False)[1].close()
    return handles[key]


def _forget_dataset(key: _HandleKey) -> None:
    """Drop a handle that failed, so that a retried task opens the file afresh."""
    handles = getattr(_thread_handles, "handles", None)
    if handles is not None and key in handles:
        handles.pop(key).close()


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

    def _read(self, bands: range, rows: range, cols: range) -> np.ndarray:
        """Read the window spanning ``rows`` x ``cols`` for ``bands``, then pick strided selections."""
        r0, c0 = min(rows), min(cols)
        window = Window(c0, r0, max(cols) - c0 + 1, max(rows) - r0 + 1)
        indexes = [self.bands[i] for i in bands]
        key = (self.path, self.env, self.signature)
        failure: ImageReadError | None = None
        try:
            with self.env.activate():
                ds = _dataset(key)
                self._check_unchanged(ds)
                data = ds.read(indexes=indexes, window=window)
        except ImageReadError as e:
            failure = e
        except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
            where = f"rows {r0}:{r0 + window.height}, columns {c0}:{c0 + window.width}"
            failure = read_failure(self.url, f"reading {where} failed (corrupt or truncated data?)", e)
        if failure is not None:  # raised here, outside the handler, so that no GDAL error rides along as context
            _forget_dataset(key)
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
