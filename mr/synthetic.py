"""Synthetic scenes with objects planted at known positions: the ground truth for tests, benchmarks and the demo.

A scene is smooth multi-scale terrain, fine correlated texture and Gaussian sensor noise, with compact bright and dark
objects (axis-aligned and rotated rectangles, ellipses — vehicles on a road, ships on water) added on top with a
contrast of several noise sigmas. Every random number is drawn up front from ``seed`` (object list, terrain grids,
noise pools), and pixels are then rendered in row strips in float32, so the same seed gives the same pixels however
the rows are cut, a 20,000 × 20,000 uint8 scene renders in seconds, and :func:`write_scene` never holds more than a
strip. Sensor noise comes from a pool of normal variates read at a random offset for every row and band — rows are
mutually uncorrelated and the values exactly normal, at the cost of a memory copy instead of a fresh draw.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from mr.errors import InvalidInputError
from mr.models.builtin import BRIGHT_LABEL, DARK_LABEL

_STRIP = 128
"""Rows rendered at a time."""
_POOL = 1 << 20
"""Normal variates in each noise pool."""
_TEXTURE_STEP = 2
"""Pixels between texture nodes: the texture's correlation length."""
_COARSE = 32
"""Pixels between the lattice points that the terrain octaves are evaluated on."""
_OCTAVES = ((2048, 1.0), (512, 0.5), (128, 0.25))
"""(node spacing in pixels, weight) of the terrain's value-noise octaves."""
_LERP_GAIN = math.sqrt(np.mean([(1 - t) ** 2 + t**2 for t in (np.arange(_TEXTURE_STEP) + 0.5) / _TEXTURE_STEP]))
"""How much linear interpolation between independent nodes shrinks the standard deviation, per axis."""


@dataclass(frozen=True)
class Look:
    """Radiometry of a scene in its dtype's digital numbers (DN)."""

    level: float
    """Mean intensity."""
    terrain: float
    """Largest excursion of the terrain from ``level``."""
    texture: float
    """Standard deviation of the fine texture."""
    noise: float
    """Standard deviation of the sensor noise in each band."""
    low: float
    """Smallest valid value (values below are clipped; nodata may sit below)."""
    high: float
    """Largest valid value."""

    @property
    def clutter(self) -> float:
        """Standard deviation of texture and noise together: the sigma that object contrast is measured in."""
        return math.hypot(self.texture, self.noise)


LOOKS = {
    np.dtype(np.uint8): Look(110.0, 40.0, 2.0, 3.0, 1.0, 254.0),
    np.dtype(np.uint16): Look(1760.0, 640.0, 32.0, 48.0, 1.0, 65534.0),
    np.dtype(np.float32): Look(0.43, 0.157, 0.008, 0.012, -1e30, 1e30),
}
"""The default look of each supported dtype (uint16 looks like 12-bit data, float32 like reflectance)."""


@dataclass(frozen=True)
class PlantedObject:
    """One object in a scene: its tight bounding box in continuous pixel coordinates, label and contrast."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str = BRIGHT_LABEL
    contrast: float = 0.0
    """Signed offset from the local background in DN, averaged over the bands (positive: brighter)."""


@dataclass(frozen=True)
class _Shape:
    """How to draw one object: centre, full length and width, angle and kind; colour multiplies contrast per band."""

    cx: float
    cy: float
    length: float
    width: float
    angle: float
    ellipse: bool
    contrast: float
    colour: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class _Spec:
    """A scene resolved to arrays: everything random is drawn, only pixels remain to be rendered."""

    width: int
    height: int
    bands: int
    dtype: np.dtype
    look: Look
    gains: np.ndarray
    terrain: tuple[np.ndarray, ...]
    texture_pool: np.ndarray
    texture_offsets: np.ndarray
    noise_pool: np.ndarray
    noise_offsets: np.ndarray
    shapes: tuple[_Shape, ...]
    """Sorted by centre row."""
    shape_rows: np.ndarray
    """Centre row of each shape, for finding those that meet a strip."""
    reach: float
    """The largest distance from a shape's centre to a pixel it covers."""
    nodata: float | None
    collar: int


