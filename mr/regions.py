"""What one region task does, and how seam features are settled: numpy only, no dask, no I/O of its own.

A region block (bands, y, x) holds the overlap its last tiles reach into; it arrives as a numpy array or as a
`mr.strips.RegionPixels` whose rows are read as its tiles reach them. Its tiles are views of the block, batched to
the model. Each detection is kept only by the tile whose core holds its centre; boxes that reach across a tile cut
are de-duplicated inside the block. Boxes that reach across a *region* cut cannot be settled here: they are
returned as *pending* and settled by the seam tree (`merge_pending`) once every region they touch is in one node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from mr.detections import Detections
from mr.errors import ModelError
from mr.merge import DedupConfig, nms, soft_nms
from mr.metrics import Metrics, Operation, measuring
from mr.models.base import Model, TileFailure
from mr.strips import RegionPixels
from mr.tiling import TileGrid


@dataclass(frozen=True)
class RegionSettings:
    """Options a region task needs, resolved once on the client."""

    batch_size: int = 8
    """Tiles per model call."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """How duplicates from overlapping tiles are resolved."""
    seam_margin: float = 2.0
    """Pixels by which a box may miss a cut and still be compared across it (detectors jitter at tile edges)."""


@dataclass(frozen=True)
class RegionResult:
    """The outcome of one region: detections settled here, detections waiting for a neighbour, counters."""

    settled: Detections
    pending: Detections
    tiles: int
    model_seconds: float
    failed_tiles: tuple = ()
    """One dict per tile the model could not process: tile id, its bounds (row, col), (width, height), reason."""
    metrics: Metrics = field(default_factory=Metrics, compare=False)
    """What the region's work measured (not checkpointed: a region loaded from its checkpoint did no work)."""


@dataclass(frozen=True)
class RegionTask:
    """Where a region lies in the grid; small enough to travel inside every task."""

    ry: int
    rx: int
    tile_mask: np.ndarray | None = None
    """bool (tiles in region y, tiles in region x): which tiles to run (a region of interest skips some)."""


def region_tiles(grid: TileGrid, task: RegionTask) -> list[tuple[int, int]]:
    """(iy, ix) of the tiles this region runs, in row-major order."""
    ys, xs = grid.y.tiles_of_region(task.ry), grid.x.tiles_of_region(task.rx)
    chosen = []
    for a, iy in enumerate(ys):
        for b, ix in enumerate(xs):
            if task.tile_mask is None or task.tile_mask[a, b]:
                chosen.append((iy, ix))
    return chosen


def tile_batches(grid: TileGrid, task: RegionTask, batch_size: int) -> list[tuple[int, list[int]]]:
    """(iy, [ix, …]): runs of neighbouring, same-shaped tiles in one tile row, at most ``batch_size`` long.

    Such a run is a strided view of the block, so a batch reaches the model without copying pixels.
    """
    batches: list[tuple[int, list[int]]] = []
    for iy, ix in region_tiles(grid, task):
        if batches:
            row, run = batches[-1]
            same_shape = (
                grid.x.tile_ends[ix] - grid.x.tile_starts[ix] == grid.x.tile_ends[run[0]] - grid.x.tile_starts[run[0]]
            )
            if row == iy and ix == run[-1] + 1 and same_shape and len(run) < batch_size:
                run.append(ix)
                continue
        batches.append((iy, [ix]))
    return batches


def batch_view(block: np.ndarray, y0: int, x0: int, height: int, width: int, count: int, stride: int) -> np.ndarray:
    """``count`` tiles of ``height`` × ``width`` starting at (y0, x0), ``stride`` apart along x: a read-only view."""
    span = block[:, y0 : y0 + height, x0 : x0 + (count - 1) * stride + width]
    s_band, s_row, s_col = span.strides
    return np.lib.stride_tricks.as_strided(
        span,
        shape=(count, span.shape[0], height, width),
        strides=(stride * s_col, s_band, s_row, s_col),
        writeable=False,
    )


def failed_tile(grid: TileGrid, iy: int, ix: int, reason: str) -> dict:
    """A failed tile as the job record keeps it (OversightML's bounds: (row, col), (width, height))."""
    x0, x1 = int(grid.x_offset + grid.x.tile_starts[ix]), int(grid.x_offset + grid.x.tile_ends[ix])
    y0, y1 = int(grid.y_offset + grid.y.tile_starts[iy]), int(grid.y_offset + grid.y.tile_ends[iy])
    return {"tile_id": int(grid.tile_id(iy, ix)), "bounds": [[y0, x0], [x1 - x0, y1 - y0]], "reason": reason}


