"""Better maps in the app: TAM with its parts, several tokens combined, and contrasts with another token
or another prompt, through the handlers as the page and the API call them."""

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from analysis import contrast_heatmap
from attention_processor import token_heatmap
from config import AppConfig
from methods.tam import tam_maps
from pictures.stored_run import raw_heatmap
from pipeline import ModelSlot, RunStore
from ui.controls import ViewControls, defaults, names
from visualization import COLORMAPS, DIVERGING, colorbar_strip


def _values(**changes) -> list:
    """Every view control's value in the wired order, the defaults but for `changes`."""
    return [{**defaults(ViewControls), **changes}[name] for name in names(ViewControls)]


@pytest.fixture(scope="module")
def ready(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("maps")
    path = root / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    cfg = AppConfig(outputs_dir=root / "outputs", max_new_tokens=4)
    h = app.Handlers(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))
    h.load_model(str(tiny_model_dirs["qwen2_vl"]))
    *_, last = h.generate(str(path), "What is this?", 4, False, 0.7, 0.9, 0, 0, *_values(), None, None)
    return h, dict(zip(h.generate_outputs, last, strict=True))


def test_a_new_result_offers_its_words_and_contrast_tokens(ready):
    h, out = ready
    run = h.store.get(out["run_id"]).run
    assert len(out["contrast_token"].choices) == run.num_steps and out["contrast_token"].value is None
    steps = [value for _, value in out["word"].choices]
    assert all(value.replace(",", "").replace(" ", "").isdigit() for value in steps)
    assert out["tokens"] == "" and out["contrast_prompt"] == ""


def test_tam_in_the_app_with_its_alpha_and_parts(ready):
    h, out = ready
    run_id = out["run_id"]
    stored = h.store.get(run_id)
    picture, caption, _ = h.method_select(run_id, *_values(method="tam", token=2))
    direct = tam_maps(h.slot.holder, stored.run, [2])[0]
    np.testing.assert_array_equal(raw_heatmap(stored, h._settings(*_values(method="tam", token=2))), direct.heat)
    assert f"context removed: α = {direct.alpha:.2f}" in caption and "Token Activation Map" in caption
    beside, with_parts, _ = h.render(run_id, *_values(method="tam", token=2, parts=True))
    assert beside.size[0] > picture.size[0] and "raw logit" in with_parts and "interference removed" in with_parts
    prompt_pos = stored.run.prompt_positions[-1]
    _, prompt_caption, _ = h.render(run_id, *_values(method="tam", prompt_token=prompt_pos))
    assert prompt_caption.startswith(f"Prompt token {prompt_pos}") and "context removed" in prompt_caption
    with pytest.raises(gr.Error, match="for generated tokens"):
        h.method_select(run_id, *_values(method="rollout", prompt_token=prompt_pos))


def test_several_tokens_combined_for_every_way_and_through_the_api(ready):
    h, out = ready
    run_id = out["run_id"]
    stored = h.store.get(run_id)
    run = stored.run
    one = [token_heatmap(run, t, (0, 2), (0, 3)) for t in (0, 1, 3)]
    for how, expected in (("sum", sum(one)), ("mean", sum(one) / 3), ("max", np.maximum.reduce(one))):
        settings = h._settings(*_values(tokens="0-1, 3", combine=how))
        assert settings.tokens == (0, 1, 3)
        np.testing.assert_allclose(raw_heatmap(stored, settings), expected, rtol=1e-6)
    _, caption, plot = h.render(run_id, *_values(tokens="0, 1, 3"))
    assert caption.startswith("Tokens 0, 1, 3 ") and "(sum of their maps)" in caption
    as_list = h._settings(*_values(token=[3, 1, 0]))  # the API's `token` takes a list too
    assert as_list.tokens == (0, 1, 3)
    h.method_select(run_id, *_values(method="lens"))
    lens = raw_heatmap(stored, h._settings(*_values(method="lens", tokens="0, 1")))
    singles = [raw_heatmap(stored, h._settings(*_values(method="lens", token=t))) for t in (0, 1)]
    np.testing.assert_allclose(lens, singles[0] + singles[1], rtol=1e-6)
    with pytest.raises(gr.Error, match="out of range"):
        h.render(run_id, *_values(tokens="1, 40"))
    with pytest.raises(gr.Error, match="whole number"):
        h.render(run_id, *_values(tokens="1, x"))
    with pytest.raises(gr.Error, match="one token's probability"):
        h.knockout(run_id, "image", 8, False, *_values(tokens="0, 1"), [])


