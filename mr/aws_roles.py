"""IAM roles assumed through STS for one job: a session name that identifies the job, credentials refreshed before
they expire, and never shown.

A request may name roles (``imageProcessor.assumedRole``, an output's ``assumedRole``, ``imageReadRole``). Each is
assumed with ``RoleSessionName`` ``mr-<jobId>`` (:func:`role_session_name`), so CloudTrail ties every call made as
the role to the job that made it. :func:`assumed_role_session` assumes the role once, at once (so that a role that
cannot be assumed fails where it is asked for, with a clear reason), and botocore assumes it again before the
credentials expire (15 minutes ahead), so a job that runs for hours keeps working. Credentials live only inside
botocore's credential object: nothing here logs, formats or returns them.

Clients made for one job are kept per process by :func:`job_scoped`, a small cache of the most recently used:
every tile of a job reuses its client, and a worker that runs job after job does not pile up clients.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mr.errors import InvalidInputError, MrError

log = logging.getLogger("mr.aws_roles")

SESSION_NAME_MAX = 64
"""STS's limit on RoleSessionName."""
SESSION_PREFIX = "mr-"
DEFAULT_DURATION_S = 3600
"""Seconds the credentials of one AssumeRole last; botocore renews them 15 minutes before."""
JOB_SCOPED_MAX = 32
"""Per-job objects (clients, sessions) each process keeps; the least recently used goes first."""
_ILLEGAL = re.compile(r"[^\w+=,.@-]", re.ASCII)
_ROLE_ARN = re.compile(r"^arn:aws[\w-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$", re.ASCII)


class RoleError(MrError):
    """A role that could not be assumed; the message names the role and the session, never a credential."""


def role_session_name(job_id: str) -> str:
    """``mr-<jobId>`` in STS's characters (``[\\w+=,.@-]``) and at most 64 of them, so CloudTrail shows the job.

    A job id that had to be changed (characters replaced, or cut to fit) ends with 8 hex digits of its hash, so
    two jobs never share a name because their ids differ only where the name could not show it.
    """
    if not isinstance(job_id, str):
        raise InvalidInputError("job_id", job_id, "give the job id as a string")
    name = f"{SESSION_PREFIX}{job_id}"
    clean = _ILLEGAL.sub("-", name)
    if clean == name and len(clean) <= SESSION_NAME_MAX:
        return clean
    digest = hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean[:SESSION_NAME_MAX - len(digest) - 1]}-{digest}"


def check_role_arn(role_arn: Any) -> str:
    """An IAM role ARN (``arn:aws:iam::<account>:role/<name>``, any partition), or InvalidInputError."""
    if not isinstance(role_arn, str) or not _ROLE_ARN.match(role_arn):
        raise InvalidInputError("assumed_role", role_arn, "give a role ARN, arn:aws:iam::<account>:role/<name>")
    return role_arn


def assumed_role_session(
    role_arn: str, session_name: str, *, duration_s: int = DEFAULT_DURATION_S, region_name: str | None = None,
    sts_endpoint_url: str | None = None,
) -> Any:
    """A boto3 session acting as ``role_arn`` under ``session_name``, renewed by botocore before it expires.

    The role is assumed here, with the caller's own credentials (the default chain); a role that cannot be assumed
    raises :class:`RoleError`. A failed renewal later raises botocore's own error from the call that needed it.
    """
    import boto3
    import botocore.session
    from botocore.credentials import RefreshableCredentials

    check_role_arn(role_arn)
    if not isinstance(session_name, str) or _ILLEGAL.search(session_name) or not 2 <= len(session_name) <= 64:
        raise InvalidInputError("session_name", session_name, "give 2-64 of [A-Za-z0-9_+=,.@-]: role_session_name()")
    sts = boto3.session.Session(region_name=region_name).client("sts", endpoint_url=sts_endpoint_url)
    fetch = _fetcher(sts, role_arn, session_name, duration_s)
    try:
        first = fetch()
    except Exception as e:  # AccessDenied, no credentials, no network: all say the same to the caller
        raise RoleError(f"cannot assume role {role_arn} as session {session_name}: {_reason(e)}") from e
    core = botocore.session.Session()
    core._credentials = RefreshableCredentials.create_from_metadata(first, fetch, "sts-assume-role")
    log.debug("assumed role %s as session %s", role_arn, session_name)
    return boto3.session.Session(botocore_session=core, region_name=region_name)


def _fetcher(sts: Any, role_arn: str, session_name: str, duration_s: int) -> Callable[[], dict]:
    """The function botocore calls for fresh credentials: one AssumeRole, in botocore's metadata form."""

    def fetch() -> dict:
        reply = sts.assume_role(RoleArn=role_arn, RoleSessionName=session_name, DurationSeconds=duration_s)
        credentials = reply["Credentials"]
        return {"access_key": credentials["AccessKeyId"], "secret_key": credentials["SecretAccessKey"],
                "token": credentials["SessionToken"], "expiry_time": credentials["Expiration"].isoformat()}

    return fetch


def _reason(error: Exception) -> str:
    """An error's code and message (botocore's ClientError), else its type and text; never a credential."""
    from mr.redact import redact

    info = getattr(error, "response", {}).get("Error", {})
    if info:
        return redact(f"{info.get('Code', 'error')}: {info.get('Message', '')}")
    return redact(f"{type(error).__name__}: {error}")


_JOB_SCOPED: OrderedDict[tuple, Any] = OrderedDict()
_JOB_SCOPED_LOCK = threading.RLock()


def job_scoped(key: tuple, make: Callable[[], Any]) -> Any:
    """One object per key in this process, made on first use; only the JOB_SCOPED_MAX most recently used are kept.

    For what is made per job (a client whose credentials carry the job's session name): reused by all the tiles of
    the job, and dropped once newer jobs have pushed it out, so a long-running worker does not accumulate them.
    """
    with _JOB_SCOPED_LOCK:
        if key in _JOB_SCOPED:
            _JOB_SCOPED.move_to_end(key)
            return _JOB_SCOPED[key]
        made = _JOB_SCOPED[key] = make()
        while len(_JOB_SCOPED) > JOB_SCOPED_MAX:
            _JOB_SCOPED.popitem(last=False)
        return made


def role_session_for_job(role_arn: str, job_id: str, **options: Any) -> Any:
    """This process's session for ``role_arn`` as job ``job_id`` (see :func:`assumed_role_session`), made once."""
    name = role_session_name(job_id)
    key = ("role-session", role_arn, name, tuple(sorted(options.items())))
    return job_scoped(key, lambda: assumed_role_session(role_arn, name, **options))
