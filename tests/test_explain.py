"""Rollout and gradient-weighted attention equal their closed forms, computed independently."""

import numpy as np
import pytest
import torch

from conftest import noise_image
from families import attention_implementation, load_attention
from methods import explain
from methods.explain import gradient_map, rollout_map


def _run(holder, image):
    return holder.generate(
        image, "What is this?", max_new_tokens=3, min_new_tokens=3, suppress_tokens=[holder.model.config.image_token_id]
    )


def _eager_attentions(holder, run, image, step_idx, grad: bool = False):
    inputs = holder.teacher_forced_inputs(image, "What is this?", run.generated_ids[:step_idx])
    with attention_implementation(holder.model, text="eager"), torch.set_grad_enabled(grad):
        return holder.model(**inputs, output_attentions=True)


@pytest.mark.parametrize(
    "family",
    [
        "qwen2_vl",
        "qwen2_5_vl",
        "glm4v",
        "gemma3",
        "mistral3",
        "llava",
        "llava_next",
        "internvl",
        "idefics3",
        "paligemma",
    ],
)
def test_rollout_equals_the_product_of_mixed_attention(load_holder, family):
    holder = load_holder(family)
    image = noise_image(150, 100)
    run = _run(holder, image)
    out = _eager_attentions(holder, run, image, 2)
    seq = out.attentions[0].shape[-1]
    row = torch.zeros(seq)
    row[-1] = 1.0
    for attn in reversed(out.attentions):  # (1, H, S, S) each
        row = row @ (0.5 * attn[0].mean(0) + 0.5 * torch.eye(seq))
    expected = row[torch.from_numpy(run.vision.token_positions)].reshape(run.vision.grid_hw).numpy()
    got = rollout_map(holder, run, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    loaded = load_attention(family)  # restored after the pass
    assert holder.model.config.get_text_config()._attn_implementation == (
        loaded["text_config"] if isinstance(loaded, dict) else loaded
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_gradient_map_follows_chefers_rule(load_holder, family):
    holder = load_holder(family)
    image = noise_image(150, 100)
    run = _run(holder, image)
    out = _eager_attentions(holder, run, image, 1, grad=True)
    grads = torch.autograd.grad(out.logits[0, -1, run.generated_ids[1]], out.attentions)
    seq = out.attentions[0].shape[-1]
    relevance = torch.eye(seq)
    for attn, grad in zip(out.attentions, grads, strict=True):
        relevance = relevance + (grad[0] * attn[0]).clamp(min=0).mean(0).detach() @ relevance
    positions = torch.from_numpy(run.vision.token_positions)
    expected = relevance[-1][positions].reshape(run.vision.grid_hw).numpy()
    np.testing.assert_allclose(gradient_map(holder, run, 1), expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in holder.model.parameters())
    with pytest.raises(MemoryError, match="max pixels"):
        gradient_map(holder, run, 1, max_mb=0.001)


def _upsampled(heat: np.ndarray, merge: int = 2) -> np.ndarray:
    """Each merged cell's weight split evenly over its merge × merge patches."""
    return np.kron(heat, np.ones((merge, merge))) / (merge * merge)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_vit_combined_map_places_patches_and_windows_right(load_holder, family, monkeypatch):
    holder = load_holder(family)
    image = noise_image(224, 168)
    run = holder.generate(image, "What?", max_new_tokens=1)
    heat = np.random.default_rng(0).random(run.vision.grid_hw).astype(np.float32)
    # Self-attention only: the map is the decoder map split over each token's 2×2 patches, in place.
    monkeypatch.setattr(explain, "_vision_attention_rows", lambda q, k, s: torch.eye(q.shape[1]))
    np.testing.assert_allclose(explain.vit_combined_map(holder, run, heat), _upsampled(heat), rtol=1e-6)
    # Uniform attention inside each chunk: full blocks spread to the mean, window blocks to the window mean.
    monkeypatch.setattr(
        explain, "_vision_attention_rows", lambda q, k, s: torch.full((q.shape[1],) * 2, 1 / q.shape[1])
    )
    got = explain.vit_combined_map(holder, run, heat)
    expected = _upsampled(heat)
    vision = holder.model.model.visual
    full_blocks = set(getattr(vision, "fullatt_block_indexes", range(len(vision.blocks))))
    units = vision.window_size // vision.patch_size if hasattr(vision, "window_size") else None
    for block in reversed(range(len(vision.blocks))):
        if block in full_blocks:
            expected = 0.5 * expected + 0.5 * expected.mean()
        else:  # windows of units × units patches
            side = units
            for r in range(0, expected.shape[0], side):
                for c in range(0, expected.shape[1], side):
                    window = expected[r : r + side, c : c + side]
                    window[...] = 0.5 * window + 0.5 * window.mean()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.sum() == pytest.approx(heat.sum(), rel=1e-5)  # rollout rows sum to one


def test_vit_combined_map_equals_clip_rollout(load_holder):
    from methods.explain import vit_combined_map

    holder = load_holder("llava")
    image = noise_image(150, 100)
    run = holder.generate(image, "What?", max_new_tokens=1)
    heat = np.random.default_rng(1).random(run.vision.grid_hw).astype(np.float32)
    inputs = holder.build_inputs(image, "What?")
    saved = holder.model.config.vision_config._attn_implementation
    holder.model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            attentions = holder.model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    finally:
        holder.model.set_attn_implementation({"vision_config": saved})
    last = len(attentions) + holder.model.config.vision_feature_layer  # feature layer -2
    relevance = torch.cat([torch.zeros(1), torch.from_numpy(heat).flatten()])
    for attn in reversed(attentions[: last + 1]):
        n = attn.shape[-1]
        relevance = relevance @ (0.5 * attn[0].mean(0) + 0.5 * torch.eye(n))
    expected = relevance[1:].reshape(run.vision.grid_hw).numpy()
    np.testing.assert_allclose(vit_combined_map(holder, run, heat), expected, rtol=1e-4, atol=1e-7)


def test_replays_use_the_runs_own_images(load_holder):
    holder = load_holder("qwen2_vl")
    image = noise_image(150, 100)
    run = holder.generate(image, "What?", max_new_tokens=2, min_new_tokens=2, max_pixels=112 * 112)
    assert run.images == [image] and run.images[0] is image  # prepared once, kept, not reloaded
    replay = holder.replay_inputs(run, 1)
    direct = holder.teacher_forced_inputs(image, "What?", run.generated_ids[:1], max_pixels=112 * 112)
    assert torch.equal(replay["pixel_values"], direct["pixel_values"])
    assert torch.equal(replay["input_ids"], direct["input_ids"])
    with pytest.raises(ValueError, match="sizes"):
        holder.replay_inputs(run, 1, [noise_image(100, 100)])
    run.images = []
    with pytest.raises(ValueError, match="Generate from an image"):
        rollout_map(holder, run, 1)


@pytest.mark.parametrize("family", ["gemma3", "mistral3", "pixtral"])
def test_vit_map_is_refused_with_a_reason_for_pixtral_towers(load_holder, family):
    holder = load_holder(family)
    run = holder.generate(noise_image(150, 100), "What?", max_new_tokens=1)
    with pytest.raises(ValueError, match="not available"):
        explain.vit_combined_map(holder, run, np.ones(run.vision.grid_hw, dtype=np.float32))
    assert rollout_map(holder, run, 0).shape == run.vision.grid_hw  # the other methods work
