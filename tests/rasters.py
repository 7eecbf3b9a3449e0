"""Small georeferenced rasters written in code, each with its known answer, for any test to import.

Every writer builds the image in memory (a GTiff ``MemoryFile``) and lets GDAL's ``CreateCopy`` write the
target format: that is the only way GDAL writes some things (COG and JPEG2000 have no ``Create``; the NITF
driver writes the RPC00B TRE only on ``CreateCopy``). PAM side-car files (``.aux.xml``) are disabled while
writing, so whatever a test reads back really lives in the file.

Pixel values follow :func:`pattern`, so any window can be checked without keeping the array around.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.io import MemoryFile
from rasterio.rpc import RPC

UTM_CRS = "EPSG:32633"
UTM_AFFINE = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 4_500_000.0)
"""North-up 0.5 m pixels in UTM 33N; the top-left corner of pixel (0, 0) is (500000, 4500000)."""
ROTATED_AFFINE = Affine(0.48, 0.07, 500_000.0, 0.05, -0.51, 4_500_000.0)
"""A sheared/rotated affine: catches mixed-up geotransform terms."""
GEO_CRS = "EPSG:4326"
GEO_AFFINE = Affine(1e-4, 0.0, 20.2, 0.0, -1e-4, 10.55)
"""1e-4 degree pixels from (20.2 E, 10.55 N)."""
NITF_HEADERS = {"FTITLE": "TEST IMAGE", "IID1": "MRTEST", "IDATIM": "20240102030405", "ISORCE": "UNIT TEST"}
"""NITF header fields the NITF writer sets (rasterio upper-cases creation option values)."""


def pattern(count: int, height: int, width: int, dtype: str = "uint8") -> np.ndarray:
    """Deterministic (band, row, col) values; 16-bit images get values above 255."""
    band, row, col = np.ogrid[:count, :height, :width]
    modulus = 251 if np.dtype(dtype).itemsize == 1 else 65_521
    return ((band * 97 + row * 31 + col * 7) % modulus).astype(dtype)


def write_raster(
    path: str | Path,
    *,
    driver: str = "GTiff",
    data: np.ndarray | None = None,
    count: int = 1,
    height: int = 48,
    width: int = 64,
    dtype: str = "uint8",
    crs: str | None = UTM_CRS,
    transform: Affine | None = UTM_AFFINE,
    gcps: Sequence[GroundControlPoint] | None = None,
    gcp_crs: str | None = None,
    rpcs: RPC | None = None,
    nodata: float | None = None,
    tags: Mapping[str, str] | None = None,
    **creation_options: object,
) -> Path:
    """Write ``data`` (default :func:`pattern`) to ``path`` in ``driver`` with the given georeferencing."""
    data = pattern(count, height, width, dtype) if data is None else np.asarray(data)
    count, height, width = data.shape
    profile = {"driver": "GTiff", "count": count, "height": height, "width": width, "dtype": data.dtype.name}
    if gcps:
        profile.update(gcps=list(gcps), crs=gcp_crs)
    elif transform is not None:
        profile.update(transform=transform, crs=crs)
    if rpcs is not None:
        profile["rpcs"] = rpcs
    if nodata is not None:
        profile["nodata"] = nodata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with MemoryFile() as memfile:
            with memfile.open(**profile) as mem:
                mem.write(data)
                if tags:
                    mem.update_tags(**tags)
            with memfile.open() as src, rasterio.Env(GDAL_PAM_ENABLED="NO"):
                rasterio.shutil.copy(src, str(path), driver=driver, **creation_options)
    return Path(path)


def write_geotiff(path: str | Path, *, tiled: bool = False, blocksize: int = 16, **kwargs: object) -> Path:
    """A GeoTIFF, striped (GDAL's default strips of several rows) or tiled ``blocksize`` square."""
    options: dict[str, object] = {"TILED": "YES", "BLOCKXSIZE": blocksize, "BLOCKYSIZE": blocksize} if tiled else {}
    return write_raster(path, driver="GTiff", **options, **kwargs)  # type: ignore[arg-type]


def write_cog(path: str | Path, *, blocksize: int = 16, **kwargs: object) -> Path:
    """A Cloud-Optimized GeoTIFF (GDAL's COG driver), tiled ``blocksize`` square, with overviews."""
    return write_raster(path, driver="COG", BLOCKSIZE=blocksize, **kwargs)  # type: ignore[arg-type]


def write_jp2(path: str | Path, **kwargs: object) -> Path:
    """A lossless JPEG2000 (JP2OpenJPEG), so pixel values survive exactly."""
    return write_raster(path, driver="JP2OpenJPEG", QUALITY=100, REVERSIBLE="YES", **kwargs)  # type: ignore[arg-type]


def write_nitf(
    path: str | Path, *, headers: Mapping[str, str] = NITF_HEADERS, crs: str | None = GEO_CRS,
    transform: Affine | None = GEO_AFFINE, **kwargs: object,
) -> Path:
    """A NITF 2.1 with header fields; ``rpcs=`` adds an RPC00B TRE. The geotransform becomes IGEOLO
    corners, stored to the arc-second, so a NITF's affine is coarse by design."""
    options = {**dict(headers), **kwargs}
    return write_raster(path, driver="NITF", crs=crs, transform=transform, **options)  # type: ignore[arg-type]


def write_plain_tiff(path: str | Path, **kwargs: object) -> Path:
    """A TIFF with no georeferencing at all (no CRS, no geotransform, no GCPs, no RPCs)."""
    return write_raster(path, crs=None, transform=None, **kwargs)  # type: ignore[arg-type]


def write_gcp_geotiff(
    path: str | Path, *, affine: Affine = ROTATED_AFFINE, crs: str = UTM_CRS, per_side: int = 3, **kwargs: object
) -> Path:
    """A GeoTIFF georeferenced only by GCPs sampled exactly from ``affine`` (so the GCP fit equals it)."""
    height, width = int(kwargs.get("height", 48)), int(kwargs.get("width", 64))  # type: ignore[call-overload]
    gcps = gcps_from_affine(affine, width, height, per_side)
    return write_raster(path, gcps=gcps, gcp_crs=crs, **kwargs)  # type: ignore[arg-type]


def write_rpc_geotiff(path: str | Path, rpcs: RPC, **kwargs: object) -> Path:
    """A GeoTIFF georeferenced only by RPCs (GDAL stores them in the TIFF RPCCoefficient tag)."""
    return write_raster(path, crs=None, transform=None, rpcs=rpcs, **kwargs)  # type: ignore[arg-type]


def write_sparse_geotiff(
    path: str | Path, *, width: int = 100_000, height: int = 100_000, count: int = 1, dtype: str = "uint8",
    blocksize: int = 512,
) -> Path:
    """A huge tiled GeoTIFF with no pixel data written (SPARSE_OK): a few kilobytes on disk, reads as 0."""
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=count, dtype=dtype, crs=UTM_CRS,
        transform=UTM_AFFINE, tiled=True, blockxsize=blocksize, blockysize=blocksize, sparse_ok=True,
    ):
        pass
    return Path(path)


