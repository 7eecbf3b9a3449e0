"""Run one validated request: every image through `mr.detect` (with region checkpoints), then publish once.

The listener calls this; it is also usable on its own. The message lease is kept alive while the cluster works,
and a stop request abandons the job before anything is published (the message is then delivered again, and the
checkpointed regions are not recomputed).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mr.api import DetectionResult, detect
from mr.checkpoint import DirectoryCheckpoint
from mr.detections import Detections
from mr.errors import MrError
from mr.features import FeatureTable, OutputMetadata
from mr.imagery import open_image
from mr.limits import require_georeference
from mr.logs import log_context
from mr.metrics import Metrics, Operation
from mr.run import merge_root, submit_parts
from mr.tasks import settled_table


class Interrupted(MrError):
    """The service is stopping: the job was abandoned before publishing and will be delivered again."""


@dataclass(frozen=True)
class ImageOutcome:
    """One image of a request, computed."""

    image_id: str
    url: str
    table: FeatureTable
    result: DetectionResult


def compute_with_keepalive(
    result: DetectionResult,
    client,
    keepalive: Callable[[], None],
    stop: threading.Event,
    interval: float,
    on_region: Callable[[int, int, FeatureTable], None] = lambda ry, rx, table: None,
    on_part: Callable[[FeatureTable], None] = lambda table: None,
    metrics: Metrics | None = None,
) -> FeatureTable:
    """Compute on the cluster, calling ``keepalive`` every ``interval`` seconds, ``on_region`` as each region's
    settled features arrive and ``on_part`` for every part (regions and seam merges); give up (before anything is
    published) if ``stop`` is set. Gathering the parts into one table is measured as FeatureAggregation."""
    metrics = metrics if metrics is not None else Metrics()
    from distributed import wait

    futures = submit_parts(result, client)
    pending = set(futures)
    tables: dict = {}
    root_children = set(result.built.root[1]) if result.built.root is not None else set()
    children: dict = {}  # the root's children, kept whole: their pending features are the root's input
    next_keepalive = time.monotonic() + interval
    try:
        while pending:
            try:
                wait(list(pending), timeout=interval, return_when="FIRST_COMPLETED")
            except TimeoutError:  # still running: keep the lease below, unless the service is stopping
                pass
            if time.monotonic() >= next_keepalive:  # on elapsed time: parts finishing often must not starve it
                keepalive()
                next_keepalive = time.monotonic() + interval
            if stop.is_set():
                raise Interrupted("stopping: the request is left to be delivered again")
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                key = future.key
                if future.status != "finished":  # a part failed: the job fails, stop the others' work now
                    client.cancel(list(pending))
                    future.result()
                whole = future.result()  # fetched once, as it finishes
                if key in root_children:
                    children[key] = whole
                part = tables[key] = settled_table(whole)
                on_part(part)
                if _is_region(key):
                    on_region(int(key[1]), int(key[2]), part)
        for key, whole in merge_root(result, children).items():
            part = tables[key] = settled_table(whole)
            on_part(part)
        with metrics.timed(Operation.FEATURE_AGGREGATION, invocations=len(tables)):
            return FeatureTable.concat([tables[key] for key in result.built.part_keys])
    finally:
        if stop.is_set():
            client.cancel(futures)


def _is_region(key) -> bool:
    return isinstance(key, tuple) and str(key[0]).startswith("read-infer-region-")


def _tagged(table: FeatureTable, image_id: str) -> FeatureTable:
    """Every row carries the id of the image it came from (a request may name several images)."""
    det = table.detections
    properties = {**det.properties, "imageId": np.full(len(det), image_id, dtype=object)}
    tagged = Detections(det.boxes, det.scores, det.class_ids, det.class_names, det.tile_ids, det.geometry, properties)
    return FeatureTable(tagged, table.world, table.centers, table.failed_tiles, table.metrics)


def process_images(
    urls: tuple[str, ...],
    detect_options: dict,
    client,
    work_dir: str,
    job_id: str,
    keepalive: Callable[[], None] = lambda: None,
    stop: threading.Event | None = None,
    interval: float = 10.0,
    on_planned: Callable[[str, DetectionResult], None] = lambda url, result: None,
    on_region: Callable[[str, int, int, FeatureTable], None] = lambda image_id, ry, rx, table: None,
    on_part: Callable[[FeatureTable], None] = lambda table: None,
    metrics: Metrics | None = None,
) -> list[ImageOutcome]:
    """Detect in every image of a request; finished regions are checkpointed under ``work_dir``.

    Client-side work (ImageProcessing per image, FeatureAggregation) is recorded in ``metrics``; what the workers
    measured comes back in each outcome's ``table.metrics``.
    """
    stop = stop or threading.Event()
    metrics = metrics if metrics is not None else Metrics()
    outcomes = []
    for url in urls:
        started = time.perf_counter()
        image = require_georeference(open_image(url))
        image_id = str(image.attrs["image_id"])
        dimensions = {"input_format": str(image.attrs.get("input_format", ""))}
        with log_context(image_id=image_id):
            checkpoint = DirectoryCheckpoint(work_dir, job_id, image_id)
            result = detect(image, checkpoint=checkpoint, **{**detect_options, "job_id": job_id})
            dimensions["model_name"] = result.plan.model.name
            on_planned(url, result)
            try:
                table = compute_with_keepalive(
                    result, client, keepalive, stop, interval,
                    lambda ry, rx, part: on_region(image_id, ry, rx, part), on_part, metrics,
                )
            except Interrupted:
                raise
            except BaseException:
                metrics.add(Operation.IMAGE_PROCESSING, time.perf_counter() - started, errors=1, **dimensions)
                raise
            metrics.add(Operation.IMAGE_PROCESSING, time.perf_counter() - started, **dimensions)
        outcomes.append(ImageOutcome(image_id, url, _tagged(table, image_id), result))
    return outcomes


def job_summary(metrics: Metrics, features: int, failed_tiles: int, seconds: float, endpoint: dict) -> dict:
    """What a finished job stores and ``mr status`` shows: counts, throughput and each operation's figures."""
    operations = metrics.summary()
    tiles = operations.get(Operation.TILE_PROCESSING.value, {}).get("invocations", 0)
    regions = operations.get(Operation.REGION_PROCESSING.value, {}).get("invocations", 0)
    calls = operations.get(Operation.MODEL_INVOCATION.value, {})
    summary = {
        "tiles": tiles,
        "regions_computed": regions,
        "failed_tiles": failed_tiles,
        "features": features,
        "seconds": round(seconds, 3),
        "tiles_per_second": round(tiles / seconds, 3) if seconds > 0 else None,
        "model_invocations": calls.get("invocations", 0),
        "retries": calls.get("retries", 0),
        "throttles": calls.get("throttles", 0),
        "operations": operations,
    }
    if endpoint:
        summary["endpoint"] = endpoint
    return summary


