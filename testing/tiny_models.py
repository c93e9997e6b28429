"""Tiny random-weight checkpoints of every supported family, built offline from configs.

Tests, benchmarks and the README example use these: each call trains a small byte-level BPE
tokenizer in-process, builds the real transformers architecture from a config, and writes a
normal checkpoint folder (safetensors, processor, tokenizer, chat template) that loads through
`ModelHolder.load` exactly as a hub checkpoint would.

    python -m testing.tiny_models qwen2_5_vl /tmp/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

from families import decoder_layers
from testing import tiny_tiles

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
GLM_SPECIALS = [
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
]

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "<s>{% for message in messages %}{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}[IMG]"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}</s>{% endif %}{% endfor %}"
)
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% elif part['type'] == 'video' %}"
    "<|begin_of_video|><|video|><|end_of_video|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "What is in the picture? Describe the image in detail.",
    "A red circle, a blue square and a green triangle on a white background.",
    "Where is the cat? The cat sits on the left of the plate, near the top.",
    "USER: ASSISTANT: user assistant system answer question colour shape",
] * 20
TINY_TILES_KINDS = (*tiny_tiles.TILED_FAMILIES, *tiny_tiles.MORE_FAMILIES)  # built by tiny_tiles
# Checkpoint kinds: one per family, and "pixtral", a LLaVA checkpoint with a Pixtral vision tower
# (how Pixtral-12B ships: model_type "llava", Pixtral's geometry).
FAMILIES = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "qwen3_5",
    "glm4v",
    "gemma3",
    "mistral3",
    "pixtral",
    "llava",
    *tiny_tiles.TILED_FAMILIES,
    *tiny_tiles.MORE_FAMILIES,
)


def _tokenizer(specials: list[str], vocab_size: int, **named_tokens: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a tiny corpus; `specials` get the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named_tokens)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(QWEN_SPECIALS, 400, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _glm_tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer(GLM_SPECIALS, 400, eos_token="<|user|>", pad_token="<|endoftext|>")


def _glm_ids(tok) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
    )


def _qwen_ids(tok) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _text_dims(tok, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, **extra) -> dict:
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        bos_token_id=tok.bos_token_id or tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **extra,
    )


def _mrope(hidden: int, heads: int) -> dict:
    """An M-RoPE section split (t, h, w) summing to head_dim / 2."""
    half = hidden // heads // 2
    t = half - 2 * (half // 3)
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, half // 3, half // 3]}


def build_config(
    family: str,
    tok,
    hidden: int = 64,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    vision_dim: int = 32,
    vision_depth: int = 2,
    intermediate: int | None = None,
    sliding_window: int = 512,
):
    """A config of the real architecture with small dimensions (GQA when kv_heads < heads). Gemma 3's
    layers slide over `sliding_window` keys, except the last one (full attention)."""
    intermediate = intermediate or 2 * hidden
    from transformers import (
        Gemma3Config,
        Glm4vConfig,
        LlavaConfig,
        Mistral3Config,
        Qwen2_5_VLConfig,
        Qwen2VLConfig,
        Qwen3_5Config,
        Qwen3VLConfig,
    )

    if family in TINY_TILES_KINDS:
        return tiny_tiles.build_config(
            family, tok, _text_dims(tok, hidden, layers, heads, kv_heads, intermediate), vision_dim, vision_depth
        )
    if family == "llava":
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=vision_dim,
            intermediate_size=2 * vision_dim,
            num_hidden_layers=vision_depth + 1,
            num_attention_heads=2,
            image_size=56,
            patch_size=14,
        )
        text = dict(model_type="llama", **_text_dims(tok, hidden, layers, heads, kv_heads, intermediate))
        return LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=16,
        )
    if family == "gemma3":
        ids = tok.convert_tokens_to_ids
        text = dict(
            head_dim=hidden // heads,
            sliding_window=sliding_window,
            layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
            **_text_dims(tok, hidden, layers, heads, kv_heads, intermediate),
        )
        vision = dict(
            hidden_size=vision_dim,
            intermediate_size=2 * vision_dim,
            num_hidden_layers=vision_depth,
            num_attention_heads=2,
            image_size=112,
            patch_size=14,
        )  # 8×8 patches pooled to 4×4
        return Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=16,
            boi_token_index=ids("<start_of_image>"),
            eoi_token_index=ids("<end_of_image>"),
            image_token_index=ids("<image_soft_token>"),
        )
    if family == "pixtral":
        text = dict(
            model_type="mistral",
            head_dim=hidden // heads,
            **_text_dims(tok, hidden, layers, heads, kv_heads, intermediate),
        )
        vision = dict(
            model_type="pixtral",
            hidden_size=vision_dim,
            intermediate_size=2 * vision_dim,
            num_hidden_layers=vision_depth,
            num_attention_heads=2,
            head_dim=vision_dim // 2,
            image_size=224,
            patch_size=16,
        )
        return LlavaConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=tok.convert_tokens_to_ids("[IMG]"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
    if family == "mistral3":
        text = dict(
            model_type="mistral",
            head_dim=hidden // heads,
            **_text_dims(tok, hidden, layers, heads, kv_heads, intermediate),
        )
        vision = dict(
            model_type="pixtral",
            hidden_size=vision_dim,
            intermediate_size=2 * vision_dim,
            num_hidden_layers=vision_depth,
            num_attention_heads=2,
            head_dim=vision_dim // 2,
            image_size=224,
            patch_size=14,
        )
        return Mistral3Config(
            text_config=text,
            vision_config=vision,
            spatial_merge_size=2,
            image_token_index=tok.convert_tokens_to_ids("[IMG]"),
            vision_feature_layer=-1,
        )
    text = _text_dims(tok, hidden, layers, heads, kv_heads, intermediate, rope_parameters=_mrope(hidden, heads))
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_dim, hidden_size=hidden, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    if family == "qwen2_5_vl":
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_dim,
            out_hidden_size=hidden,
            num_heads=2,
            intermediate_size=2 * vision_dim,
            window_size=56,
            fullatt_block_indexes=[vision_depth - 1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    if family == "qwen3_5":  # linear attention, then full, in turn
        text["rope_parameters"]["mrope_interleaved"] = True
        pairs = max(2, (layers + 1) // 2)
        text.update(
            head_dim=hidden // heads,
            layer_types=["linear_attention", "full_attention"] * pairs,
            num_hidden_layers=2 * pairs,
            linear_num_key_heads=2,
            linear_num_value_heads=heads,
            linear_key_head_dim=hidden // heads,
            linear_value_head_dim=hidden // heads,
            linear_conv_kernel_dim=4,
        )
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_dim,
            out_hidden_size=hidden,
            num_heads=2,
            intermediate_size=2 * vision_dim,
            num_position_embeddings=64,
            patch_size=16,
        )
        return Qwen3_5Config(text_config=text, vision_config=vision, **_qwen_ids(tok))
    if family == "qwen3_vl":
        text["rope_parameters"]["mrope_interleaved"] = True
        text["head_dim"] = hidden // heads
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_dim,
            out_hidden_size=hidden,
            num_heads=2,
            intermediate_size=2 * vision_dim,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids(tok))
    if family == "glm4v":
        text["rope_parameters"]["partial_rotary_factor"] = 0.5  # GLM rotates half of each head
        half = hidden // heads // 4
        text["rope_parameters"]["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
        vision = dict(
            depth=vision_depth,
            hidden_size=vision_dim,
            out_hidden_size=hidden,
            num_heads=2,
            intermediate_size=2 * vision_dim,
            image_size=56,
            patch_size=14,
            spatial_merge_size=2,
        )
        return Glm4vConfig(text_config=text, vision_config=vision, **_glm_ids(tok))
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def build_processor(family: str, tok, max_pixels: int = 224 * 224):
    """The family's real processor classes, configured for small images."""
    from transformers import (
        CLIPImageProcessor,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
        LlavaProcessor,
        PixtralImageProcessor,
        PixtralProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    if family in TINY_TILES_KINDS:
        return tiny_tiles.build_processor(family, tok, LLAVA_TEMPLATE)
    if family == "llava":
        image_proc = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        return LlavaProcessor(
            image_processor=image_proc,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_TEMPLATE,
        )
    patch = 16 if family in ("qwen3_vl", "qwen3_5") else 14
    if family == "gemma3":  # every image squashed to 112×112
        return Gemma3Processor(
            image_processor=Gemma3ImageProcessor(size={"height": 112, "width": 112}),
            tokenizer=tok,
            chat_template=GEMMA_TEMPLATE,
            image_seq_length=16,
        )
    if family in ("mistral3", "pixtral"):  # longest side of the resized image
        patch, merge = (14, 2) if family == "mistral3" else (16, 1)
        image_proc = PixtralImageProcessor(
            size={"longest_edge": int(max_pixels**0.5)}, patch_size={"height": patch, "width": patch}
        )
        return PixtralProcessor(
            image_processor=image_proc,
            tokenizer=tok,
            patch_size=patch,
            spatial_merge_size=merge,
            chat_template=MISTRAL_TEMPLATE,
        )
    size = {"shortest_edge": (2 * patch) ** 2, "longest_edge": max_pixels}
    if family == "glm4v":
        image_proc = Glm4vImageProcessor(size=size, patch_size=patch, merge_size=2)
        video_proc = Glm4vVideoProcessor(size=size, patch_size=patch, merge_size=2)
        return Glm4vProcessor(
            image_processor=image_proc, tokenizer=tok, video_processor=video_proc, chat_template=GLM_TEMPLATE
        )
    image_proc = Qwen2VLImageProcessor(size=size, patch_size=patch, merge_size=2)
    if family in ("qwen3_vl", "qwen3_5"):
        video_proc = Qwen3VLVideoProcessor(size=size, patch_size=patch, merge_size=2)
        return Qwen3VLProcessor(
            image_processor=image_proc, tokenizer=tok, video_processor=video_proc, chat_template=QWEN_TEMPLATE
        )
    video_proc = Qwen2VLVideoProcessor(size=size, patch_size=patch, merge_size=2)
    return Qwen2VLProcessor(
        image_processor=image_proc, tokenizer=tok, video_processor=video_proc, chat_template=QWEN_TEMPLATE
    )


def _sharpen_decoder_attention(model, factor: float) -> None:
    """Random attention is nearly uniform; scaling q/k makes rows peaked, so a wrong row or layer shows."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            attn = getattr(layer, "self_attn", None)
            if attn is None:  # a linear-attention layer
                continue
            attn.q_proj.weight.mul_(factor)
            attn.k_proj.weight.mul_(factor)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None and "Gemma" in type(norm).__name__:  # Gemma scales by (1 + weight)
                    norm.weight.copy_((1.0 + norm.weight) * factor - 1.0)


def make_tiny_model(
    family: str, out_dir: str | Path, seed: int = 0, sharpen: float = 6.0, max_pixels: int = 224 * 224, **dims
) -> Path:
    """Write a random-weight checkpoint of `family` to `out_dir` and return the folder."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tok = (
        tiny_tiles.tokenizer_for(family, _tokenizer)
        if family in TINY_TILES_KINDS
        else _tokenizer(LLAVA_SPECIALS, 400, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        if family == "llava"
        else _glm_tokenizer()
        if family == "glm4v"
        else _tokenizer(MISTRAL_SPECIALS, 400, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        if family in ("mistral3", "pixtral")
        else _tokenizer(
            GEMMA_SPECIALS,
            400,
            pad_token="<pad>",
            eos_token="<end_of_turn>",
            bos_token="<bos>",
            unk_token="<unk>",
            extra_special_tokens={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
        )
        if family == "gemma3"
        else _qwen_tokenizer()
    )
    config = build_config(family, tok, **dims)
    model = AutoModelForImageTextToText.from_config(config)
    projector = getattr(model.model, "multi_modal_projector", None)
    if hasattr(projector, "mm_input_projection_weight"):  # Gemma 3 starts it at zero
        with torch.no_grad():
            projector.mm_input_projection_weight.normal_(std=projector.mm_input_projection_weight.shape[0] ** -0.5)
    _sharpen_decoder_attention(model, sharpen)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    build_processor(family, tok, max_pixels=max_pixels).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir")
    args = parser.parse_args()
    print(make_tiny_model(args.family, args.out_dir))
