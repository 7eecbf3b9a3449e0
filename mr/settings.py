"""Resolve user options and configuration into frozen settings, once, on the client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from mr import config
from mr.errors import InvalidInputError
from mr.merge import DedupConfig
from mr.regions import RegionSettings
from mr.tiling import TilingStrategy


@dataclass(frozen=True)
class TilingSettings:
    """How the image is cut: sizes in pixels, as (x, y) pairs."""

    tile_size: tuple[int, int]
    overlap: tuple[int, int]
    region_size: tuple[int, int]
    strategy: TilingStrategy


def _pair(name: str, value: Any) -> tuple[int, int]:
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise InvalidInputError(name, value, "give one size or an (x, y) pair")
    try:
        pair = tuple(int(v) for v in items)
    except (TypeError, ValueError) as error:
        raise InvalidInputError(name, value, "must be whole numbers of pixels") from error
    if any(float(v) != int(v) for v in items):
        raise InvalidInputError(name, value, "must be whole numbers of pixels")
    return pair  # type: ignore[return-value]


def _oversightml_region_size() -> Any:
    """OversightML's REGION_SIZE variable ("(10240, 10240)" or "10240"), when set and no explicit size is given."""
    import os
    import re

    text = os.environ.get("REGION_SIZE", "")
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    return tuple(numbers[:2]) if len(numbers) >= 2 else (numbers[0] if numbers else None)


def resolve_tiling(
    tile_size: Any = None, overlap: Any = None, region_size: Any = None, strategy: Any = None
) -> TilingSettings:
    """Tiling options from arguments, falling back to ``mr.tiling.*``; sizes are checked against each other."""
    tile = _pair("tile_size", config.get("tiling.tile-size", tile_size))
    lap = _pair("overlap", config.get("tiling.overlap", overlap))
    region = _pair("region_size", config.get("tiling.region-size", region_size or _oversightml_region_size()))
    for t, o, r in zip(tile, lap, region):
        if t < 1:
            raise InvalidInputError("tile_size", tile_size, "must be a positive number of pixels")
        if not 0 <= o < t:
            raise InvalidInputError("overlap", overlap, f"must be at least 0 and less than tile_size ({t})")
        if r < t:
            raise InvalidInputError("region_size", region_size, f"must be at least tile_size ({t})")
    return TilingSettings(tile, lap, region, TilingStrategy.parse(config.get("tiling.strategy", strategy)))


def resolve_dedup(nms: Any = None) -> DedupConfig:
    """``nms`` may be a DedupConfig, a method name ("nms", "soft-nms", "none"), a mapping of fields, or None."""
    if isinstance(nms, DedupConfig):
        return nms
    fields = {key.replace("-", "_"): value for key, value in dict(config.get("dedup")).items()}
    if isinstance(nms, str):
        fields["method"] = nms
    elif isinstance(nms, Mapping):
        fields.update({str(k).replace("-", "_"): v for k, v in nms.items()})
    elif nms is False:
        fields["method"] = "none"
    elif nms is not None:
        raise InvalidInputError("nms", nms, "give a method name, a mapping of DedupConfig fields or a DedupConfig")
    unknown = set(fields) - set(DedupConfig.__dataclass_fields__)
    if unknown:
        raise InvalidInputError(
            "nms", sorted(unknown), f"unknown fields; allowed: {sorted(DedupConfig.__dataclass_fields__)}"
        )
    return DedupConfig(**fields)


def resolve_region_settings(nms: Any = None, batch_size: Any = None) -> RegionSettings:
    """Everything a region task needs besides the grid and the model."""
    batch = config.get("tiling.batch-size", batch_size)
    if not isinstance(batch, int) or batch < 1:
        raise InvalidInputError("batch_size", batch, "must be a positive whole number of tiles")
    return RegionSettings(batch, resolve_dedup(nms), float(config.get("tiling.seam-margin")))
