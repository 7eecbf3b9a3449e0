"""De-duplicate detections found twice where tiles overlap: pure numpy kernels, no dask, no I/O.

The work is split so that nothing is ever quadratic in the number of boxes:

1. :func:`overlapping_pairs` finds the few pairs of boxes that touch at all, with a hierarchical grid;
2. :func:`pair_overlap` scores those pairs (IoU or IoS), and only pairs above the threshold are kept as edges;
3. :func:`nms` / :func:`soft_nms` run the classic sequential algorithms over that sparse graph only, so Python-level
   work is proportional to the number of boxes that have a duplicate, not to the size of the table.

Both algorithms give exactly the result of their textbook O(N²) form (``tests/test_merge.py`` checks this). The
grid beats ``shapely.STRtree`` several times over on a million boxes; ``benchmarks/bench_merge.py`` times both.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mr.detections import Detections
from mr.errors import InvalidInputError

METHODS = ("nms", "soft-nms", "none")
METRICS = ("iou", "ios")
_HALF_NEIGHBOURS = ((1, 0), (-1, 1), (0, 1), (1, 1))
_ALL_NEIGHBOURS = tuple((dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
_BASE_CELL_QUANTILE = 0.99
_EMPTY_PAIRS = (np.empty(0, np.int64), np.empty(0, np.int64))


@dataclass(frozen=True)
class DedupConfig:
    """How detections from overlapping tiles are merged; resolved once, then passed to :func:`deduplicate`."""

    method: str = "nms"
    """``"nms"`` drops duplicates, ``"soft-nms"`` lowers their scores (Gaussian), ``"none"`` keeps everything."""
    threshold: float = 0.75
    """Overlap strictly above which two boxes are duplicates (nms) or decay each other (soft-nms); in (0, 1]."""
    metric: str = "iou"
    """``"iou"``, or ``"ios"`` (intersection over the smaller box) which also catches a box truncated by a tile
    edge lying inside the whole box found by the neighbouring tile."""
    class_aware: bool = True
    """Compare only boxes of the same class."""
    sigma: float = 0.5
    """Soft-NMS: a duplicate's score is multiplied by ``exp(-overlap**2 / sigma)``; > 0."""
    skip_box_threshold: float = 0.001
    """Soft-NMS: boxes whose (decayed) score is below this are dropped; in [0, 1]."""

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("metric", self.metric, METRICS)
        for field in _RANGES:
            _check_number(field, getattr(self, field))
        if not isinstance(self.class_aware, (bool, np.bool_)):
            raise InvalidInputError("class_aware", self.class_aware, "must be True or False")


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(field, value, f"must be one of {', '.join(map(repr, allowed))}")


_RANGES = {
    "threshold": (lambda v: 0 < v <= 1, "must be a number in (0, 1]; 1 disables suppression"),
    "sigma": (lambda v: 0 < v < np.inf, "must be a finite number > 0, e.g. 0.5"),
    "skip_box_threshold": (lambda v: 0 <= v <= 1, "must be a number in [0, 1]; 0 never drops a box"),
}


def _check_number(field: str, value: object) -> None:
    within, reason = _RANGES[field]
    is_number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not (is_number and within(value)):
        raise InvalidInputError(field, value, reason)


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    """Boxes as float64 (n, 4), finite, with x1 >= x0 and y1 >= y0 (zero-area boxes are allowed)."""
    array = np.asarray(boxes, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise InvalidInputError("boxes", array.shape, "must have shape (n, 4): x0, y0, x1, y1")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1) | (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))
    if bad.size:
        raise InvalidInputError("boxes", array[bad[0]].tolist(), f"row {bad[0]} (and {bad.size - 1} more) is not a "
                                "finite box with x1 >= x0 and y1 >= y0")
    return array


