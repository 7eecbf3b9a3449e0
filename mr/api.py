"""The public entry point every caller uses: ``detect(image, ...)`` returns a lazy `DetectionResult`."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import xarray as xr
from dask.base import tokenize
from dask.threaded import get as threaded_get

from mr.errors import InvalidInputError
from mr.features import FeatureTable, OutputMetadata, to_geodataframe
from mr.geo import Georeference
from mr.graph import DetectionGraph, RegionJob, build_detection_graph, region_results
from mr.imagery import open_image
from mr.models.base import Model
from mr.models.registry import resolve_model
from mr.roi import RegionOfInterest, resolve_roi
from mr.settings import resolve_region_settings, resolve_tiling
from mr.tasks import settled_table
from mr.tiling import TileGrid, tile_grid


@dataclass(frozen=True)
class DetectionPlan:
    """What a detection run will do, known before any pixel is read."""

    grid: TileGrid
    tile_count: int
    image_shape: tuple[int, int, int]
    model: Model
    roi: RegionOfInterest | None = None
    source: str = "<array>"

    @property
    def megapixels(self) -> float:
        return self.grid.x.covered * self.grid.y.covered / 1e6


def _active_client():
    """The current ``distributed.Client``, if there is one."""
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def _no_optimization(dsk, keys, **kwargs):
    """The graph is built final: nothing to cull or fuse."""
    return dsk


@dataclass(frozen=True)
class DetectionResult:
    """Lazy features of one image: a dask collection; ``compute()`` gives a GeoDataFrame in WGS84."""

    built: DetectionGraph
    plan: DetectionPlan
    georeference: Georeference | None
    metadata: OutputMetadata = field(default_factory=OutputMetadata)

    def __dask_graph__(self):
        return self.built.graph

    def __dask_keys__(self):
        return list(self.built.part_keys)

    def __dask_layers__(self):
        return tuple(self.built.graph.layers)

    def __dask_tokenize__(self):
        return self.built.name

    def __dask_postcompute__(self):
        return _to_frame, (self.metadata,)

    def __dask_postpersist__(self):
        return _rebuild, (self,)

    __dask_scheduler__ = staticmethod(threaded_get)
    __dask_optimize__ = staticmethod(_no_optimization)

    def compute(self, progress: bool = False, **kwargs: Any):
        """The features as a GeoDataFrame (WGS84 geometry; pixel geometry in ``image_geometry``).

        ``progress=True`` shows Dask's own progress bar: the distributed one (a widget in Jupyter) when a
        ``distributed.Client`` is active, else ``dask.diagnostics.ProgressBar``.
        """
        import dask

        if not progress:
            return dask.compute(self, **kwargs)[0]
        client = _active_client() if "scheduler" not in kwargs else None
        if client is not None:
            from distributed import progress as show_progress

            future = client.compute(self)
            show_progress(future)
            return future.result()
        from dask.diagnostics import ProgressBar

        with ProgressBar():
            return dask.compute(self, **kwargs)[0]

    def compute_table(self, **kwargs: Any) -> FeatureTable:
        """The features as a columnar `FeatureTable` (what sinks write from)."""
        from mr.run import compute_table

        return compute_table(self, _active_client() if "scheduler" not in kwargs else None, **kwargs)

    to_geodataframe = compute

    def __repr__(self) -> str:
        plan = self.plan
        bands, height, width = plan.image_shape
        return (
            f"<DetectionResult {width}×{height}×{bands} image, model {plan.model.name!r}: "
            f"{plan.tile_count} tiles of {plan.grid.x.tile}×{plan.grid.y.tile} "
            f"(overlap {plan.grid.x.overlap}×{plan.grid.y.overlap}) in {plan.grid.region_count} regions, "
            f"{len(self.built.graph)} tasks>"
        )


@dataclass(frozen=True)
class _Part:
    """One settled part of a result, as a dask collection (used to compute parts without concatenating)."""

    result: DetectionResult
    key: Any

    def __dask_graph__(self):
        return self.result.built.graph

    def __dask_keys__(self):
        return [self.key]

    def __dask_postcompute__(self):
        return (lambda results: settled_table(results[0])), ()

    def __dask_tokenize__(self):
        return (self.result.built.name, self.key)

    __dask_scheduler__ = staticmethod(threaded_get)
    __dask_optimize__ = staticmethod(_no_optimization)


def _to_frame(parts: list, metadata: OutputMetadata):
    table = FeatureTable.concat([settled_table(part) for part in parts])
    frame = to_geodataframe(table, metadata)
    frame.attrs["failed_tiles"] = list(table.failed_tiles)
    frame.attrs["metrics"] = table.metrics.summary() if table.metrics is not None else {}
    if table.failed_tiles:
        warnings.warn(
            f"{len(table.failed_tiles)} tile(s) failed and their features are missing: see frame.attrs['failed_tiles']",
            stacklevel=2,
        )
    return frame


def _rebuild(graph, result: DetectionResult, rename=None) -> DetectionResult:
    from dask.highlevelgraph import HighLevelGraph

    if not isinstance(graph, HighLevelGraph):
        graph = HighLevelGraph.from_collections(result.built.name, dict(graph), dependencies=())
    built = DetectionGraph(graph, result.built.part_keys, result.built.name, result.built.root)
    return DetectionResult(built, result.plan, result.georeference, result.metadata)


def input_format_of(image: xr.DataArray) -> str:
    """The image's format for metric dimensions (GTIFF, NITF, …); ARRAY for an in-memory array."""
    return str(image.attrs.get("input_format") or "ARRAY")


