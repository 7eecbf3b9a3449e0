"""Where an image lives: URL parsing and the GDAL environment (endpoint, credentials, cache) a read needs.

The environment is captured on the client into a picklable :class:`GdalEnv` that travels with every task and is
re-entered around each open and read, as odc-stac does: reads happen later, in Dask tasks, possibly in other
processes where the client's ``rasterio.Env`` does not exist.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import unquote, urlsplit

import rasterio
from rasterio.session import AWSSession, Session

from mr.errors import InvalidInputError

_SECRET_OPTIONS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})
_REMOTE_OPTIONS = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # never list the bucket prefix looking for side-car files
    "GDAL_HTTP_MAX_RETRY": "3",
    "GDAL_HTTP_RETRY_DELAY": "1",
}
_SUPPORTED_URLS = "a local path, file://path, s3://bucket/key or http(s)://"


class _CapturedCredentials(Session):
    """A rasterio session holding credential options captured on the client: no boto3 call inside tasks.

    rasterio refuses AWS keys as plain ``Env`` options, so they enter GDAL through a session.
    """

    def __init__(self, options: Mapping[str, str]) -> None:
        self.credentials = dict(options)

    @classmethod
    def hascreds(cls, config: Mapping[str, str]) -> bool:
        return True

    def get_credential_options(self) -> dict[str, str]:
        return dict(self.credentials)


@dataclass(frozen=True)
class GdalEnv:
    """GDAL configuration a read needs, captured on the client and re-entered inside every task."""

    options: tuple[tuple[str, str | int], ...] = ()
    """Plain GDAL config options (endpoint, retries, ...)."""
    secrets: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    """AWS credential options; kept out of ``repr`` and of task names."""

    def activate(self) -> rasterio.Env:
        """A ``rasterio.Env`` that sets these options (thread-locally in non-main threads)."""
        return rasterio.Env(session=_CapturedCredentials(dict(self.secrets)), **dict(self.options))

    def __dask_tokenize__(self) -> object:
        return ("GdalEnv", self.options)


@dataclass(frozen=True)
class ImageSource:
    """Where an image lives, as given and as GDAL names it, with the GDAL environment to reach it."""

    url: str
    """The URL or path as the caller gave it."""
    path: str
    """What GDAL opens: an absolute local path, ``/vsis3/bucket/key`` or ``/vsicurl/https://...``."""
    env: GdalEnv
    endpoint_url: str | None = None
    """The resolved S3 endpoint (argument or AWS_ENDPOINT_URL[_S3]); None for AWS itself."""

    @property
    def is_local(self) -> bool:
        return not self.path.startswith("/vsi")


def _parse_url(url: str | os.PathLike[str]) -> tuple[str, str, str]:
    """``(url as text, GDAL path, kind)`` with kind "local", "s3" or "http"; bad URLs are InvalidInputError."""
    text = os.fspath(url) if isinstance(url, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text:
        raise InvalidInputError("url", url, f"expected {_SUPPORTED_URLS}")
    if "://" not in text:
        return text, os.path.abspath(text), "local"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidInputError("url", text, "a file:// URL must name a local path (file:///path)")
        return text, os.path.abspath(unquote(parts.path)), "local"
    if scheme == "s3":
        key = parts.path.lstrip("/")
        if not parts.netloc or not key:
            raise InvalidInputError("url", text, "an S3 URL needs a bucket and a key: s3://bucket/key")
        return text, f"/vsis3/{parts.netloc}/{key}", "s3"
    if scheme in ("http", "https"):
        return text, f"/vsicurl/{text}", "http"
    raise InvalidInputError("url", text, f"unsupported scheme {scheme!r}; expected {_SUPPORTED_URLS}")


def resolve_source(url: str | os.PathLike[str], endpoint_url: str | None = None) -> ImageSource:
    """Map a local path, ``file://``, ``s3://`` or ``http(s)://`` URL to what GDAL opens, with its env.

    For S3 the credentials are taken now, on the client, from boto3's default session.
    """
    text, path, kind = _parse_url(url)
    if kind == "local":
        return ImageSource(text, path, GdalEnv(options=_cache_option()))
    if kind == "http":
        options = {**_REMOTE_OPTIONS, **_stall_options(), **dict(_cache_option())}
        return ImageSource(text, path, GdalEnv(options=tuple(sorted(options.items()))))
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    return ImageSource(text, path, _s3_env(endpoint), endpoint)


def _stall_options() -> dict[str, str]:
    """Bounded waits for remote reads (``mr.imagery.http-stall-seconds``): a server that accepts no connection, or
    sends nothing for that long, fails the read instead of hanging the task."""
    from mr import config

    seconds = config.get("imagery.http-stall-seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InvalidInputError("mr.imagery.http-stall-seconds", seconds, "must be a positive number of seconds")
    whole = str(max(1, round(seconds)))
    return {"GDAL_HTTP_CONNECTTIMEOUT": whole, "GDAL_HTTP_LOW_SPEED_TIME": whole, "GDAL_HTTP_LOW_SPEED_LIMIT": "1"}


def _cache_option() -> tuple[tuple[str, str], ...]:
    """GDAL's block cache, capped (``mr.imagery.gdal-cache-mb``): by default GDAL takes 5% of RAM per process,
    which grows with the image read; each region is read once, so a small cache that holds the blocks shared by
    neighbouring windows is all that helps."""
    from mr import config

    return (("GDAL_CACHEMAX", int(config.get("imagery.gdal-cache-mb")) * 2**20),)  # bytes, as rasterio passes ints


def _s3_env(endpoint_url: str | None) -> GdalEnv:
    """GDAL options for /vsis3/: credentials from boto3's default session, and a custom endpoint if any."""
    options = {**_REMOTE_OPTIONS, **_stall_options(), **dict(_cache_option())}
    if endpoint_url:
        parts = urlsplit(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        options.update(
            AWS_S3_ENDPOINT=parts.netloc,  # GDAL wants host[:port], the scheme goes to AWS_HTTPS
            AWS_HTTPS="YES" if parts.scheme == "https" else "NO",
            AWS_VIRTUAL_HOSTING="FALSE",  # path-style requests: what moto, MinIO and most gateways serve
        )
    captured = {k: str(v) for k, v in AWSSession().get_credential_options().items()}
    options.update({k: v for k, v in captured.items() if k not in _SECRET_OPTIONS and k != "AWS_S3_ENDPOINT"})
    secrets = {k: v for k, v in captured.items() if k in _SECRET_OPTIONS}
    return GdalEnv(options=tuple(sorted(options.items())), secrets=tuple(sorted(secrets.items())))


def image_id_for(url: str | os.PathLike[str]) -> str:
    """A stable id for an image: 16 hex digits of the SHA-256 of its canonical URL.

    Equivalent spellings of a local file (relative path, absolute path, ``file://``) give the same id.
    """
    text, path, kind = _parse_url(url)
    canonical = path if kind == "local" else text
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