def write_netcdf_cube(path: str | Path, *, times: int = 3, height: int = 8, width: int = 10) -> Path:
    """An odd file: a netCDF whose one variable is (time, y, x), which rioxarray opens with a "time" axis."""
    from scipy.io import netcdf_file

    with netcdf_file(str(path), "w") as nc:
        nc.createDimension("time", times)
        nc.createDimension("y", height)
        nc.createDimension("x", width)
        time = nc.createVariable("time", "f8", ("time",))
        time[:] = np.arange(times)
        time.units = "days since 2020-01-01"
        cube = nc.createVariable("data", "i2", ("time", "y", "x"))
        cube[:] = pattern(times, height, width, "int16")
    return Path(path)


def gcps_from_affine(affine: Affine, width: int, height: int, per_side: int = 3) -> list[GroundControlPoint]:
    """GCPs on a ``per_side`` x ``per_side`` grid of continuous pixel positions, placed exactly by ``affine``."""
    gcps = []
    for row in np.linspace(0.0, height, per_side):
        for col in np.linspace(0.0, width, per_side):
            x = affine.a * col + affine.b * row + affine.c
            y = affine.d * col + affine.e * row + affine.f
            gcps.append(GroundControlPoint(row=float(row), col=float(col), x=x, y=y, z=0.0))
    return gcps


def linear_rpc(
    *, lat_off: float = 10.5, long_off: float = 20.25, lat_scale: float = 0.05, long_scale: float = 0.05,
    line_off: float = 500.0, samp_off: float = 400.0, line_scale: float = 500.0, samp_scale: float = 400.0,
    sample_height_term: float = 0.0, sample_lat2_term: float = 0.0,
) -> RPC:
    """RPCs with an analytic inverse: normalised line = -P, sample = L + h*H + c*P^2 (denominators 1).

    ``P = (lat - lat_off) / lat_scale``, ``L = (lon - long_off) / long_scale``, ``H = height / 100``;
    ``h = sample_height_term`` and ``c = sample_lat2_term`` (both 0 by default: a linear mapping; c bends
    straight lon/lat edges in pixel space). The defaults fit the fixed-width fields of a NITF RPC00B TRE
    exactly, so they survive a NITF round trip.
    """
    zeros = [0.0] * 20
    line_num, samp_num, den = list(zeros), list(zeros), list(zeros)
    line_num[2] = -1.0  # P
    samp_num[1] = 1.0  # L
    samp_num[3] = sample_height_term  # H
    samp_num[8] = sample_lat2_term  # P^2
    den[0] = 1.0
    return RPC(
        height_off=0.0, height_scale=100.0, lat_off=lat_off, lat_scale=lat_scale, long_off=long_off,
        long_scale=long_scale, line_off=line_off, line_scale=line_scale, samp_off=samp_off, samp_scale=samp_scale,
        line_num_coeff=line_num, line_den_coeff=den, samp_num_coeff=samp_num, samp_den_coeff=list(den),
    )


def linear_rpc_truth(
    rpc: RPC, x: np.ndarray, y: np.ndarray, height: np.ndarray | float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The analytic (lon, lat) of continuous pixel (x, y) under :func:`linear_rpc` RPCs.

    RPC line/sample count from the centre of the first pixel, continuous coordinates from its corner, so
    sample = x - 0.5 and line = y - 0.5 (GDAL's RPC transformer applies the same half-pixel shift).
    """
    sample_norm = (np.asarray(x, dtype=np.float64) - 0.5 - rpc.samp_off) / rpc.samp_scale
    line_norm = (np.asarray(y, dtype=np.float64) - 0.5 - rpc.line_off) / rpc.line_scale
    p = -line_norm
    h = (np.asarray(height, dtype=np.float64) - rpc.height_off) / rpc.height_scale
    l = sample_norm - rpc.samp_num_coeff[3] * h - rpc.samp_num_coeff[8] * p**2
    return rpc.long_off + l * rpc.long_scale, rpc.lat_off + p * rpc.lat_scale
