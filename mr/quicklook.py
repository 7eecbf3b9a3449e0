"""A look at what was found: a small picture of a possibly huge image with the detections drawn on it.

``overview`` never reads the image whole. An untouched :func:`mr.open_image` result is read by GDAL at reduced
resolution, which takes the file's own overviews when it has them (and, for uncompressed GeoTIFFs, reads only the
sampled pixels when it has none); any other array is sliced with a stride, so only one pixel in ``step**2`` is kept.
``quicklook``/``save_quicklook`` draw with matplotlib's Agg canvas (no display, no pyplot); ``explore`` gives an
interactive folium map of the WGS84 features. matplotlib and folium are imported only when used.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import xarray as xr

from mr.api import as_image
from mr.errors import InvalidInputError
from mr.imagery import image_reader
from mr.reader import RasterReader

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
    "#c49c94",
    "#f7b6d2",
    "#c7c7c7",
    "#dbdb8d",
    "#9edae5",
)
"""Class colours (matplotlib's tab10, then tab20's light tones), shared by the PNG and the map; cycled past 20."""
BOX_COLUMNS = ("image_x0", "image_y0", "image_x1", "image_y1")
MIN_BOX_PIXELS = 3.0
"""Boxes are drawn at least this many overview pixels wide and high (about their centre), so small objects on a
heavily reduced image stay visible."""
FULL_READ_WARN_PIXELS = 2**28
"""Above this many pixels (16k x 16k), an image without overviews that GDAL must decode whole gets a warning."""


class MissingOverviewsWarning(UserWarning):
    """The file has no overviews, so a reduced view had to decode every block of it."""


# -- numpy kernels (pure) -----------------------------------------------------------------------------------


def stretch(bands: np.ndarray, nodata: float | None = None) -> np.ndarray:
    """(band, y, x) values to uint8 (y, x, 3) or (y, x): 2-98 percentile stretch per band; nodata and NaN to 0."""
    out = np.zeros(bands.shape, np.uint8)
    for i, band in enumerate(bands.astype(np.float64)):
        valid = ~np.isnan(band) if nodata is None or np.isnan(nodata) else ~np.isnan(band) & (band != nodata)
        if not valid.any():
            continue
        lo, hi = np.percentile(band[valid], [2, 98])
        scaled = (band - lo) / (hi - lo) if hi > lo else np.zeros_like(band)
        out[i] = np.where(valid, np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5, 0).astype(np.uint8)
    return np.moveaxis(out, 0, -1) if len(out) == 3 else out[0]


def box_outlines(boxes: np.ndarray, scale: float, min_size: float = MIN_BOX_PIXELS) -> np.ndarray:
    """(n, 4) pixel boxes x0, y0, x1, y1 to (n, 5, 2) closed outlines in overview pixels, at least ``min_size``."""
    scaled = np.asarray(boxes, np.float64).reshape(-1, 4) * scale
    centre = (scaled[:, :2] + scaled[:, 2:]) / 2
    half = np.maximum(np.abs(scaled[:, 2:] - scaled[:, :2]), min_size) / 2
    (x0, y0), (x1, y1) = (centre - half).T, (centre + half).T
    return np.stack([np.column_stack(c) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))], axis=1)


def class_colours(values: Any) -> dict[str, str]:
    """A colour per distinct class name, in sorted order, from :data:`PALETTE`."""
    names = sorted({str(v) for v in values})
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


# -- reading a reduced image ----------------------------------------------------------------------------------


def _read_reduced(reader: RasterReader, count: int, out_shape: tuple[int, int]) -> np.ndarray:
    """The first ``count`` bands at ``out_shape`` (the reader picks the file's nearest overview), warning when the
    file has none and is big enough that GDAL must decode it whole."""
    data, decoded_whole = reader.read_reduced(count, out_shape)
    if decoded_whole and reader.height * reader.width > FULL_READ_WARN_PIXELS:
        advice = f"build them once: `gdaladdo -r average {reader.path}` or `rio overview --build 2^1..8 ...`"
        warnings.warn(
            f"{reader.url} has no overviews, so GDAL decodes it whole; {advice}", MissingOverviewsWarning, stacklevel=3
        )
    return data


def _strided(image: xr.DataArray, count: int, step: int) -> np.ndarray:
    """Every ``step``-th pixel of the first ``count`` bands; a dask array computes only those samples."""
    data = image.data[:count, ::step, ::step]
    return np.asarray(data.compute() if hasattr(data, "compute") else data)


def overview(image: xr.DataArray | str | os.PathLike, max_size: int = 1024) -> tuple[np.ndarray, float]:
    """A uint8 view of ``image`` at most ``max_size`` pixels on its longer side, and its scale.

    RGB (y, x, 3) from the first three bands, else grey (y, x) from the first; each band stretched between its
    2nd and 98th percentile, nodata black. Image pixel coordinates times ``scale`` are overview coordinates.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, (int, np.integer)) or max_size < 1:
        raise InvalidInputError("max_size", max_size, "give a positive number of pixels, e.g. 1024")
    image = as_image(image)
    bands, height, width = (int(n) for n in image.shape)
    count = 3 if bands >= 3 else 1
    nodata = image.attrs.get("nodata", image.attrs.get("_FillValue"))
    reader = image_reader(image)
    if reader is not None:
        scale = min(1.0, max_size / max(height, width))
        out_shape = (max(1, round(height * scale)), max(1, round(width * scale)))
        return stretch(_read_reduced(reader, count, out_shape), nodata), scale
    step = max(1, math.ceil(max(height, width) / max_size))
    return stretch(_strided(image, count, step), nodata), 1.0 / step


