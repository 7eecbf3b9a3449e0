"""Fixtures shared by the tests: a real distributed LocalCluster on loopback, and scene files."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def client():
    """Two worker processes on 127.0.0.1, one thread each: the embedded default, small."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def moto_server():
    """A moto server on 127.0.0.1 (free port) that boto3 talks to over HTTP; yields its endpoint URL.

    AWS credentials and region are set to dummies for the whole session, and AWS_ENDPOINT_URL points every
    boto3 client (and GDAL's /vsis3/) at the server. State is reset by each test that needs a clean account.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


_store_prefixes = itertools.count()


@pytest.fixture(params=["sqlite", "dynamodb"])
def store(request, tmp_path):
    """Each state store in turn: SQLite in a temporary folder, DynamoDB (tables of their own) on the moto server."""
    from mr.state import DynamoStore, SqliteStore

    if request.param == "sqlite":
        opened = SqliteStore(tmp_path / "state.db")
    else:
        request.getfixturevalue("moto_server")
        name = re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60]
        opened = DynamoStore(f"mr-test-{next(_store_prefixes)}-{name}")
        opened.ensure_tables()
    yield opened
    opened.close()


@pytest.fixture
def queue_dir(tmp_path):
    """A folder for an SQLite queue: in RAM (/dev/shm) where there is one, so that tens of thousands of commits cost
    no fsync (what is tested is the listener, not the disk)."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="mr-test-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
