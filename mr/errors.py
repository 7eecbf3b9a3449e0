"""One exception hierarchy for mr: bad input is a ``ValueError``; operational failures chain their cause."""

from __future__ import annotations


class MrError(Exception):
    """Base of every error mr raises on purpose."""


class InvalidInputError(MrError, ValueError):
    """Input that can never work as given: the message names the field, the bad value and the fix."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class ImageOpenError(MrError):
    """An image that is missing, unreadable or in an unsupported format."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot open image {url}: {reason}")


class ModelError(MrError):
    """A model that failed on a batch of tiles."""


class SinkError(MrError):
    """An output that could not be written completely."""
