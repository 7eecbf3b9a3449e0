"""mr on a Dask Gateway: a real dask-gateway-server, started here on 127.0.0.1, runs the clusters as local processes."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import dask.config
import numpy as np
import psutil
import pytest

from mr.errors import InvalidInputError
from mr.gateway import GatewayError, GatewaySettings, gateway_client, open_gateway, resolve_gateway

PASSWORD = "gw-test-Secret-91"

SERVER_CONFIG = """\
from dask_gateway_server.options import Integer, Options

c.Gateway.address = "127.0.0.1:{api_port}"
c.Proxy.address = "127.0.0.1:{http_port}"
c.Proxy.tcp_address = "127.0.0.1:{tcp_port}"
c.Gateway.backend_class = "dask_gateway_server.backends.local.UnsafeLocalBackend"
c.Gateway.authenticator_class = "dask_gateway_server.auth.SimpleAuthenticator"
c.SimpleAuthenticator.password = {password!r}
# distributed no longer installs the dask-scheduler / dask-worker scripts the gateway runs by default; the
# interpreter's own path also survives the backend's trimmed environment (PATH only, no pyenv/venv activation).
c.LocalClusterConfig.scheduler_cmd = [{python!r}, "-m", "dask", "scheduler"]
c.LocalClusterConfig.worker_cmd = [{python!r}, "-m", "dask", "worker"]
c.LocalClusterConfig.worker_memory = "1 G"
c.LocalClusterConfig.adaptive_period = 0.5
c.LocalBackend.clusters_directory = {clusters!r}
c.Backend.cluster_options = Options(Integer("worker_threads", default=1, min=1, max=2))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, whatever HTTP_PROXY says
    try:
        with direct.open(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM the server (it stops its clusters and proxy), then kill whatever of its process tree is left.

    The server starts the proxy, schedulers and workers in sessions of their own, so killing its process group
    alone would orphan them: they are found as descendants before the server goes.
    """
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    with _suppress_gone():
        os.killpg(process.pid, signal.SIGKILL)
    for child in tree:
        with _suppress_gone():
            child.kill()
    psutil.wait_procs(tree, timeout=5)
    process.wait(timeout=5)


class _suppress_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, (ProcessLookupError, psutil.NoSuchProcess))


@pytest.fixture(scope="module", autouse=True)
def _no_http_proxy():
    """dask-gateway sends even loopback requests through $HTTP_PROXY (it ignores $NO_PROXY) unless told not to."""
    with dask.config.set({"gateway.http-client.proxy": False}):
        yield


@pytest.fixture(scope="module")
def gateway_dir(tmp_path_factory):
    """The server's folder: its config file, its log, and clusters/<name>/logs of each cluster while it runs."""
    return tmp_path_factory.mktemp("gateway")


@pytest.fixture(scope="module")
def gateway(gateway_dir):
    """A dask-gateway-server on free loopback ports; yields the settings that reach it (simple auth, no scaling)."""
    root = gateway_dir
    ports = {name: _free_port() for name in ("api_port", "http_port", "tcp_port")}
    config_file = root / "dask_gateway_config.py"
    config_file.write_text(
        SERVER_CONFIG.format(**ports, password=PASSWORD, python=sys.executable, clusters=str(root / "clusters"))
    )
    log_path = root / "server.log"
    with open(log_path, "wb") as server_log:
        process = subprocess.Popen(
            [sys.executable, "-m", "dask_gateway_server", "-f", str(config_file)],
            cwd=root, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{ports['http_port']}"
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{address}/api/health"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"dask-gateway-server did not start (exit code {process.poll()}); is the dev extra "
                    f"(dask-gateway, dask-gateway-server[local]) installed? Its log:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.2)
        yield GatewaySettings(
            address=address, proxy_address=f"gateway://127.0.0.1:{ports['tcp_port']}", auth="simple",
            username="mr-test", password=PASSWORD,
        )
    finally:
        _stop_tree(process)


def _clusters(settings: GatewaySettings) -> dict[str, str]:
    with open_gateway(settings) as gw:
        return {report.name: report.status.name for report in gw.list_clusters()}


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def _n_workers(client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _scheduler_log(tmp_root, cluster_name: str) -> str:
    return (tmp_root / "clusters" / cluster_name / "logs" / "scheduler.log").read_text()


# --- settings, no server --------------------------------------------------------------------------------------------


def _dotted(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_no_address_means_no_gateway():
    with dask.config.set({"mr.cluster.gateway.address": None}):
        assert resolve_gateway() is None
        with pytest.raises(InvalidInputError, match="DASK_MR__CLUSTER__GATEWAY__ADDRESS"):
            gateway_client()


def test_unreachable_gateway_is_a_gateway_error_with_its_cause():
    settings = GatewaySettings(address=f"http://127.0.0.1:{_free_port()}", auth="basic", password=PASSWORD)
    with pytest.raises(GatewayError, match="127.0.0.1") as caught:
        gateway_client(settings)
    assert caught.value.__cause__ is not None and PASSWORD not in str(caught.value)


def test_environment_variables_reach_the_settings():
    env = {
        "DASK_MR__CLUSTER__GATEWAY__ADDRESS": "https://gateway.example.org",
        "DASK_MR__CLUSTER__GATEWAY__AUTH": "basic",
        "DASK_MR__CLUSTER__GATEWAY__USERNAME": "ana",
        "DASK_MR__CLUSTER__GATEWAY__PASSWORD": "1234",  # dask.config parses this as a number
        "DASK_MR__CLUSTER__GATEWAY__CLUSTER_OPTIONS__WORKER_CORES": "2",
        "DASK_MR__CLUSTER__GATEWAY__ADAPT__MAXIMUM": "8",
        "DASK_MR__CLUSTER__GATEWAY__SHUTDOWN_ON_CLOSE": "false",
    }
    with dask.config.set(_dotted(dask.config.collect_env(env))):
        settings = resolve_gateway()
        overridden = resolve_gateway(adapt_maximum=3, adapt_minimum=1)
    assert settings.address == "https://gateway.example.org" and settings.auth == "basic"
    assert settings.password == "1234" and settings.username == "ana"
    assert dict(settings.cluster_options) == {"worker_cores": 2}
    assert (settings.workers, settings.adapt_minimum, settings.adapt_maximum) == (None, None, 8)
    assert settings.adaptive and settings.shutdown_on_close is False
    assert (overridden.adapt_minimum, overridden.adapt_maximum) == (1, 3)
    assert "1234" not in repr(settings)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"workers": 2, "adapt_maximum": 4}, "workers"),
        ({"adapt_minimum": 3, "adapt_maximum": 2}, "adapt_maximum"),
        ({"workers": -1}, "workers"),
        ({"auth": "ldap"}, "auth"),
        ({"auth": "kerberos", "password": PASSWORD}, "password"),
        ({"auth": "basic", "api_token": PASSWORD}, "api_token"),
        ({"address": "gateway.example.org"}, "address"),
    ],
)
def test_bad_settings_name_the_field_and_hide_secrets(fields, field):
    with pytest.raises(InvalidInputError) as caught:
        GatewaySettings(**{"address": "https://gateway.example.org", **fields})
    assert caught.value.field == field
    assert PASSWORD not in str(caught.value)


