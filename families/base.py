"""What every family adapter shares: the spec it declares its facts in, finding the vision tokens and
checking their count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from errors import InputError
from utils import scale_box


@dataclass(frozen=True)
class FamilySpec:
    """One model type's facts, declared as data by its adapter module (its `SPECS`).

    model_type: `config.model_type`; name: what the app and messages call it.
    video: its processor takes a video and the adapter maps it.
    grid_thw: the geometry comes from `image_grid_thw` (Qwen, GLM), which also takes a min/max pixel budget.
    tiled: an image may become several views (tiles, a global view, crops).
    vit_map: the ViT-combined map knows its vision tower (its merge, prefix tokens and feature block).
    vision_prefix_tokens: tokens the vision encoder's sequence holds before its patches (CLIP's CLS).
    prefix_lm: the prompt is one bidirectional prefix (`token_type_ids` 0), generated tokens a causal suffix.
    eager_text: its decoder loads with eager attention (soft-capping, which SDPA cannot do).
    transformers: the transformers versions this family works with inside the project's range
        (`families.TRANSFORMERS`), as a PEP 440 specifier such as "!=5.24.0" or "<5.30"; empty for all.
    """

    model_type: str
    name: str
    video: bool = False
    grid_thw: bool = False
    tiled: bool = False
    vit_map: bool = False
    vision_prefix_tokens: int = 0
    prefix_lm: bool = False
    eager_text: bool = False
    transformers: str = ""


def token_positions(inputs, token_id: int) -> np.ndarray:
    """(n,) int64: sequence positions of `token_id` in the inputs' one prompt (batch of 1)."""
    return torch.nonzero(inputs["input_ids"][0] == token_id).flatten().cpu().numpy().astype(np.int64)


def whole_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The box of a whole (W, H) image: a grid resized over it with no crop and no padding."""
    return 0.0, 0.0, float(size[0]), float(size[1])


def check_count(found: int, needed: list[int], token_id: int, num_inputs: int, what: str = "image") -> None:
    """Refuse a prompt whose vision tokens do not match the grids worked out from the processor
    (`needed`: the token count of each input's grids; one entry per image, or per video)."""
    if len(needed) != num_inputs or found != sum(needed):
        raise InputError(
            f"Found {found} {what} tokens (id {token_id}) in the prompt for {num_inputs} {what}(s), but their "
            f"grids need {' + '.join(map(str, needed)) or 0}. Give one {what} entry in the prompt per input and "
            "use the processor that belongs to this checkpoint."
        )


def split_per_input(
    positions: np.ndarray, needed: list[int], token_id: int, num_inputs: int, what: str = "image"
) -> list[np.ndarray]:
    """The vision positions cut into each input's own run, in prompt order, after `check_count`."""
    check_count(len(positions), needed, token_id, num_inputs, what)
    return np.split(positions, np.cumsum(needed)[:-1])


def no_video(family: str, video: bool) -> None:
    """Refuse a video for a family whose adapter maps images only (the families that take video say so in
    their spec, and the app offers video only for those)."""
    if video:
        raise InputError(f"This tool maps images, not video, for {family}; give images instead.")


def resized_box(box, from_size: tuple[float, float], to_size: tuple[float, float]) -> tuple[float, float, float, float]:
    """A box in the pixels of an image of `from_size` (W, H), in the pixels of the same image at `to_size`."""
    return scale_box(box, to_size[0] / from_size[0], to_size[1] / from_size[1])
