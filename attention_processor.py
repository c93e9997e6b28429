"""Turn captured attention rows into maps over the image's token grid.

Pure functions over an `AttentionRun`: select the vision tokens, aggregate over inclusive layer
and head ranges, and (as a separate, explicit step) normalise a map for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from errors import InputError, OutOfRangeError
from records import AttentionRun, VisionLayout

Reduce = Literal["mean", "max", "min"]
REDUCTIONS: tuple[str, ...] = ("mean", "max", "min")
# The name of the map read straight from the captured rows (the registry's first method, methods.METHODS).
RAW_ATTENTION = "attention"
COMBINES: tuple[str, ...] = ("sum", "mean", "max")  # how several tokens' maps become one
Normalization = Literal["minmax", "percentile", "fixed"]
NORMALIZATIONS: tuple[str, ...] = ("minmax", "percentile", "fixed")


def range_slice(bounds: tuple[int, int] | None, available: list[int], what: str) -> slice:
    """A slice into `available` (sorted, consecutive or not) for the inclusive range `bounds`."""
    if bounds is None:
        return slice(0, len(available))
    lo, hi = int(bounds[0]), int(bounds[1])
    if lo > hi:
        raise InputError(f"The {what} range {lo}..{hi} is inverted; the first number must not exceed the second.")
    if available and available[-1] - available[0] + 1 != len(available):
        # Sparse (Qwen3.5: only some layers have softmax attention): the captured ones inside the range.
        inside = [i for i, idx in enumerate(available) if lo <= idx <= hi]
        if lo < 0 or hi > available[-1] or not inside:
            raise InputError(
                f"The {what} range {lo}..{hi} holds no {what} with softmax attention; those are "
                f"{', '.join(map(str, available))}. Pick a range that includes one."
            )
        return slice(inside[0], inside[-1] + 1)
    if lo not in available or hi not in available or available.index(hi) - available.index(lo) != hi - lo:
        raise InputError(
            f"The {what} range {lo}..{hi} is outside what was captured "
            f"({available[0]}..{available[-1]}); pick a range inside it."
        )
    return slice(available.index(lo), available.index(hi) + 1)


def _reduce(values: torch.Tensor, reduce: str) -> torch.Tensor:
    """Aggregate over the first two axes (layers, heads) of a (L, H, N) tensor → (N,)."""
    flat = values.reshape(-1, values.shape[-1])  # (L*H, N)
    if reduce == "mean":
        return flat.mean(dim=0)
    if reduce == "max":
        return flat.max(dim=0).values
    if reduce == "min":
        return flat.min(dim=0).values
    raise InputError(f"Unknown aggregation {reduce!r}; choose one of {REDUCTIONS}.")


def vision_attention(
    run: AttentionRun,
    step_idx: int,
    layers: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    image_idx: int = 0,
    renormalize: bool = False,
) -> torch.Tensor:
    """(n_layers_sel, n_heads_sel, n_tokens) float32: attention on each token of image `image_idx`;
    with renormalize, each head's attention on the image rescaled to sum to 1."""
    return _on_image(_layout(run, image_idx), step_rows(run, step_idx, layers, heads), renormalize)


