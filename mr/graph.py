"""Graph construction: one read-and-infer task per region, then a tree that settles seam features.

Task names say what each step is on the dashboard: ``read-infer-region`` (one task reads a region's window and
runs its tiles, so pixels never travel between workers), ``geolocate-region``, ``pending-region``,
``merge-seams``, ``geolocate-seams`` and ``pending-seams``.

This is the only module that builds dask graphs. It reads no pixels and computes nothing; task keys are
deterministic (``tokenize`` of the inputs), so the same request always gives the same graph.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from mr.detections import Detections
from mr.features import FeatureTable, geolocate
from mr.geo import Georeference
from mr.logs import log_context
from mr.metrics import Metrics, Operation
from mr.models.base import Model
from mr.regions import RegionResult, RegionSettings, RegionTask, merge_pending, process_region, region_tiles
from mr.tiling import TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectionGraph:
    """A built graph: its layers and the keys whose values are the settled, geolocated feature tables."""

    graph: HighLevelGraph
    part_keys: tuple
    name: str


def overlap_depth(grid: TileGrid) -> dict[int, tuple[int, int]]:
    """Each block needs ``overlap`` pixels past its far edges and nothing before: the asymmetric depth."""
    return {0: (0, 0), 1: (0, grid.y.overlap), 2: (0, grid.x.overlap)}


@dataclass(frozen=True)
class RegionJob:
    """Everything a region task needs besides its pixels; small, so it travels inside every task."""

    grid: TileGrid
    model: Model
    settings: RegionSettings
    tile_mask: np.ndarray | None = None
    """bool (tiles y, tiles x) over the whole grid: tiles to run (a region of interest skips some)."""
    roi: object | None = None
    """The region of interest in full-image pixels, or None."""
    checkpoint: object | None = None
    """A `mr.checkpoint.RegionCheckpoint`: finished regions are saved there and, when present, not recomputed."""
    job_id: str = ""
    image_id: str = ""
    input_format: str = ""
    """Names of the work, for log lines and metric dimensions."""

    def task(self, ry: int, rx: int) -> RegionTask:
        mask = None
        if self.tile_mask is not None:
            ys, xs = self.grid.y.tiles_of_region(ry), self.grid.x.tiles_of_region(rx)
            mask = self.tile_mask[ys.start : ys.stop, xs.start : xs.stop]
        return RegionTask(ry, rx, mask)


def _boxed(result: RegionResult) -> np.ndarray:
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = result
    return out


def _skipped(task: RegionTask) -> bool:
    return task.tile_mask is not None and not task.tile_mask.any()


def _run_region(read, job: RegionJob, ry: int, rx: int) -> np.ndarray:
    """Load the region from its checkpoint, or read its pixels, run it and checkpoint it (each step measured)."""
    with log_context(job_id=job.job_id, image_id=job.image_id, region=f"r{ry}-c{rx}"):
        if job.checkpoint is not None:
            stored = job.checkpoint.load(ry, rx)
            if stored is not None:
                log.info("region r%d-c%d: loaded from its checkpoint, not recomputed", ry, rx)
                return _boxed(stored)
        started = time.perf_counter()
        metrics = Metrics()
        task = job.task(ry, rx)
        model_name, input_format = job.model.name, job.input_format
        if _skipped(task):
            result = RegionResult(Detections.empty(), Detections.empty(), 0, 0.0)
        else:
            tiles = len(region_tiles(job.grid, task))
            with metrics.timed(Operation.TILE_GENERATION, invocations=tiles, input_format=input_format):
                block = read()
            result = process_region(block, job.grid, task, job.model, job.settings, job.roi, metrics)
            del block
        if job.checkpoint is not None:
            with metrics.timed(Operation.FEATURE_STORAGE):
                job.checkpoint.save(ry, rx, result)
        seconds = time.perf_counter() - started
        metrics.add(Operation.REGION_PROCESSING, seconds, model_name=model_name, input_format=input_format)
        log.info(
            "region r%d-c%d: %d tiles, %d features settled, %d pending, %d failed tiles in %.2f s",
            ry, rx, result.tiles, len(result.settled), len(result.pending), len(result.failed_tiles), seconds,
        )
        return _boxed(dataclasses.replace(result, metrics=metrics))


def _read_then(kernel, reader, grid: TileGrid, job, ry: int, rx: int):
    """One region task over a file: the kernel reads the region's window (overlap included) when it needs it."""
    (y0, y1), (x0, x1) = block_span(grid.y, grid.y_offset, ry), block_span(grid.x, grid.x_offset, rx)
    return kernel(lambda: reader[:, y0:y1, x0:x1], job, ry, rx)


def _block_then(block: np.ndarray, kernel, job, block_info: dict | None = None):
    """map_blocks wrapper over overlapped blocks: the region's place comes from the block's location."""
    _, ry, rx = block_info[0]["chunk-location"]
    return kernel(lambda: block, job, ry, rx)


def region_tasks(image, grid: TileGrid, kernel, job, *, prefix: str, chunks: tuple, meta, drop_band: bool = False):
    """One task per region running ``kernel(read, job, ry, rx)``, where ``read()`` gives the region block.

    An untouched `mr.open_image` result is read window by window inside the region tasks themselves: one read
    per region, no pixel block held between tasks or sent between workers. Any other array is cropped, chunked
    by regions and given its overlap by dask (``overlap`` + ``map_blocks``: what ``map_overlap`` does).
    """
    from mr.imagery import image_reader

    reader = image_reader(image)
    if reader is not None:
        name = f"{prefix}-{tokenize(reader, job)}"
        lead = () if drop_band else (0,)
        layer = {
            (name, *lead, ry, rx): (_read_then, kernel, reader, grid, job, ry, rx)
            for ry in range(grid.y.region_count)
            for rx in range(grid.x.region_count)
        }
        graph = HighLevelGraph.from_collections(name, layer, dependencies=())
        return da.Array(graph, name, chunks, meta=meta)
    blocks = overlapped_blocks(image, grid)
    return da.map_blocks(
        _block_then, blocks, chunks=chunks, meta=meta, name=f"{prefix}-{tokenize(blocks.name, job)}",
        kernel=kernel, job=job, **({"drop_axis": 0} if drop_band else {}),
    )


