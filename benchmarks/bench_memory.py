"""Peak memory: summed RSS of all processes (client and local Dask workers) running the built-in detector over a
50,000² image ÷ the same over a 10,000² image, each in a fresh process (``bench_pipeline.peak_memory``). Goal ≤ 1.2.

The 50,000² scene (≈ 2.5 GB of pixels, deflate-compressed on disk) is written to ~/.cache/mr-bench on first use.

  python -m benchmarks.bench_memory [--small-size 10000] [--large-size 50000] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil

from benchmarks.bench_pipeline import peak_memory
from benchmarks.common import CACHE, row, scene_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-size", type=int, default=10_000)
    parser.add_argument("--large-size", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    large_path = CACHE / f"scene-{args.large_size}-3.tif"
    if not large_path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        need = args.large_size**2 * 0.8  # deflate leaves about half the raw bytes; keep a margin
        free = shutil.disk_usage(CACHE).free
        if free < need:
            raise SystemExit(f"only {free / 2**30:.1f} GiB free under {CACHE}; the {args.large_size}² scene needs "
                             f"about {need / 2**30:.1f} GiB")
    small, small_seconds = peak_memory(scene_file(args.small_size), args.workers)
    large, large_seconds = peak_memory(scene_file(args.large_size), args.workers)
    ratio = large / small
    print(row(f"peak RSS {args.large_size}² ÷ {args.small_size}²", f"{ratio:.2f}× ({large / 2**20:.0f} MiB)",
              "≤ 1.2", ratio <= 1.2))
    print(f"    {args.small_size}²: {small / 2**20:.0f} MiB, {small_seconds:.1f} s; "
          f"{args.large_size}²: {large / 2**20:.0f} MiB, {large_seconds:.1f} s, "
          f"{args.large_size**2 / 1e6 / large_seconds:.1f} MP/s (built-in detector, {args.workers} workers)")


if __name__ == "__main__":
    main()
