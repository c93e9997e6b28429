"""Captured rows are exactly the attention that produced each token, for every family."""

import pytest
import torch

from attention_extractor import CAPTURE_IMPLEMENTATION, capture_attention
from conftest import noise_image
from families import attention_implementation, decoder_layers, prefix_lm, softmax_layers
from testing.tiny_models import FAMILIES

SIZES = [(150, 100), (100, 150), (224, 224)]  # landscape, portrait, square (W, H)
NEW_TOKENS = 5


def _generate_kwargs(holder, min_new_tokens: int = NEW_TOKENS) -> dict:
    # Random models can stop early or emit the image placeholder, which a replay cannot take back.
    return dict(min_new_tokens=min_new_tokens, suppress_tokens=[holder.model.config.image_token_id])


def _teacher_forced_eager(holder, image, prompt, generated_ids) -> list[torch.Tensor]:
    """Reference: one eager forward over prompt + generated ids, output_attentions=True.

    Returns per step t the rows (L, H, prompt_len + t) of the query at prompt_len - 1 + t.
    """
    inputs = holder.teacher_forced_inputs(image, prompt, generated_ids[:-1])  # (1, S + T - 1)
    prompt_len = inputs["input_ids"].shape[1] - (len(generated_ids) - 1)
    saved = holder.model.config.get_text_config()._attn_implementation
    holder.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = holder.model(**inputs, output_attentions=True)
    finally:
        holder.model.set_attn_implementation({"text_config": saved})
    attn = torch.stack(out.attentions)[:, 0]  # (L, H, S', S')
    return [attn[:, :, prompt_len - 1 + t, : prompt_len + t] for t in range(len(generated_ids))]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_captured_rows_equal_eager_attention(load_holder, family, size):
    holder = load_holder(family)
    image = noise_image(*size, seed=size[0])
    run = holder.generate(image, "Describe the picture.", max_new_tokens=NEW_TOKENS, **_generate_kwargs(holder))
    reference = _teacher_forced_eager(holder, image, "Describe the picture.", run.generated_ids)
    assert run.num_steps == NEW_TOKENS
    for t in range(run.num_steps):
        captured = run.step_attention(t)
        assert captured.dtype == torch.float16 and captured.device.type == "cpu"
        assert captured.shape == (len(softmax_layers(holder.model)), holder.num_heads, len(run.prompt_ids) + t)
        # fp16 storage rounds each value by at most ~5e-4 of itself.
        torch.testing.assert_close(captured.float(), reference[t], rtol=2e-3, atol=2e-6)
        torch.testing.assert_close(captured.float().sum(-1), torch.ones(captured.shape[:2]), rtol=0, atol=2e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_eager_hook_reference_and_plain_generation(load_holder, family, dummy_image):
    holder = load_holder(family)
    kwargs = _generate_kwargs(holder)
    fast = holder.generate(dummy_image, "What is this?", max_new_tokens=NEW_TOKENS, **kwargs)
    eager = holder.generate(dummy_image, "What is this?", max_new_tokens=NEW_TOKENS, method="eager", **kwargs)
    inputs = holder.build_inputs(dummy_image, "What is this?")
    with torch.no_grad():
        plain = holder.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    assert fast.generated_ids == plain[0, inputs["input_ids"].shape[1] :].tolist()
    assert eager.generated_ids == fast.generated_ids
    for t in range(fast.num_steps):
        torch.testing.assert_close(
            fast.step_attention(t).float(), eager.step_attention(t).float(), rtol=2e-3, atol=2e-6
        )


def test_layers_differ_by_far_more_than_the_tolerance(load_holder, dummy_image):
    """Guards the tests above: a wrong layer or head would not pass for a right one."""
    holder = load_holder("qwen2_vl")
    run = holder.generate(dummy_image, "Hi", max_new_tokens=2, **_generate_kwargs(holder, 2))
    rows = run.step_attention(0).float()  # (L, H, S)
    assert (rows[0] - rows[1]).abs().max() > 0.05
    assert (rows[0, 0] - rows[0, 1]).abs().max() > 0.05


def test_step_zero_is_the_last_prompt_row(load_holder, dummy_image):
    holder = load_holder("qwen2_5_vl")
    run = holder.generate(dummy_image, "What is this?", max_new_tokens=3, **_generate_kwargs(holder, 3))
    inputs = holder.build_inputs(dummy_image, "What is this?")
    holder.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = holder.model(**inputs, output_attentions=True)
    finally:
        holder.model.set_attn_implementation({"text_config": "sdpa"})
    last_row = torch.stack(out.attentions)[:, 0, :, -1, :]  # (L, H, S)
    assert run.step_attention(0).shape[-1] == len(run.prompt_ids) == last_row.shape[-1]
    torch.testing.assert_close(run.step_attention(0).float(), last_row, rtol=2e-3, atol=2e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_token_rows_equal_eager_attention(load_holder, family, dummy_image):
    holder = load_holder(family)
    fast = holder.generate(dummy_image, "Where is the red circle?", max_new_tokens=2, prompt_rows="all")
    eager = holder.generate(
        dummy_image, "Where is the red circle?", max_new_tokens=2, prompt_rows="all", method="eager"
    )
    vision = {int(pos) for layout in fast.visions for pos in layout.token_positions}
    if prefix_lm(family):  # the prompt is one bidirectional prefix: no causal prompt rows
        assert fast.prompt_positions == eager.prompt_positions == []
        return
    assert fast.prompt_positions == [p for p in range(len(fast.prompt_ids) - 1) if p not in vision]
    inputs = holder.build_inputs(dummy_image, "Where is the red circle?")
    with attention_implementation(holder.model, text="eager"), torch.no_grad():
        attn = torch.stack(holder.model(**inputs, output_attentions=True).attentions)[:, 0]  # (L, H, S, S)
    for pos in fast.prompt_positions:
        row = fast.prompt_attention(pos)
        assert row.shape == (len(softmax_layers(holder.model)), holder.num_heads, pos + 1)
        torch.testing.assert_close(row.float(), attn[:, :, pos, : pos + 1], rtol=2e-3, atol=2e-6)
        torch.testing.assert_close(row.float(), eager.prompt_attention(pos).float(), rtol=2e-3, atol=2e-6)
    question = holder.generate(dummy_image, "Where is the red circle?", max_new_tokens=1)
    assert question.prompt_positions and min(question.prompt_positions) > max(vision)
    assert holder.generate(dummy_image, "Hi", max_new_tokens=1, prompt_rows="none").prompt_rows is None


def test_layers_option_narrows_capture(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    full = holder.generate(dummy_image, "Hi", max_new_tokens=3, **_generate_kwargs(holder, 3))
    part = holder.generate(dummy_image, "Hi", max_new_tokens=3, capture_layers=[2, 0], **_generate_kwargs(holder, 3))
    assert part.layer_indices == [0, 2]
    assert part.step_attention(1).shape == (2, holder.num_heads, len(part.prompt_ids) + 1)
    torch.testing.assert_close(part.step_attention(1), full.step_attention(1)[[0, 2]])


class _RaiseAtStep:
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls > self.step:
            raise RuntimeError("boom inside generation")
        return scores


@pytest.mark.parametrize("method", ["sdpa", "eager"])
def test_model_is_restored_when_generation_raises(load_holder, dummy_image, method):
    from transformers import LogitsProcessorList

    holder = load_holder("qwen2_vl")
    before = dict(
        text=holder.model.config.get_text_config()._attn_implementation,
        vision=holder.model.config.vision_config._attn_implementation,
    )
    hooks_before = [len(layer.self_attn._forward_hooks) for layer in decoder_layers(holder.model)]
    with pytest.raises(RuntimeError, match="boom"):
        holder.generate(
            dummy_image, "Hi", max_new_tokens=4, method=method, logits_processor=LogitsProcessorList([_RaiseAtStep(2)])
        )
    assert holder.model.config.get_text_config()._attn_implementation == before["text"] != CAPTURE_IMPLEMENTATION
    assert holder.model.config.vision_config._attn_implementation == before["vision"]
    assert [len(layer.self_attn._forward_hooks) for layer in decoder_layers(holder.model)] == hooks_before
    run = holder.generate(dummy_image, "Hi", max_new_tokens=2, **_generate_kwargs(holder, 2))
    assert run.num_steps == 2


def test_capture_fails_loudly_when_nothing_was_captured(load_holder):
    from errors import CaptureError

    holder = load_holder("qwen2_vl")
    with pytest.raises(CaptureError, match="generated tokens"):
        with capture_attention(holder.model) as recorder:
            pass  # no forward ran
        recorder.finish(prompt_len=10, num_steps=3, segments={})


def test_sliding_window_layers_show_exactly_what_they_saw(tmp_path):
    """Gemma 3: a token whose 8-key window no longer reaches the image has no image attention in the
    sliding layers (the rows apply the model's own sliding mask), while the full layer still has."""
    from model_holder import ModelHolder
    from pictures.stored_run import StoredRun, ViewSettings, raw_heatmap
    from pictures.views import caption
    from testing.tiny_models import make_tiny_model

    holder = ModelHolder.load(make_tiny_model("gemma3", tmp_path, sliding_window=8), device="cpu", dtype="float32")
    image = noise_image(150, 100, seed=5)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, suppress_tokens=[holder.model.config.image_token_index])
    eager = holder.generate(image, "Describe the picture please.", method="eager", **kwargs)
    run = holder.generate(image, "Describe the picture please.", **kwargs)
    assert run.generated_ids == eager.generated_ids and run.windows == [8, 8, None]
    for t in range(run.num_steps):
        torch.testing.assert_close(run.step_attention(t).float(), eager.step_attention(t).float(), rtol=2e-3, atol=2e-6)
    image_mass = run.step_attention(run.num_steps - 1)[:, :, run.vision.token_positions].float().sum(-1)  # (L, H)
    assert (image_mass[:2] == 0).all() and (image_mass[2] > 0).all()
    assert run.out_of_window((0, 2), len(run.prompt_ids) - 1 + run.num_steps - 1) == [0, 1]
    stored = StoredRun(run)
    settings = ViewSettings(step_idx=run.num_steps - 1, layers=(0, 2), heads=(0, 3))
    assert "Layers 0, 1 attend through a sliding window" in caption(stored, settings, raw_heatmap(stored, settings))


def test_soft_capped_logits_are_captured_as_the_model_computes_them(load_holder, dummy_image):
    """PaliGemma 2 caps its attention logits (cap · tanh(score / cap)), which SDPA cannot do. With a cap
    small enough to matter, the captured rows still equal eager's, and differ from uncapped rows."""
    holder = load_holder("paligemma")
    modules = [layer.self_attn for layer in decoder_layers(holder.model)]
    saved = [module.attn_logit_softcapping for module in modules]
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, suppress_tokens=[holder.model.config.image_token_id])
    try:
        for module in modules:
            module.attn_logit_softcapping = 1.5
        fast = holder.generate(dummy_image, "Where is it?", **kwargs)
        eager = holder.generate(dummy_image, "Where is it?", method="eager", **kwargs)
        for module in modules:
            module.attn_logit_softcapping = None
        uncapped = holder.generate(dummy_image, "Where is it?", method="eager", **kwargs)
    finally:
        for module, cap in zip(modules, saved, strict=True):
            module.attn_logit_softcapping = cap
    assert fast.generated_ids == eager.generated_ids
    torch.testing.assert_close(fast.step_attention(0).float(), eager.step_attention(0).float(), rtol=2e-3, atol=2e-6)
    assert (fast.step_attention(0).float() - uncapped.step_attention(0).float()).abs().max() > 0.05
