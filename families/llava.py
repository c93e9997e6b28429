"""LLaVA-1.5 (a CLIP tower, llava-hf processor): the shortest edge resized, then a centre crop (or,
with do_pad, a pad to square first), one token per patch of a fixed square grid. The part of the
image outside the crop was never shown to the model."""

from __future__ import annotations

from families.base import FamilySpec, check_count, no_video, token_positions
from records import VisionLayout

SPECS = (FamilySpec("llava", "LLaVA-1.5", vit_map=True, vision_prefix_tokens=1),)


def token_cell_px(config) -> int:
    """Processed pixels per token side: CLIP's patch (no merge)."""
    return int(config.vision_config.patch_size)


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    no_video(family, video)
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    patch = int(config.vision_config.patch_size)
    processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
    grid_hw = (processed_hw[0] // patch, processed_hw[1] // patch)
    # "full" keeps CLIP's CLS embedding as the first image token; it has no cell on the grid.
    extra = 1 if config.vision_feature_select_strategy == "full" else 0
    count = grid_hw[0] * grid_hw[1] + extra
    check_count(len(positions), [count] * len(image_sizes), token_id, len(image_sizes))
    return [
        VisionLayout(
            positions[i * count + extra : (i + 1) * count],
            grid_hw,
            tuple(size),
            llava_box_xyxy(processor.image_processor, size),
            processed_hw,
            image_index=i,
        )
        for i, size in enumerate(image_sizes)
    ]


def _size_value(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def llava_box_xyxy(image_processor, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The region of the original image that LLaVA-1.5's processor keeps, in original pixels.

    Mirrors the processor: optional pad to square, resize the shortest edge, centre crop.
    """
    width, height = image_size
    pad_x = pad_y = 0
    if getattr(image_processor, "do_pad", False):
        side = max(width, height)
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        width = height = side
    new_w, new_h = width, height
    shortest = _size_value(image_processor.size, "shortest_edge")
    if getattr(image_processor, "do_resize", True) and shortest:
        if width <= height:
            new_w, new_h = shortest, int(shortest * height / width)
        else:
            new_w, new_h = int(shortest * width / height), shortest
    crop_w, crop_h = new_w, new_h
    if getattr(image_processor, "do_center_crop", False):
        crop_w = _size_value(image_processor.crop_size, "width")
        crop_h = _size_value(image_processor.crop_size, "height")
    # Same rounding as the processor's centre crop; negative when the crop pads.
    left = int((new_w - crop_w) / 2.0) if crop_w <= new_w else -((crop_w - new_w) // 2)
    top = int((new_h - crop_h) / 2.0) if crop_h <= new_h else -((crop_h - new_h) // 2)

    def to_x(x):  # resized px -> original px
        return x * width / new_w - pad_x

    def to_y(y):
        return y * height / new_h - pad_y

    return (to_x(left), to_y(top), to_x(left + crop_w), to_y(top + crop_h))
