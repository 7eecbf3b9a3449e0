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

from mr.api import DetectionResult, _Part, detect
from mr.checkpoint import DirectoryCheckpoint
from mr.detections import Detections
from mr.errors import MrError
from mr.features import FeatureTable, OutputMetadata
from mr.imagery import open_image


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
) -> FeatureTable:
    """Compute on the cluster, calling ``keepalive`` every ``interval`` seconds and ``on_region`` as each region's
    settled features arrive; give up (before anything is published) if ``stop`` is set."""
    from distributed import wait

    futures = client.compute([_Part(result, key) for key in result.built.part_keys])
    part_of = dict(zip(futures, result.built.part_keys))
    pending = set(futures)
    try:
        while pending:
            try:
                wait(list(pending), timeout=interval, return_when="FIRST_COMPLETED")
            except TimeoutError:  # still running: keep the lease, unless the service is stopping
                if stop.is_set():
                    raise Interrupted("stopping: the request is left to be delivered again") from None
                keepalive()
                continue
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                key = part_of[future]
                if future.status == "finished" and _is_region(key):
                    on_region(int(key[1]), int(key[2]), future.result())
        return FeatureTable.concat(client.gather(futures))
    finally:
        if stop.is_set():
            client.cancel(futures)


def _is_region(key) -> bool:
    return isinstance(key, tuple) and str(key[0]).startswith("settle-region-")


def _tagged(table: FeatureTable, image_id: str) -> FeatureTable:
    """Every row carries the id of the image it came from (a request may name several images)."""
    det = table.detections
    properties = {**det.properties, "imageId": np.full(len(det), image_id, dtype=object)}
    tagged = Detections(det.boxes, det.scores, det.class_ids, det.class_names, det.tile_ids, det.geometry, properties)
    return FeatureTable(tagged, table.world, table.centers, table.failed_tiles)


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
) -> list[ImageOutcome]:
    """Detect in every image of a request; finished regions are checkpointed under ``work_dir``."""
    stop = stop or threading.Event()
    outcomes = []
    for url in urls:
        image = open_image(url)
        image_id = str(image.attrs["image_id"])
        checkpoint = DirectoryCheckpoint(work_dir, job_id, image_id)
        result = detect(image, checkpoint=checkpoint, **{**detect_options, "job_id": job_id})
        on_planned(url, result)
        table = compute_with_keepalive(
            result, client, keepalive, stop, interval, lambda ry, rx, part: on_region(image_id, ry, rx, part)
        )
        outcomes.append(ImageOutcome(image_id, url, _tagged(table, image_id), result))
    return outcomes


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
    from mr.models.endpoint import HttpEndpointModel, SageMakerModel

    common = {
        "tile_format": request.tile_format.value,
        "tile_compression": request.tile_compression.value,
        "max_in_flight": config.get("model.endpoint-max-in-flight"),
    }
    if processor.type is ModelInvokeMode.HTTP_ENDPOINT:
        return HttpEndpointModel(processor.name, **common)
    parameters = dict(request.image_processor_parameters) or None
    return SageMakerModel(processor.name, parameters=parameters, assumed_role=processor.assumed_role or None, **common)


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
