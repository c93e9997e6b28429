"""The knockout map: how much a generated token's probability drops when its attention to each cell is cut.

For each cell of the run's main view (`run.vision`), or each block of k × k cells when the grid has more
than MAX_KNOCKOUTS cells, the token's query is blocked from that cell's image tokens in every softmax
layer and head (on every view of tiled families: the cells overlapping it, as `causal.positions` finds
them), teacher-forced over the run (`causal.knockout`). The map's value on a cell is the drop of the
token's probability, max(0, p_before − p_after): 0 where blocking the cell leaves the token as likely or
makes it likelier (a map is mass, never negative, so that every score and view reads it as the others).
Every cell of a block carries the block's drop. One plain forward, then one knockout per cell or block,
`batch_size` per forward (`forward_outcomes`).
"""

from __future__ import annotations

import math

import numpy as np

from causal.edits import RowEdit
from causal.knockout import forward_outcomes, plan_knockout
from causal.positions import grid_cell_positions
from records import AttentionRun

MAX_KNOCKOUTS = 256  # per token: larger grids are knocked out in blocks of k × k cells


def block_side(grid_hw: tuple[int, int], cap: int = MAX_KNOCKOUTS) -> int:
    """The smallest k such that blocks of k × k cells (the last row and column of blocks cut by the grid's
    edge) number at most `cap`: 1 when the grid has at most `cap` cells."""
    grid_h, grid_w = grid_hw
    side = 1
    while math.ceil(grid_h / side) * math.ceil(grid_w / side) > cap:
        side += 1
    return side


def cell_blocks(grid_hw: tuple[int, int], side: int) -> list[list[tuple[int, int]]]:
    """The (row, col) cells of each block of `side` × `side` cells, blocks in row-major order."""
    grid_h, grid_w = grid_hw
    return [
        [(r, c) for r in range(top, min(top + side, grid_h)) for c in range(left, min(left + side, grid_w))]
        for top in range(0, grid_h, side)
        for left in range(0, grid_w, side)
    ]


def knockout_map(holder, run: AttentionRun, step_idx: int, batch_size: int = 8, cap: int = MAX_KNOCKOUTS) -> np.ndarray:
    """(grid_h, grid_w) float32, 0..1: the drop of token `step_idx`'s probability, max(0, p_before − p_after),
    when its attention to each cell (each block of cells, `block_side` for at most `cap` knockouts) is
    blocked. The caller holds the model lock."""
    grid_hw = tuple(run.vision.grid_hw)
    blocks = cell_blocks(grid_hw, block_side(grid_hw, cap))
    rows = [plan_knockout(holder, run, step_idx, key_positions=grid_cell_positions(run, cells))[0] for cells in blocks]
    (before,) = forward_outcomes(holder, run, step_idx, [RowEdit()])  # alone: exactly the plain forward
    after = forward_outcomes(holder, run, step_idx, rows, batch_size)
    drop = np.zeros(grid_hw, dtype=np.float32)  # (grid_h, grid_w)
    for cells, outcome in zip(blocks, after, strict=True):
        for row, col in cells:
            drop[row, col] = max(0.0, before.p_token - outcome.p_token)
    return drop


def knockout_maps(request) -> list[np.ndarray]:
    """The map registry's entry (`methods.MapRequest` in): `knockout_map` of every requested step."""
    steps = request.track(request.steps, "knockout maps")
    return [knockout_map(request.holder, request.run, int(t)) for t in steps]
