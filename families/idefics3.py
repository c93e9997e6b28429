"""Idefics3 and SmolVLM: a large image is resized to multiples of the tile size and cut into
rows × columns of square tiles, each pixel-shuffled to side × side tokens, and followed by a global
image (the whole image squashed to one tile); a small image is the global image alone. In the prompt
each tile's tokens follow a `<row_i_col_j>` marker and the global image's a `<global-img>` marker;
the markers and the row breaks between them are not cells.

Two views: the tiles stitched into one grid over the whole image (the main view), and the global image.
SmolVLM also takes a video: each frame squashed to one global image, with its timestamp in the prompt.
"""

from __future__ import annotations

import re

import numpy as np

from families.base import FamilySpec, check_count, no_video, token_positions, whole_box
from records import VisionLayout

SPECS = (FamilySpec("idefics3", "Idefics3", tiled=True), FamilySpec("smolvlm", "SmolVLM", video=True, tiled=True))

MARKER = re.compile(r"<row_(\d+)_col_(\d+)>")


def _runs(positions: np.ndarray) -> list[np.ndarray]:
    """The unbroken runs of consecutive positions (one per tile or global image)."""
    breaks = np.nonzero(np.diff(positions) != 1)[0] + 1
    return np.split(positions, breaks) if len(positions) else []


def token_cell_px(config) -> int:
    """Processed pixels per token side: the patch times the pixel-shuffle scale factor."""
    return int(config.vision_config.patch_size) * int(config.scale_factor)


def placeholder_tokens(processor, image_sizes, size=None) -> list[int]:
    """Per (W, H) image: its tiles', markers' and global image's tokens, by Idefics3's rule (which SmolVLM
    shares, though its processor does not say so)."""
    from transformers import Idefics3Processor

    count = getattr(type(processor), "_get_num_multimodal_tokens", Idefics3Processor._get_num_multimodal_tokens)
    found = count(processor, image_sizes=[(height, width) for width, height in image_sizes])
    return [int(n) for n in found["num_image_tokens"]]


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    if video and family != "smolvlm":
        no_video(family, video)
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    per_tile = int(processor.image_seq_len)
    side = int(round(per_tile**0.5))
    if video:  # SmolVLM: each frame one global image
        frames = len(positions) // per_tile
        check_count(len(positions), [frames * per_tile], token_id, 1, "video")
        processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
        return [
            VisionLayout(
                positions, (side, side), tuple(image_sizes[0]), whole_box(image_sizes[0]), processed_hw, frames
            )
        ]
    tile_px = int(processor.image_processor.max_image_size["longest_edge"])
    ids = inputs["input_ids"][0].tolist()
    images, tiles, end = [], {}, 0
    chunks = [chunk for whole in _runs(positions) for chunk in np.split(whole, range(per_tile, len(whole), per_tile))]
    for run in chunks:
        gap = processor.tokenizer.decode(ids[end : int(run[0])])  # the markers before this run
        end = int(run[-1]) + 1
        found = MARKER.findall(gap)
        if found:
            row, col = (int(v) - 1 for v in found[-1])
            tiles[(row, col)] = run
        else:  # the global image ends an image
            images.append((tiles, run))
            tiles = {}
    counts = [per_tile * (len(t) + 1) for t, _ in images]
    check_count(len(positions) if not tiles else -1, counts, token_id, len(image_sizes))
    result = []
    for index, ((tiles, global_run), size) in enumerate(zip(images, image_sizes, strict=True)):
        if tiles:
            rows, cols = max(r for r, _ in tiles) + 1, max(c for _, c in tiles) + 1
            grid = np.stack(
                [np.stack([tiles[(r, c)].reshape(side, side) for c in range(cols)]) for r in range(rows)]
            )  # (rows, cols, side, side)
            stitched = np.ascontiguousarray(grid.transpose(0, 2, 1, 3)).reshape(-1)
            result.append(
                VisionLayout(
                    stitched,
                    (rows * side, cols * side),
                    tuple(size),
                    whole_box(size),
                    (rows * tile_px, cols * tile_px),
                    image_index=index,
                    view="tiles",
                )
            )
        result.append(
            VisionLayout(
                global_run,
                (side, side),
                tuple(size),
                whole_box(size),
                (tile_px, tile_px),
                image_index=index,
                view="global view" if tiles else "",
            )
        )
    return result
