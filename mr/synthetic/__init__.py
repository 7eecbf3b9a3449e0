"""Synthetic scenes with objects planted at known positions: the ground truth for tests, benchmarks and the demo.

A scene is smooth multi-scale terrain, fine correlated texture and Gaussian sensor noise, with compact bright and dark
objects (axis-aligned and rotated rectangles, ellipses — vehicles on a road, ships on water) added on top with a
contrast of several noise sigmas. Every random number is drawn up front from ``seed`` (object list, terrain grids,
noise pools), and pixels are then rendered in row strips in float32, so the same seed gives the same pixels however
the rows are cut, a 20,000 × 20,000 uint8 scene renders in seconds, and :func:`write_scene` never holds more than a
strip. Sensor noise comes from a pool of normal variates read at a random offset for every row and band — rows are
mutually uncorrelated and the values exactly normal, at the cost of a memory copy instead of a fresh draw.

The package reads as the pipeline: ``spec`` resolves options into a ``_Spec`` (every random number drawn, no
pixels), ``render`` turns a spec into pixels (``make_scene``), ``files`` writes them with rasterio (``write_scene``),
and ``scoring`` matches detections against the planted truth (``match_detections``). Only ``files`` does I/O. Every
name is re-exported here, private helpers included, because benchmarks rebuild a scene's truth from them.
"""

from __future__ import annotations

from mr.synthetic.files import (  # noqa: F401  (re-exported, private helpers too)
    _copy_options,
    _creation_options,
    _nitf_icords,
    _profile,
    _resolve_codec,
    _scratch_path,
    _write_by_copy,
    _write_strips,
    write_scene,
)
from mr.synthetic.render import (  # noqa: F401  (re-exported, private helpers too)
    _STRIP,
    _apply_collar,
    _background_rows,
    _coverage,
    _lerp,
    _patches,
    _render,
    _scene_kwargs,
    _strips,
    _terrain,
    _upsample_columns,
    _value_noise,
    make_scene,
)
from mr.synthetic.scoring import (  # noqa: F401  (re-exported, private helpers too)
    Match,
    _as_boxes,
    _greedy,
    box_iou,
    match_detections,
    objects_to_geojson,
    planted_boxes,
)
from mr.synthetic.spec import (  # noqa: F401  (re-exported, private helpers too)
    _COARSE,
    _LERP_GAIN,
    _OCTAVES,
    _POOL,
    _TEXTURE_STEP,
    LOOKS,
    Look,
    PlantedObject,
    _check_int,
    _check_range,
    _draw_shapes,
    _explicit_shape,
    _free_cells,
    _half_extents,
    _planted,
    _random_shapes,
    _reach,
    _resolve,
    _Shape,
    _Spec,
)

__all__ = [
    "LOOKS", "Look", "Match", "PlantedObject", "box_iou", "make_scene", "match_detections", "objects_to_geojson",
    "planted_boxes", "write_scene",
]
