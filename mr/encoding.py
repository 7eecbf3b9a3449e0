"""Encode one tile to image bytes and back, in memory: the body an OSML-compatible model endpoint receives.

OversightML (OSML) ModelRunner sends each tile to a model container as an encoded image (GDAL formats NITF, GTIFF,
PNG, JPEG; compressions NONE, JPEG, J2K, LZW). ``encode_tile`` builds that body from a (bands, h, w) array with
GDAL's ``CreateCopy`` from an in-memory ``MEM`` dataset into a ``/vsimem`` file (rasterio ``MemoryFile``) — no
temporary files. Which combinations work is decided once, up front, by :func:`resolve_encoding`, so an impossible
request fails with an :class:`~mr.errors.InvalidInputError` that names the allowed choices rather than a GDAL error.

NITF keeps the source pixel type (uint8, uint16, int16, float32); NITF J2K (IC=C8, through JP2OpenJPEG) is lossy
but close, NITF JPEG (IC=C3) and JPEG are lossy, everything else is lossless.

Uncompressed NITF and GTIFF are GDAL's fixed header followed by the raw pixels. GDAL writes them slowly (about 1 ms
for a 512² GTIFF, 3 ms for a NITF: the cost that bounded an endpoint client), so for those the header GDAL writes
for a (format, pixel type, shape) is kept once per process, after checking on two probe tiles that GDAL's bytes are
exactly that header plus the pixels, and each tile is that header joined to its pixels: GDAL's bytes, in ~20 µs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.io import MemoryFile

from mr.errors import InvalidInputError

_NITF_TYPES = ("uint8", "uint16", "int16", "float32")
_GTIFF_TYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

_FORMATS: dict[str, str] = {"NITF": "NITF", "GTIFF": "GTiff", "PNG": "PNG", "JPEG": "JPEG"}
"""OSML format name → GDAL driver."""

_CONTENT_TYPES = {"NITF": "image/nitf", "GTIFF": "image/tiff", "PNG": "image/png", "JPEG": "image/jpeg"}

_DECODE_DRIVERS = ("NITF", "GTiff", "PNG", "JPEG", "JP2OpenJPEG")
"""Drivers ``decode_tile`` lets GDAL try: never VRT or others that could read local files named in the body."""

_MAX_DECODED_BYTES = 1 << 30
"""Largest decoded tile ``decode_tile`` accepts by default (guards against decompression bombs)."""


@dataclass(frozen=True)
class _Codec:
    """One allowed (format, compression): the GDAL creation options, pixel types and band counts it takes."""

    options: tuple[tuple[str, str], ...]
    dtypes: tuple[str, ...]
    bands: tuple[int, ...] | None = None
    """Allowed band counts; None for any."""
    lossless: bool = True
    driver_needed: str | None = None


_CODECS: dict[tuple[str, str], _Codec] = {
    ("NITF", "NONE"): _Codec((("IC", "NC"),), _NITF_TYPES),
    ("NITF", "JPEG"): _Codec((("IC", "C3"),), ("uint8",), (1, 3), lossless=False),
    ("NITF", "J2K"): _Codec(
        (("IC", "C8"), ("QUALITY", "100"), ("REVERSIBLE", "YES")),
        ("uint8", "uint16", "int16"),
        lossless=False,
        driver_needed="JP2OpenJPEG",
    ),
    ("GTIFF", "NONE"): _Codec((("COMPRESS", "NONE"),), _GTIFF_TYPES),
    ("GTIFF", "LZW"): _Codec((("COMPRESS", "LZW"),), _GTIFF_TYPES),
    ("GTIFF", "JPEG"): _Codec((("COMPRESS", "JPEG"),), ("uint8",), (1, 3), lossless=False),
    ("PNG", "NONE"): _Codec((), ("uint8", "uint16"), (1, 2, 3, 4)),
    ("JPEG", "NONE"): _Codec((), ("uint8",), (1, 3), lossless=False),
    ("JPEG", "JPEG"): _Codec((), ("uint8",), (1, 3), lossless=False),
}


@dataclass(frozen=True)
class Encoding:
    """A resolved, valid encoding request."""

    fmt: str
    """OSML format name, upper case: NITF, GTIFF, PNG or JPEG."""
    compression: str
    """OSML compression name, upper case: NONE, JPEG, J2K or LZW."""
    driver: str
    """The GDAL driver that writes it."""
    options: dict[str, str]
    """GDAL creation options."""
    lossless: bool
    """Whether decoding gives back exactly the encoded pixels."""


def valid_compressions(fmt: str) -> list[str]:
    """The compressions a format takes (raises for an unknown format)."""
    key = _format_key(fmt)
    return [c for f, c in _CODECS if f == key and _driver_available(_CODECS[(f, c)].driver_needed)]


def resolve_encoding(fmt: str, compression: str, dtype: object, bands: int) -> Encoding:
    """Check one (format, compression, pixel type, band count) request and say how GDAL writes it."""
    key = _format_key(fmt)
    comp = str(compression).upper()
    codec = _CODECS.get((key, comp))
    if codec is None or not _driver_available(codec.driver_needed):
        raise InvalidInputError("compression", compression, f"{key} takes one of {valid_compressions(key)}")
    name = np.dtype(dtype).name
    if name not in codec.dtypes:
        raise InvalidInputError(
            "dtype", name, f"{key} with compression {comp} takes pixel types {list(codec.dtypes)}; cast the tile"
        )
    if codec.bands is not None and bands not in codec.bands:
        raise InvalidInputError(
            "bands", bands, f"{key} with compression {comp} takes {list(codec.bands)} bands; choose other bands"
        )
    return Encoding(key, comp, _FORMATS[key], dict(codec.options), codec.lossless)


def encode_tile(tile: np.ndarray, fmt: str = "NITF", compression: str = "NONE") -> bytes:
    """The bytes of ``tile`` (bands, height, width) encoded as ``fmt`` with ``compression``, made in memory."""
    tile = np.asarray(tile)
    if tile.ndim != 3 or min(tile.shape) < 1:
        raise InvalidInputError("tile", tile.shape, "give a non-empty (bands, height, width) array")
    encoding = resolve_encoding(fmt, compression, tile.dtype, tile.shape[0])
    splice = _splice(encoding.fmt, encoding.compression, tile.dtype.str, tile.shape)
    return splice.encode(tile) if splice is not None else _gdal_encode(tile, encoding)


def _gdal_encode(tile: np.ndarray, encoding: Encoding) -> bytes:
    """``tile`` written by GDAL's CreateCopy from a MEM dataset into a /vsimem file: every codec, slowly."""
    bands, height, width = tile.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(
            "tile", "w+", driver="MEM", width=width, height=height, count=bands, dtype=tile.dtype
        ) as source, MemoryFile() as target:
            source.write(tile)
            rasterio.shutil.copy(source, target.name, driver=encoding.driver, **encoding.options)
            return target.read()


