"""The built-in detector: compact objects that stand out from their local background, with nothing to download.

It finds vehicles on roads, ships on water, aircraft on tarmac — anything small, compact and brighter or darker than
its surroundings — by classic background subtraction, in pure numpy/scipy on float32:

1. **Intensity**: the mean of the tile's bands. A pixel is invalid where any band equals ``nodata`` or is not finite;
   invalid pixels never join a detection and are left out of every statistic.
2. **Background**: the median intensity over ``background_window``-pixel square windows centred on a grid of nodes
   half a window apart, computed on a 4×4-averaged copy of the tile and interpolated bilinearly back to full
   resolution. The median ignores any object smaller than about half the window, and working on 1/16 of the pixels
   keeps it cheap.
3. **Noise**: ``sigma = 1.4826 × MAD`` of the residual (intensity − background) over windows twice as wide (the
   median of the medians of |residual| in 16 half-window cells, on one pixel in 16), interpolated the same way.
   Background and noise are both local — a constant-false-alarm-rate detector: a tile's result barely depends on
   where it starts (tiled and untiled runs agree), and busy areas (forest) do not blind quiet ones (water, tarmac).
4. **Hysteresis thresholds**, per polarity: a bright (dark) candidate is a 4-connected component of pixels whose
   residual exceeds ``+grow_sigma·sigma`` (lies below ``−grow_sigma·sigma``) and holds at least one pixel beyond
   ``threshold_sigma·sigma``. The lower growing threshold gives boxes that fit the object rather than its core.
5. **Shape filters**: ``min_area ≤ pixels ≤ max_area``, fill ratio (pixels / box area) ``≥ min_fill`` and box aspect
   (long side / short side) ``≤ max_aspect``; one box per surviving component.
6. **Score**: ``c / (c + threshold_sigma)`` where ``c`` is the component's mean ``|residual| / sigma`` — 0.5 for an
   object right at the threshold, rising towards 1 as its contrast-to-noise ratio grows.

Labels: ``"bright-object"`` (brighter than the local background: vehicles on asphalt, ships on water, aircraft on
tarmac) and ``"dark-object"`` (darker: vehicles on concrete or snow, shadows, dark roofs). Components that touch the
tile border are reported like any other (the tiling layer de-duplicates across seams).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral, Real
from typing import ClassVar

import numpy as np

from mr.detections import Detections
from mr.errors import InvalidInputError

BRIGHT_LABEL = "bright-object"
DARK_LABEL = "dark-object"
CLASS_NAMES = (BRIGHT_LABEL, DARK_LABEL)
_FACTOR = 4
"""Downsampling factor of the background estimate."""
_MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class BuiltinDetector:
    """A deterministic, download-free detector of compact bright and dark objects (see the module docstring)."""

    threshold_sigma: float = 4.0
    """A component must hold a pixel at least this many noise sigmas from the background."""
    grow_sigma: float = 2.5
    """Components grow over pixels at least this many sigmas from the background (≤ threshold_sigma)."""
    background_window: int = 64
    """Side in pixels of the median window of the background; a multiple of 8, about twice the largest object."""
    min_area: int = 16
    """Smallest component, in pixels."""
    max_area: int = 4096
    """Largest component, in pixels."""
    min_fill: float = 0.25
    """Smallest ratio of component pixels to box area (rejects thin, diagonal streaks)."""
    max_aspect: float = 6.0
    """Largest ratio of the box's long side to its short side (rejects roads, field edges, coastlines)."""
    nodata: float | None = None
    """Pixel value that marks missing data or padding; such pixels never become a detection."""

    name: ClassVar[str] = "builtin"

    def __post_init__(self) -> None:
        _validate(self)

    def __reduce__(self) -> tuple:
        return (_rebuild, (dataclasses.asdict(self),))

    def __call__(self, tiles: np.ndarray) -> list[Detections]:
        """One table per tile of a (n, bands, h, w) batch, boxes in tile pixels."""
        batch = _check_batch(tiles)
        return [self.detect(tile) for tile in batch]

    def detect(self, tile: np.ndarray) -> Detections:
        """The detections of one (bands, h, w) tile."""
        intensity, valid = tile_intensity(tile, self.nodata)
        if valid is not None and not valid.any():
            return Detections.empty(CLASS_NAMES)
        levels = local_levels(intensity, valid, self.background_window, _noise_floor(tile))
        flat, value = beyond(intensity, valid, levels, self.grow_sigma)
        return self._objects(flat, value, intensity.shape[1])

    def _objects(self, flat: np.ndarray, value: np.ndarray, width: int) -> Detections:
        """Label the components of the pixels beyond the growing threshold (both polarities), filter them and build
        the table: bright objects first, then dark, each in raster order of their first pixel."""
        positive, area, mean, boxes = signed_components(
            flat, value, width, self.threshold_sigma, self.min_area, self.max_area
        )
        box_width, box_height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        fill = area / (box_width * box_height)
        aspect = np.maximum(box_width, box_height) / np.minimum(box_width, box_height)
        keep = (fill >= self.min_fill) & (aspect <= self.max_aspect)
        rows = np.concatenate([np.flatnonzero(keep & positive), np.flatnonzero(keep & ~positive)])
        if not len(rows):
            return Detections.empty(CLASS_NAMES)
        scores = mean[rows] / (mean[rows] + self.threshold_sigma)
        class_ids = np.where(positive[rows], 0, 1).astype(np.int32)
        return Detections(boxes[rows], scores, class_ids, CLASS_NAMES)