# --- against the server -------------------------------------------------------------------------------------------


def test_client_computes_and_its_cluster_stops_with_it(gateway, caplog):
    settings = dataclasses.replace(gateway, workers=1, cluster_options={"worker_threads": 2})
    with caplog.at_level(logging.INFO, logger="mr.gateway"), gateway_client(settings) as client:
        name = client.cluster.name
        assert client.submit(sum, [1, 2, 3]).result() == 6
        assert [w["nthreads"] for w in client.scheduler_info()["workers"].values()] == [2]
        assert _clusters(gateway) == {name: "RUNNING"}
    assert f"{gateway.address}/clusters/{name}/status" in caplog.text  # the dashboard link
    assert PASSWORD not in caplog.text
    _wait_for(lambda: name not in _clusters(gateway), 15, f"cluster {name} to stop")


def test_shutdown_on_close_false_leaves_the_cluster_running(gateway):
    with gateway_client(dataclasses.replace(gateway, shutdown_on_close=False)) as client:
        name = client.cluster.name
    try:
        assert _clusters(gateway).get(name) == "RUNNING"
    finally:
        with open_gateway(gateway) as gw:
            gw.stop_cluster(name)
    _wait_for(lambda: name not in _clusters(gateway), 15, f"cluster {name} to stop")


