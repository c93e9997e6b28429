"""Views beyond one heatmap: per-head statistics, galleries, text attention, sinks and baselines.

Pure functions over an `AttentionRun`; ranges are 0-based and inclusive like everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attention_processor import step_rows, token_heatmaps, vision_attention
from records import AttentionRun

GENERIC_PROMPT = "Write a general description of the image."


def vision_maps(run: AttentionRun, step_idx: int, layers, heads, renormalize: bool = False) -> np.ndarray:
    """(l, h, grid_h, grid_w) float32: every selected head's raw map; optionally each sums to 1."""
    values = vision_attention(run, step_idx, layers, heads, renormalize=renormalize)  # (l, h, n_cells)
    grid_h, grid_w = run.vision.grid_hw
    return values.reshape(*values.shape[:2], grid_h, grid_w).numpy()


def head_matrix(run: AttentionRun, step_idx: int, layers, heads) -> dict[str, np.ndarray]:
    """Per (layer, head) of the ranges: `share` of attention on the image (0..1) and the
    normalised spatial `entropy` of its map (0 = one cell, 1 = uniform). Both (l, h) float32."""
    maps = vision_maps(run, step_idx, layers, heads)  # (l, h, gh, gw)
    flat = maps.reshape(*maps.shape[:2], -1)  # (l, h, n_cells)
    share = flat.sum(-1)  # (l, h)
    p = flat / np.clip(share[..., None], 1e-12, None)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1) / np.log(max(flat.shape[-1], 2))
    return {"share": share.astype(np.float32), "entropy": entropy.astype(np.float32)}


def region_share(run: AttentionRun, step_idx: int, region: np.ndarray, layers=None, heads=None) -> np.ndarray:
    """(l, h) share of each head's attention that falls on the grid cells where `region` is True."""
    maps = vision_maps(run, step_idx, layers, heads)  # (l, h, gh, gw)
    if region.shape != maps.shape[2:]:
        raise ValueError(f"The region mask has shape {region.shape}, but the token grid is {maps.shape[2:]}.")
    return maps[:, :, region].sum(-1).astype(np.float32)


def box_to_cells(run: AttentionRun, box_xyxy) -> np.ndarray:
    """(grid_h, grid_w) bool: the cells whose centres fall inside a box given in original-image pixels."""
    return run.vision.cells_in_box(box_xyxy)


def cell_at(run: AttentionRun, x: float, y: float) -> tuple[int, int] | None:
    """(row, col) of the grid cell under original-image pixel (x, y), or None outside the grid's box."""
    return run.vision.cell_at(x, y)


def region_to_text(run: AttentionRun, region: np.ndarray) -> dict[str, np.ndarray]:
    """Which generated tokens, layers and heads attend most to a region of the image.

    Returns `per_step` (T,) mean share over all layers and heads, and `per_head` (L, H) mean over steps.
    """
    layout = run.vision
    if layout.num_frames != 1 or region.shape != tuple(layout.grid_hw):
        raise ValueError(f"The region mask has shape {region.shape}, but the token grid is {tuple(layout.grid_hw)}.")
    cells = torch.from_numpy(layout.token_positions[region.ravel()])  # the region's tokens, grid order
    shares = run.step_masses(range(run.num_steps), cells).numpy()  # (T, L, H), every token in one pass
    return {"per_step": shares.mean(axis=(1, 2)), "per_head": shares.mean(axis=0)}


def sink_cells(
    run: AttentionRun, layers=None, heads=None, factor: float = 5.0, min_fraction: float = 0.9
) -> np.ndarray:
    """(grid_h, grid_w) bool: cells that take more than `factor`× a uniform share of the image's
    attention for at least `min_fraction` of the generated tokens, whatever the token."""
    n_cells = run.vision.num_cells
    hits = np.zeros(run.vision.grid_hw, dtype=np.int32)
    # every token's map at once (one pass per layer of the store), each head's image share summing to 1
    for maps in token_heatmaps(run, range(run.num_steps), layers, heads, "mean", renormalize=True):
        hits += maps > factor / n_cells
    return hits >= max(1, int(np.ceil(min_fraction * run.num_steps)))


@dataclass(frozen=True)
class TextPiece:
    """One chip of the text-attention view: a token (or the whole image block) and its weight."""

    text: str
    weight: float  # attention mass, 0..1
    kind: str  # "prompt" | "image" | "answer" | "excluded"


def text_attention(
    run: AttentionRun, step_idx: int, layers=None, heads=None, exclude_positions: tuple[int, ...] = ()
) -> list[TextPiece]:
    """The selected token's attention over everything before it, mean over the selected heads.

    Each image (or video) block becomes one piece; `exclude_positions` (e.g. BOS, system prompt)
    are kept as pieces of kind "excluded" and the other weights are renormalised without them.
    Token texts come from the run itself, so this works whatever model is loaded now.
    """
    weights = step_rows(run, step_idx, layers, heads).float().mean(dim=(0, 1)).numpy()  # (S_t,)
    excluded = set(exclude_positions)
    kept_total = sum(w for pos, w in enumerate(weights) if pos not in excluded) or 1.0
    texts = (run.prompt_tokens or [str(i) for i in run.prompt_ids]) + run.generated_tokens[:step_idx]
    block_of = {int(pos): i for i, layout in enumerate(run.visions) for pos in layout.token_positions}
    block_mass = [0.0] * len(run.visions)
    pieces = []
    for pos, weight in enumerate(weights):
        if pos in block_of:
            i = block_of[pos]
            block_mass[i] += weight
            layout = run.visions[i]
            if pos == layout.token_positions[-1]:
                name = "video" if layout.num_frames > 1 else f"image {i}" if len(run.visions) > 1 else "image"
                pieces.append(
                    TextPiece(f"[{name}: {len(layout.token_positions)} tokens]", block_mass[i] / kept_total, "image")
                )
            continue
        kind = "excluded" if pos in excluded else ("prompt" if pos < len(run.prompt_ids) else "answer")
        value = weight if kind == "excluded" else weight / kept_total
        pieces.append(TextPiece(texts[pos], float(value), kind))
    return pieces


def relative_heatmap(heat: np.ndarray, generic_heat: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """The map divided by the same model's map for a generic prompt on the same image (same grid)."""
    if heat.shape != generic_heat.shape:
        raise ValueError(f"The generic map has grid {generic_heat.shape}, the map {heat.shape}; they must match.")
    return (heat / (generic_heat + eps)).astype(np.float32)


def contrast_heatmap(heat: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The difference of two maps each normalised to sum 1 over its cells: > 0 where `heat` puts more of
    its mass than `other`, < 0 where less; between -1 and 1. A map with no mass counts as all zero."""
    if heat.shape != other.shape:
        raise ValueError(f"The maps to contrast have grids {heat.shape} and {other.shape}; they must match.")

    def share(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        total = m.sum()
        return m / total if total > 0 else np.zeros_like(m)

    return (share(heat) - share(other)).astype(np.float32)


def system_positions(run: AttentionRun) -> tuple[int, ...]:
    """Positions before the first vision token: BOS, system prompt and the chat header."""
    return tuple(range(int(run.vision.token_positions[0]))) if len(run.vision.token_positions) else ()
