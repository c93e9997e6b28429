"""LLaVA-NeXT (1.6) and LLaVA-OneVision: each image is seen twice.

- The **global view**: the whole image squashed to the tower's square (padded to a square first for
  OneVision's images in a several-image prompt), one token per patch.
- The **tiles**: the image resized at its own aspect into the best resolution of
  `image_grid_pinpoints`, centred with padding, cut into tower-sized tiles whose patch grids are
  stitched into one grid; the rows and columns that are only padding are dropped ("un-padding"), and
  OneVision shrinks the stitched grid bilinearly when it holds more than `anyres_max_N` tiles' worth.
  After each row of the stitched grid sits one learned `image_newline` token, which is not a cell.

In the prompt the global view comes first, then the tiles row by row. The tiles are the main view.
OneVision also takes a video: each frame squashed and pooled to half its patch grid (`video_layout`).
"""

from __future__ import annotations

import math

import numpy as np
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension

from errors import InputError
from families.base import FamilySpec, check_count, no_video, resized_box, split_per_input, token_positions, whole_box
from records import VisionLayout

SPECS = (
    FamilySpec("llava_next", "LLaVA-NeXT", tiled=True),
    FamilySpec("llava_onevision", "LLaVA-OneVision", video=True, tiled=True),
)


def video_layout(config, inputs, frame_size: tuple[int, int]) -> VisionLayout:
    """LLaVA-OneVision's video: every frame squashed to the tower's square, its patch grid pooled
    bilinearly to half (rounded up) per side, frames in order, then one `image_newline` (not a cell)."""
    token_id = config.video_token_id
    positions = token_positions(inputs, token_id)
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    pooled = math.ceil(side / 2)
    frames = int(inputs["pixel_values_videos"].shape[1])
    check_count(len(positions), [frames * pooled * pooled + 1], token_id, 1, "video")
    processed_hw = tuple(int(v) for v in inputs["pixel_values_videos"].shape[-2:])
    return VisionLayout(
        positions[:-1], (pooled, pooled), tuple(frame_size), whole_box(frame_size), processed_hw, frames
    )


def token_cell_px(config) -> int:
    """Processed pixels per token side: the vision tower's patch (no merge)."""
    return int(config.vision_config.patch_size)


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    if video and family == "llava_onevision":
        return [video_layout(config, inputs, image_sizes[0])]
    no_video(family, video)
    if config.vision_feature_select_strategy != "default" and family == "llava_next":
        raise InputError(
            "This LLaVA-NeXT checkpoint keeps the vision tower's CLS token "
            "(vision_feature_select_strategy 'full'), which has no place on the image; "
            "use a checkpoint with the 'default' strategy."
        )
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)  # patches per tile side
    # OneVision tiles an image only when it is alone in its sample (the processor's batch_num_images).
    per_sample = inputs.get("batch_num_images") if family == "llava_onevision" else None
    tiled = [True] * len(image_sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(n)]
    plans = [
        _plan(config, side, (int(h), int(w)), tile) for (h, w), tile in zip(inputs["image_sizes"], tiled, strict=True)
    ]
    # A tiled image adds a newline per stitched row (none when un-padding left no row); an untiled one adds one.
    needed = [side * side + (gh * (gw + 1) if tile else 1) for (gh, gw, _), tile in zip(plans, tiled, strict=True)]
    owns = split_per_input(positions, needed, token_id, len(image_sizes))  # each image's tokens, prompt order
    result = []
    tower_px = int(config.vision_config.image_size)
    for index, ((grid_h, grid_w, box), size, own, (proc_h, proc_w)) in enumerate(
        zip(plans, image_sizes, owns, inputs["image_sizes"].tolist(), strict=True)
    ):
        base_box = whole_box((proc_w, proc_h)) if tiled[index] else _square_box((proc_w, proc_h))
        global_view = VisionLayout(
            own[: side * side],
            (side, side),
            tuple(size),
            resized_box(base_box, (proc_w, proc_h), size),
            (tower_px, tower_px),
            image_index=index,
            view="global view",
        )
        if grid_h and grid_w:  # an extreme aspect ratio can leave no tile cell after un-padding
            rows = own[side * side :].reshape(grid_h, grid_w + 1)  # (grid_h, grid_w + 1): cells, newline
            tiles = VisionLayout(
                np.ascontiguousarray(rows[:, :grid_w]).ravel(),
                (grid_h, grid_w),
                tuple(size),
                resized_box(box, (proc_w, proc_h), size),
                _best(config, (proc_h, proc_w)),
                image_index=index,
                view="tiles",
            )
            result += [tiles, global_view]
        else:
            result.append(global_view)
    return result


def _best(config, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the pinpoint resolution the processor picks for an image of `image_hw`."""
    return tuple(int(v) for v in select_best_resolution(image_hw, config.image_grid_pinpoints))


def _plan(config, side: int, image_hw: tuple[int, int], tiled: bool) -> tuple[int, int, tuple]:
    """(grid_h, grid_w, box) of the stitched tiles after un-padding (and OneVision's shrinking), the box
    in the pixels of the image as the processor received it; (0, 0, None) when the image is not tiled."""
    if not tiled:
        return 0, 0, None
    height, width = image_hw
    best_h, best_w = _best(config, image_hw)
    rows, cols = best_h // int(config.vision_config.image_size), best_w // int(config.vision_config.image_size)
    full_h, full_w = rows * side, cols * side  # stitched patch grid before un-padding
    # Where the resized image sits inside the padded best resolution (the processor centres it).
    new_h, new_w = get_patch_output_size(np.zeros((height, width, 1)), (best_h, best_w), ChannelDimension.LAST)
    paste_x, paste_y = (best_w - new_w) // 2, (best_h - new_h) // 2
    # The model's un-padding, in grid cells (transformers' unpad_image).
    top = left = 0
    if width / height > full_w / full_h:
        top = (full_h - int(round(height * (full_w / width), 7))) // 2
    else:
        left = (full_w - int(round(width * (full_h / height), 7))) // 2
    grid_h, grid_w = full_h - 2 * top, full_w - 2 * left
    cell_y, cell_x = best_h / full_h, best_w / full_w  # processed px per cell
    box = (
        (left * cell_x - paste_x) * width / new_w,
        (top * cell_y - paste_y) * height / new_h,
        ((full_w - left) * cell_x - paste_x) * width / new_w,
        ((full_h - top) * cell_y - paste_y) * height / new_h,
    )
    limit = getattr(config, "vision_aspect_ratio", None)
    if config.model_type == "llava_onevision" and limit:  # "anyres_max_9": shrink past 9 tiles
        ratio = math.sqrt(grid_h * grid_w / (int(limit.removeprefix("anyres_max_")) * side**2))
        if ratio > 1.1:
            grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
    return grid_h, grid_w, box


def _square_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The padded square around a (W, H) image, centred as OneVision's pad_to_square does."""
    width, height = size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    return float(-left), float(-top), float(side - left), float(side - top)
