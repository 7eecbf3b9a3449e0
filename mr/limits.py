"""What an image may claim before any pixel is read: size limits, pixel types, and (for the service) a georeference.

A file's header is untrusted input. A few hundred bytes can claim 10 million × 10 million pixels (a decompression
bomb): opening it is cheap, but the coordinate arrays, the tile grid and the reads that follow are not. So the
header is checked against :class:`ImageLimits` (``mr.imagery.*``) as soon as the file opens, and the error names
the file, what it claims and the setting it exceeds. Pure functions over a :class:`RasterHeader`: no rasterio here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mr.errors import ImageOpenError, InvalidInputError

REAL_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"}
)
"""Pixel types the models take; complex pixels (SAR SICD) and anything GDAL adds later are refused."""


@dataclass(frozen=True)
class ImageLimits:
    """The largest image a header may claim; resolved once from ``mr.imagery.*``."""

    max_side: int
    """Pixels per side (width or height): bounds the coordinate arrays and the tile grid of each axis."""
    max_pixels: float
    """width × height × bands: bounds the number of region tasks and the work of one image."""
    max_bands: int
    """Bands in the file: every band of a region is read in one task."""
    max_block_mb: float
    """Decoded MiB of one file block (all bands when pixel-interleaved): GDAL decodes a whole block to read from it."""


@dataclass(frozen=True)
class RasterHeader:
    """What a file's header claims, as the limits see it."""

    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    block_shape: tuple[int, int]
    """(rows, columns) of one block, as GDAL reports it."""
    pixel_interleaved: bool
    """Whether one block holds every band (pixel interleaving), so decoding it decodes them all."""


def resolve_image_limits(**overrides: Any) -> ImageLimits:
    """``mr.imagery.max-side``, ``max-pixels``, ``max-bands`` and ``max-block-mb``, unless given; all positive."""
    from mr import config

    values = {}
    for field in ("max_side", "max_pixels", "max_bands", "max_block_mb"):
        key = "imagery." + field.replace("_", "-")
        value = config.get(key, overrides.get(field))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InvalidInputError(f"mr.{key}", value, "must be a positive number")
        values[field] = value
    return ImageLimits(int(values["max_side"]), float(values["max_pixels"]), int(values["max_bands"]),
                       float(values["max_block_mb"]))


def header_problem(header: RasterHeader, limits: ImageLimits) -> str | None:
    """Why an image with this header cannot be processed within ``limits``, or None when it can."""
    for check in (_size_problem, _band_problem, _block_problem, _dtype_problem):
        problem = check(header, limits)
        if problem:
            return problem
    return None


def _size_problem(header: RasterHeader, limits: ImageLimits) -> str | None:
    """Sides and total pixels over their limits (a decompression bomb's header claims absurd sizes)."""
    claim = f"{header.width:,} × {header.height:,} pixels × {header.count:,} band{'s' * (header.count != 1)}"
    if header.width < 1 or header.height < 1:
        return f"claims {claim}: an image needs at least one pixel"
    total = float(header.width) * header.height * header.count
    if total > limits.max_pixels:
        return f"claims {claim} ({total:.2g}), over mr.imagery.max-pixels ({limits.max_pixels:.2g}){_RAISE}"
    if max(header.width, header.height) > limits.max_side:
        return f"claims {claim}, a side over mr.imagery.max-side ({limits.max_side:,}){_RAISE}"
    return None


_RAISE = "; raise the limit if the image is real"


def _band_problem(header: RasterHeader, limits: ImageLimits) -> str | None:
    """More bands than a region task should hold at once."""
    if header.count > limits.max_bands:
        return f"has {header.count:,} bands, over mr.imagery.max-bands ({limits.max_bands:,}){_RAISE}"
    return None


def _block_problem(header: RasterHeader, limits: ImageLimits) -> str | None:
    """A block so large that decoding it for any read takes more memory than a task should (e.g. one huge strip)."""
    rows, cols = header.block_shape
    bands = header.count if header.pixel_interleaved else 1
    itemsize = max((np.dtype(d).itemsize for d in header.dtypes if _known_dtype(d)), default=1)
    mib = float(rows) * cols * bands * itemsize / 2**20
    if mib > limits.max_block_mb:
        return (
            f"is stored in blocks of {rows:,} × {cols:,} pixels ({mib:,.0f} MiB decoded each), over "
            f"mr.imagery.max-block-mb ({limits.max_block_mb:,.0f}); re-tile it (gdal_translate -co TILED=YES)"
        )
    return None


def _known_dtype(name: str) -> bool:
    """Whether numpy knows a GDAL/rasterio type name."""
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True


def _dtype_problem(header: RasterHeader, limits: ImageLimits) -> str | None:
    """Pixel types the models cannot take (complex SAR data, mixed types)."""
    kinds = sorted(set(header.dtypes))
    if len(kinds) > 1:
        return f"bands have different data types {kinds}"
    if kinds and kinds[0] not in REAL_DTYPES:
        hint = "; convert to magnitude first" if "complex" in kinds[0] else ""
        return f"has {kinds[0]} pixels: models take real-valued bands (integers or floats){hint}"
    return None


# -- georeference (the service's requirement) ---------------------------------------------------------------


def georeference_problem(georef: Any) -> str | None:
    """Why a :class:`mr.geo.Georeference` cannot place features on the ground, or None when it can."""
    if georef is not None and georef.kind is not None:
        return None
    if georef is None:
        return "has no georeference"
    if georef.transform is not None and not georef.crs:
        return "has a geotransform but no CRS, so its pixels cannot be placed on the ground"
    if georef.gcps and not georef.gcp_crs:
        return "has ground control points but no CRS for them"
    if georef.gcps:
        return f"has only {len(georef.gcps)} ground control point(s); at least 3 are needed"
    if georef.transform is not None:
        return "has a degenerate geotransform (it maps pixels onto a line)"
    return "has no georeference (no CRS and geotransform, no GCPs, no RPCs)"


def require_georeference(image: Any, required: bool | None = None) -> Any:
    """``image`` (an :func:`mr.open_image` result) if it is georeferenced; else an :class:`ImageOpenError`.

    The service path: OversightML fails images without a sensor model, since their features would have no
    geometry. ``required`` defaults to ``mr.imagery.require-georeference``; when False the image passes (and
    ``mr.detect`` warns, as it does for notebook users, who never call this).
    """
    from mr import config

    problem = georeference_problem(image.attrs.get("georeference"))
    if problem is None or not config.get("imagery.require-georeference", required):
        return image
    source = str(image.attrs.get("source", "<array>"))
    raise ImageOpenError(source, f"{problem}; features need one to be placed (mr.imagery.require-georeference)")
