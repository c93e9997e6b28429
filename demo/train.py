"""Train the app's offline demo model: a tiny real Qwen2-VL that answers shape questions in one word.

Builds a word-level tokenizer, a Qwen2VLProcessor and a Qwen2VLForConditionalGeneration from
scratch, trains it on the CPU on `demo_data` samples (seeded, resumable), checks answer accuracy on
held-out data and saves everything with `save_pretrained` into `demo_model/`.

    nice -n 15 python -m demo.train --out demo_model
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from demo import data as demo_data

log = logging.getLogger("train_demo_model")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<unk>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PATCH, MERGE, TEMPORAL = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 160  # 224x224 -> 224x224 (8x8 tokens); up to 160 tokens


def build_processor() -> Qwen2VLProcessor:
    """Word-level tokenizer (lower-cased, punctuation split off) + Qwen2-VL image processor + chat template."""
    words = SPECIAL_TOKENS + ["system", "user", "assistant"] + demo_data.vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[1:7],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    image_processor = Qwen2VLImageProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL
    )
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, args) -> Qwen2VLForConditionalGeneration:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = args.hidden // args.heads
    half = head_dim // 2  # rotary frequencies per head; M-RoPE splits them into (t, h, w)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=args.vision_depth,
            embed_dim=args.vision_dim,
            hidden_size=args.hidden,
            num_heads=4,
            mlp_ratio=2,
            patch_size=PATCH,
            spatial_merge_size=MERGE,
            temporal_patch_size=TEMPORAL,
        ),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=args.hidden,
            intermediate_size=2 * args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.heads,
            max_position_embeddings=512,
            # a small theta so the lowest (w) frequencies still turn across 8-16 columns
            rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta, "mrope_section": section},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.eos_token_id, config.pad_token_id, config.bos_token_id = (
        ids["<|im_end|>"],
        ids["<|endoftext|>"],
        ids["<|endoftext|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        do_sample=False,
        max_new_tokens=4,
    )
    return model


def pixel_values_of(image) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Same result as the processor for sizes that are multiples of 28 (checked at start-up), ~10x faster."""
    arr = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
    x = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())  # (3, H, W)
    gh, gw = x.shape[1] // PATCH, x.shape[2] // PATCH
    x = x.reshape(3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/2, gw/2, 2, 2, 3, 14, 14)
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, TEMPORAL, -1, -1)  # (.., 3, T, 14, 14)
    return x.reshape(gh * gw, 3 * TEMPORAL * PATCH * PATCH), (1, gh, gw)


class Batcher:
    """Turns samples into left-padded model inputs with the answer (and <|im_end|>) appended."""

    def __init__(self, processor):
        self.processor, tok = processor, processor.tokenizer
        self.pad_id = tok.pad_token_id
        self.image_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.end_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.answer_ids = {w: tok.convert_tokens_to_ids(w) for w in demo_data.vocabulary()}
        self._cache: dict[tuple, list[int]] = {}

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, question: str, n_image_tokens: int) -> list[int]:
        key = (question, n_image_tokens)
        if key not in self._cache:
            ids = self.processor.tokenizer(self.prompt(question))["input_ids"]
            i = ids.index(self.image_id)
            self._cache[key] = ids[:i] + [self.image_id] * n_image_tokens + ids[i + 1 :]
        return self._cache[key]

    def __call__(self, samples, with_answer: bool = True) -> dict[str, torch.Tensor]:
        pix, grids, seqs = [], [], []
        for s in samples:
            pv, thw = pixel_values_of(s.image)
            pix.append(pv)
            grids.append(thw)
            ids = self.prompt_ids(s.question, pv.shape[0] // MERGE**2)
            seqs.append(ids + ([self.answer_ids[s.answer]] if with_answer else []))
        length = max(map(len, seqs))
        input_ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for b, ids in enumerate(seqs):
            input_ids[b, length - len(ids) :] = torch.tensor(ids)
            attention_mask[b, length - len(ids) :] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mm_token_type_ids": (input_ids == self.image_id).long(),
            "pixel_values": torch.cat(pix),
            "image_grid_thw": torch.tensor(grids),
        }


