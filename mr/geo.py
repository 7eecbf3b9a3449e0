"""Geolocation of one image: continuous pixel coordinates <-> WGS84 lon/lat, vectorised, pure (no dask).

Pixel coordinates are continuous, as in GDAL's geotransform: ``(0, 0)`` is the outer (top-left) corner of
the first pixel, its centre is ``(0.5, 0.5)``; ``x`` is the column, ``y`` the row.

Three mappings, chosen by :attr:`Georeference.kind`:

* ``"affine"``: the GDAL geotransform into the image CRS, then PROJ to EPSG:4326;
* ``"gcp"``: GDAL's polynomial GCP transformer into the GCP CRS, then PROJ to EPSG:4326;
* ``"rpc"``: GDAL's RPC transformer (WGS84 directly), at height 0 unless the caller passes one.

Transformers are expensive to build, so they are cached per process (PROJ, which is thread-safe) or per
thread (GDAL's transformers, which are not documented as thread-safe), keyed on the hashable
:class:`Georeference`.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping

import numpy as np
import pyproj
import shapely
from affine import Affine

from mr.errors import InvalidInputError

if TYPE_CHECKING:  # pragma: no cover
    import rasterio.io
    from rasterio.transform import TransformerBase

Kind = Literal["affine", "gcp", "rpc"]
GeoTransform = tuple[float, float, float, float, float, float]
Gcp = tuple[float, float, float, float, float]
RpcItems = tuple[tuple[str, "float | tuple[float, ...]"], ...]

_IDENTITY_GEOTRANSFORM: GeoTransform = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
_RPC_PIXEL_ERROR_THRESHOLD = 1e-4
"""GDAL's iterative pixel -> ground RPC solution stops at this error in pixels (GDAL's default is 0.1)."""
_RPC_ROUND_TRIP_TOLERANCE = 0.1
"""Pixels by which a pixel -> ground RPC result may miss when mapped back exactly (GDAL's own convergence
threshold); further off, the iteration failed and the point becomes NaN."""
_DENSIFY_SEGMENTS = 64
"""Boundary segments per geometry extent when projecting a geometry into pixel space."""


def _as_rpc_items(rpcs: Mapping[str, object] | RpcItems) -> RpcItems:
    """RPC coefficients as sorted (key, value) pairs with coefficient lists as tuples: hashable."""
    pairs = rpcs.items() if isinstance(rpcs, Mapping) else rpcs
    items = []
    for key, value in pairs:
        if value is None:
            continue
        if isinstance(value, (list, tuple, np.ndarray)):
            items.append((str(key), tuple(float(v) for v in value)))
        else:
            items.append((str(key), float(value)))  # type: ignore[arg-type]
    return tuple(sorted(items))


@dataclass(frozen=True, kw_only=True)
class Georeference:
    """Everything needed to geolocate pixels of one image; hashable, so transformers cache on it."""

    width: int
    """Image width in pixels (columns)."""
    height: int
    """Image height in pixels (rows)."""
    crs: str | None = None
    """WKT of the image CRS (the CRS of ``transform``); None where the file has none."""
    transform: GeoTransform | None = None
    """GDAL geotransform order ``(x0, dx, rx, y0, ry, dy)``, NOT affine.Affine order: ``X = x0 + col*dx +
    row*rx``, ``Y = y0 + col*ry + row*dy``. None where the file has no geotransform (rasterio's identity)."""
    gcps: tuple[Gcp, ...] | None = None
    """Ground control points ``(row, col, x, y, z)``; row/col continuous, x/y in ``gcp_crs``."""
    gcp_crs: str | None = None
    """WKT of the CRS of the GCPs' x/y."""
    rpcs: RpcItems | None = None
    """RPC coefficients as sorted ``(name, value)`` pairs in rasterio's ``RPC.to_dict()`` naming (a dict is
    accepted and converted, lists become tuples); see :attr:`rpc_dict`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        if self.transform is not None:
            transform = tuple(float(v) for v in self.transform)
            if len(transform) != 6:
                raise InvalidInputError("transform", self.transform, "a GDAL geotransform has 6 numbers")
            object.__setattr__(self, "transform", transform)
        if self.gcps is not None:
            object.__setattr__(self, "gcps", tuple(tuple(float(v) for v in g) for g in self.gcps))
        if self.rpcs is not None:
            object.__setattr__(self, "rpcs", _as_rpc_items(self.rpcs))

    @property
    def kind(self) -> Kind | None:
        """Which mapping geolocates this image: "rpc", else "gcp", else "affine", else None.

        RPC first: it is the sensor model, while a NITF that has RPCs usually also carries a coarse
        geotransform or corner GCPs that GDAL derives from IGEOLO (arc-second precision). GCPs next: a file
        carries GCPs only when no exact geotransform exists (rasterio then reports the identity transform).
        An affine needs a CRS and must be invertible; GCPs need a CRS and at least 3 points (a first-order fit).
        """
        if self.rpcs:
            return "rpc"
        if self.gcps and len(self.gcps) >= 3 and self.gcp_crs:
            return "gcp"
        if self.transform is not None and self.crs and _is_invertible(self.transform):
            return "affine"
        return None

    @property
    def affine(self) -> Affine | None:
        """The geotransform as an ``affine.Affine`` (what rasterio calls ``transform``)."""
        return None if self.transform is None else Affine.from_gdal(*self.transform)

    @property
    def rpc_dict(self) -> dict[str, object] | None:
        """RPCs as rasterio's dict form (lists for coefficients): ``rasterio.rpc.RPC(**georef.rpc_dict)``."""
        if self.rpcs is None:
            return None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.rpcs}


