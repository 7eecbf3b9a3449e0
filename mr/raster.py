"""Per-pixel models (segmentation, heat maps) over large images: a lazy, georeferenced raster out.

Three layers, as everywhere in mr: :func:`segment_block` is the numpy kernel (a region block in, the pixels its
tiles own out), :func:`segment_array` builds the dask graph (one task per region), :func:`segment` takes and
returns xarray. Every output pixel comes from exactly one tile: the one whose *core* holds its centre (cut at
the middle of each overlap, the grid's ``cuts``), i.e. the tile where the pixel lies farthest from an edge, so
no seam is blended and the result does not depend on the region size.

Output blocks follow ownership, not the input's chunks: region ``r`` returns the pixels owned by its tiles, so
the output's chunks are the region chunks shifted to the tile cuts (irregular; :func:`write_zarr` rechunks).
Pixels no tile covers (variable overlap may leave fewer than n - 1 at the far edges) hold the fill value:
NaN for float (and complex) outputs, 0 for integer and bool outputs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from mr import config
from mr.errors import InvalidInputError, ModelError, SinkError
from mr.regions import RegionTask, batch_view, tile_batches
from mr.tiling import AxisGrid, TileGrid, tile_grid

DEFAULT_DTYPE = "float32"
"""Output dtype when none is given: scores and class ids both fit."""


@dataclass(frozen=True)
class PixelModel:
    """A per-pixel callable with its contract checked on every batch: (n, bands, h, w) → (n, bands_out, h, w).

    With ``batched=False`` the function sees one tile (bands, h, w) and returns (bands_out, h, w), or (h, w)
    when ``bands_out`` is 1. It pickles to its fields (the function by cloudpickle), so closures travel.
    """

    fn: Callable[[np.ndarray], Any]
    bands_out: int = 1
    batched: bool = True
    name: str = ""

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n, _, h, w = tiles.shape
        try:
            raw = self.fn(tiles) if self.batched else [self.fn(tile) for tile in tiles]
            scores = np.asarray(raw)
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(f"model {self.name!r} failed on a batch of {n} tiles of {h}×{w}: {error}") from error
        expected = (n, self.bands_out, h, w)
        if scores.ndim == 3 and self.bands_out == 1:
            scores = scores[:, np.newaxis]
        if scores.shape != expected or not (scores.dtype.kind in "biufc"):
            one = "(bands_out, h, w) or (h, w) per tile" if not self.batched else "(n, bands_out, h, w)"
            raise ModelError(
                f"model {self.name!r} returned {scores.dtype} {tuple(scores.shape)} for {n} tiles of {h}×{w}; "
                f"expected numbers of shape {expected}, i.e. {one} with bands_out={self.bands_out}"
            )
        return scores


@dataclass(frozen=True)
class SegmentJob:
    """Everything a region task needs besides its pixels; small, so it travels inside every task."""

    grid: TileGrid
    model: PixelModel
    batch_size: int
    dtype: str
    """Output dtype; the model's scores are cast to it."""

    @property
    def fill_value(self) -> float:
        """What pixels no tile covers hold: NaN for float outputs, 0 for integers."""
        return np.nan if np.issubdtype(np.dtype(self.dtype), np.inexact) else 0


def owner_bounds(axis: AxisGrid) -> np.ndarray:
    """(count + 1,) first pixel of each tile's core along an axis, then the axis length.

    A pixel belongs to the tile whose core holds its centre (p + 0.5); a centre on a cut goes to the later tile,
    as in `TileGrid.owner_tiles`. The last tile's core runs to the window's end, past what it covers.
    """
    inner = np.ceil(axis.cuts - 0.5).astype(np.int64)
    return np.concatenate([[0], inner, [axis.length]]).astype(np.int64)


def output_chunks(axis: AxisGrid) -> tuple[int, ...]:
    """Sizes of the output blocks along an axis: the pixels owned by each region's tiles."""
    firsts = [axis.tiles_of_region(r).start for r in range(axis.region_count)] + [axis.count]
    return tuple(int(n) for n in np.diff(owner_bounds(axis)[firsts]))