def _as_column(field: str, values: np.ndarray | None, n: int, kind: str) -> np.ndarray | None:
    """A per-box column of length n: finite floats (``kind="f"``) or integers (``kind="i"``)."""
    if values is None:
        return None
    array = np.asarray(values)
    if array.shape != (n,):
        raise InvalidInputError(field, array.shape, f"must have shape ({n},), one value per box")
    if kind == "i" and n and array.dtype.kind not in "iu":
        raise InvalidInputError(field, array.dtype, "must be integers (e.g. class ids)")
    if kind == "f" and not np.isfinite(array.astype(np.float64)).all():
        raise InvalidInputError(field, "non-finite values", "every score must be finite")
    return array


def _group_codes(groups: np.ndarray) -> np.ndarray:
    """Small non-negative int64 codes with the same equality as ``groups`` (they become the top bits of a key)."""
    if len(groups) == 0:
        return np.zeros(0, np.int64)
    low, high = int(groups.min()), int(groups.max())
    if high - low < 1 << 20:
        return groups.astype(np.int64) - low
    return np.unique(groups, return_inverse=True)[1].astype(np.int64).reshape(-1)


def _spread_bits(v: np.ndarray) -> np.ndarray:
    """Put bit b of each (< 2**31) value at bit 2b: half of a Morton code."""
    for shift, mask in ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                        (2, 0x3333333333333333), (1, 0x5555555555555555)):
        v = (v | (v << shift)) & mask
    return v


def _cell_key(cx: np.ndarray, cy: np.ndarray, codes: np.ndarray, bits: int) -> np.ndarray:
    """Group code above a Morton code: sorting by it sorts by cell, and ``key >> 2k`` is the key of the parent cell
    k levels up, so one sort serves every level of the grid."""
    return (codes << (2 * bits)) | _spread_bits(cx) | (_spread_bits(cy) << 1)