def ShapeAt(obj):  # noqa: N802 - the object moved to the origin of its own box
    x0, y0, x1, y1 = obj.box_xyxy
    return demo_data.ShapeObject(obj.shape, obj.color, (0, 0, x1 - x0, y1 - y0))


def object_cover(sample) -> np.ndarray:
    """Pixels of each object per vision token (row-major, 28x28 px cells): (n_objects, gh*gw)."""
    width, height = sample.image.size
    gh, gw = height // 28, width // 28
    cover = np.zeros((len(sample.objects), gh * gw))
    for i, obj in enumerate(sample.objects):
        x0, y0, x1, y1 = obj.box_xyxy
        mask = np.zeros((height, width), np.float32)
        box = demo_data.render([ShapeAt(obj)], (x1 - x0, y1 - y0), (0, 0, 0))
        mask[y0:y1, x0:x1] = np.asarray(box).max(-1) > 0  # (H, W) object pixels
        cover[i] = mask.reshape(gh, 28, gw, 28).sum((1, 3)).reshape(-1)  # (gh*gw,)
    return cover


def token_labels(sample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per vision token (row-major): shape class and colour class of the object covering most of
    the cell (>= 25% of it, 0 = background) and the image side of the cell centre (0 left,
    1 right, -100 = on the middle line). Targets of the training-only probes."""
    width, height = sample.image.size
    gh, gw = height // 28, width // 28
    cover = object_cover(sample)
    owner = np.concatenate([np.full((1, gh * gw), 0.25 * 28 * 28 - 1e-3), cover]).argmax(0)  # (gh*gw,)
    shape_lut = [0] + [1 + demo_data.SHAPES.index(o.shape) for o in sample.objects]
    color_lut = [0] + [1 + list(demo_data.COLORS).index(o.color) for o in sample.objects]
    shape_ids, color_ids = np.take(shape_lut, owner), np.take(color_lut, owner)
    centre = (np.arange(gw) + 0.5) / gw  # (gw,) cell centres as a share of the width
    side = np.where(centre < 0.5, 0, np.where(centre > 0.5, 1, -100))
    return torch.tensor(shape_ids), torch.tensor(color_ids), torch.tensor(np.tile(side, gh))


def check_against_processor(batcher: Batcher, seed: int = 123) -> None:
    """The fast path must reproduce what the app's processor call gives, token for token."""
    for s in demo_data.make_samples(seed, 8):
        ref = batcher.processor(images=[s.image], text=[batcher.prompt(s.question)], return_tensors="pt")
        ours = batcher([s], with_answer=False)
        assert torch.equal(ref["input_ids"], ours["input_ids"]), "token ids differ from the processor"
        assert torch.equal(ref["image_grid_thw"], ours["image_grid_thw"]), "grid differs from the processor"
        assert torch.equal(ref["mm_token_type_ids"].long(), ours["mm_token_type_ids"]), "mm_token_type_ids differ"
        err = (ref["pixel_values"] - ours["pixel_values"]).abs().max().item()
        assert err < 1e-4, f"pixel_values differ from the processor by {err}"


def curriculum(step: int, total: int, two_object_until: float) -> dict:
    """Sampling options for a step: single objects first (to learn shape), then two-object scenes
    (the simplest that need a lookup of the asked-about object), then 2-4 objects."""
    frac = step / total
    if frac < 0.1:
        return {"n_objects": 1}
    if frac < two_object_until:
        return {"n_objects": 2 if random.random() < 0.7 else 1}
    if frac < 0.2:
        return {"n_objects": None if random.random() < 0.5 else 1}
    return {"n_objects": None if random.random() < 0.9 else 1}


def batch_samples(seed: int, step: int, batch_size: int, total: int, two_object_until: float) -> list:
    """The training batch of `step` depends only on (seed, step), so a resumed run sees the same data."""
    # string seeds: never equal to the integer seeds used for held-out evaluation and the benchmark
    rng = random.Random(f"train-{seed}-{step}")
    random.seed(f"curriculum-{seed}-{step}")  # for curriculum()
    size = demo_data.pick_size(rng)  # one size per batch keeps the sequences the same length
    return [
        demo_data.make_sample(rng, size=size, **curriculum(step, total, two_object_until)) for _ in range(batch_size)
    ]


class TokenProbe(torch.nn.Module):
    """Training-only linear probe on the vision tokens (the merger's output): which shape and
    colour is under each token. Its dense loss teaches the tiny vision tower shape features far
    faster than one answer word per image; it is not saved and never touches the attention."""

    def __init__(self, model):
        super().__init__()
        self.head = torch.nn.Linear(model.config.get_text_config().hidden_size, 1 + 3 + 1 + 6)
        self.features = None
        model.model.visual.merger.register_forward_hook(lambda mod, inp, out: setattr(self, "features", out))

    def loss(self, shape_ids, color_ids) -> torch.Tensor:
        logits = self.head(self.features)  # (n_tokens, 11)
        return F.cross_entropy(logits[:, :4], shape_ids) + F.cross_entropy(logits[:, 4:], color_ids)


class PositionProbe(torch.nn.Module):
    """Training-only linear probe on the decoder's vision-token states after one layer: is the
    token left or right of the image middle? Nothing in a vision token carries absolute position
    (the vision tower's rotary embedding is relative); the decoder can work it out from the M-RoPE
    phase against the tokens before the image, and this dense loss teaches it to do so early,
    which "where" questions need. Not saved; it reads the states and never touches the attention."""

    def __init__(self, model, layer: int):
        super().__init__()
        self.head = torch.nn.Linear(model.config.get_text_config().hidden_size, 2)
        self.states = None
        model.model.language_model.layers[layer].register_forward_hook(
            lambda mod, inp, out: setattr(self, "states", out[0] if isinstance(out, tuple) else out)
        )

    def loss(self, is_image: torch.Tensor, side_ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.states[is_image]), side_ids, ignore_index=-100)


