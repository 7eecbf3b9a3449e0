"""What an operator allows requests to touch: local folders, model endpoints, output buckets and streams.

Settings live under ``mr.security`` (null = no restriction, the embedded default). A request that reaches outside
them is rejected with a `RequestError` naming the field, before anything runs. Local paths are resolved (``..``
and symbolic links included) before they are compared, so no spelling escapes a root.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from mr import config
from mr.request import FileOutput, ImageRequest, KinesisOutput, ModelInvokeMode, RequestError, S3Output


@dataclass(frozen=True)
class Policy:
    """Allow-lists; None means anything goes."""

    local_roots: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None
    buckets: tuple[str, ...] | None = None
    streams: tuple[str, ...] | None = None


def _listed(key: str) -> tuple[str, ...] | None:
    value = config.get(f"security.{key}")
    if value is None:
        return None
    return tuple(str(v) for v in ([value] if isinstance(value, str) else value))


def resolve_policy() -> Policy:
    """The allow-lists from ``mr.security.*``."""
    roots = _listed("local-roots")
    resolved = tuple(str(Path(os.path.expanduser(r)).resolve()) for r in roots) if roots is not None else None
    return Policy(resolved, _listed("endpoints"), _listed("buckets"), _listed("streams"))


def local_path(url: str) -> str | None:
    """The local file a URL names (plain path or ``file://``), or None for a remote URL."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    return unquote(parts.path) if parts.scheme.lower() == "file" else None


def _inside(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(os.path.expanduser(path))
    return any(os.path.commonpath([real, root]) == root for root in roots)


def _matches(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


def check_request(request: ImageRequest, policy: Policy | None = None) -> None:
    """Raise `RequestError` for the first thing the request may not touch."""
    policy = policy or resolve_policy()
    if policy.local_roots is not None:
        for i, url in enumerate(request.image_urls):
            path = local_path(url)
            if path is not None and not _inside(path, policy.local_roots):
                raise RequestError(f"imageUrls[{i}]", url, f"local images must lie under {list(policy.local_roots)}")
    for i, output in enumerate(request.outputs):
        where = f"outputs[{i}]"
        if (
            isinstance(output, FileOutput)
            and policy.local_roots is not None
            and not _inside(output.path, policy.local_roots)
        ):
            raise RequestError(f"{where}.path", output.path, f"output files must lie under {list(policy.local_roots)}")
        if isinstance(output, S3Output) and policy.buckets is not None and not _matches(output.bucket, policy.buckets):
            raise RequestError(f"{where}.bucket", output.bucket, f"allowed buckets: {list(policy.buckets)}")
        if (
            isinstance(output, KinesisOutput)
            and policy.streams is not None
            and not _matches(output.stream, policy.streams)
        ):
            raise RequestError(f"{where}.stream", output.stream, f"allowed streams: {list(policy.streams)}")
    processor = request.image_processor
    if processor.type is not ModelInvokeMode.LOCAL and policy.endpoints is not None:
        if not _matches(processor.name, policy.endpoints):
            raise RequestError("imageProcessor.name", processor.name, f"allowed endpoints: {list(policy.endpoints)}")