def segment_block(block: np.ndarray, job: SegmentJob, ry: int, rx: int) -> np.ndarray:
    """Numpy kernel: a region block (overlap included) in, its tiles' cores out, (bands_out, y, x) in job.dtype."""
    grid = job.grid
    ys, xs = owner_bounds(grid.y), owner_bounds(grid.x)
    ty, tx = grid.y.tiles_of_region(ry), grid.x.tiles_of_region(rx)
    oy, ox = int(ys[ty.start]), int(xs[tx.start])
    shape = (job.model.bands_out, int(ys[ty.stop]) - oy, int(xs[tx.stop]) - ox)
    out = np.full(shape, job.fill_value, dtype=job.dtype)
    y_origin, x_origin = int(grid.y.tile_starts[ty.start]), int(grid.x.tile_starts[tx.start])
    for iy, run in tile_batches(grid, RegionTask(ry, rx), job.batch_size):
        sy, ey = int(grid.y.tile_starts[iy]), int(grid.y.tile_ends[iy])
        sx0, ex0 = int(grid.x.tile_starts[run[0]]), int(grid.x.tile_ends[run[0]])
        tiles = batch_view(block, sy - y_origin, sx0 - x_origin, ey - sy, ex0 - sx0, len(run), grid.x.stride)
        scores = job.model(tiles)
        ya, yb = int(ys[iy]), min(int(ys[iy + 1]), ey)
        for k, ix in enumerate(run):
            sx, ex = int(grid.x.tile_starts[ix]), int(grid.x.tile_ends[ix])
            xa, xb = int(xs[ix]), min(int(xs[ix + 1]), ex)
            out[:, ya - oy : yb - oy, xa - ox : xb - ox] = scores[k, :, ya - sy : yb - sy, xa - sx : xb - sx]
    return out


def _segment_kernel(read, job: SegmentJob, ry: int, rx: int) -> np.ndarray:
    """The region task's work: its block (read when needed) through the model, trimmed to what its tiles own."""
    return segment_block(read(), job, ry, rx)


def segment_array(image: xr.DataArray, job: SegmentJob) -> da.Array:
    """The dask graph: one task per region, each returning the pixels its tiles own (chunks: `output_chunks`).

    An untouched `mr.open_image` result is read window by window inside the region tasks; any other array is
    chunked by regions and given its overlap by dask (`mr.graph.overlapped_blocks`), then ``map_blocks``.
    """
    from mr.graph import region_tasks

    grid = job.grid
    chunks = ((job.model.bands_out,), output_chunks(grid.y), output_chunks(grid.x))
    meta = np.empty((0, 0, 0), dtype=job.dtype)
    return region_tasks(image, grid, _segment_kernel, job, prefix="segment-region", chunks=chunks, meta=meta)


def segment(
    image: xr.DataArray | str | os.PathLike,
    model: Callable[[np.ndarray], Any],
    *,
    tile_size: Any = None,
    overlap: Any = None,
    region_size: Any = None,
    strategy: Any = None,
    batch_size: Any = None,
    dtype: Any = None,
    bands_out: int = 1,
    batched: bool = True,
    name: str | None = None,
) -> xr.DataArray:
    """Run a per-pixel model over the image in overlapping tiles; a lazy (band, y, x) DataArray comes back.

    ``model(tiles)`` maps a batch (n, bands, h, w) to (n, bands_out, h, w); with ``batched=False`` it maps one
    tile (bands, h, w) to (bands_out, h, w) or (h, w). Tiling options as in `mr.detect` (defaults from
    ``mr.tiling.*``). ``dtype``: the output's (default float32; the scores are cast to it). Each output pixel is
    the one of the tile where it is farthest from an edge; uncovered far-edge pixels are NaN (float) or 0 (ints).
    The result has the image's y/x coordinates, CRS and transform: ``.rio.to_raster`` or :func:`write_zarr`
    write it georeferenced. Nothing is read or computed until asked.
    """
    from mr.api import as_image
    from mr.settings import resolve_tiling

    image = as_image(image)
    pixel_model = resolve_pixel_model(model, bands_out, batched, name)
    tiling = resolve_tiling(tile_size, overlap, region_size, strategy)
    _, height, width = (int(n) for n in image.shape)
    grid = tile_grid(width, height, tiling.tile_size, tiling.overlap, tiling.region_size, tiling.strategy)
    job = SegmentJob(grid, pixel_model, _resolve_batch_size(batch_size), _resolve_dtype(dtype))
    return _like_image(segment_array(image, job), image, pixel_model.name)


