"""Hostile input: over 10,000 generated and mutated messages through the real listener, a few valid ones among them.

Hypothesis builds each message from a valid OversightML request with one breaking change (a missing field, a wrong
type, a huge or negative size, overlap >= tile, invalid WKT, an unknown enum, non-UTF-8 bytes, an oversized or
non-JSON body, another request's jobId) plus harmless noise (extra fields, dropped optional ones). All go on the
embedded SQLite queue as raw bytes; one in-process `Listener` drains it on a real LocalCluster. The listener must
never crash; every hostile message ends FAILED under its own job with a reason that starts with the field it broke;
every valid request succeeds.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mr.listen import REJECTED_TEXT_CHARS
from mr.request import MAX_BODY_BYTES, MAX_TILE_SIZE
from mr.synthetic import write_scene
from tests.messages import DROP
from tests.messages import put as put_field

MESSAGES = int(os.environ.get("MR_HOSTILE_MESSAGES", "10000"))
PER_EXAMPLE = 8  # messages drawn per hypothesis example: generation costs ~1 ms per example, not per message
VALID = 10
SEED = 4242
JOB = "@@JOB@@"  # placeholder: each message gets its own jobId when it is rendered
MARK = "@@MARK@@"  # placeholder for text JSON cannot carry as a value: NaN, nesting deeper than json.dumps goes
INTEGER_TEXT = re.compile(r"\s*[+-]?\d+\s*")
ENUMS = {
    "imageProcessor.type": ("SM_ENDPOINT", "HTTP_ENDPOINT", "LOCAL"),
    "imageProcessorTileFormat": ("NITF", "GTIFF", "PNG", "JPEG"),
    "imageProcessorTileCompression": ("NONE", "JPEG", "J2K", "LZW"),
    "outputs.0.type": ("S3", "Kinesis", "File"),
    "postProcessing.0.algorithm.algorithmType": ("NMS", "SOFT_NMS"),
    "postProcessing.0.step": ("FEATURE_DISTILLATION",),
}
BAD_WKT = (
    "POLYGON ((0 0, 1 1))", "POLYGON ((", "POINT (1 2)", "LINESTRING (0 0, 1 1)", "POLYGON EMPTY",
    "POLYGON ((200 0, 201 0, 201 1, 200 0))", "POLYGON ((0 95, 1 95, 1 96, 0 95))", "MULTIPOINT ((0 0), (1 1))",
    "POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0)) trailing", "GEOMETRYCOLLECTION (POINT (0 0))",
    "SRID=4326;POLYGON ((0 0, 1 0, 1 1, 0 0))", "POLYGON ((0 0, 1e400 0, 1 1, 0 0))",
    "MULTIPOLYGON (((0 0, -1e999 0, 1 1, 0 0)))", "POLYGON ((-181 0, 1 0, 1 1, -181 0))",
    "POLYGON ((nan 0, 1 0, 1 1, nan 0))", "\x00POLYGON ((0 0, 1 0, 1 1, 0 0))",
)
INVALID_UTF8 = (b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80")
NOT_STRING = (
    st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
    | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
NOT_INTEGER = (
    st.text(max_size=6).filter(lambda t: not INTEGER_TEXT.fullmatch(t)) | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer())
    | st.lists(st.integers(0, 512), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=1)
)
NOT_ARRAY = (
    st.text(max_size=6) | st.integers() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
NOT_OBJECT = st.text(max_size=6) | st.integers() | st.booleans() | st.lists(st.integers(), max_size=2)
NOISE_VALUES = (None, True, 0, -1, 10**20, 1.5, "", "x", "é中\U0001f600", [], {}, [1, "a", None], {"k": {"n": [None]}})
TYPES = {  # field path → what a wrong value for it looks like
    "jobId": NOT_STRING, "jobName": NOT_STRING, "imageProcessor.name": NOT_STRING, "outputs.0.path": NOT_STRING,
    "regionOfInterest": NOT_STRING, "imageReadRole": NOT_STRING,
    "imageProcessorTileSize": NOT_INTEGER, "imageProcessorTileOverlap": NOT_INTEGER, "imageUrls": NOT_ARRAY,
    "outputs": NOT_ARRAY, "featureProperties": NOT_ARRAY, "postProcessing": NOT_ARRAY, "imageUrls.0": NOT_STRING,
    "imageProcessor": NOT_OBJECT, "outputs.0": NOT_OBJECT, "featureProperties.0": NOT_OBJECT,
    "imageProcessorParameters": NOT_OBJECT, "postProcessing.0.algorithm": NOT_OBJECT,
    **{path: NOT_STRING for path in ENUMS},
}
REQUIRED = ("jobId", "imageUrls", "outputs", "imageProcessor", "imageProcessor.name", "outputs.0.path")
OPTIONAL = ("jobName", "featureProperties", "postProcessing", "imageProcessorTileFormat",
            "imageProcessorTileCompression", "imageProcessorTileSize", "imageProcessorTileOverlap")


@dataclass(frozen=True)
class Hostile:
    """One hostile message before rendering: the message, what happens to its bytes, and the fields it breaks."""

    message: dict
    """The mutated request."""
    bytes_op: tuple = ()
    """What happens to its JSON text: ("insert", bad bytes, position), ("truncate", fraction), ("encode", codec),
    ("mark", JSON text for MARK) or ("replace", the whole body)."""
    fields: frozenset = frozenset({"body"})
    """Top-level message fields the failure reason may start with."""


def template(image: Path, out: Path) -> dict:
    """A valid request for a file that does not exist: a message that slipped through validation fails visibly."""
    return {
        "jobName": "hostile", "jobId": JOB, "imageUrls": [str(image)], "outputs": [{"type": "File", "path": str(out)}],
        "imageProcessor": {"name": "builtin", "type": "LOCAL"}, "imageProcessorTileSize": 256,
        "imageProcessorTileOverlap": 32, "imageProcessorTileFormat": "GTIFF", "imageProcessorTileCompression": "NONE",
        "featureProperties": [{"mission": "hostile"}], "imageProcessorParameters": {"TargetVariant": "AllTraffic"},
        "postProcessing": [
            {"step": "FEATURE_DISTILLATION", "algorithm": {"algorithmType": "NMS", "iouThreshold": 0.5}}
        ],
    }


def put(message: dict, path: str, value: object) -> None:
    """Set (or, with value DROP, remove) ``a.0.b`` in a message."""
    put_field(message, path.split("."), value)


def top(path: str) -> frozenset:
    """The top-level field of a path: ``outputs.0.type`` → {"outputs"}."""
    return frozenset({path.split(".")[0]})


BODY = frozenset({"body"})


Break = tuple[frozenset, tuple]
"""What a breaking change returns: the top-level fields the reason may name, and the change to make to the bytes."""


def missing(draw, message: dict) -> Break:
    path = draw(st.sampled_from(REQUIRED))
    put(message, path, DROP)
    return top(path), ()


def wrong_type(draw, message: dict) -> Break:
    path = draw(st.sampled_from(sorted(TYPES)))
    put(message, path, draw(TYPES[path]))
    return top(path), ()


def huge(draw, message: dict) -> Break:
    path = draw(st.sampled_from(["imageProcessorTileSize", "imageProcessorTileOverlap"]))
    put(message, path, draw(st.integers(MAX_TILE_SIZE + 1) | st.sampled_from([2**31, 2**63, 10**30, 10**400, 1e308])))
    return top(path), ()


def negative(draw, message: dict) -> Break:
    path = draw(st.sampled_from(["imageProcessorTileSize", "imageProcessorTileOverlap"]))
    put(message, path, draw(st.integers(max_value=0 if path.endswith("Size") else -1)))
    return top(path), ()


def overlap_not_below_tile(draw, message: dict) -> Break:
    put(message, "imageProcessorTileOverlap", draw(st.integers(message["imageProcessorTileSize"], MAX_TILE_SIZE)))
    return top("imageProcessorTileOverlap"), ()


def bad_wkt(draw, message: dict) -> Break:
    text = st.text(min_size=1, max_size=30).filter(lambda t: t.strip())
    put(message, "regionOfInterest", draw(st.sampled_from(BAD_WKT) | text))
    return top("regionOfInterest"), ()


def unknown_enum(draw, message: dict) -> Break:
    path = draw(st.sampled_from(sorted(ENUMS)))
    spelled = st.sampled_from([v.lower() for v in ENUMS[path]] + [v.title() for v in ENUMS[path]] + ["BMP", "WBF"])
    put(message, path, draw((spelled | st.text(min_size=1, max_size=12)).filter(lambda v: v not in ENUMS[path])))
    return top(path), ()


def not_utf8(draw, message: dict) -> Break:
    return BODY, draw(
        st.tuples(st.just("insert"), st.sampled_from(INVALID_UTF8), st.floats(0, 1))
        | st.tuples(st.just("encode"), st.sampled_from(["latin-1", "utf-16", "utf-32", "cp1252"]))
    )


def oversize(draw, message: dict) -> Break:
    padding = draw(st.integers(1, 4096))
    put(message, draw(st.sampled_from(["jobName", "x-padding"])), "x" * (MAX_BODY_BYTES + padding))
    return BODY, ()


def not_json(draw, message: dict) -> Break:
    return BODY, ("truncate", draw(st.floats(0, 0.999)))


def not_an_object(draw, message: dict) -> Break:
    return BODY, ("replace", draw(st.sampled_from(["", "[]", "null", "1", '"text"', "true", "[{}]", "{", "}",
                                                    "{'jobId': 1}"])))


def non_finite(draw, message: dict) -> Break:
    put(message, draw(st.sampled_from(["x-number", "imageProcessorTileSize", "jobName"])), MARK)
    return BODY, ("mark", draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])))


def too_deep(draw, message: dict) -> Break:
    depth = draw(st.integers(33, 3000))
    put(message, "featureProperties.0", MARK)
    return frozenset({"featureProperties", "body"}), ("mark", '{"a": ' * depth + "{}" + "}" * depth)


def bad_job_id(draw, message: dict) -> Break:
    lone = st.sampled_from(["\ud800", "x\udfff", "\udbff\udc00\ud800"])
    put(message, "jobId", draw(lone | st.sampled_from(["", " ", "a/b", "a b", "..", "x" * 257, "tab\tid"])))
    return top("jobId"), ()


def bad_url(draw, message: dict) -> Break:
    value = draw(st.sampled_from(["ftp://host/x.tif", "s3://", "s3://bucket", "file://host/x.tif", "http://", ""]))
    put(message, "imageUrls", [value] if draw(st.booleans()) else [])
    return top("imageUrls"), ()


def bad_output(draw, message: dict) -> Break:
    put(message, "outputs", draw(st.sampled_from([
        [], [{"type": "S3"}], [{"type": "S3", "bucket": "UPPER"}], [{"type": "Kinesis"}],
        [{"type": "File", "path": "out.txt"}], [{"type": "Kinesis", "stream": "s", "batchSize": -1}],
    ])))
    return top("outputs"), ()


def bad_threshold(draw, message: dict) -> Break:
    value = draw(st.sampled_from([1e300, -1e300, 10**400, -5, 7, "0.5", None, [0.5]]))
    put(message, "postProcessing.0.algorithm.iouThreshold", value)
    return top("postProcessing"), ()


BREAKS = (  # (breaking change, weight): oversized bodies are rare, each is 256 KiB in the queue
    (wrong_type, 12), (missing, 4), (huge, 4), (negative, 4), (overlap_not_below_tile, 3), (bad_wkt, 5),
    (unknown_enum, 6), (not_utf8, 5), (oversize, 1), (not_json, 2), (not_an_object, 1), (non_finite, 2),
    (too_deep, 2), (bad_job_id, 3), (bad_url, 2), (bad_output, 2), (bad_threshold, 2),
)
KINDS = tuple(change for change, weight in BREAKS for _ in range(weight))


@st.composite
def hostile(draw, base: dict) -> Hostile:
    """One message with exactly one breaking change and some harmless noise."""
    message = copy.deepcopy(base)
    fields, bytes_op = draw(st.sampled_from(KINDS))(draw, message)
    noise(draw, message, base, fields)
    return Hostile(message, bytes_op=bytes_op, fields=fields)


def noise(draw, message: dict, base: dict, broken: frozenset) -> None:
    """Changes a valid message takes without becoming invalid: unknown extra fields, optional fields left out (never
    one the breaking change touched, nor the tile size when the overlap is what breaks). One drawn seed picks them:
    drawing each choice would double the generation time."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    for _ in range(rng.randrange(3)):
        message[f"x-{rng.randrange(10**6)}"] = rng.choice(NOISE_VALUES)
    for name in rng.sample(OPTIONAL, rng.randrange(3)):
        if name in message and message[name] == base[name] and "imageProcessorTileOverlap" not in broken:
            del message[name]