def _is_invertible(gt: GeoTransform) -> bool:
    """Whether a geotransform maps pixels onto a plane rather than a line (its determinant is not 0)."""
    return gt[1] * gt[5] - gt[2] * gt[4] != 0


def georeference_from_dataset(ds: "rasterio.io.DatasetReader") -> Georeference:
    """Read the georeferencing of an open rasterio dataset (metadata only, no pixels)."""
    geotransform = tuple(ds.transform.to_gdal())
    gcps, gcp_crs = ds.gcps
    rpcs = ds.rpcs
    return Georeference(
        width=ds.width,
        height=ds.height,
        crs=ds.crs.to_wkt() if ds.crs else None,
        transform=None if geotransform == _IDENTITY_GEOTRANSFORM else geotransform,
        gcps=tuple((g.row, g.col, g.x, g.y, g.z or 0.0) for g in gcps) if gcps else None,
        gcp_crs=gcp_crs.to_wkt() if gcps and gcp_crs else None,
        rpcs=rpcs.to_dict() if rpcs else None,
    )


def pixel_to_world(
    georef: Georeference, x: np.ndarray | float, y: np.ndarray | float, *, height: np.ndarray | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Continuous pixel coordinates (x = column, y = row) to WGS84 ``(lon, lat)`` arrays of the broadcast shape.

    ``height`` (metres above the WGS84 ellipsoid) matters for RPC only; it defaults to 0. Points that an
    RPC cannot place come back as NaN.
    """
    kind = _require_kind(georef)
    xs, ys, shape = _flat_pair(x, y)
    if kind == "affine":
        cx, cy = _apply_geotransform(georef.transform, xs, ys)  # type: ignore[arg-type]
        lon, lat = _to_wgs84(georef.crs).transform(cx, cy)  # type: ignore[arg-type]
    elif kind == "gcp":
        cx, cy = _gdal_pixel_to_ground(georef, xs, ys, np.zeros_like(xs))
        lon, lat = _to_wgs84(georef.gcp_crs).transform(cx, cy)  # type: ignore[arg-type]
    else:
        zs = _flat_heights(height, xs.shape, shape)
        lon, lat = _gdal_pixel_to_ground(georef, xs, ys, zs)
        lon, lat = _mask_rpc_failures(georef, xs, ys, zs, lon, lat)
    return np.reshape(lon, shape), np.reshape(lat, shape)


def world_to_pixel(
    georef: Georeference, lon: np.ndarray | float, lat: np.ndarray | float, *, height: np.ndarray | float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """WGS84 ``(lon, lat)`` to continuous pixel ``(x, y)`` arrays; the inverse of :func:`pixel_to_world`."""
    kind = _require_kind(georef)
    lons, lats, shape = _flat_pair(lon, lat)
    if kind == "affine":
        cx, cy = _from_wgs84(georef.crs).transform(lons, lats)  # type: ignore[arg-type]
        inverse = _inverse_geotransform(georef.transform)  # type: ignore[arg-type]
        xs, ys = _apply_geotransform(inverse, np.asarray(cx), np.asarray(cy))
    elif kind == "gcp":
        cx, cy = _from_wgs84(georef.gcp_crs).transform(lons, lats)  # type: ignore[arg-type]
        xs, ys = _gdal_ground_to_pixel(georef, np.asarray(cx), np.asarray(cy), np.zeros_like(lons))
    else:
        xs, ys = _gdal_ground_to_pixel(georef, lons, lats, _flat_heights(height, lons.shape, shape))
    return np.reshape(xs, shape), np.reshape(ys, shape)


def pixel_bounds_of_geometry(
    georef: Georeference, geom_wgs84: shapely.Geometry, *, height: float | None = None
) -> tuple[float, float, float, float]:
    """Pixel bounding box ``(x0, y0, x1, y1)`` of a WGS84 geometry, for region-of-interest cropping.

    The boundary is densified first, so that a mapping that curves straight lon/lat edges (RPC, GCP
    polynomials, projections) still gets its extreme points. The box is not clipped to the image.
    """
    if geom_wgs84 is None or shapely.is_empty(geom_wgs84):
        raise InvalidInputError("geometry", geom_wgs84, "an empty geometry has no pixel bounds")
    lons, lats = _densified_coordinates(geom_wgs84).T
    xs, ys = world_to_pixel(georef, lons, lats, height=height)
    finite = np.isfinite(xs) & np.isfinite(ys)
    if not finite.any():
        raise InvalidInputError("geometry", geom_wgs84.wkt[:80], "no vertex maps into the image's pixel space")
    return (float(xs[finite].min()), float(ys[finite].min()), float(xs[finite].max()), float(ys[finite].max()))


def _densified_coordinates(geom: shapely.Geometry) -> np.ndarray:
    """All vertices of ``geom`` after splitting its edges into about ``_DENSIFY_SEGMENTS`` per extent."""
    x0, y0, x1, y1 = geom.bounds
    extent = max(x1 - x0, y1 - y0)
    if extent > 0:
        geom = shapely.segmentize(geom, extent / _DENSIFY_SEGMENTS)
    return shapely.get_coordinates(geom)


def _require_kind(georef: Georeference) -> Kind:
    """The georeference's kind, or a clear error for an image that cannot be geolocated."""
    kind = georef.kind
    if kind is None:
        raise InvalidInputError(
            "georeference",
            georef.kind,
            "the image has no usable georeferencing (no RPCs, no >=3 GCPs with a CRS, no geotransform with a "
            "CRS); check Georeference.kind before geolocating",
        )
    return kind


def _flat_pair(a: np.ndarray | float, b: np.ndarray | float) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Two coordinate arrays broadcast together, flattened to float64, with their common shape."""
    a_arr, b_arr = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return a_arr.ravel().copy(), b_arr.ravel().copy(), a_arr.shape


def _flat_heights(height: np.ndarray | float | None, flat_shape: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Heights broadcast to the points' shape and flattened; 0 where not given."""
    if height is None:
        return np.zeros(flat_shape)
    return np.broadcast_to(np.asarray(height, dtype=np.float64), shape).ravel().copy()


def _apply_geotransform(gt: GeoTransform, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GDAL geotransform applied to continuous pixel coordinates."""
    return gt[0] + xs * gt[1] + ys * gt[2], gt[3] + xs * gt[4] + ys * gt[5]


def _inverse_geotransform(gt: GeoTransform) -> GeoTransform:
    """The geotransform mapping CRS coordinates back to continuous pixel coordinates."""
    inverse = ~Affine.from_gdal(*gt)
    return tuple(inverse.to_gdal())  # type: ignore[return-value]


@functools.lru_cache(maxsize=64)
def _to_wgs84(crs_wkt: str) -> pyproj.Transformer:
    """Cached PROJ transformer from a CRS to lon/lat WGS84 (pyproj >= 3.1 transformers are thread-safe)."""
    return pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(crs_wkt), "EPSG:4326", always_xy=True)


@functools.lru_cache(maxsize=64)
def _from_wgs84(crs_wkt: str) -> pyproj.Transformer:
    """Cached PROJ transformer from lon/lat WGS84 to a CRS."""
    return pyproj.Transformer.from_crs("EPSG:4326", pyproj.CRS.from_user_input(crs_wkt), always_xy=True)


def _gdal_transformer(georef: Georeference) -> "TransformerBase":
    """This thread's cached GDAL transformer (GCP or RPC) for ``georef``."""
    return _gdal_transformer_for_thread(georef, threading.get_ident())


@functools.lru_cache(maxsize=64)
def _gdal_transformer_for_thread(georef: Georeference, thread_id: int) -> "TransformerBase":
    """Build a GDAL transformer; keyed on the thread because GDAL transformers are not shared safely."""
    from rasterio.control import GroundControlPoint
    from rasterio.rpc import RPC
    from rasterio.transform import GCPTransformer, RPCTransformer

    if georef.kind == "rpc":
        rpc = RPC(**georef.rpc_dict)  # type: ignore[arg-type]
        return RPCTransformer(rpc, RPC_PIXEL_ERROR_THRESHOLD=_RPC_PIXEL_ERROR_THRESHOLD)
    gcps = [GroundControlPoint(row=r, col=c, x=gx, y=gy, z=gz) for r, c, gx, gy, gz in georef.gcps or ()]
    return GCPTransformer(gcps)


def _gdal_pixel_to_ground(
    georef: Georeference, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel -> ground through GDAL; ``offset="ul"`` passes continuous coordinates through unshifted."""
    if xs.size == 0:
        return xs.copy(), ys.copy()
    gx, gy = _gdal_transformer(georef).xy(ys, xs, zs=zs, offset="ul")
    return np.asarray(gx, dtype=np.float64), np.asarray(gy, dtype=np.float64)


def _gdal_ground_to_pixel(
    georef: Georeference, gx: np.ndarray, gy: np.ndarray, zs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ground -> pixel through GDAL, kept continuous (``op=np.positive`` instead of rasterio's floor)."""
    if gx.size == 0:
        return gx.copy(), gy.copy()
    rows, cols = _gdal_transformer(georef).rowcol(gx, gy, zs=zs, op=np.positive)
    return np.asarray(cols, dtype=np.float64), np.asarray(rows, dtype=np.float64)


def _mask_rpc_failures(
    georef: Georeference, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray, lon: np.ndarray, lat: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """NaN where GDAL's iterative RPC inversion did not converge, judged by the exact forward RPC.

    rasterio only warns when a point fails and returns a number anyway; checking the round trip is
    thread-safe (unlike catching warnings) and costs one non-iterative evaluation.
    """
    back_x, back_y = _gdal_ground_to_pixel(georef, np.asarray(lon), np.asarray(lat), zs)
    failed = ~(np.hypot(back_x - xs, back_y - ys) <= _RPC_ROUND_TRIP_TOLERANCE)
    lon = np.where(failed, np.nan, lon)
    lat = np.where(failed, np.nan, lat)
    return lon, lat

