"""ONNX models: a detector (boxes, scores, classes per tile) and a per-pixel model for `mr.segment`.

Both run an ``onnxruntime.InferenceSession`` that is opened lazily, once per process (cached by path and
providers), so the model objects stay small: they pickle to their constructor arguments. Preprocessing is the
same for both: tiles become float32, are multiplied by ``scale`` (1/255 for uint8 tiles unless given), normalised
as ``(x - mean) / std`` (per band where sequences are given), resized bilinearly to ``input_size`` if one is set,
and transposed to channels-last if the model wants that.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mr.detections import Detections
from mr.errors import InvalidInputError, ModelError

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
ACTIVATIONS = (None, "sigmoid", "softmax")
_ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                "tensor(uint8)": np.uint8}
_SESSIONS: dict[tuple[str, tuple[str, ...]], Any] = {}
_SESSIONS_LOCK = threading.Lock()


def _open_session(path: str, providers: tuple[str, ...]) -> Any:
    """A new onnxruntime session (the expensive step, done once per process by `session_for`)."""
    import onnxruntime

    return onnxruntime.InferenceSession(path, providers=list(providers))


def session_for(path: str, providers: tuple[str, ...], name: str) -> Any:
    """The process's one session for this model file and providers; opened on first use."""
    key = (os.path.abspath(path), tuple(providers))
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            try:
                _SESSIONS[key] = _open_session(key[0], key[1])
            except ImportError as e:
                raise ModelError(f"model {name!r} needs onnxruntime: pip install onnxruntime") from e
            except Exception as e:
                raise ModelError(f"model {name!r}: cannot load ONNX model {path!r}: {type(e).__name__}: {e}") from e
        return _SESSIONS[key]


def clear_sessions() -> None:
    """Forget every cached session (e.g. after the model file changed)."""
    with _SESSIONS_LOCK:
        _SESSIONS.clear()


def resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes, pixel centres aligned (``align_corners=False``)."""
    if x.shape[-2:] == (height, width):
        return x
    y0, y1, fy = _axis_weights(x.shape[-2], height)
    x0, x1, fx = _axis_weights(x.shape[-1], width)
    rows = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
    return (rows[..., x0] * (1 - fx) + rows[..., x1] * fx).astype(x.dtype, copy=False)


def _axis_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    position = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
    low = np.floor(position).astype(np.int64)
    return low, np.minimum(low + 1, size_in - 1), (position - low).astype(np.float32)


def _is_dynamic(dim: Any) -> bool:
    """A symbolic or unknown dimension (onnxruntime gives a string or None)."""
    return not isinstance(dim, int) or dim <= 0


class _OnnxModel:
    """What both ONNX models share: options, the lazy session, preprocessing and batched runs."""

    def __init__(self, path: str | os.PathLike, *, input_size: Sequence[int] | None = None,
                 input_name: str | None = None, mean: float | Sequence[float] = 0.0,
                 std: float | Sequence[float] = 1.0, scale: float | None = None, channels: str = "first",
                 providers: Sequence[str] = ("CPUExecutionProvider",), name: str | None = None) -> None:
        self._arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.path = os.fspath(path)
        self.input_size = _resolve_size(input_size)
        self.input_name = input_name
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.asarray(std, np.float32).reshape(-1)
        if not np.isfinite(self.std).all() or (self.std == 0).any():
            raise InvalidInputError("std", std, "must be finite and non-zero (a number or one per band)")
        self.scale = scale
        if channels not in ("first", "last"):
            raise InvalidInputError("channels", channels, "must be 'first' (n, bands, h, w) or 'last' (n, h, w, bands)")
        self.channels = channels
        if isinstance(providers, str) or not providers:
            raise InvalidInputError("providers", providers, "give a sequence, e.g. ('CPUExecutionProvider',)")
        self.providers = tuple(providers)
        self.name = name or os.path.splitext(os.path.basename(self.path))[0]

    def __reduce__(self) -> tuple:
        return (_rebuild, (type(self), self._arguments))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, name={self.name!r})"

    @property
    def session(self) -> Any:
        return session_for(self.path, self.providers, self.name)

    def _input(self) -> Any:
        inputs = self.session.get_inputs()
        if self.input_name is None:
            return inputs[0]
        for item in inputs:
            if item.name == self.input_name:
                return item
        raise ModelError(f"model {self.name!r} has no input {self.input_name!r}; inputs: {[i.name for i in inputs]}")

    def _preprocess(self, tiles: np.ndarray) -> np.ndarray:
        """(n, bands, h, w) tiles → the model's input array."""
        if not isinstance(tiles, np.ndarray) or tiles.ndim != 4:
            shape = getattr(tiles, "shape", type(tiles).__name__)
            raise ModelError(f"model {self.name!r}: tiles must be an array (n, bands, h, w); got {shape}")
        bands = tiles.shape[1]
        scale = self.scale if self.scale is not None else (1 / 255 if tiles.dtype == np.uint8 else 1.0)
        x = tiles.astype(np.float32) * np.float32(scale)
        for option, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, bands):
                raise ModelError(f"model {self.name!r}: {option} has {len(values)} values for {bands} bands")
        x = (x - self.mean.reshape(1, -1, 1, 1)) / self.std.reshape(1, -1, 1, 1)
        if self.input_size is not None:
            x = resize(x, *self.input_size)
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if self.channels == "last" else x)

    def _run(self, tiles: np.ndarray, output_names: list[str]) -> list[np.ndarray]:
        """The model's outputs for a batch: one run if the batch is dynamic, else fixed-size chunks (last padded)."""
        x = self._preprocess(tiles)
        model_input = self._input()
        x = x.astype(_ONNX_DTYPES.get(model_input.type, np.float32), copy=False)
        shape = list(model_input.shape)
        if len(shape) != 4 or any(not _is_dynamic(d) and d != s for d, s in zip(shape[1:], x.shape[1:])):
            raise ModelError(f"model {self.name!r} expects input {shape}, got {list(x.shape)}; set input_size=(h, w) "
                             f"or channels='first'/'last' to match the model")
        n = len(x)
        chunk = n if _is_dynamic(shape[0]) else shape[0]
        parts = []
        for start in range(0, n, max(chunk, 1)):
            block = x[start : start + chunk]
            if len(block) < chunk:
                block = np.concatenate([block, np.zeros((chunk - len(block), *x.shape[1:]), x.dtype)])
            try:
                parts.append([np.asarray(o) for o in self.session.run(output_names, {model_input.name: block})])
            except Exception as e:
                raise ModelError(f"model {self.name!r} failed on a batch of shape {block.shape}: {e}") from e
        return [np.concatenate([p[i] for p in parts])[:n] for i in range(len(output_names))]

    def _output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]


