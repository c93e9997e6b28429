"""Scores of one map against a ground-truth region, as the localisation literature defines them.

Pure functions of a map over the token grid (`heat`, (grid_h, grid_w), non-negative), its
`VisionLayout` (which region of the original image each cell covers) and the target, given in the
ORIGINAL image's pixels: boxes `[x0, y0, x1, y1]` and/or a boolean mask (H, W). Cells outside the
image the model saw never count as inside the target. No model, no drawing.

- `pointing_hit`: the pointing game, whether the centre of the map's highest cell is on the target
  (`pointing_cells`: that answer for every cell at once, for scoring many maps of one item).
- `attention_ratio`: the share of the map's mass on the target divided by the target's share of
  the area the grid covers ("MLLMs Know Where to Look", ICLR 2025); 1 is chance level.
- `otsu_iou`: IoU of the map thresholded by Otsu's method with the target (TAM's Obj-IoU).
- `off_share`: the share of the image below the map's Otsu threshold, with no target (TAM's score of
  function words, which should point nowhere).

And the numbers a study reports over its items: `bootstrap_interval` (a mean's percentile bootstrap
interval) and `sign_test` (paired one-sided sign test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from errors import InputError
from records import VisionLayout


def target_mask(
    image_size: tuple[int, int], boxes: Sequence[Sequence[float]] = (), mask: np.ndarray | None = None
) -> np.ndarray:
    """(H, W) bool over the original image: the union of the boxes (pixel (x, y) is inside when
    x0 <= x < x1 and y0 <= y < y1, clipped to the image) and the mask."""
    width, height = image_size
    region = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not x1 > x0 or not y1 > y0:
            raise InputError(f"A box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {list(box)}.")
        region[max(0, round(y0)) : max(0, round(y1)), max(0, round(x0)) : max(0, round(x1))] = True
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != (height, width):
            raise InputError(
                f"The mask is {mask.shape[1]}x{mask.shape[0]} px but the image is {width}x{height}; "
                "give a mask of the image's own size."
            )
        region |= mask
    if not region.any():
        raise InputError("The target is empty: give at least one box or a mask with some pixels set.")
    return region


def cell_coverage(layout: VisionLayout, region: np.ndarray) -> np.ndarray:
    """(grid_h, grid_w) float: the fraction of each cell's pixels (inside the image) on the region."""
    cover = np.zeros(layout.num_cells, dtype=np.float64)
    for j, (rows, cols) in enumerate(layout.cell_slices()):
        pixels = region[rows, cols]
        cover[j] = pixels.mean() if pixels.size else 0.0
    return cover.reshape(layout.grid_hw)


def _check(heat: np.ndarray, layout: VisionLayout) -> np.ndarray:
    heat = np.asarray(heat, dtype=np.float64)
    if heat.shape != tuple(layout.grid_hw):
        raise ValueError(f"The map has shape {heat.shape}, but the token grid is {tuple(layout.grid_hw)}.")
    if (heat < 0).any() or not np.isfinite(heat).all():
        raise ValueError("The map must be finite and non-negative (attention mass, not a relative map).")
    return heat


def pointing_cells(layout: VisionLayout, region: np.ndarray) -> np.ndarray:
    """(grid_h * grid_w,) bool, row-major: whether each cell's centre pixel is a target pixel, so a map
    whose highest cell is j wins the pointing game exactly when entry j is True. A centre outside the
    image is never on target."""
    height, width = region.shape
    hits = np.zeros(layout.num_cells, dtype=bool)
    for j in range(layout.num_cells):
        x0, y0, x1, y1 = layout.cell_box_xyxy(*divmod(j, layout.grid_hw[1]))
        x, y = int((x0 + x1) / 2), int((y0 + y1) / 2)  # the cell's centre pixel
        hits[j] = 0 <= x < width and 0 <= y < height and bool(region[y, x])
    return hits


def pointing_hit(heat: np.ndarray, layout: VisionLayout, region: np.ndarray) -> bool:
    """The pointing game: whether the centre of the map's highest cell (the first in row-major order on
    ties) is a target pixel. A centre outside the image is a miss."""
    heat = _check(heat, layout)
    return bool(pointing_cells(layout, region)[int(np.argmax(heat))])


def attention_ratio(heat: np.ndarray, layout: VisionLayout, region: np.ndarray) -> float:
    """(mass on the target) / (target's share of the covered area); each cell's mass counts in
    proportion to how much of the cell the target covers. 1.0 is what a uniform map scores."""
    return float(attention_ratios(_check(heat, layout)[None], layout, region)[0])


