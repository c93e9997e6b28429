"""Everything that differs between model families, in one place: a small adapter module per family.

A family is detected from `config.model_type`. For each one its adapter knows how the processor
turns an image into vision tokens, so it can say which sequence positions are vision tokens, how
they are laid out as one grid per view, and which region of the ORIGINAL image each grid covers.
Each adapter declares its model types' facts as data (`SPECS`, a `families.base.FamilySpec` each) beside
its `layouts()` and `token_cell_px()`; everything here reads those. Adding a family means one adapter
module, its spec, its entry in `ADAPTERS` and its tests.

| module | families |
|---|---|
| `qwen` | Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.1V (`image_grid_thw`) |
| `llava` | LLaVA-1.5 (a centre crop of a fixed grid) |
| `llava_next` | LLaVA-NeXT and LLaVA-OneVision (a global view and stitched, un-padded tiles) |
| `internvl` | InternVL (aspect-matched tiles and a thumbnail) |
| `idefics3` | Idefics3 and SmolVLM (tiles with row/column markers and a global image) |
| `gemma3` | Gemma 3 (a pooled square grid, optional pan-and-scan crops) |
| `paligemma` | PaliGemma, PaliGemma 2 (a square grid before a bidirectional prefix) |
| `pixtral` | Mistral 3 and Pixtral (native aspect, row breaks) |
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from errors import InputError, UnsupportedModelError
from families import gemma3, idefics3, internvl, llava, llava_next, paligemma, pixtral, qwen
from families.base import FamilySpec
from families.llava import llava_box_xyxy
from records import VisionLayout

__all__ = ["llava_box_xyxy"]

# Every adapter module, each declaring its model types' facts in `SPECS` (families.base.FamilySpec).
ADAPTERS = (qwen, llava, llava_next, internvl, idefics3, gemma3, paligemma, pixtral)
SPECS: dict[str, FamilySpec] = {spec.model_type: spec for module in ADAPTERS for spec in module.SPECS}
_ADAPTER_OF = {spec.model_type: module for module in ADAPTERS for spec in module.SPECS}
SUPPORTED_FAMILIES: dict[str, str] = {model_type: spec.name for model_type, spec in SPECS.items()}
GRID_THW_FAMILIES = tuple(model_type for model_type, spec in SPECS.items() if spec.grid_thw)
VIDEO_FAMILIES = tuple(model_type for model_type, spec in SPECS.items() if spec.video)
# The transformers versions the capture is tested with (requirements.txt declares the same range; CI runs the
# exactness tests on the pinned lock and on the newest release in it). A family that a release breaks narrows
# it in its own spec (`FamilySpec.transformers`).
TRANSFORMERS = ">=5.23,<6"
# Refused with the reason: the image enters through cross-attention, never as tokens in self-attention.
CROSS_ATTENTION_FAMILIES = {"mllama": "Llama 3.2 Vision", "idefics": "IDEFICS (v1)"}


def family_spec(family: str) -> FamilySpec:
    """The declared facts of a model type; a name that is not a supported model type has none of them."""
    return SPECS.get(family) or FamilySpec(family, family)


def check_transformers(family: str, version: str | None = None) -> None:
    """Refuse a family on a transformers release outside the range it is tested with (the project's
    `TRANSFORMERS`, narrowed by the family's own spec), naming the working range and what to install."""
    version = version or transformers.__version__
    spec = family_spec(family)
    working = SpecifierSet(TRANSFORMERS) & SpecifierSet(spec.transformers)
    if Version(version) not in working:
        narrowed = f" ({spec.name} also needs transformers{spec.transformers})" if spec.transformers else ""
        raise UnsupportedModelError(
            f"{spec.name} is not supported on transformers {version}: this tool works with transformers"
            f"{TRANSFORMERS}{narrowed}. Install a working release, e.g. `pip install -c requirements-lock.txt "
            f"transformers`, or `pip install 'transformers{working}'`."
        )


def video_families() -> list[str]:
    """The names of the families whose video this tool maps, for the page and messages."""
    return [SPECS[model_type].name for model_type in VIDEO_FAMILIES]


def native_aspect(family: str, config) -> bool:
    """Pixtral geometry: the image resized whole at its own aspect, one token per (merged) patch, rows
    ended by [IMG_BREAK] (Mistral 3, and LLaVA checkpoints with a Pixtral vision tower)."""
    return family == "mistral3" or (family == "llava" and config.vision_config.model_type == "pixtral")


def token_cell_px(family: str, config) -> int:
    """Side, in processed pixels, of the square one vision token covers in the main view (the patch times
    the family's merge, pixel shuffle or pooling; each adapter's `token_cell_px`)."""
    return _adapter(family, config).token_cell_px(config)


def supports_vit_map(family: str, config) -> bool:
    """Whether the ViT-combined map knows this vision tower (Qwen's and GLM's merge, CLIP's layers)."""
    return family_spec(family).vit_map and not native_aspect(family, config)


def detect_family(config) -> str:
    """The family key for a loaded config, or an error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    why = ""
    if model_type in CROSS_ATTENTION_FAMILIES:
        why = (
            f" {CROSS_ATTENTION_FAMILIES[model_type]} reads the image through cross-attention layers, so its "
            "decoder's self-attention never sees image tokens and there is no per-token map of this kind."
        )
    if model_type not in SUPPORTED_FAMILIES:
        names = ", ".join(f"{name} ({key})" for key, name in SUPPORTED_FAMILIES.items())
        raise UnsupportedModelError(
            f"Model type {model_type!r} is not supported.{why} Supported families: {names}. "
            "Pick a checkpoint of one of these families."
        )
    return model_type


@contextmanager
def attention_implementation(model, text: str | None = None, vision: str | None = None) -> Iterator[None]:
    """Switch the decoder's (`text`) and/or the vision tower's (`vision`) attention implementation for
    the block, leaving the other as it is; both are restored on exit, also after an exception."""
    config = model.config
    saved = {
        "text_config": config.get_text_config()._attn_implementation,
        "vision_config": config.vision_config._attn_implementation,
    }
    model.set_attn_implementation(
        {"text_config": text or saved["text_config"], "vision_config": vision or saved["vision_config"]}
    )
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def supports_video(family: str) -> bool:
    """Whether the family's processor takes a video and its adapter maps it (its spec's `video`)."""
    return family_spec(family).video


def pixel_budget(
    family: str, image_processor, min_pixels: int | None, max_pixels: int | None, cap: int | None = None
) -> dict | None:
    """The image processor's `size` for a requested image-token budget (Qwen's min/max pixels of the
    resized image), clamped into the processor's own [shortest_edge, longest_edge] and under `cap`;
    None when the family has no such budget or none was asked for (the processor's default)."""
    if family not in GRID_THW_FAMILIES or not (min_pixels or max_pixels):
        return None
    for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if value is not None and (not isinstance(value, numbers.Integral) or value < 0):
            raise InputError(
                f"{name} must be a whole number of pixels (0 or none for the model's default), got {value!r}."
            )
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
    return [
        int(window) if idx < len(types) and types[idx] == "sliding_attention" and window else None
        for idx in layer_indices
    ]


def softmax_layers(model) -> list[int]:
    """Decoder layers that attend with softmax attention (all of them, except Qwen3.5's linear-attention
    layers, which have no attention map)."""
    return [idx for idx, layer in enumerate(decoder_layers(model)) if hasattr(layer, "self_attn")]


def language_model(model) -> torch.nn.Module:
    """The decoder stack: `model.model.language_model`, or `text_model` for Idefics3 and SmolVLM."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers."""
    return language_model(model).layers


def load_attention(family: str) -> str | dict:
    """The attention implementation to load with: SDPA, except PaliGemma's Gemma 2 decoder, whose logit
    soft-capping SDPA cannot do (transformers refuses it there); the capture replaces it either way."""
    return {"text_config": "eager", "vision_config": "sdpa"} if family_spec(family).eager_text else "sdpa"


def prefix_lm(family: str) -> bool:
    """Whether the prompt (image and text) is one bidirectional prefix and generated tokens a causal
    suffix, marked by `token_type_ids` 0 and 1 (PaliGemma)."""
    return family_spec(family).prefix_lm


def processor_options(family: str, processor) -> dict:
    """Options every processor call of this family gets, so the geometry worked out here matches what
    the processor did (Gemma 3: the image processor's pan-and-scan settings)."""
    options = getattr(_ADAPTER_OF[family], "processor_options", None)
    return options(processor) if options else {}


def placeholder_tokens(
    family: str, processor, image_sizes: list[tuple[int, int]], size: dict | None = None, video: tuple | None = None
) -> list[int] | None:
    """How many prompt tokens the processor puts in place of each image's one placeholder, from the (W, H)
    sizes alone, with nothing decoded: the processor's own resize rule (`_get_num_multimodal_tokens`),
    under the image-token budget `size` (`pixel_budget`). With `video` = (frames, (W, H)): the one video's
    count instead, as a one-item list. None when the processor cannot say (the exact check after
    processing still holds).
    """
    own = getattr(_ADAPTER_OF.get(family), "placeholder_tokens", None)
    if own is not None and video is None:
        return own(processor, image_sizes, size)
    count = getattr(type(processor), "_get_num_multimodal_tokens", None)
    if count is None:
        return None
    options = processor_options(family, processor)
    if size:  # Qwen's rule reads the budget as min/max pixels
        options.update(size=size, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    if video is not None:
        frames, (width, height) = video
        found = count(processor, video_sizes=[(frames, height, width)], **options)
        return list(found["num_video_tokens"]) if "num_video_tokens" in found else None
    found = count(processor, image_sizes=[(height, width) for width, height in image_sizes], **options)
    return [int(n) for n in found["num_image_tokens"]]


def vision_layout(family: str, config, processor, inputs, image_size: tuple[int, int]) -> VisionLayout:
    """The main view of the one image in the model inputs (batch of 1)."""
    return vision_layouts(family, config, processor, inputs, [image_size])[0]


def vision_layouts(
    family: str, config, processor, inputs, image_sizes: list[tuple[int, int]], video: bool = False
) -> list[VisionLayout]:
    """The layouts of the images (or the one video) in the model inputs (batch of 1): for each image
    in prompt order its views, the main view first (`layout.image_index`, `layout.view`).

    image_sizes: (W, H) of each original image, or of the video's frames.
    """
    return _adapter(family, config).layouts(family, config, processor, inputs, image_sizes, video)


def _adapter(family: str, config):
    """The module that knows this family's geometry."""
    return pixtral if native_aspect(family, config) else _ADAPTER_OF[family]


def vision_encoder_blocks(model) -> torch.nn.ModuleList:
    """The vision encoder's transformer blocks (the ones that mix patches through attention)."""
    if hasattr(model.model, "visual"):
        return model.model.visual.blocks
    tower = model.model.vision_tower if hasattr(model.model, "vision_tower") else model.model.vision_model
    if hasattr(tower, "transformer"):  # Pixtral
        return tower.transformer.layers
    encoder = tower.encoder  # CLIP, SigLIP, Idefics3; InternVL
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def run_vision_tower(model, inputs) -> None:
    """One forward of the vision encoder alone over processed inputs on the model's device (images)."""
    if hasattr(model.model, "visual"):  # Qwen families
        model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    else:  # LLaVA's CLIP tower
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

    window_index, _ = get_vision_window_index(
        inputs["image_grid_thw"],
        spatial_merge_size=vision.spatial_merge_size,
        window_size=vision.window_size,
        patch_size=vision.patch_size,
    )
    return window_index.cpu()


def vision_merge_size(model) -> int:
    """Patches per side that the vision encoder merges into one decoder token (Qwen 2; 1 without merging)."""
    return int(getattr(model.config.vision_config, "spatial_merge_size", 1) or 1)


def vision_prefix_tokens(model) -> int:
    """Tokens the vision encoder's sequence holds before its patches: CLIP's CLS (LLaVA), none for Qwen."""
    return family_spec(model.config.model_type).vision_prefix_tokens


def final_norm(model) -> torch.nn.Module:
    """The norm the decoder applies after its last layer, before the output head."""
    return language_model(model).norm


def frames_per_panel(config) -> int:
    """Video frames that make one temporal token step (Qwen's temporal patch size); 1 for images."""
    return int(getattr(config.vision_config, "temporal_patch_size", 1) or 1)
