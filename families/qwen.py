"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and GLM-4.1V: one grid per image from `image_grid_thw`
and the merge size, spread over the whole image (resized to multiples of the merged patch, no crop
and no padding). Image token j is the merged block (j // grid_w, j % grid_w). A video: one grid per
time step of `temporal_patch_size` (2) frames, from `video_grid_thw`."""

from __future__ import annotations

from families.base import FamilySpec, split_per_input, token_positions, whole_box
from records import VisionLayout

SPECS = (
    FamilySpec("qwen2_vl", "Qwen2-VL", video=True, grid_thw=True, vit_map=True),
    FamilySpec("qwen2_5_vl", "Qwen2.5-VL", video=True, grid_thw=True, vit_map=True),
    FamilySpec("qwen3_vl", "Qwen3-VL", video=True, grid_thw=True, vit_map=True),
    FamilySpec("qwen3_5", "Qwen3.5", video=True, grid_thw=True, vit_map=True),
    FamilySpec("glm4v", "GLM-4.1V", video=True, grid_thw=True, vit_map=True),
)


def token_cell_px(config) -> int:
    """Processed pixels per token side: the patch times vision_config.spatial_merge_size."""
    return int(config.vision_config.patch_size) * int(config.vision_config.spatial_merge_size)


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    # GLM-4.1V writes a video's time steps with image tokens, each between its own image markers.
    token_id = config.video_token_id if video and family != "glm4v" else config.image_token_id
    positions = token_positions(inputs, token_id)
    grids = [_grid(config, thw, video) for thw in inputs["video_grid_thw" if video else "image_grid_thw"]]
    needed = [frames * gh * gw for frames, (gh, gw), _ in grids]
    owns = split_per_input(positions, needed, token_id, len(image_sizes), "video" if video else "image")
    return [
        VisionLayout(own, grid_hw, tuple(size), whole_box(size), processed_hw, frames, image_index=index)
        for index, ((frames, grid_hw, processed_hw), size, own) in enumerate(zip(grids, image_sizes, owns, strict=True))
    ]


def _grid(config, thw, video: bool) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(frames, (grid_h, grid_w), processed (H, W)) from one image_grid_thw / video_grid_thw row."""
    t, h, w = (int(v) for v in thw)  # in patches
    merge = int(config.vision_config.spatial_merge_size)
    patch = int(config.vision_config.patch_size)
    if t != 1 and not video:
        raise ValueError(f"Expected a still image (t=1), got image_grid_thw t={t}.")
    return t, (h // merge, w // merge), (h * patch, w * patch)