def as_image(image: "xr.DataArray | str | os.PathLike") -> xr.DataArray:
    """A (band, y, x) DataArray from a DataArray or a URL; a 2-D array gets a band axis."""
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if not isinstance(image, xr.DataArray):
        raise InvalidInputError("image", type(image).__name__, "give an xarray.DataArray or an image URL")
    if image.ndim == 2:
        image = image.expand_dims("band")
    if image.ndim != 3 or image.dims[1:] != ("y", "x"):
        raise InvalidInputError("image", image.dims, "dims must be (band, y, x) or (y, x)")
    return image


def detect(
    image: "xr.DataArray | str | os.PathLike",
    model: Any = None,
    *,
    tile_size: Any = None,
    overlap: Any = None,
    region_size: Any = None,
    strategy: Any = None,
    roi: Any = None,
    nms: Any = None,
    batch_size: Any = None,
    job_id: str = "",
    feature_properties: dict | None = None,
    checkpoint: Any = None,
) -> DetectionResult:
    """Plan and build the detection graph for an image; nothing is read or computed until asked.

    ``model``: a registered name ("builtin"), a `Model`, or any callable on tiles. ``roi``: a WKT polygon (or
    shapely geometry) in lon/lat that limits the work to the tiles it touches; features outside it are dropped.
    ``nms``: "nms", "soft-nms", "none", a mapping of `DedupConfig` fields or a `DedupConfig`.
    ``checkpoint``: a `mr.checkpoint.RegionCheckpoint`; finished regions are kept there and not recomputed.
    """
    image = as_image(image)
    bands, height, width = (int(n) for n in image.shape)
    georef = image.attrs.get("georeference")
    if georef is None or georef.kind is None:
        warnings.warn(
            f"image {image.attrs.get('source', '<array>')} has no georeference: features keep their pixel "
            "geometry and their world geometry is null",
            stacklevel=2,
        )
    tiling = resolve_tiling(tile_size, overlap, region_size, strategy)
    settings = resolve_region_settings(nms, batch_size)
    resolved_model = resolve_model(model, nodata=image.attrs.get("nodata"))
    region = resolve_roi(roi, georef, width, height)
    grid = tile_grid(
        width, height, tiling.tile_size, tiling.overlap, tiling.region_size, tiling.strategy,
        window=region.window if region else None,
    )
    mask = region.tile_mask(grid) if region else None
    tile_count = int(mask.sum()) if mask is not None else grid.tile_count
    job = RegionJob(
        grid, resolved_model, settings, mask, region.pixels if region else None, checkpoint,
        job_id=job_id, image_id=str(image.attrs.get("image_id", "")), input_format=input_format_of(image),
        georef=georef,
    )
    results = region_results(image, job)
    built = build_detection_graph(results, grid, settings, georef)
    metadata = OutputMetadata(
        job_id=job_id,
        image_id=str(image.attrs.get("image_id", tokenize(results.name))),
        model_name=resolved_model.name,
        feature_properties=dict(feature_properties or {}),
        source_metadata=image.attrs.get("source_metadata") or None,
    )
    plan = DetectionPlan(
        grid, tile_count, (bands, height, width), resolved_model, region, str(image.attrs.get("source", "<array>"))
    )
    return DetectionResult(built, plan, georef, metadata)
