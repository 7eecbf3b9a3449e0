"""De-duplication benchmark: seconds to merge 1,000,000 detections on one core (goal ≤ 2 s), and a correctness check.

The table is what a 100,000² image gives: 10–40 px boxes scattered at random, three classes, and about 3% seam
duplicates planted beside their originals with a lower score: two thirds jittered by up to ±0.5 px (the same object
seen from both tiles), one third truncated by a tile cut through 30–70% of the box (IoU misses those, IoS doesn't).

    python benchmarks/bench_merge.py [--rows 1000000] [--repeats 3] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mr.detections import Detections  # noqa: E402
from mr.merge import DedupConfig, deduplicate, overlapping_pairs  # noqa: E402

T = TypeVar("T")
GOAL_SECONDS = 2.0
IMAGE_SIZE = 100_000.0


@dataclass(frozen=True)
class Scene:
    """A detection table with the role of every row: original, jittered duplicate or truncated duplicate."""

    detections: Detections
    source: np.ndarray
    """int64 per row: the row this one duplicates, -1 for an original."""
    truncated: np.ndarray
    """bool per row: a duplicate cut by a tile edge."""


def make_scene(rows: int, seed: int, duplicate_fraction: float = 0.03) -> Scene:
    """Originals scattered over the image, then duplicates of a random few, all shuffled together."""
    rng = np.random.default_rng(seed)
    n_dup = int(round(rows * duplicate_fraction))
    n_orig = rows - n_dup
    corner = rng.uniform(0, IMAGE_SIZE - 40, (n_orig, 2))
    boxes = np.c_[corner, corner + rng.uniform(10, 40, (n_orig, 2))]
    scores = rng.uniform(0.3, 1.0, n_orig)
    classes = rng.integers(0, 3, n_orig)
    source = rng.choice(n_orig, n_dup, replace=False)
    copies = boxes[source] + rng.uniform(-0.5, 0.5, (n_dup, 4))
    truncated = rng.random(n_dup) < 1 / 3
    copies[truncated] = _truncate(boxes[source[truncated]], rng)
    order = rng.permutation(rows)  # duplicates must not sit conveniently at the end
    all_boxes = np.r_[boxes, copies][order]
    all_scores = np.r_[scores, scores[source] * rng.uniform(0.8, 0.99, n_dup)][order]
    all_classes = np.r_[classes, classes[source]][order]
    position = np.argsort(order)  # where each unshuffled row went
    all_source = np.r_[np.full(n_orig, -1), position[source]][order]
    all_truncated = np.r_[np.zeros(n_orig, bool), truncated][order]
    rows_column = {"row": np.arange(rows)}  # carried through deduplicate: says which input row each output row is
    table = Detections(all_boxes, all_scores, all_classes, ("car", "truck", "bus"), properties=rows_column)
    return Scene(table, all_source, all_truncated)


def _truncate(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The part of each box on one side of a tile cut through 30–70% of it, as the other tile would see it."""
    cut = boxes.copy()
    fraction = rng.uniform(0.3, 0.7, len(boxes))
    vertical, keep_low = rng.random(len(boxes)) < 0.5, rng.random(len(boxes)) < 0.5
    for axis, rows in ((0, vertical), (1, ~vertical)):
        at = boxes[rows, axis] + fraction[rows] * (boxes[rows, axis + 2] - boxes[rows, axis])
        low = keep_low[rows]
        cut[np.flatnonzero(rows)[low], axis + 2] = at[low]
        cut[np.flatnonzero(rows)[~low], axis] = at[~low]
    return cut


def pin_to_one_core() -> str:
    """Run on a single core so the figure is per core, whatever the machine."""
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity here)"
    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to core {core}"


