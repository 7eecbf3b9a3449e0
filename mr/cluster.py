"""One function that returns a ``distributed.Client`` from configuration: local cluster or scheduler address."""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from mr import config

log = logging.getLogger(__name__)


def get_client(address: str | None = None, n_workers: int | None = None, **local: Any):
    """A client for ``address`` (or ``mr.cluster.address``), else for a Dask Gateway cluster when
    ``mr.cluster.gateway.address`` is set, else for a LocalCluster on loopback.

    A LocalCluster started here belongs to its client: closing the client (or leaving its ``with`` block) shuts the
    scheduler and worker processes down, so a notebook or benchmark that opens clients one after another does not
    leave earlier clusters running beside the new one. A cluster reached by address is left running."""
    from distributed import Client

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
        with worker_environment():
            client = Client(**options)  # Client starts the LocalCluster itself, and so closes it with itself
    if client.dashboard_link:
        log.info("Dask dashboard: %s", client.dashboard_link)
    client.run(preload_task_modules, wait=False)
    return client


async def preload_task_modules() -> None:
    """Import what region tasks run (about 0.5 s in a fresh worker) now, rather than inside the first task, and
    run the built-in detector once on a small tile (its scipy imports and numpy's first calls).

    A coroutine, so ``client.run(..., wait=False)`` may start it without waiting."""
    import mr.reader  # noqa: F401
    import mr.tasks  # noqa: F401
    from mr.models.builtin import BuiltinDetector, warm_tile

    BuiltinDetector().detect(warm_tile())


def worker_environ() -> dict[str, str]:
    """Environment variables a local worker process starts with: distributed's, then ``mr.cluster.worker-environ``."""
    import dask

    merged = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    merged.update(config.get("cluster.worker-environ") or {})
    return {str(k): str(v) for k, v in merged.items() if v is not None}


def worker_environment():
    """Context in which LocalCluster's nannies are created: they read the environment of their workers then.

    distributed sets MALLOC_TRIM_THRESHOLD_=65536 for workers, which fixes glibc's mmap threshold at 128 KiB: every
    large temporary array of a model is then a fresh mmap whose pages fault in on first touch, about 25% of the
    built-in detector's time. ``mr.cluster.worker-environ`` keeps arrays up to 32 MiB in the heap and trims it
    above 128 MiB instead (measured: 16.5 → 11.6 ms per 1024² tile; peak memory checked by bench_memory).

    ``mr.cluster.local-dask-config`` (distributed settings, laid out as distributed's own) is in force too: the
    nannies hand the configuration to their workers, and the scheduler reads it as it starts.
    """
    import dask

    settings = _dotted(config.get("cluster.local-dask-config") or {})
    return dask.config.set({**settings, "distributed.nanny.pre-spawn-environ": worker_environ()})


def _dotted(tree: dict, prefix: str = "") -> dict:
    """Leaf settings of a nested mapping under dotted keys (``dask.config.set`` replaces whole subtrees otherwise);
    a null leaf keeps distributed's own value."""
    flat: dict = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_dotted(value, name))
        elif value is not None:
            flat[name] = value
    return flat


def _gateway_settings():
    from mr.gateway import resolve_gateway

    return resolve_gateway()


class WorkerLogging(WorkerPlugin):
    """Gives each worker process the client's log format and level, so worker lines carry the job they serve."""

    name = "mr-logging"

    def __init__(self, fmt: str, level: str | int) -> None:
        self.fmt, self.level = fmt, level

    def setup(self, worker) -> None:
        from mr.logs import configure_logging, quiet_libraries

        configure_logging(self.fmt, self.level)
        quiet_libraries()


def log_like_client(client, fmt: str, level: str | int = "INFO") -> None:
    """Set the log format up on the cluster's workers, now and on workers that join later."""
    client.register_plugin(WorkerLogging(fmt, level), name=WorkerLogging.name)
