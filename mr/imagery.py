"""Open an image lazily as a dask-chunked ``(band, y, x)`` DataArray that carries its georeferencing.

rioxarray builds the DataArray (coordinates, ``spatial_ref``, attributes, exactly as it sets them), but the
pixels come from :class:`RasterReader`, not from rioxarray's own backend: rioxarray opens files with a
hard-wired ``rasterio.open`` and has no hook that restores a GDAL environment around a read, while our reads
happen later in Dask tasks, possibly in other processes where the client's ``rasterio.Env`` (S3 endpoint,
credentials) does not exist. So, as odc-stac does, the GDAL environment is captured on the client into a
picklable :class:`GdalEnv` that travels with every task and is re-entered around each open and read.

:class:`RasterReader` pickles to its fields and keeps one open dataset per thread (rasterio datasets must
not be shared between threads), so reads run in parallel across threads and processes without a lock,
like rioxarray's ``lock=False`` mode.

Every rasterio call of mr, except the geolocation transformers in :mod:`mr.geo`, lives in this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import dask.array as da
import numpy as np
import rasterio
import rasterio.errors
import rioxarray
import xarray as xr
from dask.array.core import normalize_chunks
from dask.base import tokenize
from rasterio.session import AWSSession, Session
from rasterio.windows import Window

from mr.errors import ImageOpenError, InvalidInputError
from mr.geo import Georeference, georeference_from_dataset

try:  # GDAL errors that rasterio lets through unwrapped (rasterio 1.x keeps them in a private module)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover
    CPLE_BaseError = rasterio.errors.RasterioError  # type: ignore[assignment,misc]

DIMS = ("band", "y", "x")
_SECRET_OPTIONS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
_REMOTE_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # never list the bucket prefix looking for side-car files
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}
_HANDLES_PER_THREAD = 16
_NAME_PREFIX = "open_image-"
_SUPPORTED_URLS = "a local path, file://path, s3://bucket/key or http(s)://"


class _CapturedCredentials(Session):
    """A rasterio session holding credential options captured on the client: no boto3 call inside tasks.

    rasterio refuses AWS keys as plain ``Env`` options, so they enter GDAL through a session.
    """

    def __init__(self, options: Mapping[str, str]) -> None:
        self.credentials = dict(options)

    @classmethod
    def hascreds(cls, config: Mapping[str, str]) -> bool:
        return True

    def get_credential_options(self) -> dict[str, str]:
        return dict(self.credentials)


@dataclass(frozen=True)
class GdalEnv:
    """GDAL configuration a read needs, captured on the client and re-entered inside every task."""

    options: tuple[tuple[str, str | int], ...] = ()
    """Plain GDAL config options (endpoint, retries, ...)."""
    secrets: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """AWS credential options; kept out of ``repr`` and of task names."""

    def activate(self) -> rasterio.Env:
        """A ``rasterio.Env`` that sets these options (thread-locally in non-main threads)."""
        return rasterio.Env(session=_CapturedCredentials(dict(self.secrets)), **dict(self.options))

    def __dask_tokenize__(self) -> object:
        return ("GdalEnv", self.options)


@dataclass(frozen=True)
class ImageSource:
    """Where an image lives, as given and as GDAL names it, with the GDAL environment to reach it."""

    url: str
    """The URL or path as the caller gave it."""
    path: str
    """What GDAL opens: an absolute local path, ``/vsis3/bucket/key`` or ``/vsicurl/https://...``."""
    env: GdalEnv
    endpoint_url: str | None = None
    """The resolved S3 endpoint (argument or AWS_ENDPOINT_URL[_S3]); None for AWS itself."""

    @property
    def is_local(self) -> bool:
        return not self.path.startswith("/vsi")