def make_scene(
    width: int,
    height: int,
    *,
    bands: int = 1,
    dtype: object = np.uint8,
    n_objects: int | None = None,
    seed: int = 0,
    object_size: tuple[float, float] = (6, 24),
    min_separation: float = 8,
    contrast: tuple[float, float] = (6.0, 12.0),
    bright_fraction: float = 0.5,
    objects: Sequence[PlantedObject] | None = None,
    background: str = "terrain",
    nodata: float | None = None,
    collar: int = 0,
) -> tuple[np.ndarray, list[PlantedObject]]:
    """A (bands, height, width) scene and the objects planted in it.

    ``n_objects`` defaults to about 40 per 1024 × 1024 pixels; each object's length is drawn from ``object_size``
    (its width from [max(lo, length/3), length]), its contrast from ``contrast`` × the clutter sigma (see
    :class:`Look`), bright with probability ``bright_fraction``; bounding boxes are at least ``min_separation``
    pixels apart. ``objects`` replaces the random ones: each is drawn as a filled axis-aligned rectangle with its own
    contrast (DN). ``background`` is ``"terrain"`` or ``"flat"`` (noise only). ``collar`` > 0 cuts the four
    corners diagonally to ``nodata``, like the footprint of a rotated satellite image.
    """
    spec = _resolve(
        width, height, bands=bands, dtype=dtype, n_objects=n_objects, seed=seed, object_size=object_size,
        min_separation=min_separation, contrast=contrast, bright_fraction=bright_fraction, objects=objects,
        background=background, nodata=nodata, collar=collar,
    )
    image = np.empty((spec.bands, spec.height, spec.width), spec.dtype)
    for y0, rows in _strips(spec, _STRIP):
        image[:, y0 : y0 + rows.shape[1]] = rows
    return image, _planted(spec, objects)


def write_scene(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    driver: str = "GTiff",
    tiled: bool = True,
    compress: str | None = None,
    blocksize: int = 512,
    crs: str = "EPSG:32616",
    origin: tuple[float, float] = (500000.0, 4500000.0),
    resolution: float = 0.5,
    **scene: object,
) -> list[PlantedObject]:
    """Write a georeferenced scene strip by strip and return its planted objects (``scene`` as for make_scene).

    ``driver`` is GTiff, COG, NITF or JP2OpenJPEG; ``compress`` defaults to deflate for GTiff and COG, none for NITF
    (``"jpeg2000"`` gives lossless NITF IC=C8) and lossless for JPEG2000. ``origin`` is the map position of the
    top-left corner and ``resolution`` the pixel size in CRS units (north up). COG and compressed NITF/JPEG2000 are
    copied from a tiled GTiff written first beside ``path``. NITF keeps only EPSG:4326 or WGS84 UTM, and its IGEOLO
    corners to the whole metre (UTM): its georeference is off by up to a metre.
    """
    codec = _resolve_codec(driver, compress)
    icords = _nitf_icords(crs) if driver == "NITF" else None
    _check_int("blocksize", blocksize, 16)
    if blocksize % 16:
        raise InvalidInputError("blocksize", blocksize, "must be a multiple of 16, e.g. 512")
    spec = _resolve(width, height, **_scene_kwargs(scene))
    profile = _profile(spec, crs, origin, resolution)
    if driver == "GTiff" or (driver == "NITF" and codec is None):
        options = _creation_options(driver, tiled, codec, blocksize, icords)
        _write_strips(os.fspath(path), driver, spec, {**profile, **options}, blocksize)
    else:
        options = _copy_options(driver, codec, blocksize, icords)
        _write_by_copy(os.fspath(path), driver, spec, profile, options, blocksize)
    return _planted(spec, scene.get("objects"))


def _profile(spec: _Spec, crs: str, origin: tuple[float, float], resolution: float) -> dict:
    """rasterio's size, type and georeference arguments for the scene."""
    from rasterio.transform import from_origin

    transform = from_origin(origin[0], origin[1], resolution, resolution)
    return dict(width=spec.width, height=spec.height, count=spec.bands, dtype=spec.dtype.name, crs=crs,
                transform=transform, nodata=spec.nodata)