def combined_output(outcomes: list[ImageOutcome], job_id: str) -> tuple[FeatureTable, OutputMetadata]:
    """All images' features as one collection, with the metadata of the first image (its NITF header)."""
    table = FeatureTable.concat([o.table for o in outcomes])
    first = outcomes[0].result.metadata if outcomes else OutputMetadata(job_id=job_id)
    meta = OutputMetadata(
        job_id=job_id,
        image_id=",".join(o.image_id for o in outcomes),
        model_name=first.model_name,
        inference_time=first.inference_time,
        feature_properties=first.feature_properties,
        source_metadata=first.source_metadata if len(outcomes) == 1 else None,
    )
    return table, meta


def model_for_request(request):
    """The model a request names: a registered LOCAL model by name, or the adapter for its endpoint."""
    from mr.request import ModelInvokeMode

    processor = request.image_processor
    if processor.type is ModelInvokeMode.LOCAL:
        return processor.name
    from mr import config
    from mr.models.endpoint import Breaker, HttpEndpointModel, RetryPolicy, SageMakerModel

    common = {
        "tile_format": request.tile_format.value,
        "tile_compression": request.tile_compression.value,
        "max_in_flight": config.get("model.endpoint-max-in-flight"),
        "retry": RetryPolicy(max_attempts=int(config.get("model.endpoint-max-attempts")),
                             timeout=float(config.get("model.endpoint-timeout"))),
        "breaker": Breaker(int(config.get("model.endpoint-breaker-failures")),
                           float(config.get("model.endpoint-breaker-seconds"))),
    }
    if processor.type is ModelInvokeMode.HTTP_ENDPOINT:
        return HttpEndpointModel(processor.name, **common)
    parameters = dict(request.image_processor_parameters) or None
    return SageMakerModel(processor.name, parameters=parameters, assumed_role=processor.assumed_role or None,
                          job_id=request.job_id, **common)


def endpoint_counters(client, model) -> dict:
    """The endpoint's call counters summed over the cluster's workers (empty for a model that is no endpoint)."""
    name = getattr(model, "stats", None) and model.name
    if not name:
        return {}

    def snapshot(endpoint: str = name) -> dict:
        from mr.models.endpoint import endpoint_stats

        return endpoint_stats(endpoint).snapshot()

    totals: dict = {"endpoint": name}
    for values in client.run(snapshot).values():
        for key in ("calls", "errors", "retries", "failed_tiles", "latency_s"):
            totals[key] = totals.get(key, 0) + values.get(key, 0)
    return totals


def counters_since(before: dict, after: dict) -> dict:
    """What one job added to the cluster-wide endpoint counters."""
    if not after:
        return {}
    delta = {k: round(after[k] - before.get(k, 0), 6) for k in after if k != "endpoint"}
    delta["endpoint"] = after["endpoint"]
    if delta.get("calls"):
        delta["mean_latency_s"] = round(delta["latency_s"] / delta["calls"], 6)
    return delta


def elapsed(since: float) -> float:
    return round(time.time() - since, 3)