def warm_tile() -> np.ndarray:
    """A small tile with one bright object: detecting on it once runs every step (and import) of a detection."""
    tile = np.zeros((1, 64, 64), np.uint8)
    tile[0, 24:32, 24:32] = 200
    return tile


def _rebuild(kwargs: dict) -> BuiltinDetector:
    """Unpickle by calling the constructor, so validation runs again."""
    return BuiltinDetector(**kwargs)


def _validate(d: BuiltinDetector) -> None:
    """Raise InvalidInputError naming the first bad constructor argument."""
    _check_real("threshold_sigma", d.threshold_sigma, low=0.0)
    _check_real("grow_sigma", d.grow_sigma, low=0.0)
    if d.grow_sigma > d.threshold_sigma:
        raise InvalidInputError("grow_sigma", d.grow_sigma, f"must not exceed threshold_sigma={d.threshold_sigma}")
    _check_int("background_window", d.background_window, low=16)
    if d.background_window % (2 * _FACTOR):
        raise InvalidInputError("background_window", d.background_window, "must be a multiple of 8, e.g. 64")
    _check_int("min_area", d.min_area, low=1)
    _check_int("max_area", d.max_area, low=1)
    if d.max_area < d.min_area:
        raise InvalidInputError("max_area", d.max_area, f"must be at least min_area={d.min_area}")
    _check_real("min_fill", d.min_fill, low=0.0, high=1.0, inclusive=True)
    _check_real("max_aspect", d.max_aspect, low=1.0, inclusive=True)
    if d.nodata is not None and (isinstance(d.nodata, bool) or not isinstance(d.nodata, Real)):
        raise InvalidInputError("nodata", d.nodata, "must be a number or None")


