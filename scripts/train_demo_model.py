"""Train the app's offline demo model: a tiny real Qwen2-VL that answers shape questions in one word.

Builds a word-level tokenizer, a Qwen2VLProcessor and a Qwen2VLForConditionalGeneration from
scratch, trains it on the CPU on `demo_data` samples (seeded, resumable), checks answer accuracy on
held-out data and saves everything with `save_pretrained` into `demo_model/`.

    nice -n 15 python scripts/train_demo_model.py --out demo_model
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo_data  # noqa: E402

log = logging.getLogger("train_demo_model")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
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
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[1:7], padding_side="left", chat_template=CHAT_TEMPLATE,
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                            patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, args) -> Qwen2VLForConditionalGeneration:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = args.hidden // args.heads
    half = head_dim // 2  # rotary frequencies per head; M-RoPE splits them into (t, h, w)
    section = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    config = Qwen2VLConfig(
        vision_config=dict(depth=args.vision_depth, embed_dim=args.vision_dim, hidden_size=args.hidden,
                           num_heads=4, mlp_ratio=2, patch_size=PATCH, spatial_merge_size=MERGE,
                           temporal_patch_size=TEMPORAL),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=512,
                         # a small theta so the lowest (w) frequencies still turn across 8-16 columns
                         rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta,
                                          "mrope_section": section},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.eos_token_id, config.pad_token_id, config.bos_token_id = (
        ids["<|im_end|>"], ids["<|endoftext|>"], ids["<|endoftext|>"])
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                                               bos_token_id=ids["<|endoftext|>"], do_sample=False,
                                               max_new_tokens=4)
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
            self._cache[key] = ids[:i] + [self.image_id] * n_image_tokens + ids[i + 1:]
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
            input_ids[b, length - len(ids):] = torch.tensor(ids)
            attention_mask[b, length - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mm_token_type_ids": (input_ids == self.image_id).long(),
                "pixel_values": torch.cat(pix), "image_grid_thw": torch.tensor(grids)}


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


def curriculum(step: int, total: int) -> dict:
    """Sampling options for a step: single objects first (to learn shape), then mixed scenes."""
    frac = step / total
    if frac < 0.15:
        return {"n_objects": 1}
    if frac < 0.3:
        return {"n_objects": None if random.random() < 0.5 else 1}
    return {"n_objects": None if random.random() < 0.9 else 1}


def batch_samples(seed: int, step: int, batch_size: int, total: int) -> list:
    """The training batch of `step` depends only on (seed, step), so a resumed run sees the same data."""
    # string seeds: never equal to the integer seeds used for held-out evaluation and the benchmark
    rng = random.Random(f"train-{seed}-{step}")
    random.seed(f"curriculum-{seed}-{step}")  # for curriculum()
    size = demo_data.pick_size(rng)  # one size per batch keeps the sequences the same length
    return [demo_data.make_sample(rng, size=size, **curriculum(step, total)) for _ in range(batch_size)]


def answer_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the answer word (last prompt position) and of <|im_end|> after it."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=2)
    logits = out.logits  # (B, 2, V): predictions for [answer, <|im_end|>]
    loss_answer = F.cross_entropy(logits[:, 0], batch["labels"][:, 0])
    loss_end = F.cross_entropy(logits[:, 1], batch["labels"][:, 1])
    return loss_answer + 0.1 * loss_end, (logits[:, 0].argmax(-1) == batch["labels"][:, 0]).float().mean()


def with_labels(batcher: Batcher, samples) -> dict[str, torch.Tensor]:
    batch = batcher(samples)
    answers = torch.tensor([batcher.answer_ids[s.answer] for s in samples])
    batch["labels"] = torch.stack([answers, torch.full_like(answers, batcher.end_id)], 1)  # (B, 2)
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
        for s, p in zip(samples, pred):
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
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    step = 0
    if args.resume and os.path.exists(args.ckpt):
        state = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log.info("resumed from %s at step %d", args.ckpt, step)
    model.train()
    t0, run_loss, run_acc = time.time(), 0.0, 0.0
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss, acc = answer_loss(model, with_labels(batcher, batch_samples(args.seed, step, args.batch, args.steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss, run_acc = run_loss + loss.item(), run_acc + acc.item()
        if step % args.log_every == 0:
            log.info("step %d/%d loss %.3f acc %.3f lr %.2e %.2fs/step", step, args.steps, run_loss / args.log_every,
                     run_acc / args.log_every, opt.param_groups[0]["lr"], (time.time() - t0) / args.log_every)
            t0, run_loss, run_acc = time.time(), 0.0, 0.0
        if step % args.eval_every == 0 or step == args.steps:
            log.info("eval step %d: single %s | scenes %s", step, evaluate(model, batcher, 999, 150, n_objects=1),
                     evaluate(model, batcher, 998, 300))
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, args.ckpt)
    save_and_verify(model, processor, args.out)


def save_and_verify(model, processor, out: str) -> None:
    """Save, reload through the Auto classes as the app does, and check held-out generate() answers."""
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    hits: dict[str, list[int]] = {}
    for s in demo_data.make_samples(4242, 200):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=[s.image], text=[text], return_tensors="pt")
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        words = processor.tokenizer.convert_ids_to_tokens(gen.tolist())
        hits.setdefault(s.question_type, []).append(int(words[:2] == [s.answer, "<|im_end|>"]))
    log.info("reloaded generate() exact answers on 200 held-out images (seed 4242): %s, overall %.3f",
             {k: round(float(np.mean(v)), 3) for k, v in sorted(hits.items())},
             np.mean([h for v in hits.values() for h in v]))
    size_mb = sum(f.stat().st_size for f in Path(out).iterdir()) / 1e6
    log.info("saved to %s (%.1f MB)", out, size_mb)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_model")
    p.add_argument("--ckpt", default="/tmp/demo_model_ckpt.pt", help="checkpoint for --resume")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
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
