"""Endpoint throughput: tiles per second through ``mr serve`` on loopback when mr's pipeline drives it, ÷ what the
same server sustains under a plain HTTP load generator with the same concurrency posting the same encoded tiles.

The server runs in its own process (a model that finds nothing by default, so the server's cost is small), so
neither client shares its GIL. The pipeline is ``mr.detect(mr.open_image(scene), HttpEndpointModel(url,
tile_format=F, max_in_flight=C), tile_size=512, overlap=32)`` computed on a local cluster: it reads and decodes the
scene, as a job does. The load generator is C threads, each with one keep-alive ``http.client`` connection,
posting the pipeline's own tiles pre-encoded with ``mr.encoding.encode_tile`` (format F, no compression: NITF by
default, as OSML ModelRunner sends tiles; ``--tile-format GTIFF`` is cheaper for the server to decode). Runs
alternate (load generator, pipeline) and the best of ``--repeats`` of each is kept.

Two layouts of the cores (``--cores``), each measured in the same run:

- ``split`` (the goal's measure, ratio ≥ 0.9): the server on the upper half of the cores, both clients on the lower
  half, every thread of each process pinned. A model server has cores of its own in any deployment (a GPU host, a
  SageMaker endpoint, a container with its CPU share), so what it sustains is what it does on its own cores, and
  the question is whether mr's pipeline keeps it as busy as a plain load generator does.
- ``shared`` (reported, no goal): everyone on every core. On a small machine this measures how much CPU each client
  takes from a server beside it: the pipeline reads and decodes the scene, encodes every tile and runs a Dask
  cluster, where the load generator posts bytes it already holds.

The scene is deflate-compressed, 12,000² by default (625 tiles, ~2 s a run): the pipeline decodes it, which the
load generator never does, and at this size its workers' 32 MiB GDAL caches hold little of it from the run before,
as for a new image (a 6,000² scene would be mostly cached, and its half-second runs weigh each job's start and end
more). ``--uncompressed`` reads an uncompressed copy instead, to see the pipeline's endpoint machinery alone.

  python -m benchmarks.bench_endpoint [--size 12000] [--concurrency 4 8] [--cores split shared] [--workers 2]
                                      [--repeats 3] [--tile-format NITF|GTIFF] [--server-model null|builtin]
                                      [--uncompressed]
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import rasterio
from rasterio.windows import Window

import mr
from benchmarks.common import listed, row, scene_file, uncompressed_copy
from mr.encoding import content_type, encode_tile
from mr.models.endpoint import HttpEndpointModel

TILE, OVERLAP = 512, 32

_SERVER = """
import sys
from mr.serve import make_server
if sys.argv[1] == "null":
    from benchmarks.common import NullModel
    model = NullModel()
else:
    from mr.models.registry import resolve_model
    model = resolve_model(sys.argv[1])
server = make_server(model, "127.0.0.1", 0)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    """``mr serve`` for ``model`` in a fresh process on a free loopback port; its base URL once it listens."""
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-c", _SERVER, model]
    process = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, text=True)
    port = int(process.stdout.readline())
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                break
        except OSError:
            time.sleep(0.05)
    return process, url


def encoded_tiles(path: Path, fmt: str = "NITF") -> list[bytes]:
    """Every tile of the pipeline's grid (tile 512, overlap 32), read from the file and encoded as ``fmt``."""
    plan = mr.detect(mr.open_image(path), "builtin", tile_size=TILE, overlap=OVERLAP).plan
    bounds = plan.grid.tile_bounds().reshape(-1, 4)
    payloads = []
    with rasterio.open(path) as src:
        for x0, y0, x1, y1 in bounds:
            tile = src.read(window=Window(int(x0), int(y0), int(x1 - x0), int(y1 - y0)))
            payloads.append(encode_tile(tile, fmt=fmt, compression="NONE"))
    return payloads


def load_generator_seconds(url: str, payloads: list[bytes], concurrency: int, fmt: str = "NITF") -> float:
    """Seconds for ``concurrency`` keep-alive connections to post every payload once (read each reply fully)."""
    parts = urlsplit(url)
    headers = {"Content-Type": content_type(fmt), "Accept": "application/json"}
    lock = threading.Lock()
    queue = iter(payloads)
    errors: list[str] = []
    connections = [http.client.HTTPConnection(parts.hostname, parts.port, timeout=30) for _ in range(concurrency)]
    for connection in connections:
        connection.connect()
    start = threading.Barrier(concurrency + 1)

    def worker(connection: http.client.HTTPConnection) -> None:
        start.wait()
        while True:
            with lock:
                payload = next(queue, None)
            if payload is None:
                return
            connection.request("POST", "/invocations", body=payload, headers=headers)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200 or not body:
                errors.append(f"HTTP {response.status}")

    threads = [threading.Thread(target=worker, args=(c,)) for c in connections]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    for connection in connections:
        connection.close()
    if errors:
        raise RuntimeError(f"load generator: {len(errors)} failed calls, e.g. {errors[0]}")
    return seconds


def pipeline_seconds(path: Path, url: str, concurrency: int, client, fmt: str = "NITF") -> tuple[float, int]:
    """Seconds for mr's pipeline to run the endpoint model over every tile of ``path`` (graph built beforehand)."""
    from mr.run import compute_table

    # one name per concurrency: the cluster-wide semaphore is keyed by the name and keeps its first max_leases
    model = HttpEndpointModel(url + "/invocations", tile_format=fmt, max_in_flight=concurrency,
                              name=f"bench-endpoint-c{concurrency}")
    result = mr.detect(mr.open_image(path), model, tile_size=TILE, overlap=OVERLAP)
    began = time.perf_counter()
    table = compute_table(result, client)
    return time.perf_counter() - began, len(table)


