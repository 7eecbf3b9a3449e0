"""Every setting in config/mr.yaml is documented in docs/configuration.md, and each one reaches dask.config."""

from pathlib import Path

import dask
import yaml

import mr.config  # noqa: F401  (loads the defaults)

ROOT = Path(__file__).resolve().parents[1]


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            keys.extend(leaf_keys(value, dotted))
        else:
            keys.append(dotted)
    return keys


def test_every_key_is_documented_and_loaded():
    defaults = yaml.safe_load((ROOT / "config" / "mr.yaml").read_text())
    documented = (ROOT / "docs" / "configuration.md").read_text()
    keys = leaf_keys(defaults)
    assert len(keys) > 30
    for key in keys:
        section, _, last = key.rpartition(".")
        assert f"`{key}`" in documented or (last in documented and section in documented), f"{key} is not documented"
        dask.config.get(key)  # raises if the default did not load
