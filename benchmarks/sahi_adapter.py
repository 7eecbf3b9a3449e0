"""Helpers of bench_sahi: mr's built-in detector as a SAHI DetectionModel, and the planted truth of a cached scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import CACHE, scene_file


def planted_truth(size: int, *, seed: int = 3, objects_per_mpx: float = 2.0) -> np.ndarray:
    """(n, 4) boxes of the objects planted in ``scene_file(size, seed=seed)``, cached beside it as .npy.

    scene_file keeps only the image; write_scene's returned object list is rebuilt here from the same arguments by
    drawing the scene's random numbers (``_resolve``) without rendering a pixel — exactly what write_scene returns."""
    from mr.synthetic import _planted, _resolve, _scene_kwargs, planted_boxes

    path = CACHE / f"scene-{size}-{seed}.planted.npy"
    if not path.exists():
        scene_file(size, seed=seed, objects_per_mpx=objects_per_mpx)
        scene = dict(n_objects=int(size * size / 1e6 * objects_per_mpx), seed=seed)
        spec = _resolve(size, size, **_scene_kwargs(scene))
        np.save(path, planted_boxes(_planted(spec, None)))
    return np.load(path)


def read_array(path: Path) -> np.ndarray:
    """The whole image as an H×W×C array, read with rasterio (SAHI's own loader goes through PIL/OpenCV: slower,
    and it drops the georeference)."""
    import rasterio

    with rasterio.open(path) as src:
        if src.count == 1:
            return src.read(1)[..., None]
        return np.moveaxis(src.read(), 0, -1)


def sahi_model(detector=None, confidence_threshold: float = 0.3):
    """A SAHI DetectionModel wrapping ``detector`` (default: mr's BuiltinDetector); no torch needed."""
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction

    from mr.models.builtin import CLASS_NAMES, BuiltinDetector, warm_tile

    class MrDetectionModel(DetectionModel):
        def load_model(self) -> None:
            detector = BuiltinDetector()
            detector.detect(warm_tile())  # its imports and first calls, as mr's workers preload
            self.set_model(detector)

        def set_model(self, model, **kwargs) -> None:
            self.model = model
            self.category_mapping = {str(i): name for i, name in enumerate(CLASS_NAMES)}

        def set_device(self, device=None) -> None:  # CPU numpy model: no torch device to select
            self.device = "cpu"

        def perform_inference(self, image: np.ndarray) -> None:
            """``image``: H×W×C (or H×W) numpy slice; the detector takes a (1, bands, h, w) batch."""
            tile = image[None, None] if image.ndim == 2 else np.moveaxis(image, -1, 0)[None]
            self._original_predictions = self.model(tile)

        def _create_object_prediction_list_from_original_predictions(
            self, shift_amount_list=[[0, 0]], full_shape_list=None
        ) -> None:
            from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list

            shift_amount_list = fix_shift_amount_list(shift_amount_list)
            full_shape_list = fix_full_shape_list(full_shape_list)
            per_image = []
            for index, detections in enumerate(self._original_predictions):
                shift = shift_amount_list[index] if shift_amount_list else [0, 0]
                full_shape = full_shape_list[index] if full_shape_list else None
                predictions = []
                for box, score, class_id in zip(detections.boxes, detections.scores, detections.class_ids):
                    if score < self.confidence_threshold:
                        continue
                    predictions.append(
                        ObjectPrediction(
                            bbox=[float(v) for v in box],
                            category_id=int(class_id),
                            category_name=self.category_mapping[str(int(class_id))],
                            score=float(score),
                            shift_amount=shift,
                            full_shape=full_shape,
                        )
                    )
                per_image.append(predictions)
            self._object_prediction_list_per_image = per_image

    return MrDetectionModel(model=detector or BuiltinDetector(), confidence_threshold=confidence_threshold)


def prediction_boxes(object_predictions) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (n, 4) x0 y0 x1 y1 in full-image pixels, class ids (n,)) of SAHI's merged ObjectPredictions."""
    boxes = np.array([p.bbox.to_xyxy() for p in object_predictions], np.float64).reshape(-1, 4)
    labels = np.array([p.category.id for p in object_predictions], np.int64)
    return boxes, labels