def _parse_url(url: str | os.PathLike[str]) -> tuple[str, str, str]:
    """``(url as text, GDAL path, kind)`` with kind "local", "s3" or "http"; bad URLs are InvalidInputError."""
    text = os.fspath(url) if isinstance(url, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text:
        raise InvalidInputError("url", url, f"expected {_SUPPORTED_URLS}")
    if "://" not in text:
        return text, os.path.abspath(text), "local"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidInputError("url", text, "a file:// URL must name a local path (file:///path)")
        return text, os.path.abspath(unquote(parts.path)), "local"
    if scheme == "s3":
        key = parts.path.lstrip("/")
        if not parts.netloc or not key:
            raise InvalidInputError("url", text, "an S3 URL needs a bucket and a key: s3://bucket/key")
        return text, f"/vsis3/{parts.netloc}/{key}", "s3"
    if scheme in ("http", "https"):
        return text, f"/vsicurl/{text}", "http"
    raise InvalidInputError("url", text, f"unsupported scheme {scheme!r}; expected {_SUPPORTED_URLS}")


def resolve_source(url: str | os.PathLike[str], endpoint_url: str | None = None) -> ImageSource:
    """Map a local path, ``file://``, ``s3://`` or ``http(s)://`` URL to what GDAL opens, with its env.

    For S3 the credentials are taken now, on the client, from boto3's default session.
    """
    text, path, kind = _parse_url(url)
    if kind == "local":
        return ImageSource(text, path, GdalEnv(options=_cache_option()))
    if kind == "http":
        return ImageSource(text, path, GdalEnv(options=tuple(sorted({**_REMOTE_OPTIONS, **dict(_cache_option())}.items()))))
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return ImageSource(text, path, _s3_env(endpoint), endpoint)


def _cache_option() -> tuple[tuple[str, str], ...]:
    """GDAL's block cache, capped (``mr.imagery.gdal-cache-mb``): by default GDAL takes 5% of RAM per process,
    which grows with the image read; each region is read once, so a small cache that holds the blocks shared by
    neighbouring windows is all that helps."""
    from mr import config

    return (("GDAL_CACHEMAX", int(config.get("imagery.gdal-cache-mb"))),)  # rasterio wants an int here


def _s3_env(endpoint_url: str | None) -> GdalEnv:
    """GDAL options for /vsis3/: credentials from boto3's default session, and a custom endpoint if any."""
    options = {**_REMOTE_OPTIONS, **dict(_cache_option())}
    if endpoint_url:
        parts = urlsplit(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        options.update(
            AWS_S3_ENDPOINT=parts.netloc,  # GDAL wants host[:port], the scheme goes to AWS_HTTPS
            AWS_HTTPS="YES" if parts.scheme == "https" else "NO",
            AWS_VIRTUAL_HOSTING="FALSE",  # path-style requests: what moto, MinIO and most gateways serve
        )
    captured = {k: str(v) for k, v in AWSSession().get_credential_options().items()}
    options.update({k: v for k, v in captured.items() if k not in _SECRET_OPTIONS and k != "AWS_S3_ENDPOINT"})
    secrets = {k: v for k, v in captured.items() if k in _SECRET_OPTIONS}
    return GdalEnv(options=tuple(sorted(options.items())), secrets=tuple(sorted(secrets.items())))


def image_id_for(url: str | os.PathLike[str]) -> str:
    """A stable id for an image: 16 hex digits of the SHA-256 of its canonical URL.

    Equivalent spellings of a local file (relative path, absolute path, ``file://``) give the same id.
    """
    text, path, kind = _parse_url(url)
    canonical = path if kind == "local" else text
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


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
        (bands, drop_b), (rows, drop_y), (cols, drop_x) = (
            _axis_range(k, n) for k, n in zip(key, self.shape)
        )
        if not (len(bands) and len(rows) and len(cols)):
            data = np.empty((len(bands), len(rows), len(cols)), self.dtype)
        else:
            data = self._read(bands, rows, cols)
        drop = tuple(0 if d else slice(None) for d in (drop_b, drop_y, drop_x))
        return data[drop]

    def _read(self, bands: range, rows: range, cols: range) -> np.ndarray:
        """Read the window spanning ``rows`` x ``cols`` for ``bands``, then pick strided selections."""
        r0, c0 = min(rows), min(cols)
        window = Window(c0, r0, max(cols) - c0 + 1, max(rows) - r0 + 1)
        indexes = [self.bands[i] for i in bands]
        try:
            with self.env.activate():
                data = _dataset((self.path, self.env, self.signature)).read(indexes=indexes, window=window)
        except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
            _forget_dataset((self.path, self.env, self.signature))
            where = f"rows {r0}:{r0 + window.height}, columns {c0}:{c0 + window.width}"
            raise ImageOpenError(self.url, f"reading {where} failed (truncated or corrupt?): {_one_line(e)}") from e
        if rows.step != 1:
            data = data[:, _local_selection(rows), :]
        if cols.step != 1:
            data = data[:, :, _local_selection(cols)]
        return data


# -- opening ----------------------------------------------------------------------------------------------


def open_image(
    url: str | os.PathLike[str],
    *,
    chunks: int | Mapping[str, Any] | None = None,
    bands: Sequence[int] | None = None,
    endpoint_url: str | None = None,
) -> xr.DataArray:
    """Open an image lazily: a dask-chunked ``(band, y, x)`` DataArray; reads metadata only.

    ``chunks``: None (whole bands, y/x "auto" in multiples of the file's blocks, up to dask's
    ``array.chunk-size``), an int (pixels per side, all bands in one chunk), or a dict over
    ``band``/``y``/``x`` whose values are ints, -1, "auto" or explicit tuples of chunk sizes.
    ``bands``: 1-based band indexes of the file, in output order (repeats allowed); default all.
    ``endpoint_url``: a custom S3 endpoint (default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS).

    ``attrs`` adds to rioxarray's: ``georeference`` (:class:`mr.geo.Georeference`), ``source`` (the URL as
    given), ``open_options`` (for :func:`reopen`), ``image_id``, ``nodata``, ``dtype`` and
    ``source_metadata`` (NITF header fields plus OversightML's sourceMetadata keys; None for other formats).
    """
    source = resolve_source(url, endpoint_url)
    with source.env.activate():
        with _open_dataset(source) as ds:
            band_indexes = _resolve_bands(bands, ds.count)
            info = _image_info(source, ds)
            block_shape = ds.block_shapes[0]
        template = _rioxarray_template(source)
    if bands is not None:
        template = template.isel(band=[b - 1 for b in band_indexes])
    reader = RasterReader(
        source.url, source.path, source.env, band_indexes, info.height, info.width, info.dtype, _file_signature(source)
    )
    result = template.copy(data=_dask_array(reader, source, chunks, block_shape))
    template.close()
    result.attrs.update(
        georeference=info.georeference,
        source=source.url,
        open_options={
            "url": source.url,
            "bands": None if bands is None else band_indexes,
            "endpoint_url": source.endpoint_url,
        },
        image_id=image_id_for(source.url),
        nodata=info.nodata,
        dtype=info.dtype,
        source_metadata=info.source_metadata,
        reader=reader,
    )
    return result


def image_reader(image: xr.DataArray) -> RasterReader | None:
    """The window reader behind an untouched :func:`open_image` result, or None for any other array.

    Lets the graph read each region's window (with its overlap) straight from the file in one task.
    """
    reader = image.attrs.get("reader")
    data = image.data
    if not isinstance(reader, RasterReader) or not isinstance(data, da.Array) or not data.name.startswith(_NAME_PREFIX):
        return None
    return reader if tuple(data.shape) == reader.shape else None


def reopen(image: xr.DataArray, chunks: int | Mapping[str, Any] | None) -> xr.DataArray | None:
    """The same image opened again with new chunks (a metadata read): no dask rechunk in the graph.

    Used when tiling needs region-aligned chunks. Returns None when ``image`` is not an untouched
    :func:`open_image` result (never opened, cropped, converted, rechunked: its dask name no longer starts
    with ``open_image-``), since re-opening would then lose what was done to it; the caller rechunks instead.
    """
    options = image.attrs.get("open_options")
    data = image.data
    if not isinstance(options, Mapping) or not isinstance(data, da.Array) or not data.name.startswith(_NAME_PREFIX):
        return None
    return open_image(**options, chunks=chunks)


def _open_dataset(source: ImageSource) -> rasterio.io.DatasetReader:
    """Open with rasterio and check that the file is one (band, y, x) raster; every failure an ImageOpenError."""
    if source.is_local:
        _check_local_file(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            ds = rasterio.open(source.path, sharing=False)
    except (rasterio.errors.RasterioError, CPLE_BaseError) as e:
        raise ImageOpenError(source.url, _open_failure_reason(e)) from e
    try:
        _check_raster(source, ds)
    except ImageOpenError:
        ds.close()
        raise
    return ds


def _check_local_file(source: ImageSource) -> None:
    """Fail early, and clearly, on a missing, non-regular or empty local file."""
    if not os.path.exists(source.path):
        raise ImageOpenError(source.url, f"no such file ({source.path})")
    if not os.path.isfile(source.path):
        raise ImageOpenError(source.url, "not a regular file")
    if os.path.getsize(source.path) == 0:
        raise ImageOpenError(source.url, "the file is empty (0 bytes)")


def _check_raster(source: ImageSource, ds: rasterio.io.DatasetReader) -> None:
    """Reject what cannot become one (band, y, x) array: containers, band-less or mixed-type files, truncation."""
    if ds.subdatasets:
        raise ImageOpenError(
            source.url,
            f"holds {len(ds.subdatasets)} subdatasets (e.g. {ds.subdatasets[0]}), not one image; "
            "open a subdataset by its GDAL name",
        )
    if ds.count < 1:
        raise ImageOpenError(source.url, "has no raster bands")
    if len(set(ds.dtypes)) > 1:
        raise ImageOpenError(source.url, f"bands have different data types {sorted(set(ds.dtypes))}")
    if source.is_local and ds.driver == "GTiff":
        _check_tiff_complete(source, ds)


def _check_tiff_complete(source: ImageSource, ds: rasterio.io.DatasetReader) -> None:
    """A truncated (Geo)TIFF opens fine and fails on first read; its last block's extent gives it away.

    Metadata only: GDAL reports each block's offset and byte count in the "TIFF" domain (0 or absent for
    sparse blocks, which are skipped).
    """
    file_size = os.path.getsize(source.path)
    block_h, block_w = ds.block_shapes[0]
    last = f"{(ds.width - 1) // block_w}_{(ds.height - 1) // block_h}"
    for band in range(1, ds.count + 1):
        try:
            offset = int(ds.get_tag_item(f"BLOCK_OFFSET_{last}", "TIFF", bidx=band) or 0)
            size = int(ds.get_tag_item(f"BLOCK_SIZE_{last}", "TIFF", bidx=band) or 0)
        except (rasterio.errors.RasterioError, CPLE_BaseError, ValueError):
            return  # a TIFF variant that does not report block extents: reads will tell
        if offset and offset + size > file_size:
            reason = f"truncated: {file_size} bytes, but its last block ends at byte {offset + size}"
            raise ImageOpenError(source.url, reason)


def _open_failure_reason(e: Exception) -> str:
    """One line on why GDAL could not open a file."""
    message = _one_line(e)
    if "not recognized as being in a supported file format" in message or "not recognized as a supported" in message:
        return "not a raster format GDAL can read (expected GeoTIFF/COG, NITF or JPEG2000)"
    if "No such file or directory" in message or "404" in message:
        return f"does not exist or is not readable: {message}"
    return message


def _one_line(e: BaseException) -> str:
    """An exception and its causes (rasterio chains GDAL's detail) as one line."""
    parts: list[str] = []
    while e is not None and len(parts) < 4:
        text = " ".join(str(e).split())
        if text and text not in parts and not text.startswith("See previous exception"):
            parts.append(text)
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return "; ".join(parts) or "unknown error"


def _resolve_bands(bands: Sequence[int] | None, count: int) -> tuple[int, ...]:
    """Validated 1-based band indexes (all bands when None)."""
    if bands is None:
        return tuple(range(1, count + 1))
    if isinstance(bands, (str, bytes)) or not isinstance(bands, Sequence) or not bands:
        raise InvalidInputError("bands", bands, "give a non-empty sequence of 1-based band indexes, e.g. [1, 2, 3]")
    for band in bands:
        if isinstance(band, bool) or not isinstance(band, (int, np.integer)) or not 1 <= band <= count:
            raise InvalidInputError("bands", bands, f"band indexes are 1-based integers in 1..{count}")
    return tuple(int(b) for b in bands)


@dataclass(frozen=True)
class _ImageInfo:
    """What the attributes and the reader take from the open dataset."""

    height: int
    width: int
    dtype: str
    nodata: float | None
    georeference: Georeference
    source_metadata: dict[str, Any] | None


def _image_info(source: ImageSource, ds: rasterio.io.DatasetReader) -> _ImageInfo:
    """Read the metadata the DataArray carries (no pixels)."""
    return _ImageInfo(
        height=ds.height,
        width=ds.width,
        dtype=np.dtype(ds.dtypes[0]).name,
        nodata=ds.nodata,
        georeference=georeference_from_dataset(ds),
        source_metadata=nitf_source_metadata(source.url, ds.tags()) if ds.driver == "NITF" else None,
    )


NITF_SOURCE_FIELDS = (
    "NITF_FHDR", "NITF_FTITLE", "NITF_FDT", "NITF_OSTAID", "NITF_FSCLAS", "NITF_IID1", "NITF_IID2",
    "NITF_IDATIM", "NITF_ISORCE", "NITF_ICAT", "NITF_IREP", "NITF_ISCLAS", "NITF_TGTID",
)
"""The file and image header fields (GDAL's names) that identify a NITF image; the rest of the header
(security control fields and the like) stays in rioxarray's attrs."""


def nitf_source_metadata(location: str, tags: Mapping[str, str]) -> dict[str, Any]:
    """OversightML's sourceMetadata entry for a NITF, plus its identifying header fields.

    OSML's keys: ``location`` (the URL), ``format`` ("NITF"), ``category`` (ICAT), ``sourceId`` (FTITLE) and
    ``sourceDT`` (IDATIM as ISO 8601 UTC; None when absent or not a full date). Then every
    :data:`NITF_SOURCE_FIELDS` field that is present and not blank, under GDAL's name (e.g. ``NITF_IID1``).
    """
    headers = {k: str(tags[k]).strip() for k in NITF_SOURCE_FIELDS if str(tags.get(k, "")).strip()}
    return {
        "location": location,
        "format": "NITF",
        "category": headers.get("NITF_ICAT"),
        "sourceId": headers.get("NITF_FTITLE"),
        "sourceDT": _nitf_datetime(headers.get("NITF_IDATIM")),
        **headers,
    }


def _nitf_datetime(value: str | None) -> str | None:
    """A NITF 14-digit CCYYMMDDhhmmss as ISO 8601 with Z; None where absent or partly unknown."""
    try:
        return dt.datetime.strptime((value or "").strip(), "%Y%m%d%H%M%S").isoformat(timespec="seconds") + "Z"
    except ValueError:
        return None


def _rioxarray_template(source: ImageSource) -> xr.DataArray:
    """rioxarray's lazy DataArray (coordinates, spatial_ref, attrs); its pixels are replaced, never read.

    ``lock=False`` gives rioxarray's per-thread URIManager instead of xarray's global file cache, so the
    handle goes away with the template.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            template = rioxarray.open_rasterio(
                source.path, lock=False, cache=False, mask_and_scale=False, decode_times=False
            )
    except (rasterio.errors.RasterioError, CPLE_BaseError, ValueError) as e:
        raise ImageOpenError(source.url, _one_line(e)) from e
    if not isinstance(template, xr.DataArray) or template.dims != DIMS:
        found = tuple(map(str, template.dims)) if isinstance(template, xr.DataArray) else type(template).__name__
        raise ImageOpenError(source.url, f"opens as {found}, not one (band, y, x) array")
    return template


def _resolve_chunks(
    chunks: int | Mapping[str, Any] | None, shape: tuple[int, int, int], dtype: np.dtype, block_shape: tuple[int, int]
) -> tuple[tuple[int, ...], ...]:
    """Chunk sizes per axis: whole bands, and y/x aligned to the file's blocks unless given explicitly."""
    spec: dict[str, Any] = {"band": -1, "y": "auto", "x": "auto"}
    if isinstance(chunks, bool) or not (chunks is None or isinstance(chunks, (int, Mapping))):
        raise InvalidInputError(
            "chunks", chunks, "use None, an int (pixels per side) or a dict like {'y': 8192, 'x': 8192}"
        )
    if isinstance(chunks, int):
        spec.update(y=chunks, x=chunks)
    elif isinstance(chunks, Mapping):
        unknown = set(chunks) - set(DIMS)
        if unknown:
            raise InvalidInputError("chunks", dict(chunks), f"unknown dimensions {sorted(unknown)}; use band, y, x")
        spec.update(chunks)
    try:
        normalized = normalize_chunks(
            tuple(spec[d] for d in DIMS), shape, dtype=dtype, previous_chunks=(shape[0], *block_shape)
        )
    except (ValueError, TypeError) as e:
        raise InvalidInputError("chunks", chunks, f"does not fit shape {shape}: {e}") from e
    if any(size <= 0 for axis in normalized for size in axis) or tuple(map(sum, normalized)) != shape:
        raise InvalidInputError(
            "chunks", chunks, f"chunk sizes must be positive (or -1 for a whole axis), got {normalized}"
        )
    return normalized


def _file_signature(source: ImageSource) -> tuple[int, int] | None:
    """Size and mtime of a local file, so that task names change when the file does."""
    if not source.is_local:
        return None
    stat = os.stat(source.path)
    return (stat.st_size, stat.st_mtime_ns)


def _dask_array(
    reader: RasterReader, source: ImageSource, chunks: int | Mapping[str, Any] | None, block_shape: tuple[int, int]
) -> da.Array:
    """The dask array over ``reader``: one window read per chunk, deterministic task names.

    ``inline_array=True`` puts the (small, picklable) reader into each task instead of one shared key,
    so no task depends on a single worker holding it. ``meta`` is given so that dask never slices the
    reader to guess it.
    """
    normalized = _resolve_chunks(chunks, reader.shape, reader.dtype, block_shape)
    name = _NAME_PREFIX + tokenize(
        source.path, reader.signature, reader.bands, normalized, reader.dtype_name, reader.shape, source.env
    )
    return da.from_array(
        reader, chunks=normalized, name=name, lock=False, asarray=False, fancy=False, inline_array=True,
        meta=np.empty((0, 0, 0), dtype=reader.dtype),
    )
