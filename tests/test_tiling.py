"""The tile and region grid alone: OversightML's figures, both strategies, ownership, and bad sizes."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mr.errors import InvalidInputError
from mr.tiling import TilingStrategy, axis_grid, tile_grid, variable_overlap

VARIABLE, FIXED = TilingStrategy.VARIABLE_OVERLAP, TilingStrategy.FIXED_OVERLAP


def test_oversightml_anchor_figure():
    grid = tile_grid(25_000, 12_000, 4096, 100, 10_000)
    assert grid.region_count == 8
    x0, y0, x1, y1 = grid.region_bounds(0, 0)
    assert (x1 - x0, y1 - y0) == (7580, 8048)
    assert grid.x.overlap == 612 and grid.y.overlap == 144


def test_variable_overlap_formula_matches_the_issue():
    # stride = 974, n = ceil(9950 / 974) = 11, overlap = 50 + ceil((50 + 11 * 974 - 10000) / 10) = 127
    assert variable_overlap(10_000, 1024, 50) == 127
    assert variable_overlap(1024, 1024, 50) == 50  # one tile: nothing to adjust


@settings(max_examples=300, deadline=None)
@given(
    length=st.integers(1, 60_000),
    tile=st.integers(16, 4096),
    overlap_fraction=st.floats(0, 0.9),
    region_tiles=st.integers(1, 12),
    strategy=st.sampled_from([VARIABLE, FIXED]),
)
def test_axis_invariants(length, tile, overlap_fraction, region_tiles, strategy):
    overlap = int(tile * overlap_fraction)
    region = tile + (region_tiles - 1) * (tile - overlap)
    axis = axis_grid(length, tile, overlap, region, strategy, "width")
    starts, ends = axis.tile_starts, axis.tile_ends
    assert starts[0] == 0 and np.all(ends <= length)
    if length <= tile:
        assert axis.count == 1 and ends[0] == length
    elif strategy is VARIABLE:
        assert np.all(ends - starts == tile), "variable overlap keeps every tile full"
        assert axis.overlap >= overlap
        assert axis.count == math.ceil((length - overlap) / (tile - overlap))
        assert 0 <= length - axis.covered <= max(axis.count - 2, 0)
    else:
        assert axis.overlap == overlap
        assert axis.covered == length, "fixed overlap reaches the far edge with a truncated tile"
        assert np.all(ends[:-1] - starts[:-1] == tile)
    # neighbouring tiles share exactly the overlap, and no tile lies inside its neighbour
    if axis.count > 1:
        assert np.all(ends[:-1] - starts[1:] == axis.overlap)
        assert np.all(ends[1:] > ends[:-1])
    # region chunks tile the covered span; every tile lies in its region's block (core + overlap)
    chunks = np.array(axis.region_chunks)
    assert chunks.sum() == axis.covered and np.all(chunks >= axis.overlap)
    bounds = np.concatenate([[0], np.cumsum(chunks)])
    for region_index in range(axis.region_count):
        block_end = min(bounds[region_index + 1] + axis.overlap, axis.covered)
        for t in axis.tiles_of_region(region_index):
            assert bounds[region_index] <= starts[t] < bounds[region_index + 1]
            assert ends[t] <= block_end
    assert sum(len(axis.tiles_of_region(r)) for r in range(axis.region_count)) == axis.count


@settings(max_examples=100, deadline=None)
@given(length=st.integers(100, 20_000), tile=st.integers(32, 2048), lap=st.floats(0, 0.5))
def test_tile_cores_partition_the_axis(length, tile, lap):
    overlap = int(tile * lap)
    axis = axis_grid(length, tile, overlap, tile * 4, VARIABLE, "width")
    points = np.linspace(0, axis.covered - 1e-6, 997)
    owner = np.searchsorted(axis.cuts, points, side="right")
    assert np.all(axis.tile_starts[owner] <= points) and np.all(points < axis.tile_ends[owner])


def test_overlap_zero_cuts_fall_on_tile_edges():
    grid = tile_grid(4096, 4096, 1024, 0, 2048)
    assert np.array_equal(grid.x.cuts, [1024, 2048, 3072])
    assert grid.x.region_chunks == (2048, 2048)


def test_window_offsets_move_tiles_and_ownership():
    grid = tile_grid(10_000, 10_000, 512, 32, 2048, window=(1000, 2000, 3000, 3500))
    bounds = grid.tile_bounds()
    assert bounds[0, 0, 0] == 1000 and bounds[0, 0, 1] == 2000
    assert bounds[-1, -1, 2] <= 3000 and bounds[-1, -1, 3] <= 3500
    iy, ix = grid.owner_tiles(np.array([[1000.5, 2000.5], [2999.0, 3499.0]]))
    assert (iy[0], ix[0]) == (0, 0) and (iy[1], ix[1]) == (grid.y.count - 1, grid.x.count - 1)


def test_fixed_strategy_truncates_edge_tiles():
    grid = tile_grid(10_000, 3000, 1024, 50, 8192, "fixed")
    assert grid.x.tile_ends[-1] == 10_000 and grid.x.tile_ends[-1] - grid.x.tile_starts[-1] < 1024
    assert grid.x.region_chunks == (7792, 2208)


def test_region_cuts_are_tile_cuts_between_regions():
    grid = tile_grid(25_000, 12_000, 4096, 100, 10_000)
    assert len(grid.x.region_cuts) == 3 and set(grid.x.region_cuts) <= set(grid.x.cuts)
    boxes = np.array([[grid.x.region_cuts[0] - 5, 10, grid.x.region_cuts[0] + 5, 20], [100, 100, 120, 120]])
    ry0, ry1, rx0, rx1 = grid.crossed_regions(boxes, margin=0)
    assert (rx0[0], rx1[0]) == (0, 1) and (rx0[1], rx1[1]) == (0, 0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tile_size=0, overlap=0, region_size=10), "tile_size"),
        (dict(tile_size=512, overlap=512, region_size=1024), "overlap"),
        (dict(tile_size=512, overlap=-1, region_size=1024), "overlap"),
        (dict(tile_size=512, overlap=10, region_size=256), "region_size"),
    ],
)
def test_bad_sizes_name_the_field(kwargs, field):
    with pytest.raises(InvalidInputError) as error:
        tile_grid(2000, 2000, **kwargs)
    assert error.value.field == field and isinstance(error.value, ValueError)


def test_strategy_names():
    assert TilingStrategy.parse("VariableOverlap") is VARIABLE
    assert TilingStrategy.parse("FIXED_OVERLAP") is FIXED
    with pytest.raises(InvalidInputError, match="tiling_strategy"):
        TilingStrategy.parse("diagonal")