def _on_image(layout: VisionLayout, rows: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """rows (l, h, S) → (l, h, n_tokens) float32 at the layout's tokens, optionally summing to 1 per head."""
    values = rows[:, :, _positions_index(layout)].float()
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return values


def _selected(
    run: AttentionRun, rows: torch.Tensor, layers: tuple[int, int] | None, heads: tuple[int, int] | None
) -> torch.Tensor:
    """The layer and head ranges of rows laid out (num_layers, num_heads, ...), as a view."""
    layer_sel = range_slice(layers, run.layer_indices, "layer")
    head_sel = range_slice(heads, list(range(run.num_heads)), "head")
    return rows[layer_sel, head_sel]


def step_rows(
    run: AttentionRun, step_idx: int, layers: tuple[int, int] | None = None, heads: tuple[int, int] | None = None
) -> torch.Tensor:
    """(n_layers_sel, n_heads_sel, len(prompt_ids) + step_idx) float16 view of the selected rows."""
    return _selected(run, run.step_attention(step_idx), layers, heads)


def _layout(run: AttentionRun, image_idx: int) -> VisionLayout:
    if not 0 <= image_idx < len(run.visions):
        raise OutOfRangeError(f"image_idx {image_idx} is out of range: this run has {len(run.visions)} image(s).")
    return run.visions[image_idx]


def _positions_index(layout: VisionLayout) -> slice | torch.Tensor:
    """The vision positions as a slice when they are one block (the usual case), else an index tensor."""
    positions = layout.token_positions  # (n_tokens,)
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1:
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return torch.from_numpy(positions)


def combine_maps(maps, how: str = "sum") -> np.ndarray:
    """Several tokens' maps (same shape) as one, float32: their sum, mean or cell-wise max."""
    if how not in COMBINES:
        raise InputError(f"Unknown way to combine tokens {how!r}; choose one of {COMBINES}.")
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    if not maps:
        raise InputError("No tokens to combine; pick at least one.")
    stack = np.stack(maps)
    return {"sum": stack.sum, "mean": stack.mean, "max": stack.max}[how](axis=0).astype(np.float32)


def token_heatmap(
    run: AttentionRun,
    step_idx: int | Sequence[int],
    layers: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    reduce: Reduce = "mean",
    renormalize: bool = False,
    image_idx: int = 0,
    combine: str = "sum",
) -> np.ndarray:
    """Raw attention mass on each vision token for generated token `step_idx`; for a list of steps (a
    word of several tokens, a phrase), their maps combined by `combine` (`combine_maps`).

    layers, heads: 0-based inclusive (lo, hi) model indices; None means all captured.
    reduce: how layers and heads are combined (over both axes together).
    renormalize: first rescale each head's attention on this image to sum to 1 (attention within it).
    image_idx: which layout of `run.visions` (0 = the first image's main view, `run.vision`); one per
        image, or per view of each image for the tiled families: `run.view_index(image, view)` finds it.
    Returns (grid_h, grid_w) float32 for an image, (num_frames, grid_h, grid_w) for a video;
    unnormalised: each value is a softmax probability (0..1).
    """
    if not isinstance(step_idx, int | np.integer):
        return combine_maps(token_heatmaps(run, step_idx, layers, heads, reduce, renormalize, image_idx), combine)
    return token_heatmaps(run, [step_idx], layers, heads, reduce, renormalize, image_idx)[0]


def token_heatmaps(
    run: AttentionRun,
    steps: Sequence[int],
    layers: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    reduce: Reduce = "mean",
    renormalize: bool = False,
    image_idx: int = 0,
) -> list[np.ndarray]:
    """`token_heatmap` of each of several generated tokens, computed together: a query-key store makes
    every token's rows in one pass per layer, where it lives, so an animation or a shared scale over the
    whole answer costs about one token's time per chunk of tokens, not one per token."""
    if reduce not in REDUCTIONS:
        raise InputError(f"Unknown aggregation {reduce!r}; choose one of {REDUCTIONS}.")
    layout = _layout(run, image_idx)
    layer_sel = range_slice(layers, run.layer_indices, "layer")
    head_sel = range_slice(heads, list(range(run.num_heads)), "head")
    maps = run.step_maps(steps, _positions_index(layout), layer_sel, head_sel, reduce, renormalize)  # (n, P)
    shape = (layout.num_frames, *layout.grid_hw) if layout.num_frames > 1 else layout.grid_hw
    return [heat.reshape(shape).numpy().astype(np.float32) for heat in maps]


def prompt_token_heatmap(
    run: AttentionRun,
    token_pos: int,
    layers: tuple[int, int] | None = None,
    heads: tuple[int, int] | None = None,
    reduce: Reduce = "mean",
    renormalize: bool = False,
    image_idx: int = 0,
) -> np.ndarray:
    """Like `token_heatmap`, for a prompt token at sequence position `token_pos` (one of
    `run.prompt_positions`): what that prompt word attends to in the image."""
    layout = _layout(run, image_idx)
    if layout.token_positions[0] > token_pos:
        raise InputError(f"Prompt token {token_pos} comes before image {image_idx}, so it cannot attend to it.")
    return _heatmap(layout, _selected(run, run.prompt_attention(token_pos), layers, heads), reduce, renormalize)


def _heatmap(layout: VisionLayout, rows: torch.Tensor, reduce: str, renormalize: bool) -> np.ndarray:
    """rows (l, h, S) → (grid_h, grid_w), or (frames, grid_h, grid_w) for a video, float32."""
    if reduce not in REDUCTIONS:
        raise InputError(f"Unknown aggregation {reduce!r}; choose one of {REDUCTIONS}.")
    values = _on_image(layout, rows, renormalize)  # (l, h, n_tokens)
    shape = (layout.num_frames, *layout.grid_hw) if layout.num_frames > 1 else layout.grid_hw
    return _reduce(values, reduce).reshape(shape).numpy().astype(np.float32)


def vision_share(run: AttentionRun) -> np.ndarray:
    """(num_steps, num_layers, num_heads) float32: attention mass on all vision tokens, 0..1."""
    return run.segment_shares("vision")


def image_shares(
    run: AttentionRun, step_idx: int, layers: tuple[int, int] | None = None, heads: tuple[int, int] | None = None
) -> np.ndarray:
    """(n_images,) float32: mean attention mass over the selected heads on each image of the prompt."""
    rows = step_rows(run, step_idx, layers, heads).float()  # (l, h, S_t)
    return np.array(
        [float(rows[:, :, _positions_index(layout)].sum(-1).mean()) for layout in run.visions], dtype=np.float32
    )


def heatmap_range(heatmaps: list[np.ndarray]) -> tuple[float, float]:
    """(min, max) over several maps: one shared scale for comparing tokens."""
    return (float(min(h.min() for h in heatmaps)), float(max(h.max() for h in heatmaps)))


def normalize_heatmap(
    heatmap: np.ndarray,
    mode: Normalization = "minmax",
    percentile: float = 99.0,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Scale a raw map to 0..1 for display. Same shape, float32.

    minmax: this map's min → 0 and max → 1.
    percentile: min → 0, the given percentile → 1, values above are clipped (tames attention sinks).
    fixed: `value_range` (lo, hi) → (0, 1), e.g. from `heatmap_range` for a scale shared across tokens.
    A constant map becomes all zeros.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if mode == "minmax":
        lo, hi = float(heatmap.min()), float(heatmap.max())
    elif mode == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise InputError(f"percentile must be in (0, 100], got {percentile}.")
        lo, hi = float(heatmap.min()), float(np.percentile(heatmap, percentile))
    elif mode == "fixed":
        if value_range is None:
            raise ValueError("mode='fixed' needs value_range=(lo, hi).")
        lo, hi = float(value_range[0]), float(value_range[1])
    else:
        raise InputError(f"Unknown normalisation {mode!r}; choose one of {NORMALIZATIONS}.")
    if hi <= lo:
        return np.zeros_like(heatmap)
    return np.clip((heatmap - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