def attention_ratios(heats: np.ndarray, layout: VisionLayout, region: np.ndarray) -> np.ndarray:
    """`attention_ratio` of many maps over the same grid at once: heats (M, grid_h, grid_w) → (M,) float64."""
    heats = np.asarray(heats, dtype=np.float64).reshape(len(heats), -1)  # (M, N)
    cover = cell_coverage(layout, region).ravel()  # (N,)
    sizes = np.array(
        [(r.stop - r.start) * (c.stop - c.start) for r, c in layout.cell_slices()], dtype=np.float64
    )  # (N,) pixels per cell, inside the image
    totals = heats.sum(axis=1)  # (M,)
    area_share = (cover * sizes).sum() / max(sizes.sum(), 1.0)
    if area_share <= 0:
        return np.zeros(len(heats))
    return np.where(totals > 0, (heats @ cover) / np.where(totals > 0, totals, 1.0) / area_share, 0.0)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of `values`: the cut that maximises the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)  # (bins,)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])  # cells at or above it are "on"


def otsu_iou(heat: np.ndarray, layout: VisionLayout, region: np.ndarray) -> float:
    """IoU, in original-image pixels, of the cells at or above Otsu's threshold with the target."""
    heat = _check(heat, layout)
    on = heat >= otsu_threshold(heat)  # (grid_h, grid_w) bool
    predicted = np.zeros_like(region)
    for j, (rows, cols) in enumerate(layout.cell_slices()):
        if on.flat[j]:
            predicted[rows, cols] = True
    union = (predicted | region).sum()
    return float((predicted & region).sum() / union) if union else 0.0


def sign_test(first: Sequence[float], second: Sequence[float]) -> tuple[int, int, float]:
    """Paired one-sided sign test that `first` tends to be below `second` (e.g. a box knockout's relative
    change against its random control's: more negative means the box matters more).

    Returns (pairs where first < second, pairs that differ, p-value): the chance of at least that many
    wins among the differing pairs if each were a fair coin; ties are dropped; p = 1.0 with no pairs."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"A paired test needs pairs: got {a.shape} and {b.shape} values.")
    keep = np.isfinite(a) & np.isfinite(b) & (a != b)
    wins, pairs = int((a[keep] < b[keep]).sum()), int(keep.sum())
    p_value = sum(math.comb(pairs, k) for k in range(wins, pairs + 1)) / 2**pairs if pairs else 1.0
    return wins, pairs, float(p_value)


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of the finite `values` and its percentile bootstrap interval: the
    (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the means of `resamples` resamples drawn
    with replacement (numpy's default_rng(seed), so the same values and seed give the same interval).
    Constant values give lo == mean == hi; no finite value gives three NaNs."""
    if not 0 < confidence < 1 or resamples < 1:
        raise InputError(f"Need 0 < confidence < 1 and resamples >= 1, got {confidence} and {resamples}.")
    data = np.asarray(values, dtype=np.float64).ravel()
    data = data[np.isfinite(data)]  # (n,)
    if not len(data):
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // len(data))  # resamples per draw: about 16 MB of indices at a time
    means = np.concatenate(
        [
            data[rng.integers(0, len(data), (min(chunk, resamples - k), len(data)))].mean(axis=1)
            for k in range(0, resamples, chunk)
        ]
    )  # (resamples,)
    lo, hi = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(data.mean()), float(lo), float(hi)


def off_share(heat: np.ndarray, layout: VisionLayout) -> float:
    """The share of the image area the grid covers (original-image pixels) whose cells lie below the map's
    Otsu threshold: how much of the image the map leaves dark (TAM's function-word score, for words that
    should point nowhere; 1 is best). A map with no mass at all scores 1; any other flat map has nothing
    below its threshold (every cell counts as on, as in `otsu_iou`) and scores 0."""
    heat = _check(heat, layout)
    if not heat.any():
        return 1.0
    off = heat < otsu_threshold(heat)  # (grid_h, grid_w) bool
    sizes = np.array(
        [(r.stop - r.start) * (c.stop - c.start) for r, c in layout.cell_slices()], dtype=np.float64
    )  # (N,) pixels per cell, inside the image
    return float((sizes * off.ravel()).sum() / sizes.sum()) if sizes.sum() else 0.0