def _write_strips(path: str, driver: str, spec: _Spec, profile: dict, blocksize: int) -> None:
    """Create ``path`` and write the scene into it one strip of ``blocksize`` rows at a time."""
    import rasterio

    with rasterio.open(path, "w", driver=driver, **profile) as dst:
        for y0, rows in _strips(spec, blocksize):
            dst.write(rows, window=((y0, y0 + rows.shape[1]), (0, spec.width)))


def _write_by_copy(path: str, driver: str, spec: _Spec, profile: dict, options: dict, blocksize: int) -> None:
    """Write a tiled GTiff beside ``path``, copy it into ``driver``'s format (COG, NITF C8, JPEG2000), remove it."""
    import rasterio.shutil

    scratch = _scratch_path(path)
    try:
        gtiff = _creation_options("GTiff", True, "deflate", blocksize, None)
        _write_strips(scratch, "GTiff", spec, {**profile, **gtiff}, blocksize)
        rasterio.shutil.copy(scratch, path, driver=driver, **options)
    finally:
        os.remove(scratch)


def planted_boxes(objects: Sequence[PlantedObject]) -> np.ndarray:
    """float64 (n, 4) boxes x0, y0, x1, y1 of the objects."""
    return np.array([(o.x0, o.y0, o.x1, o.y1) for o in objects], dtype=np.float64).reshape(-1, 4)


def objects_to_geojson(objects: Sequence[PlantedObject], transform: object | None = None) -> dict:
    """A GeoJSON FeatureCollection of the objects' boxes: in pixels, or in the raster's CRS given its affine
    ``transform``; properties carry ``label``, ``contrast`` and ``imageBBox`` (pixels)."""
    features = []
    for obj in objects:
        corners = [(obj.x0, obj.y0), (obj.x1, obj.y0), (obj.x1, obj.y1), (obj.x0, obj.y1), (obj.x0, obj.y0)]
        if transform is not None:
            a, b, c, d, e, f = (transform.a, transform.b, transform.c, transform.d, transform.e, transform.f)
            corners = [(a * x + b * y + c, d * x + e * y + f) for x, y in corners]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[list(map(float, c)) for c in corners]]},
            "properties": {"label": obj.label, "contrast": obj.contrast,
                           "imageBBox": [obj.x0, obj.y0, obj.x1, obj.y1]},
        })
    return {"type": "FeatureCollection", "features": features}


class Match(NamedTuple):
    """The outcome of :func:`match_detections`."""

    recall: float
    """Matched truths / truths (1.0 when there are none)."""
    precision: float
    """Matched predictions / predictions (1.0 when there are none)."""
    pairs: np.ndarray
    """int64 (m, 2): (prediction index, truth index) of each match, best IoU first."""


def match_detections(pred_boxes: object, true_boxes: object, min_iou: float = 0.3) -> Match:
    """Greedy one-to-one matching of predicted to true boxes, highest IoU first, pairs with IoU ≥ ``min_iou``.

    Accepts (n, 4) arrays, Detections or lists of PlantedObject. Candidate pairs come from an STRtree, so scoring a
    whole large scene costs O(n log n), not an n × n IoU matrix.
    """
    import shapely

    if not 0 < min_iou <= 1:
        raise InvalidInputError("min_iou", min_iou, "must be in (0, 1]")
    pred, true = _as_boxes(pred_boxes), _as_boxes(true_boxes)
    pairs = np.empty((0, 2), np.int64)
    if len(pred) and len(true):
        tree = shapely.STRtree(shapely.box(*true.T))
        candidates = tree.query(shapely.box(*pred.T), predicate="intersects").T.astype(np.int64)
        iou = box_iou(pred[candidates[:, 0]], true[candidates[:, 1]])
        order = np.lexsort((candidates[:, 1], candidates[:, 0], -iou))
        pairs = _greedy(candidates[order][iou[order] >= min_iou], len(pred), len(true))
    recall = len(pairs) / len(true) if len(true) else 1.0
    precision = len(pairs) / len(pred) if len(pred) else 1.0
    return Match(recall, precision, pairs)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of each row of ``a`` with the same row of ``b`` (both (n, 4))."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _greedy(candidates: np.ndarray, n_pred: int, n_true: int) -> np.ndarray:
    """Accept candidate pairs in order, each prediction and truth at most once."""
    used_pred, used_true = np.zeros(n_pred, bool), np.zeros(n_true, bool)
    accepted = []
    for p, t in candidates.tolist():
        if not used_pred[p] and not used_true[t]:
            used_pred[p] = used_true[t] = True
            accepted.append((p, t))
    return np.array(accepted, np.int64).reshape(-1, 2)


