"""Tiny configs, processors and tokenizers of the tiled families, for `tiny_models`: LLaVA-NeXT,
LLaVA-OneVision, InternVL, Idefics3 and SmolVLM. Tiles, crop counts and token grids are shrunk so a
checkpoint builds in seconds, while every image still becomes several tiles plus a global view."""

from __future__ import annotations

LLAVA_TILED_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
IDEFICS_SPECIALS = [
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
    "<video>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]
PALIGEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
TILED_FAMILIES = ("llava_next", "llava_onevision", "internvl", "idefics3", "smolvlm")
# Built here too (no chat template; a prefix-LM mask and soft-capped logits), with a single view.
MORE_FAMILIES = ("paligemma",)

QWEN_STYLE_TEMPLATE = (  # InternVL's chat format
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS_TEMPLATE = (
    "<s>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'video' %}<video>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
ONEVISION_TEMPLATE = (  # LLaVA's, with a video part
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
TILE = 56  # LLaVA tiles: 4×4 patches of 14 px
PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


def tokenizer_for(family: str, make):
    """The family's tokenizer, from `make(specials, vocab_size, **named_tokens)`."""
    if family in ("llava_next", "llava_onevision"):
        return make(
            LLAVA_TILED_SPECIALS,
            400,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        )
    if family == "paligemma":
        return make(
            PALIGEMMA_SPECIALS,
            400,
            pad_token="<pad>",
            eos_token="<eos>",
            bos_token="<bos>",
            unk_token="<unk>",
            extra_special_tokens={"image_token": "<image>"},
        )
    if family == "internvl":
        return make(
            INTERNVL_SPECIALS,
            400,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            extra_special_tokens={
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
        )
    return make(
        IDEFICS_SPECIALS,
        500,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<end_of_utterance>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_config(family: str, tok, text: dict, vision_dim: int, vision_depth: int):
    """A small config of the real architecture; `text` holds the decoder's sizes and special ids."""
    from transformers import (
        Idefics3Config,
        InternVLConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        PaliGemmaConfig,
        SmolVLMConfig,
    )

    ids = tok.convert_tokens_to_ids
    vision = dict(hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_attention_heads=2)
    if family == "paligemma":  # PaliGemma 2: a Gemma 2 decoder
        vision.update(model_type="siglip_vision_model", num_hidden_layers=vision_depth, image_size=TILE, patch_size=14)
        layers = text["num_hidden_layers"]
        gemma2 = dict(
            model_type="gemma2",
            head_dim=text["hidden_size"] // text["num_attention_heads"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=512,
            query_pre_attn_scalar=text["hidden_size"] // text["num_attention_heads"],
            layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
            **text,
        )
        return PaliGemmaConfig(
            vision_config=vision,
            text_config=gemma2,
            image_token_index=ids("<image>"),
            projection_dim=text["hidden_size"],
        )
    if family == "llava_next":
        vision.update(
            model_type="clip_vision_model", num_hidden_layers=vision_depth + 1, image_size=TILE, patch_size=14
        )
        return LlavaNextConfig(
            vision_config=vision,
            text_config=dict(model_type="llama", **text),
            image_token_id=ids("<image>"),
            image_grid_pinpoints=PINPOINTS,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    if family == "llava_onevision":  # SigLIP, shrinks past one tile's worth
        vision.update(model_type="siglip_vision_model", num_hidden_layers=vision_depth, image_size=TILE, patch_size=14)
        return LlavaOnevisionConfig(
            vision_config=vision,
            text_config=dict(model_type="qwen2", **text),
            image_token_id=ids("<image>"),
            video_token_id=ids("<video>"),
            image_grid_pinpoints=PINPOINTS,
            vision_aspect_ratio="anyres_max_1",
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if family == "internvl":  # 112 px tiles: 8×8 patches -> 4×4 tokens
        vision.update(num_hidden_layers=vision_depth, image_size=[112, 112], patch_size=[14, 14])
        return InternVLConfig(
            vision_config=vision,
            text_config=dict(model_type="qwen2", **text),
            image_token_id=ids("<IMG_CONTEXT>"),
            downsample_ratio=0.5,
        )
    vision.update(num_hidden_layers=vision_depth, image_size=64, patch_size=8)  # 8×8 patches -> 4×4 tokens
    cls = Idefics3Config if family == "idefics3" else SmolVLMConfig
    return cls(
        vision_config=vision,
        text_config=dict(model_type="llama", **text),
        scale_factor=2,
        image_token_id=ids("<image>"),
    )


def build_processor(family: str, tok, llava_template: str):
    """The family's real processor classes, configured for the small tiles above."""
    from transformers import (
        GotOcr2ImageProcessor,
        Idefics3ImageProcessor,
        Idefics3Processor,
        InternVLProcessor,
        InternVLVideoProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tile = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    if family == "paligemma":  # no chat template: prompt as it is
        image_proc = SiglipImageProcessor(size={"height": TILE, "width": TILE})
        image_proc.image_seq_length = (TILE // 14) ** 2
        return PaliGemmaProcessor(image_processor=image_proc, tokenizer=tok)
    if family == "llava_next":
        return LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(**tile),
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=llava_template,
        )
    if family == "llava_onevision":
        image_proc = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
        return LlavaOnevisionProcessor(
            image_processor=image_proc,
            tokenizer=tok,
            video_processor=LlavaOnevisionVideoProcessor(size={"height": TILE, "width": TILE}),
            num_image_tokens=(TILE // 14) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",
            chat_template=ONEVISION_TEMPLATE,
        )
    if family == "internvl":
        image_proc = GotOcr2ImageProcessor(
            size={"height": 112, "width": 112}, crop_to_patches=True, min_patches=1, max_patches=4
        )
        video_proc = InternVLVideoProcessor(size={"height": 112, "width": 112})
        return InternVLProcessor(
            image_processor=image_proc,
            tokenizer=tok,
            video_processor=video_proc,
            image_seq_length=16,
            chat_template=QWEN_STYLE_TEMPLATE,
        )
    size = dict(size={"longest_edge": 128}, max_image_size={"longest_edge": 64})
    if family == "idefics3":
        return Idefics3Processor(
            image_processor=Idefics3ImageProcessor(**size),
            tokenizer=tok,
            image_seq_len=16,
            chat_template=IDEFICS_TEMPLATE,
        )
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(**size),
        tokenizer=tok,
        video_processor=SmolVLMVideoProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 64}),
        image_seq_len=16,
        chat_template=IDEFICS_TEMPLATE,
    )