def region_results(image, job: RegionJob) -> da.Array:
    """One detection task per region: an object array (regions y, regions x) of `RegionResult`."""
    grid = job.grid
    chunks = ((1,) * grid.y.region_count, (1,) * grid.x.region_count)
    meta = np.empty((0, 0), dtype=object)
    return region_tasks(
        image, grid, _run_region, job, prefix="read-infer-region", chunks=chunks, meta=meta, drop_band=True
    )


def _located(settled: Detections, georef: Georeference | None, measured: Metrics, failed: tuple = ()) -> FeatureTable:
    """Settled rows geolocated (measured as FeatureRefinement), carrying the metrics of the work that found them."""
    metrics = Metrics().merge(measured)
    with metrics.timed(Operation.FEATURE_REFINEMENT):
        table = geolocate(settled, georef)
    return dataclasses.replace(table, failed_tiles=failed, metrics=metrics)


def _settled(cell: np.ndarray, georef: Georeference | None) -> FeatureTable:
    result = cell[0, 0]
    return _located(result.settled, georef, result.metrics, result.failed_tiles)


def _pending(cell: np.ndarray):
    return cell[0, 0].pending


def _node_settled(node: tuple, georef: Georeference | None) -> FeatureTable:
    return _located(node[0], georef, node[2])


def _node_pending(node: tuple):
    return node[1]


def seam_tree_groups(region_shape: tuple[int, int], split_every: int = 2):
    """Levels of the seam tree: at each level, groups of ``split_every``² neighbouring nodes become one.

    Yields (level, [(node index, child indices, (ry0, ry1, rx0, rx1))]) until one node covers every region.
    """
    ny, nx = region_shape
    size, level = 1, 0
    shape = (ny, nx)
    while shape != (1, 1):
        level += 1
        parent_shape = (-(-shape[0] // split_every), -(-shape[1] // split_every))
        nodes = []
        for py in range(parent_shape[0]):
            for px in range(parent_shape[1]):
                children = [
                    (cy, cx)
                    for cy in range(py * split_every, min((py + 1) * split_every, shape[0]))
                    for cx in range(px * split_every, min((px + 1) * split_every, shape[1]))
                ]
                span = size * split_every
                group = (py * span, min((py + 1) * span, ny) - 1, px * span, min((px + 1) * span, nx) - 1)
                nodes.append(((py, px), children, group))
        yield level, nodes
        shape, size = parent_shape, size * split_every


def build_detection_graph(
    results: da.Array,
    grid: TileGrid,
    settings: RegionSettings,
    georef: Georeference | None,
    split_every: int = 2,
) -> DetectionGraph:
    """Leaves: each region's settled features, geolocated. Nodes: the seam tree over pending features."""
    token = tokenize(results.name, georef, split_every)
    settle_name, pending_name = f"geolocate-region-{token}", f"pending-region-{token}"
    layers: dict = {settle_name: {}, pending_name: {}}
    parts: list = []
    ny, nx = results.numblocks
    for ry in range(ny):
        for rx in range(nx):
            cell = (results.name, ry, rx)
            layers[settle_name][(settle_name, ry, rx)] = (_settled, cell, georef)
            layers[pending_name][(pending_name, ry, rx)] = (_pending, cell)
            parts.append((settle_name, ry, rx))
    below = pending_name
    deps = {settle_name: {results.name}, pending_name: {results.name}}
    for level, nodes in seam_tree_groups((ny, nx), split_every):
        merge, settled, pending = (
            f"{kind}-{level}-{token}" for kind in ("merge-seams", "geolocate-seams", "pending-seams")
        )
        layers[merge], layers[settled], layers[pending] = {}, {}, {}
        for (py, px), children, group in nodes:
            child_keys = [(below, cy, cx) for cy, cx in children]
            layers[merge][(merge, py, px)] = (merge_pending, child_keys, grid, group, settings)
            layers[settled][(settled, py, px)] = (_node_settled, (merge, py, px), georef)
            layers[pending][(pending, py, px)] = (_node_pending, (merge, py, px))
            parts.append((settled, py, px))
        deps[merge], deps[settled], deps[pending] = {below}, {merge}, {merge}
        below = pending
    graph = HighLevelGraph(
        {**results.__dask_graph__().layers, **layers},
        {**results.__dask_graph__().dependencies, **deps},
    )
    return DetectionGraph(graph, tuple(parts), f"detect-{token}")


def overlapped_blocks(image, grid: TileGrid) -> da.Array:
    """The image cropped to the tiled window, chunked by regions, each block given the overlap it needs."""
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=-1)
    y0, x0 = grid.y_offset, grid.x_offset
    data = data[:, y0 : y0 + grid.y.covered, x0 : x0 + grid.x.covered]
    data = data.rechunk(((data.shape[0],), grid.y.region_chunks, grid.x.region_chunks))
    return da.overlap.overlap(data, depth=overlap_depth(grid), boundary="none")


def block_span(axis, offset: int, index: int) -> tuple[int, int]:
    """(start, stop) in full-image pixels of one region block along an axis, overlap included."""
    bounds = np.concatenate([[0], np.cumsum(axis.region_chunks)])
    return int(offset + bounds[index]), int(offset + min(bounds[index + 1] + axis.overlap, axis.covered))
