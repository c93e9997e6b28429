"""The capture on CUDA: exact against eager on one GPU, and with the decoder split across two.

Skipped on machines without CUDA (two GPUs for the split). Compared in float32: in bfloat16 the
eager reference itself computes q·kᵀ in bfloat16 and differs by a few percent.
"""

import pytest
import torch

from conftest import noise_image
from families import decoder_layers
from model_holder import ModelHolder
from testing.tiny_models import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOLERANCE = dict(rtol=2e-3, atol=2e-6)


def _assert_exact(holder) -> None:
    image = noise_image(150, 100, seed=5)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, suppress_tokens=[holder.model.config.image_token_id])
    eager = holder.generate(image, "Describe the picture.", method="eager", prompt_rows="all", **kwargs)
    for store in ("rows", "qk"):
        run = holder.generate(image, "Describe the picture.", prompt_rows="all", store=store, **kwargs)
        assert run.generated_ids == eager.generated_ids
        for t in range(run.num_steps):
            torch.testing.assert_close(run.step_attention(t).float(), eager.step_attention(t).float(), **TOLERANCE)
        for pos in run.prompt_positions:
            torch.testing.assert_close(
                run.prompt_attention(pos).float(), eager.prompt_attention(pos).float(), **TOLERANCE
            )


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_equal_eager_on_one_gpu(tiny_model_dirs, family):
    _assert_exact(ModelHolder.load(tiny_model_dirs[family], device="cuda", dtype="float32"))


def _two_device_map(model) -> dict[str, int]:
    """Everything before the decoder on GPU 0, the first half of the layers on 0, the rest and the head on 1."""
    language = model.model.language_model
    device_map = {f"model.{name}": 0 for name, _ in model.model.named_children() if name != "language_model"}
    device_map.update(
        {
            f"model.language_model.{name}": 1 if name == "norm" else 0
            for name, _ in language.named_children()
            if name != "layers"
        }
    )
    num_layers = len(decoder_layers(model))
    device_map.update({f"model.language_model.layers.{i}": int(i >= num_layers // 2) for i in range(num_layers)})
    device_map["lm_head"] = 1
    return device_map


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_rows_equal_eager_with_layers_on_two_gpus(tiny_model_dirs, family):
    from accelerate import dispatch_model

    holder = ModelHolder.load(tiny_model_dirs[family], device="cpu", dtype="float32")
    model = dispatch_model(holder.model, device_map=_two_device_map(holder.model))
    devices = {next(layer.parameters()).device for layer in decoder_layers(model)}
    assert devices == {torch.device("cuda", 0), torch.device("cuda", 1)}
    _assert_exact(ModelHolder(model, holder.processor, holder.family, holder.model_id, "cuda", torch.float32))


def _decode_syncs(holder, capture: bool, new_tokens: int) -> int:
    """Host-GPU synchronisations reported by torch during one generate call."""
    import warnings
    from contextlib import nullcontext

    from attention_extractor import capture_attention

    inputs = holder.on_model(holder.build_inputs(noise_image(150, 100, seed=5), "Describe the picture."))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode(), capture_attention(holder.model) if capture else nullcontext():
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                holder.model.generate(**inputs, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_capture_adds_no_host_sync_per_decode_step(tiny_model_dirs, family):
    """Whatever generate itself syncs per step, the capture adds no sync that grows with the answer.

    One sync per layer per step would add 12 x layers here; a stray one-off sync (a lazy
    initialisation in either mode) is tolerated, one per step is not.
    """
    holder = ModelHolder.load(tiny_model_dirs[family], device="cuda", dtype="float32")
    _decode_syncs(holder, True, 2), _decode_syncs(holder, False, 2)  # warm both modes
    extra = [_decode_syncs(holder, True, n) - _decode_syncs(holder, False, n) for n in (4, 16)]
    assert extra[1] - extra[0] < 12, f"the capture adds {(extra[1] - extra[0]) / 12:.2f} syncs per decode step"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next", "gemma3", "paligemma"])
def test_knockouts_equal_the_eager_masked_forward_on_one_gpu(tiny_model_dirs, family):
    """The causal checks on CUDA, in float32: random batched knockouts against the eager reference."""
    import numpy as np

    from causal.knockout import forward_outcomes
    from test_causal import RTOL, _eager_probability, _random_rows, _run

    holder = ModelHolder.load(tiny_model_dirs[family], device="cuda", dtype="float32")
    run = _run(holder, noise_image(150, 100, seed=5))
    rows = _random_rows(holder, run, 1, np.random.default_rng(7))
    for row, outcome in zip(rows, forward_outcomes(holder, run, 1, rows, batch_size=3), strict=True):
        assert outcome.p_token == pytest.approx(_eager_probability(holder, run, 1, row), rel=RTOL * 10, abs=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "paligemma", "llava_next"])
def test_tam_on_one_gpu_equals_the_cpu(load_holder, tiny_model_dirs, family):
    """TAM's pass on the GPU (logits for the ids that occur, the final soft-cap) gives the CPU's maps."""
    import numpy as np

    from methods.tam import tam_maps

    cpu = load_holder(family)
    gpu = ModelHolder.load(tiny_model_dirs[family], device="cuda", dtype="float32")
    run = cpu.generate(noise_image(150, 100, seed=5), "Describe the picture.", max_new_tokens=4, min_new_tokens=4)
    steps = list(range(run.num_steps))
    for on_cpu, on_gpu in zip(tam_maps(cpu, run, steps), tam_maps(gpu, run, steps), strict=True):
        np.testing.assert_allclose(on_gpu.heat, on_cpu.heat, rtol=2e-3, atol=1e-4 * max(1.0, float(on_cpu.heat.max())))
        assert on_gpu.alpha == pytest.approx(on_cpu.alpha, rel=2e-3, abs=1e-6)
