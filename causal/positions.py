"""Which sequence positions a causal check blocks: every image token, the cells of the views, the image
tokens under a box or under picked main-view cells (on every view, as the geometry of each view's
`VisionLayout` says), and the queries that lose them. The one place these sets are defined."""

from __future__ import annotations

import numbers
from typing import Literal

import numpy as np

from errors import InputError
from records import AttentionRun

QueryKind = Literal["token", "question", "after_image"]
QUERY_KINDS: tuple[str, ...] = ("token", "question", "after_image")


def image_positions(holder, run: AttentionRun) -> np.ndarray:
    """(n,) int64, sorted: every position of an image's tokens, the cells of every view and the
    placeholder slots that are no cell (LLaVA-NeXT's row ends)."""
    slots = np.flatnonzero(np.asarray(run.prompt_ids) == holder.model.config.image_token_id)  # as the adapters read it
    return np.union1d(cell_positions(run), slots).astype(np.int64)


def cell_positions(run: AttentionRun, image_idx: int | None = None) -> np.ndarray:
    """(n,) int64, sorted: the positions of the cells of every view (of image `image_idx`, or of all), not
    the placeholder slots between them: what a random control draws from."""
    layouts = [layout for layout in run.visions if image_idx is None or layout.image_index == image_idx]
    return np.unique(np.concatenate([layout.token_positions for layout in layouts])).astype(np.int64)


def checked_cells(run: AttentionRun, cells, image_idx: int = 0) -> list[tuple[int, int]]:
    """The distinct main-view cells (row, col) of image `image_idx`, each two whole numbers inside its grid,
    or InputError naming the first that is not (a negative index never wraps around)."""
    grid_h, grid_w = run.visions[run.view_index(image_idx)].grid_hw
    found = []
    for cell in cells or ():
        whole = isinstance(cell, (list, tuple)) and len(cell) == 2
        whole = whole and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in cell)
        if not whole or not (0 <= cell[0] < grid_h and 0 <= cell[1] < grid_w):
            raise InputError(f"Cell {str(cell)[:40]} is not a (row, col) inside the {grid_h}×{grid_w} token grid.")
        found.append((int(cell[0]), int(cell[1])))
    if not found:
        raise InputError("No cell given: pick at least one token cell.")
    return sorted(set(found))


def grid_cell_positions(run: AttentionRun, cells, image_idx: int = 0) -> np.ndarray:
    """(n,) int64, sorted: main-view cells (row, col) of image `image_idx` and, on every other view, the
    cells that overlap them (a region clicked or a map's top cells, blocked on every view as a box is)."""
    layout = run.visions[run.view_index(image_idx)]
    found = [
        box_positions(run, layout.cell_box_xyxy(row, col), image_idx)
        for row, col in checked_cells(run, cells, image_idx)
    ]
    return np.unique(np.concatenate(found)).astype(np.int64)


def top_cell_positions(run: AttentionRun, heat: np.ndarray, k: int, image_idx: int = 0) -> np.ndarray:
    """(n,) int64, sorted: the positions, on every view, of a main-view map's k highest cells (ties: the
    first cells). heat: (grid_h, grid_w) on image `image_idx`'s main view."""
    top = np.argsort(-heat.ravel(), kind="stable")[:k]  # (k,) strongest first
    return grid_cell_positions(run, [divmod(int(j), heat.shape[1]) for j in top], image_idx)


def _dilate(cells: np.ndarray, buffer: int) -> np.ndarray:
    """(grid_h, grid_w) bool grown by `buffer` cells in every direction (a square neighbourhood)."""
    grown = cells.copy()
    for _ in range(buffer):
        padded = np.pad(grown, 1)
        grown = np.zeros_like(grown)
        for dr in (0, 1, 2):
            for dc in (0, 1, 2):
                grown |= padded[dr : dr + cells.shape[0], dc : dc + cells.shape[1]]
    return grown


def box_positions(run: AttentionRun, box_xyxy, image_idx: int = 0, buffer: int = 0) -> np.ndarray:
    """(n,) int64, sorted: the positions of image `image_idx`'s tokens whose cells overlap a box
    (x0, y0, x1, y1) in original-image pixels, on every view of the image (tiles and global view alike),
    each view's cells grown by `buffer` cells. Raises InputError naming the grid when none overlaps."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    except (TypeError, ValueError):
        raise InputError(f"A box is four numbers x0, y0, x1, y1 in image pixels, got {box_xyxy!r}.") from None
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"A box is four finite numbers in image pixels, got {box_xyxy!r}.")
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"The box {box_xyxy} is empty: x1 must exceed x0 and y1 exceed y0.")
    layouts = [layout for layout in run.visions if layout.image_index == image_idx]
    if not layouts:
        raise InputError(f"This run has no image {image_idx}; it has {len(run.images) or 1}.")
    found = []
    for layout in layouts:
        cells = _dilate(layout.cells_overlapping((x0, y0, x1, y1)), buffer).ravel()  # (n_cells,)
        frames = layout.token_positions.reshape(layout.num_frames, -1)  # (t, n_cells)
        found.append(frames[:, cells].ravel())
    positions = np.unique(np.concatenate(found)).astype(np.int64)
    if not len(positions):
        box = layouts[0].image_box_xyxy
        raise InputError(
            f"The box {tuple(round(v) for v in (x0, y0, x1, y1))} covers no image token: the token grid "
            f"covers x {box[0]:.0f}–{box[2]:.0f}, y {box[1]:.0f}–{box[3]:.0f} of the image. Draw it there."
        )
    return positions


def query_positions(run: AttentionRun, step_idx: int, queries: QueryKind, image: np.ndarray) -> np.ndarray:
    """(n,) int64: 'token' is the query that produced token `step_idx`; 'question' the prompt's positions
    after the image (that query excepted); 'after_image' every position after the image up to that query."""
    if queries not in QUERY_KINDS:
        raise InputError(f"queries must be one of {', '.join(QUERY_KINDS)}, got {queries!r}.")
    query_pos = len(run.prompt_ids) - 1 + step_idx
    after = int(image.max()) + 1
    if queries == "token":
        return np.array([query_pos], dtype=np.int64)
    if queries == "question":
        return np.array([p for p in range(after, len(run.prompt_ids)) if p != query_pos], dtype=np.int64)
    return np.arange(after, query_pos + 1, dtype=np.int64)
