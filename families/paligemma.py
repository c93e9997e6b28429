"""PaliGemma and PaliGemma 2: the image squashed to the SigLIP tower's square, one token per patch
(`image_seq_length` of them, a square grid over the whole image), placed before the prompt. The
image and the prompt form a bidirectional prefix (a prefix-LM mask) and PaliGemma 2's Gemma 2 decoder
soft-caps its attention logits; the capture applies both exactly as the model does."""

from __future__ import annotations

from families.base import FamilySpec, check_count, no_video, token_positions, whole_box
from records import VisionLayout

SPECS = (FamilySpec("paligemma", "PaliGemma 2", prefix_lm=True, eager_text=True),)


def token_cell_px(config) -> int:
    """Processed pixels per token side: SigLIP's patch (no merge)."""
    return int(config.vision_config.patch_size)


def placeholder_tokens(processor, image_sizes, size=None) -> list[int]:
    """Per image: `image_seq_length` tokens; the first also carries the BOS and the newline the processor
    adds around the prompt."""
    extra = len(processor.tokenizer(processor.tokenizer.bos_token + "\n", add_special_tokens=False)["input_ids"])
    return [int(processor.image_seq_length) + (extra if i == 0 else 0) for i in range(len(image_sizes))]


def layouts(family: str, config, processor, inputs, image_sizes, video: bool) -> list[VisionLayout]:
    no_video(family, video)
    token_id = config.image_token_id
    positions = token_positions(inputs, token_id)
    count = int(processor.image_seq_length)
    side = int(round(count**0.5))
    processed_hw = tuple(int(v) for v in inputs["pixel_values"].shape[-2:])
    check_count(len(positions), [count] * len(image_sizes), token_id, len(image_sizes))
    return [
        VisionLayout(
            positions[i * count : (i + 1) * count],
            (side, side),
            tuple(size),
            whole_box(size),
            processed_hw,
            image_index=i,
        )
        for i, size in enumerate(image_sizes)
    ]