def timed(work: Callable[[], T], repeats: int) -> tuple[T, list[float]]:
    """The result of ``work`` and the seconds each of ``repeats`` calls took (the first one is cold)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = work()
        seconds.append(time.perf_counter() - started)
    return result, seconds


def neighbour_counts(boxes: np.ndarray) -> np.ndarray:
    """How many other boxes each box touches (boundaries included), found independently of mr with shapely."""
    import shapely

    polygons = shapely.box(*boxes.T)
    first, second = shapely.STRtree(polygons).query(polygons, predicate="intersects")
    return np.bincount(first[first != second], minlength=len(boxes))


@dataclass(frozen=True)
class Expected:
    """The rows whose fate is known from the planting alone: a duplicate and its original touching nothing else,
    and originals touching nothing at all."""

    duplicates: np.ndarray
    originals: np.ndarray
    truncated: np.ndarray
    lone: np.ndarray

    @classmethod
    def of(cls, scene: Scene) -> "Expected":
        touches = neighbour_counts(scene.detections.boxes)
        duplicate = np.flatnonzero(scene.source >= 0)
        isolated = (touches[duplicate] == 1) & (touches[scene.source[duplicate]] == 1)
        duplicate = duplicate[isolated]
        return cls(duplicate, scene.source[duplicate], scene.truncated[duplicate], np.flatnonzero(touches == 0))


def check_nms(scene: Scene, expected: Expected, kept: Detections, config: DedupConfig) -> tuple[bool, str]:
    """Isolated planted duplicates are gone (truncated ones only with IoS: their IoU is at most 0.7), their originals
    and every lone box are kept."""
    kept_mask = np.zeros(len(scene.detections), bool)
    kept_mask[kept.properties["row"]] = True
    removable = ~expected.truncated if config.metric == "iou" else np.ones(len(expected.duplicates), bool)
    must_go, must_stay = expected.duplicates[removable], np.r_[expected.duplicates[~removable], expected.originals,
                                                                expected.lone]
    wrong = int(kept_mask[must_go].sum()) + int((~kept_mask[must_stay]).sum())
    removed = int((~kept_mask[expected.duplicates]).sum())
    note = (f"{wrong} wrong; {removed:,} of {len(expected.duplicates):,} isolated duplicates removed "
            f"({int(expected.truncated.sum()):,} truncated), {len(expected.lone):,} lone boxes kept")
    return wrong == 0, note


def check_soft_nms(scene: Scene, expected: Expected, result: Detections) -> tuple[bool, str]:
    """Every row is kept; isolated duplicates get a lower score (truncated ones too, by IoS), their originals and the
    lone boxes keep theirs."""
    new = np.full(len(scene.detections), np.nan, np.float32)
    new[result.properties["row"]] = result.scores
    old = scene.detections.scores
    lowered = new[expected.duplicates] < old[expected.duplicates]
    intact = np.r_[expected.originals, expected.lone]
    wrong = int((~lowered).sum()) + int((new[intact] != old[intact]).sum()) + len(scene.detections) - len(result)
    return wrong == 0, f"{wrong} wrong; {int(lowered.sum()):,} isolated duplicates lowered, {len(intact):,} kept as is"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(pin_to_one_core())
    scene = make_scene(args.rows, args.seed)
    print(f"{len(scene.detections):,} detections, {int((scene.source >= 0).sum()):,} planted duplicates")
    configs = {
        "nms ios": DedupConfig(method="nms", metric="ios", threshold=0.75),
        "nms iou": DedupConfig(method="nms", metric="iou", threshold=0.75),
        "soft-nms ios": DedupConfig(method="soft-nms", metric="ios", threshold=0.75),
    }
    started = time.perf_counter()
    expected = Expected.of(scene)
    strtree = time.perf_counter() - started
    _, pair_seconds = timed(lambda: overlapping_pairs(scene.detections.boxes), args.repeats)
    print(f"finding touching pairs: mr.merge.overlapping_pairs {min(pair_seconds):.3f} s, "
          f"shapely STRtree (boxes, tree, query; the reference for the checks) {strtree:.3f} s")
    all_ok = True
    for name, config in configs.items():
        result, seconds = timed(lambda: deduplicate(scene.detections, config), args.repeats)
        best = min(seconds)
        if config.method == "soft-nms":
            ok, note = check_soft_nms(scene, expected, result)
        else:
            ok, note = check_nms(scene, expected, result, config)
        meets = best <= GOAL_SECONDS
        all_ok &= ok and (meets or config.method != "nms")
        print(f"{name:<13} best {best:6.3f} s  first {seconds[0]:6.3f} s  best/goal {best / GOAL_SECONDS:5.2f}  "
              f"({'met' if meets else 'NOT MET'})  kept {len(result):,}  check {'ok' if ok else 'FAILED'}: {note}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
