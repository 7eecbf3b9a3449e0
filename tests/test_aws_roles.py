"""Roles assumed through STS (on a moto server): session names that identify the job, credentials renewed before
they expire, per-job clients that do not pile up, and no credential in the logs of it all."""

from __future__ import annotations

import io
import logging
import pickle
import re
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mr import aws_roles
from mr.aws_roles import (
    JOB_SCOPED_MAX,
    RoleError,
    assumed_role_session,
    job_scoped,
    role_session_for_job,
    role_session_name,
)
from mr.errors import InvalidInputError
from mr.models.endpoint import SageMakerModel
from mr.redact import RedactingFilter

ROLE = "arn:aws:iam::123456789012:role/reader"
LEGAL = re.compile(r"^[A-Za-z0-9_+=,.@-]{2,64}$")


# --- session names ---------------------------------------------------------------------------------------------

def test_session_name_is_mr_and_the_job_id():
    assert role_session_name("job-1") == "mr-job-1"
    assert role_session_name("a.b@c=d,e+f_g") == "mr-a.b@c=d,e+f_g"
    assert role_session_name("x" * 61) == "mr-" + "x" * 61  # exactly 64: kept whole


def test_changed_job_ids_carry_a_hash():
    long = role_session_name("x" * 100)
    assert len(long) == 64 and re.fullmatch(r"mr-x{52}-[0-9a-f]{8}", long)
    assert role_session_name("x" * 100) != role_session_name("x" * 99 + "y")  # differ only past the cut
    spaced = role_session_name("job 1/ä")
    assert re.fullmatch(r"mr-job-1---[0-9a-f]{8}", spaced) and spaced != role_session_name("job-1--")


@given(st.text(max_size=300))
def test_any_job_id_gives_a_legal_stable_name(job_id):
    name = role_session_name(job_id)
    assert LEGAL.match(name) and name.startswith("mr-") and name == role_session_name(job_id)


def test_session_name_needs_a_string():
    with pytest.raises(InvalidInputError, match="job_id"):
        role_session_name(None)


# --- assuming a role -------------------------------------------------------------------------------------------

def _identity(session) -> str:
    return session.client("sts").get_caller_identity()["Arn"]


