"""Logging: JSON lines for machines, a short text format for terminals, and the job in hand on every line.

`log_context` names the work a thread is doing (job, image, region); every record logged inside it carries those
fields, in the client and in Dask worker processes alike (`WorkerLogging` sets the same handler up on each
worker). Messages pass through `mr.redact.redact`, so credentials never reach a log line.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

CONTEXT_FIELDS = ("job_id", "image_id", "region")

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("mr_log_context", default={})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every record logged in the block (in this thread) carries these fields; empty values are left out."""
    merged = {**_context.get(), **{k: str(v) for k, v in fields.items() if v not in (None, "")}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, str]:
    """The fields of the work this thread is doing."""
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the thread's log context onto each record (as attributes), so formatters can show it."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _safe(text: str) -> str:
    from mr.redact import redact

    return redact(text)


def _plain(value: Any) -> Any:
    """A JSON-ready, redacted copy of an extra field: numbers as they are, structures kept as structures."""
    if isinstance(value, (int, float, bool, type(None))):
        return value
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.loads(_safe(json.dumps(value, default=str)))
        except ValueError:
            pass
    return _safe(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the work's context, process and any extras."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _safe(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_") and key != "where":
                entry[key] = _plain(value)
        entry["process"] = record.process
        if record.exc_info:
            entry["exception"] = _safe(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger [job image region]: message`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        where = " ".join(str(getattr(record, k)) for k in CONTEXT_FIELDS if getattr(record, k, None))
        record.where = f" [{where}]" if where else ""
        return _safe(super().format(record))


def resolve_format(fmt: str | None, embedded: bool = True) -> str:
    """``json`` or ``text``: ``auto`` is text in embedded mode (a person at a terminal), JSON in AWS mode."""
    from mr import config

    fmt = (fmt or os.environ.get("MR_LOG_FORMAT") or config.get("observability.log-format") or "auto").lower()
    if fmt not in ("auto", "json", "text"):
        from mr.errors import InvalidInputError

        raise InvalidInputError("mr.observability.log-format", fmt, "use auto, json or text")
    if fmt == "auto":
        return "text" if embedded else "json"
    return fmt


def quiet_libraries() -> None:
    """Keep the cluster's own chatter (distributed, bokeh, tornado) to warnings; distributed sets its loggers up when
    first imported, so it is imported here first."""
    import distributed  # noqa: F401

    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def configure_logging(fmt: str = "text", level: str | int = "INFO", stream=None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in ``fmt``, replacing handlers set before."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):  # ours from before, or basicConfig's console handler
        console = type(old) is logging.StreamHandler and old.stream in (sys.stderr, sys.stdout)
        if getattr(old, "_mr_handler", False) or console:
            root.removeHandler(old)
    handler._mr_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("mr").setLevel(level)
    return handler
