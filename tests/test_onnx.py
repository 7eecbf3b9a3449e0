"""ONNX models built in the test with onnx.helper: preprocessing, box decoding, batching, pickling, segment."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import xarray as xr

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper

from mr.errors import InvalidInputError, ModelError
from mr.models import onnx as onnx_models
from mr.models.onnx import OnnxDetector, OnnxPixelModel, resize
from mr.raster import segment
from mr.tiling import tile_grid

BOXES = np.array([[1.0, 2.0, 5.0, 6.0], [2.0, 2.0, 4.0, 4.0]], np.float32)
"""The detector graph's boxes, each multiplied by the batch item's maximum pixel (after preprocessing)."""


def _const(name: str, array) -> onnx.NodeProto:
    array = np.asarray(array)
    dtype = TensorProto.INT64 if array.dtype.kind == "i" else TensorProto.FLOAT
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, array.shape, array.ravel()))


def _save(tmp_path, name, nodes, inputs, outputs) -> str:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = str(tmp_path / f"{name}.onnx")
    onnx.save(model, path)
    return path


def detector_file(tmp_path, name="toy", batch="N", size=("H", "W"), boxes=BOXES, single=False) -> str:
    """score_i = max pixel of item i (and half that), boxes = BOXES · score_i, classes = (0, 1)."""
    nodes = [
        _const("axes", [1, 2, 3]), _const("half", [0.5]), _const("zero", [0.0]), _const("two", [2]),
        _const("box_table", boxes[np.newaxis]), _const("class_row", [[0.0, 1.0]]),
        helper.make_node("ReduceMax", ["image", "axes"], ["peak4"], keepdims=1),
        helper.make_node("Flatten", ["peak4"], ["peak"], axis=1),
        helper.make_node("Mul", ["peak", "half"], ["half_peak"]),
        helper.make_node("Concat", ["peak", "half_peak"], ["scores"], axis=1),
        helper.make_node("Unsqueeze", ["peak", "two"], ["peak3"]),
        helper.make_node("Mul", ["box_table", "peak3"], ["boxes"]),
        helper.make_node("Mul", ["peak", "zero"], ["nothing"]),
        helper.make_node("Add", ["class_row", "nothing"], ["classes"]),
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, *size])
    outs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, 2, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 2]),
            helper.make_tensor_value_info("classes", TensorProto.FLOAT, [batch, 2])]
    if single:
        nodes += [_const("minus1", [-1]),
                  helper.make_node("Unsqueeze", ["scores", "minus1"], ["scores3"]),
                  helper.make_node("Unsqueeze", ["classes", "minus1"], ["classes3"]),
                  helper.make_node("Concat", ["boxes", "scores3", "classes3"], ["detections"], axis=2)]
        outs = [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [batch, 2, 6])]
    return _save(tmp_path, name, nodes, [image], outs)


def pixel_file(tmp_path, bands=3, channels_last=False) -> str:
    """sigmoid(2·x), per pixel and band."""
    dims = ["N", "H", "W", bands] if channels_last else ["N", bands, "H", "W"]
    nodes = [_const("two", [2.0]), helper.make_node("Mul", ["image", "two"], ["doubled"]),
             helper.make_node("Sigmoid", ["doubled"], ["probability"])]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)
    out = helper.make_tensor_value_info("probability", TensorProto.FLOAT, dims)
    return _save(tmp_path, "pixels", nodes, [image], [out])


def tiles_with_peaks(peaks, h=16, w=16, dtype=np.float32) -> np.ndarray:
    tiles = np.zeros((len(peaks), 3, h, w), dtype)
    for i, peak in enumerate(peaks):
        tiles[i, 1, 3, 4] = peak
    return tiles


@pytest.fixture(autouse=True)
def fresh_sessions():
    onnx_models.clear_sessions()
    yield
    onnx_models.clear_sessions()


def test_detector_decodes_boxes_scores_and_classes_and_drops_low_scores(tmp_path):
    model = OnnxDetector(detector_file(tmp_path), class_names=("car", "ship"), score_threshold=0.25)
    first, second, third = model(tiles_with_peaks([0.9, 0.4, 0.2]))
    assert model.name == "toy"
    np.testing.assert_allclose(first.boxes, BOXES * 0.9, rtol=1e-6)
    np.testing.assert_allclose(first.scores, [0.9, 0.45], rtol=1e-6)
    assert list(first.labels) == ["car", "ship"] and first.class_names == ("car", "ship")
    np.testing.assert_allclose(second.boxes, BOXES[:1] * 0.4, rtol=1e-6)
    assert list(second.labels) == ["car"] and len(third) == 0


def test_uint8_tiles_are_scaled_then_normalised_per_band(tmp_path):
    path = detector_file(tmp_path)
    (table,) = OnnxDetector(path, score_threshold=0)(tiles_with_peaks([255], dtype=np.uint8))
    assert table.scores[0] == pytest.approx(1.0) and list(table.labels) == ["0", "1"]
    model = OnnxDetector(path, scale=1 / 200, mean=(0.0, 0.5, 0.0), std=(1.0, 2.0, 1.0), score_threshold=0)
    (table,) = model(tiles_with_peaks([150], dtype=np.uint8))
    assert table.scores[0] == pytest.approx((150 / 200 - 0.5) / 2)  # band 1's peak; other bands (0 - 0) / 1


@pytest.mark.parametrize("box_format,expected", [
    ("xyxy", BOXES), ("xywh", [[1, 2, 6, 8], [2, 2, 6, 6]]), ("cxcywh", [[0, 0, 3.5, 5], [0, 0, 4, 4]]),
])
def test_box_formats(tmp_path, box_format, expected):
    (table,) = OnnxDetector(detector_file(tmp_path), box_format=box_format)(tiles_with_peaks([1.0]))
    np.testing.assert_allclose(table.boxes, expected)  # cxcywh's first box is clipped at the tile's corner


def test_normalized_boxes_scale_to_the_tile(tmp_path):
    fractions = np.array([[0.25, 0.5, 0.5, 1.0], [0.0, 0.0, 0.1, 0.1]], np.float32)
    model = OnnxDetector(detector_file(tmp_path, boxes=fractions), normalized_boxes=True, input_size=(8, 8))
    (table,) = model(np.ones((1, 3, 20, 40), np.float32))
    np.testing.assert_allclose(table.boxes, [[10, 10, 20, 20], [0, 0, 4, 2]], rtol=1e-6)


def test_input_size_resizes_tiles_and_scales_boxes_back(tmp_path):
    tiles = np.full((2, 3, 32, 48), 0.8, np.float32)
    tiles[1] = 0.5
    model = OnnxDetector(detector_file(tmp_path, size=(16, 16)), input_size=(16, 16))
    first, second = model(tiles)
    np.testing.assert_allclose(first.boxes, BOXES * 0.8 * [3, 2, 3, 2], rtol=1e-6)
    np.testing.assert_allclose(second.scores, [0.5, 0.25], rtol=1e-6)
    with pytest.raises(ModelError, match="'toy' expects input .* set input_size"):
        OnnxDetector(model.path)(tiles)


def test_resize_is_bilinear_with_aligned_pixel_centres():
    ramp = np.arange(8, dtype=np.float32)[np.newaxis, :].repeat(2, axis=0)
    np.testing.assert_allclose(resize(ramp, 2, 4), [[0.5, 2.5, 4.5, 6.5]] * 2)
    np.testing.assert_allclose(resize(resize(ramp, 2, 4), 2, 8)[0, 1:-1], ramp[0, 1:-1], atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_fixed_batch_models_run_in_chunks_and_agree_with_a_dynamic_batch(tmp_path, batch):
    tiles = tiles_with_peaks([0.9, 0.4, 0.7])
    fixed = OnnxDetector(detector_file(tmp_path, name="fixed", batch=batch))(tiles)
    dynamic = OnnxDetector(detector_file(tmp_path))(tiles)
    for a, b in zip(fixed, dynamic):
        np.testing.assert_allclose(a.boxes, b.boxes)
        np.testing.assert_allclose(a.scores, b.scores)


def test_single_detections_output(tmp_path):
    path = detector_file(tmp_path, name="rows", single=True)
    for model in (OnnxDetector(path, class_names=("car", "ship")),
                  OnnxDetector(path, outputs={"detections": "detections"}, class_names=("car", "ship"))):
        (table,) = model(tiles_with_peaks([0.6]))
        np.testing.assert_allclose(table.boxes, BOXES * 0.6, rtol=1e-6)
        assert list(table.labels) == ["car", "ship"]


def test_pickles_to_its_arguments_and_loads_one_session_per_process(tmp_path, monkeypatch):
    opened = []
    real_open = onnx_models._open_session
    monkeypatch.setattr(onnx_models, "_open_session", lambda *a: opened.append(a) or real_open(*a))
    model = OnnxDetector(detector_file(tmp_path), input_size=16, mean=(0, 0, 0), class_names=("a", "b"))
    copy = pickle.loads(pickle.dumps(model))
    assert opened == [] and len(pickle.dumps(model)) < 1000
    assert (copy.input_size, copy.class_names, copy.path) == ((16, 16), ("a", "b"), model.path)
    tiles = tiles_with_peaks([0.9])
    np.testing.assert_allclose(copy(tiles)[0].boxes, model(tiles)[0].boxes)
    assert len(opened) == 1 and copy.session is model.session


def test_errors_name_the_model(tmp_path):
    path = detector_file(tmp_path)
    with pytest.raises(ModelError, match="'toy'.*'boxes' has shape \\(1, 2\\); expected \\(1, k, 4\\)"):
        OnnxDetector(path, outputs={"boxes": "scores", "scores": "classes"})(tiles_with_peaks([1]))
    with pytest.raises(ModelError, match="'toy'.*class ids 0..1 do not index"):
        OnnxDetector(path, class_names=("car",))(tiles_with_peaks([1]))
    with pytest.raises(ModelError, match="'ghost': cannot load ONNX model"):
        OnnxDetector(tmp_path / "missing.onnx", name="ghost")(tiles_with_peaks([1]))
    with pytest.raises(ModelError, match="'toy': mean has 2 values for 3 bands"):
        OnnxDetector(path, mean=(1, 2))(tiles_with_peaks([1]))
    with pytest.raises(InvalidInputError, match="box_format"):
        OnnxDetector(path, box_format="yxyx")
    with pytest.raises(InvalidInputError, match="std"):
        OnnxDetector(path, std=(1, 0, 1))


@pytest.mark.parametrize("tile,overlap,region", [(32, 4, 60), (24, 6, 24)])
def test_pixel_model_through_segment_equals_the_whole_image(tmp_path, tile, overlap, region):
    image = np.random.default_rng(3).normal(size=(3, 50, 70)).astype(np.float32)
    model = OnnxPixelModel(pixel_file(tmp_path))
    out = segment(xr.DataArray(image, dims=("band", "y", "x")), model, tile_size=tile, overlap=overlap,
                  region_size=region, bands_out=3, batch_size=4).compute(scheduler="sync")
    grid = tile_grid(70, 50, tile, overlap, region)
    expected = (1 / (1 + np.exp(-2 * image))).astype(np.float32)
    expected[:, grid.y.covered :], expected[:, :, grid.x.covered :] = np.nan, np.nan
    assert out.dtype == np.float32 and out.shape == (3, 50, 70)
    np.testing.assert_allclose(out.values, expected, rtol=1e-6, atol=1e-7)


def test_pixel_model_softmax_and_input_size(tmp_path):
    tiles = np.full((2, 3, 8, 12), 1.0, np.float32)
    tiles[:, 2] = 3.0
    model = pickle.loads(pickle.dumps(OnnxPixelModel(pixel_file(tmp_path), activation="softmax", input_size=4)))
    out = model(tiles)
    logits = 1 / (1 + np.exp(-2 * np.array([1.0, 1.0, 3.0])))
    assert out.shape == (2, 3, 8, 12) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 5, 7], np.exp(logits) / np.exp(logits).sum(), rtol=1e-6)
    with pytest.raises(InvalidInputError, match="activation"):
        OnnxPixelModel(model.path, activation="relu")


def test_detector_through_mr_detect_gives_boxes_in_image_pixels(tmp_path):
    import warnings

    import mr

    image = np.zeros((3, 64, 64), np.float32)
    image[0, 40, 50] = 0.9  # in the tile starting at (32, 32)
    model = OnnxDetector(detector_file(tmp_path), class_names=("car", "ship"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no georeference: pixel geometry only
        result = mr.detect(xr.DataArray(image, dims=("band", "y", "x")), model, tile_size=32, overlap=0,
                           region_size=64, nms="none")
        frame = result.compute(scheduler="sync")
    boxes = frame[["image_x0", "image_y0", "image_x1", "image_y1"]].to_numpy()
    np.testing.assert_allclose(boxes, BOXES * 0.9 + 32, rtol=1e-6)


def test_channels_last_pixel_model(tmp_path):
    tiles = np.random.default_rng(1).normal(size=(2, 3, 5, 7)).astype(np.float32)
    tiles[:, 1] += 1  # bands differ, so a wrong transpose would show
    model = OnnxPixelModel(pixel_file(tmp_path, channels_last=True), channels="last")
    np.testing.assert_allclose(model(tiles), 1 / (1 + np.exp(-2 * tiles)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelError, match="'pixels' expects input"):
        OnnxPixelModel(model.path)(tiles)


def test_an_onnx_file_registered_by_name(tmp_path):
    import dask

    from mr.models.onnx import OnnxDetector
    from mr.models.registry import resolve_model

    path = detector_file(tmp_path)
    with dask.config.set({"mr.model.registry": {"boxes": {"onnx": str(path), "score-threshold": 0.1}}}):
        model = resolve_model("boxes")
    assert isinstance(model, OnnxDetector) and model.name == "boxes" and model.score_threshold == 0.1
