"""Activation patching: the decoder's residual stream at one image's positions, taken from the same prompt
over another image, and what that does to a generated token's probability."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from causal.edits import RowEdit
from causal.knockout import box_positions, forward_outcomes, image_positions, relative
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
    top_before / top_after: the five likeliest tokens as (text, probability); patched: in words."""

    step_idx: int
    token: str
    p_before: float
    p_other: float
    p_after: float
    relative_change: float
    top_before: list[tuple[str, float]]
    top_after: list[tuple[str, float]]
    patched: str
    positions: tuple[int, ...]
    layers: tuple[int, ...]


def _image_slots(holder, run: AttentionRun, image_idx: int) -> np.ndarray:
    """(n,) the positions of image `image_idx`'s tokens: its cells and the slots among them."""
    cells = np.concatenate([layout.token_positions for layout in run.visions if layout.image_index == image_idx])
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
    pixels, or a list of positions, with the values of the same replay over `other_image` (a path or a
    PIL image in place of image `image_idx`). The other image must give the same tokens at the same
    positions, so it is refused, with both counts, when its token count differs. Three forwards."""
    other = load_image(other_image)
    settings = run.settings
    images = list(run.images)
    if not images:
        raise InputError("Patching replays the run's image, and this run has none. Generate from an image first.")
    images[image_idx] = other
    own = holder.replay_inputs(run, step_idx)
    theirs = holder.teacher_forced_inputs(
        images, settings.prompt, run.generated_ids[:step_idx], settings.min_pixels, settings.max_pixels
    )
    slots = _image_slots(holder, run, image_idx)
    if not torch.equal(theirs["input_ids"], own["input_ids"]):
        image_id = int(own["input_ids"][0, slots[0]])
        counts = [int((inputs["input_ids"] == image_id).sum()) for inputs in (theirs, own)]
        raise InputError(
            f"The other image gives {counts[0]} image tokens where this run's images give {counts[1]}; patching "
            f"needs the same tokens at the same places. Resize it to {run.images[image_idx].size[0]}×"
            f"{run.images[image_idx].size[1]}, the run's image size, and try again."
        )
    if isinstance(positions, str):
        if positions != "image":
            raise InputError(f"positions is 'image', a box (x0, y0, x1, y1) or a list of positions, not {positions!r}.")
        chosen, where = slots, f"image {image_idx}'s {len(slots)} tokens"
    elif isinstance(positions, tuple) and len(positions) == 4:
        chosen = box_positions(run, positions, image_idx)
        where = f"the box's {len(chosen)} image tokens"
    else:
        chosen, where = np.asarray(list(positions), dtype=np.int64), f"{len(positions)} positions"
    num_layers = len(decoder_layers(holder.model))
    lo, hi = (0, num_layers - 1) if layers is None else (int(layers[0]), int(layers[1]))
    if not 0 <= lo <= hi < num_layers:
        raise InputError(f"layers must be an inclusive range inside 0..{num_layers - 1}, got {layers}.")
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
        top_before=before.top,
        top_after=after.top,
        patched=f"the residual stream after {span} at {where}, from the other image",
        positions=tuple(int(p) for p in chosen),
        layers=tuple(range(lo, hi + 1)),
    )
