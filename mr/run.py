"""Compute a detection result on a cluster and write it: the step every non-notebook entry point shares."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mr.api import DetectionResult, _Part
from mr.features import FeatureTable
from mr.output import write_features
from mr.tasks import merge_seams, settled_table


@dataclass(frozen=True)
class RunSummary:
    """What a run did, for the closing paragraph of the CLI and for job records."""

    image: str
    width: int
    height: int
    bands: int
    tiles: int
    regions: int
    features: int
    seconds: float
    output: str | None
    labels: dict

    @property
    def megapixels_per_second(self) -> float:
        return self.width * self.height / 1e6 / max(self.seconds, 1e-9)

    def paragraph(self) -> str:
        found = ", ".join(f"{n} {label}" for label, n in sorted(self.labels.items())) or "nothing"
        where = f" Wrote {self.output}." if self.output else ""
        return (
            f"Processed {self.image} ({self.width}×{self.height}, {self.bands} band(s), "
            f"{self.width * self.height / 1e6:.1f} MP): {self.tiles} tiles in {self.regions} regions, "
            f"{self.features} features ({found}) in {self.seconds:.1f} s, "
            f"{self.megapixels_per_second:.1f} MP/s.{where}"
        )


def cluster_keys(result: DetectionResult) -> list:
    """The part keys a cluster computes: all but the seam tree's root, which `merge_root` merges where the parts
    are collected (see `mr.graph.DetectionGraph.root`)."""
    root = result.built.root
    return [key for key in result.built.part_keys if root is None or key != root[0]]


def submit_parts(result: DetectionResult, client) -> list:
    """Futures of `cluster_keys` on ``client``'s cluster, in that order (each future's ``key`` is its part's).

    The graph goes in as it is, with its keys as outputs: ``client.compute`` on one collection per part would add a
    finalize task per part (a scheduler round trip each on the worker that runs it, between region tasks)."""
    return client.get(result.built.graph, cluster_keys(result), sync=False)


def merge_root(result: DetectionResult, parts: Mapping) -> dict:
    """The seam tree's root part merged here from its children in ``parts`` (part key → `mr.tasks.Part`), as
    {root key: Part}; {} when there is no seam tree."""
    if result.built.root is None:
        return {}
    key, children, arguments = result.built.root
    return {key: merge_seams([parts[child] for child in children], *arguments)}


def gather_parts(result: DetectionResult, futures: list) -> list:
    """Every part of ``result`` in part order, from `submit_parts`' futures: each fetched as it finishes (so only
    the last one is fetched after the last task), then the root merged here."""
    from distributed import as_completed

    parts = {future.key: part for future, part in as_completed(futures, with_results=True)}
    parts.update(merge_root(result, parts))
    return [parts[key] for key in result.built.part_keys]


def collect_parts(result: DetectionResult, client, progress: bool = False) -> list:
    """Submit ``result`` to ``client``'s cluster and gather every part (see `gather_parts`), showing distributed's
    progress bar if asked."""
    futures = submit_parts(result, client)
    if progress:
        from distributed import progress as show_progress

        show_progress(futures)
        print()
    return gather_parts(result, futures)


def compute_table(result: DetectionResult, client=None, progress: bool = False, **compute: Any) -> FeatureTable:
    """Compute every settled part on the client's cluster (or with ``dask.compute(**compute)``) and concatenate
    them."""
    if client is None:
        import dask
        from dask.diagnostics import ProgressBar

        parts = [_Part(result, key) for key in result.built.part_keys]
        with ProgressBar() if progress else nullcontext():
            return FeatureTable.concat(dask.compute(*parts, **compute))
    return FeatureTable.concat([settled_table(part) for part in collect_parts(result, client, progress)])


def run_to_file(result: DetectionResult, out: str | Path | None, client=None, progress: bool = False) -> RunSummary:
    """Compute ``result`` and write it to ``out`` (GeoJSON or GeoParquet), complete or not at all."""
    started = time.perf_counter()
    table = compute_table(result, client, progress)
    if out is not None:
        write_features(table, result.metadata, out)
    seconds = time.perf_counter() - started
    bands, height, width = result.plan.image_shape
    labels: dict[str, int] = {}
    for label in table.detections.labels:
        labels[str(label)] = labels.get(str(label), 0) + 1
    return RunSummary(
        image=result.plan.source,
        width=width,
        height=height,
        bands=bands,
        tiles=result.plan.tile_count,
        regions=result.plan.grid.region_count,
        features=len(table),
        seconds=seconds,
        output=str(out) if out is not None else None,
        labels=labels,
    )