def render(item: Hostile, job_id: str) -> bytes:
    """The message's bytes, with its own jobId."""
    message = dict(item.message, **{"x-seq": job_id})
    text = json.dumps(message).replace(json.dumps(JOB), json.dumps(job_id))
    op = item.bytes_op
    if not op:
        return text.encode()
    if op[0] == "insert":
        body = text.encode()
        at = int(op[2] * len(body))
        return body[:at] + op[1] + body[at:]
    if op[0] == "encode":
        return text.replace("hostile", "hôstile€").encode(op[1], errors="replace")
    if op[0] == "truncate":
        return text.encode()[: int(op[1] * len(text))]
    if op[0] == "replace":
        return op[1].encode()
    return text.replace(json.dumps(MARK), op[1]).encode()


def generate(base: dict, count: int) -> list[Hostile]:
    """``count`` hostile messages, drawn by hypothesis (generation only: nothing to shrink)."""
    found: list[Hostile] = []

    @settings(
        max_examples=-(-count // PER_EXAMPLE), database=None, deadline=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck), derandomize=True,
    )
    @given(st.lists(hostile(base), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def draw(items: list[Hostile]) -> None:
        found.extend(items)

    draw()
    return found[:count]


def collisions(request: dict, other_image: Path) -> list[tuple[bytes, frozenset]]:
    """Two messages that reuse a valid request's jobId: one invalid, one valid but for another image."""
    broken = dict(request, imageProcessorTileSize=-1)
    other = dict(request, imageUrls=[str(other_image)], jobName="same jobId, another image")
    return [
        (json.dumps(broken).encode(), frozenset({"imageProcessorTileSize"})),
        (json.dumps(other).encode(), frozenset({"jobId"})),
    ]


def reason_field(reason: str) -> str:
    """The top-level message field a failure reason starts with (``outputs[0].type=…`` → ``outputs``)."""
    match = re.match(r"[A-Za-z_-]+", reason or "")
    return match.group() if match else ""


def read_job_id(body: bytes) -> str | None:
    """The jobId a body carries, when it is JSON text with a storable string there."""
    try:
        value = json.loads(body).get("jobId")
    except Exception:  # noqa: BLE001 - whatever cannot be read has no job id
        return None
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")  # a lone surrogate names no job
    except UnicodeEncodeError:
        return None
    return value


def valid_request(i: int, image: Path, folder: Path) -> dict:
    """A request that must succeed, whatever arrives around it."""
    return {
        "jobId": f"valid-{i:02d}", "imageUrls": [str(image)],
        "outputs": [{"type": "File", "path": str(folder / f"valid-{i:02d}.geojson")}],
        "imageProcessor": {"name": "builtin", "type": "LOCAL"},
        "imageProcessorTileSize": 256, "imageProcessorTileOverlap": 32,
    }


@dataclass(frozen=True)
class Sent:
    """A hostile message as queued."""

    message_id: str
    body: bytes
    fields: frozenset
    """Top-level fields its failure reason may start with."""
    job_id: str = ""
    """The jobId it was rendered with, when it has one of its own."""


def queue_all(queue, items: list[Hostile], valid: list[dict], images: list[Path], rng: random.Random) -> list[Sent]:
    """Every hostile message in order, the valid requests at random places among them, and 50 messages after each
    valid request two that reuse its jobId (by then its job is recorded)."""
    sent = []
    slots = sorted(rng.sample(range(len(items) - 50), len(valid)))
    clashes: dict[int, list] = {}
    for k, slot in enumerate(slots):
        clashes.setdefault(slot + 50, []).extend(collisions(valid[k], images[k - 1]))
    for n, item in enumerate(items):
        body = render(item, f"hostile-{n:05d}")
        sent.append(Sent(queue.send(body), body, item.fields, f"hostile-{n:05d}"))
        if n in slots:
            queue.send(json.dumps(valid[slots.index(n)]))
        for clash, fields in clashes.get(n, ()):
            sent.append(Sent(queue.send(clash), clash, fields))
    return sent


def own_record(store, message: Sent):
    """The one job record that holds this message, under its jobId or as ``invalid-<message id>``; else None."""
    text = message.body.decode("utf-8", errors="replace")[:REJECTED_TEXT_CHARS]
    ids = {f"invalid-{message.message_id}", read_job_id(message.body) or "", message.job_id} - {""}
    mine = [r for r in map(store.get_job, ids) if r is not None and r.request[:REJECTED_TEXT_CHARS] == text]
    return mine[0] if len(mine) == 1 else None


def test_hostile_messages_fail_alone_with_their_field_and_valid_ones_succeed(tmp_path, queue_dir, client):
    """10,000+ hostile messages and 10 valid requests through one listener: no crash, every hostile message FAILED
    under its own job with a reason naming the field it broke, every valid request SUCCESS, the queue empty."""
    from mr.listen import Listener
    from mr.queues import open_queue
    from mr.service import ServiceSettings
    from mr.state import SqliteStore

    started = time.monotonic()
    images = [tmp_path / f"valid-{i}.tif" for i in range(VALID)]
    for i, image in enumerate(images):
        write_scene(image, 400, 400, n_objects=6, seed=SEED + i)
    valid = [valid_request(i, image, tmp_path) for i, image in enumerate(images)]
    items = generate(template(tmp_path / "missing.tif", tmp_path / "never.geojson"), MESSAGES)
    generated = time.monotonic() - started
    database = f"sqlite:///{queue_dir / 'mr.db'}"
    queue = open_queue(database)
    sent = queue_all(queue, items, valid, images, random.Random(SEED))
    queue.close()
    queued = time.monotonic() - started

    settings_ = ServiceSettings(
        queue=database, store=database, notices=None, work_dir=str(tmp_path / "work"), max_in_flight=4,
        visibility_timeout=60, poll_seconds=0,
    )
    handled = Listener(settings_, client).run(once=True)  # a crash raises here
    ran = time.monotonic() - started
    assert handled == len(sent) + VALID

    with sqlite3.connect(queue_dir / "mr.db") as db:
        assert db.execute("SELECT count(*) FROM queue_messages").fetchone()[0] == 0, "every message was consumed"
        assert db.execute("SELECT count(*) FROM queue_dead_letters").fetchone()[0] == 0
    store = SqliteStore(queue_dir / "mr.db")
    for request in valid:
        record = store.get_job(request["jobId"])
        assert record.status.value == "SUCCESS", (request["jobId"], record.status, record.message)
        features = json.loads(Path(request["outputs"][0]["path"]).read_text())["features"]
        assert record.feature_count == len(features) >= 5
    wrong, named, fallback = [], Counter(), 0
    for message in sent:
        record = own_record(store, message)
        if record is None or record.status.value != "FAILED" or reason_field(record.message) not in message.fields:
            wrong.append((message.body[:150], sorted(message.fields), record and (record.job_id, record.message)))
            continue
        named[reason_field(record.message)] += 1
        fallback += record.job_id == f"invalid-{message.message_id}"
    assert not wrong, f"{len(wrong)} of {len(sent)} hostile messages without their own FAILED record: {wrong[:5]}"
    assert not (tmp_path / "never.geojson").exists()
    print(f"\nhostile: {len(sent)} hostile + {VALID} valid messages; generated in {generated:.1f} s, queued by "
          f"{queued:.1f} s, listener done by {ran:.1f} s; {fallback} recorded as invalid-<message id>; reasons "
          f"name {dict(named.most_common())}")
