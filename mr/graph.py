"""Graph construction: one read-and-infer task per region, then a tree that settles seam features.

Task names say what each step is on the dashboard: ``read-infer-region`` (one task reads a region's window, runs
its tiles and geolocates what it settles, so pixels never travel between workers) and ``merge-seams`` (one node of
the tree). Every task leaves a `mr.tasks.Part`; the parts' settled tables together are the result. The tree's
root is a task too (so ``dask.compute`` of the graph is the whole result), but a distributed run merges it where
the parts are collected instead (`DetectionGraph.root`, `mr.run`).

This is the only module that builds dask graphs. It reads no pixels and computes nothing; task keys are
deterministic (``tokenize`` of the inputs), so the same request always gives the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from mr.geo import Georeference
from mr.regions import RegionSettings
from mr.tasks import (  # noqa: F401  (RegionJob and block_span are part of this module's interface)
    RegionJob,
    _block_then,
    _read_then,
    _run_region,
    block_span,
    merge_seams,
)
from mr.tiling import TileGrid


@dataclass(frozen=True)
class DetectionGraph:
    """A built graph: its layers and the keys whose values are the settled, geolocated feature tables."""

    graph: HighLevelGraph
    part_keys: tuple
    name: str
    root: tuple | None = None
    """The seam tree's root node as (its key, its children's keys, merge_seams' other arguments); None for a
    single region. `mr.run` merges it where the parts are collected instead of on a worker: its inputs are the
    last parts to arrive and its output goes straight to the caller, which saves a dispatch to a worker, a transfer
    between workers and a fetch at the end of every job (~10 ms; 3% of a half-second job)."""


def overlap_depth(grid: TileGrid) -> dict[int, tuple[int, int]]:
    """Each block needs ``overlap`` pixels past its far edges and nothing before: the asymmetric depth."""
    return {0: (0, 0), 1: (0, grid.y.overlap), 2: (0, grid.x.overlap)}


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
        with dask.annotate(priority=_larger_first(grid)):
            graph = HighLevelGraph.from_collections(name, layer, dependencies=())
        return da.Array(graph, name, chunks, meta=meta)
    blocks = overlapped_blocks(image, grid)
    return da.map_blocks(
        _block_then, blocks, chunks=chunks, meta=meta, name=f"{prefix}-{tokenize(blocks.name, job)}",
        kernel=kernel, job=job, **({"drop_axis": 0} if drop_band else {}),
    )


def _larger_first(grid: TileGrid):
    """Scheduler priority of a region task: its tile count, so big regions start first and the small ones at the
    image's right and bottom edges fill the end (less time with one worker busy and the others idle)."""
    ys = [len(grid.y.tiles_of_region(r)) for r in range(grid.y.region_count)]
    xs = [len(grid.x.tiles_of_region(r)) for r in range(grid.x.region_count)]
    return lambda key: ys[key[-2]] * xs[key[-1]]


def region_results(image, job: RegionJob) -> da.Array:
    """One detection task per region: an object array (regions y, regions x) of `RegionResult`."""
    grid = job.grid
    chunks = ((1,) * grid.y.region_count, (1,) * grid.x.region_count)
    meta = np.empty((0, 0), dtype=object)
    return region_tasks(
        image, grid, _run_region, job, prefix="read-infer-region", chunks=chunks, meta=meta, drop_band=True
    )


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
    """Parts: each region task (its settled features, geolocated), then each node of the seam tree over what the
    regions left pending."""
    token = tokenize(results.name, georef, split_every)
    ny, nx = results.numblocks
    parts: list = [(results.name, ry, rx) for ry in range(ny) for rx in range(nx)]
    layers: dict = {}
    deps: dict = {}
    below, root = results.name, None
    for level, nodes in seam_tree_groups((ny, nx), split_every):
        merge = f"merge-seams-{level}-{token}"
        layers[merge] = {}
        for (py, px), children, group in nodes:
            child_keys = [(below, cy, cx) for cy, cx in children]
            layers[merge][(merge, py, px)] = (merge_seams, child_keys, grid, group, settings, georef)
            parts.append((merge, py, px))
            root = ((merge, py, px), tuple(child_keys), (grid, group, settings, georef))
        deps[merge] = {below}
        below = merge
    graph = HighLevelGraph(
        {**results.__dask_graph__().layers, **layers},
        {**results.__dask_graph__().dependencies, **deps},
    )
    return DetectionGraph(graph, tuple(parts), f"detect-{token}", root)


def overlapped_blocks(image, grid: TileGrid) -> da.Array:
    """The image cropped to the tiled window, chunked by regions, each block given the overlap it needs."""
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=-1)
    y0, x0 = grid.y_offset, grid.x_offset
    data = data[:, y0 : y0 + grid.y.covered, x0 : x0 + grid.x.covered]
    data = data.rechunk(((data.shape[0],), grid.y.region_chunks, grid.x.region_chunks))
    return da.overlap.overlap(data, depth=overlap_depth(grid), boundary="none")
