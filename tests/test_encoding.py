"""Tile encoding: every valid (format, compression, pixel type) round-trips, impossible ones name the field."""

from __future__ import annotations

import numpy as np
import pytest

from mr import encoding
from mr.encoding import (
    _gdal_encode, _splice, content_type, decode_tile, encode_tile, resolve_encoding, valid_compressions,
)
from mr.errors import InvalidInputError

LOSSLESS = [
    ("NITF", "NONE", dtype) for dtype in ("uint8", "uint16", "int16", "float32")
] + [
    ("GTIFF", compression, dtype)
    for compression in ("NONE", "LZW")
    for dtype in ("uint8", "uint16", "int16", "float32")
] + [("PNG", "NONE", "uint8"), ("PNG", "NONE", "uint16")]

LOSSY = [
    ("NITF", "JPEG", "uint8"),
    ("NITF", "J2K", "uint8"),
    ("NITF", "J2K", "uint16"),
    ("NITF", "J2K", "int16"),
    ("GTIFF", "JPEG", "uint8"),
    ("JPEG", "NONE", "uint8"),
    ("JPEG", "JPEG", "uint8"),
]


def smooth_tile(dtype: str, bands: int = 3, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth gradient with a bright square: lossy codecs keep it close, so 'close' has a meaning."""
    y, x = np.mgrid[0:height, 0:width]
    base = 40 + 2 * x + y
    base[10:20, 30:40] += 60
    tile = np.stack([base + 5 * b for b in range(bands)]).astype(np.float64)
    if dtype == "int16":
        tile -= 100
    if dtype == "uint16":
        tile *= 40
    return tile.astype(dtype)


@pytest.mark.parametrize("fmt,compression,dtype", LOSSLESS)
def test_lossless_round_trip_is_exact(fmt, compression, dtype):
    tile = smooth_tile(dtype)
    decoded = decode_tile(encode_tile(tile, fmt, compression))
    assert decoded.dtype == tile.dtype
    np.testing.assert_array_equal(decoded, tile)
    assert resolve_encoding(fmt, compression, dtype, 3).lossless


@pytest.mark.parametrize("fmt,compression,dtype", LOSSY)
def test_lossy_round_trip_is_close(fmt, compression, dtype):
    tile = smooth_tile(dtype, bands=3 if "J2K" not in compression else 4)
    decoded = decode_tile(encode_tile(tile, fmt, compression))
    assert decoded.shape == tile.shape and decoded.dtype == tile.dtype
    span = float(tile.max()) - float(tile.min())
    error = np.abs(decoded.astype(np.float64) - tile.astype(np.float64))
    assert error.mean() < 0.02 * span
    assert not resolve_encoding(fmt, compression, dtype, 3).lossless


def test_sixteen_bit_nitf_keeps_dtype_and_bands():
    tile = np.random.default_rng(3).integers(0, 2**16, (5, 33, 47)).astype(np.uint16)
    data = encode_tile(tile)
    assert data[:4] == b"NITF"
    decoded = decode_tile(data)
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, tile)


def test_single_band_and_odd_sizes():
    tile = np.random.default_rng(4).integers(0, 256, (1, 7, 13)).astype(np.uint8)
    for fmt in ("NITF", "GTIFF", "PNG"):
        np.testing.assert_array_equal(decode_tile(encode_tile(tile, fmt)), tile)


def test_names_are_case_insensitive():
    tile = smooth_tile("uint8")
    np.testing.assert_array_equal(decode_tile(encode_tile(tile, "gtiff", "lzw")), tile)


@pytest.mark.parametrize(
    "fmt,compression,dtype,bands,field",
    [
        ("BMP", "NONE", "uint8", 1, "fmt"),
        ("PNG", "LZW", "uint8", 1, "compression"),
        ("GTIFF", "J2K", "uint8", 1, "compression"),
        ("NITF", "LZW", "uint8", 1, "compression"),
        ("NITF", "JPEG", "uint16", 1, "dtype"),
        ("NITF", "J2K", "float32", 1, "dtype"),
        ("NITF", "NONE", "float64", 1, "dtype"),
        ("PNG", "NONE", "float32", 1, "dtype"),
        ("JPEG", "NONE", "uint16", 3, "dtype"),
        ("GTIFF", "JPEG", "int16", 3, "dtype"),
        ("JPEG", "NONE", "uint8", 4, "bands"),
        ("NITF", "JPEG", "uint8", 2, "bands"),
        ("PNG", "NONE", "uint8", 5, "bands"),
    ],
)
def test_impossible_combinations_name_the_field(fmt, compression, dtype, bands, field):
    tile = np.zeros((bands, 8, 8), dtype=dtype)
    with pytest.raises(InvalidInputError) as raised:
        encode_tile(tile, fmt, compression)
    assert raised.value.field == field
    assert "one of" in str(raised.value) or "takes" in str(raised.value)


def test_compression_error_lists_what_is_allowed():
    with pytest.raises(InvalidInputError, match="LZW"):
        encode_tile(np.zeros((1, 8, 8), np.uint8), "GTIFF", "J2K")
    assert valid_compressions("png") == ["NONE"]


def test_tile_must_be_three_dimensional():
    with pytest.raises(InvalidInputError) as raised:
        encode_tile(np.zeros((8, 8), np.uint8))
    assert raised.value.field == "tile"


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"NITF02.10" + b"\0" * 50])
def test_garbage_does_not_decode(data):
    with pytest.raises(InvalidInputError) as raised:
        decode_tile(data)
    assert raised.value.field == "data"


def test_decoded_size_is_bounded():
    data = encode_tile(np.zeros((1, 64, 64), np.uint8), "PNG")
    with pytest.raises(InvalidInputError, match="limit"):
        decode_tile(data, max_bytes=1000)


def test_vrt_bodies_are_refused():
    vrt = b'<VRTDataset rasterXSize="1" rasterYSize="1"><VRTRasterBand dataType="Byte" band="1"/></VRTDataset>'
    with pytest.raises(InvalidInputError):
        decode_tile(vrt)


def test_content_types():
    assert content_type("NITF") == "image/nitf"
    assert content_type("gtiff") == "image/tiff"
    assert content_type("PNG") == "image/png"
    assert content_type("JPEG") == "image/jpeg"
    with pytest.raises(InvalidInputError):
        content_type("BMP")


@pytest.mark.parametrize("fmt", ["NITF", "GTIFF"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
@pytest.mark.parametrize("shape", [(1, 512, 512), (3, 48, 64), (4, 7, 5)])
def test_uncompressed_tiles_are_gdals_own_bytes_without_gdal(fmt, dtype, shape):
    tile = np.random.default_rng(7).normal(50, 30, shape).astype(dtype)
    expected = _gdal_encode(tile, resolve_encoding(fmt, "NONE", dtype, shape[0]))
    assert _splice(fmt, "NONE", tile.dtype.str, shape) is not None  # the fast path is taken
    assert encode_tile(tile, fmt) == expected
    wider = np.zeros((shape[0], shape[1] + 3, 2 * shape[2] + 1), dtype)
    wider[:, 2 : 2 + shape[1], 1 : 1 + 2 * shape[2] : 2] = tile
    assert encode_tile(wider[:, 2 : 2 + shape[1], 1 : 1 + 2 * shape[2] : 2], fmt) == expected  # a strided view


def test_a_layout_gdal_does_not_write_falls_back_to_gdal(monkeypatch):
    monkeypatch.setitem(encoding._SPLICED, ("GTIFF", "NONE"), ("band", ">"))  # not how GDAL writes a GeoTIFF
    tile = smooth_tile("uint16")
    encoding._splice.cache_clear()
    try:
        assert encoding._splice("GTIFF", "NONE", tile.dtype.str, tile.shape) is None
        assert encode_tile(tile, "GTIFF") == _gdal_encode(tile, resolve_encoding("GTIFF", "NONE", "uint16", 3))
    finally:
        encoding._splice.cache_clear()
