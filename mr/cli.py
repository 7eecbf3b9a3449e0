"""Command line: ``python -m mr run | demo | submit | status | sweep | serve`` (listener: ``python -m mr.listen``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mr.errors import MrError


def _tiling_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tiling and de-duplication (defaults from config/mr.yaml)")
    group.add_argument("--tile-size", type=int, help="tile side in pixels")
    group.add_argument("--overlap", type=int, help="minimum overlap between tiles in pixels (0 is valid)")
    group.add_argument("--region-size", type=int, help="region side in pixels (one task per region)")
    group.add_argument(
        "--strategy", choices=["variable", "fixed"], help="variable: full tiles; fixed: edge tiles truncated"
    )
    group.add_argument("--batch-size", type=int, help="tiles per model call")
    group.add_argument("--model", help="registered model name (default: builtin)")
    group.add_argument("--nms", choices=["nms", "soft-nms", "none"], help="de-duplication method")
    group.add_argument("--nms-threshold", type=float, help="overlap above which boxes are duplicates")
    group.add_argument("--nms-metric", choices=["iou", "ios"], help="iou, or ios (intersection over the smaller box)")
    group.add_argument("--class-agnostic", action="store_true", help="compare boxes of different classes too")
    group.add_argument("--roi", help="region of interest: a WKT polygon in lon/lat")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    cluster.add_argument("--scheduler", help="address of a running Dask scheduler instead of a local cluster")
    parser.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    parser.add_argument("--quicklook", help="also write a PNG of the image with the features drawn on it")


def _dedup_options(args: argparse.Namespace) -> dict:
    options: dict = {}
    if args.nms:
        options["method"] = args.nms
    if args.nms_threshold is not None:
        options["threshold"] = args.nms_threshold
    if args.nms_metric:
        options["metric"] = args.nms_metric
    if args.class_agnostic:
        options["class_aware"] = False
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mr", description=__doc__)
    parser.add_argument("--config", help="a YAML file of mr settings, laid out as config/mr.yaml")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="detect objects in an image and write the features")
    run.add_argument("image", help="image path or URL (GeoTIFF, COG, NITF, JPEG2000; local or s3://)")
    run.add_argument("--out", required=True, help="output file: .geojson or .parquet")
    _tiling_options(run)
    demo = commands.add_parser("demo", help="make a scene with planted objects, process it, and score the result")
    demo.add_argument("--size", type=int, default=6000, help="scene side in pixels (default 6000)")
    demo.add_argument("--objects", type=int, default=300, help="objects to plant (default 300)")
    demo.add_argument("--dir", default="demo-output", help="folder for the scene and the features")
    _tiling_options(demo)
    submit = commands.add_parser("submit", help="validate an OversightML image request and put it on the queue")
    submit.add_argument("request", help="a JSON file with the request ('-' reads standard input)")
    submit.add_argument("--queue", help="sqlite:///PATH, an SQS queue URL or sqs://NAME (default: configured)")
    from mr.serve import add_arguments as serve_arguments

    serve = commands.add_parser("serve", help="serve a model as an OversightML model container (/invocations, /ping)")
    serve_arguments(serve)
    status = commands.add_parser("status", help="show a job's record")
    status.add_argument("job_id")
    status.add_argument("--store", help="sqlite:///PATH or dynamodb://TABLE-PREFIX (default: configured)")
    sweep = commands.add_parser("sweep", help="fail the jobs whose requests were lost (no progress for a while)")
    sweep.add_argument("--store", help="sqlite:///PATH or dynamodb://TABLE-PREFIX (default: configured)")
    sweep.add_argument("--notices", help="sns://TOPIC or an SNS topic ARN (default: configured, else the log)")
    sweep.add_argument("--stuck-after", type=float, help="seconds without progress (default: mr.service.stuck-after)")
    return parser


def command_submit(args: argparse.Namespace) -> int:
    from mr.queues import open_queue
    from mr.request import ImageRequest
    from mr.service import resolve_service

    body = sys.stdin.read() if args.request == "-" else Path(args.request).read_text(encoding="utf-8")
    request = ImageRequest.from_message(body)
    queue = open_queue(resolve_service(queue=args.queue).queue)
    message_id = queue.send(body)
    print(f"Queued job {request.job_id} ({len(request.image_urls)} image(s)) as message {message_id}.")
    return 0


def command_status(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from mr.service import resolve_service
    from mr.state import open_store

    record = open_store(resolve_service(store=args.store).store).get_job(args.job_id)
    if record is None:
        print(f"mr: error: no job {args.job_id!r}", file=sys.stderr)
        return 1
    fields = {k: getattr(v, "value", v) for k, v in dataclasses.asdict(record).items() if k != "request"}
    print(json.dumps(fields, indent=2, default=str))
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    """One sweep for stuck jobs; prints each job it failed as one JSON line (without its request text)."""
    import json

    from mr.service import resolve_service, resolve_sweep
    from mr.state import open_notifier, open_store
    from mr.sweeper import sweep_stuck_jobs

    settings = resolve_service(store=args.store, notices=args.notices)
    stuck_after = resolve_sweep(args.stuck_after)["stuck_after"]
    store = open_store(settings.store)
    try:
        failed = sweep_stuck_jobs(store, open_notifier(settings.notices), stuck_after)
    finally:
        store.close()
    for record in failed:
        print(json.dumps({k: v for k, v in record.to_dict().items() if k != "request"}, default=str))
    return 0


def _detect(image, args: argparse.Namespace):
    from mr.api import detect

    return detect(
        image,
        args.model,
        tile_size=args.tile_size,
        overlap=args.overlap,
        region_size=args.region_size,
        strategy=args.strategy,
        roi=args.roi,
        nms=_dedup_options(args) or None,
        batch_size=args.batch_size,
    )


def _run(image: str, out: str | Path, args: argparse.Namespace):
    from mr.cluster import get_client
    from mr.run import run_to_file

    result = _detect(image, args)
    with get_client(args.scheduler, args.workers) as client:
        if client.dashboard_link:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        return result, run_to_file(result, out, client, progress=not args.no_progress)


def command_run(args: argparse.Namespace) -> int:
    _, summary = _run(args.image, args.out, args)
    print(summary.paragraph())
    _quicklook(args.image, args.out, args.quicklook)
    return 0


def _quicklook(image: str, features_path: str | Path, png: str | None) -> None:
    """Draw the written features on a down-sampled view of the image (never read whole)."""
    if not png:
        return
    import geopandas as gpd

    from mr.quicklook import save_quicklook

    path = Path(features_path)
    features = gpd.read_parquet(path) if path.suffix.lower() in (".parquet", ".geoparquet") else _boxes_frame(path)
    print(f"Quick-look: {save_quicklook(image, features, png)}")


def _boxes_frame(geojson: Path):
    """The pixel boxes and labels of a written GeoJSON file, as the columns quick-looks draw from."""
    import json

    import pandas as pd

    with open(geojson) as stream:
        features = json.load(stream)["features"]
    rows = [
        dict(zip(("image_x0", "image_y0", "image_x1", "image_y1"), f["properties"]["imageBBox"]),
             label=f["properties"]["featureClasses"][0]["iri"], score=f["properties"]["featureClasses"][0]["score"])
        for f in features
    ]
    return pd.DataFrame(rows, columns=["image_x0", "image_y0", "image_x1", "image_y1", "label", "score"])


def command_demo(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from mr.synthetic import match_detections, planted_boxes, write_scene

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    scene = folder / "scene.tif"
    print(f"Writing a {args.size}×{args.size} scene with {args.objects} planted objects to {scene} …")
    planted = write_scene(scene, args.size, args.size, n_objects=args.objects, driver="COG", seed=7)
    out = folder / "features.geojson"
    _, summary = _run(str(scene), out, args)
    print(summary.paragraph())
    with open(out) as stream:
        features = json.load(stream)["features"]
    boxes = np.array([f["properties"]["imageBBox"] for f in features], dtype=float).reshape(-1, 4)
    match = match_detections(boxes, planted_boxes(planted))
    print(f"Against the {len(planted)} planted objects: recall {match.recall:.3f}, precision {match.precision:.3f}.")
    _quicklook(str(scene), out, args.quicklook)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from mr.logs import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    from mr import config

    config.load_file(args.config)
    try:
        from mr.serve import run_from_args

        commands = {
            "run": command_run, "demo": command_demo, "submit": command_submit, "status": command_status,
            "sweep": command_sweep, "serve": run_from_args,
        }
        return commands[args.command](args)
    except MrError as error:
        print(f"mr: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
