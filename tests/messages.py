"""Editing request messages in tests: set or remove one field by its path."""

from __future__ import annotations

DROP = object()
"""The value that removes a field instead of setting it."""


def put(message: dict, path: list[str], value: object) -> None:
    """Set ``message[path[0]][path[1]]...`` to ``value`` (list indexes as digits), or remove it when value is DROP."""
    *parents, last = path
    node = message
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    if value is DROP:
        del node[key]
    else:
        node[key] = value