def test_adaptive_scaling_keeps_within_its_bounds(gateway, gateway_dir):
    settings = dataclasses.replace(gateway, adapt_minimum=1, adapt_maximum=2)
    with gateway_client(settings) as client:
        _wait_for(lambda: _n_workers(client) == 1, 30, "the adaptive minimum of 1 worker")
        work = client.map(time.sleep, [0.2] * 100, pure=False)  # asks for ~4 workers: capped at 2
        _wait_for(lambda: _n_workers(client) == 2, 30, "adaptive scaling up to 2 workers")
        seen = []
        for _ in range(10):  # a few adaptive periods (0.5 s) at the cap
            seen.append(_n_workers(client))
            time.sleep(0.2)
        client.cancel(work)
        log = _scheduler_log(gateway_dir, client.cluster.name)
    assert max(seen) == 2
    assert "Enabling adaptive scaling, minimum=1, maximum=2" in log
    requested = [int(n) for n in re.findall(r"Requesting scale to (\d+) workers", log)]
    assert requested and max(requested) == 2  # 100 queued tasks alone would ask for 10


def test_unknown_cluster_option_fails_by_name_before_starting(gateway):
    with pytest.raises(InvalidInputError, match="worker_threads") as caught:
        gateway_client(dataclasses.replace(gateway, cluster_options={"image": "mr:latest"}))
    assert caught.value.field == "cluster_options"
    assert _clusters(gateway) == {}


def test_wrong_password_is_a_gateway_error_that_carries_no_credentials(gateway):
    with pytest.raises(GatewayError, match="HTTP 401.*password") as caught:
        gateway_client(dataclasses.replace(gateway, password="wrong"))
    assert "wrong" not in str(caught.value)
    assert caught.value.__cause__ is None  # aiohttp's error holds the request's Authorization header
    assert _clusters(gateway) == {}


def test_detection_on_fixed_gateway_workers_matches_local(gateway, tmp_path):
    import mr
    from mr.synthetic import write_scene

    path = tmp_path / "scene.tif"
    write_scene(path, 1200, 1000, n_objects=40, seed=5)
    result = mr.detect(mr.open_image(path), "builtin", tile_size=400, overlap=40, region_size=800)
    with gateway_client(dataclasses.replace(gateway, workers=2)) as client:
        client.wait_for_workers(2, timeout=30)
        assert _n_workers(client) == 2
        on_gateway = client.compute(result).result()
    local = result.compute(scheduler="sync")
    columns = ["image_x0", "image_y0", "image_x1", "image_y1", "score"]
    assert len(local) > 0
    np.testing.assert_allclose(
        on_gateway[columns].sort_values(columns).to_numpy(), local[columns].sort_values(columns).to_numpy()
    )


def test_get_client_uses_the_configured_gateway(gateway):
    """The one cluster function every entry point calls picks the gateway from configuration."""
    import dask

    from mr.cluster import get_client

    keys = {
        "mr.cluster.gateway.address": gateway.address,
        "mr.cluster.gateway.proxy-address": gateway.proxy_address,
        "mr.cluster.gateway.auth": "simple",
        "mr.cluster.gateway.username": gateway.username,
        "mr.cluster.gateway.password": gateway.password,
        "mr.cluster.gateway.workers": 1,
    }
    with dask.config.set(keys), get_client() as client:
        assert type(client).__name__ == "GatewayClient"
        assert client.submit(sum, [4, 5]).result() == 9
