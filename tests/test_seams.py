"""Seam handling proven with a perfect detector: for any tiling, every object smaller than the overlap is
reported exactly once, with its exact box, whichever tiles and regions it straddles."""

from __future__ import annotations

import numpy as np
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

import mr
from mr.detections import Detections


class LabelOracle:
    """Reads object ids painted into the pixels and boxes each id's pixels within the tile (truncated at edges)."""

    name = "label-oracle"

    def __call__(self, tiles: np.ndarray) -> list[Detections]:
        tables = []
        for tile in tiles:
            labels = tile[0].astype(np.int64)
            ids = np.unique(labels[labels > 0])
            slices = ndimage.find_objects(labels)
            boxes = [[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in (slices[i - 1] for i in ids)]
            scores = 0.5 + (ids % 97) / 200.0
            tables.append(Detections(np.array(boxes, float).reshape(-1, 4), scores, np.zeros(len(ids)), ("object",),
                                     properties={"object_id": ids}))
        return tables


def painted_scene(width: int, height: int, max_size: int, seed: int) -> tuple[np.ndarray, dict[int, tuple]]:
    """Rectangles with distinct ids on a zero background, at least one pixel apart."""
    rng = np.random.default_rng(seed)
    image = np.zeros((1, height, width), np.int32)
    truth: dict[int, tuple] = {}
    for object_id in range(1, 400):
        w, h = rng.integers(1, max_size + 1, size=2)
        x0, y0 = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        if image[0, max(y0 - 1, 0) : y0 + h + 1, max(x0 - 1, 0) : x0 + w + 1].any():
            continue
        image[0, y0 : y0 + h, x0 : x0 + w] = object_id
        truth[object_id] = (x0, y0, x0 + w, y0 + h)
    return image, truth


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(150, 900),
    height=st.integers(150, 900),
    tile=st.integers(40, 200),
    overlap_fraction=st.floats(0.15, 0.6),
    region_tiles=st.integers(1, 4),
    strategy=st.sampled_from(["variable", "fixed"]),
    method=st.sampled_from(["nms", "soft-nms"]),
    seed=st.integers(0, 10_000),
)
def test_every_small_object_once_with_its_exact_box(
    width, height, tile, overlap_fraction, region_tiles, strategy, method, seed
):
    overlap = max(2, int(tile * overlap_fraction))
    region = tile + (region_tiles - 1) * (tile - overlap)
    image, truth = painted_scene(width, height, max_size=overlap - 1, seed=seed)
    result = mr.detect(
        xr.DataArray(image, dims=("band", "y", "x")), LabelOracle(), tile_size=tile, overlap=overlap,
        region_size=region, strategy=strategy, nms=method,
    )
    grid = result.plan.grid
    table = result.compute_table(scheduler="sync")
    found = table.detections
    ids = found.properties["object_id"]
    # variable overlap may leave a strip of fewer than n - 1 pixels at the far edges untiled
    cx, cy = grid.x.covered, grid.y.covered
    seen = {k: (b[0], b[1], min(b[2], cx), min(b[3], cy)) for k, b in truth.items() if b[0] < cx and b[1] < cy}
    assert sorted(ids.tolist()) == sorted(seen), "each object exactly once, nothing else"
    for object_id, box in zip(ids, found.boxes):
        assert tuple(box) == seen[object_id]