def vision_batch(seed: int, step: int, vision_steps: int) -> list:
    """Stage-1 data: small single-object images first (cheap, ~4x fewer patches), then full scenes."""
    rng = random.Random(f"vision-{seed}-{step}")
    if step < vision_steps - 100:
        return [demo_data.make_sample(rng, size=(112, 112), n_objects=1, question_type="color") for _ in range(64)]
    return [demo_data.make_sample(rng, size=demo_data.pick_size(rng)) for _ in range(16)]


def probe_step(model, probe, samples) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: train only the vision tower (+ probe) on per-token shape/colour labels."""
    pixel_values, grids = zip(*[pixel_values_of(s.image) for s in samples], strict=True)
    shape_ids, color_ids = map(torch.cat, list(zip(*map(token_labels, samples), strict=True))[:2])  # (n_tokens,) each
    model.model.visual(torch.cat(pixel_values), grid_thw=torch.tensor(grids))
    loss = probe.loss(shape_ids, color_ids)
    on_object = shape_ids > 0
    acc = (probe.head(probe.features)[:, :4].argmax(-1)[on_object] == shape_ids[on_object]).float().mean()
    return loss, acc


def knockout_mask(model, inputs: dict, p_knockout: float, step: int = 0) -> dict:
    """Training-only regulariser: in a random share of the samples, the prompt's text tokens after
    the image may not attend to the image; only the last prompt position (which predicts the
    answer) and the answer position still can. The model must then look things up from the
    position whose attention the app shows, instead of routing the lookup through the question
    words. At inference the mask is the ordinary causal one. Returns inputs with a 4-D float mask
    and explicit M-RoPE positions (computed from the 2-D mask, as the model would)."""
    input_ids, mask2d = inputs["input_ids"], inputs["attention_mask"]  # (B, S)
    position_ids, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=mask2d,
    )
    bsz, seq = input_ids.shape
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool)).expand(bsz, seq, seq).clone()  # (B, q, kv)
    allowed &= mask2d.bool()[:, None, :]
    is_image = inputs["mm_token_type_ids"].bool()  # (B, S)
    after_image = torch.cumsum(is_image.long(), 1).bool() & ~is_image  # text positions after the image
    readers_blocked = after_image.clone()
    readers_blocked[:, -2:] = False  # the last prompt position and the answer position keep the image
    knocked = torch.rand(bsz, generator=torch.Generator().manual_seed(step)) < p_knockout  # (B,), per step
    block = knocked[:, None, None] & readers_blocked[:, :, None] & is_image[:, None, :]  # (B, q, kv)
    allowed &= ~block
    allowed |= torch.eye(seq, dtype=torch.bool)[None]  # padded rows attend to themselves (no NaN)
    mask4d = torch.zeros(bsz, 1, seq, seq).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return {**inputs, "attention_mask": mask4d, "position_ids": position_ids}


def answer_loss(model, probes, batch, args, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answer word (last prompt position) and of <|im_end|> after it, plus
    the training-only losses: vision-token probe and decoder position probe."""
    probe, position_probe = probes
    inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if args.knockout > 0:
        inputs = knockout_mask(model, inputs, args.knockout, step)
    logits = model(**inputs, logits_to_keep=2).logits  # (B, 2, V): predictions for [answer, <|im_end|>]
    loss_answer = F.cross_entropy(logits[:, 0], batch["labels"][:, 0])
    loss_end = F.cross_entropy(logits[:, 1], batch["labels"][:, 1])
    loss = loss_answer + 0.1 * loss_end
    is_image = batch["mm_token_type_ids"].bool()  # (B, S)
    if args.aux_weight > 0:
        loss = loss + args.aux_weight * probe.loss(batch["shape_ids"], batch["color_ids"])
    if args.position_weight > 0:
        loss = loss + args.position_weight * position_probe.loss(is_image, batch["side_ids"])
    return loss, (logits[:, 0].argmax(-1) == batch["labels"][:, 0]).float().mean()


