"""The tile and region grid: pure integer geometry, no pixels, no dask.

Two strategies, as in OversightML. *Variable overlap* (the default) keeps every tile full size: per axis the
overlap grows until ``n`` full tiles end at (or just inside) the far edge. *Fixed overlap* keeps the requested
overlap and truncates the last tile. Regions are runs of whole tiles; a region's core starts on a tile stride
and it reaches ``overlap`` pixels past its core, so every tile belongs to exactly one region.

Every tile owns the part of the image nearer to it than to its neighbours (its *core*, cut at the middle of each
overlap). A detection belongs to the tile whose core holds its centre: this is how duplicates from overlapping
tiles are avoided without comparing anything, and only boxes that reach across a cut need comparing at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import numpy as np

from mr.errors import InvalidInputError


class TilingStrategy(str, Enum):
    """How the last tile of an axis is made to fit the image."""

    VARIABLE_OVERLAP = "variable"
    FIXED_OVERLAP = "fixed"

    @classmethod
    def parse(cls, value: "str | TilingStrategy") -> "TilingStrategy":
        """Accept the enum, its value or OversightML-style names (``VariableOverlap``)."""
        if isinstance(value, TilingStrategy):
            return value
        key = str(value).lower().replace("_", "").replace("-", "").replace("overlap", "")
        for member in cls:
            if member.value == key:
                return member
        raise InvalidInputError("tiling_strategy", value, "allowed: 'variable' or 'fixed'")


def variable_overlap(length: int, tile: int, overlap: int) -> int:
    """The overlap that lets ``n`` full tiles reach the far edge (OversightML's rule)."""
    stride = tile - overlap
    count = math.ceil((length - overlap) / stride)
    if count <= 1:
        return overlap
    extra = overlap + count * stride - length
    return overlap + math.ceil(extra / (count - 1))


@dataclass(frozen=True)
class AxisGrid:
    """Tiles and regions along one axis of the processing window (offsets relative to the window)."""

    length: int
    """Pixels of the window along this axis."""
    tile: int
    """Nominal tile size."""
    overlap: int
    """Overlap between neighbouring tiles actually used (after the variable-overlap adjustment)."""
    count: int
    """Number of tiles."""
    tiles_per_region: int
    """Whole tiles in every region but the last."""

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @cached_property
    def tile_starts(self) -> np.ndarray:
        """Tile starts (read-only: computed once, looked up for every tile)."""
        return _read_only(np.arange(self.count, dtype=np.int64) * self.stride)

    @cached_property
    def tile_ends(self) -> np.ndarray:
        """Tile ends, the last truncated to the window for the fixed strategy (read-only)."""
        return _read_only(np.minimum(self.tile_starts + self.tile, self.length))

    @property
    def covered(self) -> int:
        """Pixels from the window start to the end of the last tile."""
        return int(self.tile_ends[-1])

    @property
    def cuts(self) -> np.ndarray:
        """Where one tile's core ends and the next begins: the middle of each overlap (float, n - 1 values)."""
        return (self.tile_starts[1:] + self.tile_ends[:-1]) / 2.0

    @property
    def region_count(self) -> int:
        return math.ceil(self.count / self.tiles_per_region)

    @property
    def region_chunks(self) -> tuple[int, ...]:
        """Core length of every region: the dask chunks of the covered window."""
        core = self.tiles_per_region * self.stride
        head = [core] * (self.region_count - 1)
        return tuple(head + [self.covered - core * len(head)])

    @property
    def region_of_tile(self) -> np.ndarray:
        return np.arange(self.count) // self.tiles_per_region

    @property
    def region_cuts(self) -> np.ndarray:
        """The tile cuts that separate one region's tiles from the next region's."""
        index = np.arange(1, self.region_count) * self.tiles_per_region - 1
        return self.cuts[index]

    def tiles_of_region(self, region: int) -> range:
        first = region * self.tiles_per_region
        return range(first, min(first + self.tiles_per_region, self.count))


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def axis_grid(length: int, tile: int, overlap: int, region: int, strategy: TilingStrategy, axis: str) -> AxisGrid:
    """Resolve one axis: validate, adjust the overlap, and fit whole tiles into regions."""
    _check_sizes(length, tile, overlap, region, axis)
    if length <= tile:
        return AxisGrid(length, length, 0, 1, 1)
    count = math.ceil((length - overlap) / (tile - overlap))
    if strategy is TilingStrategy.VARIABLE_OVERLAP:
        overlap = variable_overlap(length, tile, overlap)
    stride = tile - overlap
    # a region's core must hold at least the overlap, so its block reaches only into the next region
    tiles_per_region = max((region - overlap) // stride, math.ceil(overlap / stride))
    return AxisGrid(length, tile, overlap, count, tiles_per_region)


def _check_sizes(length: int, tile: int, overlap: int, region: int, axis: str) -> None:
    if length < 1:
        raise InvalidInputError(f"image {axis}", length, "the processing window is empty")
    if tile < 1:
        raise InvalidInputError("tile_size", tile, "must be a positive number of pixels")
    if not 0 <= overlap < tile:
        raise InvalidInputError("overlap", overlap, f"must be at least 0 and less than tile_size ({tile})")
    if region < tile:
        raise InvalidInputError("region_size", region, f"must be at least tile_size ({tile})")


@dataclass(frozen=True)
class TileGrid:
    """Tiles and regions over a processing window of the image (the whole image or a region of interest)."""

    x: AxisGrid
    y: AxisGrid
    x_offset: int = 0
    """Column of the window's first pixel in the full image."""
    y_offset: int = 0
    """Row of the window's first pixel in the full image."""

    @property
    def shape(self) -> tuple[int, int]:
        """Tiles along (y, x)."""
        return self.y.count, self.x.count

    @property
    def tile_count(self) -> int:
        return self.x.count * self.y.count

    @property
    def region_shape(self) -> tuple[int, int]:
        return self.y.region_count, self.x.region_count

    @property
    def region_count(self) -> int:
        return self.x.region_count * self.y.region_count

    def tile_id(self, iy: np.ndarray | int, ix: np.ndarray | int) -> np.ndarray | int:
        """Flat tile index, row-major over the whole grid."""
        return iy * self.x.count + ix

    def tile_bounds(self) -> np.ndarray:
        """(ny, nx, 4) int64 x0, y0, x1, y1 of every tile in full-image pixels."""
        x0 = self.x.tile_starts + self.x_offset
        x1 = self.x.tile_ends + self.x_offset
        y0 = self.y.tile_starts + self.y_offset
        y1 = self.y.tile_ends + self.y_offset
        gx0, gy0 = np.meshgrid(x0, y0)
        gx1, gy1 = np.meshgrid(x1, y1)
        return np.stack([gx0, gy0, gx1, gy1], axis=-1)

    def region_bounds(self, ry: int, rx: int) -> tuple[int, int, int, int]:
        """x0, y0, x1, y1 of a region in full-image pixels, including the overlap its last tiles reach into."""
        tx, ty = self.x.tiles_of_region(rx), self.y.tiles_of_region(ry)
        return (
            int(self.x.tile_starts[tx[0]]) + self.x_offset,
            int(self.y.tile_starts[ty[0]]) + self.y_offset,
            int(self.x.tile_ends[tx[-1]]) + self.x_offset,
            int(self.y.tile_ends[ty[-1]]) + self.y_offset,
        )

    def owner_tiles(self, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(iy, ix) of the tile whose core holds each centre (full-image pixels)."""
        ix = np.searchsorted(self.x.cuts + self.x_offset, centers[:, 0], side="right")
        iy = np.searchsorted(self.y.cuts + self.y_offset, centers[:, 1], side="right")
        return iy, ix

    def crossed_regions(self, boxes: np.ndarray, margin: float) -> tuple[np.ndarray, ...]:
        """Region index ranges (ry0, ry1, rx0, rx1), inclusive, that each box (grown by margin) reaches into."""
        xc = self.x.region_cuts + self.x_offset
        yc = self.y.region_cuts + self.y_offset
        return (
            np.searchsorted(yc, boxes[:, 1] - margin, side="right"),
            np.searchsorted(yc, boxes[:, 3] + margin, side="right"),
            np.searchsorted(xc, boxes[:, 0] - margin, side="right"),
            np.searchsorted(xc, boxes[:, 2] + margin, side="right"),
        )

    def crosses_tile_cut(self, boxes: np.ndarray, margin: float) -> np.ndarray:
        """True where a box (grown by margin) reaches across the core boundary between two tiles."""
        xc = self.x.cuts + self.x_offset
        yc = self.y.cuts + self.y_offset
        across_x = np.searchsorted(xc, boxes[:, 0] - margin) != np.searchsorted(xc, boxes[:, 2] + margin)
        across_y = np.searchsorted(yc, boxes[:, 1] - margin) != np.searchsorted(yc, boxes[:, 3] + margin)
        return across_x | across_y


def tile_grid(
    width: int,
    height: int,
    tile_size: int | tuple[int, int],
    overlap: int | tuple[int, int],
    region_size: int | tuple[int, int],
    strategy: TilingStrategy | str = TilingStrategy.VARIABLE_OVERLAP,
    window: tuple[int, int, int, int] | None = None,
) -> TileGrid:
    """The grid for an image of ``width`` × ``height``; sizes are one number or (x, y) pairs.

    ``window`` (x0, y0, x1, y1) limits the grid to part of the image, e.g. the bounds of a region of interest.
    """
    strategy = TilingStrategy.parse(strategy)
    tx, ty = _pair(tile_size)
    ox, oy = _pair(overlap)
    rx, ry = _pair(region_size)
    x0, y0, x1, y1 = window if window is not None else (0, 0, width, height)
    return TileGrid(
        axis_grid(x1 - x0, tx, ox, rx, strategy, "width"),
        axis_grid(y1 - y0, ty, oy, ry, strategy, "height"),
        x0,
        y0,
    )


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)
