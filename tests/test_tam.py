"""TAM: the rank Gaussian filter against a per-window reference, α against its closed form, a token whose
interference is its own map, and every family's maps against the model's own logits."""

import numpy as np
import pytest
import torch

from conftest import noise_image
from methods import METHODS, MapRequest, compute_maps, compute_prompt_maps
from methods.tam import rank_gaussian_filter, remove_interference, tam_maps, text_positions
from testing.tiny_models import FAMILIES


def _reference_filter(img: np.ndarray, size: int = 3) -> np.ndarray:
    """The filter window by window, as the definition reads."""
    pad = size // 2
    padded = np.pad(img, pad, mode="reflect")
    ax = np.arange(size * size) - size * size // 2
    out = np.zeros_like(img, dtype=np.float64)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            window = np.sort(padded[i : i + size, j : j + size].ravel())
            mean = window.mean()
            if mean > 0:
                sigma = window.std() / mean
                kernel = np.exp(-(ax**2) / (2 * sigma**2))
                out[i, j] = (window * kernel / kernel.sum()).sum()
    return out


@pytest.mark.parametrize("shape", [(5, 7), (1, 6), (2, 2), (9, 4), (16, 16)])
def test_rank_gaussian_filter_equals_the_per_window_definition(shape):
    rng = np.random.default_rng(sum(shape))
    grid = rng.random(shape) * (rng.random(shape) > 0.3)  # zeros in places, some all-zero windows
    grid[0, :] = 0.0
    np.testing.assert_allclose(rank_gaussian_filter(grid), _reference_filter(grid), rtol=1e-5, atol=1e-7)


def test_rank_gaussian_filter_edges():
    assert not rank_gaussian_filter(np.zeros((4, 5))).any()
    flat = rank_gaussian_filter(np.full((3, 3), 0.7))  # σ = 0: the window's value, not NaN
    np.testing.assert_allclose(flat, 0.7, rtol=1e-6)
    spike = np.zeros((5, 5))
    spike[2, 2] = 1.0
    out = rank_gaussian_filter(spike)  # one positive cell among zeros: spread, ranked, never negative
    assert out[2, 2] > 0 and (out >= 0).all() and out[0, 0] == 0.0


def test_alpha_is_the_least_squares_scale():
    rng = np.random.default_rng(3)
    m, maps, scores = rng.random(50), rng.random((4, 50)), np.array([2.0, -1.0, 0.5, 0.0])
    kept, removed, alpha = remove_interference(m, maps, scores)
    w = np.clip(scores, 0, None) / (np.clip(scores, 0, None).sum() + 1e-8)
    interference = w @ maps
    best, *_ = np.linalg.lstsq(interference[:, None], m, rcond=None)
    assert alpha == pytest.approx(float(best[0]), rel=1e-9)
    np.testing.assert_allclose(removed, alpha * interference)
    np.testing.assert_allclose(kept, np.clip(m - alpha * interference, 0, None))
    assert remove_interference(m, maps[:0], scores[:0])[2] == 0.0  # no context: nothing removed
    assert remove_interference(m, np.zeros((2, 50)), np.ones(2))[2] == 0.0  # I = 0: α = 0, no division


def test_interference_equal_to_the_own_map_leaves_nothing():
    rng = np.random.default_rng(4)
    m = rng.random((6, 8)).ravel()
    kept, _, alpha = remove_interference(m, np.stack([m, 3 * m]), np.array([1.0, 2.0]))
    assert alpha > 0
    assert np.abs(kept).max() < 1e-12
    assert np.abs(rank_gaussian_filter(kept.reshape(6, 8))).max() < 1e-12


def _expected_tam(holder, run, pos: int) -> np.ndarray:
    """TAM from the model's full logits, token by token as the definition reads."""
    inputs = holder.replay_inputs(run, run.num_steps - 1)
    with torch.no_grad():
        logits = holder.model(**inputs).logits[0].float().numpy()  # (S, vocab)
    ids = [*run.prompt_ids, *run.generated_ids]
    tok = holder.processor.tokenizer
    special = set(tok.all_special_ids)
    cells = run.vision.token_positions
    last_image = max(int(layout.token_positions.max()) for layout in run.visions)
    m = np.clip(logits[cells, ids[pos]], 0, None)
    maps, scores = [], []
    for j in range(last_image + 1, pos):
        if ids[j] in special or tok.decode([ids[j]]) == tok.decode([ids[pos]]):
            continue
        maps.append(np.clip(logits[cells, ids[j]], 0, None))
        scores.append(max(0.0, float(logits[j - 1, ids[pos]])))
    if maps:
        w = np.array(scores) / (sum(scores) + 1e-8)
        interference = w @ np.stack(maps)
        alpha = float(m @ interference / (interference @ interference)) if interference.any() else 0.0
        m = np.clip(m - alpha * interference, 0, None)
    return _reference_filter(m.reshape(run.vision.grid_hw))


@pytest.mark.parametrize("family", FAMILIES)
def test_tam_follows_its_definition_on_every_family(load_holder, family):
    holder = load_holder(family)
    image = noise_image(150, 100, seed=2)
    run = holder.generate(image, "What is in the picture?", max_new_tokens=4, min_new_tokens=4)
    steps = list(range(run.num_steps))
    prompt_pos = text_positions(run, set())[0]  # the first text token after the image
    found = tam_maps(holder, run, steps, [prompt_pos])
    assert len(found) == run.num_steps + 1
    for k, t in enumerate(steps):
        assert found[k].heat.shape == tuple(run.vision.grid_hw)
        expected = _expected_tam(holder, run, len(run.prompt_ids) + t)
        np.testing.assert_allclose(found[k].heat, expected, rtol=2e-3, atol=1e-4 * max(1.0, expected.max()))
    assert found[-1].context == 0  # nothing of the text precedes the first text token
    np.testing.assert_allclose(found[-1].heat, _expected_tam(holder, run, prompt_pos), rtol=2e-3, atol=1e-5)
    assert any(t.context > 0 for t in found[1:-1])  # later tokens weigh earlier words


def test_tam_in_the_registry(load_holder):
    holder = load_holder("qwen2_vl")
    run = holder.generate(noise_image(120, 90), "What is in the picture?", max_new_tokens=3, min_new_tokens=3)
    assert "tam" in METHODS and METHODS["tam"].needs_model
    maps = compute_maps("tam", MapRequest(holder, run, [0, 2], (0, 0), (0, 0)))
    direct = tam_maps(holder, run, [0, 2])
    for got, want in zip(maps, direct, strict=True):
        np.testing.assert_array_equal(got, want.heat)
    assert maps.notes[1].startswith("context removed: α = ")
    assert set(maps.parts) == {"raw logit", "interference removed"}
    np.testing.assert_array_equal(maps.parts["raw logit"][0], direct[0].logit)
    prompt = compute_prompt_maps("tam", MapRequest(holder, run, [], (0, 0), (0, 0)), run.prompt_positions[:2])
    assert len(prompt) == 2 and prompt[0].shape == tuple(run.vision.grid_hw)
    with pytest.raises(ValueError, match="generated tokens"):
        compute_prompt_maps("rollout", MapRequest(holder, run, [], (0, 0), (0, 0)), run.prompt_positions[:1])
    with pytest.raises(ValueError, match="after the image"):
        tam_maps(holder, run, prompt_positions=[0])
