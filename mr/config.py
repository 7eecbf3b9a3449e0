"""Settings through dask.config (namespace ``mr``), so they reach workers and read from the usual places.

The defaults live in ``config/mr.yaml``; code receives them resolved as frozen dataclasses and never reads
configuration deep inside a task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml

_CANDIDATES = (
    Path(__file__).with_name("mr.yaml"),  # installed wheel
    Path(__file__).resolve().parents[1] / "config" / "mr.yaml",  # source checkout / editable install
)


def _load_defaults() -> None:
    for path in _CANDIDATES:
        if path.exists():
            with open(path) as stream:
                dask.config.update_defaults(yaml.safe_load(stream))
            return
    raise FileNotFoundError(f"mr defaults not found; looked in {', '.join(map(str, _CANDIDATES))}")


_load_defaults()


def get(key: str, override: Any = None) -> Any:
    """``override`` when given, else the configured value of ``mr.<key>``."""
    return dask.config.get(f"mr.{key}") if override is None else override


def load_file(path: str | None) -> None:
    """Merge a YAML file of settings (laid out as config/mr.yaml, under ``mr:``) over the current configuration."""
    if not path:
        return
    with open(path) as stream:
        dask.config.update(dask.config.config, yaml.safe_load(stream) or {}, priority="new")