def _check_real(field: str, value: object, low: float, high: float = math.inf, inclusive: bool = False) -> None:
    """A finite real number in (low, high), or [low, high] when inclusive."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (low <= value <= high if inclusive else low < value <= high)
    if not ok:
        bounds = f"[{low}, {high}]" if inclusive else f"({low}, {high}]"
        raise InvalidInputError(field, value, f"must be a finite number in {bounds}")


def _check_int(field: str, value: object, low: int) -> None:
    """An integer of at least ``low``."""
    if not isinstance(value, Integral) or isinstance(value, bool) or value < low:
        raise InvalidInputError(field, value, f"must be an integer >= {low}")


def _check_batch(tiles: object) -> np.ndarray:
    """The batch as a (n, bands, h, w) real-valued array."""
    if not isinstance(tiles, np.ndarray) or tiles.ndim != 4:
        shape = getattr(tiles, "shape", type(tiles).__name__)
        raise InvalidInputError("tiles", shape, "must be a numpy array of shape (n, bands, height, width)")
    if tiles.dtype.kind not in "uif":
        raise InvalidInputError("tiles.dtype", str(tiles.dtype), "must be an integer or floating point type")
    return tiles


def tile_intensity(tile: np.ndarray, nodata: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 (h, w) mean of the bands (a fresh array), and the valid mask or None when every pixel is valid."""
    intensity = tile[0].astype(np.float32) if tile.shape[0] == 1 else tile.mean(axis=0, dtype=np.float32)
    invalid = None
    if nodata is not None and not math.isnan(nodata):
        invalid = (tile == nodata).any(axis=0)
    if tile.dtype.kind == "f":
        nonfinite = ~np.isfinite(intensity)
        invalid = nonfinite if invalid is None else invalid | nonfinite
    if invalid is None or not invalid.any():
        return intensity, None
    intensity[invalid] = 0.0
    return intensity, ~invalid


def _noise_floor(tile: np.ndarray) -> float:
    """The smallest credible sigma: integer data cannot resolve less than its quantisation step."""
    return 0.3 / math.sqrt(tile.shape[0]) if tile.dtype.kind in "ui" else 1e-12


_STRIP = 128
"""Rows per strip of the full-resolution pass: a strip's arrays (0.5 MiB each for 1024-pixel rows) stay in the
core's cache, where whole-tile arrays would go to memory and back at every step."""


@dataclass(frozen=True)
class LocalLevels:
    """Background and noise of a tile at nodes ``spacing`` pixels apart (bilinear in between)."""

    spacing: int
    background: np.ndarray
    """float32 (ny+1, nx+1) median intensity around each node."""
    sigma: np.ndarray
    """float32 (ny+1, nx+1) noise (1.4826 × median absolute residual, at least the noise floor) around each node."""


def local_levels(intensity: np.ndarray, valid: np.ndarray | None, window: int, floor: float) -> LocalLevels:
    """The tile's local background and noise.

    The background is the median over ``window``-pixel windows, sigma 1.4826 × the median absolute residual over
    windows twice as wide (steadier, and less swayed by a large object). Both are local, so a pixel's significance
    depends on its neighbourhood only, not on the rest of the tile: a tiled run agrees with an untiled one, and a
    quiet field next to a forest keeps its own, lower, noise level (a constant-false-alarm-rate detector).
    """
    spacing = window // 2
    cell = spacing // _FACTOR
    background = node_medians(_block_means(intensity, valid, spacing), cell, span=2)
    sigma = cell_median_nodes(_abs_samples(intensity, valid, background, spacing), cell, span=4)
    sigma = np.maximum(sigma * np.float32(_MAD_TO_SIGMA), np.float32(floor))
    return LocalLevels(spacing, background, sigma)


def significance_rows(intensity: np.ndarray, valid: np.ndarray | None, levels: LocalLevels, r0: int, r1: int
                      ) -> np.ndarray:
    """float32 ``(intensity − background) / sigma`` of rows ``r0:r1``, 0 at invalid pixels."""
    shape = intensity.shape
    z = intensity[r0:r1] - _upsample_rows(levels.background, levels.spacing, shape, r0, r1)
    z /= _upsample_rows(levels.sigma, levels.spacing, shape, r0, r1)
    if valid is not None:
        z[~valid[r0:r1]] = 0.0
    return z


