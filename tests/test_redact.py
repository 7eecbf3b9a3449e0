"""Credentials masked in text: presigned URLs, userinfo, AWS keys and tokens, Authorization headers; ordinary text
untouched; and no credential in a job's record or notices."""

from __future__ import annotations

import json
import logging
import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mr.redact import RedactingFilter, redact

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
KEY_ID = "AKIAIOSFODNN7EXAMPLE"
TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQDexample+token/part=="
PRESIGNED = ("https://imagery.s3.us-east-1.amazonaws.com/scenes/a.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             f"&X-Amz-Credential={KEY_ID}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
             "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr%2F%2Fexample"
             "&X-Amz-Signature=fe5f80f77d5fa3beca038a248ff027d0445342fe2855ddc963176630326f1024")


@pytest.mark.parametrize("text, expected", [
    (PRESIGNED, "https://imagery.s3.us-east-1.amazonaws.com/scenes/a.tif?X-Amz-Algorithm=AWS4-HMAC-SHA256"
                "&X-Amz-Credential=***&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
                "&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE&Expires=1&Signature=abc%2Bdef",
     "https://b.s3.amazonaws.com/k?AWSAccessKeyId=***&Expires=1&Signature=***"),
    ("https://acct.blob.core.windows.net/c/a.tif?sv=2022&sig=abc%3D", "https://acct.blob.core.windows.net/c/a.tif?sv=2022&sig=***"),
    ("https://user:p%40ss@host.example.org/a.tif", "https://***@host.example.org/a.tif"),
    (f"s3://{KEY_ID}:{SECRET}@bucket/a.tif", "s3://***@bucket/a.tif"),
    ("http://token@host/x", "http://***@host/x"),
    ("s3://AKIAIOSFODNN7EXAMPLE:12/abcdefghijklmnopqrstuvwxyz0123456789AB@bucket/k", "s3://***@bucket/k"),
    ("Authorization: AWS4-HMAC-SHA256 Credential=AKIA/x, SignedHeaders=host, Signature=abc\nnext line",
     "Authorization: ***\nnext line"),
    ('{"Authorization": "Basic dXNlcjpwYXNz", "Accept": "application/json"}',
     '{"Authorization": "***", "Accept": "application/json"}'),
    ("calling with Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig now", "calling with Bearer *** now"),
    (f"AWS_SECRET_ACCESS_KEY={SECRET}\nAWS_SESSION_TOKEN={TOKEN}", "AWS_SECRET_ACCESS_KEY=***\nAWS_SESSION_TOKEN=***"),
    (f"aws_access_key_id = {KEY_ID}", "aws_access_key_id = ***"),
    (f"{{'AccessKeyId': '{KEY_ID}', 'SecretAccessKey': '{SECRET}', 'SessionToken': '{TOKEN}', 'Expiration': 1}}",
     "{'AccessKeyId': '***', 'SecretAccessKey': '***', 'SessionToken': '***', 'Expiration': 1}"),
    ('"password": "with \\"quotes\\" and spaces", "user": "me"', '"password": "***", "user": "me"'),
    (f"<Credentials><AccessKeyId>{KEY_ID}</AccessKeyId><SecretAccessKey>{SECRET}</SecretAccessKey>"
     f"<SessionToken>{TOKEN}</SessionToken></Credentials>",
     "<Credentials><AccessKeyId>***</AccessKeyId><SecretAccessKey>***</SecretAccessKey>"
     "<SessionToken>***</SessionToken></Credentials>"),
    (f"keys {KEY_ID} and {TOKEN} alone", "keys *** and *** alone"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "***"),
    ("mr.cluster.gateway.password: hunter2", "mr.cluster.gateway.password: ***"),
])
def test_credentials_are_masked(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "cannot open image s3://imagery/scenes/a.tif: NoSuchKey",
    "https://imagery.example.org:8080/path/a@b.tif", "http://localhost:9000/bucket/a@2x.png",
    "region r3-c5 of job-1:s3://imagery/a.tif: 16 tiles, 2 failed",
    "no progress for 3725 s (last progress 2026-01-01T10:00:00Z, status IN_PROGRESS; limit 3600 s)",
    "arn:aws:sts::123456789012:assumed-role/reader/mr-job-7",
    "StatusMonitor update: SUCCESS job-1: 17 features published to s3://out/job-1.geojson",
    "ModelError (HTTP 424): the model returned 503",
    "X-Amz-SignedHeaders=host&X-Amz-Date=20260101T000000Z",
    "", "***", "sha1 2fd4e1c67a2d28fced849ee1bb76e7391b93eb12",
])
def test_ordinary_text_is_untouched(text):
    assert redact(text) == text


