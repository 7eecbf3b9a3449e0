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

Every rasterio call of mr, except the geolocation transformers in :mod:`mr.geo`, lives here, in :mod:`mr.sources`
and in :mod:`mr.reader`.
"""

from __future__ import annotations

import datetime as dt
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np
import rasterio
import rasterio.errors
import rioxarray
import xarray as xr
from dask.array.core import normalize_chunks
from dask.base import tokenize

from mr.errors import ImageOpenError, InvalidInputError
from mr.geo import Georeference, georeference_from_dataset
from mr.limits import RasterHeader, header_problem, resolve_image_limits

try:  # GDAL errors that rasterio lets through unwrapped (rasterio 1.x keeps them in a private module)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover
    CPLE_BaseError = rasterio.errors.RasterioError  # type: ignore[assignment,misc]

DIMS = ("band", "y", "x")
from mr.reader import RasterReader, _one_line
from mr.sources import GdalEnv, ImageSource, image_id_for, resolve_source  # noqa: F401  (re-exported)

_NAME_PREFIX = "open_image-"

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
    given), ``open_options`` (for :func:`reopen`), ``image_id``, ``nodata``, ``dtype``, ``input_format``
    (GTIFF, NITF, …) and ``source_metadata`` (NITF header fields plus OversightML's sourceMetadata keys; None
    for other formats).
    """
    source = resolve_source(url, endpoint_url)
    with source.env.activate():
        with _open_dataset(source) as ds:
            band_indexes = _resolve_bands(bands, ds.count)
            info = _image_info(source, ds)
            block_shape = ds.block_shapes[0]
            driver = ds.driver
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
        input_format=input_format(driver),
        reader=reader,
    )
    return result


_FORMATS = {"GTiff": "GTIFF", "COG": "GTIFF", "NITF": "NITF", "JPEG": "JPEG", "PNG": "PNG", "JP2OpenJPEG": "JP2"}


def input_format(driver: str) -> str:
    """The ``InputFormat`` metric dimension for a GDAL driver (OversightML's format names where they exist)."""
    return _FORMATS.get(driver, driver.upper())


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
    """Reject what cannot become one (band, y, x) array: containers, band-less files, headers over the limits
    (decompression bombs), unsupported pixel types, truncation. Metadata only: no pixel is read."""
    if ds.subdatasets:
        raise ImageOpenError(
            source.url,
            f"holds {len(ds.subdatasets)} subdatasets (e.g. {ds.subdatasets[0]}), not one image; "
            "open a subdataset by its GDAL name",
        )
    if ds.count < 1:
        raise ImageOpenError(source.url, "has no raster bands")
    problem = header_problem(_raster_header(ds), resolve_image_limits())
    if problem:
        raise ImageOpenError(source.url, problem)
    if source.is_local and ds.driver == "GTiff":
        _check_tiff_complete(source, ds)


def _raster_header(ds: rasterio.io.DatasetReader) -> RasterHeader:
    """What the header claims, for :func:`mr.limits.header_problem`."""
    interleaving = getattr(ds.interleaving, "name", None)
    return RasterHeader(
        ds.width, ds.height, ds.count, tuple(ds.dtypes), tuple(ds.block_shapes[0]), interleaving == "pixel"
    )


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
    from mr.redact import redact

    headers = {k: str(tags[k]).strip() for k in NITF_SOURCE_FIELDS if str(tags.get(k, "")).strip()}
    return {
        "location": redact(location),  # a presigned URL's signature or a user:password never reaches an output
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
