"""CloudWatch embedded metric format (EMF): a job's metrics as the JSON lines OversightML ModelRunner writes.

CloudWatch turns each line into metrics in namespace ``OSML/ModelRunner`` with dimensions ``Operation`` (plus
``ModelName`` and ``InputFormat`` where they apply), so dashboards and alarms built on OversightML work unchanged.
``Duration`` goes out as arrays of samples (EMF allows 100 values per metric and line), so CloudWatch's averages
and percentiles are per tile or per region, as OversightML's are; the counts go out once, on the first line.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Iterator, Mapping, TextIO

from mr.metrics import NAMESPACE, Metrics

MAX_VALUES = 100
"""EMF's limit of values per metric in one line."""


def emf_lines(
    metrics: Metrics, properties: Mapping[str, str] | None = None, timestamp_ms: int | None = None
) -> Iterator[str]:
    """EMF JSON lines for every operation measured; ``properties`` (job and image ids) ride along unindexed."""
    timestamp_ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    for (operation, model_name, input_format), stats in sorted(metrics.stats.items()):
        dimensions = {"Operation": operation}
        if model_name:
            dimensions["ModelName"] = model_name
        if input_format:
            dimensions["InputFormat"] = input_format
        samples = [round(s, 6) for s in stats.durations]
        chunks = [samples[i : i + MAX_VALUES] for i in range(0, len(samples), MAX_VALUES)] or [[]]
        for index, chunk in enumerate(chunks):
            values: dict = {}
            units: list[dict] = []
            if chunk:
                values["Duration"] = chunk if len(chunk) > 1 else chunk[0]
                units.append({"Name": "Duration", "Unit": "Seconds"})
            if index == 0:
                for name, count in stats.counts().items():
                    values[name] = count
                    units.append({"Name": name, "Unit": "Count"})
            directive = {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{"Namespace": NAMESPACE, "Dimensions": [list(dimensions)], "Metrics": units}],
            }
            yield json.dumps({"_aws": directive, **dimensions, **(properties or {}), **values})


def write_emf(metrics: Metrics, properties: Mapping[str, str] | None = None, stream: TextIO | None = None) -> int:
    """Write the EMF lines to ``stream`` (stdout, where the CloudWatch agent or Lambda/ECS log driver reads them)."""
    stream = stream or sys.stdout
    count = 0
    for line in emf_lines(metrics, properties):
        stream.write(line + "\n")
        count += 1
    stream.flush()
    return count