def test_sts_accepts_the_name_and_shows_it_in_the_assumed_role_arn(moto_server):
    import boto3

    name = role_session_name("job/with spaces" + "z" * 80)
    reply = boto3.client("sts").assume_role(RoleArn=ROLE, RoleSessionName=name)
    assert reply["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::123456789012:assumed-role/reader/{name}"


def test_assumed_role_session_acts_as_the_job(moto_server):
    session = assumed_role_session(ROLE, role_session_name("job-7"))
    assert _identity(session).endswith(":assumed-role/reader/mr-job-7")
    credentials = session.get_credentials()
    assert credentials.method == "sts-assume-role" and credentials.access_key.startswith("ASIA")


def test_credentials_are_renewed_before_they_expire(moto_server):
    session = assumed_role_session(ROLE, "mr-long-job")
    credentials = session.get_credentials()
    first = credentials.get_frozen_credentials()
    credentials._expiry_time = datetime.now(timezone.utc) + timedelta(minutes=5)  # inside botocore's 10 minutes
    second = credentials.get_frozen_credentials()
    assert second.access_key != first.access_key and second.secret_key != first.secret_key
    assert credentials._expiry_time > datetime.now(timezone.utc) + timedelta(minutes=30)
    assert _identity(session).endswith("/mr-long-job")


def test_a_role_that_cannot_be_assumed_names_role_and_session(moto_server, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(RoleError, match=r"cannot assume role arn:aws:iam::123456789012:role/reader as session "
                                        r"mr-job-1: EndpointConnectionError") as caught:
        assumed_role_session(ROLE, "mr-job-1", sts_endpoint_url="http://127.0.0.1:9")
    assert "testing" not in str(caught.value)  # the caller's own secret key (the fixture's dummy)


@pytest.mark.parametrize("role, name", [("arn:aws:s3:::bucket", "mr-x"), ("reader", "mr-x"), (None, "mr-x"),
                                        (ROLE, "m"), (ROLE, "mr job"), (ROLE, "x" * 65)])
def test_bad_role_or_name_is_refused_before_any_call(role, name):
    with pytest.raises(InvalidInputError):
        assumed_role_session(role, name)


def test_role_session_for_job_is_made_once_per_job(moto_server):
    first = role_session_for_job(ROLE, "job-a")
    assert role_session_for_job(ROLE, "job-a") is first
    other = role_session_for_job(ROLE, "job-b")
    assert other is not first and _identity(other).endswith("/mr-job-b")


def test_job_scoped_keeps_the_most_recently_used(monkeypatch):
    monkeypatch.setattr(aws_roles, "_JOB_SCOPED", type(aws_roles._JOB_SCOPED)())
    made = []
    for n in range(JOB_SCOPED_MAX):
        job_scoped(("t", n), lambda n=n: made.append(n) or object())
    kept = job_scoped(("t", 0), lambda: pytest.fail("made again"))  # used again: now the most recent
    job_scoped(("t", "new"), object)
    assert len(aws_roles._JOB_SCOPED) == JOB_SCOPED_MAX and ("t", 1) not in aws_roles._JOB_SCOPED
    assert job_scoped(("t", 0), object) is kept and made == list(range(JOB_SCOPED_MAX))


# --- the SageMaker model, per job ------------------------------------------------------------------------------

def test_sagemaker_client_assumes_the_role_as_the_job(moto_server):
    import boto3

    def identity(model: SageMakerModel) -> str:
        frozen = model.client()._request_signer._credentials.get_frozen_credentials()
        sts = boto3.client("sts", aws_access_key_id=frozen.access_key, aws_secret_access_key=frozen.secret_key,
                           aws_session_token=frozen.token)
        return sts.get_caller_identity()["Arn"]

    model = SageMakerModel("detector", assumed_role=ROLE, endpoint_url=moto_server, job_id="job-42")
    copy = pickle.loads(pickle.dumps(model))
    assert copy.job_id == "job-42" and copy.client() is model.client()
    assert identity(model).endswith("/mr-job-42")
    other = SageMakerModel("detector", assumed_role=ROLE, endpoint_url=moto_server, job_id="job-43")
    assert other.client() is not model.client() and identity(other).endswith("/mr-job-43")
    anonymous = SageMakerModel("detector", assumed_role=ROLE, endpoint_url=moto_server)
    assert identity(anonymous).endswith("/mr-detector")
    plain = SageMakerModel("detector", endpoint_url=moto_server, job_id="job-44")
    assert plain.client() is SageMakerModel("detector", endpoint_url=moto_server, job_id="job-45").client()
    with pytest.raises(InvalidInputError, match="job_id"):
        SageMakerModel("detector", job_id=42)


# --- no credential in the logs ---------------------------------------------------------------------------------

def test_assuming_a_role_logs_no_credential_through_the_filter(moto_server):
    """botocore's debug log holds the AssumeRole reply, keys and token included; the filter masks them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    handler.addFilter(RedactingFilter())
    root, botocore_log = logging.getLogger(), logging.getLogger("botocore")
    saved = root.level, botocore_log.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    botocore_log.setLevel(logging.DEBUG)
    try:
        session = assumed_role_session(ROLE, "mr-logged")
        _identity(session)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        botocore_log.setLevel(saved[1])
    written = stream.getvalue()
    frozen = session.get_credentials().get_frozen_credentials()
    assert "AssumeRoleResponse" in written and "mr-logged" in written  # the reply was logged ...
    for secret in (frozen.access_key, frozen.secret_key, frozen.token, "testing"):
        assert secret not in written  # ... without a credential