LABEL_KEYS = ("labels", "shape_ids", "color_ids", "side_ids")


def with_labels(batcher: Batcher, samples) -> dict[str, torch.Tensor]:
    batch = batcher(samples)
    answers = torch.tensor([batcher.answer_ids[s.answer] for s in samples])
    batch["labels"] = torch.stack([answers, torch.full_like(answers, batcher.end_id)], 1)  # (B, 2)
    per_token = [torch.cat(t) for t in zip(*map(token_labels, samples), strict=True)]  # each (n_tokens,)
    batch["shape_ids"], batch["color_ids"], batch["side_ids"] = per_token
    return batch


@torch.no_grad()
def evaluate(model, batcher: Batcher, seed: int, n: int, **kwargs) -> dict[str, float]:
    """Answer accuracy per question type from the answer-word logits (same as greedy step 0)."""
    model.eval()
    rng = random.Random(seed)
    hits: dict[str, list[int]] = {}
    for _ in range(0, n, 50):
        size = demo_data.pick_size(rng)
        samples = [demo_data.make_sample(rng, size=size, **kwargs) for _ in range(50)]
        logits = model(**batcher(samples, with_answer=False), logits_to_keep=1).logits[:, -1]  # (B, V)
        pred = logits.argmax(-1).tolist()
        for s, p in zip(samples, pred, strict=True):
            hits.setdefault(s.question_type, []).append(int(p == batcher.answer_ids[s.answer]))
    model.train()
    res = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
    res["all"] = float(np.mean([h for v in hits.values() for h in v]))
    return res


