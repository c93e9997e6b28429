"""A study item's causal checks: does blocking the target region's image tokens from the scored token's
query lower the token's probability, more than blocking the map's own top cells or random regions?

Per item with a box (teacher-forced over the item's own run, every layer, the token's query only):
`ko_box_rel` blocks the target's image tokens (the union over its boxes, every view), `ko_topk_rel` the
raw-attention map's k highest cells on every view (k = the target's tokens on the main view), and
`ko_random_rel` is the mean over `draws` controls: random regions of the box's cell shape away from it
for an item with one box, as many random cells outside every box for an item with several. The sweep
(`causal.sweep.knockout_sweep`, first box) gives the `knockout` table: per window of layers, each
condition's relative change. A relative change is (p_after − p_before) / p_before: −1 = the token is gone.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from attention_processor import token_heatmap
from causal.knockout import knockout
from causal.positions import box_positions, top_cell_positions
from causal.sweep import CONDITIONS, CONTROL, control_positions, knockout_sweep, knockout_with_control
from metrics import sign_test
from model_holder import ModelHolder
from records import AttentionRun

KNOCKOUTS: tuple[str, ...] = ("box", "topk", "random")
KNOCKOUT_COLUMNS = ("ko_box_rel", "ko_topk_rel", "ko_random_rel")  # one per name of KNOCKOUTS
SWEEP_COLUMNS = ("item_id", "split", "layer", "lo", "hi", "condition", "relative_change")
SWEEP_LABELS = {**CONDITIONS, "control_mean": f"{CONTROL} (mean of the draws)"}
NO_BOX = "knockout needs a target box"  # the problem of an item with only a mask


def empty_knockout() -> dict:
    """The knockout columns of an item that has none: every value None."""
    return dict.fromkeys(KNOCKOUT_COLUMNS)


def region_positions(run: AttentionRun, boxes: list) -> np.ndarray:
    """(n,) int64, sorted: the image tokens (every view) whose cells overlap any of the boxes."""
    return np.unique(np.concatenate([box_positions(run, box) for box in boxes])).astype(np.int64)


def topk_positions(run: AttentionRun, heat: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(n,) int64: the positions, on every view, of the map's k highest main-view cells (ties: the first
    cells), k = the region's tokens on the main view, so top-k and the box are blocked alike.
    heat: (grid_h, grid_w), cell j at `run.vision.token_positions[j]`."""
    return top_cell_positions(run, heat, len(np.intersect1d(region, run.vision.token_positions)))


def knockout_columns(
    holder: ModelHolder, run: AttentionRun, step: int, boxes: list, maps: tuple, asked: tuple[str, ...], draws: int
) -> dict:
    """The item's KNOCKOUT_COLUMNS for generated token `step`: the asked ones (KNOCKOUTS' names) as floats,
    the others None. maps: the (layers, heads) ranges of the raw-attention map whose top cells `topk` blocks.
    `random` also runs the box's knockout (its controls are compared with it), reported only when asked.
    Raises InputError when a box covers no image token or no control region fits."""
    found = empty_knockout()
    region = region_positions(run, boxes)
    if "random" in asked:
        # One box: regions of its shape away from it; several: as many random cells outside all of them.
        controls = control_positions(holder, run, boxes[0], draws=draws, seed=0) if len(boxes) == 1 else None
        box, changes = knockout_with_control(holder, run, step, region, controls=controls, draws=draws)
        found["ko_random_rel"] = float(changes.mean())
    elif "box" in asked:
        box = knockout(holder, run, step, key_positions=region, queries="token")
    if "box" in asked:
        found["ko_box_rel"] = float(box.relative_change)
    if "topk" in asked:
        heat = token_heatmap(run, step, *maps)  # (grid_h, grid_w): the study's "attention" map
        top = knockout(holder, run, step, key_positions=topk_positions(run, heat, region), queries="token")
        found["ko_topk_rel"] = float(top.relative_change)
    return found


def sweep_rows(
    holder: ModelHolder, run: AttentionRun, step: int, box, common: dict, window: int, draws: int
) -> list[dict]:
    """The `knockout` table's rows (SWEEP_COLUMNS) of one item: per window of `window` layers (`layer` its
    centre, `lo`-`hi` inclusive) one row per condition of CONDITIONS and one for the controls' mean."""
    sweep = knockout_sweep(holder, run, step, box, window=window, draws=draws)
    changes = {**sweep.changes, "control_mean": sweep.control_mean()}  # condition -> (n,)
    return [
        {
            **common,
            "layer": int(centre),
            "lo": int(lo),
            "hi": int(hi),
            "condition": condition,
            "relative_change": float(values[i]),
        }
        for i, (centre, (lo, hi)) in enumerate(zip(sweep.centres, sweep.windows, strict=True))
        for condition, values in changes.items()
    ]


def knockout_table(records: list[dict]) -> pd.DataFrame:
    """The `knockout` table (SWEEP_COLUMNS) from finished item records, in their order."""
    rows = [row for record in records for row in record.get("knockout_rows", [])]
    return pd.DataFrame(rows, columns=list(SWEEP_COLUMNS))


def _mean(values: pd.Series) -> str:
    values = values.dropna()
    return f"{values.mean():+.3f} over {len(values)} items" if len(values) else "no item"


def knockout_summary(items: pd.DataFrame, sweep: pd.DataFrame, asked: tuple[str, ...]) -> list[str]:
    """summary.md's "Knockout" section. items: one row per item with KNOCKOUT_COLUMNS (None: not scored);
    sweep: the `knockout` table."""
    names = {"box": "box", "topk": "top-k map cells", "random": "random control"}
    column = dict(zip(KNOCKOUTS, KNOCKOUT_COLUMNS, strict=True))
    lines = [
        "",
        "## Knockout",
        "",
        "Mean relative change of the token's probability, blocked from its query in every layer:",
    ]
    lines += [f"- {names[name]}: {_mean(items[column[name]].astype(float))}" for name in KNOCKOUTS if name in asked]
    if "box" in asked and "random" in asked:
        wins, pairs, p_value = sign_test(items["ko_box_rel"].astype(float), items["ko_random_rel"].astype(float))
        lines += [
            "",
            f"Box vs random control: the box lowers the token's probability more than the control in {wins} of "
            f"{pairs} items, one-sided sign test p = {p_value:.3g}.",
        ]
    if len(sweep):
        lines += ["", "Layer sweep (window centre where the mean change over items is most negative):"]
        for condition, rows in sweep.groupby("condition", sort=False):
            by_layer = rows.groupby("layer")["relative_change"].mean()  # (n_windows,)
            layer = int(by_layer.idxmin())
            window = rows[rows["layer"] == layer].iloc[0]
            lines.append(
                f"- {SWEEP_LABELS[condition]}: layer {layer} (window {window['lo']}-{window['hi']}), "
                f"mean {by_layer.min():+.3f}"
            )
    return lines
