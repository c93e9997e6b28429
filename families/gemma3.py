"""Gemma 3: every image squashed to the vision tower's square, its patches average-pooled to
`mm_tokens_per_image` tokens (a square grid) over the whole image. With pan-and-scan on, an image
that is wide (or tall) enough is also cut into 2 to `pan_and_scan_max_num_crops` crops along its
longer side; each crop is squashed to the square and pooled the same way, after the whole image.
Image tokens attend to each other bidirectionally and most layers slide over a window of keys; the
capture applies the model's own mask, so the maps need nothing more here.

Views: the whole image (the main view, "global view" when there are crops), then "crop 1", "crop 2", …
"""

from __future__ import annotations

import math

import numpy as np
import torch

from errors import InputError
from families.base import FamilySpec, no_video, split_per_input, token_positions, whole_box
from records import VisionLayout

SPECS = (FamilySpec("gemma3", "Gemma 3", tiled=True),)

PAN_AND_SCAN_KEYS = (
    "do_pan_and_scan",
    "pan_and_scan_min_crop_size",
    "pan_and_scan_max_num_crops",
    "pan_and_scan_min_ratio_to_activate",
)


def processor_options(processor) -> dict:
    """The pan-and-scan settings of the image processor (its saved config, or set on it), passed to
    every processor call: Gemma3Processor's own defaults (pan-and-scan off) would override them."""
    image_processor = processor.image_processor
    return {
        key: getattr(image_processor, key)
        for key in PAN_AND_SCAN_KEYS
        if getattr(image_processor, key, None) is not None
    }


def _num_crops(processor, size: tuple[int, int]) -> int:
    """How many pan-and-scan crops the processor cuts from a (W, H) image (0 when it is off)."""
    options = {**getattr(type(processor), "images_kwargs", {}), **processor_options(processor)}
    if not options.get("do_pan_and_scan"):
        return 0
    width, height = size
    crops = processor.image_processor.pan_and_scan_batched(
        torch.empty(1, 1, height, width),
        options["pan_and_scan_min_crop_size"],
        options["pan_and_scan_max_num_crops"],
        options["pan_and_scan_min_ratio_to_activate"],
    )
    return len(crops)


def placeholder_tokens(processor, image_sizes, size=None) -> list[int]:
    """Per (W, H) image: the tokens of its expanded image sequence (boi, soft tokens, eoi and the blank
    lines around them), once for the image and once per pan-and-scan crop."""
    per_view = len(processor.tokenizer(processor.full_image_sequence, add_special_tokens=False)["input_ids"])
    return [per_view * (1 + _num_crops(processor, tuple(wh))) for wh in image_sizes]


def crop_boxes(size: tuple[int, int], count: int) -> list[tuple[float, float, float, float]]:
    """The pan-and-scan crops of a (W, H) image in original pixels: `count` equal slices along the
    longer side (the last one clipped to the image), left to right or top to bottom."""
    width, height = size
    if width >= height:
        step = math.ceil(width / count)
        return [(float(i * step), 0.0, float(min((i + 1) * step, width)), float(height)) for i in range(count)]
    step = math.ceil(height / count)
    return [(0.0, float(i * step), float(width), float(min((i + 1) * step, height))) for i in range(count)]


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    no_video(family, video)
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    side = int(round(int(config.mm_tokens_per_image) ** 0.5))  # pooled tokens per side
    processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
    count = side * side
    blocks = int(inputs["pixel_values"].shape[0])  # whole images and crops
    crops = [_num_crops(processor, size) for size in image_sizes]
    if len(image_sizes) == 1:
        crops = [blocks - 1]  # exact whatever the call's options
    if sum(crops) + len(image_sizes) != blocks:
        raise InputError(
            f"The processor made {blocks} image views for {len(image_sizes)} image(s), but the "
            f"pan-and-scan settings give {sum(crops) + len(image_sizes)}. Use the processor's own "
            "pan-and-scan settings, or turn do_pan_and_scan off."
        )
    owns = split_per_input(positions, [count * (1 + n) for n in crops], token_id, len(image_sizes))
    result = []
    for index, (size, n, own) in enumerate(zip(image_sizes, crops, owns, strict=True)):
        boxes = [whole_box(size), *crop_boxes(size, n)] if n else [whole_box(size)]
        names = ["global view", *(f"crop {k + 1}" for k in range(n))] if n else [""]
        result += [
            VisionLayout(block, (side, side), tuple(size), box, processed_hw, image_index=index, view=name)
            for block, box, name in zip(np.split(own, 1 + n), boxes, names, strict=True)
        ]
    return result


def token_cell_px(config) -> int:
    """Processed pixels per token side: the square input over its pooled tokens per side."""
    return int(config.vision_config.image_size) // int(round(int(config.mm_tokens_per_image) ** 0.5))