def lr_at(step: int, total: int, peak: float, warmup: int = 150) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    processor = build_processor()
    batcher = Batcher(processor)
    check_against_processor(batcher)
    model = build_model(processor.tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters", n_params / 1e6)
    probe = TokenProbe(model)
    position_probe = PositionProbe(model, args.position_layer)
    params = list(model.parameters()) + list(probe.parameters()) + list(position_probe.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step = 0
    if args.resume and os.path.exists(args.ckpt):
        state = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        position_probe.load_state_dict(state["position_probe"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log.info("resumed from %s at step %d", args.ckpt, step)
    model.train()
    t0, run_loss, run_acc = time.time(), 0.0, 0.0
    total = args.vision_steps + args.steps  # stage 1 (vision tower + probe), then stage 2 (everything)
    while step < total:
        stage2_step = step - args.vision_steps
        if stage2_step < 0:
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 50)
            loss, acc = probe_step(model, probe, vision_batch(args.seed, step, args.vision_steps))
        else:
            for group in opt.param_groups:
                group["lr"] = lr_at(stage2_step, args.steps, args.answer_lr or args.lr)
            batch = with_labels(
                batcher, batch_samples(args.seed, stage2_step, args.batch, args.steps, args.two_object_until)
            )
            loss, acc = answer_loss(model, (probe, position_probe), batch, args, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        run_loss, run_acc = run_loss + loss.item(), run_acc + acc.item()
        if step % args.log_every == 0:
            log.info(
                "%s step %d/%d loss %.3f acc %.3f lr %.2e %.2fs/step",
                "answer" if stage2_step >= 0 else "vision-probe (acc = shape of object tokens)",
                step,
                total,
                run_loss / args.log_every,
                run_acc / args.log_every,
                opt.param_groups[0]["lr"],
                (time.time() - t0) / args.log_every,
            )
            t0, run_loss, run_acc = time.time(), 0.0, 0.0
        if (stage2_step >= 0 and step % args.eval_every == 0) or step in (args.vision_steps, total):
            log.info(
                "eval step %d: single %s | scenes %s",
                step,
                evaluate(model, batcher, 999, 150, n_objects=1),
                evaluate(model, batcher, 998, 300),
            )
            torch.save(
                {
                    "model": model.state_dict(),
                    "probe": probe.state_dict(),
                    "opt": opt.state_dict(),
                    "position_probe": position_probe.state_dict(),
                    "step": step,
                },
                args.ckpt,
            )
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "ckpt", "resume")}
    save_and_verify(model, processor, args.out, settings)


def save_and_verify(model, processor, out: str, settings: dict) -> None:
    """Save, reload through the Auto classes as the app does, and check held-out generate() answers.
    The training settings go next to the weights (`training_args.json`) as a record of the run."""
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    Path(out, "training_args.json").write_text(json.dumps(settings, indent=1) + "\n")
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    hits: dict[str, list[int]] = {}
    for s in demo_data.make_samples(4242, 200):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[s.image], text=[text], return_tensors="pt")
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
        words = processor.tokenizer.convert_ids_to_tokens(gen.tolist())
        hits.setdefault(s.question_type, []).append(int(words[:2] == [s.answer, "<|im_end|>"]))
    log.info(
        "reloaded generate() exact answers on 200 held-out images (seed 4242): %s, overall %.3f",
        {k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())},
        np.mean([h for v in hits.values() for h in v]),
    )
    size_mb = sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6
    log.info("saved to %s (%.1f MB)", out, size_mb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_model")
    p.add_argument("--ckpt", default="/tmp/demo_model_ckpt.pt", help="checkpoint for --resume")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500, help="stage 2: answer loss (+ probe)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vision-steps", type=int, default=550, help="stage 1: vision tower + probe only")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--answer-lr",
        type=float,
        default=5e-4,
        help="stage 2 peak learning rate; 2e-3 (the stage-1 rate) left the object look-up unlearned",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (the committed weights used 2); another count changes the float summation "
        "order and so the run",
    )
    p.add_argument(
        "--two-object-until",
        type=float,
        default=0.35,
        help="curriculum: share of stage 2 that ends the two-object phase (0.1 = no such phase)",
    )
    p.add_argument(
        "--knockout",
        type=float,
        default=0.5,
        help="share of samples whose question words may not attend to the image (see knockout_mask)",
    )
    p.add_argument("--aux-weight", type=float, default=0.5, help="weight of the vision-token probe loss")
    p.add_argument(
        "--position-weight",
        type=float,
        default=0.5,
        help="weight of the decoder position probe (left/right of each vision token)",
    )
    p.add_argument("--position-layer", type=int, default=1, help="decoder layer whose output the position probe reads")
    p.add_argument("--vision-depth", type=int, default=3)
    p.add_argument("--vision-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rope-theta", type=float, default=20.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=250)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(args)


if __name__ == "__main__":
    main()
