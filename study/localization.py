"""Localisation heads: which layer and head ranges make a map that points at the target, chosen on
validation items and reported on the others.

Pure numbers over one item's per-(layer, head) attention on the image (`values`, (L, H, N) for the
N cells of its grid) and the cells that win the pointing game (`cell_hit`, (N,) bool; see
`metrics.pointing_cells`, or a benchmark's own rule). The map of a range is the mean over its layers
and heads, as `token_heatmap(..., reduce="mean")` makes it. `bench/bench_localization.py`, the study
(`batch.py --manifest ... --val-fraction`) and the demo model's `demo_model/ranges.json` all choose
through `choose_ranges`.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RULE = (
    "the layer and head ranges (contiguous, 0-based inclusive) whose mean raw-attention map wins the "
    "pointing game on the most validation items; ties go to the wider ranges, then the later ones"
)


def contiguous_ranges(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Every inclusive range (lo, hi) over the sorted `indices` (the captured layers, or the heads):
    n (n + 1) / 2 of them, in the order (0, 0), (0, 1), ..., (1, 1), ..."""
    return [(indices[a], indices[b]) for a, b in itertools.combinations_with_replacement(range(len(indices)), 2)]


def range_hits(values: np.ndarray, cell_hit: np.ndarray) -> np.ndarray:
    """(n_layer_ranges, n_head_ranges) bool: whether each pair of ranges' mean map (argmax over the N
    cells, the first on ties) lands on a winning cell. values: (L, H, N); ranges by index position,
    in `contiguous_ranges` order."""
    values = np.asarray(values, dtype=np.float64)
    num_layers, num_heads, num_cells = values.shape
    over_layers = np.concatenate([np.zeros((1, num_heads, num_cells)), np.cumsum(values, axis=0)])  # (L+1, H, N)
    head_lo, head_hi = np.array(contiguous_ranges(range(num_heads))).T  # (n_hr,) each
    head_count = (head_hi - head_lo + 1)[:, None]  # (n_hr, 1)
    hits = np.zeros((num_layers * (num_layers + 1) // 2, len(head_lo)), dtype=bool)
    for k, (lo, hi) in enumerate(contiguous_ranges(range(num_layers))):
        per_head = over_layers[hi + 1] - over_layers[lo]  # (H, N) summed over the layers
        over_heads = np.concatenate([np.zeros((1, num_cells)), np.cumsum(per_head, axis=0)])  # (H+1, N)
        means = (over_heads[head_hi + 1] - over_heads[head_lo]) / head_count / (hi - lo + 1)  # (n_hr, N)
        hits[k] = cell_hit[np.argmax(means, axis=1)]
    return hits


@dataclass(frozen=True)
class RangeChoice:
    """The chosen ranges (0-based inclusive) and their pointing-game accuracy over `items` items."""

    layers: tuple[int, int]
    heads: tuple[int, int]
    pointing: float
    items: int


def choose_ranges(
    hits: np.ndarray, layer_ranges: Sequence[tuple[int, int]], head_ranges: Sequence[tuple[int, int]]
) -> RangeChoice:
    """The best pair of ranges by pointing accuracy over the items (`RULE`). hits: (n_items, n_layer_ranges,
    n_head_ranges) bool, as `range_hits` gives per item."""
    hits = np.asarray(hits, dtype=bool)
    if hits.ndim != 3 or hits.shape[0] == 0 or hits.shape[1:] != (len(layer_ranges), len(head_ranges)):
        raise ValueError(
            f"Need hits of shape (items >= 1, {len(layer_ranges)}, {len(head_ranges)}) to choose "
            f"ranges, got {hits.shape}; give at least one validation item."
        )
    accuracy = hits.mean(axis=0)  # (n_lr, n_hr)
    _, _, layers, heads = max(
        (accuracy[i, j], (lr[1] - lr[0]) + (hr[1] - hr[0]), tuple(lr), tuple(hr))
        for i, lr in enumerate(layer_ranges)
        for j, hr in enumerate(head_ranges)
    )
    return RangeChoice(layers, heads, pointing_at(hits, layer_ranges, head_ranges, layers, heads), len(hits))


def pointing_at(
    hits: np.ndarray,
    layer_ranges: Sequence[tuple[int, int]],
    head_ranges: Sequence[tuple[int, int]],
    layers: tuple[int, int],
    heads: tuple[int, int],
) -> float | None:
    """Pointing accuracy of one pair of ranges over the items of hits (n_items, n_lr, n_hr); None for none."""
    hits = np.asarray(hits, dtype=bool)
    if not len(hits):
        return None
    i = [tuple(r) for r in layer_ranges].index(tuple(layers))
    j = [tuple(r) for r in head_ranges].index(tuple(heads))
    return float(hits[:, i, j].mean())


def pack_hits(hits: np.ndarray) -> str:
    """A bool array as a hex string (8 values a byte), for one line of a part file."""
    return np.packbits(np.asarray(hits, dtype=bool).ravel()).tobytes().hex()


def unpack_hits(text: str, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `pack_hits`: a bool array of `shape`."""
    count = int(np.prod(shape))
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:count].astype(bool).reshape(shape)


def ranges_json(record: dict) -> str:
    """A ranges record as the text of ranges.json: indented, each [lo, hi] on one line."""
    return re.sub(r"\[\s+(-?\d+),\s+(-?\d+)\s+\]", r"[\1, \2]", json.dumps(record, indent=1)) + "\n"


def ranges_record(model_id: str, choice: RangeChoice, validation: dict, test: dict) -> dict:
    """What `ranges.json` holds: the model, the chosen ranges, how they were chosen, and the figures
    on the validation items (which chose them) and on the test items (which did not)."""
    return {
        "model": model_id,
        "layers": list(choice.layers),
        "heads": list(choice.heads),
        "method": "attention",
        "reduce": "mean",
        "chosen_by": RULE,
        "validation": {"items": choice.items, "pointing": choice.pointing, **validation},
        "test": test,
    }
