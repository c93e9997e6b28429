"""Everything that differs between model families, in one place.

A family is detected from `config.model_type`. For each one this module knows how the processor
turns an image into vision tokens, so it can say which sequence positions are vision tokens,
how they are laid out as a grid, and which region of the ORIGINAL image that grid covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# model_type -> display name. Qwen families share one geometry; LLaVA-1.5 has its own.
SUPPORTED_FAMILIES: dict[str, str] = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "llava": "LLaVA-1.5",
}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


class UnsupportedModelError(ValueError):
    """The checkpoint's model_type is not one this tool knows how to map to image pixels."""


@dataclass(frozen=True)
class VisionLayout:
    """Where the image's tokens sit in the sequence and on the picture.

    token_positions: (n_cells,) int64, 0-based positions in the full sequence (prompt + generated)
        of the vision tokens, in grid order: entry j is grid cell (j // grid_w, j % grid_w).
    grid_hw: (grid_h, grid_w), the vision-token grid, row-major as the model sees it.
    image_size: (W, H) of the original (upright) image, in pixels.
    image_box_xyxy: (x0, y0, x1, y1) in pixels of the ORIGINAL image: the region the grid covers.
        The whole image for Qwen (resize without crop); the centre crop for LLaVA-1.5. It may
        extend past the image when the processor pads (LLaVA with do_pad).
    processed_hw: (H, W) of the pixel tensor the vision encoder received.
    """

    token_positions: np.ndarray
    grid_hw: tuple[int, int]
    image_size: tuple[int, int]
    image_box_xyxy: tuple[float, float, float, float]
    processed_hw: tuple[int, int]

    @property
    def num_cells(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    def to_dict(self) -> dict:
        return {"token_positions": self.token_positions.tolist(), "grid_hw": list(self.grid_hw),
                "image_size": list(self.image_size), "image_box_xyxy": list(self.image_box_xyxy),
                "processed_hw": list(self.processed_hw)}


def detect_family(config) -> str:
    """The family key for a loaded config, or an error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        names = ", ".join(f"{name} ({key})" for key, name in SUPPORTED_FAMILIES.items())
        raise UnsupportedModelError(
            f"Model type {model_type!r} is not supported. Supported families: {names}. "
            "Pick a checkpoint of one of these families.")
    return model_type


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers; the same path in every supported family."""
    return model.model.language_model.layers


def vision_layout(family: str, config, processor, inputs, image_size: tuple[int, int]) -> VisionLayout:
    """Read the vision layout of one processed image from the model inputs (batch of 1)."""
    input_ids = inputs["input_ids"][0]                                   # (S,)
    positions = torch.nonzero(input_ids == config.image_token_id).flatten().cpu().numpy()  # (n_vision,)
    processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:]) if family == "llava" else None
    if family in QWEN_FAMILIES:
        t, h, w = (int(v) for v in inputs["image_grid_thw"][0])          # in patches
        merge = int(config.vision_config.spatial_merge_size)
        patch = int(config.vision_config.patch_size)
        grid_hw = (h // merge, w // merge)
        processed_hw = (h * patch, w * patch)
        extra = 0
        if t != 1:
            raise ValueError(f"Expected one still image (t=1), got image_grid_thw t={t}.")
        box = (0.0, 0.0, float(image_size[0]), float(image_size[1]))  # resized without crop or padding
    else:
        patch = int(config.vision_config.patch_size)
        grid_hw = (processed_hw[0] // patch, processed_hw[1] // patch)
        # "full" keeps CLIP's CLS embedding as the first image token; it has no cell on the grid.
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
        box = llava_box_xyxy(processor.image_processor, image_size)
    n_cells = grid_hw[0] * grid_hw[1]
    if len(positions) != n_cells + extra:
        raise ValueError(
            f"Found {len(positions)} image tokens (id {config.image_token_id}) in the prompt, but the grid "
            f"{grid_hw[0]}x{grid_hw[1]} needs {n_cells + extra}. Use exactly one image and the processor "
            "that belongs to this checkpoint.")
    return VisionLayout(positions[extra:].astype(np.int64), grid_hw, tuple(image_size), box, processed_hw)


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
    def to_x(x):                                                        # resized px -> original px
        return x * width / new_w - pad_x

    def to_y(y):
        return y * height / new_h - pad_y

    return (to_x(left), to_y(top), to_x(left + crop_w), to_y(top + crop_h))


def vision_encoder_blocks(model) -> torch.nn.ModuleList:
    """The vision encoder's transformer blocks (the ones that mix patches through attention)."""
    if hasattr(model.model, "visual"):
        return model.model.visual.blocks
    return model.model.vision_tower.encoder.layers
