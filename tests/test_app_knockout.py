"""'Does it matter?' in the app: the knockout of a box, a region, the map's top cells and the whole image,
against random controls, and the layer sweep, through the handlers as the page calls them."""

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

import app
from causal.positions import box_positions
from config import AppConfig
from pictures.stored_run import raw_heatmap
from pipeline import ModelSlot, RunStore
from test_app import _generate, _view, _with_box


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def ready(tmp_path, tiny_model_dirs, image_file):
    cfg = AppConfig(outputs_dir=tmp_path / "outputs", max_new_tokens=4)
    handlers = app.Handlers(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    return handlers, _generate(handlers, image_file)[0]


def test_the_box_knockout_matches_the_api_and_names_its_control(ready):
    h, run_id = ready
    stored = h.store.get(run_id)
    note = h.knockout(run_id, "box", 8, False, *_with_box("0, 0, 200, 150"), [])
    found = h.slot.holder.knockout(stored.run, 0, box=(0, 0, 200, 150))
    assert f"p = {found.p_before:.4f} → **{found.p_after:.4f}**" in note
    assert f"the target box's {len(box_positions(stored.run, (0, 0, 200, 150)))} image tokens" in note
    assert "Control, the same knockout of 8 random regions" in note and "Top 5 before" in note


def test_top_k_region_and_whole_image(ready):
    h, run_id = ready
    stored = h.store.get(run_id)
    heat = raw_heatmap(stored, h._settings(*_view()))
    top = stored.run.vision.token_positions[np.argsort(-heat.ravel(), kind="stable")[:5]]
    found = h.slot.holder.knockout(stored.run, 0, key_positions=top)
    note = h.knockout(run_id, "topk", 5, False, *_view(), [])
    assert "the map's top 5 cells (5 image tokens, every view)" in note and f"**{found.p_after:.4f}**" in note
    in_ranges = h.knockout(run_id, "topk", 5, True, *_view(layer_hi=1, head_hi=1), [])
    assert "layers 0–1, heads 0–1" in in_ranges
    assert "layers 0–2, all heads" in note
    region = h.knockout(run_id, "box", 8, False, *_view(), [[0, 0], [0, 1]])
    assert "the region's 2 cells (2 image tokens, every view)" in region
    whole = h.knockout(run_id, "image", 8, False, *_view(), [])
    assert "the whole image" in whole and "Control" not in whole  # nothing of its size is left outside


def test_the_sweep_draws_every_condition_and_the_control_band(ready):
    h, run_id = ready
    figure, note = h.knockout_sweep(run_id, 1, False, *_with_box("0, 0, 200, 150"), [])
    assert isinstance(figure, go.Figure)
    names = [trace.name for trace in figure.data]
    assert {"box → token", "box → question", "image → question", "control (mean) → token"} <= set(names)
    band = [trace for trace in figure.data if trace.fill == "tonexty"]
    assert len(band) == 1 and len(band[0].x) == h.slot.holder.num_layers
    assert "lowers its probability most" in note


def test_knockout_mistakes_say_what_to_do(ready):
    h, run_id = ready
    with pytest.raises(gr.Error, match="no box or region"):
        h.knockout(run_id, "box", 8, False, *_view(), [])
    for bad in (0, "abc", None, 2.5):
        with pytest.raises(gr.Error, match="k must be a whole number"):
            h.knockout(run_id, "topk", bad, False, *_view(), [])
    with pytest.raises(gr.Error, match="k must be"):
        h.knockout(run_id, "topk", 10**6, False, *_view(), [])
    with pytest.raises(gr.Error, match="needs a target box"):
        h.knockout_sweep(run_id, 3, False, *_view(), [])
    with pytest.raises(gr.Error, match="window must be"):
        h.knockout_sweep(run_id, 0, False, *_with_box("0, 0, 50, 50"), [])
    with pytest.raises(gr.Error, match="generated tokens"):
        h.knockout(run_id, "image", 8, False, *_view(), False, False, False, 5, [])
    with pytest.raises(gr.Error, match="Nothing generated"):
        h.knockout(None, "image", 8, False, *_view(), [])
