"""Gemma 3: every image squashed to the vision tower's square, its patches average-pooled to
`mm_tokens_per_image` tokens (a square grid) over the whole image. Pan-and-scan crops are refused.
Image tokens attend to each other bidirectionally and most layers slide over a window of keys; the
capture applies the model's own mask, so the maps need nothing more here."""

from __future__ import annotations

import torch

from families.base import check_count, no_video, token_positions, whole_box
from records import VisionLayout


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    no_video(family, video)
    if int(inputs.get("num_crops", torch.zeros(1)).sum()) > 0:
        raise ValueError("Pan-and-scan crops are not mapped yet: turn do_pan_and_scan off in the processor "
                         "(the default) so each image is one square view.")
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    side = int(round(int(config.mm_tokens_per_image) ** 0.5))          # pooled tokens per side
    processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
    count = side * side
    check_count(len(positions), [count] * len(image_sizes), token_id, len(image_sizes))
    return [VisionLayout(positions[i * count:(i + 1) * count], (side, side), tuple(size), whole_box(size),
                         processed_hw, image_index=i) for i, size in enumerate(image_sizes)]


def token_cell_px(config) -> int:
    """Processed pixels per token side: the square input over its pooled tokens per side."""
    return int(config.vision_config.image_size) // int(round(int(config.mm_tokens_per_image) ** 0.5))
