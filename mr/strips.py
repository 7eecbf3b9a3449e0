"""A region's pixels, read top to bottom as its tiles first need them: the block a region task hands its tiles.

Reading a whole region before its first tile reaches the model leaves the model idle for the whole read (tens of
milliseconds for a 4096² window): at the start of every job and at every region an endpoint's calls wait for.
Read in strips instead, a region's first calls go out after one strip, and the rest of the read overlaps them.
Strips end on the file's block rows, so no block is decoded twice. The strips fill one preallocated array, so the
tiles are still views of one block and a caller that wants it whole (``pixels()``) gets exactly what one read gave.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

ReadRows = Callable[[int, int, np.ndarray], object]
"""``read(start, stop, out)``: write the region's rows ``start:stop`` (all bands, full width) into ``out``."""


class RegionPixels:
    """A (bands, y, x) region block whose rows are read on demand, in order; ``rows(stop)`` reads up to ``stop``."""

    def __init__(
        self, array: np.ndarray, read: ReadRows | None = None, *, origin: int = 0, step: int | Callable[[], int] = 1
    ) -> None:
        """``array`` receives the pixels (already whole when ``read`` is None). ``origin`` is the block's first row
        in the file and ``step`` the file's rows per block (or how to find them out, asked at the first read):
        reads are extended to end on a block row."""
        self.array = array
        self._read = read
        self.origin = origin
        self._step = step
        self.loaded = array.shape[1] if read is None else 0
        self.seconds = 0.0
        """Time spent reading so far."""

    @classmethod
    def ready(cls, block: np.ndarray) -> RegionPixels:
        """Pixels already in memory (a dask block): nothing to read."""
        return cls(block)

    @classmethod
    def of(cls, block: RegionPixels | np.ndarray) -> RegionPixels:
        """``block`` itself if it is a RegionPixels, else the array as pixels already read."""
        return block if isinstance(block, RegionPixels) else cls.ready(block)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def height(self) -> int:
        return self.array.shape[1]

    def rows(self, stop: int) -> np.ndarray:
        """The block, with at least its first ``stop`` rows read (rows past them may still be unread)."""
        stop = min(int(stop), self.height)
        if stop > self.loaded:
            end = self._block_row_end(stop) if stop < self.height else stop
            started = time.perf_counter()
            self._read(self.loaded, end, self.array[:, self.loaded : end])
            self.seconds += time.perf_counter() - started
            self.loaded = end
        return self.array

    def _block_row_end(self, stop: int) -> int:
        """``stop`` moved on to the end of the file block row it falls in (the file's block height is asked for
        only here: a whole read needs none)."""
        if callable(self._step):
            self._step = self._step()
        step = max(int(self._step), 1)
        return min(-((self.origin + stop) // -step) * step - self.origin, self.height)

    def __call__(self) -> np.ndarray:
        """The whole block, read."""
        return self.rows(self.height)
