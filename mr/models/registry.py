"""Turn what a user names into a model: ``None`` (the configured default), a registered name, a callable, a model."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from mr import config
from mr.errors import InvalidInputError
from mr.models.base import Model


def registered_models() -> dict[str, str | dict]:
    """Models an operator registered by name in configuration (``mr.model.registry``): name → ``module:attr`` of a
    factory, or → ``{onnx: PATH, ...}`` for an ONNX detector with its options."""
    return {"builtin": "mr.models.builtin:BuiltinDetector", **dict(config.get("model.registry") or {})}


def resolve_model(model: Any = None, *, nodata: float | None = None, **options: Any) -> Model:
    """The model to run. Strings are looked up among registered models only, never imported from input.

    ``nodata`` (the image's) is handed to a registered model whose factory takes it, so fill never becomes a
    detection.
    """
    if model is None:
        model = config.get("model.name")
    if isinstance(model, str):
        known = registered_models()
        if model not in known:
            raise InvalidInputError("model", model, f"not a registered model; registered: {sorted(known)}")
        entry = known[model]
        if isinstance(entry, dict):  # {"onnx": "/models/vehicles.onnx", ...OnnxDetector options}
            from mr.models.onnx import OnnxDetector

            settings = {str(k).replace("-", "_"): v for k, v in entry.items() if k != "onnx"}
            return OnnxDetector(entry["onnx"], name=model, **{**settings, **options})
        module_name, _, attr = entry.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        if nodata is not None and "nodata" in inspect.signature(factory).parameters:
            options.setdefault("nodata", nodata)
        return factory(**options)
    if isinstance(model, Model) and not options:
        return model
    if callable(model):
        from mr.models.callable import CallableModel

        return CallableModel(model, **options)
    raise InvalidInputError("model", model, "give a registered model name, a Model or a callable")
