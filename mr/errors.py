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

    def __reduce__(self) -> tuple:
        """Pickle to the constructor arguments, so that the error crosses from a Dask worker intact."""
        return (type(self), (self.field, self.value, self.reason))


class ImageOpenError(MrError):
    """An image that is missing, unreadable or in an unsupported format."""

    verb = "open"

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot {self.verb} image {url}: {reason}")

    def __reduce__(self) -> tuple:
        """Pickle to the constructor arguments, so that the error crosses from a Dask worker intact."""
        return (type(self), (self.url, self.reason))


class ImageReadError(ImageOpenError):
    """Pixels of an image that opened could not be read (corrupt or truncated data, a failed transfer)."""

    verb = "read"


class ModelError(MrError):
    """A model that failed on a batch of tiles."""


class SinkError(MrError):
    """An output that could not be written completely."""
