"""The one model protocol: a batch of tiles in, one detection table per tile out (tile pixel coordinates)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from mr.detections import Detections


@runtime_checkable
class Model(Protocol):
    """What mr calls for every batch of tiles.

    ``tiles`` has shape (n, bands, height, width) and the image's dtype; every tile in one batch has the same
    shape. The model returns ``n`` tables whose boxes are in that tile's pixel coordinates. A model object is
    pickled into the task graph: it must pickle to its constructor arguments and load heavy state (weights,
    sessions) lazily, once per worker process.
    """

    name: str

    def __call__(self, tiles: np.ndarray) -> list[Detections]: ...
