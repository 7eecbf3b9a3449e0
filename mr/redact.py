"""Mask credentials in text, so that none reaches a log, a job record, a notice or an output.

Requests and errors carry credentials by accident more often than by design: an image URL presigned by S3
(``X-Amz-Credential``, ``X-Amz-Signature``, ``X-Amz-Security-Token``), a ``user:password@`` URL, an
``Authorization`` header in an HTTP error, botocore's debug log of an AssumeRole reply. :func:`redact` replaces each
secret with ``***`` and keeps the rest (the host, the path, the name of the key), so the text still says what went
wrong. It is pure, idempotent and never raises; :class:`RedactingFilter` applies it to log records.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

_SECRET_WORDS = (r"(?:secret|password|passwd|passphrase|token|signature|credential|api[_-]?key"
                 r"|access[_-]?key(?:[_-]?id)?)")

_PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.S)
_AUTHORIZATION = re.compile(
    r"(?i)(\b(?:proxy-)?authorization\b[\"']?+\s*+[:=]\s*+[\"']?+)(?!\*\*\*)([^\r\n\"']*)")
_BEARER = re.compile(r"\b(Bearer)\s+(?!\*\*\*)[A-Za-z0-9._~+/=-]{16,}")
_USERINFO = re.compile(  # user@ or user:password@; a password may hold '/', as secret keys do
    r"(?i)\b([a-z][a-z0-9+.-]*://)(?!\*\*\*@)([^/\s@?#\"'<>:]*)(?::([^\s@?#\"'<>]*))?@")
_HOST_PORT = re.compile(r"(?i)^(?:localhost|\[[0-9a-f:.]+\]|[\w-]+(?:\.[\w-]+)+)$")
_QUERY = re.compile(r"(?i)([?&;](?:sig|signature|awsaccesskeyid|x-amz-credential|x-amz-signature|"
                    r"x-amz-security-token|x-goog-credential|x-goog-signature)=)[^&#\s\"'<>]*")
_XML = re.compile(rf"(?i)(<([\w:-]*{_SECRET_WORDS}[\w:-]*)>)[^<]*(</\2>)")
_KEY_VALUE = re.compile(
    rf"(?i)(\b[\w.-]*{_SECRET_WORDS}[\w.-]*[\"']?\s*(?::|=|=>)\s*)"
    r"(?:\"(?:[^\"\\\r\n]|\\.)*\"|b?'(?:[^'\\\r\n]|\\.)*'|(?!\*\*\*)[^\s\"'&,;<>)}\]]+)")
_ACCESS_KEY_ID = re.compile(r"\b((?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA)[A-Z0-9]{16})\b")
_SESSION_TOKEN = re.compile(r"\b(?:IQoJb3JpZ2luX2Vj|FwoGZXIvYXdz|FQoGZXIvYXdz)[A-Za-z0-9/+=%]{20,}")


def redact(text: str) -> str:
    """``text`` with every credential it holds replaced by ``***``; anything else is left as it was."""
    if not isinstance(text, str) or not text:
        return text
    text = _PEM.sub(MASK, text)
    text = _AUTHORIZATION.sub(lambda m: m[1] + MASK, text)
    text = _BEARER.sub(lambda m: f"{m[1]} {MASK}", text)
    text = _USERINFO.sub(_masked_userinfo, text)
    text = _QUERY.sub(lambda m: m[1] + MASK, text)
    text = _XML.sub(lambda m: m[1] + MASK + m[3], text)
    text = _KEY_VALUE.sub(_masked_value, text)
    text = _ACCESS_KEY_ID.sub(MASK, text)
    return _SESSION_TOKEN.sub(MASK, text)


def _masked_userinfo(match: re.Match) -> str:
    """``scheme://***@``, unless the match is a host and port followed by a path that holds an '@'."""
    port = re.match(r"\d{1,5}/", match[3] or "")
    if port and _HOST_PORT.match(match[2]):
        return match[0]
    return f"{match[1]}{MASK}@"


def _masked_value(match: re.Match) -> str:
    """The key and its separator kept, the value masked, its quotes kept."""
    value = match[0][len(match[1]):]
    if value[:2] == "b'":
        return f"{match[1]}b'{MASK}'"
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match[1]}{quote}{MASK}{quote}"


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in each record's message, traceback and stack before it is written.

    Install it on handlers (``handler.addFilter(RedactingFilter())``): a filter on a logger does not see the
    records its child loggers propagate.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is left for logging to report
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