def run_tiles(
    block: RegionPixels | np.ndarray,
    grid: TileGrid,
    task: RegionTask,
    model: Model,
    batch_size: int,
    metrics: Metrics | None = None,
    on_submitted: Callable[[], object] | None = None,
) -> tuple[Detections, list[dict]]:
    """Run the model over the region's tiles (batched views of the block, whose rows are read as the tiles reach
    them): image-pixel detections, failed tiles.

    A model that can ``submit`` a batch without waiting for it (endpoint adapters) is handed each batch as soon as
    its rows are read, so its first calls go out while the rest of the region is read, and its calls stay in flight
    from one batch to the next; ``on_submitted()`` is called once every batch is handed over and only waiting is
    left. For any other model the block is read whole first.

    Each batch is measured as TileProcessing (and ModelInvocation, unless the model records its own calls, as
    endpoint adapters do with their retries and throttles), one sample per tile: the batch's time since the one
    before it was done, reading excluded.
    """
    pixels = RegionPixels.of(block)
    metrics = metrics if metrics is not None else Metrics()
    own_calls = bool(getattr(model, "records_invocations", False))
    batches = tile_batches(grid, task, batch_size)
    first_row = grid.y.tile_starts[grid.y.tiles_of_region(task.ry)[0]]

    def view(iy: int, run: list[int]) -> np.ndarray:
        return _batch_of(pixels.rows(int(grid.y.tile_ends[iy] - first_row)), grid, task, iy, run)

    found: list[Detections] = []
    failed: list[dict] = []
    queued: list[tuple[np.ndarray, Any]] = []
    started, read_before = time.perf_counter(), pixels.seconds
    try:
        if callable(getattr(model, "submit", None)):
            with measuring(metrics):
                for iy, run in batches:
                    tiles = view(iy, run)
                    queued.append((tiles, _call_model(model, tiles, partial(model.submit, tiles))))
            if on_submitted is not None:
                on_submitted()
        else:  # a model that computes gains nothing from strips (nothing to overlap): one read, the cheapest
            pixels()
        for i, (iy, run) in enumerate(batches):
            tiles, call = (queued[i][0], queued[i][1].result) if queued else (view(iy, run), None)
            started, read_before = started + pixels.seconds - read_before, pixels.seconds  # reading is not the model's
            with measuring(metrics):
                tables = list(_call_model(model, tiles, call))
            called = time.perf_counter()
            if len(tables) != len(run):
                raise ModelError(f"model {model.name!r} returned {len(tables)} tables for {len(run)} tiles")
            failures = 0
            for ix, table in zip(run, tables):
                if isinstance(table, TileFailure):
                    failed.append(failed_tile(grid, iy, ix, table.reason))
                    failures += 1
                    continue
                dx = grid.x_offset + grid.x.tile_starts[ix]
                dy = grid.y_offset + grid.y.tile_starts[iy]
                found.append(table.shifted(float(dx), float(dy), int(grid.tile_id(iy, ix))))
            n, per_tile = len(run), (time.perf_counter() - started) / len(run)
            if not own_calls:
                metrics.add(Operation.MODEL_INVOCATION, [(called - started) / n] * n, invocations=n,
                            errors=failures, model_name=model.name)
            metrics.add(Operation.TILE_PROCESSING, [per_tile] * n, invocations=n, errors=failures,
                        model_name=model.name)
            started = time.perf_counter()
    finally:
        for _, pending in queued:
            pending.cancel()  # after a failure, the calls not yet begun are dropped (a no-op once all are done)
    return Detections.concat(found), failed


def _batch_of(block: np.ndarray, grid: TileGrid, task: RegionTask, iy: int, run: list[int]) -> np.ndarray:
    """The tiles (iy, run) of the region as a strided view of its block."""
    x_origin = grid.x.tile_starts[grid.x.tiles_of_region(task.rx)[0]]
    y_origin = grid.y.tile_starts[grid.y.tiles_of_region(task.ry)[0]]
    height = int(grid.y.tile_ends[iy] - grid.y.tile_starts[iy])
    width = int(grid.x.tile_ends[run[0]] - grid.x.tile_starts[run[0]])
    y0 = int(grid.y.tile_starts[iy] - y_origin)
    x0 = int(grid.x.tile_starts[run[0]] - x_origin)
    return batch_view(block, y0, x0, height, width, len(run), grid.x.stride)


def _call_model(model: Model, tiles: np.ndarray, call: Callable[[], Any] | None = None) -> Any:
    """``call()``, by default the model on ``tiles``; any failure but a ModelError becomes one naming the model."""
    try:
        return call() if call is not None else model(tiles)
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(f"model {model.name!r} failed on a batch of {len(tiles)} tiles: {error}") from error