def test_contrast_with_another_token_is_a_signed_map_on_a_diverging_scale(ready):
    h, out = ready
    run_id = out["run_id"]
    stored = h.store.get(run_id)
    heat = raw_heatmap(stored, h._settings(*_values(token=0, contrast_token=2)))
    a, b = (token_heatmap(stored.run, t, (0, 2), (0, 3)) for t in (0, 2))
    np.testing.assert_allclose(heat, a / a.sum() - b / b.sum(), atol=1e-7)
    assert abs(float(heat.sum())) < 1e-5
    picture, caption, _ = h.render(run_id, *_values(token=0, contrast_token=2))
    assert "Contrast: this map minus token 2" in caption
    strip = np.asarray(picture)[-colorbar_strip(picture.size[0]) :, 8].astype(int)  # the bar's left end
    cool = COLORMAPS[DIVERGING][0, 0, ::-1].astype(int)  # RGB: blue at the low end
    assert (np.abs(strip - cool).max(axis=1) <= 3).any()


def test_contrast_with_another_prompt(ready):
    h, out = ready
    run_id = out["run_id"]
    stored = h.store.get(run_id)
    values = _values(contrast_prompt="Where is the red square?")
    with pytest.raises(gr.Error, match="not computed yet"):
        h.render(run_id, *values)
    _, caption, _ = h.contrast_toggle(run_id, *values)
    other = stored.contrasts["Where is the red square?"]
    assert other.settings.prompt == "Where is the red square?" and other.vision.grid_hw == stored.run.vision.grid_hw
    expected = contrast_heatmap(token_heatmap(stored.run, 0, (0, 2), (0, 3)), token_heatmap(other, 0, (0, 2), (0, 3)))
    np.testing.assert_allclose(raw_heatmap(stored, h._settings(*values)), expected, atol=1e-7)
    assert "minus the first answer token's map for the prompt" in caption
    with pytest.raises(gr.Error, match="compares raw attention"):
        h.render(run_id, *_values(contrast_prompt="Where is the red square?", method="lens"))
    with pytest.raises(gr.Error, match="not both"):
        h.render(run_id, *_values(contrast_prompt="Where is the red square?", contrast_token=1))


def test_words_of_the_answer_merge_their_sub_tokens(ready):
    from pictures.views import answer_words

    tokens = [" The", " ap", "ple", " is", " red", ".", " Big", "Cat", "!", ""]
    assert answer_words(tokens) == [
        ("The", (0,)),
        ("apple", (1, 2)),
        ("is", (3,)),
        ("red", (4,)),
        ("BigCat", (6, 7)),
    ]
    h, _ = ready
    assert h.pick_word("1, 2") == ("1, 2", "")  # to 'Combine tokens'; a picked prompt token is dropped


def test_one_client_cannot_pile_up_prompts_or_tokens(ready):
    from pipeline import MAX_CONTRASTS
    from ui.components import MAX_COMBINED

    h, out = ready
    run_id = out["run_id"]
    stored = h.store.get(run_id)
    for k in range(MAX_CONTRASTS + 2):
        h.contrast_toggle(run_id, *_values(contrast_prompt=f"Where is shape {k}?"))
    assert len(stored.contrasts) == MAX_CONTRASTS and f"Where is shape {MAX_CONTRASTS + 1}?" in stored.contrasts
    with pytest.raises(gr.Error, match=f"at most {MAX_COMBINED}"):
        h._settings(*_values(tokens=list(range(MAX_COMBINED + 1))))
    with pytest.raises(gr.Error, match="upwards"):
        h._settings(*_values(tokens="5-2"))


def test_a_per_token_method_computes_only_the_tokens_shown(ready):
    from methods import METHODS
    from pictures.stored_run import method_key

    h, out = ready
    run_id = out["run_id"]
    stored = h.store.get(run_id)
    per_token = next(m for m in METHODS.values() if m.per_token)
    h.method_select(run_id, *_values(method=per_token.name, token=1))
    maps = stored.method_maps[method_key(h._settings(*_values(method=per_token.name)), False)]
    assert maps[1] is not None and [t for t, heat in enumerate(maps) if heat is None] == [0, 2, 3]
    _, caption, _ = h.render(run_id, *_values(method=per_token.name, tokens="0, 2"))
    assert maps[0] is not None and maps[2] is not None and maps[3] is None and caption.startswith("Tokens 0, 2")
    with pytest.raises(gr.Error, match="every token's map"):
        h.render(run_id, *_values(method=per_token.name, token=1, normalization="shared"))
    assert stored.nbytes > 0
