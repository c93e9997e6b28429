"""Where in depth does a region matter? A window of layers slides over the decoder; in each window the box
is blocked from the token (and from the question), the whole image from the question, and, as a control,
random regions of the same size away from the box are blocked from the token.

After "Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al., CVPR 2025) and
Neo et al. (ICLR 2025). The forwards of a sweep are batched, several knockouts per forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from causal.edits import RowEdit
from causal.knockout import Knockout, forward_outcomes, head_set, knockout, relative
from causal.positions import box_positions, cell_positions, image_positions, query_positions
from errors import InputError
from families import decoder_layers, softmax_layers
from records import AttentionRun

CONDITIONS: dict[str, str] = {
    "box_token": "box → token",
    "box_question": "box → question",
    "image_question": "image → question",
}
CONTROL = "control → token"


@dataclass(frozen=True)
class KnockoutSweep:
    """Per window of layers, the relative change of generated token `step_idx`'s probability.

    centres: (n,) the decoder layer each window centres on; windows: (n, 2) its inclusive (lo, hi);
    changes: condition (CONDITIONS' keys) -> (n,) float relative changes, (p_after − p_before) / p_before,
    NaN where nothing could be blocked (a window with no softmax layer, or no question after the image);
    control: (n, draws) the same for each random region blocked from the token; p_before: 0..1;
    box_tokens: image tokens in the box; control_tokens: (draws,) tokens in each random region."""

    step_idx: int
    token: str
    p_before: float
    centres: np.ndarray
    windows: np.ndarray
    changes: dict[str, np.ndarray]
    control: np.ndarray
    box_tokens: int
    control_tokens: np.ndarray

    def control_mean(self) -> np.ndarray:
        """(n,) the control's mean change per window."""
        return np.nanmean(self.control, axis=1) if self.control.size else np.zeros(len(self.centres))


def control_positions(
    holder, run: AttentionRun, box_xyxy, draws: int = 8, seed: int = 0, image_idx: int = 0
) -> list[np.ndarray]:
    """`draws` random regions (each an (n,) array of positions) with the box's cell shape on the image's
    main view, placed away from the box (not touching it when there is room; distinct places while there
    are enough), mapped to every view as the box is, less any token the box itself blocks (a coarse view's
    cell can hold both). When no such place exists, random image cells outside the box, as many as the
    box has. Raises InputError when the box leaves too few tokens outside it."""
    layout = run.visions[run.view_index(image_idx)]
    inside = layout.cells_overlapping(box_xyxy)  # (grid_h, grid_w)
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if not len(rows):
        box_positions(run, box_xyxy, image_idx)  # raises the message naming the grid
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    grid_h, grid_w = layout.grid_hw
    rng = np.random.default_rng(seed)
    for gap in (1, 0):  # a one-cell gap around the box if it fits, else only no overlap
        places = [
            (r, c)
            for r in range(grid_h - height + 1)
            for c in range(grid_w - width + 1)
            if r + height + gap <= rows[0]
            or r >= rows[-1] + 1 + gap
            or c + width + gap <= cols[0]
            or c >= cols[-1] + 1 + gap
        ]
        if places:
            xs, ys = layout.cell_edges()
            box = box_positions(run, box_xyxy, image_idx)
            picks = rng.choice(len(places), size=draws, replace=len(places) < draws)
            return [
                np.setdiff1d(box_positions(run, (xs[c], ys[r], xs[c + width], ys[r + height]), image_idx), box)
                for r, c in (places[i] for i in picks)
            ]
    box = box_positions(run, box_xyxy, image_idx)
    outside = np.setdiff1d(cell_positions(run), box)
    if len(outside) < len(box):
        raise InputError(
            f"The box covers {len(box)} of the image's {len(box) + len(outside)} tokens, so no random region "
            "of its size fits elsewhere for a control. Draw a smaller box."
        )
    return [np.sort(rng.choice(outside, size=len(box), replace=False)) for _ in range(draws)]


def windows(num_layers: int, window: int) -> np.ndarray:
    """(num_layers, 2) the inclusive window of `window` layers centred on each layer, clipped at the ends."""
    if window < 1:
        raise InputError(f"window must be at least 1 layer, got {window}.")
    half = (window - 1) // 2
    centres = np.arange(num_layers)
    return np.stack([np.maximum(centres - half, 0), np.minimum(centres - half + window - 1, num_layers - 1)], axis=1)


def knockout_sweep(
    holder,
    run: AttentionRun,
    step_idx: int,
    box,
    window: int = 9,
    draws: int = 8,
    seed: int = 0,
    heads=None,
    image_idx: int = 0,
    batch_size: int = 8,
    guard=nullcontext,
    progress=None,
) -> KnockoutSweep:
    """The layer sweep of one token and one box (x0, y0, x1, y1) in original-image pixels: for every
    decoder layer, the window of `window` layers centred on it (clipped at the ends) blocks each condition
    of CONDITIONS and each of `draws` control regions (`control_positions`, seeded by `seed`). heads: a
    list or inclusive (lo, hi), default all. 1 + num_layers * (3 + draws) rows, `batch_size` per forward;
    the caller holds the model lock, or passes it as `guard` to have it taken per forward (`progress`:
    see `forward_outcomes`)."""
    image = image_positions(holder, run)
    box_keys = box_positions(run, box, image_idx)
    controls = control_positions(holder, run, box, draws, seed, image_idx)
    token_q = query_positions(run, step_idx, "token", image)
    question_q = query_positions(run, step_idx, "question", image)
    chosen_heads = head_set(holder.num_heads, heads)
    spans = windows(len(decoder_layers(holder.model)), window)
    keys_and_queries = [(box_keys, token_q), (box_keys, question_q), (image, question_q)]
    keys_and_queries += [(keys, token_q) for keys in controls]
    attending = set(softmax_layers(holder.model))
    rows, undefined = [], []  # undefined: (window, condition) with nothing to block (no softmax layer, no query)
    for w, (lo, hi) in enumerate(spans):
        layers = frozenset(idx for idx in range(lo, hi + 1) if idx in attending)
        for c, (k, q) in enumerate(keys_and_queries):
            rows.append(
                RowEdit(layers if len(q) else frozenset(), chosen_heads, tuple(map(int, q)), tuple(map(int, k)))
            )
            if not layers or not len(q):
                undefined.append((w, c))
    (before,) = forward_outcomes(holder, run, step_idx, [RowEdit()], guard=guard)
    edited = [row for row in rows if not row.empty]
    after = forward_outcomes(holder, run, step_idx, edited, batch_size, guard=guard, progress=progress)
    outcomes = iter(after)
    change = np.array(
        [relative(next(outcomes).p_token, before.p_token) if not row.empty else 0.0 for row in rows], dtype=np.float64
    ).reshape(len(spans), len(keys_and_queries))  # (n, 3 + draws)
    for w, c in undefined:
        change[w, c] = np.nan  # nothing was blocked there: no effect to report
    return KnockoutSweep(
        step_idx=step_idx,
        token=run.generated_tokens[step_idx],
        p_before=before.p_token,
        centres=np.arange(len(spans)),
        windows=spans,
        changes={name: change[:, i] for i, name in enumerate(CONDITIONS)},
        control=change[:, len(CONDITIONS) :],
        box_tokens=len(box_keys),
        control_tokens=np.array([len(keys) for keys in controls]),
    )


def knockout_with_control(
    holder,
    run: AttentionRun,
    step_idx: int,
    key_positions,
    controls: list[np.ndarray] | None = None,
    layers=None,
    heads=None,
    draws: int = 8,
    seed: int = 0,
    batch_size: int = 8,
) -> tuple[Knockout, np.ndarray]:
    """A knockout of `key_positions` from the token's query in `layers` and `heads`, and (n,) the relative
    changes of the same knockout of each control (arrays of positions): by default `draws` sets of as many
    image cells (of every view) outside `key_positions`, drawn at random (seeded). No controls when the
    keys cover the image (nothing of their size is left outside)."""
    found = knockout(holder, run, step_idx, batch_size, key_positions=key_positions, layers=layers, heads=heads)
    if controls is None:
        outside = np.setdiff1d(cell_positions(run), np.asarray(found.key_positions, dtype=np.int64))
        rng = np.random.default_rng(seed)
        count = len(found.key_positions)
        enough = len(outside) >= count
        controls = [np.sort(rng.choice(outside, size=count, replace=False)) for _ in range(draws)] if enough else []
    if not controls or not found.layers:
        return found, np.zeros(0)
    rows = [
        RowEdit(frozenset(found.layers), found.heads, found.query_positions, tuple(int(p) for p in keys))
        for keys in controls
    ]
    outcomes = forward_outcomes(holder, run, step_idx, rows, batch_size)
    return found, np.array([relative(o.p_token, found.p_before) for o in outcomes], dtype=np.float64)
