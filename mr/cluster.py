"""One function that returns a ``distributed.Client`` from configuration: local cluster or scheduler address."""

from __future__ import annotations

import logging
from typing import Any

from mr import config

log = logging.getLogger(__name__)

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    WorkerPlugin = object  # type: ignore[assignment,misc]


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


class WorkerLogging(WorkerPlugin):
    """Gives each worker process the client's log format and level, so worker lines carry the job they serve."""

    name = "mr-logging"

    def __init__(self, fmt: str, level: str | int) -> None:
        self.fmt, self.level = fmt, level

    def setup(self, worker) -> None:
        from mr.logs import configure_logging

        configure_logging(self.fmt, self.level)
        for noisy in ("distributed", "bokeh", "tornado"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def log_like_client(client, fmt: str, level: str | int = "INFO") -> None:
    """Set the log format up on the cluster's workers, now and on workers that join later."""
    client.register_plugin(WorkerLogging(fmt, level), name=WorkerLogging.name)
