"""Untrusted request JSON to typed values, one field at a time, each error naming the field by its path.

The low layer under :mod:`mr.request`: the body's size and nesting caps, the frozen form of the message
(:class:`FrozenDict`, tuples), the one exception every bad message raises (:class:`RequestError`), and the small
``_required`` / ``_string`` / ``_integer`` ... readers the request parts and requests are built from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from mr.errors import InvalidInputError

MAX_BODY_BYTES = 256 * 1024
MAX_TILE_SIZE = 16384
MAX_DEPTH = 32
_JOB_ID = re.compile(r"[^\s/\\]{1,256}")
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d{1,12}\s*")
_URLS = "a local path, file:///path, s3://bucket/key or http(s)://host/path"
Body = str | bytes | Mapping[str, Any]


class RequestError(InvalidInputError):
    """A request message that can never work as given; ``field`` is the path in the message, in OSML's names."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(field, _thaw(value), reason)
        shown = repr(value)
        if len(shown) > 200:  # a 200 KiB value must not become a 200 KiB log line
            self.args = (f"{field}={shown[:200]}... ({len(shown)} characters): {reason}",)

    def __reduce__(self):
        return type(self), (self.field, self.value, self.reason)


class FrozenDict(dict):
    """A dict that cannot change: hashable, picklable, and written by ``json`` as an object."""

    def _read_only(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a parsed request is immutable")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return FrozenDict, (dict(self),)


# ---- the message as frozen JSON ----------------------------------------------------------------------------------

def _freeze(value: Any, where: str = "", depth: int = 0) -> Any:
    """A JSON value as immutable data (objects → FrozenDict, arrays → tuples); anything else is a RequestError."""
    if depth > MAX_DEPTH:
        raise RequestError(where, "...", f"is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, Mapping):
        bad = [key for key in value if not isinstance(key, str)]
        if bad:
            raise RequestError(where or "body", bad[0], "object keys must be strings")
        return FrozenDict({k: _freeze(v, f"{where}.{k}" if where else k, depth + 1) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(where, value, "must be valid Unicode text (no lone surrogates)") from None
        return value
    if value is None or isinstance(value, (bool, int)) or (isinstance(value, float) and math.isfinite(value)):
        return value
    raise RequestError(where, value, "must be JSON: an object, array, string, finite number, true, false or null")


def _thaw(value: Any) -> Any:
    """Frozen data back to plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


def _reject_constant(name: str) -> None:
    raise RequestError("body", name, "NaN and Infinity are not JSON numbers")


def _load(body: Body) -> FrozenDict:
    """The message as a frozen JSON object: UTF-8 JSON text (str or bytes) or a dict, at most MAX_BODY_BYTES."""
    too_big = f"must be at most {MAX_BODY_BYTES} bytes"
    if isinstance(body, (bytes, bytearray, memoryview)):
        body = bytes(body)
        if len(body) > MAX_BODY_BYTES:
            raise RequestError("body", f"<{len(body)} bytes>", too_big)
        try:
            body = body.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            bad = body[error.start:error.start + 8]
            raise RequestError("body", bad, f"is not UTF-8 text (byte {error.start})") from None
    if isinstance(body, str):
        if len(body) > MAX_BODY_BYTES or len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
            raise RequestError("body", f"<{len(body)} characters>", too_big)
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except RequestError:
            raise
        except (ValueError, RecursionError) as error:
            raise RequestError("body", body, f"is not valid JSON ({error})") from None
    elif isinstance(body, Mapping):
        data = body
    else:
        raise RequestError("body", type(body).__name__, "give the message as JSON text (str or bytes) or a dict")
    if not isinstance(data, Mapping):
        raise RequestError("body", data, 'must be a JSON object: {"jobId": ..., "imageUrls": [...], ...}')
    message = _freeze(data)
    if not isinstance(body, str) and len(json.dumps(message).encode("utf-8")) > MAX_BODY_BYTES:
        raise RequestError("body", "<dict>", too_big)
    return message


# ---- one field at a time -----------------------------------------------------------------------------------------

def _required(obj: Mapping[str, Any], key: str, where: str, example: str) -> Any:
    if obj.get(key) is None:
        raise RequestError(where, None, f"is required, e.g. {example}")
    return obj[key]


def _string(value: Any, where: str, *, optional: bool = False, max_len: int = 2048) -> str:
    """Text without control characters; ``optional``: null is "" and "" is fine."""
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(where, value, "must be a string")
    if not optional and not value.strip():
        raise RequestError(where, value, "must not be empty")
    if len(value) > max_len or any(ord(c) < 32 for c in value):
        raise RequestError(where, value, f"must be at most {max_len} characters, with no control characters")
    return value


def _typed(value: Any, where: str, kind: type) -> Any:
    """An object (``FrozenDict``) or an array (``tuple``) of the frozen message."""
    if not isinstance(value, kind):
        raise RequestError(where, value, f"must be a JSON {'object {...}' if kind is dict else 'array [...]'}")
    return value


def _integer(value: Any, where: str, low: int, high: int) -> int:
    """A whole number in [low, high]; like OSML, numeric strings ("512") and integral floats are accepted."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    whole |= (isinstance(value, float) and value.is_integer()) or bool(
        isinstance(value, str) and _INTEGER_TEXT.fullmatch(value))
    number = int(value) if whole else None
    if number is None or not low <= number <= high:
        raise RequestError(where, value, f"must be a whole number from {low} to {high}")
    return number


def _number(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) < 1e300:
        return float(value)
    raise RequestError(where, value, "must be a number")


def _choice(kind: Any, value: Any, where: str, default: Any = None) -> Any:
    """An enum member by its exact value; null or "" gives the default (as OSML) where there is one."""
    if (value is None or value == "") and default is not None:
        return default
    try:
        return kind(value)
    except (ValueError, TypeError):
        raise RequestError(where, value, f"must be one of {', '.join(m.value for m in kind)}") from None


def _role(value: Any, where: str) -> str:
    """An IAM role ARN, or "" for none (OSML requires the "arn:" prefix)."""
    if value is None or value == "":
        return ""
    if not _string(value, where).startswith("arn:"):
        raise RequestError(where, value, "must be an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return value


def _job_id(value: Any, where: str) -> str:
    if not _JOB_ID.fullmatch(_string(value, where, max_len=256)) or value in (".", ".."):
        raise RequestError(where, value, "must be 1-256 characters without spaces, '/' or '\\' (e.g. a UUID)")
    return value


def _image_url(value: Any, where: str) -> str:
    text = _string(value, where)
    if "://" not in text:
        return text  # a local path
    try:
        parts = urlsplit(text)
    except ValueError:
        raise RequestError(where, value, f"is not a valid URL; give {_URLS}") from None
    scheme, host, path = parts.scheme.lower(), parts.netloc, parts.path.strip("/")
    if not {"file": host in ("", "localhost") and path, "s3": host and path, "http": host, "https": host}.get(scheme):
        raise RequestError(where, value, f"unsupported image URL; give {_URLS}")
    return text


def _string_map(value: Any, where: str) -> FrozenDict:
    for key, item in _typed(FrozenDict() if value is None else value, where, dict).items():
        if not isinstance(item, str):
            raise RequestError(f"{where}.{key}", item, 'must be a string, e.g. {"TargetVariant": "AllTraffic"}')
    return FrozenDict() if value is None else value


def _tiling(size: Any, overlap: Any, where: tuple[str, str], pair: bool) -> tuple[Any, Any]:
    """Tile size (default 1024, at most MAX_TILE_SIZE) and overlap (default 50, 0 or more, less than the size)."""
    def read(value: Any, at: str, default: int, low: int) -> tuple[int, ...]:
        if value is None:
            return (default, default)
        items = value if pair and isinstance(value, tuple) else (value, value)
        if len(items) != 2:
            raise RequestError(at, value, "must be one size or a [width, height] pair")
        return tuple(_integer(v, at, low, MAX_TILE_SIZE) for v in items)

    sizes, laps = read(size, where[0], 1024, 1), read(overlap, where[1], 50, 0)
    for s, o in zip(sizes, laps):
        if o >= s:
            raise RequestError(where[1], overlap, f"must be less than the tile size ({s})")
    return (sizes, laps) if pair else (sizes[0], laps[0])


def _present(**fields: Any) -> dict[str, Any]:
    """Message fields that carry something (OSML leaves unset ones out)."""
    return {key: value for key, value in fields.items() if value not in (None, "", [], {})}


def _roi(value: Any, where: str) -> str | None:
    """A WKT (Multi)Polygon in lon/lat degrees, kept as given; null or "" means the whole image."""
    if value is None or value == "":
        return None
    from mr.roi import parse_polygon

    try:
        x0, y0, x1, y1 = parse_polygon(_string(value, where, max_len=MAX_BODY_BYTES)).bounds
    except InvalidInputError as error:
        raise RequestError(where, value, error.reason) from None
    if not (-180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90):
        raise RequestError(where, value, "coordinates must be longitude in [-180, 180], latitude in [-90, 90]")
    return value
