"""Shared pieces of the benchmarks: scene files cached on disk, a peak-memory sampler, a null model."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from mr.detections import Detections

CACHE = Path(os.environ.get("MR_BENCH_CACHE", Path.home() / ".cache" / "mr-bench"))


def scene_file(size: int, *, seed: int = 3, objects_per_mpx: float = 2.0) -> Path:
    """A deflate-compressed tiled GeoTIFF scene of size² uint8 pixels with planted objects (cached)."""
    from mr.synthetic import write_scene

    path = CACHE / f"scene-{size}-{seed}.tif"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.tif")
        write_scene(partial, size, size, n_objects=int(size * size / 1e6 * objects_per_mpx), seed=seed)
        partial.rename(path)
    return path


def uncompressed_copy(path: Path) -> Path:
    """``path`` rewritten as an uncompressed tiled GeoTIFF beside it (cached): reading it costs no decode."""
    import rasterio

    out = path.with_name(path.stem + "-raw.tif")
    if not out.exists():
        partial = out.with_suffix(".partial.tif")
        with rasterio.open(path) as src:
            profile = {**src.profile, "compress": None}
            with rasterio.open(partial, "w", **profile) as dst:
                for _, window in src.block_windows(1):
                    dst.write(src.read(window=window), window=window)
        partial.rename(out)
    return out


class NullModel:
    """A model that finds nothing: what is left is the pipeline's own cost. ``run`` only sets the graph's keys apart:
    a run with the keys of one just finished can be answered from what the scheduler has not yet let go of."""

    name = "null"

    def __init__(self, run: int = 0) -> None:
        self.run = run

    def __call__(self, tiles: np.ndarray) -> list[Detections]:
        return [Detections.empty() for _ in range(len(tiles))]


class PeakMemory:
    """Samples the summed RSS of this process and all its children (dask workers) every few milliseconds."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.peak = self._total()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def listed(values, digits: int = 2) -> str:
    """Numbers as one comma-separated line (the runs behind a figure)."""
    return ", ".join(f"{v:.{digits}f}" for v in values)


def row(name: str, measured: str, goal: str, ok: bool | None) -> str:
    """One figure's line: name, measured, goal and verdict (``reported`` for a figure without a goal)."""
    verdict = "reported" if ok is None else "met" if ok else "NOT MET"
    return f"{name:<44} {measured:>18}   goal {goal:<10} {verdict}"
