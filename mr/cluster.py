"""One function that returns a ``distributed.Client`` from configuration: local cluster or scheduler address."""

from __future__ import annotations

import logging
from typing import Any

from mr import config

log = logging.getLogger(__name__)


def get_client(address: str | None = None, n_workers: int | None = None, **local: Any):
    """A client for ``address`` (or ``mr.cluster.address``), else for a Dask Gateway cluster when
    ``mr.cluster.gateway.address`` is set, else for a LocalCluster on loopback."""
    from distributed import Client, LocalCluster

    address = config.get("cluster.address", address)
    gateway = None if address else _gateway_settings()
    if gateway is not None:
        from mr.gateway import gateway_client

        return gateway_client(gateway)
    if address:
        client = Client(address)
    else:
        options = {
            "n_workers": config.get("cluster.n-workers", n_workers),
            "threads_per_worker": config.get("cluster.threads-per-worker", local.pop("threads_per_worker", None)),
            "processes": config.get("cluster.processes", local.pop("processes", None)),
            "dashboard_address": config.get("cluster.dashboard-address", local.pop("dashboard_address", None)),
            **local,
        }
        options = {k: v for k, v in options.items() if v is not None}
        if options.get("processes", True):
            options.setdefault("host", "127.0.0.1")  # loopback only (threads-only clusters talk in-process)
        client = Client(LocalCluster(**options))
    if client.dashboard_link:
        log.info("Dask dashboard: %s", client.dashboard_link)
    return client


def _gateway_settings():
    from mr.gateway import resolve_gateway

    return resolve_gateway()