_SPLICED: dict[tuple[str, str], tuple[str, str]] = {("NITF", "NONE"): ("band", ">"), ("GTIFF", "NONE"): ("pixel", "=")}
"""Codecs written as GDAL's header then the raw pixels: (interleave, byte order) of the pixels. NITF (IC=NC) is
band-sequential and big-endian; GDAL's GTiff is pixel-interleaved in the host's byte order."""


@dataclass(frozen=True)
class _Splice:
    """GDAL's bytes for one uncompressed (format, pixel type, shape): a fixed header, then the pixels."""

    header: bytes
    interleave: str
    """"band" (band-sequential) or "pixel" (pixel-interleaved)."""
    dtype: np.dtype
    """The pixels' type and byte order in the file."""

    def encode(self, tile: np.ndarray) -> bytes:
        """The header joined to the tile's pixels in the file's layout (one copy of the pixels, two of the bytes)."""
        pixels = tile.transpose(1, 2, 0) if self.interleave == "pixel" else tile
        return b"".join((self.header, np.ascontiguousarray(pixels, dtype=self.dtype)))


@lru_cache(maxsize=64)
def _splice(fmt: str, compression: str, dtype: str, shape: tuple[int, int, int]) -> _Splice | None:
    """How to write tiles of this kind without GDAL, or None unless GDAL's bytes for two probe tiles are exactly
    one header followed by the pixels (checked here, once per process, so any other GDAL layout falls back)."""
    layout = _SPLICED.get((fmt, compression))
    if layout is None:
        return None
    interleave, order = layout
    encoding = resolve_encoding(fmt, compression, dtype, shape[0])
    rng = np.random.default_rng(0)
    probes = [rng.integers(0, 100, size=shape).astype(dtype) for _ in range(2)]
    written = [_gdal_encode(probe, encoding) for probe in probes]
    header = written[0][: len(written[0]) - probes[0].nbytes]
    splice = _Splice(header, interleave, np.dtype(dtype).newbyteorder(order))
    if all(splice.encode(probe) == data for probe, data in zip(probes, written)):
        return splice
    return None


def decode_tile(data: bytes, max_bytes: int = _MAX_DECODED_BYTES) -> np.ndarray:
    """The (bands, height, width) pixels of an encoded tile in any format GDAL reads here (NITF, GTiff, PNG, JPEG,
    JPEG 2000); the first image segment of a multi-image NITF.
    """
    size = f"<{len(data)} bytes>"
    if not data:
        raise InvalidInputError("data", size, "the body is empty; send an encoded image (NITF, GTIFF, PNG or JPEG)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile(bytes(data)) as memfile, memfile.open(driver=list(_DECODE_DRIVERS)) as dataset:
                decoded = dataset.count * dataset.width * dataset.height * np.dtype(dataset.dtypes[0]).itemsize
                if decoded > max_bytes:
                    raise InvalidInputError(
                        "data", size, f"decodes to {decoded} bytes, over the limit of {max_bytes}; send smaller tiles"
                    )
                return dataset.read()
    except RasterioError as error:
        raise InvalidInputError(
            "data", size, f"not a readable image ({error}); send NITF, GTIFF, PNG or JPEG bytes"
        ) from error


def content_type(fmt: str) -> str:
    """The HTTP content type of a tile encoded as ``fmt``."""
    return _CONTENT_TYPES[_format_key(fmt)]


def _format_key(fmt: str) -> str:
    key = str(fmt).upper()
    if key not in _FORMATS:
        raise InvalidInputError("fmt", fmt, f"not a tile format; use one of {list(_FORMATS)}")
    return key


@cache
def _driver_available(driver: str | None) -> bool:
    if driver is None:
        return True
    with rasterio.Env() as env:
        return driver in env.drivers()
