"""A tile the model could not process is recorded with its bounds and reason, never silently dropped."""

from __future__ import annotations

import json
import warnings

import numpy as np
import xarray as xr

import mr
from mr.checkpoint import result_from_table, result_to_table
from mr.detections import Detections
from mr.models.base import TileFailure
from mr.regions import RegionResult


class FailsOnBrightTiles:
    """Finds one box per tile, but cannot process tiles whose mean is high (like an endpoint that keeps failing)."""

    name = "fails-on-bright"

    def __call__(self, tiles):
        out = []
        for tile in tiles:
            if tile.mean() > 100:
                out.append(TileFailure("endpoint answered 500 five times"))
            else:
                out.append(Detections.from_labels(np.array([[10.0, 10.0, 20.0, 20.0]]), [0.9], ["thing"]))
        return out


def test_failed_tiles_are_reported_with_bounds_and_reason():
    image = np.zeros((1, 512, 512), np.uint8)
    image[:, 256:, 256:] = 200  # the bottom-right tile fails
    result = mr.detect(xr.DataArray(image, dims=("band", "y", "x")), FailsOnBrightTiles(), tile_size=256,
                       overlap=0, region_size=256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = result.compute(scheduler="sync")
    assert len(frame) == 3
    assert frame.attrs["failed_tiles"] == [
        {"tile_id": 3, "bounds": [[256, 256], [256, 256]], "reason": "endpoint answered 500 five times"}
    ]
    assert any("1 tile(s) failed" in str(w.message) for w in caught)


def test_failed_tiles_survive_a_checkpoint():
    failed = ({"tile_id": 7, "bounds": [[0, 512], [256, 256]], "reason": "timeout"},)
    back = result_from_table(result_to_table(RegionResult(Detections.empty(), Detections.empty(), 4, 0.1, failed)))
    assert back.failed_tiles == failed and json.dumps(list(back.failed_tiles))
