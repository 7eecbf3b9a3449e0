"""Write a feature table to a local file, completely or not at all (GeoJSON or GeoParquet by extension)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mr.errors import InvalidInputError, SinkError
from mr.features import FeatureTable, OutputMetadata, iter_geojson_features, to_geodataframe

GEOJSON_SUFFIXES = (".geojson", ".json")
PARQUET_SUFFIXES = (".parquet", ".geoparquet")


def output_format(path: str | os.PathLike) -> str:
    """'geojson' or 'parquet' from the file name; anything else is an error that lists what works."""
    suffix = Path(path).suffix.lower()
    if suffix in GEOJSON_SUFFIXES:
        return "geojson"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise InvalidInputError("output path", str(path), f"use one of {GEOJSON_SUFFIXES + PARQUET_SUFFIXES}")


def write_features(table: FeatureTable, meta: OutputMetadata, path: str | os.PathLike) -> Path:
    """Write to a temporary file beside ``path`` and rename it into place, so readers never see half a file."""
    path = Path(path)
    kind = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        if kind == "geojson":
            _write_geojson(table, meta, temporary)
        else:
            to_geodataframe(table, meta).to_parquet(temporary)
        os.replace(temporary, path)
    except Exception as error:
        Path(temporary).unlink(missing_ok=True)
        raise SinkError(f"could not write {path}: {error}") from error
    return path


def _write_geojson(table: FeatureTable, meta: OutputMetadata, path: str) -> None:
    with open(path, "w", encoding="utf-8") as stream:
        stream.write('{"type": "FeatureCollection", "features": [')
        for i, feature in enumerate(iter_geojson_features(table, meta)):
            stream.write(",\n" if i else "\n")
            json.dump(feature, stream, separators=(",", ":"), allow_nan=False)
        stream.write("\n]}\n")
        stream.flush()
        os.fsync(stream.fileno())
