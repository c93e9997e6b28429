"""Pixtral geometry (Mistral 3, and LLaVA checkpoints with a Pixtral vision tower): the image resized
whole at its own aspect, one token per (merged) patch, each row of tokens ended by an [IMG_BREAK]
token that is not a cell."""

from __future__ import annotations

from errors import InputError
from families.base import FamilySpec, no_video, split_per_input, token_positions, whole_box
from records import VisionLayout

SPECS = (FamilySpec("mistral3", "Mistral 3"),)


def token_cell_px(config) -> int:
    """Processed pixels per token side: the patch times the merge (Mistral 3: config.spatial_merge_size)."""
    merge = getattr(config.vision_config, "spatial_merge_size", None) or getattr(config, "spatial_merge_size", 1) or 1
    return int(config.vision_config.patch_size) * int(merge)


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    no_video(family, video)
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    unit = token_cell_px(config)
    grids = [((int(h) // unit, int(w) // unit), (int(h), int(w))) for h, w in inputs["image_sizes"]]
    if family == "mistral3" and any(grid_hw == (1, 1) for grid_hw, _ in grids):
        raise InputError(
            f"This image becomes a single vision token for Mistral 3, which its patch merger cannot "
            f"take; use an image at least {unit + 1} px wide or tall."
        )
    needed = [gh * gw for (gh, gw), _ in grids]
    owns = split_per_input(positions, needed, token_id, len(image_sizes))
    return [
        VisionLayout(own, grid_hw, tuple(size), whole_box(size), processed_hw, image_index=index)
        for index, ((grid_hw, processed_hw), size, own) in enumerate(zip(grids, image_sizes, owns, strict=True))
    ]