def _as_boxes(boxes: object) -> np.ndarray:
    """(n, 4) float64 boxes from an array, a Detections or a list of PlantedObject."""
    if hasattr(boxes, "boxes"):
        return np.asarray(boxes.boxes, np.float64).reshape(-1, 4)
    if isinstance(boxes, (list, tuple)) and boxes and isinstance(boxes[0], PlantedObject):
        return planted_boxes(boxes)
    return np.asarray(boxes, np.float64).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------------------------
# Resolution: validate arguments and draw every random number.


def _scene_kwargs(scene: dict) -> dict:
    """make_scene's keyword arguments with their defaults, rejecting unknown ones."""
    parameters = inspect.signature(make_scene).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(scene) - set(defaults))
    if unknown:
        raise InvalidInputError(unknown[0], scene[unknown[0]], f"is not a scene option; known: {sorted(defaults)}")
    return {**defaults, **scene}


def _resolve(width: int, height: int, *, bands: int, dtype: object, n_objects: int | None, seed: int,
             object_size: tuple[float, float], min_separation: float, contrast: tuple[float, float],
             bright_fraction: float, objects: Sequence[PlantedObject] | None, background: str,
             nodata: float | None, collar: int) -> _Spec:
    """Validate make_scene's arguments and draw the scene's random numbers, in a fixed order."""
    _check_int("width", width, 1)
    _check_int("height", height, 1)
    _check_int("bands", bands, 1)
    _check_int("collar", collar, 0)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise InvalidInputError("dtype", dtype, f"must be one of {[d.name for d in LOOKS]}") from None
    if dtype not in LOOKS:
        raise InvalidInputError("dtype", dtype.name, f"must be one of {[d.name for d in LOOKS]}")
    if background not in ("terrain", "flat"):
        raise InvalidInputError("background", background, "must be 'terrain' or 'flat'")
    if collar and nodata is None:
        raise InvalidInputError("collar", collar, "needs a nodata value to fill the corners with")
    look = LOOKS[dtype]
    rng = np.random.default_rng(seed)
    if objects is None:
        shapes = _random_shapes(rng, width, height, n_objects=n_objects, object_size=object_size,
                                min_separation=min_separation, contrast=contrast, bright_fraction=bright_fraction,
                                look=look, bands=bands, collar=collar)
    else:
        shapes = tuple(_explicit_shape(o, bands) for o in objects)
    flat = background == "flat"
    terrain = tuple(rng.uniform(-1, 1, (height // s + 4, width // s + 4)).astype(np.float32) for s, _ in _OCTAVES)
    nx_texture = width // _TEXTURE_STEP + 2
    texture = look.texture / _LERP_GAIN**2
    return _Spec(
        width, height, bands, dtype, look,
        gains=np.linspace(1.0, 0.85, bands, dtype=np.float32),
        terrain=() if flat else terrain,
        texture_pool=rng.standard_normal(_POOL + nx_texture, dtype=np.float32) * np.float32(texture),
        texture_offsets=rng.integers(0, _POOL, height // _TEXTURE_STEP + 2),
        noise_pool=rng.standard_normal(_POOL + width, dtype=np.float32) * np.float32(look.noise),
        noise_offsets=rng.integers(0, _POOL, (bands, height)),
        shapes=tuple(sorted(shapes, key=lambda s: s.cy)),
        shape_rows=np.sort(np.array([s.cy for s in shapes], np.float64)),
        reach=max((_reach(s) for s in shapes), default=0.0),
        nodata=nodata,
        collar=collar,
    )


def _random_shapes(rng: np.random.Generator, width: int, height: int, *, n_objects: int | None,
                   object_size: tuple[float, float], min_separation: float, contrast: tuple[float, float],
                   bright_fraction: float, look: Look, bands: int, collar: int) -> tuple[_Shape, ...]:
    """Objects on a jittered grid: one per randomly chosen free cell, so they keep ``min_separation`` apart."""
    size = _check_range("object_size", object_size, 2.0)
    strength = _check_range("contrast", contrast, 0.0)
    if not (isinstance(bright_fraction, Real) and 0 <= bright_fraction <= 1):
        raise InvalidInputError("bright_fraction", bright_fraction, "must be in [0, 1]")
    if not (isinstance(min_separation, Real) and 0 <= min_separation < math.inf):
        raise InvalidInputError("min_separation", min_separation, "must be a number >= 0")
    cell = math.ceil(size[1] * math.sqrt(2)) + 2 + math.ceil(min_separation)
    free = _free_cells(width, height, cell, collar)
    n = min(round(40 * width * height / 1024**2), len(free)) if n_objects is None else n_objects
    _check_int("n_objects", n, 0)
    if n > len(free):
        raise InvalidInputError("n_objects", n, f"at most {len(free)} objects of up to {size[1]} px fit "
                                f"{min_separation} px apart in {width}x{height}; lower the size or separation")
    chosen = free[np.sort(rng.choice(len(free), n, replace=False))]
    room = (cell - min_separation) / 2
    polarity = np.where(rng.random(n) < bright_fraction, 1.0, -1.0)
    return _draw_shapes(rng, chosen * cell + cell / 2, room, size, polarity * look.clutter, strength, bands)


def _draw_shapes(rng: np.random.Generator, centres: np.ndarray, room: float, size: tuple[float, float],
                 sigma: np.ndarray, strength: tuple[float, float], bands: int) -> tuple[_Shape, ...]:
    """Random shapes, each jittered around its centre so that its box stays within ``room`` of it.

    Kinds: 40% axis-aligned rectangles, 35% rotated rectangles, 25% ellipses; width from [max(lo, length/3),
    length]; contrast ``sigma`` × uniform(strength); colour per band in [0.7, 1.3], averaging 1.
    """
    n = len(centres)
    length = rng.uniform(size[0], size[1], n)
    width = rng.uniform(np.maximum(size[0], length / 3), length)
    kind = rng.choice(3, n, p=[0.4, 0.35, 0.25])
    angle = np.where(kind == 0, rng.integers(0, 2, n) * math.pi / 2, rng.uniform(0, math.pi, n))
    ex, ey = _half_extents(length, width, angle, kind == 2)
    cx = centres[:, 0] + rng.uniform(-1, 1, n) * np.maximum(room - ex, 0)
    cy = centres[:, 1] + rng.uniform(-1, 1, n) * np.maximum(room - ey, 0)
    contrast = sigma * rng.uniform(strength[0], strength[1], n)
    colour = rng.uniform(0.7, 1.3, (n, bands))
    colour /= colour.mean(axis=1, keepdims=True)
    return tuple(
        _Shape(float(cx[i]), float(cy[i]), float(length[i]), float(width[i]), float(angle[i]), bool(kind[i] == 2),
               float(contrast[i]), tuple(map(float, colour[i])))
        for i in range(n)
    )


def _free_cells(width: int, height: int, cell: int, collar: int) -> np.ndarray:
    """(k, 2) column, row of the grid cells inside the image and clear of the nodata collar."""
    cols, rows = np.meshgrid(np.arange(width // cell), np.arange(height // cell))
    cells = np.column_stack((cols.ravel(), rows.ravel()))
    x0, y0 = cells[:, 0] * cell, cells[:, 1] * cell
    x1, y1 = x0 + cell, y0 + cell
    clear = (x0 + y0 >= collar) & (width - x1 + y0 >= collar) & (x0 + height - y1 >= collar)
    clear &= width - x1 + height - y1 >= collar
    return cells[clear]


def _half_extents(length: object, width: object, angle: object, ellipse: object) -> tuple[np.ndarray, np.ndarray]:
    """Half width and half height of the boxes of rotated rectangles or ellipses."""
    a, b = np.asarray(length) / 2, np.asarray(width) / 2
    c, s = np.abs(np.cos(angle)), np.abs(np.sin(angle))
    ex = np.where(ellipse, np.hypot(a * c, b * s), a * c + b * s)
    ey = np.where(ellipse, np.hypot(a * s, b * c), a * s + b * c)
    return ex, ey


def _explicit_shape(obj: PlantedObject, bands: int) -> _Shape:
    """A caller's object, drawn as a filled axis-aligned rectangle."""
    if not isinstance(obj, PlantedObject) or not (obj.x1 > obj.x0 and obj.y1 > obj.y0):
        raise InvalidInputError("objects", obj, "must be PlantedObject with x1 > x0 and y1 > y0")
    return _Shape((obj.x0 + obj.x1) / 2, (obj.y0 + obj.y1) / 2, obj.x1 - obj.x0, obj.y1 - obj.y0, 0.0, False,
                  float(obj.contrast), (1.0,) * bands)


def _planted(spec: _Spec, objects: Sequence[PlantedObject] | None) -> list[PlantedObject]:
    """The objects as the caller sees them: given ones unchanged, random ones with their analytic boxes."""
    if objects is not None:
        return list(objects)
    planted = []
    for s in sorted(spec.shapes, key=lambda s: (s.cy, s.cx)):
        ex, ey = (float(v) for v in _half_extents(s.length, s.width, s.angle, s.ellipse))
        planted.append(PlantedObject(s.cx - ex, s.cy - ey, s.cx + ex, s.cy + ey,
                                     BRIGHT_LABEL if s.contrast > 0 else DARK_LABEL, s.contrast))
    return planted


def _check_int(field: str, value: object, low: int) -> None:
    """An integer of at least ``low``."""
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise InvalidInputError(field, value, f"must be an integer >= {low}")


def _check_range(field: str, value: object, low: float) -> tuple[float, float]:
    """A (lo, hi) pair with low <= lo <= hi."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidInputError(field, value, "must be a (low, high) pair of numbers") from None
    if not low <= lo <= hi:
        raise InvalidInputError(field, value, f"must satisfy {low} <= low <= high")
    return lo, hi


# ---------------------------------------------------------------------------------------------------------------
# Rendering: rows of a resolved scene.


def _strips(spec: _Spec, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (bands, rows, width) array in the scene's dtype) for consecutive strips of ``step`` rows."""
    for y0 in range(0, spec.height, step):
        yield y0, _render(spec, y0, min(y0 + step, spec.height))


def _render(spec: _Spec, y0: int, y1: int) -> np.ndarray:
    """Rows y0..y1 of the scene: background, objects, sensor noise, collar, then quantised to the dtype."""
    look = spec.look
    rows = _background_rows(spec, y0, y1)
    patches = _patches(spec, y0, y1)
    rounding = 0.5 if spec.dtype.kind == "u" else 0.0
    out = np.empty((spec.bands, y1 - y0, spec.width), spec.dtype)
    for band, gain in enumerate(spec.gains):
        nodes = rows * gain
        nodes += np.float32(look.level * gain + rounding)  # constants added before interpolation cost 1/step
        value = _upsample_columns(nodes, _TEXTURE_STEP)[:, : spec.width]
        for shape, (r, c), coverage in patches:
            value[r, c] += coverage * np.float32(shape.contrast * shape.colour[band])
        for row, offset in enumerate(spec.noise_offsets[band, y0:y1]):
            value[row] += spec.noise_pool[offset : offset + spec.width]
        np.clip(value, look.low, look.high, out=value)
        out[band] = value
    _apply_collar(out, spec, y0)
    return out


def _background_rows(spec: _Spec, y0: int, y1: int) -> np.ndarray:
    """float32 terrain + texture of rows y0..y1 at the texture-node columns (every ``_TEXTURE_STEP`` pixels).

    With nodes every 2 pixels, pixel centres sit a quarter of the way between nodes, so the texture's variance is the
    same at every pixel (with 4 it would vary with the phase, a trap for estimators that subsample the image).
    """
    step = _TEXTURE_STEP
    n0, n1 = y0 // step, -(-y1 // step) + 1
    nx = spec.width // step + 2
    if spec.terrain:
        nodes = _terrain(spec, np.arange(n0, n1) * step, np.arange(nx) * step)
        for i, offset in enumerate(spec.texture_offsets[n0:n1]):
            nodes[i] += spec.texture_pool[offset : offset + nx]
    else:
        nodes = np.zeros((n1 - n0, nx), np.float32)
    return _lerp(nodes, (np.arange(y0, y1) + 0.5) / step - n0, axis=0)


def _terrain(spec: _Spec, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """float32 terrain at pixel rows ``ys`` × columns ``xs``: octaves summed on a coarse lattice, then interpolated."""
    first, last = int(ys[0]) // _COARSE, int(ys[-1]) // _COARSE + 1
    coarse_y = np.arange(first, last + 1) * _COARSE
    coarse_x = np.arange(int(xs[-1]) // _COARSE + 2) * _COARSE
    coarse = np.zeros((len(coarse_y), len(coarse_x)), np.float32)
    for (spacing, weight), grid in zip(_OCTAVES, spec.terrain):
        coarse += _value_noise(grid, coarse_y / spacing, coarse_x / spacing) * np.float32(weight)
    coarse *= np.float32(spec.look.terrain / sum(w for _, w in _OCTAVES))
    rows = _lerp(coarse, ys / _COARSE - first, axis=0)
    return _lerp(rows, xs / _COARSE, axis=1)


def _upsample_columns(rows: np.ndarray, step: int) -> np.ndarray:
    """Linear interpolation between columns ``step`` pixels apart, one strided phase at a time (no gathers)."""
    lower, steps = rows[:, :-1], np.diff(rows, axis=1)
    out = np.empty((rows.shape[0], steps.shape[1] * step), np.float32)
    scratch = np.empty_like(steps)
    for k in range(step):
        np.multiply(steps, np.float32((k + 0.5) / step), out=scratch)
        np.add(scratch, lower, out=out[:, k::step])
    return out


def _value_noise(grid: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Smooth (smoothstep-weighted) interpolation of a node grid at fractional node coordinates."""
    rows = _lerp(grid, ys, axis=0, smooth=True)
    return _lerp(rows, xs, axis=1, smooth=True)


def _lerp(a: np.ndarray, position: np.ndarray, axis: int, smooth: bool = False) -> np.ndarray:
    """Linear (or smoothstep) interpolation of ``a`` along ``axis`` at fractional indices ``position``."""
    index = np.floor(position).astype(np.intp)
    t = (position - index).astype(np.float32)
    if smooth:
        t = t * t * (3 - 2 * t)
    lower, upper = np.take(a, index, axis=axis), np.take(a, index + 1, axis=axis)
    shape = (-1, 1) if axis == 0 else (1, -1)
    upper -= lower
    upper *= t.reshape(shape)
    lower += upper
    return lower


def _patches(spec: _Spec, y0: int, y1: int) -> list[tuple[_Shape, tuple[slice, slice], np.ndarray]]:
    """Each object that meets rows y0..y1, with its window in the strip and its anti-aliased pixel coverage."""
    first, last = np.searchsorted(spec.shape_rows, [y0 - spec.reach, y1 + spec.reach])
    patches = []
    for s in spec.shapes[first:last]:
        r = _reach(s)
        top, bottom = max(int(s.cy - r), y0), min(int(s.cy + r) + 1, y1)
        left, right = max(int(s.cx - r), 0), min(int(s.cx + r) + 1, spec.width)
        if top < bottom and left < right:
            coverage = _coverage(s, np.arange(top, bottom) + 0.5, np.arange(left, right) + 0.5)
            patches.append((s, (slice(top - y0, bottom - y0), slice(left, right)), coverage))
    return patches


def _reach(s: _Shape) -> float:
    """A radius around the centre that holds every pixel the shape touches."""
    return math.hypot(s.length, s.width) / 2 + 1


def _coverage(s: _Shape, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """float32 fraction of each pixel (centres ys × xs) inside the shape, from its signed distance."""
    dx, dy = xs[None, :] - s.cx, ys[:, None] - s.cy
    c, si = math.cos(s.angle), math.sin(s.angle)
    u, v = np.abs(dx * c + dy * si), np.abs(dy * c - dx * si)
    a, b = s.length / 2, s.width / 2
    if s.ellipse:
        distance = (np.hypot(u / a, v / b) - 1) * min(a, b)
    else:
        distance = np.maximum(u - a, v - b)
    return np.clip(0.5 - distance, 0, 1).astype(np.float32)


def _apply_collar(out: np.ndarray, spec: _Spec, y0: int) -> None:
    """Fill the four diagonal corner cuts with nodata."""
    c, w, h = spec.collar, spec.width, spec.height
    if not c:
        return
    for row in range(out.shape[1]):
        y = y0 + row
        reach = max(c - y, c - (h - 1 - y), 0)
        if reach:
            out[:, row, : min(reach, w)] = spec.nodata
            out[:, row, max(w - reach, 0) :] = spec.nodata


# ---------------------------------------------------------------------------------------------------------------
# Files.


def _resolve_codec(driver: str, compress: str | None) -> str | None:
    """The compression for ``driver`` (None: uncompressed), rejecting combinations the driver cannot write."""
    allowed = {"GTiff": ("deflate", "lzw", "zstd", "none"), "COG": ("deflate", "lzw", "zstd", "none"),
               "NITF": ("none", "jpeg2000"), "JP2OpenJPEG": ("none",)}
    if driver not in allowed:
        raise InvalidInputError("driver", driver, f"must be one of {sorted(allowed)}")
    codec = (compress or {"GTiff": "deflate", "COG": "deflate"}.get(driver, "none")).lower()
    if codec not in allowed[driver]:
        raise InvalidInputError("compress", compress, f"{driver} supports {allowed[driver]}")
    return None if codec == "none" else codec


def _creation_options(driver: str, tiled: bool, codec: str | None, blocksize: int, icords: str | None) -> dict:
    """GDAL creation options of the strip-written file."""
    if driver == "NITF":
        return {"ICORDS": icords, **({"BLOCKSIZE": blocksize} if tiled else {})}
    options = {"tiled": bool(tiled), "BIGTIFF": "IF_SAFER"}
    if tiled:
        options.update(blockxsize=blocksize, blockysize=blocksize)
    if codec:
        options.update(compress=codec)
    return options


def _copy_options(driver: str, codec: str | None, blocksize: int, icords: str | None) -> dict:
    """GDAL creation options of the final copy (COG, compressed NITF, JPEG2000)."""
    if driver == "COG":
        return {"COMPRESS": (codec or "NONE").upper(), "BLOCKSIZE": blocksize, "BIGTIFF": "IF_SAFER"}
    if driver == "NITF":
        return {"IC": "C8", "PROFILE": "NPJE_NUMERICALLY_LOSSLESS", "BLOCKSIZE": blocksize, "ICORDS": icords}
    return {"REVERSIBLE": "YES", "QUALITY": 100, "BLOCKXSIZE": blocksize, "BLOCKYSIZE": blocksize}


def _nitf_icords(crs: str) -> str:
    """NITF's coordinate system code: G (WGS84 geographic), N or S (UTM north or south); nothing else is stored."""
    from rasterio.crs import CRS

    epsg = CRS.from_user_input(crs).to_epsg()
    if epsg == 4326:
        return "G"
    if epsg is not None and 32601 <= epsg <= 32660:
        return "N"
    if epsg is not None and 32701 <= epsg <= 32760:
        return "S"
    raise InvalidInputError("crs", crs, "NITF stores only EPSG:4326 or WGS84 UTM (EPSG:326xx / 327xx)")


def _scratch_path(path: str | os.PathLike) -> str:
    """A temporary GTiff path beside ``path`` (same file system, removed afterwards)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    handle, name = tempfile.mkstemp(suffix=".tif", prefix=".scene-", dir=folder)
    os.close(handle)
    return name
