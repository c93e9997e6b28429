"""Rollout and gradient-weighted attention equal their closed forms, computed independently."""

import numpy as np
import pytest
import torch

from conftest import noise_image
from explain import gradient_map, rollout_map


def _run(holder, image):
    return holder.generate(image, "What is this?", max_new_tokens=3, min_new_tokens=3,
                           suppress_tokens=[holder.model.config.image_token_id])


def _eager_attentions(holder, run, image, step_idx, grad: bool = False):
    inputs = holder.teacher_forced_inputs(image, "What is this?", run.generated_ids[:step_idx])
    holder.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.set_grad_enabled(grad):
            out = holder.model(**inputs, output_attentions=True)
    finally:
        holder.model.set_attn_implementation({"text_config": "sdpa"})
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava"])
def test_rollout_equals_the_product_of_mixed_attention(load_holder, family):
    holder = load_holder(family)
    image = noise_image(150, 100)
    run = _run(holder, image)
    out = _eager_attentions(holder, run, image, 2)
    seq = out.attentions[0].shape[-1]
    row = torch.zeros(seq)
    row[-1] = 1.0
    for attn in reversed(out.attentions):                                    # (1, H, S, S) each
        row = row @ (0.5 * attn[0].mean(0) + 0.5 * torch.eye(seq))
    expected = row[torch.from_numpy(run.vision.token_positions)].reshape(run.vision.grid_hw).numpy()
    got = rollout_map(holder, run, image, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert holder.model.config.get_text_config()._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_gradient_map_follows_chefers_rule(load_holder, family):
    holder = load_holder(family)
    image = noise_image(150, 100)
    run = _run(holder, image)
    out = _eager_attentions(holder, run, image, 1, grad=True)
    grads = torch.autograd.grad(out.logits[0, -1, run.generated_ids[1]], out.attentions)
    seq = out.attentions[0].shape[-1]
    relevance = torch.eye(seq)
    for attn, grad in zip(out.attentions, grads):
        relevance = relevance + (grad[0] * attn[0]).clamp(min=0).mean(0).detach() @ relevance
    positions = torch.from_numpy(run.vision.token_positions)
    expected = relevance[-1][positions].reshape(run.vision.grid_hw).numpy()
    np.testing.assert_allclose(gradient_map(holder, run, image, 1), expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in holder.model.parameters())
    with pytest.raises(MemoryError, match="max pixels"):
        gradient_map(holder, run, image, 1, max_mb=0.001)
