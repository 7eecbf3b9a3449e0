"""mr: run machine-learning models over very large geospatial images and get one clean feature collection.

    img = mr.open_image("scene.tif")
    found = mr.detect(img, model="builtin", tile_size=1024, overlap=50)
    frame = found.compute()            # a GeoDataFrame in WGS84

Names are imported on first use, so ``import mr.tiling`` stays light in worker processes.
"""

from importlib import import_module
from typing import Any

from mr import config as _config  # noqa: F401  (loads the defaults into dask.config)

_EXPORTS = {
    "DedupConfig": "mr.merge",
    "DetectionResult": "mr.api",
    "Detections": "mr.detections",
    "ImageOpenError": "mr.errors",
    "InvalidInputError": "mr.errors",
    "Model": "mr.models.base",
    "ModelError": "mr.errors",
    "MrError": "mr.errors",
    "SinkError": "mr.errors",
    "TilingStrategy": "mr.tiling",
    "detect": "mr.api",
    "get_client": "mr.cluster",
    "open_image": "mr.imagery",
    "segment": "mr.raster",
    "write_zarr": "mr.raster",
    "tile_grid": "mr.tiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
