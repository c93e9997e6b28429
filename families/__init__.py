"""Everything that differs between model families, in one place.

A family is detected from `config.model_type`. For each one this module knows how the processor
turns an image into vision tokens, so it can say which sequence positions are vision tokens,
how they are laid out as a grid, and which region of the ORIGINAL image that grid covers.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from records import UserError, VisionLayout

# model_type -> display name. The Qwen families and GLM-4.1V share one geometry (`image_grid_thw`
# and a merge size over the whole image); LLaVA-1.5 has its own (a centre crop of a fixed grid).
SUPPORTED_FAMILIES: dict[str, str] = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "glm4v": "GLM-4.1V",
    "gemma3": "Gemma 3",
    "qwen3_5": "Qwen3.5",
    "mistral3": "Mistral 3",
    "llava": "LLaVA-1.5",
}
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
GRID_THW_FAMILIES = (*QWEN_FAMILIES, "glm4v")             # geometry from image_grid_thw, whole image


def native_aspect(family: str, config) -> bool:
    """Pixtral geometry: the image resized whole at its own aspect, one token per (merged) patch, rows
    ended by [IMG_BREAK] (Mistral 3, and LLaVA checkpoints with a Pixtral vision tower)."""
    return family == "mistral3" or (family == "llava" and config.vision_config.model_type == "pixtral")


def token_cell_px(family: str, config) -> int:
    """Side, in processed pixels, of the square one vision token covers: the patch times the merge
    (Qwen, GLM: vision_config.spatial_merge_size; Mistral 3: config.spatial_merge_size; CLIP: none;
    Gemma 3: the square input side over its pooled tokens per side)."""
    if family == "gemma3":
        return int(config.vision_config.image_size) // int(round(int(config.mm_tokens_per_image) ** 0.5))
    merge = 1 if family == "llava" and not native_aspect(family, config) else \
        getattr(config.vision_config, "spatial_merge_size", None) or getattr(config, "spatial_merge_size", 1) or 1
    return int(config.vision_config.patch_size) * int(merge)


def supports_vit_map(family: str, config) -> bool:
    """Whether the ViT-combined map knows this vision tower (Qwen's and GLM's merge, CLIP's layers)."""
    return family in GRID_THW_FAMILIES or (family == "llava" and not native_aspect(family, config))


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint's model_type is not one this tool knows how to map to image pixels."""


def detect_family(config) -> str:
    """The family key for a loaded config, or an error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        names = ", ".join(f"{name} ({key})" for key, name in SUPPORTED_FAMILIES.items())
        raise UnsupportedModelError(
            f"Model type {model_type!r} is not supported. Supported families: {names}. "
            "Pick a checkpoint of one of these families.")
    return model_type


@contextmanager
def attention_implementation(model, text: str | None = None, vision: str | None = None) -> Iterator[None]:
    """Switch the decoder's (`text`) and/or the vision tower's (`vision`) attention implementation for
    the block, leaving the other as it is; both are restored on exit, also after an exception."""
    config = model.config
    saved = {"text_config": config.get_text_config()._attn_implementation,
             "vision_config": config.vision_config._attn_implementation}
    model.set_attn_implementation({"text_config": text or saved["text_config"],
                                   "vision_config": vision or saved["vision_config"]})
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def supports_video(family: str) -> bool:
    """Whether the family's processor takes a video (the Qwen families)."""
    return family in QWEN_FAMILIES


def pixel_budget(family: str, image_processor, min_pixels: int | None, max_pixels: int | None,
                 cap: int | None = None) -> dict | None:
    """The image processor's `size` for a requested image-token budget (Qwen's min/max pixels of the
    resized image), clamped into the processor's own [shortest_edge, longest_edge] and under `cap`;
    None when the family has no such budget or none was asked for (the processor's default)."""
    if family not in GRID_THW_FAMILIES or not (min_pixels or max_pixels):
        return None
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"{name} must be a whole number of pixels (0 or none for the model's default), "
                             f"got {value!r}.")
    size = dict(image_processor.size)
    floor, ceiling = int(size["shortest_edge"]), int(size["longest_edge"])
    ceiling = max(floor, min(ceiling, cap)) if cap else ceiling
    size["longest_edge"] = min(max(int(max_pixels or ceiling), floor), ceiling)
    size["shortest_edge"] = min(max(int(min_pixels or floor), floor), size["longest_edge"])
    return size


def attention_windows(config, layer_indices: list[int]) -> list[int | None]:
    """Per decoder layer in `layer_indices`: its sliding-window length (Gemma 3's `sliding_attention`
    layers), or None for full attention."""
    text = config.get_text_config()
    types = getattr(text, "layer_types", None) or []
    window = getattr(text, "sliding_window", None)
    return [int(window) if idx < len(types) and types[idx] == "sliding_attention" and window else None
            for idx in layer_indices]