def _grid_cells(boxes: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Cell (x, y) of every box's first corner, the box's level, and the bits per axis of the finest grid.

    The finest cells are about as large as nearly all boxes: a few huge boxes must not set the size for everyone.
    A box's level is the first k at which the cells of its two corners, ``>> k``, are at most one apart. Coordinates
    map to cells by a monotone function, so two overlapping boxes provably lie at most one cell apart at the level of
    the larger one: no epsilon is needed."""
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    origin = boxes[:, :2].min(axis=0)
    extent = float(np.max(boxes[:, 2:].max(axis=0) - origin))
    if not np.isfinite(extent):
        raise InvalidInputError("boxes", extent, "coordinates span more than float64 can hold")
    bits = min(31, (62 - int(codes.max(initial=0)).bit_length()) // 2)  # group code and Morton code share 62 bits
    cell = max(float(np.quantile(sides, _BASE_CELL_QUANTILE)), extent / ((1 << bits) - 2))
    x0, y0, x1, y1 = (np.clip(np.floor((boxes[:, c] - origin[c % 2]) / cell), 0, (1 << bits) - 1).astype(np.int64)
                      for c in range(4))
    level = np.zeros(len(boxes), np.int64)
    todo = np.flatnonzero((x1 - x0 > 1) | (y1 - y0 > 1))
    k = 0
    while todo.size:
        k += 1
        fits = ((x1[todo] >> k) - (x0[todo] >> k) <= 1) & ((y1[todo] >> k) - (y0[todo] >> k) <= 1)
        level[todo[fits]] = k
        todo = todo[~fits]
    return x0, y0, level, bits


def _runs(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of every run of equal values in a sorted array."""
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return starts, np.diff(np.r_[starts, len(keys)])


def _cross_product(a0: np.ndarray, alen: np.ndarray, b0: np.ndarray, blen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (a, b) with a in [a0, a0+alen) and b in [b0, b0+blen), for each block, without a Python loop."""
    counts = alen * blen
    block = np.repeat(np.arange(len(counts)), counts)
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    width = blen[block]
    return a0[block] + offset // width, b0[block] + offset % width


def _within_runs(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (a, b) with a < b inside the same run."""
    run = np.repeat(np.arange(len(starts)), lengths)
    position = np.arange(int(lengths.sum()))
    partners = starts[run] + lengths[run] - position - 1
    first = np.repeat(position, partners)
    step = np.arange(len(first)) - np.repeat(np.cumsum(partners) - partners, partners)
    return first, first + 1 + step


def _neighbour_keys(keys: np.ndarray, dx: int, dy: int, bits: int) -> np.ndarray:
    """Keys of the cells (dx, dy) away, in the same group, by carry arithmetic on the interleaved bits: with the other
    axis's bits set, +1 ripples through this axis's bits only (likewise -1). The caller keeps cells inside the grid."""
    x_mask = 0x5555555555555555 & ((1 << 2 * bits) - 1)
    moved = keys & ~(x_mask | x_mask << 1)
    for delta, mask in ((dx, x_mask), (dy, x_mask << 1)):
        moved |= ((keys | ~mask) + 1 if delta > 0 else (keys & mask) - 1 if delta < 0 else keys) & mask
    return moved


def _neighbours(keys: np.ndarray, cells: tuple[np.ndarray, np.ndarray], bits: int, starts: np.ndarray,
                lengths: np.ndarray, offsets: tuple[tuple[int, int], ...]) -> Iterator[tuple[np.ndarray, ...]]:
    """For each offset: the runs of ``keys`` (start, length) whose cell has that neighbour inside the grid, and the
    neighbour's key."""
    cx, cy, run_keys = cells[0][starts], cells[1][starts], keys[starts]
    for dx, dy in offsets:
        nx, ny = cx + dx, cy + dy
        inside = np.flatnonzero((nx >= 0) & (ny >= 0) & (nx >> bits == 0) & (ny >> bits == 0))
        yield starts[inside], lengths[inside], _neighbour_keys(run_keys[inside], dx, dy, bits)


def _pairs_within(keys: np.ndarray, cells: tuple[np.ndarray, np.ndarray], bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a, b) of entries of one level (sorted ``keys``, cells ``(cx, cy)``) in the same or neighbouring
    cells: each pair once, from its own cell and half of the 8 neighbours."""
    starts, lengths = _runs(keys)
    unique = keys[starts]
    parts = [_within_runs(starts, lengths)]
    for first, count, wanted in _neighbours(keys, cells, bits, starts, lengths, _HALF_NEIGHBOURS):
        found = np.minimum(np.searchsorted(unique, wanted), len(unique) - 1)
        hit = unique[found] == wanted
        parts.append(_cross_product(first[hit], count[hit], starts[found[hit]], lengths[found[hit]]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _pairs_across(keys: np.ndarray, cells: tuple[np.ndarray, np.ndarray], bits: int, all_keys: np.ndarray,
                  shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a, b) of an entry of one level and an entry of the sorted finest ``all_keys`` in the same or one of
    the 8 neighbouring cells of that level: a coarse cell is one contiguous range of finest Morton keys, so two
    binary searches find it without touching the other n boxes."""
    starts, lengths = _runs(keys)
    parts = []
    for first, count, wanted in _neighbours(keys, cells, bits, starts, lengths, _ALL_NEIGHBOURS):
        low, high = np.searchsorted(all_keys, wanted << shift), np.searchsorted(all_keys, (wanted + 1) << shift)
        parts.append(_cross_product(first, count, low, high - low))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def overlapping_pairs(boxes: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of boxes whose interiors intersect (and, given ``groups``, share a group).

    A hierarchical grid: every box lives in one cell at the level whose cells are at least as large as the box, and
    is compared with the boxes of its own and the 8 neighbouring cells at that level, and with the smaller boxes there.
    Cost is about O(n log n + pairs found) for any mix of sizes; one huge box costs one O(n) pass, never O(n²), and a
    box much larger than most is checked against the smaller boxes in the 3 x 3 cells of its own size around it.
    Zero-area boxes have no interior and appear in no pair. Pairs come in no particular order."""
    boxes = _as_boxes(boxes)
    return _overlapping_pairs(boxes, _as_column("groups", groups, len(boxes), "i"))


def _overlapping_pairs(boxes: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`overlapping_pairs` of validated input."""
    live = np.flatnonzero((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    if len(live) < 2:
        return _EMPTY_PAIRS
    codes = np.zeros(len(live), np.int64) if groups is None else _group_codes(groups[live])
    cx, cy, level, bits = _grid_cells(boxes[live], codes)
    keys = _cell_key(cx, cy, codes, bits)
    order = np.argsort(keys)
    keys, cx, cy, level = keys[order], cx[order], cy[order], level[order]
    by_level = np.argsort(level.astype(np.int8), kind="stable")  # a radix sort; keeps key order within a level
    found_a, found_b = [], []
    for start, count in zip(*(r.tolist() for r in _runs(level[by_level]))):
        own = by_level[start:start + count]
        k = int(level[own[0]])
        cells, own_keys = (cx[own] >> k, cy[own] >> k), keys[own] >> 2 * k
        a, b = _pairs_within(own_keys, cells, bits - k)
        found_a.append(own[a]), found_b.append(own[b])
        if k:  # and every smaller box near each box of this level
            a, b = _pairs_across(own_keys, cells, bits - k, keys, 2 * k)
            smaller = level[b] < k
            found_a.append(own[a[smaller]]), found_b.append(b[smaller])
    i, j = live[order[np.concatenate(found_a)]], live[order[np.concatenate(found_b)]]
    x0, y0, x1, y1 = boxes.T
    touching = (x0[i] < x1[j]) & (x0[j] < x1[i]) & (y0[i] < y1[j]) & (y0[j] < y1[i])
    i, j = i[touching], j[touching]
    return np.minimum(i, j), np.maximum(i, j)


def pair_overlap(boxes: np.ndarray, i: np.ndarray, j: np.ndarray, metric: str) -> np.ndarray:
    """Overlap of box ``i[k]`` with box ``j[k]`` for every k: IoU, or IoS (intersection over the smaller area).

    Where the denominator is 0 (zero-area boxes) the overlap is 0: such a box never suppresses anything."""
    _check_choice("metric", metric, METRICS)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    a, b = boxes[np.asarray(i, np.int64)], boxes[np.asarray(j, np.int64)]
    width = np.maximum(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0)
    height = np.maximum(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    denominator = area_a + area_b - inter if metric == "iou" else np.minimum(area_a, area_b)
    out = np.zeros(len(inter))
    np.divide(inter, denominator, out=out, where=denominator > 0)
    return out


def _duplicate_edges(boxes: np.ndarray, threshold: float, metric: str,
                     groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs whose overlap is strictly above ``threshold``, and that overlap: the only pairs NMS ever looks at."""
    _check_number("threshold", threshold)
    _check_choice("metric", metric, METRICS)
    i, j = _overlapping_pairs(boxes, _as_column("groups", groups, len(boxes), "i"))
    overlap = pair_overlap(boxes, i, j, metric)
    above = overlap > threshold
    return i[above], j[above], overlap[above]


def nms(boxes: np.ndarray, scores: np.ndarray, *, threshold: float, metric: str = "iou",
        groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy non-maximum suppression; the kept indices, ascending.

    Exactly the textbook algorithm: visit boxes by descending score (ties: lower index first); a box is suppressed
    when a box kept before it overlaps it strictly more than ``threshold`` (with equal group, if ``groups`` is
    given). Only boxes with such an edge enter the sequential loop, which walks a CSR adjacency."""
    boxes = _as_boxes(boxes)
    scores = _as_column("scores", scores, len(boxes), "f")
    i, j, _ = _duplicate_edges(boxes, threshold, metric, groups)
    suppressed = np.zeros(len(boxes), bool)
    if len(i):
        nodes = np.unique(np.r_[i, j])
        order = nodes[np.argsort(-scores[nodes], kind="stable")]  # by descending score, then ascending index
        rank = np.empty(len(boxes), np.int64)
        rank[order] = np.arange(len(order))
        first = rank[i] < rank[j]
        winner_rank, loser = np.where(first, rank[i], rank[j]), np.where(first, j, i)
        by_winner = np.argsort(winner_rank, kind="stable")
        starts, lengths = _runs(winner_rank[by_winner])
        losers = loser[by_winner]
        winners = order[winner_rank[by_winner][starts]].tolist()
        for winner, start, stop in zip(winners, starts.tolist(), (starts + lengths).tolist()):
            if not suppressed[winner]:
                suppressed[losers[start:stop]] = True
    return np.flatnonzero(~suppressed)


def soft_nms(boxes: np.ndarray, scores: np.ndarray, *, threshold: float, sigma: float, skip_box_threshold: float,
             metric: str = "iou", groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian soft-NMS (Bodla et al. 2017); the kept indices (ascending) and their float64 decayed scores.

    Repeatedly take the remaining box with the highest current score (ties: lower index) and multiply the score of
    every remaining box that overlaps it strictly more than ``threshold`` by ``exp(-overlap**2 / sigma)``. A box
    whose score is, or falls, below ``skip_box_threshold`` is dropped at once and decays nothing. The paper decays
    every overlapping pair; threshold=1e-12 reproduces that: below it the factor rounds to 1.0 (for sigma >= 1e-7).
    Boxes with no such neighbour keep their score; the rest run through a heap with lazy deletion."""
    _check_number("sigma", sigma)
    _check_number("skip_box_threshold", skip_box_threshold)
    boxes = _as_boxes(boxes)
    current = _as_column("scores", scores, len(boxes), "f").astype(np.float64)
    i, j, overlap = _duplicate_edges(boxes, threshold, metric, groups)
    alive = current >= skip_box_threshold
    if len(i):
        source, target = np.r_[i, j], np.r_[j, i]
        by_source = np.argsort(source, kind="stable")
        nodes, starts = np.unique(source[by_source], return_index=True)
        local_target = np.searchsorted(nodes, target[by_source])
        decay = np.tile(np.exp(-(overlap * overlap) / sigma), 2)[by_source]
        local_scores, local_alive = _decay(current[nodes], alive[nodes], np.r_[starts, len(source)],
                                           local_target, decay, skip_box_threshold)
        current[nodes], alive[nodes] = local_scores, local_alive
    kept = np.flatnonzero(alive)
    return kept, current[kept]


def _decay(scores: np.ndarray, alive: np.ndarray, indptr: np.ndarray, targets: np.ndarray, decay: np.ndarray,
           skip: float) -> tuple[np.ndarray, np.ndarray]:
    """The sequential soft-NMS loop over a CSR graph whose nodes are numbered in index order (so heap ties on the
    node number are ties on the box index)."""
    current, live, done = scores.tolist(), alive.tolist(), (~alive).tolist()
    ptr, neighbour, factor = indptr.tolist(), targets.tolist(), decay.tolist()
    heap = [(-s, u) for u, s in enumerate(current) if live[u]]
    heapq.heapify(heap)
    while heap:
        negative, u = heapq.heappop(heap)
        if done[u] or -negative != current[u]:
            continue  # a stale entry: the box was decayed (and pushed again) or finished since
        done[u] = True
        for e in range(ptr[u], ptr[u + 1]):
            v = neighbour[e]
            if done[v]:
                continue
            current[v] *= factor[e]
            if current[v] < skip:
                done[v] = True
                live[v] = False
            else:
                heapq.heappush(heap, (-current[v], v))
    return np.asarray(current), np.asarray(live, bool)


def deduplicate(detections: Detections, config: DedupConfig) -> Detections:
    """The rows of ``detections`` that survive ``config`` (soft-NMS: with decayed scores), in their original order."""
    if config.method == "none" or len(detections) == 0:
        return detections
    groups = detections.class_ids if config.class_aware else None
    if config.method == "nms":
        kept = nms(detections.boxes, detections.scores, threshold=config.threshold, metric=config.metric,
                   groups=groups)
        return detections.take(kept)
    kept, scores = soft_nms(detections.boxes, detections.scores, threshold=config.threshold, sigma=config.sigma,
                            skip_box_threshold=config.skip_box_threshold, metric=config.metric, groups=groups)
    return detections.take(kept).with_scores(scores.astype(np.float32))
