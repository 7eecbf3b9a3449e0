"""mr against SAHI sliced inference, the same built-in detector on the same scene, measured in one run.

Both sides run mr's BuiltinDetector over ``scene_file(SIZE)`` (default 20,000², deflate, one band) with 1024-pixel
tiles and 50 pixels of overlap, each in a fresh subprocess (so neither inflates the other's memory):

- mr: ``mr.detect(mr.open_image(path), "builtin", tile_size=1024, overlap=50)`` computed on
  ``mr.get_client(n_workers=2, threads_per_worker=1)``; its time is detect() through the gathered table (the
  cluster's start is reported apart), its memory the summed RSS of the process and all its workers.
- SAHI (``get_sliced_prediction``): slices of 1024 with overlap ratios 50/1024, its default merging (GREEDYNMM, IOS,
  0.5, class-aware), ``perform_standard_pred=False`` (its default True would also run the detector once over the
  whole 20,000² image: not tiled inference, and GBs of float32), given the whole array read with rasterio (its own
  loader goes through PIL/OpenCV: slower, and drops the georeference); its time includes that read.

Figures: wall time of each and speed mr ÷ SAHI (goal ≥ 2×), peak RSS of each (mr goal ≤ 1 GB), agreement of the
two result sets (match_detections at IoU 0.5), duplicate pairs left in each (IoS > 0.5) and each side's recall and
precision against the planted objects.

  python -m benchmarks.bench_sahi [--size 20000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import PeakMemory, row, scene_file

TILE = 1024
OVERLAP = 50


def run_mr(path: Path, workers: int, out: Path) -> dict:
    import mr
    from mr.cluster import preload_task_modules
    from mr.run import compute_table

    with PeakMemory() as peak:
        started = time.perf_counter()
        with mr.get_client(n_workers=workers, threads_per_worker=1) as client:
            # imports on the workers (SAHI's side imports before its clock starts too)
            client.run(preload_task_modules)
            ready = time.perf_counter()
            result = mr.detect(mr.open_image(path), "builtin", tile_size=TILE, overlap=OVERLAP)
            table = compute_table(result, client)
            seconds = time.perf_counter() - ready
        startup = ready - started
    np.save(out, np.column_stack([table.detections.boxes, table.detections.class_ids]))
    return {"seconds": seconds, "startup": startup, "peak": peak.peak, "n": len(table), "tiles": result.plan.tile_count}


def run_sahi(path: Path, out: Path) -> dict:
    from sahi.predict import get_sliced_prediction

    from benchmarks.sahi_adapter import prediction_boxes, read_array, sahi_model

    model = sahi_model()
    with PeakMemory() as peak:
        started = time.perf_counter()
        image = read_array(path)
        read = time.perf_counter() - started
        result = get_sliced_prediction(
            image,
            model,
            slice_height=TILE,
            slice_width=TILE,
            overlap_height_ratio=OVERLAP / TILE,
            overlap_width_ratio=OVERLAP / TILE,
            perform_standard_pred=False,
            postprocess_type="GREEDYNMM",
            postprocess_match_metric="IOS",
            postprocess_match_threshold=0.5,
            verbose=0,
        )
        seconds = time.perf_counter() - started
    boxes, labels = prediction_boxes(result.object_prediction_list)
    np.save(out, np.column_stack([boxes, labels]))
    durations = result.durations_in_seconds
    return {
        "seconds": seconds,
        "read": read,
        "peak": peak.peak,
        "n": len(boxes),
        "slice": durations.get("slice", 0.0),
        "prediction": durations.get("prediction", 0.0),
        "postprocess": durations.get("postprocess", 0.0),
    }


def probe(side: str, path: Path, workers: int) -> dict:
    """Run one side in a fresh process and return its figures and result boxes."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "boxes.npy"
        command = [
            sys.executable,
            "-m",
            "benchmarks.bench_sahi",
            "--probe",
            side,
            "--path",
            str(path),
            "--workers",
            str(workers),
            "--out",
            str(out),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{side} probe failed:\n{done.stderr[-3000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        table = np.load(out)
    figures["boxes"], figures["labels"] = table[:, :4], table[:, 4].astype(np.int64)
    return figures


def duplicate_pairs(boxes: np.ndarray, threshold: float = 0.5) -> int:
    """Pairs of boxes (any class) whose intersection over the smaller box exceeds ``threshold``."""
    from mr.merge import overlapping_pairs, pair_overlap

    i, j = overlapping_pairs(boxes)
    return int((pair_overlap(boxes, i, j, "ios") > threshold).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--probe", choices=("mr", "sahi"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        figures = run_mr(args.path, args.workers, args.out) if args.probe == "mr" else run_sahi(args.path, args.out)
        print(json.dumps(figures))
        return

    from benchmarks.sahi_adapter import planted_truth
    from mr.synthetic import match_detections

    path = scene_file(args.size)
    truth = planted_truth(args.size)
    path.read_bytes()  # both sides start from a warm page cache
    ours = probe("mr", path, args.workers)
    theirs = probe("sahi", path, args.workers)

    mpx = args.size**2 / 1e6
    speed = theirs["seconds"] / ours["seconds"]
    agree = match_detections(ours["boxes"], theirs["boxes"], min_iou=0.5)
    ours_truth = match_detections(ours["boxes"], truth, min_iou=0.5)
    theirs_truth = match_detections(theirs["boxes"], truth, min_iou=0.5)
    mib = 2**20
    lines = [
        f"scene {args.size}² ({mpx:.0f} MP), {len(truth)} planted objects; tile {TILE}, overlap {OVERLAP}; "
        f"mr {args.workers} workers × 1 thread, SAHI 1 process",
        row("speed mr ÷ SAHI", f"{speed:.2f}×", "≥ 2×", speed >= 2),
        f"    mr   {ours['seconds']:.1f} s ({mpx / ours['seconds']:.0f} MP/s, {ours['tiles']} tiles; "
        f"cluster start {ours['startup']:.1f} s not counted)",
        f"    SAHI {theirs['seconds']:.1f} s ({mpx / theirs['seconds']:.0f} MP/s; "
        f"rasterio read {theirs['read']:.1f} s, slice {theirs['slice']:.1f} s, "
        f"predict {theirs['prediction']:.1f} s, merge {theirs['postprocess']:.2f} s)",
        row("peak RSS of all mr processes", f"{ours['peak'] / mib:.0f} MiB", "≤ 1 GB", ours["peak"] <= 1e9),
        f"    SAHI peak RSS {theirs['peak'] / mib:.0f} MiB",
        f"    detections: mr {ours['n']}, SAHI {theirs['n']}",
        f"    mr vs SAHI (IoU ≥ 0.5): {agree.recall:.3f} of SAHI's found by mr, "
        f"{agree.precision:.3f} of mr's in SAHI's",
        f"    duplicate pairs (IoS > 0.5, any class): mr {duplicate_pairs(ours['boxes'])}, "
        f"SAHI {duplicate_pairs(theirs['boxes'])}",
        f"    vs planted truth (IoU ≥ 0.5): mr recall {ours_truth.recall:.3f} precision {ours_truth.precision:.3f}; "
        f"SAHI recall {theirs_truth.recall:.3f} precision {theirs_truth.precision:.3f}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