def significance(intensity: np.ndarray, valid: np.ndarray | None, window: int, floor: float) -> np.ndarray:
    """float32 (h, w) significance map of a tile (see :func:`local_levels`), 0 at invalid pixels."""
    levels = local_levels(intensity, valid, window, floor)
    return significance_rows(intensity, valid, levels, 0, intensity.shape[0])


def beyond(intensity: np.ndarray, valid: np.ndarray | None, levels: LocalLevels, grow: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted flat indices and significance of the pixels with ``|significance| > grow``, strip by strip: the
    whole-tile map is never made."""
    height, width = intensity.shape
    flats, values = [], []
    for r0 in range(0, height, _STRIP):
        z = significance_rows(intensity, valid, levels, r0, min(r0 + _STRIP, height))
        hit = np.flatnonzero(np.abs(z) > np.float32(grow))
        flats.append(hit + r0 * width)
        values.append(z.ravel()[hit])
    return np.concatenate(flats), np.concatenate(values)


def node_medians(grid: np.ndarray, cell: int, span: int) -> np.ndarray:
    """float32 (ny+1, nx+1) medians of the ``span`` × ``span`` cells (of ``cell``² grid values) around each cell
    corner, ignoring NaN.

    With grid values every 4 pixels and cells of ``spacing`` pixels, node (i, j) sits at pixel (i·spacing,
    j·spacing) and sees a window of ``span`` × spacing. Border nodes see reflected cells, so every window is full
    size and a large object near the border cannot dominate it; nodes that see no valid value take the value of the
    nearest node that does.
    """
    ny, nx = grid.shape[0] // cell, grid.shape[1] // cell
    cells = grid.reshape(ny, cell, nx, cell).transpose(0, 2, 1, 3).reshape(ny, nx, cell * cell)
    return _fill_missing(_nan_median(_around(cells, span)))


def cell_median_nodes(grid: np.ndarray, cell: int, span: int) -> np.ndarray:
    """Like :func:`node_medians`, but the median of the cells' medians: as robust, and the sort is 16× smaller."""
    ny, nx = grid.shape[0] // cell, grid.shape[1] // cell
    cells = grid.reshape(ny, cell, nx, cell).transpose(0, 2, 1, 3).reshape(ny, nx, cell * cell)
    return _fill_missing(_nan_median(_around(_nan_median(cells)[..., None], span)))


def _around(cells: np.ndarray, span: int) -> np.ndarray:
    """(ny+1, nx+1, span²·k) the values of the ``span`` × ``span`` cells around each corner, borders reflected."""
    ny, nx = cells.shape[:2]
    half = span // 2
    cells = np.pad(cells, ((half, half), (0, 0), (0, 0)), mode="reflect")
    cells = np.pad(cells, ((0, 0), (half, half), (0, 0)), mode="reflect")
    return np.concatenate([cells[i : i + ny + 1, j : j + nx + 1] for i in range(span) for j in range(span)], axis=-1)


def _nan_median(values: np.ndarray) -> np.ndarray:
    """float32 median along the last axis ignoring NaN (NaN where all are); sorting is far faster than
    ``np.nanmedian`` here."""
    ordered = np.sort(values, axis=-1)
    count = (~np.isnan(ordered)).sum(axis=-1, keepdims=True)
    low = np.take_along_axis(ordered, np.maximum(count - 1, 0) // 2, axis=-1)
    high = np.take_along_axis(ordered, count // 2 - (count == 0), axis=-1)
    return ((low + high) * np.float32(0.5))[..., 0]


def _abs_samples(intensity: np.ndarray, valid: np.ndarray | None, background: np.ndarray, spacing: int
                 ) -> np.ndarray:
    """|intensity − background| at one pixel of every 4×4 block of the tile edge-padded to a multiple of
    ``spacing``, NaN where invalid. Every 16th pixel is plenty for a median; the pixel's position within its block
    cycles through all 16 so that no periodic pattern (compression blocks, sensor striping) can alias into the
    noise estimate. Only the sampled pixels' background is interpolated (edge padding = clipping the index)."""
    height, width = intensity.shape
    rows = np.minimum(_cycling_index(height + -height % spacing, 1), height - 1)
    cols = np.minimum(_cycling_index(width + -width % spacing, 3), width - 1)
    index, weight = _lerp_index(spacing, height)
    lower, upper = background[index[rows]], background[index[rows] + 1]
    node_rows = lower + (upper - lower) * weight[rows][:, None]
    left, right = node_rows[:, cols // spacing], node_rows[:, cols // spacing + 1]
    level = left + (right - left) * _ramp(spacing)[cols % spacing]
    sample = np.abs(intensity[np.ix_(rows, cols)] - level)
    if valid is not None:
        sample[~valid[np.ix_(rows, cols)]] = np.nan
    return sample


@lru_cache(maxsize=64)
def _cycling_index(n: int, stride: int) -> np.ndarray:
    """One index per 4-pixel block, at offset ``(stride · block + stride // 2) mod 4`` within it."""
    block = np.arange(n // _FACTOR)
    return _frozen(block * _FACTOR + (block * stride + stride // 2) % _FACTOR)


def _block_means(intensity: np.ndarray, valid: np.ndarray | None, spacing: int) -> np.ndarray:
    """Means of 4×4 pixel blocks of the tile edge-padded to a multiple of ``spacing``; NaN where none is valid."""
    if valid is None:
        return _block_sum(_pad_to(intensity, spacing)) * np.float32(1.0 / _FACTOR**2)
    weights = _pad_to(valid, spacing).astype(np.float32)
    sums = _block_sum(_pad_to(intensity, spacing) * weights)
    counts = _block_sum(weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.float32(np.nan)).astype(np.float32)


def _pad_to(a: np.ndarray, multiple: int) -> np.ndarray:
    """``a`` edge-padded at the bottom and right to a multiple of ``multiple`` (``a`` itself when it is one)."""
    pad = ((0, -a.shape[0] % multiple), (0, -a.shape[1] % multiple))
    return np.pad(a, pad, mode="edge") if pad[0][1] or pad[1][1] else a


def _block_sum(a: np.ndarray) -> np.ndarray:
    """Sums of 4×4 blocks by strided adds (much faster than a reshape-and-sum over small axes)."""
    rows = a[:, 0::_FACTOR] + a[:, 1::_FACTOR]
    for k in range(2, _FACTOR):
        rows += a[:, k::_FACTOR]
    out = rows[0::_FACTOR] + rows[1::_FACTOR]
    for k in range(2, _FACTOR):
        out += rows[k::_FACTOR]
    return out


def _fill_missing(levels: np.ndarray) -> np.ndarray:
    """Replace NaN nodes by their nearest valid node (all-NaN stays NaN: the caller has no valid pixel)."""
    missing = np.isnan(levels)
    if not missing.any() or missing.all():
        return levels
    from scipy import ndimage  # imported where used: resolving the model on a client needs no scipy

    index = ndimage.distance_transform_edt(missing, return_distances=False, return_indices=True)
    return levels[tuple(index)]


def _upsample_rows(levels: np.ndarray, spacing: int, shape: tuple[int, int], r0: int, r1: int) -> np.ndarray:
    """float32 rows ``r0:r1`` of the bilinear interpolation to an image of ``shape`` of node values at
    (i·spacing, j·spacing), at pixel centres."""
    h, w = shape
    rows = _lerp_axis0(levels, spacing, h, r0, r1)
    steps = np.diff(rows, axis=1)
    ramp = _ramp(spacing)
    out = np.empty((r1 - r0, steps.shape[1], spacing), np.float32)
    np.multiply(steps[:, :, None], ramp, out=out)
    out += rows[:, :-1, None]
    return out.reshape(r1 - r0, -1)[:, :w]


def _lerp_axis0(levels: np.ndarray, spacing: int, n: int, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows of ``levels`` interpolated to the pixel centres ``r0:r1`` of ``n`` along axis 0."""
    index, weight = _lerp_index(spacing, n)
    index, weight = index[r0:r1], weight[r0:r1]
    return levels[index] + (levels[index + 1] - levels[index]) * weight[:, None]


@lru_cache(maxsize=64)
def _lerp_index(spacing: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower node and weight of each pixel centre (k + 0.5) between nodes at multiples of ``spacing``."""
    position = (np.arange(n) + 0.5) / spacing
    index = np.floor(position).astype(np.intp)
    return _frozen(index), _frozen((position - index).astype(np.float32))


@lru_cache(maxsize=64)
def _ramp(spacing: int) -> np.ndarray:
    """Weights of the pixel centres within one node interval."""
    return _frozen(((np.arange(spacing) + 0.5) / spacing).astype(np.float32))


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` made read-only: cached arrays are shared by every call."""
    a.flags.writeable = False
    return a


def signed_components(
    flat: np.ndarray, value: np.ndarray, width: int, seed: float, min_area: int, max_area: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Polarity (True: bright), area, mean ``|value|`` and (x0, y0, x1, y1) box of each 4-connected component of
    the selected pixels (sorted flat indices ``flat`` of a ``width``-wide image, with their signed ``value``) whose
    members share a sign, that holds a ``|value|`` of at least ``seed`` and has ``min_area`` to ``max_area``
    pixels; components in raster order of their first pixel.

    Works on the selected pixels only (a few percent of the tile): both polarities are labelled in one pass over
    that sparse set, and boxes are computed only for the components that survive.
    """
    positive = value > 0
    label, n = four_connected(flat, positive, width)
    magnitude = np.abs(value)
    area = np.bincount(label, minlength=n)
    keep = np.zeros(n, bool)
    keep[label[magnitude >= seed]] = True
    keep &= (area >= min_area) & (area <= max_area)
    survivor = keep[label]
    rank = np.cumsum(keep) - 1
    label, flat, magnitude = rank[label[survivor]], flat[survivor], magnitude[survivor]
    count = int(keep.sum())
    mean = np.bincount(label, weights=magnitude, minlength=count) / area[keep]
    bright = np.zeros(count, bool)
    bright[label] = positive[survivor]
    y, x = np.divmod(flat, width)
    boxes = np.empty((count, 4), np.float64)
    boxes[:, :2] = np.inf
    boxes[:, 2:] = -np.inf
    np.minimum.at(boxes[:, 0], label, x)
    np.minimum.at(boxes[:, 1], label, y)
    np.maximum.at(boxes[:, 2], label, x + 1)
    np.maximum.at(boxes[:, 3], label, y + 1)
    return bright, area[keep], mean, boxes


def four_connected(flat: np.ndarray, group: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """Component label of each of the sorted flat pixel indices ``flat`` of a ``width``-wide image, and the number
    of components: pixels join when they are 4-neighbours in the same ``group``. Labels follow the raster order of
    each component's first pixel, as ``scipy.ndimage.label`` numbers them.

    A sparse graph over the selected pixels only: about 3× faster than labelling each group's full-size mask
    when a few percent of the pixels are selected.
    """
    n = len(flat)
    if n == 0:
        return np.zeros(0, np.intp), 0
    right = np.flatnonzero((flat[1:] == flat[:-1] + 1) & (flat[1:] % width != 0) & (group[1:] == group[:-1]))
    below = np.minimum(np.searchsorted(flat, flat + width), n - 1)
    up = np.flatnonzero((flat[below] == flat + width) & (group[below] == group))
    rows = np.concatenate([right, up])
    columns = np.concatenate([right + 1, below[up]])
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components

    graph = sparse.csr_matrix((np.ones(len(rows), np.int8), (rows, columns)), shape=(n, n))
    count, label = connected_components(graph, directed=False)
    return label.astype(np.intp, copy=False), int(count)