def _rebuild(cls: type, arguments: dict) -> _OnnxModel:
    """Unpickle by calling the constructor."""
    arguments = dict(arguments)
    return cls(arguments.pop("path"), **arguments)


def _resolve_size(input_size: Any) -> tuple[int, int] | None:
    if input_size is None:
        return None
    size = (input_size, input_size) if isinstance(input_size, (int, np.integer)) else tuple(input_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size):
        raise InvalidInputError("input_size", input_size, "must be None, a positive int or (height, width)")
    return int(size[0]), int(size[1])


class OnnxDetector(_OnnxModel):
    """An ONNX object detector: one `Detections` per tile, boxes in tile pixels (scaled back from input_size).

    ``outputs`` names the model's ``boxes`` (n, k, 4), ``scores`` (n, k) and ``classes`` (n, k) outputs (default:
    the model's first three; ``classes`` may be left out: every row is class 0), or one ``detections`` output
    (n, k, 6) of [x0, y0, x1, y1, score, class] (the default for a single-output model). ``box_format`` says how
    boxes are written; ``normalized_boxes`` that they are fractions of the model's input width and height.
    """

    def __init__(self, path: str | os.PathLike, *, outputs: Mapping[str, str] | None = None,
                 box_format: str = "xyxy", normalized_boxes: bool = False, class_names: Sequence[str] = (),
                 score_threshold: float = 0.25, **options: Any) -> None:
        super().__init__(path, **options)
        self._arguments.update(outputs=outputs, box_format=box_format, normalized_boxes=normalized_boxes,
                               class_names=class_names, score_threshold=score_threshold)
        if outputs is not None and not (set(outputs) == {"detections"} or {"boxes", "scores"} <= set(outputs)
                                        <= {"boxes", "scores", "classes"}):
            raise InvalidInputError("outputs", outputs, "give {'boxes', 'scores'[, 'classes']} or {'detections'} names")
        self.outputs = dict(outputs) if outputs is not None else None
        if box_format not in BOX_FORMATS:
            raise InvalidInputError("box_format", box_format, f"must be one of {BOX_FORMATS}")
        self.box_format = box_format
        self.normalized_boxes = bool(normalized_boxes)
        if isinstance(class_names, str):
            raise InvalidInputError("class_names", class_names, "must be a sequence of names, e.g. ('car', 'ship')")
        self.class_names = tuple(str(c) for c in class_names)
        if not 0 <= score_threshold <= 1:
            raise InvalidInputError("score_threshold", score_threshold, "must lie in [0, 1]")
        self.score_threshold = float(score_threshold)

    def _resolved_outputs(self) -> dict[str, str]:
        if self.outputs is not None:
            return self.outputs
        names = self._output_names()
        if len(names) == 1:
            return {"detections": names[0]}
        if len(names) >= 3:
            return dict(zip(("boxes", "scores", "classes"), names))
        raise ModelError(f"model {self.name!r} has outputs {names}; "
                         "name them with outputs={'boxes': …, 'scores': …[, 'classes': …]}")

    def __call__(self, tiles: np.ndarray) -> list[Detections]:
        """One table per tile of a (n, bands, h, w) batch."""
        outputs = self._resolved_outputs()
        keys = list(outputs)
        arrays = dict(zip(keys, self._run(tiles, [outputs[k] for k in keys])))
        n, _, h, w = tiles.shape
        if "detections" in arrays:
            rows = self._check(arrays["detections"], (n, None, 6), "detections")
            boxes, scores, classes = rows[..., :4], rows[..., 4], rows[..., 5]
        else:
            boxes = self._check(arrays["boxes"], (n, None, 4), "boxes")
            k = boxes.shape[1]
            scores = self._check(arrays["scores"], (n, k), "scores")
            classes = self._check(arrays["classes"], (n, k), "classes") if "classes" in arrays else np.zeros((n, k))
        in_h, in_w = self.input_size or (h, w)
        boxes = to_xyxy(boxes.astype(np.float64), self.box_format)
        fx, fy = (w, h) if self.normalized_boxes else (w / in_w, h / in_h)
        boxes = boxes * np.array([fx, fy, fx, fy])
        return [self._table(boxes[i], scores[i], classes[i], h, w) for i in range(n)]

    def _check(self, array: np.ndarray, shape: tuple, what: str) -> np.ndarray:
        if array.ndim != len(shape) or any(s is not None and a != s for a, s in zip(array.shape, shape)):
            want = "(" + ", ".join("k" if s is None else str(s) for s in shape) + ")"
            raise ModelError(f"model {self.name!r}: output {what!r} has shape {array.shape}; expected {want}")
        return array

    def _table(self, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, h: int, w: int) -> Detections:
        """One tile's rows above the threshold, boxes clipped to the tile."""
        keep = scores.astype(np.float32) >= self.score_threshold
        boxes, scores, ids = boxes[keep], scores[keep].astype(np.float32), np.rint(classes[keep]).astype(np.int64)
        if not np.isfinite(boxes).all() or not np.isfinite(scores).all() or (scores > 1).any():
            raise ModelError(f"model {self.name!r} returned non-finite boxes or scores outside [0, 1]")
        boxes = np.clip(boxes, 0, [w, h, w, h])
        if self.class_names:
            if len(ids) and (ids.min() < 0 or ids.max() >= len(self.class_names)):
                raise ModelError(f"model {self.name!r}: class ids {ids.min()}..{ids.max()} do not index "
                                 f"class_names {self.class_names}")
            return Detections(boxes, scores, ids, self.class_names)
        return Detections.from_labels(boxes, scores, [str(i) for i in ids])


