"""Graph construction: region blocks through ``map_overlap``, then a tree that settles seam features.

This is the only module that builds dask graphs. It reads no pixels and computes nothing; task keys are
deterministic (``tokenize`` of the inputs), so the same request always gives the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from mr.features import FeatureTable, geolocate
from mr.geo import Georeference
from mr.models.base import Model
from mr.regions import RegionResult, RegionSettings, RegionTask, merge_pending, process_region
from mr.tiling import TileGrid


@dataclass(frozen=True)
class DetectionGraph:
    """A built graph: its layers and the keys whose values are the settled, geolocated feature tables."""

    graph: HighLevelGraph
    part_keys: tuple
    name: str


def overlap_depth(grid: TileGrid) -> dict[int, tuple[int, int]]:
    """Each block needs ``overlap`` pixels past its far edges and nothing before: the asymmetric depth."""
    return {0: (0, 0), 1: (0, grid.y.overlap), 2: (0, grid.x.overlap)}


def _region_block(
    block: np.ndarray,
    grid: TileGrid,
    model: Model,
    settings: RegionSettings,
    tile_mask: np.ndarray | None,
    roi: object | None,
    block_info: dict | None = None,
) -> np.ndarray:
    """map_overlap kernel: wraps `process_region` and boxes its result in a 1×1 object array."""
    _, ry, rx = block_info[0]["chunk-location"]
    mask = None
    if tile_mask is not None:
        ys, xs = grid.y.tiles_of_region(ry), grid.x.tiles_of_region(rx)
        mask = tile_mask[ys.start : ys.stop, xs.start : xs.stop]
    out = np.empty((1, 1), dtype=object)
    if mask is not None and not mask.any():
        from mr.detections import Detections

        out[0, 0] = RegionResult(Detections.empty(), Detections.empty(), 0, 0.0)
    else:
        out[0, 0] = process_region(block, grid, RegionTask(ry, rx, mask), model, settings, roi)
    return out


def region_results(
    blocks: da.Array,
    grid: TileGrid,
    model: Model,
    settings: RegionSettings,
    tile_mask: np.ndarray | None = None,
    roi: object | None = None,
) -> da.Array:
    """One task per region over the overlapped blocks: an object array (regions y, regions x) of `RegionResult`."""
    token = tokenize(blocks.name, grid, model, settings, tile_mask, roi)
    return da.map_blocks(
        _region_block,
        blocks,
        drop_axis=0,
        chunks=((1,) * grid.y.region_count, (1,) * grid.x.region_count),
        dtype=object,
        meta=np.empty((0, 0), dtype=object),
        name=f"infer-region-{token}",
        grid=grid,
        model=model,
        settings=settings,
        tile_mask=tile_mask,
        roi=roi,
    )


def _settled(cell: np.ndarray, georef: Georeference | None) -> FeatureTable:
    return geolocate(cell[0, 0].settled, georef)


def _pending(cell: np.ndarray):
    return cell[0, 0].pending


def _merge_node(parts: list, grid: TileGrid, group: tuple[int, int, int, int], settings: RegionSettings):
    return merge_pending(parts, grid, group, settings)


def _node_settled(node: tuple, georef: Georeference | None) -> FeatureTable:
    return geolocate(node[0], georef)


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
    settle_name, pending_name = f"settle-region-{token}", f"pending-region-{token}"
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
        merge, settled, pending = (f"{kind}-{level}-{token}" for kind in ("merge-seams", "settle-seams", "pending-seams"))
        layers[merge], layers[settled], layers[pending] = {}, {}, {}
        for (py, px), children, group in nodes:
            child_keys = [(below, cy, cx) for cy, cx in children]
            layers[merge][(merge, py, px)] = (_merge_node, child_keys, grid, group, settings)
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


def region_blocks(image, grid: TileGrid) -> da.Array:
    """Each region's pixels with the overlap its last tiles reach into: the blocks the region tasks run on.

    An untouched `mr.open_image` result is read window by window straight from the file, one read per region
    (no neighbouring chunk is held in memory or sent between workers for its overlap). Any other array goes
    through dask's own ``overlap`` (what ``map_overlap`` does) after being cropped and chunked by regions.
    """
    from mr.imagery import image_reader

    reader = image_reader(image)
    if reader is not None:
        return _windowed_reads(reader, grid)
    data = image.data if isinstance(image.data, da.Array) else da.from_array(image.data, chunks=-1)
    y0, x0 = grid.y_offset, grid.x_offset
    data = data[:, y0 : y0 + grid.y.covered, x0 : x0 + grid.x.covered]
    data = data.rechunk(((data.shape[0],), grid.y.region_chunks, grid.x.region_chunks))
    return da.overlap.overlap(data, depth=overlap_depth(grid), boundary="none")


def block_spans(axis, offset: int) -> list[tuple[int, int]]:
    """(start, stop) in full-image pixels of every region block along one axis, overlap included."""
    bounds = np.concatenate([[0], np.cumsum(axis.region_chunks)])
    return [
        (int(offset + bounds[i]), int(offset + min(bounds[i + 1] + axis.overlap, axis.covered)))
        for i in range(axis.region_count)
    ]


def _read_window(reader, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    return reader[:, y0:y1, x0:x1]


def _windowed_reads(reader, grid: TileGrid) -> da.Array:
    ys, xs = block_spans(grid.y, grid.y_offset), block_spans(grid.x, grid.x_offset)
    name = f"read-region-{tokenize(reader, ys, xs)}"
    layer = {
        (name, 0, i, j): (_read_window, reader, y0, y1, x0, x1)
        for i, (y0, y1) in enumerate(ys)
        for j, (x0, x1) in enumerate(xs)
    }
    chunks = ((reader.shape[0],), tuple(b - a for a, b in ys), tuple(b - a for a, b in xs))
    graph = HighLevelGraph.from_collections(name, layer, dependencies=())
    return da.Array(graph, name, chunks, meta=np.empty((0, 0, 0), dtype=reader.dtype))
