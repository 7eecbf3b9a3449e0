"""Measurements of the work, under OversightML ModelRunner's metric names, gathered where the work happens.

A `Metrics` is a small, picklable bag of per-operation counters and duration samples. Each region task fills one
and returns it with its features, seam merges do the same, and the client adds the job-level operations; so
measurements from workers reach the client with the results they describe (no per-tile network call), and
`Metrics.combine` gives the whole job's view. Outputs (EMF lines, Prometheus, the job summary) read from it.
"""

from __future__ import annotations

import contextvars
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Iterator

import numpy as np

NAMESPACE = "OSML/ModelRunner"


class Operation(str, Enum):
    """The ``Operation`` dimension of OversightML ModelRunner's metrics."""

    IMAGE_PROCESSING = "ImageProcessing"
    REGION_PROCESSING = "RegionProcessing"
    TILE_GENERATION = "TileGeneration"
    TILE_PROCESSING = "TileProcessing"
    MODEL_INVOCATION = "ModelInvocation"
    FEATURE_REFINEMENT = "FeatureRefinement"
    FEATURE_STORAGE = "FeatureStorage"
    FEATURE_AGGREGATION = "FeatureAggregation"
    FEATURE_SELECTION = "FeatureSelection"
    FEATURE_DISSEMINATION = "FeatureDissemination"


COUNTERS = ("Invocations", "Errors", "Throttles", "Retries")
"""The count metrics every operation carries, besides ``Duration`` (seconds)."""


@dataclass
class OperationStats:
    """Counters and duration samples of one operation under one set of dimensions."""

    invocations: int = 0
    errors: int = 0
    throttles: int = 0
    retries: int = 0
    durations: list[float] = field(default_factory=list)
    """Seconds, one sample per timed unit (a tile for tile operations, a region for region operations)."""

    def add(self, other: "OperationStats") -> None:
        self.invocations += other.invocations
        self.errors += other.errors
        self.throttles += other.throttles
        self.retries += other.retries
        self.durations.extend(other.durations)

    def counts(self) -> dict[str, int]:
        return {
            "Invocations": self.invocations, "Errors": self.errors,
            "Throttles": self.throttles, "Retries": self.retries,
        }


Key = tuple[str, str, str]
"""(operation, model name, input format); an empty name means the dimension does not apply."""


class Metrics:
    """Per-operation measurements of some work: a region, a seam merge, a job. Thread-safe; pickles to its data."""

    def __init__(self, stats: dict[Key, OperationStats] | None = None) -> None:
        self.stats: dict[Key, OperationStats] = stats or {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"stats": self.stats}

    def __setstate__(self, state: dict) -> None:
        self.stats = state["stats"]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.stats)

    def __repr__(self) -> str:
        return f"<Metrics {', '.join(sorted({k[0] for k in self.stats}))}>"

    def add(
        self,
        operation: Operation | str,
        seconds: float | Iterable[float] | None = None,
        *,
        invocations: int = 1,
        errors: int = 0,
        throttles: int = 0,
        retries: int = 0,
        model_name: str = "",
        input_format: str = "",
    ) -> None:
        """Record ``invocations`` of an operation, with one duration sample or several (or none)."""
        if seconds is None:
            samples: list[float] = []
        elif isinstance(seconds, (int, float)):
            samples = [float(seconds)]
        else:
            samples = [float(s) for s in seconds]
        stats = OperationStats(invocations, errors, throttles, retries, samples)
        key = (Operation(operation).value, model_name or "", input_format or "")
        with self._lock:
            self.stats.setdefault(key, OperationStats()).add(stats)

    @contextmanager
    def timed(self, operation: Operation | str, invocations: int = 1, **dimensions: str) -> Iterator[None]:
        """Time the block as one sample of ``operation``; an exception counts as an error and goes on up."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.add(operation, time.perf_counter() - started, invocations=invocations, errors=1, **dimensions)
            raise
        self.add(operation, time.perf_counter() - started, invocations=invocations, **dimensions)

    def merge(self, other: "Metrics | None") -> "Metrics":
        """Add another set of measurements into this one; returns self."""
        if other is None or other is self:
            return self
        with self._lock:
            for key, stats in other.stats.items():
                self.stats.setdefault(key, OperationStats()).add(stats)  # add copies: ``other`` is left as it was
        return self

    @staticmethod
    def combine(parts: Iterable["Metrics | None"]) -> "Metrics":
        """One set of measurements from many (a job's, from its regions and merges)."""
        total = Metrics()
        for part in parts:
            total.merge(part)
        return total

    def by_operation(self) -> dict[str, OperationStats]:
        """Totals per operation, summed over the other dimensions."""
        totals: dict[str, OperationStats] = {}
        for (operation, _, _), stats in self.stats.items():
            totals.setdefault(operation, OperationStats()).add(stats)
        return totals

    def summary(self) -> dict[str, dict]:
        """Per operation: invocations, errors, throttles, retries and duration statistics (seconds)."""
        out: dict[str, dict] = {}
        for operation, stats in sorted(self.by_operation().items()):
            entry: dict = {k.lower(): v for k, v in stats.counts().items()}
            if stats.durations:
                samples = np.asarray(stats.durations)
                entry.update(
                    duration_s=round(float(samples.sum()), 6),
                    samples=int(samples.size),
                    p50_s=round(float(np.percentile(samples, 50)), 6),
                    p90_s=round(float(np.percentile(samples, 90)), 6),
                    max_s=round(float(samples.max()), 6),
                )
            out[operation] = entry
        return out


class _Discard(Metrics):
    """Where measurements go when no work is being measured."""

    def add(self, *args, **kwargs) -> None:
        return None


_DISCARD = _Discard()
_current: contextvars.ContextVar[Metrics] = contextvars.ContextVar("mr_metrics", default=_DISCARD)


def current() -> Metrics:
    """The measurements of the work running in this thread (a sink that keeps nothing outside any)."""
    return _current.get()


@contextmanager
def measuring(metrics: Metrics) -> Iterator[Metrics]:
    """Make ``metrics`` the place where code deeper down (a model adapter) records, for the block's duration."""
    token = _current.set(metrics)
    try:
        yield metrics
    finally:
        _current.reset(token)