def to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    """(..., 4) boxes in ``box_format`` → (x0, y0, x1, y1)."""
    a, b, c, d = np.moveaxis(boxes, -1, 0)
    if box_format == "xywh":
        return np.stack([a, b, a + c, b + d], axis=-1)
    if box_format == "cxcywh":
        return np.stack([a - c / 2, b - d / 2, a + c / 2, b + d / 2], axis=-1)
    return boxes


class OnnxPixelModel(_OnnxModel):
    """An ONNX per-pixel model for `mr.segment`: (n, bands, h, w) → (n, bands_out, h, w) float32.

    ``output`` names the output to use (default: the first); it is (n, c, H, W) (or (n, H, W, c) with
    ``channels='last'``) or (n, H, W). ``activation`` applies a sigmoid, or a softmax over the classes. With
    ``input_size`` the result is resized back to the tile. Pass ``bands_out=c`` to `mr.segment`.
    """

    def __init__(self, path: str | os.PathLike, *, output: str | None = None, activation: str | None = None,
                 **options: Any) -> None:
        super().__init__(path, **options)
        self._arguments.update(output=output, activation=activation)
        if activation not in ACTIVATIONS:
            raise InvalidInputError("activation", activation, f"must be one of {ACTIVATIONS}")
        self.output = output
        self.activation = activation

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n, _, h, w = tiles.shape
        (scores,) = self._run(tiles, [self.output or self._output_names()[0]])
        if scores.ndim == 3:
            scores = scores[:, np.newaxis]
        elif scores.ndim == 4 and self.channels == "last":
            scores = scores.transpose(0, 3, 1, 2)
        if scores.ndim != 4 or scores.shape[0] != n:
            raise ModelError(f"model {self.name!r} returned shape {scores.shape}; expected (n, c, h, w) or (n, h, w)")
        scores = scores.astype(np.float32)
        if self.activation == "sigmoid":
            scores = 1 / (1 + np.exp(-scores))
        elif self.activation == "softmax":
            scores = np.exp(scores - scores.max(axis=1, keepdims=True))
            scores /= scores.sum(axis=1, keepdims=True)
        return np.ascontiguousarray(resize(scores, h, w))