# -- drawing ----------------------------------------------------------------------------------------------------


def _pixel_boxes(features: Any) -> np.ndarray:
    """(n, 4) full-image pixel boxes from the ``image_x0..image_y1`` columns, else ``image_geometry`` bounds."""
    if not hasattr(features, "columns"):
        raise InvalidInputError(
            "features", type(features).__name__, "pass the computed features: quicklook(image, result.compute())"
        )
    if all(c in features.columns for c in BOX_COLUMNS):
        return features[list(BOX_COLUMNS)].to_numpy(np.float64)
    if "image_geometry" in features.columns:
        return shapely.bounds(np.asarray(features["image_geometry"], dtype=object))
    raise InvalidInputError("features", list(features.columns), "need image_x0..image_y1 or image_geometry columns")


def _image_name(image: xr.DataArray) -> str:
    source = image.attrs.get("source")
    return os.path.basename(str(source)) if source else str(image.name or "<array>")


def quicklook(
    image: xr.DataArray | str | os.PathLike,
    features: Any,
    *,
    ax: Any = None,
    max_size: int = 1024,
    color_by: str = "label",
) -> Any:
    """A matplotlib Figure: the overview of ``image`` with each feature's pixel box, coloured by ``color_by``.

    A numeric ``color_by`` (e.g. "score") gets a colour bar, anything else a legend of classes. Boxes are one
    LineCollection (``ax.collections[0]``), so thousands draw as fast as one. No pyplot, no display needed.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    image = as_image(image)
    pixels, scale = overview(image, max_size)
    boxes = _pixel_boxes(features)
    if ax is None:
        height, width = pixels.shape[:2]
        ax = Figure(figsize=(8, 1 + 8 * height / width), layout="constrained").add_subplot()
    ax.imshow(pixels, cmap="gray" if pixels.ndim == 2 else None, extent=(0, pixels.shape[1], pixels.shape[0], 0))
    lines = LineCollection(box_outlines(boxes, scale), linewidths=0.8)
    ax.add_collection(lines)
    values = features[color_by] if len(boxes) and color_by in features.columns else None
    if values is not None and _is_numeric(values):
        lines.set_array(np.asarray(values, np.float64))
        lines.set_cmap("viridis")
        ax.figure.colorbar(lines, ax=ax, label=color_by, shrink=0.8)
    elif values is not None:
        colours = class_colours(values)
        lines.set_colors([colours[str(v)] for v in values])
        counts = values.astype(str).value_counts()
        handles = [Line2D([], [], color=c, label=f"{name} ({counts[name]})") for name, c in colours.items()]
        ax.legend(handles=handles, loc="upper right", fontsize="small", framealpha=0.8)
    else:
        lines.set_colors(PALETTE[0])
    ax.set_title(f"{_image_name(image)}: {len(boxes)} features (overview 1:{1 / scale:.3g})", fontsize="medium")
    ax.set_axis_off()
    return ax.figure


def _is_numeric(values: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def save_quicklook(image: xr.DataArray | str | os.PathLike, features: Any, path: str | os.PathLike, **kw: Any) -> Path:
    """Write :func:`quicklook` as a PNG (Agg canvas, any machine) and return its path; ``dpi`` defaults to 150."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    dpi = kw.pop("dpi", 150)
    figure = quicklook(image, features, **kw)
    FigureCanvasAgg(figure)  # an Agg canvas whatever the default backend: no display needed
    figure.savefig(os.fspath(path), format="png", dpi=dpi)
    return Path(path)


