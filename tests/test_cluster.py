"""mr.get_client: the LocalCluster it starts (worker environment and settings, and its end), and clusters by address."""

from __future__ import annotations

import os
import time

import psutil


def _worker_facts() -> dict:
    import dask

    return {
        "pid": os.getpid(),
        "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "profile_interval": dask.config.get("distributed.worker.profile.interval"),
    }


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def test_local_cluster_has_mr_worker_settings_and_closes_with_its_client():
    from mr.cluster import get_client

    with get_client(n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        (facts,) = client.run(_worker_facts).values()
        cluster = client.cluster
        assert client.submit(sum, [1, 2, 3]).result() == 6
    assert facts["mmap_threshold"] == "33554432"  # mr.cluster.worker-environ reached the worker process
    assert facts["profile_interval"] == "100ms"  # mr.cluster.local-dask-config reached the worker
    assert facts["pid"] != os.getpid()
    assert _gone(facts["pid"]), "the worker process outlived its client"
    assert cluster.status.name == "closed"


def test_clients_one_after_another_leave_no_cluster_behind():
    from mr.cluster import get_client

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    pids = []
    for _ in range(2):
        with get_client(n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
            pids += [facts["pid"] for facts in client.run(_worker_facts).values()]
    assert all(_gone(pid) for pid in pids)
    left = {p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE} - before
    assert not [p for p in left if "resource_tracker" not in " ".join(psutil.Process(p).cmdline())]


def test_cluster_reached_by_address_keeps_running(client):
    from mr.cluster import get_client

    address = client.scheduler.address
    with get_client(address) as second:
        assert second.submit(sum, [4, 5]).result() == 9
    assert client.submit(sum, [1, 1]).result() == 2  # the session's cluster still serves its own client
    assert len(client.scheduler_info()["workers"]) == 2
