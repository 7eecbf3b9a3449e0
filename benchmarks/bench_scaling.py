"""Scaling from 1 to 2 workers with a CPU-bound model, and what the scheduler costs, measured in one run.

The model is mr's built-in detector plus a fixed extra numpy workload per tile (``--fft-rounds`` forward and inverse
2-D FFTs of the float32 tile: pocketfft, single-threaded, no BLAS threads), so every region task is pure CPU work.
Over ``scene_file(SIZE)`` (default 10,000²) with 1024-pixel tiles and 50 of overlap, for each region size, on a
LocalCluster of 1 and one of 2 workers × 1 thread, in ``--repeats`` rounds (the figure is the median of the rounds'
ratios):

- speed 2 workers ÷ 1 worker (goal ≥ 1.8×) — wall time from submitting the graph to the gathered table;
- tasks: those in the graph, and those the workers ran (the task stream);
- scheduler time per megapixel, from ``distributed.get_task_stream(client)`` (the scheduler's task stream plugin):
  every task's "compute" interval on its worker.
  ``idle = workers × wall − Σ compute`` is the worker time spent on anything but running task code: graph
  submission, scheduler decisions and messages, (de)serialisation, data transfer between workers, the gather, and
  load imbalance at the tail (a worker with nothing left to run). Submission (``mr.run.submit_parts``) is timed apart,
  and the gaps between consecutive tasks on one worker (scheduler round trips while there is work) are summed apart
  from the tail wait.
- the machine's own ceiling, measured in every round before mr's runs: the graph's region tasks (the first region
  size) run without Dask in 2 bare processes ÷ 1, started with a worker's environment: what the machine gives mr's
  code with no scheduler at all. Each round's ratios pair runs a few seconds apart, and which worker count runs
  first alternates, so the machine's drift (its 2 vCPUs are shared with other guests) falls mostly outside them;
- mr's own scaling: ``2 × (Σ compute ÷ 2 × wall on 2 workers) ÷ (Σ compute ÷ wall on 1 worker)``, the speed-up if task
  code ran as fast with both cores busy as with one.

  python -m benchmarks.bench_scaling [--size 10000] [--region-sizes 4096 2048] [--fft-rounds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from benchmarks.common import listed, row, scene_file


@dataclass(frozen=True)
class HeavyDetector:
    """The built-in detector plus ``rounds`` forward/inverse FFTs of each tile: a CPU-bound stand-in for a model."""

    rounds: int = 3
    name: ClassVar[str] = "heavy-builtin"

    def __call__(self, tiles: np.ndarray):
        from mr.models.builtin import BuiltinDetector

        for tile in tiles:
            x = tile.astype(np.float32)
            for _ in range(self.rounds):
                x = np.fft.irfft2(np.fft.rfft2(x), s=x.shape[-2:]).astype(np.float32)
        return BuiltinDetector()(tiles)


def _run_region(task: dict) -> float:
    """Run one region task (a one-key graph: read, model, settle) in this process, without a scheduler: seconds."""
    import dask

    started = time.perf_counter()
    dask.get(task, next(iter(task)))
    return time.perf_counter() - started


def region_tasks(result) -> list[dict]:
    """The graph's region tasks, each as a one-key graph: the layer that depends on no other (seams come after)."""
    graph = result.built.graph
    return [{key: graph.layers[name][key]} for name in graph.layers if not graph.dependencies[name]
            for key in graph.layers[name]]


def bare_pool() -> ProcessPoolExecutor:
    """Two fresh processes (spawned, not forked) started with a local worker's environment (``worker_environ``:
    glibc's malloc settings, read as a process starts), so they run region code as fast as a worker does."""
    import multiprocessing
    import os

    from mr.cluster import worker_environ

    saved = dict(os.environ)
    os.environ.update(worker_environ())
    try:
        pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(time.sleep, [0.5, 0.5]))  # both processes start now, with this environment
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return pool


def machine_ceiling(pool: ProcessPoolExecutor, tasks: list[dict]) -> dict:
    """mr's own region tasks run without Dask: one at a time, then two at a time by two processes taking the next
    task as each finishes (as a scheduler hands them out): how far this machine scales mr's code by itself.

    Two busy cores of a virtual machine slow each other down (shared caches, memory bandwidth, the hypervisor and its
    other guests); the ratio is what a scheduler handing the tasks out in graph order, at no cost of its own, gets
    here in that minute. Both processes are warm (the last two tasks run once first), and the one-at-a-time run
    alternates between them.
    """
    list(pool.map(_run_region, tasks[-2:]))
    started = time.perf_counter()
    for task in tasks:
        pool.submit(_run_region, task).result()
    one = time.perf_counter() - started
    started = time.perf_counter()
    list(pool.map(_run_region, tasks))
    two = time.perf_counter() - started
    return {"one": one, "two": two}


