"""The capture engine: both stores exact, the model's own mask applied, the same computation as plain
generation, nothing but bookkeeping in the decode loop, and every recording restored."""

import math

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from attention_extractor import RECORD_IMPLEMENTATION, capture_attention
from conftest import noise_image
from families import decoder_layers
from records import segment_positions
from testing.tiny_models import FAMILIES

TOLERANCE = dict(rtol=2e-3, atol=2e-6)  # float16 storage rounds by at most ~5e-4 of a value


def _kwargs(holder, n: int) -> dict:
    return dict(min_new_tokens=n, suppress_tokens=[holder.model.config.image_token_id])


@pytest.mark.parametrize("family", FAMILIES)
def test_both_stores_equal_the_eager_reference(load_holder, family):
    holder = load_holder(family)
    image, prompt = noise_image(120, 90, seed=3), "Where is the red circle?"
    eager = holder.generate(image, prompt, max_new_tokens=4, method="eager", prompt_rows="all", **_kwargs(holder, 4))
    for store in ("rows", "qk"):
        run = holder.generate(image, prompt, max_new_tokens=4, prompt_rows="all", store=store, **_kwargs(holder, 4))
        assert run.attention.kind == store and run.generated_ids == eager.generated_ids
        for t in range(run.num_steps):
            torch.testing.assert_close(run.step_attention(t).float(), eager.step_attention(t).float(), **TOLERANCE)
        for pos in run.prompt_positions:
            torch.testing.assert_close(
                run.prompt_attention(pos).float(), eager.prompt_attention(pos).float(), **TOLERANCE
            )
        for name in ("vision", "system"):  # reduced on the device = summed from the eager rows
            np.testing.assert_allclose(run.segment_shares(name), eager.segment_shares(name), rtol=2e-3, atol=1e-5)


def test_auto_store_keeps_the_smaller_representation(load_holder, dummy_image):
    holder = load_holder("qwen2_5_vl")
    sizes = {
        store: holder.generate(dummy_image, "Hi", max_new_tokens=6, store=store, **_kwargs(holder, 6)).nbytes
        for store in ("rows", "qk")
    }
    auto = holder.generate(dummy_image, "Hi", max_new_tokens=6, **_kwargs(holder, 6))
    assert auto.nbytes == min(sizes.values())
    assert auto.attention.kind == min(sizes, key=sizes.get)


def test_query_key_store_caches_a_few_tokens_and_counts_them(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    run = holder.generate(dummy_image, "Hi", max_new_tokens=8, store="qk", **_kwargs(holder, 8))
    before = run.nbytes
    first = run.step_attention(7)
    assert run.step_attention(7) is first  # cached, not recomputed
    assert run.nbytes == before + first.numel() * 2
    for t in range(8):
        run.step_attention(t)
    cached = sum(run.step_attention(t).numel() * 2 for t in range(8 - run.attention.cache_tokens, 8))
    assert run.nbytes == before + cached  # bounded by cache_tokens


def test_the_models_own_mask_is_applied(load_holder):
    """A left-padded prompt: SDPA gets a real mask, and the rows must skip the padding as eager does."""
    holder = load_holder("llava")
    inputs = holder.on_model(holder.build_inputs(noise_image(80, 60), "What is this?"))
    pad = torch.full((1, 3), holder.model.config.get_text_config().pad_token_id or 0)
    inputs["input_ids"] = torch.cat([pad, inputs["input_ids"]], dim=1)
    inputs["attention_mask"] = torch.cat([torch.zeros_like(pad), inputs["attention_mask"]], dim=1)
    prompt_len = inputs["input_ids"].shape[1]
    segments = {"vision": np.nonzero(inputs["input_ids"][0].numpy() == holder.model.config.image_token_id)[0]}
    stores = {}
    for method in ("sdpa", "eager"):
        with torch.inference_mode(), capture_attention(holder.model, method) as recorder:
            out = holder.model.generate(**inputs, max_new_tokens=3, do_sample=False, **_kwargs(holder, 3))
        stores[method] = recorder.finish(prompt_len, out.shape[1] - prompt_len, segments, "qk")
    assert stores["sdpa"].layers[0].allowed is not None  # the model's mask was kept
    for t in range(out.shape[1] - prompt_len):
        fast, eager = stores["sdpa"].step(t).float(), stores["eager"].step(t).float()
        assert fast[:, :, :3].abs().max() == 0  # the padding is never attended
        torch.testing.assert_close(fast, eager, **TOLERANCE)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_logits_are_bitwise_equal_with_and_without_the_capture(load_holder, family, dummy_image):
    holder = load_holder(family)
    inputs = holder.on_model(holder.build_inputs(dummy_image, "Describe it."))
    kwargs = dict(
        max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True, **_kwargs(holder, 5)
    )
    with torch.inference_mode():
        plain = holder.model.generate(**inputs, **kwargs)
        with capture_attention(holder.model) as recorder:
            captured = holder.model.generate(**inputs, **kwargs)
    assert torch.equal(plain.sequences, captured.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, captured.logits, strict=True))
    assert recorder.finish(inputs["input_ids"].shape[1], 5, {}).step(4).shape[-1] == inputs["input_ids"].shape[1] + 4


