"""What the tasks of a detection graph run: one region (read, infer, checkpoint, geolocate), then the seam nodes.

Each task leaves one `Part`: the features it settled, geolocated (what the caller gathers), and those still
pending (what the next seam node takes). One task per region and per node keeps the graph small: each extra task
costs a scheduler round trip on a worker between region tasks and at the end of a job.

A region task over a file reads its window strip by strip as its tiles reach the rows (`mr.strips`). With an
endpoint model it steps out of the worker's thread pool once every tile is handed over (`aside_when_submitted`),
so the worker reads the next region while the endpoint answers; the endpoint's bounded queue of waiting calls keeps
that read-ahead to a few tile rows.

Kept apart from :mod:`mr.graph` (which builds graphs with dask.array) so a worker imports only this and the numpy
modules it uses: a fresh worker is ready in a third of the time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mr.detections import Detections
from mr.features import FeatureTable, geolocate
from mr.geo import Georeference
from mr.logs import log_context
from mr.metrics import Metrics, Operation
from mr.models.base import Model
from mr.regions import RegionResult, RegionSettings, RegionTask, merge_pending, process_region
from mr.strips import RegionPixels
from mr.tiling import TileGrid

log = logging.getLogger(__name__)


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
    georef: Georeference | None = None
    """Where settled features are placed on the Earth (None: they keep pixel coordinates)."""

    def task(self, ry: int, rx: int) -> RegionTask:
        mask = None
        if self.tile_mask is not None:
            ys, xs = self.grid.y.tiles_of_region(ry), self.grid.x.tiles_of_region(rx)
            mask = self.tile_mask[ys.start : ys.stop, xs.start : xs.stop]
        return RegionTask(ry, rx, mask)


@dataclass(frozen=True)
class Part:
    """What a region task or a seam node leaves: the features it settled, geolocated, and those still pending."""

    settled: FeatureTable
    pending: Detections


def part_of(value) -> Part:
    """The `Part` of a task's value: region tasks leave theirs boxed in a 1×1 object block."""
    return value[0, 0] if isinstance(value, np.ndarray) else value


def settled_table(value) -> FeatureTable:
    """The settled, geolocated features of a task's value (what callers gather)."""
    return part_of(value).settled


def _boxed(result: RegionResult, georef: Georeference | None) -> np.ndarray:
    """The region's part (settled rows geolocated, with the region's metrics and failed tiles) in a 1×1 block."""
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = Part(_located(result.settled, georef, result.metrics, result.failed_tiles), result.pending)
    return out


def aside_when_submitted(model: Model) -> Callable[[], None] | None:
    """For a region task on a Dask worker whose model only waits on calls (an endpoint: it has ``submit``), what
    takes the task out of the worker's thread pool once all its tiles are handed over: the worker then reads the
    next region while these calls finish, so the endpoint never waits for a region to be read. How far it reads
    ahead is bounded by the endpoint's queue of waiting calls (``mr.models.inflight``). None elsewhere (a model
    that computes, a thread outside a worker's pool, no distributed)."""
    if not callable(getattr(model, "submit", None)):
        return None
    try:
        from distributed import get_worker, secede
        from distributed.threadpoolexecutor import thread_state

        get_worker()
    except (ImportError, ValueError):
        return None
    return secede if getattr(thread_state, "proceed", False) else None


def _skipped(task: RegionTask) -> bool:
    return task.tile_mask is not None and not task.tile_mask.any()


def _run_region(pixels: RegionPixels, job: RegionJob, ry: int, rx: int) -> np.ndarray:
    """Load the region from its checkpoint, or run its tiles as their pixels are read, and checkpoint it (each
    step measured)."""
    with log_context(job_id=job.job_id, image_id=job.image_id, region=f"r{ry}-c{rx}"):
        if job.checkpoint is not None:
            stored = job.checkpoint.load(ry, rx)
            if stored is not None:
                log.info("region r%d-c%d: loaded from its checkpoint, not recomputed", ry, rx)
                return _boxed(stored, job.georef)
        started = time.perf_counter()
        metrics = Metrics()
        task = job.task(ry, rx)
        model_name, input_format = job.model.name, job.input_format
        if _skipped(task):
            result = RegionResult(Detections.empty(), Detections.empty(), 0, 0.0)
        else:
            result = process_region(pixels, job.grid, task, job.model, job.settings, job.roi, metrics,
                                    aside_when_submitted(job.model))
            metrics.add(Operation.TILE_GENERATION, pixels.seconds, invocations=result.tiles,
                        input_format=input_format)
        if job.checkpoint is not None:
            with metrics.timed(Operation.FEATURE_STORAGE):
                job.checkpoint.save(ry, rx, result)
        seconds = time.perf_counter() - started
        metrics.add(Operation.REGION_PROCESSING, seconds, model_name=model_name, input_format=input_format)
        log.info(
            "region r%d-c%d: %d tiles, %d features settled, %d pending, %d failed tiles in %.2f s",
            ry, rx, result.tiles, len(result.settled), len(result.pending), len(result.failed_tiles), seconds,
        )
        return _boxed(dataclasses.replace(result, metrics=metrics), job.georef)


def _read_then(kernel, reader, grid: TileGrid, job, ry: int, rx: int):
    """One region task over a file: the kernel reads the region's window (overlap included) as it needs its rows."""
    (y0, y1), (x0, x1) = block_span(grid.y, grid.y_offset, ry), block_span(grid.x, grid.x_offset, rx)

    def read(start: int, stop: int, out: np.ndarray) -> None:
        reader.read_window((y0 + start, y0 + stop), (x0, x1), out=out)

    array = np.empty((len(reader.bands), y1 - y0, x1 - x0), dtype=reader.dtype)  # pages are taken as rows are read
    return kernel(RegionPixels(array, read, origin=y0, step=reader.block_height), job, ry, rx)


def _block_then(block: np.ndarray, kernel, job, block_info: dict | None = None):
    """map_blocks wrapper over overlapped blocks: the region's place comes from the block's location."""
    _, ry, rx = block_info[0]["chunk-location"]
    return kernel(RegionPixels.ready(block), job, ry, rx)


def _located(settled: Detections, georef: Georeference | None, metrics: Metrics, failed: tuple = ()) -> FeatureTable:
    """Settled rows geolocated (timed into ``metrics`` as FeatureRefinement), carrying the metrics of the work that
    found them."""
    with metrics.timed(Operation.FEATURE_REFINEMENT):
        table = geolocate(settled, georef)
    return dataclasses.replace(table, failed_tiles=failed, metrics=metrics)


def merge_seams(children: list, grid: TileGrid, group: tuple[int, int, int, int], settings: RegionSettings,
                georef: Georeference | None) -> Part:
    """One node of the seam tree over its children's pending features: what it settles, geolocated, and the rest."""
    settled, pending, metrics = merge_pending([part_of(child).pending for child in children], grid, group, settings)
    return Part(_located(settled, georef, metrics), pending)


def block_span(axis, offset: int, index: int) -> tuple[int, int]:
    """(start, stop) in full-image pixels of one region block along an axis, overlap included."""
    bounds = np.concatenate([[0], np.cumsum(axis.region_chunks)])
    return int(offset + bounds[index]), int(offset + min(bounds[index + 1] + axis.overlap, axis.covered))