def keep_owned(found: Detections, grid: TileGrid) -> Detections:
    """Rows whose centre lies in the core of the tile that found them."""
    if not len(found):
        return found
    iy, ix = grid.owner_tiles(found.centers)
    return found.take(grid.tile_id(iy, ix) == found.tile_ids)


def dedup_settling(table: Detections, settles: np.ndarray, config: DedupConfig) -> Detections:
    """De-duplicate ``table``; rows that do not settle yet keep their score for the node that settles them.

    Suppression by NMS is final wherever it happens. Soft-NMS lowers scores only of rows that settle here, so a
    pending row is rescored once, at the node that finally holds all its neighbours.
    """
    if config.method == "none" or len(table) < 2:
        return table
    groups = table.class_ids if config.class_aware else None
    if config.method == "nms":
        keep = nms(table.boxes, table.scores, threshold=config.threshold, metric=config.metric, groups=groups)
        return table.take(keep)
    keep, scores = soft_nms(
        table.boxes,
        table.scores,
        threshold=config.threshold,
        sigma=config.sigma,
        skip_box_threshold=config.skip_box_threshold,
        metric=config.metric,
        groups=groups,
    )
    new_scores = table.scores.copy()
    new_scores[keep] = scores
    kept = np.zeros(len(table), dtype=bool)
    kept[keep] = True
    kept |= ~settles
    new_scores[~settles] = table.scores[~settles]
    return table.with_scores(new_scores).take(kept)


def split_settled(
    table: Detections, grid: TileGrid, group: tuple[int, int, int, int], margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Masks (settles, pending) for rows whose reach lies inside the region group (ry0, ry1, rx0, rx1) inclusive."""
    ry0, ry1, rx0, rx1 = grid.crossed_regions(table.boxes, margin)
    settles = (ry0 >= group[0]) & (ry1 <= group[1]) & (rx0 >= group[2]) & (rx1 <= group[3])
    return settles, ~settles


def process_region(
    block: RegionPixels | np.ndarray,
    grid: TileGrid,
    task: RegionTask,
    model: Model,
    settings: RegionSettings,
    roi: object | None = None,
    metrics: Metrics | None = None,
    on_submitted: Callable[[], object] | None = None,
) -> RegionResult:
    """The whole work of one region task: tiles → model → owned detections → seams settled or pending.

    ``model_seconds`` excludes reading the block; ``on_submitted`` is as in :func:`run_tiles`."""
    pixels = RegionPixels.of(block)
    metrics = metrics if metrics is not None else Metrics()
    started, read_before = time.perf_counter(), pixels.seconds
    found, failed = run_tiles(pixels, grid, task, model, settings.batch_size, metrics, on_submitted)
    seconds = time.perf_counter() - started - (pixels.seconds - read_before)
    with metrics.timed(Operation.FEATURE_REFINEMENT):
        found = keep_owned(found, grid)
        if roi is not None and len(found):
            found = found.take(_touches(found.boxes, roi))
    with metrics.timed(Operation.FEATURE_SELECTION):
        near = grid.crosses_tile_cut(found.boxes, settings.seam_margin)
        interior = found.take(~near)
        seam = found.take(near)
        group = (task.ry, task.ry, task.rx, task.rx)
        settles, pending = split_settled(seam, grid, group, settings.seam_margin)
        seam = dedup_settling(seam, settles, settings.dedup)
        settles, pending = split_settled(seam, grid, group, settings.seam_margin)
    return RegionResult(
        Detections.concat([interior, seam.take(settles)]),
        seam.take(pending),
        len(region_tiles(grid, task)),
        seconds,
        tuple(failed),
        metrics,
    )


def merge_pending(
    parts: list[Detections], grid: TileGrid, group: tuple[int, int, int, int], settings: RegionSettings
) -> tuple[Detections, Detections, Metrics]:
    """One node of the seam tree: de-duplicate what neighbouring regions left pending, settle what now can.

    Returns (settled, pending, metrics): the merge is measured as FeatureSelection.
    """
    metrics = Metrics()
    with metrics.timed(Operation.FEATURE_SELECTION):
        table = Detections.concat(parts)
        settles, _ = split_settled(table, grid, group, settings.seam_margin)
        table = dedup_settling(table, settles, settings.dedup)
        settles, pending = split_settled(table, grid, group, settings.seam_margin)
    return table.take(settles), table.take(pending), metrics


def _touches(boxes: np.ndarray, roi_pixels: object) -> np.ndarray:
    """True where a box intersects the region of interest (a shapely polygon in full-image pixels)."""
    import shapely

    return shapely.intersects(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]), roi_pixels)