def timed_run(path, client, model, region_size: int) -> dict:
    import mr
    from mr.features import FeatureTable
    from mr.run import gather_parts, submit_parts
    from mr.tasks import settled_table

    result = mr.detect(mr.open_image(path), model, tile_size=1024, overlap=50, region_size=region_size)
    graph_tasks = len(result.built.graph)
    workers = len(client.scheduler_info()["workers"])
    from distributed import get_task_stream

    with get_task_stream(client) as stream:
        started = time.perf_counter()
        futures = submit_parts(result, client)
        submitted = time.perf_counter()
        table = FeatureTable.concat([settled_table(part) for part in gather_parts(result, futures)])
        wall = time.perf_counter() - started
    compute, gaps = 0.0, 0.0
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for task in stream.data:
        for interval in task["startstops"]:
            if interval["action"] == "compute":
                compute += interval["stop"] - interval["start"]
                by_worker.setdefault(task["worker"], []).append((interval["start"], interval["stop"]))
    for spans in by_worker.values():
        spans.sort()
        gaps += sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
    return {
        "wall": wall,
        "submit": submitted - started,
        "graph_tasks": graph_tasks,
        "ran": len(stream.data),
        "regions": result.plan.grid.region_count,
        "compute": compute,
        "idle": workers * wall - compute,
        "gaps": gaps,
        "n": len(table),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--region-sizes", type=int, nargs="+", default=[4096, 2048])
    parser.add_argument("--fft-rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of ceiling, 1 and 2 workers; median ratio")
    args = parser.parse_args()

    import mr
    from benchmarks.bench_scaling import HeavyDetector  # importable by reference on the workers
    from mr.cluster import preload_task_modules

    path = scene_file(args.size)
    path.read_bytes()  # warm page cache
    model = HeavyDetector(args.fft_rounds)
    mpx = args.size**2 / 1e6
    rounds: list[dict] = []
    tasks = region_tasks(mr.detect(mr.open_image(path), model, tile_size=1024, overlap=50,
                                   region_size=args.region_sizes[0]))
    with bare_pool() as pool:
        for index in range(args.repeats):  # everything alternates: the machine's speed drifts from minute to minute
            measured: dict = {"ceiling": machine_ceiling(pool, tasks)}
            for workers in (1, 2) if index % 2 == 0 else (2, 1):  # alternate which goes first, against drift
                with mr.get_client(n_workers=workers, threads_per_worker=1) as client:
                    client.run(preload_task_modules)
                    for region_size in args.region_sizes:
                        measured[workers, region_size] = timed_run(path, client, model, region_size)
            rounds.append(measured)

    ceilings = [r["ceiling"]["one"] / r["ceiling"]["two"] for r in rounds]
    machine = statistics.median(ceilings)
    lines = [
        f"scene {args.size}² ({mpx:.0f} MP), tile 1024, overlap 50, model {model.name} (fft rounds {model.rounds}); "
        f"{args.repeats} rounds, each measuring the machine's ceiling, then 1 and 2 workers (in turn first)",
        f"machine ceiling: mr's region tasks (region {args.region_sizes[0]}) in 2 bare processes ÷ 1, no Dask = "
        f"{machine:.2f}× (median; rounds {listed(ceilings)}; one at a time "
        f"{listed([r['ceiling']['one'] for r in rounds])} s, two at a time "
        f"{listed([r['ceiling']['two'] for r in rounds])} s)",
    ]
    for region_size in args.region_sizes:
        speeds = [r[1, region_size]["wall"] / r[2, region_size]["wall"] for r in rounds]
        speed = statistics.median(speeds)
        middle = rounds[speeds.index(speed)] if speed in speeds else rounds[0]
        one, two = middle[1, region_size], middle[2, region_size]
        in_task = [r["compute"] / (w * r["wall"]) for w, r in ((1, one), (2, two))]
        lines.append(row(f"2 workers ÷ 1, region {region_size}", f"{speed:.2f}×", "≥ 1.8×", speed >= 1.8))
        lines.append(
            f"    median of the rounds' ratios {listed(speeds)}; {speed / machine:.2f} of the machine's ceiling "
            f"({machine:.2f}×); the median round in detail:"
        )
        lines.append(
            f"    share of worker time in task code: {in_task[0]:.3f} on 1 worker, {in_task[1]:.3f} on 2; "
            f"mr's own scaling (2 × that ratio) {2 * in_task[1] / in_task[0]:.2f}×, the rest is task code running "
            f"{two['compute'] / one['compute']:.2f}× as long with both cores busy"
        )
        lines.append(f"    {two['regions']} regions, {two['graph_tasks']} tasks in the graph, {two['ran']} run")
        for workers, r in ((1, one), (2, two)):
            lines.append(
                f"    {workers} worker{'s' if workers > 1 else ' '}: {r['wall']:.2f} s ({mpx / r['wall']:.1f} MP/s), "
                f"Σ task compute {r['compute']:.2f} s; not in task code {r['idle']:.2f} worker-s = "
                f"{1000 * r['idle'] / mpx:.1f} ms/MP (submit {1000 * r['submit']:.0f} ms, "
                f"gaps between tasks {1000 * r['gaps']:.0f} ms = {1000 * r['gaps'] / mpx:.2f} ms/MP); "
                f"{r['n']} detections"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