def test_non_text_is_returned_as_it_is():
    assert redact(None) is None and redact(5) == 5


_SECRETS = st.text(alphabet=string.ascii_letters + string.digits + "/+=", min_size=12, max_size=60)
_TEMPLATES = [
    "{url}?X-Amz-Signature={s}", "{url}?a=1&X-Amz-Security-Token={s}&b=2", "{url}?X-Amz-Credential={s}",
    "https://me:{s}@host/x", "Authorization: Bearer {s}", "'SecretAccessKey': '{s}'", '"SessionToken": "{s}"',
    "aws_secret_access_key={s}", "password = {s}", "<SessionToken>{s}</SessionToken>",
]
_AROUND = st.text(alphabet=string.ascii_letters + string.digits + " .,:;()[]{}\n-_", max_size=40)


@given(st.sampled_from(_TEMPLATES), _SECRETS, _AROUND, _AROUND)
def test_a_secret_never_survives_whatever_surrounds_it(template, secret, before, after):
    assume(secret not in before + after)
    text = before + " " + template.format(url="https://imagery.example.org/a.tif", s=secret) + " " + after
    assert secret not in redact(text)


@given(st.text(max_size=200) | st.sampled_from([PRESIGNED, f"s3://{KEY_ID}:{SECRET}@b/k", f"x={TOKEN}"]))
def test_redact_is_idempotent_and_total(text):
    once = redact(text)
    assert redact(once) == once


def test_filter_masks_messages_arguments_and_tracebacks():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("mr.test.redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("opening %s", PRESIGNED)
        try:
            raise RuntimeError(f"refused: aws_secret_access_key={SECRET}")
        except RuntimeError:
            logger.exception("failed with password=%s", "hunter2")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    written = "\n".join(records)
    assert "X-Amz-Signature=***" in written and "aws_secret_access_key=***" in written
    for secret in (SECRET, "hunter2", KEY_ID, "fe5f80f77d5fa3be"):
        assert secret not in written


# --- the contract for the job records and notices ----------------------------------------------------------------

def test_no_credential_in_a_job_record_or_its_notices(tmp_path, caplog):
    """A request whose image URL is presigned or carries userinfo, failed as the listener fails it."""
    from mr.state import LogNotifier, SqliteStore

    store, notices = SqliteStore(tmp_path / "state.db"), LogNotifier()
    urls = [PRESIGNED, f"s3://{KEY_ID}:{SECRET}@bucket/b.tif"]
    request = json.dumps({"jobId": "job-1", "imageUrls": urls, "outputs": [{"type": "S3", "bucket": "out"}]})
    with caplog.at_level(logging.INFO, logger="mr.state.notices"):
        record = store.start_job("job-1", f"job-1:{urls[0]}", ",".join(urls), request)
        notices.job_status(record, "request received")
        record = store.update_job("job-1", status="FAILED", message=f"cannot open image {urls[1]}: AccessDenied",
                                  failed_tiles=[{"region": "r0-c0", "bounds": [[0, 0], [1, 1]],
                                                 "reason": f"GET {urls[0]} failed"}])
        notices.job_status(record, record.message)
    kept = json.dumps(store.get_job("job-1").to_dict()) + caplog.text
    for secret in (KEY_ID, SECRET, "fe5f80f77d5fa3be", "IQoJb3JpZ2luX2VjEJr"):
        assert secret not in kept
    assert "s3://***@bucket/b.tif" in kept and "X-Amz-Signature=***" in kept
    store.close()
