"""InternVL (the transformers-native checkpoints): the image squashed onto a canvas of square tiles
whose rows × columns best match its aspect ratio (between `min_patches` and `max_patches` tiles),
each tile's patches pixel-shuffled to side × side tokens; when there are several tiles a thumbnail
of the whole image follows them. Tokens come tile by tile, each tile row-major.

Two views: the tiles stitched into one grid over the whole image (the main view), and the thumbnail.
A video's frames are each squashed to one tile (`<img>` per frame): one layout, one grid per frame.
"""

from __future__ import annotations

import numpy as np
from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

from errors import InputError
from families.base import FamilySpec, check_count, split_per_input, token_positions, whole_box
from records import VisionLayout

SPECS = (FamilySpec("internvl", "InternVL", video=True, tiled=True),)


def _tiling(processor) -> dict:
    """The tiling options a processor call uses: the image processor's own, overridden (as transformers
    merges them) by the processor class's defaults, which turn `crop_to_patches` on for InternVL."""
    image_processor = processor.image_processor
    options = {key: getattr(image_processor, key, None) for key in ("crop_to_patches", "min_patches", "max_patches")}
    options.update(
        {key: value for key, value in getattr(type(processor), "images_kwargs", {}).items() if key in options}
    )
    return options


def _canvas(processor, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of `image_hw`, as the processor chooses them."""
    options = _tiling(processor)
    if not options["crop_to_patches"]:
        return 1, 1
    size = processor.image_processor.size
    tile_hw = (int(size["height"]), int(size["width"]))
    cols, rows = get_optimal_tiled_canvas(
        image_hw, tile_hw, int(options["min_patches"] or 1), int(options["max_patches"] or 12)
    )
    return rows, cols


def token_cell_px(config) -> int:
    """Processed pixels per token side: the patch over the pixel-shuffle's downsample ratio."""
    return int(round(int(config.vision_config.patch_size) / float(config.downsample_ratio)))


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    per_tile = int(processor.image_seq_length)  # tokens per tile after pixel shuffle
    side = int(round(per_tile**0.5))
    if video:  # each frame one tile, no thumbnail
        frames = len(positions) // per_tile
        check_count(len(positions), [frames * per_tile], token_id, len(image_sizes), "video")
        processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
        return [
            VisionLayout(
                positions, (side, side), tuple(image_sizes[0]), whole_box(image_sizes[0]), processed_hw, frames
            )
        ]
    tile_px = int(processor.image_processor.size["height"])
    canvases = [_canvas(processor, (height, width)) for width, height in image_sizes]
    tiles = [rows * cols + (1 if rows * cols > 1 else 0) for rows, cols in canvases]  # + thumbnail
    if sum(tiles) != int(inputs["pixel_values"].shape[0]):
        raise InputError(
            f"The processor made {int(inputs['pixel_values'].shape[0])} tiles for {len(image_sizes)} "
            f"image(s), but its tiling settings give {sum(tiles)}. Use the processor's own settings."
        )
    owns = split_per_input(positions, [per_tile * n for n in tiles], token_id, len(image_sizes))
    result = []
    for index, ((rows, cols), size, count, own) in enumerate(zip(canvases, image_sizes, tiles, owns, strict=True)):
        grid = own[: rows * cols * per_tile].reshape(rows, cols, side, side)  # (tile row, tile col, y, x)
        stitched = np.ascontiguousarray(grid.transpose(0, 2, 1, 3)).reshape(-1)  # (rows*side * cols*side,)
        view = "tiles" if count > 1 else ""
        result.append(
            VisionLayout(
                stitched,
                (rows * side, cols * side),
                tuple(size),
                whole_box(size),
                (rows * tile_px, cols * tile_px),
                image_index=index,
                view=view,
            )
        )
        if count > 1:
            result.append(
                VisionLayout(
                    own[rows * cols * per_tile :],
                    (side, side),
                    tuple(size),
                    whole_box(size),
                    (tile_px, tile_px),
                    image_index=index,
                    view="thumbnail",
                )
            )
    return result
