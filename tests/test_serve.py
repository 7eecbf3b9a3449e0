"""The OSML-compatible model container: a real HTTP server on 127.0.0.1 (free port), a urllib client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from mr.detections import Detections
from mr.encoding import encode_tile
from mr.models.base import TileFailure
from mr.models.builtin import BuiltinDetector
from mr.serve import feature_collection, main, serve_in_thread
from mr.synthetic import make_scene


@pytest.fixture(scope="module")
def scene():
    image, _ = make_scene(512, 512, n_objects=10, seed=1)
    return image


@pytest.fixture(scope="module")
def endpoint():
    server, url = serve_in_thread(BuiltinDetector(), max_body_bytes=1 << 20)
    yield url
    server.shutdown()
    server.server_close()


def post(url: str, body: bytes, path: str = "/invocations") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url + path, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def reference_boxes(image: np.ndarray) -> np.ndarray:
    found = BuiltinDetector()(image[np.newaxis])[0]
    return found.boxes[np.lexsort(found.boxes.T[::-1])]


def reply_boxes(payload: bytes) -> np.ndarray:
    collection = json.loads(payload)
    assert collection["type"] == "FeatureCollection"
    boxes = np.array([f["properties"]["imageBBox"] for f in collection["features"]]).reshape(-1, 4)
    return boxes[np.lexsort(boxes.T[::-1])]


def test_ping(endpoint):
    with urllib.request.urlopen(endpoint + "/ping", timeout=10) as reply:
        assert reply.status == 200
        assert reply.read() == b"healthy"


def test_nitf_tile_gives_the_direct_detections(endpoint, scene):
    status, kind, payload = post(endpoint, encode_tile(scene, "NITF"))
    assert status == 200 and kind == "application/json"
    expected = reference_boxes(scene)
    assert len(expected) >= 5
    np.testing.assert_array_equal(reply_boxes(payload), expected)


def test_features_follow_the_osml_contract(endpoint, scene):
    features = json.loads(post(endpoint, encode_tile(scene, "NITF"))[2])["features"]
    assert features
    for feature in features:
        props = feature["properties"]
        x0, y0, x1, y1 = props["imageBBox"]
        assert feature["type"] == "Feature" and feature["geometry"] is None
        assert props["imageGeometry"]["type"] == "Polygon"
        ring = np.array(props["imageGeometry"]["coordinates"][0])
        assert ring[:, 0].min() == x0 and ring[:, 0].max() == x1
        assert ring[:, 1].min() == y0 and ring[:, 1].max() == y1
        (cls,) = props["featureClasses"]
        assert cls["iri"] in ("bright-object", "dark-object") and 0 < cls["score"] <= 1
        assert props["bounds_imcoords"] == props["imageBBox"]
        assert props["detection_score"] == cls["score"]


@pytest.mark.parametrize("fmt,compression", [("GTIFF", "LZW"), ("GTIFF", "NONE"), ("PNG", "NONE")])
def test_other_lossless_formats_work(endpoint, scene, fmt, compression):
    status, _, payload = post(endpoint, encode_tile(scene, fmt, compression))
    assert status == 200
    np.testing.assert_array_equal(reply_boxes(payload), reference_boxes(scene))


def test_garbage_body_is_a_json_400(endpoint):
    status, kind, payload = post(endpoint, b"this is not an image" * 10)
    assert status == 400 and kind == "application/json"
    error = json.loads(payload)
    assert error["field"] == "data" and "NITF" in error["error"]


def test_oversized_body_is_413(endpoint):
    status, kind, payload = post(endpoint, b"\0" * ((1 << 20) + 1))
    assert status == 413 and kind == "application/json"
    assert "limit" in json.loads(payload)["error"]


def test_oversized_body_is_refused_before_it_is_sent(endpoint):
    host, port = urllib.parse.urlsplit(endpoint).netloc.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Length", str(1 << 30))
    connection.putheader("Expect", "100-continue")
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413
    connection.close()


def test_unknown_route_is_404(endpoint):
    assert post(endpoint, b"x", path="/nope")[0] == 404


def test_model_failure_is_a_500(scene):
    class Broken:
        name = "broken"

        def __call__(self, tiles):
            raise RuntimeError("weights missing")

    class Failing:
        name = "failing"

        def __call__(self, tiles):
            return [TileFailure("endpoint kept timing out")]

    for model, text in ((Broken(), "weights missing"), (Failing(), "timing out")):
        server, url = serve_in_thread(model)
        try:
            status, kind, payload = post(url, encode_tile(scene[:, :64, :64], "PNG"))
        finally:
            server.shutdown()
            server.server_close()
        assert status == 500 and kind == "application/json"
        assert text in json.loads(payload)["error"]


def test_empty_reply_and_model_geometry():
    import shapely

    assert feature_collection(Detections.empty()) == {"type": "FeatureCollection", "features": []}
    table = Detections.from_labels(
        np.array([[1.0, 2.0, 5.0, 6.0]]), np.array([0.9]), ["ship"],
        geometry=np.array([shapely.Point(3, 4)], dtype=object), properties={"length_m": np.array([12.5])},
    )
    (feature,) = feature_collection(table)["features"]
    assert feature["properties"]["imageGeometry"] == {"type": "Point", "coordinates": [3.0, 4.0]}
    assert feature["properties"]["imageBBox"] == [1.0, 2.0, 5.0, 6.0]
    assert feature["properties"]["length_m"] == 12.5
    json.dumps(feature)


def test_cli_rejects_an_unregistered_model():
    from mr.errors import InvalidInputError

    with pytest.raises(InvalidInputError) as raised:
        main(["serve", "--model", "no-such-model", "--port", "0"])
    assert raised.value.field == "model"


def test_a_burst_of_connections_is_queued_not_dropped(endpoint):
    """Every call thread of every worker connects when a job starts; a backlog of 5 dropped the rest (1 s stalls)."""
    port, answers = urllib.parse.urlsplit(endpoint).port, []

    def ping() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(b"GET /ping HTTP/1.1\r\nHost: mr\r\nConnection: close\r\n\r\n")
            answers.append(b"".join(iter(lambda: connection.recv(4096), b"")))

    threads = [threading.Thread(target=ping) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server, _ = serve_in_thread(BuiltinDetector())
    try:
        assert server.request_queue_size >= 64
    finally:
        server.shutdown()
        server.server_close()
    assert len(answers) == 32 and all(answer.startswith(b"HTTP/1.1 200") for answer in answers)


def test_a_client_dropping_its_connection_is_not_a_traceback(endpoint, capfd):
    """A connection reset in the middle of a request line is logged quietly, and the server goes on serving."""
    import struct

    port = urllib.parse.urlsplit(endpoint).port
    for _ in range(3):
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(b"POST /invocations HT")  # no end of line: the server is left reading
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()  # linger 0: an RST, so the server's read fails with ConnectionResetError
    with urllib.request.urlopen(endpoint + "/ping", timeout=10) as reply:
        assert reply.status == 200
    assert "Traceback" not in capfd.readouterr().err
