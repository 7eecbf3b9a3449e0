"""Writing synthetic scenes to georeferenced files: the only part of mr.synthetic that touches rasterio or disk.

:func:`write_scene` resolves a scene, writes it strip by strip into a GeoTIFF (or an uncompressed NITF), or into a
tiled GTiff scratch file beside the target that GDAL then copies into COG, JPEG2000-compressed NITF or JPEG2000;
the helpers below pick the codec and the GDAL creation options for each driver and check that NITF can store the
CRS. rasterio is imported inside the functions, so the pure scene and scoring modules load without it.
"""

from __future__ import annotations

import os
import tempfile

from mr.errors import InvalidInputError
from mr.synthetic.render import _scene_kwargs, _strips
from mr.synthetic.spec import PlantedObject, _check_int, _planted, _resolve, _Spec


def write_scene(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    driver: str = "GTiff",
    tiled: bool = True,
    compress: str | None = None,
    blocksize: int = 512,
    crs: str = "EPSG:32616",
    origin: tuple[float, float] = (500000.0, 4500000.0),
    resolution: float = 0.5,
    **scene: object,
) -> list[PlantedObject]:
    """Write a georeferenced scene strip by strip and return its planted objects (``scene`` as for make_scene).

    ``driver`` is GTiff, COG, NITF or JP2OpenJPEG; ``compress`` defaults to deflate for GTiff and COG, none for NITF
    (``"jpeg2000"`` gives lossless NITF IC=C8) and lossless for JPEG2000. ``origin`` is the map position of the
    top-left corner and ``resolution`` the pixel size in CRS units (north up). COG and compressed NITF/JPEG2000 are
    copied from a tiled GTiff written first beside ``path``. NITF keeps only EPSG:4326 or WGS84 UTM, and its IGEOLO
    corners to the whole metre (UTM): its georeference is off by up to a metre.
    """
    codec = _resolve_codec(driver, compress)
    icords = _nitf_icords(crs) if driver == "NITF" else None
    _check_int("blocksize", blocksize, 16)
    if blocksize % 16:
        raise InvalidInputError("blocksize", blocksize, "must be a multiple of 16, e.g. 512")
    spec = _resolve(width, height, **_scene_kwargs(scene))
    profile = _profile(spec, crs, origin, resolution)
    if driver == "GTiff" or (driver == "NITF" and codec is None):
        options = _creation_options(driver, tiled, codec, blocksize, icords)
        _write_strips(os.fspath(path), driver, spec, {**profile, **options}, blocksize)
    else:
        options = _copy_options(driver, codec, blocksize, icords)
        _write_by_copy(os.fspath(path), driver, spec, profile, options, blocksize)
    return _planted(spec, scene.get("objects"))


def _profile(spec: _Spec, crs: str, origin: tuple[float, float], resolution: float) -> dict:
    """rasterio's size, type and georeference arguments for the scene."""
    from rasterio.transform import from_origin

    transform = from_origin(origin[0], origin[1], resolution, resolution)
    return dict(width=spec.width, height=spec.height, count=spec.bands, dtype=spec.dtype.name, crs=crs,
                transform=transform, nodata=spec.nodata)


def _write_strips(path: str, driver: str, spec: _Spec, profile: dict, blocksize: int) -> None:
    """Create ``path`` and write the scene into it one strip of ``blocksize`` rows at a time."""
    import rasterio

    with rasterio.open(path, "w", driver=driver, **profile) as dst:
        for y0, rows in _strips(spec, blocksize):
            dst.write(rows, window=((y0, y0 + rows.shape[1]), (0, spec.width)))


def _write_by_copy(path: str, driver: str, spec: _Spec, profile: dict, options: dict, blocksize: int) -> None:
    """Write a tiled GTiff beside ``path``, copy it into ``driver``'s format (COG, NITF C8, JPEG2000), remove it."""
    import rasterio.shutil

    scratch = _scratch_path(path)
    try:
        gtiff = _creation_options("GTiff", True, "deflate", blocksize, None)
        _write_strips(scratch, "GTiff", spec, {**profile, **gtiff}, blocksize)
        rasterio.shutil.copy(scratch, path, driver=driver, **options)
    finally:
        os.remove(scratch)


def _resolve_codec(driver: str, compress: str | None) -> str | None:
    """The compression for ``driver`` (None: uncompressed), rejecting combinations the driver cannot write."""
    allowed = {"GTiff": ("deflate", "lzw", "zstd", "none"), "COG": ("deflate", "lzw", "zstd", "none"),
               "NITF": ("none", "jpeg2000"), "JP2OpenJPEG": ("none",)}
    if driver not in allowed:
        raise InvalidInputError("driver", driver, f"must be one of {sorted(allowed)}")
    codec = (compress or {"GTiff": "deflate", "COG": "deflate"}.get(driver, "none")).lower()
    if codec not in allowed[driver]:
        raise InvalidInputError("compress", compress, f"{driver} supports {allowed[driver]}")
    return None if codec == "none" else codec


def _creation_options(driver: str, tiled: bool, codec: str | None, blocksize: int, icords: str | None) -> dict:
    """GDAL creation options of the strip-written file."""
    if driver == "NITF":
        return {"ICORDS": icords, **({"BLOCKSIZE": blocksize} if tiled else {})}
    options = {"tiled": bool(tiled), "BIGTIFF": "IF_SAFER"}
    if tiled:
        options.update(blockxsize=blocksize, blockysize=blocksize)
    if codec:
        options.update(compress=codec)
    return options


def _copy_options(driver: str, codec: str | None, blocksize: int, icords: str | None) -> dict:
    """GDAL creation options of the final copy (COG, compressed NITF, JPEG2000)."""
    if driver == "COG":
        return {"COMPRESS": (codec or "NONE").upper(), "BLOCKSIZE": blocksize, "BIGTIFF": "IF_SAFER"}
    if driver == "NITF":
        return {"IC": "C8", "PROFILE": "NPJE_NUMERICALLY_LOSSLESS", "BLOCKSIZE": blocksize, "ICORDS": icords}
    return {"REVERSIBLE": "YES", "QUALITY": 100, "BLOCKXSIZE": blocksize, "BLOCKYSIZE": blocksize}


def _nitf_icords(crs: str) -> str:
    """NITF's coordinate system code: G (WGS84 geographic), N or S (UTM north or south); nothing else is stored."""
    from rasterio.crs import CRS

    epsg = CRS.from_user_input(crs).to_epsg()
    if epsg == 4326:
        return "G"
    if epsg is not None and 32601 <= epsg <= 32660:
        return "N"
    if epsg is not None and 32701 <= epsg <= 32760:
        return "S"
    raise InvalidInputError("crs", crs, "NITF stores only EPSG:4326 or WGS84 UTM (EPSG:326xx / 327xx)")


def _scratch_path(path: str | os.PathLike) -> str:
    """A temporary GTiff path beside ``path`` (same file system, removed afterwards)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    handle, name = tempfile.mkstemp(suffix=".tif", prefix=".scene-", dir=folder)
    os.close(handle)
    return name
