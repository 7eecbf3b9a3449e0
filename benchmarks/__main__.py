"""Every benchmark, one after the other, each in a fresh process: ``python -m benchmarks``.

Each prints its own figures (ratios measured side by side in its run); this prints them in turn and, at the end, one
line per figure with its goal and whether it was met. ``--only NAME ...`` runs some of them; ``--list`` names them.
Scenes are written once to ``~/.cache/mr-bench`` (several GB for the memory runs), and the whole set takes about
10 minutes on 2 cores. SAHI's comparison needs the bench extra: ``pip install -e ".[dev,bench]"``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = {
    "pipeline": "decode limit, peak memory 40,000² ÷ 10,000², graph build of 100,000²",
    "merge": "de-duplication of 1,000,000 detections on one core",
    "memory": "peak memory 50,000² ÷ 10,000²",
    "sahi": "mr against SAHI: speed, memory, the same objects",
    "scaling": "2 workers ÷ 1 with a CPU-bound model, tasks and scheduler time",
    "endpoint": "tiles/s through `mr serve`: the pipeline ÷ a plain HTTP load generator",
}
VERDICT = re.compile(r"^\S.*\s(met|NOT MET|reported)\s*$")
"""A figure's line: it starts at the margin and ends with its verdict (see ``benchmarks.common.row``)."""


def run(name: str) -> tuple[int, list[str]]:
    """Run ``bench_<name>`` in a fresh interpreter, echoing its output; its exit code and its figure lines."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", f"benchmarks.bench_{name}"]
    process = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    figures = []
    for line in process.stdout:
        print(line, end="", flush=True)
        figure = f"{name:9s} {line.strip()}"
        if (VERDICT.match(line.rstrip("\n")) or (name == "merge" and "best/goal" in line)) and figure not in figures:
            figures.append(figure)  # once: some benchmarks print their figures as they go and again at the end
    return process.wait(), figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run these benchmarks only")
    parser.add_argument("--list", action="store_true", help="name the benchmarks and what each measures")
    args = parser.parse_args()
    if args.list:
        for name, what in BENCHMARKS.items():
            print(f"{name:9s} {what}")
        return 0
    summary, failed = [], []
    for name in args.only or list(BENCHMARKS):
        print(f"\n=== bench_{name}: {BENCHMARKS[name]}", flush=True)
        started = time.perf_counter()
        code, figures = run(name)
        summary.extend(figures)
        if code:
            failed.append(name)
        print(f"=== bench_{name}: {time.perf_counter() - started:.0f} s, exit code {code}", flush=True)
    print("\nSummary:")
    print("\n".join(summary) if summary else "(no figures)")
    if failed:
        print(f"failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