def softmax_layers(model) -> list[int]:
    """Decoder layers that attend with softmax attention (all of them, except Qwen3.5's linear-attention
    layers, which have no attention map)."""
    return [idx for idx, layer in enumerate(decoder_layers(model)) if hasattr(layer, "self_attn")]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers; the same path in every supported family."""
    return model.model.language_model.layers


def vision_layout(family: str, config, processor, inputs, image_size: tuple[int, int]) -> VisionLayout:
    """The vision layout of the one image in the model inputs (batch of 1)."""
    layouts = vision_layouts(family, config, processor, inputs, [image_size])
    return layouts[0]


def vision_layouts(family: str, config, processor, inputs, image_sizes: list[tuple[int, int]],
                   video: bool = False) -> list[VisionLayout]:
    """One layout per image (or the one video) in the model inputs (batch of 1), in prompt order.

    image_sizes: (W, H) of each original image, or of the video's frames.
    """
    token_id = config.video_token_id if video else config.image_token_id
    input_ids = inputs["input_ids"][0]                                   # (S,)
    positions = torch.nonzero(input_ids == token_id).flatten().cpu().numpy()  # (n_vision,)
    if family in GRID_THW_FAMILIES:
        grids = [_qwen_grid(config, thw, video) for thw in inputs["video_grid_thw" if video else "image_grid_thw"]]
        boxes = [(0.0, 0.0, float(w), float(h)) for w, h in image_sizes]  # resized without crop or padding
        extra = 0
    elif family == "gemma3":
        if video:
            raise ValueError("Video input is supported for the Qwen families only.")
        if int(inputs.get("num_crops", torch.zeros(1)).sum()) > 0:
            raise ValueError("Pan-and-scan crops are not mapped yet: turn do_pan_and_scan off in the processor "
                             "(the default) so each image is one 896×896 view.")
        side = int(round(int(config.mm_tokens_per_image) ** 0.5))       # pooled tokens per side
        processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
        grids = [(1, (side, side), processed_hw)] * len(image_sizes)
        boxes = [(0.0, 0.0, float(w), float(h)) for w, h in image_sizes]  # squashed to a square, no crop
        extra = 0
    elif native_aspect(family, config):
        if video:
            raise ValueError("Video input is supported for the Qwen families only.")
        unit = token_cell_px(family, config)
        grids = [(1, (int(h) // unit, int(w) // unit), (int(h), int(w))) for h, w in inputs["image_sizes"]]
        boxes = [(0.0, 0.0, float(w), float(h)) for w, h in image_sizes]  # resized whole; [IMG_BREAK]s skipped
        extra = 0
    else:
        if video:
            raise ValueError("Video input is supported for the Qwen families only.")
        patch = int(config.vision_config.patch_size)
        processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
        grids = [(1, (processed_hw[0] // patch, processed_hw[1] // patch), processed_hw)] * len(image_sizes)
        boxes = [llava_box_xyxy(processor.image_processor, size) for size in image_sizes]
        # "full" keeps CLIP's CLS embedding as the first image token; it has no cell on the grid.
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
    needed = [frames * gh * gw + extra for frames, (gh, gw), _ in grids]
    if len(grids) != len(image_sizes) or len(positions) != sum(needed):
        what = "video" if video else "image"
        raise ValueError(
            f"Found {len(positions)} {what} tokens (id {token_id}) in the prompt for {len(image_sizes)} {what}(s), "
            f"but their grids need {' + '.join(map(str, needed)) or 0}. Give one {what} entry in the prompt "
            "per input and use the processor that belongs to this checkpoint.")
    layouts, start = [], 0
    for (frames, grid_hw, processed_hw), size, box, count in zip(grids, image_sizes, boxes, needed, strict=True):
        own = positions[start + extra:start + count].astype(np.int64)  # (frames * grid_h * grid_w,)
        layouts.append(VisionLayout(own, grid_hw, tuple(size), box, processed_hw, frames))
        start += count
    return layouts


def _qwen_grid(config, thw, video: bool) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(frames, (grid_h, grid_w), processed (H, W)) from one image_grid_thw / video_grid_thw row."""
    t, h, w = (int(v) for v in thw)                                     # in patches
    merge = int(config.vision_config.spatial_merge_size)
    patch = int(config.vision_config.patch_size)
    if t != 1 and not video:
        raise ValueError(f"Expected a still image (t=1), got image_grid_thw t={t}.")
    return t, (h // merge, w // merge), (h * patch, w * patch)


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
    tower = model.model.vision_tower
    return tower.transformer.layers if hasattr(tower, "transformer") else tower.encoder.layers  # Pixtral; CLIP


def run_vision_tower(model, inputs) -> None:
    """One forward of the vision encoder alone over processed inputs on the model's device (images)."""
    if hasattr(model.model, "visual"):                                   # Qwen families
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    else:                                                                # LLaVA's CLIP tower
        model.model.vision_tower(inputs["pixel_values"])


def feature_block(model, num_blocks: int) -> int:
    """The index of the vision block whose output the decoder receives (LLaVA's `vision_feature_layer`
    counts hidden states, embeddings first); the last block for the Qwen families."""
    layer = getattr(model.config, "vision_feature_layer", None)
    if layer is None:
        return num_blocks - 1
    return num_blocks + layer if layer < 0 else layer - 1


def vision_window_order(model, inputs, num_units: int) -> torch.Tensor:
    """(num_units,) int64: which merge unit sits at each position of the vision encoder's sequence.
    Qwen2.5-VL regroups units into attention windows; the other families keep the natural order."""
    vision = getattr(model.model, "visual", None)
    if vision is None or not hasattr(vision, "window_size"):
        return torch.arange(num_units)
    from transformers.vision_utils import get_vision_window_index
    window_index, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=vision.spatial_merge_size,
                                              window_size=vision.window_size, patch_size=vision.patch_size)
    return window_index.cpu()


def vision_merge_size(model) -> int:
    """Patches per side that the vision encoder merges into one decoder token (Qwen 2; 1 without merging)."""
    return int(getattr(model.config.vision_config, "spatial_merge_size", 1) or 1)


def vision_prefix_tokens(model) -> int:
    """Tokens the vision encoder's sequence holds before its patches: CLIP's CLS (LLaVA), none for Qwen."""
    return 1 if model.config.model_type == "llava" else 0


def final_norm(model) -> torch.nn.Module:
    """The norm the decoder applies after its last layer, before the output head."""
    return model.model.language_model.norm


def frames_per_panel(config) -> int:
    """Video frames that make one temporal token step (Qwen's temporal patch size); 1 for images."""
    return int(getattr(config.vision_config, "temporal_patch_size", 1) or 1)
