"""Activation patching: the decoder's residual stream at one image's positions, taken from the same prompt
over another image, and what that does to a generated token's probability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from causal.edits import RowEdit
from causal.knockout import forward_outcomes, layer_range, relative
from causal.positions import box_positions, cell_positions, image_positions
from errors import InputError
from families import decoder_layers
from records import AttentionRun
from utils import load_image


@dataclass(frozen=True)
class Patch:
    """Generated token `step_idx` (`token`) with the residual stream after `layers` (decoder layer indices)
    at `positions` (0-based sequence positions) taken from the other image's forward.

    p_before: the token's probability (0..1) in the run's own replay; p_other: with the other image, no
    patch; p_after: the run's replay, patched; relative_change: (p_after − p_before) / p_before;
    toward_other: how far the patch moved p toward the other image's, (p_after − p_before) /
    (p_other − p_before): 0 = not at all, 1 = all the way (NaN when the two images agree, to within
    AGREE of the larger probability: a share of a near-zero gap would be noise);
    top_before / top_after: the five likeliest tokens as (text, probability); patched: in words."""

    step_idx: int
    token: str
    p_before: float
    p_other: float
    p_after: float
    relative_change: float
    toward_other: float  # (p_after − p_before) / (p_other − p_before): the share of the other image's effect
    top_before: list[tuple[str, float]]
    top_after: list[tuple[str, float]]
    patched: str
    positions: tuple[int, ...]
    layers: tuple[int, ...]


AGREE = 0.02  # relative gap under which the run's and the other image's probabilities count as equal


def _share_of_the_way(p_before: float, p_other: float, p_after: float) -> float:
    """(p_after − p_before) / (p_other − p_before), or NaN when the gap is within AGREE (or 1e-4)."""
    gap = p_other - p_before
    if abs(gap) <= max(1e-4, AGREE * max(p_before, p_other)):
        return float("nan")
    return (p_after - p_before) / gap


def _image_slots(holder, run: AttentionRun, image_idx: int) -> np.ndarray:
    """(n,) the positions of image `image_idx`'s tokens: its cells and the slots among them."""
    cells = cell_positions(run, image_idx)
    every = image_positions(holder, run)
    return every[(every >= cells.min()) & (every <= cells.max())]


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # (B, S, hidden)


def _keep(saved: dict, layer_idx: int, index: torch.Tensor):
    def hook(module, args, output):
        hidden = _hidden(output)  # (B, S, hidden)
        saved[layer_idx] = hidden[:, index.to(hidden.device)].clone()  # (B, n, hidden)

    return hook


def _put(saved: dict, layer_idx: int, index: torch.Tensor):
    def hook(module, args, output):
        hidden = _hidden(output)  # (B, S, hidden)
        hidden[:, index.to(hidden.device)] = saved[layer_idx].to(hidden.device, hidden.dtype)
        return output

    return hook


def patch(
    holder,
    run: AttentionRun,
    other_image,
    layers=None,
    positions: str | Sequence[int] | tuple = "image",
    step_idx: int = 0,
    image_idx: int = 0,
) -> Patch:
    """Patch the residual stream (each decoder layer's output) in the inclusive range `layers` (default
    all) at `positions`: 'image' (image `image_idx`'s tokens), a box (x0, y0, x1, y1) in original-image
    pixels (a tuple), or a list of positions, with the values of the same replay over `other_image` (a path
    or a PIL image in place of image `image_idx`, of the same size: its tokens must sit at the same places,
    and a different size or token layout is refused). For a causal decoder, patching the image positions
    after layer lo already fixes them in every later layer, so a range acts as its first layer; patch one
    layer at a time to localise. Three forwards."""
    other = load_image(other_image)
    images = list(run.images)
    if not images:
        raise InputError("Patching replays the run's image, and this run has none. Generate from an image first.")
    if not 0 <= image_idx < len(images):
        raise InputError(f"image_idx must be in 0..{len(images) - 1}: this run has {len(images)} image(s).")
    own_size = images[image_idx].size
    if other.size != own_size:
        raise InputError(
            f"The other image is {other.size[0]}×{other.size[1]}; patching needs the run's image size, "
            f"{own_size[0]}×{own_size[1]}, so that its tokens sit at the same places. Resize it and try again."
        )
    images[image_idx] = other
    own = holder.replay_inputs(run, step_idx)
    theirs = holder.replay_inputs(run, step_idx, images)
    slots = _image_slots(holder, run, image_idx)
    layout_keys = [key for key in own if torch.is_tensor(own[key]) and not key.startswith("pixel_values")]
    if any(not torch.equal(own[key], theirs[key]) for key in layout_keys):  # ids, grids, sizes, token types
        raise InputError(
            "The other image gives a different token layout than this run's image (another grid or token "
            "count), so its tokens would not sit at the same places. Use an image of the same size and shape."
        )
    seq_len = own["input_ids"].shape[1]
    if isinstance(positions, str):
        if positions != "image":
            raise InputError(f"positions is 'image', a box (x0, y0, x1, y1) or a list of positions, not {positions!r}.")
        chosen, where = slots, f"image {image_idx}'s {len(slots)} tokens"
    elif isinstance(positions, tuple) and len(positions) == 4:
        chosen = box_positions(run, positions, image_idx)
        where = f"the box's {len(chosen)} image tokens"
    else:
        try:
            chosen = np.unique(np.asarray([int(p) for p in positions], dtype=np.int64))
        except (TypeError, ValueError):
            raise InputError(f"positions must be whole numbers in 0..{seq_len - 1}, got {positions!r}.") from None
        if not len(chosen) or chosen.min() < 0 or chosen.max() >= seq_len:
            raise InputError(f"positions must be whole numbers in 0..{seq_len - 1} (the replay), got {positions!r}.")
        where = f"{len(chosen)} positions"
    lo, hi = layer_range(holder, layers)
    index = torch.from_numpy(chosen)
    saved: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(holder.model)
    keep = [(blocks[idx], _keep(saved, idx, index)) for idx in range(lo, hi + 1)]
    put = [(blocks[idx], _put(saved, idx, index)) for idx in range(lo, hi + 1)]
    (before,) = forward_outcomes(holder, run, step_idx, [RowEdit()], inputs=own)
    (other_out,) = forward_outcomes(holder, run, step_idx, [RowEdit()], hooks=keep, inputs=theirs)
    (after,) = forward_outcomes(holder, run, step_idx, [RowEdit()], hooks=put, inputs=own)
    span = f"layer {lo}" if lo == hi else f"layers {lo}–{hi}"
    return Patch(
        step_idx=step_idx,
        token=run.generated_tokens[step_idx],
        p_before=before.p_token,
        p_other=other_out.p_token,
        p_after=after.p_token,
        relative_change=relative(after.p_token, before.p_token),
        toward_other=_share_of_the_way(before.p_token, other_out.p_token, after.p_token),
        top_before=before.top,
        top_after=after.top,
        patched=f"the residual stream after {span} at {where}, from the other image",
        positions=tuple(int(p) for p in chosen),
        layers=tuple(range(lo, hi + 1)),
    )
