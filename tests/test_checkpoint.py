"""Region checkpoints: a run that finds its regions checkpointed reads them and gives identical features."""

from __future__ import annotations

import numpy as np
import pytest
import shapely

import mr
from mr.checkpoint import DirectoryCheckpoint, result_from_table, result_to_table
from mr.detections import Detections
from mr.regions import RegionResult
from mr.synthetic import write_scene


def test_round_trip_keeps_every_column():
    settled = Detections.from_labels(
        np.array([[1, 2, 3, 4], [5, 6, 7, 8.5]]), [0.9, 0.4], ["car", "ship"], tile_ids=[3, 4],
        geometry=[shapely.Point(2, 3), None], properties={"n": np.array([1, 2])},
    )
    pending = Detections.from_labels(np.array([[10, 10, 12, 12.0]]), [0.7], ["car"], tile_ids=[9])
    back = result_from_table(result_to_table(RegionResult(settled, pending, 12, 0.25)))
    assert back.tiles == 12 and back.model_seconds == 0.25
    np.testing.assert_array_equal(back.settled.boxes, settled.boxes)
    np.testing.assert_array_equal(back.settled.labels, settled.labels)
    np.testing.assert_array_equal(back.settled.tile_ids, settled.tile_ids)
    assert back.settled.geometry[0].equals(shapely.Point(2, 3)) and back.settled.geometry[1] is None
    assert list(back.settled.properties["n"]) == [1, 2]
    assert len(back.pending) == 1 and back.pending.labels[0] == "car"


def test_empty_result_round_trips():
    back = result_from_table(result_to_table(RegionResult(Detections.empty(), Detections.empty(), 0, 0.0)))
    assert len(back.settled) == 0 and len(back.pending) == 0


class CountingModel:
    """The built-in detector, counting the tiles it sees (in this process: use with scheduler='sync')."""

    name = "counting"

    def __init__(self):
        from mr.models.builtin import BuiltinDetector

        self.inner = BuiltinDetector()
        self.tiles = 0

    def __call__(self, tiles):
        self.tiles += len(tiles)
        return self.inner(tiles)


def test_a_rerun_reads_its_checkpoints_and_gives_identical_features(tmp_path):
    scene = tmp_path / "scene.tif"
    write_scene(scene, 1500, 1300, n_objects=60, seed=3)
    store = DirectoryCheckpoint(str(tmp_path / "work"), "job-7", "image-1")
    options = dict(tile_size=300, overlap=40, region_size=700)
    first_model = CountingModel()
    first = mr.detect(mr.open_image(scene), first_model, checkpoint=store, **options).compute(scheduler="sync")
    regions = mr.detect(mr.open_image(scene), first_model, **options).plan.grid.region_count
    assert len(store.done()) == regions and first_model.tiles > 0
    # lose one region's checkpoint: only that region runs again
    store.path(0, 0).unlink()
    second_model = CountingModel()
    second = mr.detect(mr.open_image(scene), second_model, checkpoint=store, **options).compute(scheduler="sync")
    assert 0 < second_model.tiles < first_model.tiles
    key = ["image_x0", "image_y0", "image_x1", "image_y1", "score"]
    np.testing.assert_allclose(
        first[key].sort_values(key).to_numpy(), second[key].sort_values(key).to_numpy(), rtol=1e-6
    )


@pytest.mark.parametrize("job_id", ["../../etc", "a/b", "ok-1", "..", ".", ""])
def test_ids_cannot_escape_the_root(tmp_path, job_id):
    store = DirectoryCheckpoint(str(tmp_path), job_id, "..")
    path = store.path(0, 0).resolve()
    assert tmp_path.resolve() in path.parents and len(path.relative_to(tmp_path.resolve()).parts) == 3
