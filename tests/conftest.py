"""Fixtures shared by the tests: a real distributed LocalCluster on loopback, and scene files."""

from __future__ import annotations

import os

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
