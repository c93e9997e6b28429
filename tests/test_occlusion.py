"""The cell-knockout map: each cell's value is the knockout of that cell, on every view, computed alone."""

import numpy as np
import pytest

from causal.positions import grid_cell_positions
from methods import METHODS, MapRequest, compute_maps
from methods.occlusion import MAX_KNOCKOUTS, block_side, cell_blocks, knockout_map


def test_large_grids_are_knocked_out_in_blocks_of_at_most_the_cap():
    assert block_side((16, 16)) == 1 and block_side((17, 16)) == 2  # 256 cells: one knockout each
    assert block_side((27, 37)) == 3 and len(cell_blocks((27, 37), 3)) == 9 * 13  # Qwen2.5-VL at 1024×768
    for grid in ((1, 1), (5, 7), (17, 16), (27, 37), (64, 64)):
        side = block_side(grid)
        blocks = cell_blocks(grid, side)
        assert len(blocks) <= MAX_KNOCKOUTS and (side == 1 or len(cell_blocks(grid, side - 1)) > MAX_KNOCKOUTS)
        cells = sorted(cell for block in blocks for cell in block)  # each cell in exactly one block
        assert cells == [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    assert cell_blocks((3, 3), 2) == [[(0, 0), (0, 1), (1, 0), (1, 1)], [(0, 2), (1, 2)], [(2, 0), (2, 1)], [(2, 2)]]


def _alone(holder, run, step: int, cells) -> float:
    """The drop of the token's probability when these main-view cells are knocked out by themselves."""
    found = holder.knockout(run, step, key_positions=grid_cell_positions(run, cells).tolist())
    return max(0.0, found.p_before - found.p_after)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])  # one view; tiles and a global view
def test_the_map_is_each_cells_own_knockout(load_holder, dummy_image, family):
    holder = load_holder(family)
    run = holder.generate(dummy_image, "What is this?", max_new_tokens=2)
    step = 1
    grid_h, grid_w = run.vision.grid_hw
    everything = (0, holder.num_layers - 1), (0, holder.num_heads - 1)
    (heat,) = compute_maps("cell_knockout", MapRequest(holder, run, [step], *everything))
    assert heat.shape == (grid_h, grid_w) and heat.dtype == np.float32 and (heat >= 0).all()
    expected = np.array([[_alone(holder, run, step, [(r, c)]) for c in range(grid_w)] for r in range(grid_h)])
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    assert heat.max() > 0  # some cell matters to the token
    entry = METHODS["cell_knockout"]
    assert entry.needs_model and not entry.uses_ranges and "256" in entry.caption


def test_a_capped_grid_gives_each_block_its_own_knockout(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    run = holder.generate(dummy_image, "What is this?", max_new_tokens=1)
    grid = tuple(run.vision.grid_hw)
    side = block_side(grid, cap=4)
    heat = knockout_map(holder, run, 0, cap=4)
    blocks = cell_blocks(grid, side)
    assert side > 1 and len(blocks) <= 4
    for cells in blocks:
        values = {float(heat[r, c]) for r, c in cells}
        assert len(values) == 1, cells  # every cell of a block carries the block's drop
        assert values.pop() == pytest.approx(_alone(holder, run, 0, cells), abs=1e-5)
