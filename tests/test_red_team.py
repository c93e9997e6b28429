"""What a red-team pass over round 3's surfaces found, each now refused with a message or answered right."""

import gradio as gr
import pytest

from causal.patching import _share_of_the_way
from config import AppConfig
from conftest import noise_image
from errors import InputError, ModelMismatchError
from methods import MapRequest, compute_maps
from pipeline import ModelSlot, RunStore, knockout_layers
from ui.controls import ViewControls, defaults
from ui.handlers import Handlers


@pytest.fixture
def run(load_holder):
    return load_holder("qwen2_vl").generate(noise_image(120, 90), "Hi", max_new_tokens=2)


def test_three_heads_as_a_tuple_are_refused_not_cut_to_a_range(load_holder, run):
    holder = load_holder("qwen2_vl")
    with pytest.raises(InputError, match=r"as a list, e.g. \[0, 1, 2\]"):
        holder.knockout(run, 0, box=(0, 0, 60, 45), heads=(0, 1, 2))
    with pytest.raises(InputError, match="two whole numbers"):
        holder.knockout(run, 0, box=(0, 0, 60, 45), layers=(0.5, 1.5))
    found = holder.knockout(run, 0, box=(0, 0, 60, 45), heads=[0, 1, 2])
    assert "heads 0, 1, 2" in found.blocked


def test_a_model_pass_refuses_a_model_that_did_not_make_the_run(load_holder, run):
    other = load_holder("qwen2_5_vl")
    request = MapRequest(other, run, [0], (0, 1), (0, 1))
    with pytest.raises(ModelMismatchError, match="Pass the model that made the run"):
        compute_maps("rollout", request)


def test_region_cells_are_whole_numbers_inside_the_grid(load_holder, tmp_path):
    slot = ModelSlot()
    slot.holder = load_holder("qwen2_vl")
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(64))
    path = tmp_path / "in.png"
    noise_image(120, 90).save(path)
    view = [0, 0, 2, 0, 3, "mean", "minmax", "jet", 0.5, "overlay", False]
    *_, last = handlers.generate(str(path), "Hi", 2, False, 0.7, 0.9, 0, 0, *view, None, None)
    stored, settings = handlers.store.get(last[0]), handlers._settings(*view)
    for region in ([[99, 99]], [[-1, -1]], [["a", "b"]], [[0, 0, 0]]):
        with pytest.raises(InputError, match="token grid"):
            knockout_layers(slot, stored, settings, region=region)
    values = defaults(ViewControls)
    for name, value in (("prompt_token", "x"), ("layer_lo", "abc")):
        with pytest.raises(gr.Error, match="must be a whole number"):
            handlers.render(last[0], *{**values, name: value}.values())


def test_the_share_of_the_way_is_not_a_ratio_of_noise():
    assert _share_of_the_way(0.004138, 0.004139, 0.004267) != _share_of_the_way(0.004138, 0.004139, 0.004267)  # NaN
    assert _share_of_the_way(0.2, 0.6, 0.4) == pytest.approx(0.5)


def test_mistral_3_on_an_extreme_aspect_ratio_says_what_to_do(load_holder):
    from PIL import Image

    with pytest.raises(InputError, match="less extreme aspect ratio"):
        load_holder("mistral3").generate(Image.new("RGB", (30000, 50)), "Hi", max_new_tokens=1)


def test_tam_on_a_one_cell_grid_says_why_it_is_zero(load_holder):
    from PIL import Image

    holder = load_holder("qwen2_vl")
    run = holder.generate(Image.new("RGB", (1, 1), (200, 30, 30)), "What is this?", max_new_tokens=3)
    assert run.vision.grid_hw == (1, 1)
    found = compute_maps("tam", MapRequest(holder, run, [1, 2], (0, 2), (0, 3)))
    assert all("one-cell grid" in note for note in found.notes)
    big = holder.generate(noise_image(120, 90), "What is this?", max_new_tokens=2)
    assert "one-cell" not in compute_maps("tam", MapRequest(holder, big, [1], (0, 2), (0, 3))).notes[0]
