"""Rendering a resolved scene to pixels: pure numpy kernels, no I/O, and :func:`make_scene` on top of them.

Pixels are rendered in row strips in float32 (terrain octaves on a coarse lattice, texture nodes every
``_TEXTURE_STEP`` pixels, anti-aliased object coverage from a signed distance, sensor noise read from a pool at each
row's drawn offset, the nodata collar, then quantisation to the dtype). Every random number already sits in the
``_Spec``, so a strip depends only on its rows: the same seed gives the same pixels however the rows are cut, and a
writer never holds more than one strip. :func:`make_scene` resolves the options and stacks the strips into one array.
"""

from __future__ import annotations

import inspect
import math
from typing import Iterator, Sequence

import numpy as np

from mr.errors import InvalidInputError
from mr.synthetic.spec import (
    _COARSE,
    _OCTAVES,
    _TEXTURE_STEP,
    PlantedObject,
    _planted,
    _reach,
    _resolve,
    _Shape,
    _Spec,
)

_STRIP = 128
"""Rows rendered at a time."""


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


def _scene_kwargs(scene: dict) -> dict:
    """make_scene's keyword arguments with their defaults, rejecting unknown ones."""
    parameters = inspect.signature(make_scene).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(scene) - set(defaults))
    if unknown:
        raise InvalidInputError(unknown[0], scene[unknown[0]], f"is not a scene option; known: {sorted(defaults)}")
    return {**defaults, **scene}


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