# -- interactive map --------------------------------------------------------------------------------------------


def image_footprint(image: xr.DataArray, points_per_side: int = 16) -> shapely.Polygon | None:
    """The image outline in WGS84, each side densified (RPC/GCP images keep their shape); None without georeference."""
    from mr.geo import pixel_to_world

    georef = image.attrs.get("georeference")
    if georef is None or georef.kind is None:
        return None
    t = np.linspace(0.0, 1.0, points_per_side, endpoint=False)
    w, h = georef.width, georef.height
    xs = np.concatenate([t * w, np.full_like(t, w), (1 - t) * w, np.zeros_like(t)])
    ys = np.concatenate([np.zeros_like(t), t * h, np.full_like(t, h), (1 - t) * h])
    lon, lat = pixel_to_world(georef, xs, ys)
    keep = ~(np.isnan(lon) | np.isnan(lat))
    return shapely.Polygon(np.column_stack([lon[keep], lat[keep]])) if keep.sum() >= 3 else None


def explore(
    features: Any,
    image: xr.DataArray | str | os.PathLike | None = None,
    *,
    color_by: str = "label",
    tiles: str = "OpenStreetMap",
) -> Any:
    """A folium Map of the WGS84 features (tooltips: label, score), with the image footprint when ``image`` is given."""
    try:
        import folium
    except ImportError as e:
        raise ImportError("mr.quicklook.explore needs folium: pip install folium") from e
    frame = _mappable(features, color_by)
    footprint = image_footprint(as_image(image)) if image is not None else None
    if len(features) and frame.empty and footprint is None:
        reason = "none has a world geometry (image not georeferenced); use quicklook(image, features) instead"
        raise InvalidInputError("features", f"{len(features)} rows", reason)
    m = folium.Map(tiles=tiles, control_scale=True)
    outline = {"color": "#000000", "weight": 2, "dashArray": "6", "fill": False}
    if footprint is not None:
        shape = shapely.geometry.mapping(footprint)
        folium.GeoJson(shape, name="image footprint", style_function=lambda _: outline).add_to(m)
    if not frame.empty:
        fields = list(dict.fromkeys(c for c in ("label", "score", color_by) if c in frame.columns))
        style = {"weight": 2, "fillOpacity": 0.1}
        folium.GeoJson(
            frame.to_json(),
            name="features",
            tooltip=folium.GeoJsonTooltip(fields=fields),
            style_function=lambda f: {**style, "color": f["properties"]["_colour"]},
        ).add_to(m)
    shown = ([footprint.bounds] if footprint is not None else []) + ([frame.total_bounds] if not frame.empty else [])
    if shown:
        x0, y0, x1, y1 = (*np.min(shown, axis=0)[:2], *np.max(shown, axis=0)[2:])
        m.fit_bounds([[y0, x0], [y1, x1]])
    folium.LayerControl().add_to(m)
    return m


def _mappable(features: Any, color_by: str) -> Any:
    """The features that have a world geometry, without other geometry columns, with a ``_colour`` column."""
    if not hasattr(features, "geometry"):
        raise InvalidInputError("features", type(features).__name__, "pass the computed GeoDataFrame of features")
    frame = features[features.geometry.notna() & ~features.geometry.is_empty]
    frame = frame[[c for c in frame.columns if c == frame.geometry.name or str(frame[c].dtype) != "geometry"]].copy()
    values = frame[color_by] if color_by in frame.columns else None
    if values is None or not len(frame):
        frame["_colour"] = PALETTE[0]
    elif _is_numeric(values):
        import branca.colormap

        lo, hi = float(values.min()), float(values.max())
        colormap = branca.colormap.linear.viridis.scale(lo, hi if hi > lo else lo + 1.0)
        frame["_colour"] = [colormap.rgb_hex_str(float(v)) for v in values]
    else:
        colours = class_colours(values)
        frame["_colour"] = [colours[str(v)] for v in values]
    return frame
