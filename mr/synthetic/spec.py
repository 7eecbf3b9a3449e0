"""Scene specification, before any pixel exists: validate make_scene's options and draw every random number.

A scene is described by its radiometry (:class:`Look`, one default per dtype in :data:`LOOKS`) and its objects
(:class:`PlantedObject` as callers see them, ``_Shape`` as they are drawn). :func:`_resolve` checks the options and
draws, in a fixed order from ``seed``, the object list, the terrain grids and the noise pools into a frozen
``_Spec``; :func:`_planted` turns that spec back into the objects with their analytic boxes. Pure numpy, no I/O: the
truth of a scene (what the benchmarks score against) is known without rendering a pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from mr.errors import InvalidInputError
from mr.models.builtin import BRIGHT_LABEL, DARK_LABEL

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


def _reach(s: _Shape) -> float:
    """A radius around the centre that holds every pixel the shape touches."""
    return math.hypot(s.length, s.width) / 2 + 1