def resolve_pixel_model(model: Any, bands_out: Any, batched: Any, name: str | None) -> PixelModel:
    """Check the model options once, on the client."""
    if not callable(model):
        raise InvalidInputError("model", model, "give a callable: a batch (n, bands, h, w) → (n, bands_out, h, w)")
    if isinstance(bands_out, bool) or not isinstance(bands_out, (int, np.integer)) or bands_out < 1:
        raise InvalidInputError("bands_out", bands_out, "must be a positive whole number of output bands")
    if not isinstance(batched, bool):
        raise InvalidInputError("batched", batched, "must be True (model takes a batch) or False (one tile)")
    label = name or getattr(model, "name", None) or getattr(model, "__qualname__", None) or type(model).__name__
    return PixelModel(model, int(bands_out), batched, str(label))


def _resolve_batch_size(batch_size: Any) -> int:
    batch = config.get("tiling.batch-size", batch_size)
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InvalidInputError("batch_size", batch, "must be a positive whole number of tiles")
    return int(batch)


def _resolve_dtype(dtype: Any) -> str:
    try:
        resolved = np.dtype(DEFAULT_DTYPE if dtype is None else dtype)
    except TypeError as error:
        raise InvalidInputError("dtype", dtype, "give a numpy dtype such as 'float32' or 'uint8'") from error
    if resolved.kind not in "biufc":
        raise InvalidInputError("dtype", dtype, "must be a numeric dtype such as 'float32' or 'uint8'")
    return resolved.name


def _like_image(data: da.Array, image: xr.DataArray, model_name: str) -> xr.DataArray:
    """Wrap the output with the image's y/x coordinates, spatial_ref, CRS and transform."""
    coords = {k: v for k, v in image.coords.items() if "band" not in v.dims}
    coords["band"] = np.arange(1, data.shape[0] + 1)
    out = xr.DataArray(data, dims=("band", "y", "x"), coords=coords, name="segmentation", attrs={"model": model_name})
    crs = image.rio.crs
    if crs is not None:
        out = out.rio.write_crs(crs)
    if crs is not None or {"x", "y"} <= set(image.coords):
        out = out.rio.write_transform(image.rio.transform())
    return out


def write_zarr(array: xr.DataArray, store: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Compute ``array`` into a Zarr store that rioxarray reads back georeferenced; completely or not at all.

    A local path is written to a temporary store beside it and renamed into place (an existing store is only
    replaced with ``overwrite=True``); a URL (``s3://…``) is written in place. Dask's irregular output chunks are
    made regular (the largest block along each axis) since Zarr needs regular chunks. Read it back with
    ``xr.open_zarr(store, decode_coords="all")[array.name]``.
    """
    target = os.fspath(store)
    named = array if array.name is not None else array.rename("segmentation")
    if named.chunks is not None:
        named = named.chunk({dim: max(sizes) for dim, sizes in zip(named.dims, named.chunks)})
    if "://" in target:
        return _write(named, target, "w" if overwrite else "w-", target)
    path = Path(target)
    if path.exists() and not overwrite:
        raise InvalidInputError("store", target, "already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        _write(named, temporary, "w", target)
        _replace_dir(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


def _write(array: xr.DataArray, store: str, mode: str, target: str) -> str:
    try:
        with warnings.catch_warnings():  # zarr 3 warns that consolidated metadata is an extension; xarray reads it
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            array.to_dataset().to_zarr(store, mode=mode)
    except Exception as error:
        raise SinkError(f"could not write the Zarr store {target}: {error}") from error
    return store


def _replace_dir(source: str, target: Path) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` is moved aside first and removed after."""
    if not target.exists():
        os.replace(source, target)
        return
    aside = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent)
    os.rmdir(aside)
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except OSError:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
