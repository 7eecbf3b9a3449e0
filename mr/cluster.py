"""One function that returns a ``distributed.Client`` from configuration: local cluster or scheduler address."""

from __future__ import annotations

import logging
from typing import Any

from mr import config

log = logging.getLogger(__name__)


def get_client(address: str | None = None, n_workers: int | None = None, **local: Any):
    """Connect to ``address`` (or ``mr.cluster.address``); without one, start a LocalCluster on loopback."""
    from distributed import Client, LocalCluster

    address = config.get("cluster.address", address)
    if address:
        client = Client(address)
    else:
        options = {
            "n_workers": config.get("cluster.n-workers", n_workers),
            "threads_per_worker": config.get("cluster.threads-per-worker", local.pop("threads_per_worker", None)),
            "processes": config.get("cluster.processes", local.pop("processes", None)),
            "dashboard_address": config.get("cluster.dashboard-address", local.pop("dashboard_address", None)),
            "host": "127.0.0.1",
            **local,
        }
        client = Client(LocalCluster(**{k: v for k, v in options.items() if v is not None}))
    if client.dashboard_link:
        log.info("Dask dashboard: %s", client.dashboard_link)
    return client