def cpu_seconds(*processes: psutil.Process) -> float:
    """User and system CPU seconds of the processes so far."""
    return sum(times.user + times.system for times in (process.cpu_times() for process in processes))


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of each process onto ``cpus`` (a thread started later inherits its creator's)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:  # a thread that has just ended
                pass


def core_layouts(modes: list[str]) -> dict[str, tuple[set[int], set[int]]]:
    """(server's cores, clients' cores) for each mode: ``split`` gives the server the upper half of this process's
    cores and both clients the lower half (as a model server on its own host would be); ``shared`` gives everyone
    every core. ``split`` needs two cores at least."""
    cores = sorted(os.sched_getaffinity(0))
    layouts = {}
    for mode in modes:
        if mode == "shared":
            layouts[mode] = (set(cores), set(cores))
        elif len(cores) >= 2:
            half = len(cores) // 2
            layouts[mode] = (set(cores[half:]), set(cores[:half]))
    return layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=12_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--cores", nargs="+", default=["split", "shared"], choices=["split", "shared"],
                        help="split: the server on its own cores, the goal's measure; shared: all on all cores")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-format", default="NITF", choices=["NITF", "GTIFF"], help="as OSML's tileFormat")
    parser.add_argument("--server-model", default="null")
    parser.add_argument("--uncompressed", action="store_true", help="read an uncompressed copy of the scene")
    args = parser.parse_args()
    from mr.cluster import get_client

    path = uncompressed_copy(scene_file(args.size)) if args.uncompressed else scene_file(args.size)
    fmt = args.tile_format
    payloads = encoded_tiles(path, fmt)
    tiles = len(payloads)
    server, url = start_server(args.server_model)
    server_process = psutil.Process(server.pid)
    source = "uncompressed" if args.uncompressed else "deflate"
    layouts = core_layouts(args.cores)
    lines = [f"    {tiles} tiles of {TILE}² (overlap {OVERLAP}) from {args.size}² ({source}), {fmt}"
             f" {len(payloads[0])} bytes each; server model {args.server_model!r}, "
             f"{args.workers} workers × {args.threads_per_worker} thread; "
             + "; ".join(f"{mode}: server on cores {sorted(s)}, clients on {sorted(c)}"
                         for mode, (s, c) in layouts.items())]
    try:
        with get_client(n_workers=args.workers, threads_per_worker=args.threads_per_worker) as client:
            here = psutil.Process()
            workers = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
            for mode, (server_cores, client_cores) in layouts.items():
                pin([server.pid], server_cores)
                pin([here.pid, *(worker.pid for worker in workers)], client_cores)
                for concurrency in args.concurrency:
                    lines += measure(mode, concurrency, path, url, payloads, client, fmt, args.repeats,
                                     server_process, here, workers)
                    print(lines[-2], lines[-1], sep="\n", flush=True)
    finally:
        server.terminate()
        server.wait()
    print("\n".join(lines))


def measure(mode: str, concurrency: int, path: Path, url: str, payloads: list[bytes], client, fmt: str,
            repeats: int, server_process: psutil.Process, here: psutil.Process,
            workers: list[psutil.Process]) -> list[str]:
    """The figure line and its detail line for one core layout and concurrency: runs alternate, best of each."""
    tiles = len(payloads)
    pipeline_seconds(path, url, concurrency, client, fmt)  # warm workers, pools, page cache
    load_generator_seconds(url, payloads, concurrency, fmt)
    direct, piped, found = [], [], 0
    server_cpu = {"direct": 0.0, "pipeline": 0.0}
    client_cpu = {"direct": 0.0, "pipeline": 0.0}  # the load generator's process; mr's workers and client
    for _ in range(repeats):
        before, before_client = cpu_seconds(server_process), cpu_seconds(here)
        direct.append(load_generator_seconds(url, payloads, concurrency, fmt))
        middle, middle_client = cpu_seconds(server_process), cpu_seconds(here, *workers)
        seconds, found = pipeline_seconds(path, url, concurrency, client, fmt)
        piped.append(seconds)
        server_cpu["direct"] += middle - before
        server_cpu["pipeline"] += cpu_seconds(server_process) - middle
        client_cpu["direct"] += cpu_seconds(here) - before_client
        client_cpu["pipeline"] += cpu_seconds(here, *workers) - middle_client
    direct_rate, piped_rate = tiles / min(direct), tiles / min(piped)
    ratio = piped_rate / direct_rate
    if mode == "split":
        figure = row(f"endpoint via pipeline ÷ load generator, C={concurrency}, server on its own core",
                     f"{ratio:.2f}×", "≥ 0.9", ratio >= 0.9)
    else:  # no goal: this measures how much CPU each client takes from a server on the same cores
        figure = row(f"endpoint via pipeline ÷ load generator, C={concurrency}, all sharing the cores",
                     f"{ratio:.2f}×", "—", None)
    per_tile = {k: f"{1e3 * v / (tiles * repeats):.2f}" for k, v in {**server_cpu, **{
        f"client-{k}": v for k, v in client_cpu.items()}}.items()}
    piped_runs, direct_runs = listed(piped), listed(direct)
    detail = (f"    C={concurrency}, {mode}: pipeline {piped_rate:.0f} tiles/s (runs {piped_runs} s), "
              f"load generator {direct_rate:.0f} tiles/s (runs {direct_runs} s); "
              f"CPU ms per tile, server {per_tile['pipeline']} vs {per_tile['direct']}, "
              f"client side {per_tile['client-pipeline']} vs {per_tile['client-direct']}; {found} features")
    return [figure, detail]


if __name__ == "__main__":
    main()
