"""The one model protocol: a batch of tiles in, one detection table per tile out (tile pixel coordinates)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from mr.detections import Detections


@runtime_checkable
class Model(Protocol):
    """What mr calls for every batch of tiles.

    ``tiles`` has shape (n, bands, height, width) and the image's dtype; every tile in one batch has the same
    shape. The model returns ``n`` tables whose boxes are in that tile's pixel coordinates. A model object is
    pickled into the task graph: it must pickle to its constructor arguments and load heavy state (weights,
    sessions) lazily, once per worker process. In place of a table, a model may return a `TileFailure` for a tile
    it could not process (an endpoint that kept failing): the tile is then recorded as failed, not dropped.
    """

    name: str

    def __call__(self, tiles: np.ndarray) -> "list[Detections | TileFailure]": ...


@dataclass(frozen=True)
class TileFailure:
    """Stands in a model's reply for a tile it could not process (after its retries): recorded, never dropped.

    A job with failed tiles ends PARTIAL, with each failed tile's bounds and reason in its record.
    """

    reason: str