def _aten_ops(holder, inputs, new_tokens: int, capture: bool) -> int:
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, **_kwargs(holder, new_tokens))
    with torch.inference_mode():
        if capture:
            with capture_attention(holder.model, prompt_positions=[1, 2]):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    holder.model.generate(**inputs, **kwargs)
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                holder.model.generate(**inputs, **kwargs)
    return sum(event.count for event in prof.key_averages() if event.key.startswith("aten::"))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_decode_loop_adds_at_most_six_aten_ops_per_layer_per_step(load_holder, family, dummy_image):
    """Counted, not timed: the difference between 9 and 5 new tokens isolates 4 decode steps."""
    holder = load_holder(family)
    inputs = holder.on_model(holder.build_inputs(dummy_image, "Describe it."))
    plain = _aten_ops(holder, inputs, 9, False) - _aten_ops(holder, inputs, 5, False)
    captured = _aten_ops(holder, inputs, 9, True) - _aten_ops(holder, inputs, 5, True)
    assert plain > 0
    extra_per_layer_step = (captured - plain) / (4 * holder.num_layers)
    assert extra_per_layer_step <= 6


def _state(holder):
    config = holder.model.config
    hooks = sum(len(module._forward_hooks) for module in holder.model.modules())
    return config.get_text_config()._attn_implementation, config.vision_config._attn_implementation, hooks


def test_every_recording_restores_the_model(load_holder, dummy_image):
    from methods.explain import gradient_map, rollout_map, vit_combined_map

    holder = load_holder("qwen2_5_vl")
    before = _state(holder)
    assert before[0] != RECORD_IMPLEMENTATION and before[1] != RECORD_IMPLEMENTATION
    run = holder.generate(dummy_image, "Hi", max_new_tokens=2, **_kwargs(holder, 2))
    assert _state(holder) == before
    for method in (rollout_map, gradient_map):
        assert method(holder, run, 1).shape == run.vision.grid_hw
        assert _state(holder) == before
    heat = np.ones(run.vision.grid_hw, dtype=np.float32)
    assert vit_combined_map(holder, run, heat).shape == tuple(2 * v for v in run.vision.grid_hw)
    assert _state(holder) == before
    holder.generate(dummy_image, "Hi", max_new_tokens=2, method="eager", **_kwargs(holder, 2))
    assert _state(holder) == before


def test_one_sequence_only_and_a_whole_token_count(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    for kwargs in (dict(num_beams=3), dict(num_return_sequences=2, do_sample=True)):
        with pytest.raises(ValueError, match="one sequence"):
            holder.generate(dummy_image, "Hi", max_new_tokens=4, **kwargs)
    for bad in (float("nan"), math.inf, 2.5, 0, "8"):
        with pytest.raises(ValueError, match="whole number"):
            holder.generate(dummy_image, "Hi", max_new_tokens=bad)


def test_segment_positions_name_the_image_and_the_prefix(load_holder, dummy_image):
    holder = load_holder("qwen3_vl")
    run = holder.generate(dummy_image, "Hi", max_new_tokens=1)
    segments = segment_positions(run.visions)
    assert np.array_equal(segments["vision"], run.vision.token_positions)
    assert np.array_equal(segments["system"], np.arange(run.vision.token_positions[0]))
    assert len(decoder_layers(holder.model)) == run.num_layers


def test_prompt_rows_survive_a_layer_on_an_unannounced_device(load_holder, dummy_image):
    """Offloaded layers can run on a device their parameters do not name; the prefill pick adapts."""
    holder = load_holder("qwen2_vl")
    inputs = holder.on_model(holder.build_inputs(dummy_image, "Where is it?"))
    prompt_len = inputs["input_ids"].shape[1]
    stores = []
    for forget in (False, True):
        with torch.inference_mode(), capture_attention(holder.model, prompt_positions=[1, 2]) as recorder:
            if forget:
                recorder._picks.clear()
            holder.model.generate(**inputs, max_new_tokens=2, do_sample=False, **_kwargs(holder, 2))
        stores.append(recorder.finish(prompt_len, 2, {}, "rows"))
    torch.testing.assert_close(stores[0].prompt(0), stores[1].prompt(0))
    assert stores[1].prompt(1).float().sum(-1).allclose(torch.ones(holder.num_layers, holder.num_heads), atol=2e-3)


@pytest.mark.parametrize("prompt_positions", [None, [1, 2]])
def test_the_recorder_keeps_only_the_rows_it_needs(load_holder, dummy_image, prompt_positions):
    """A kept prefill row must be a copy: a view would hold the whole prefill query alive during generation."""
    holder = load_holder("qwen2_5_vl")
    inputs = holder.on_model(holder.build_inputs(dummy_image, "Where is it?"))
    with torch.inference_mode(), capture_attention(holder.model, prompt_positions=prompt_positions) as recorder:
        holder.model.generate(**inputs, max_new_tokens=3, do_sample=False, **_kwargs(holder, 3))
    for calls in recorder.calls.values():
        prefill = calls.queries[0]  # (1, H, n_p + 1, D)
        assert prefill.shape[2] == len(prompt_positions or []) + 1
        assert prefill.untyped_storage().nbytes() == prefill.numel() * prefill.element_size()
