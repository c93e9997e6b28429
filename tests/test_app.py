"""The app's handlers as plain functions, and the whole flow through gradio_client."""

import gradio as gr
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import app
from config import AppConfig
from conftest import free_port, noise_image
from pipeline import ModelSlot, RunStore
from testing.tiny_models import FAMILIES
from visualization import colorbar_strip

VIEW = dict(
    step_idx=0,
    layer_lo=0,
    layer_hi=2,
    head_lo=0,
    head_hi=3,
    reduce="mean",
    normalization="minmax",
    colormap="jet",
    alpha=0.5,
    view="overlay",
    grid=False,
)


def _view(**changes) -> list:
    return list({**VIEW, **changes}.values())


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def handlers(tmp_path, tiny_model_dirs):
    cfg = AppConfig(outputs_dir=tmp_path / "outputs", max_new_tokens=4)
    return app.Handlers(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))


def _clip(path, frames: int, step: int):
    """A 112x84 MJPG clip of `frames` flat grey frames, `step` grey levels apart."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 4, (112, 84))
    for k in range(frames):
        writer.write(np.full((84, 112, 3), step * k, dtype=np.uint8))
    writer.release()
    return path


def _generate(h, image_file, prompt="What is this?", max_new=4):
    *_, last = h.generate(image_file, prompt, max_new, False, 0.7, 0.9, 0, 0, *_view(), None, None)
    return last


def test_handlers_full_flow(handlers, tiny_model_dirs, image_file, tmp_path):
    assert handlers.load_model(str(tiny_model_dirs["qwen2_vl"])) == handlers.model_status()[0]
    status, layers, heads, video = handlers.model_status()
    assert video.visible is True  # this template takes video
    assert "Qwen2-VL" in status and "3 layers" in status and "4 heads" in status
    assert (layers.props["maximum"], heads.props["maximum"]) == (2, 3)
    assert (layers.value, heads.value) == ([0, 2], [0, 3])
    run_id, answer, dropdown, chips, picture, caption, plot, prompt_dropdown, *_ = _generate(handlers, image_file)
    assert len(dropdown.choices) == handlers.store.get(run_id).run.num_steps
    assert picture.size == (400, 300 + colorbar_strip(400)) and caption.startswith("Token 0 ")
    assert list(plot["selected"]).count("selected") == 1
    positions = [value for _, value in prompt_dropdown.choices]
    assert positions == handlers.store.get(run_id).run.prompt_positions and positions
    _, prompt_caption, _ = handlers.render(run_id, *_view(), False, False, False, positions[-1])
    assert prompt_caption.startswith(f"Prompt token {positions[-1]} ")
    other, caption2, _ = handlers.render(run_id, *_view(layer_lo=1, layer_hi=1))
    assert "layers 1 ·" in caption2 and np.asarray(other).tolist() != np.asarray(picture).tolist()
    side, _, _ = handlers.render(run_id, *_view(view="side_by_side"))
    assert side.size[0] > 800
    png = handlers.download_png(run_id, *_view())
    assert Image.open(png).format == "PNG"
    tensors, meta = handlers.export_attention(run_id)
    assert tensors.endswith(".safetensors") and meta.endswith(".json")
    assert handlers.export_attention(run_id)[0] != tensors  # never overwrites


def test_user_mistakes_raise_gr_error_and_the_app_keeps_working(handlers, tiny_model_dirs, image_file, tmp_path):
    with pytest.raises(gr.Error, match="No model is loaded"):
        _generate(handlers, image_file)
    with pytest.raises(gr.Error, match="hub id"):
        handlers.load_model("  ")
    with pytest.raises(gr.Error, match="local folder"):
        handlers.load_model(str(tmp_path / "missing-model"))
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    with pytest.raises(gr.Error, match="No local folder"):
        handlers.load_model(str(tmp_path / "typo-model"))
    assert handlers.slot.holder is not None  # a typo keeps the working model
    with pytest.raises(gr.Error, match="No image"):
        _generate(handlers, None)
    with pytest.raises(gr.Error, match="prompt is empty"):
        _generate(handlers, image_file, prompt=" ")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not really a png")
    with pytest.raises(gr.Error, match="Could not read the image"):
        _generate(handlers, str(broken))
    with pytest.raises(gr.Error, match="Nothing generated yet"):
        handlers.render(None, *_view())
    run_id = _generate(handlers, image_file)[0]
    with pytest.raises(gr.Error, match="outside"):
        handlers.render(run_id, *_view(layer_hi=7))
    with pytest.raises(gr.Error, match="inverted"):
        handlers.render(run_id, *_view(layer_lo=2, layer_hi=1))
    with pytest.raises(gr.Error, match="colormap"):
        handlers.render(run_id, *_view(colormap="nope"))
    with pytest.raises(gr.Error, match="out of range"):
        handlers.render(run_id, *_view(step_idx=99))
    assert handlers.render(run_id, *_view())[0].size == (400, 300 + colorbar_strip(400))  # still serving


def test_evicted_result_asks_to_generate_again(tiny_model_dirs, image_file, tmp_path):
    cfg = AppConfig(outputs_dir=tmp_path)
    h = app.Handlers(cfg, ModelSlot(), RunStore(cap_mb=0.6))
    h.load_model(str(tiny_model_dirs["qwen2_vl"]))
    first = _generate(h, image_file)[0]
    second = _generate(h, image_file)[0]
    assert len(h.store) == 1
    with pytest.raises(gr.Error, match="Generate again"):
        h.render(first, *_view())
    assert h.render(second, *_view())[0] is not None


def test_full_flow_through_gradio_client(tiny_model_dirs, image_file, tmp_path):
    from gradio_client import Client, handle_file

    cfg = AppConfig(outputs_dir=tmp_path / "outputs")
    demo = app.build_ui(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))
    demo.queue()
    port = free_port()
    demo.launch(
        server_port=port, prevent_thread_lock=True, allowed_paths=[str(cfg.outputs_dir)], ssr_mode=False, quiet=True
    )
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        status = client.predict(str(tiny_model_dirs["llava"]), api_name="/load_model")
        assert "LLaVA-1.5" in status
        result = client.predict(
            handle_file(image_file),
            "What is this?",
            3,
            False,
            0.7,
            0.9,
            0,
            0,
            *_view()[:1],
            0,
            2,
            0,
            3,
            "mean",
            "minmax",
            "jet",
            0.5,
            "overlay",
            True,
            api_name="/generate",
        )
        answer, dropdown, chips, picture, caption, plot, prompt_tokens, *_ = result
        assert "Token 0" in caption and "Hatched" in caption  # LLaVA crops a 400x300 image
        rendered = client.predict(1, 0, 2, 0, 3, "max", "shared", "viridis", 0.3, "heatmap", False, api_name="/render")
        assert "Token 1 " in rendered[1] and "max of 12 maps" in rendered[1]
        with pytest.raises(Exception, match="outside|greater than maximum"):
            client.predict(0, 0, 9, 0, 3, "mean", "minmax", "jet", 0.5, "overlay", False, api_name="/render")
        again = client.predict(0, 0, 2, 0, 3, "mean", "percentile", "jet", 0.5, "overlay", False, api_name="/render")
        assert "percentile" in again[1]  # still serving after the error
        defaults = client.predict(token=1, api_name="/render")  # the page's own defaults
        assert "layers 0–2 · heads 0–3 · mean of 12 maps" in defaults[1]
        narrowed = client.predict(token=1, layer_lo=1, layer_hi=1, api_name="/render")
        assert "layers 1 · heads 0–3" in narrowed[1]
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        names = {endpoint: [p["parameter_name"] for p in info["parameters"]] for endpoint, info in api.items()}
        assert names["/render"][:5] == ["token", "layer_lo", "layer_hi", "head_lo", "head_hi"]
        assert names["/generate"][:3] == ["image", "prompt", "max_new_tokens"] and "video" not in names["/generate"]
        assert not [name for params in names.values() for name in params if name.startswith("param_")]
        by_name = client.predict(token=1, layer_lo=1, layer_hi=1, head_lo=0, head_hi=0, api_name="/render")
        assert "Token 1 " in by_name[1] and "layers 1 · heads 0 · mean of 1 maps" in by_name[1]  # rest: defaults
        several = client.predict(token=[2, 0], combine="max", api_name="/render")  # a list of tokens
        assert several[1].startswith("Tokens 0, 2 ") and "(max of their maps)" in several[1]
        typed = client.predict(tokens="0-1", contrast_token=2, api_name="/render")
        assert typed[1].startswith("Tokens 0, 1 ") and "minus token 2" in typed[1]
    finally:
        demo.close()


def test_analysis_views_and_baseline_options(handlers, tiny_model_dirs, image_file):
    import zipfile

    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    matrix, highlighted, gallery, note = handlers.analysis(run_id, "share", *_view())
    assert matrix["layers"] == [0, 1, 2] and matrix["heads"] == [0, 1, 2, 3]  # 0-based axis labels
    values = np.array([[float(v) for v, _ in row] for row in matrix["cells"]])  # (3 layers, 4 heads)
    share = handlers.store.get(run_id).run.segment_shares("vision")[0]  # step 0: (L, H)
    np.testing.assert_allclose(values, share, rtol=1e-2, atol=1e-3)  # each cell's own value
    assert matrix["hi"] == f"{share.max():.3g}" and len(matrix["bar"]) == 11  # a scale from 0 to the top
    assert len({colour for row in matrix["cells"] for _, colour in row}) > 1
    assert len(gallery) == 12 and gallery[0][1] == "layer 0 · head 0" and note.startswith("**Token 0: ")
    assert "the text and the gallery: layers 0–2, heads 0–3" in note and "Sink cells" in note  # what it shows
    # The matrix keeps its own ranges: narrowed page ranges (a matrix click) never shrink it to 1 × 1.
    narrow, _, narrow_gallery, narrow_note = handlers.analysis(
        run_id, "entropy", *_view(layer_lo=1, layer_hi=1, head_lo=2, head_hi=2)
    )
    assert narrow["layers"] == [0, 1, 2] and narrow["heads"] == [0, 1, 2, 3] and len(narrow_gallery) == 1
    assert "layers 1–1, heads 2–2" in narrow_note
    assert handlers.analysis_follow(run_id, "share", None, *_view()) == (gr.skip(),) * 4  # not shown yet
    followed = handlers.analysis_follow(run_id, "share", matrix, *_view(step_idx=1))
    assert followed[3].startswith("**Token 1: ")  # shown once, it follows the token
    assert gallery[-1][1] == "layer 2 · head 3"  # 0-based, as on the page
    _, unexcluded, *_ = handlers.analysis(run_id, "share", *_view(), False, False, False, "", True)
    assert any(score is None for _, score in unexcluded)  # BOS and system prompt unhighlighted
    _, caption, table = handlers.render(run_id, *_view(), False, False, False, "", True)
    _, plain_caption, plain_table = handlers.render(run_id, *_view())
    assert "without BOS and the system prompt" in caption
    assert (table["share"] >= plain_table["share"] - 1e-6).all()  # a smaller denominator
    assert any(text.startswith("[image:") for text, _ in highlighted)
    assert max(score for _, score in highlighted if score is not None) == 1.0
    entropy_matrix, *_ = handlers.analysis(run_id, "entropy", *_view())
    assert entropy_matrix["cells"] != matrix["cells"] and entropy_matrix["metric"] == "entropy"
    # A click on the cell of layer 1, head 2 selects exactly that head; a matrix drawn anew changes nothing.
    assert handlers.matrix_pick({**matrix, "picked": [1, 2]}) == ([1, 1], [2, 2])
    assert handlers.matrix_pick(matrix) == (gr.skip(), gr.skip())
    archive = zipfile.ZipFile(handlers.gallery_download(run_id, *_view(layer_lo=2, layer_hi=2)))
    assert sorted(archive.namelist()) == [f"S1_L3_H{h}.png" for h in range(1, 5)]
    for option in ("renormalize", "mask_sinks"):
        _, caption, _ = handlers.render(run_id, *_view(), *[option == "renormalize", option == "mask_sinks", False])
        assert "Options:" in caption
    picture, caption, _ = handlers.relative_toggle(run_id, *_view(), False, False, True, "")  # the UI's order
    assert "generic-prompt map" in caption
    assert handlers.store.get(run_id).baseline.num_steps == 1  # computed once, then cached
    handlers.render(run_id, *_view(), False, False, True)
    # A new generation starts with the baseline and sink options unticked, whatever the boxes said.
    *_, last = handlers.generate(
        image_file, "Again", 2, False, 0.7, 0.9, 0, 0, *_view(), False, True, True, "", None, None
    )
    assert last[8:12] == (False, False, [], "attention") and "Options" not in last[5]


def test_region_clicks_build_an_image_to_text_summary(handlers, tiny_model_dirs, image_file):
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    run = handlers.store.get(run_id).run
    click = gr.SelectData(None, {"index": [10, 10], "value": None})  # top-left cell
    region, table, note = handlers.region_click(run_id, [], "overlay", evt=click)
    assert region == [[0, 0]] and len(table) == run.num_steps and "1 cell selected" in note
    beside = gr.SelectData(None, {"index": [400 + 8 + 10, 10], "value": None})  # same cell, right half
    region, _, _ = handlers.region_click(run_id, region, "side_by_side", evt=beside)
    assert region == []  # clicked again: removed
    far = gr.SelectData(None, {"index": [399, 299], "value": None})
    region, table, note = handlers.region_click(run_id, [[0, 0]], "overlay", evt=far)
    grid_h, grid_w = run.vision.grid_hw
    assert region == [[0, 0], [grid_h - 1, grid_w - 1]] and "layer" in note
    assert ((table["share"] >= 0) & (table["share"] <= 1)).all()


def test_several_images_and_a_video_render_as_one_strip(handlers, tiny_model_dirs, image_file, tmp_path):
    handlers.load_model(str(tiny_model_dirs["qwen2_5_vl"]))
    second = tmp_path / "second.png"
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (200, 120, 3), dtype=np.uint8)).save(second)
    *_, last = handlers.generate(image_file, "Compare", 3, False, 0.7, 0.9, 0, 0, *_view(), [str(second)], None)
    run_id, _, _, _, picture, caption, *_ = last
    assert len(handlers.store.get(run_id).run.visions) == 2
    assert "2 images on one scale" in caption and picture.size[1] > 300
    with pytest.raises(gr.Error, match="single image"):
        handlers.render(run_id, *_view(), False, True, False)
    with pytest.raises(gr.Error, match="single image"):
        handlers.analysis(run_id, "share", *_view())
    clip = _clip(tmp_path / "clip.avi", 6, 40)
    *_, last = handlers.generate(None, "What happens?", 2, False, 0.7, 0.9, 0, 0, *_view(), None, str(clip))
    run_id, _, _, _, picture, caption, *_ = last
    run = handlers.store.get(run_id).run
    assert run.vision.num_frames == 3 and "3 time steps of the video on one scale" in caption
    assert len(run.frames) == 6 and "cover 2 consecutive frames" in caption  # temporal patch 2: frame pairs
    assert len(handlers.store.get(run_id).images) == 3  # one picture per time step
    with pytest.raises(gr.Error, match="not both"):
        list(handlers.generate(image_file, "Hi", 2, False, 0.7, 0.9, 0, 0, *_view(), None, str(clip)))


def test_logit_lens_view(handlers, tiny_model_dirs, image_file):
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    frame, path = handlers.lens(run_id)
    assert frame.startswith("<iframe") and 'sandbox="allow-scripts"' in frame and "&lt;script" in frame
    assert open(path, encoding="utf-8").read().startswith("<!DOCTYPE html>")
    handlers.load_model(str(tiny_model_dirs["llava"]))
    with pytest.raises(gr.Error, match="needs the model that made this result"):
        handlers.lens(run_id)


def test_logit_lens_covers_the_runs_own_token_grid(handlers, tiny_model_dirs, image_file, monkeypatch):
    import pipeline
    from methods import lens as lenses

    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    default = handlers.store.get(_generate(handlers, image_file)[0]).run
    *_, last = handlers.generate(image_file, "What is this?", 2, False, 0.7, 0.9, 0, 112 * 112, *_view(), None, None)
    small = handlers.store.get(last[0]).run
    assert small.vision.grid_hw != default.vision.grid_hw  # the budget changed the grid
    made = []
    monkeypatch.setattr(
        pipeline,
        "run_logit_lens",
        lambda *args, **kwargs: made.append(lenses.run_logit_lens(*args, **kwargs)) or made[-1],
    )
    handlers.lens(last[0])
    assert made[0].grid_hw == small.vision.grid_hw
    # The lens of the run equals the lens of its image and prompt at the run's own budget.
    direct = lenses.logit_lens(handlers.slot.holder, small.images[0], "What is this?", max_pixels=112 * 112)
    np.testing.assert_array_equal(made[0].top_ids, direct.top_ids)


def test_qwen3_video_keeps_the_frames_it_was_given(handlers, tiny_model_dirs):
    from PIL import Image as PILImage

    handlers.load_model(str(tiny_model_dirs["qwen3_vl"]))
    frames = [PILImage.fromarray(np.full((64, 96, 3), 20 * k, dtype=np.uint8)) for k in range(8)]
    run = handlers.slot.holder.generate(None, "What happens?", max_new_tokens=1, video=frames)
    assert run.vision.num_frames == 4  # 8 frames, paired in time


def test_report_from_a_stored_run_with_its_image(handlers, tiny_model_dirs, image_file, tmp_path):
    from pictures.report import write_report

    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    stored = handlers.store.get(_generate(handlers, image_file)[0])
    path = write_report(stored, Image.open(image_file), tmp_path / "report.html")
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("family", FAMILIES)
def test_every_view_works_for_every_family(handlers, tiny_model_dirs, tmp_path, family):
    portrait = tmp_path / "portrait.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (333, 201, 3), dtype=np.uint8)).save(portrait)
    handlers.load_model(str(tiny_model_dirs[family]))
    run_id, *_ = _generate(handlers, str(portrait))
    views = handlers.store.get(run_id).run.visions
    for view in ("overlay", "side_by_side", "heatmap"):
        for normalization in ("minmax", "percentile", "shared"):
            picture, caption, _ = handlers.render(
                run_id, *_view(view=view, normalization=normalization, grid=True), True, True, False, "", True
            )
            assert caption.startswith("Token 0")
            if len(views) == 1:
                assert picture.size[1] == 333 + colorbar_strip(picture.size[0])
            else:  # tiles, then the global view or thumbnail to their right
                assert picture.size[1] > 333 and picture.size[0] > 201 * 3 // 2
                assert (
                    f"Left: the {views[0].view}, the main map. Right (and below), at half size: {views[1].view}"
                    in caption
                )
    handlers.relative_toggle(run_id, *_view(), False, False, True, "", False)
    handlers.analysis(run_id, "entropy", *_view())
    handlers.region_click(run_id, [], "overlay", evt=gr.SelectData(None, {"index": [100, 160], "value": None}))
    assert handlers.lens(run_id)[0].startswith("<iframe")
    assert len(handlers.export_attention(run_id)) == 2


def test_verify_this_map(handlers, tiny_model_dirs, image_file):
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    deletion, insertion, verdict = handlers.verify(run_id, *_view())
    for plot in (deletion, insertion):
        value = plot.value
        table = value if isinstance(value, pd.DataFrame) else pd.DataFrame(value["data"], columns=value["columns"])
        names = sorted(set(table["curve"]))  # the AUCs are in the legend
        assert [name.split(" (AUC ")[0] for name in names] == ["map order", "random order"]
        assert len(table) == 2 * 9 and table["probability"].between(0, 1).all()
        assert set(plot.color_map) == set(names)  # one strong colour, one grey
    assert "Deletion AUC" in verdict and "Insertion AUC" in verdict
    with pytest.raises(gr.Error, match="generated tokens"):
        handlers.verify(run_id, *_view(), False, False, False, 5)


@pytest.mark.parametrize("method", ["rollout", "gradient", "vit"])
def test_rollout_and_gradient_maps_in_the_app(handlers, tiny_model_dirs, image_file, method):
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    stored = handlers.store.get(run_id)
    # A token picked while the method still computes renders that method: render computes what is missing.
    _, early, _ = handlers.render(run_id, *_view(step_idx=1), False, False, False, "", False, method)
    named = {"rollout": "rollout", "gradient": "Chefer", "vit": "vision encoder"}[method]
    assert early.startswith("Token 1") and named in early and len(stored.method_maps) == 1
    picture, caption, _ = handlers.method_select(run_id, *_view(), False, False, False, "", False, method)
    (maps,) = stored.method_maps.values()  # computed once, not twice
    assert len(maps) == stored.run.num_steps
    assert maps[0].shape == (
        tuple(2 * n for n in stored.run.vision.grid_hw) if method == "vit" else stored.run.vision.grid_hw
    )
    assert named in caption
    _, caption1, _ = handlers.render(run_id, *_view(step_idx=1), False, False, False, "", False, method)
    assert caption1.startswith("Token 1")  # every token computed at once
    with pytest.raises(gr.Error, match="generic-prompt division"):
        handlers.render(run_id, *_view(), False, False, True, "", False, method)


def test_a_new_result_clears_every_view_of_the_previous_one(handlers, tiny_model_dirs, image_file):
    """Every value generate yields lands on a wired output, and the derived views are emptied."""
    from pipeline import ModelSlot, RunStore

    demo = app.build_ui(AppConfig(), ModelSlot(), RunStore(100))
    wired = next(dep for dep in demo.config["dependencies"] if dep.get("api_name") == "generate")["outputs"]
    components = {c["id"]: c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    names = [components[i] for i in wired]
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    *streamed, last = handlers.generate(image_file, "What is this?", 3, False, 0.7, 0.9, 0, 0, *_view(), None, None)
    assert all(len(item) == len(wired) for item in [*streamed, last])
    shown = dict(zip(names, last, strict=True))
    for view in (
        "head-matrix",
        "text-attention",
        "logit-lens",
        "verify-plot",
        "verify-note",
        "region-plot",
        "analysis-note",
        "downloads",
    ):
        assert shown[view] in (None, "", []), view
    assert shown["region-note"].startswith("Tick 'Clicks pick region cells'")


def test_the_animation_has_one_labelled_frame_per_generated_token(handlers, tiny_model_dirs, image_file):
    from PIL import Image as PILImage
    from PIL import ImageChops

    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file, max_new=5)[0]
    run = handlers.store.get(run_id).run
    path = handlers.download_animation(run_id, *_view())
    with PILImage.open(path) as gif:
        assert gif.n_frames == run.num_steps and max(gif.size) <= 512 + 64
        frames = []
        for index in range(gif.n_frames):
            gif.seek(index)
            frames.append(gif.convert("RGB"))
    assert len({frame.size for frame in frames}) == 1
    # Consecutive tokens attend differently, so the pictures (maps and labels) differ frame to frame.
    assert all(ImageChops.difference(a, b).getbbox() is not None for a, b in zip(frames, frames[1:], strict=False))


def test_small_images_are_enlarged_on_screen_and_clicks_and_outlines_follow(handlers, tiny_model_dirs, tmp_path):
    from PIL import ImageChops

    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    small = tmp_path / "small.png"
    noise_image(160, 120, seed=2).save(small)
    run_id = _generate(handlers, str(small))[0]
    stored = handlers.store.get(run_id)
    picture, _, _ = handlers.render(run_id, *_view())
    assert picture.size == (640, (120 + colorbar_strip(160)) * 4)  # 4× with whole pixels, with its colour bar
    assert Image.open(handlers.download_png(run_id, *_view())).size == (160, 120 + colorbar_strip(160))  # true size
    click = gr.SelectData(None, {"index": [4 * 155, 4 * 115], "value": None})  # bottom-right, on screen
    region, _, _ = handlers.region_click(run_id, [], "overlay", evt=click)
    grid_h, grid_w = stored.run.vision.grid_hw
    assert region == [[grid_h - 1, grid_w - 1]]
    outlined = handlers.render_region(run_id, region, True, *_view())
    changed = ImageChops.difference(outlined.convert("RGB"), picture.convert("RGB")).getbbox()
    x0, y0, x1, y1 = (4 * v for v in stored.run.vision.cell_box_xyxy(grid_h - 1, grid_w - 1))
    assert changed is not None and changed[0] >= x0 - 4 and changed[1] >= y0 - 4  # only that cell's outline (±1 px)
    assert changed[2] <= x1 + 4 and changed[3] <= y1 + 4


def test_page_load_and_model_status_fill_exactly_the_wired_outputs(handlers, tiny_model_dirs):
    from pipeline import ModelSlot, RunStore

    demo = app.build_ui(AppConfig(), ModelSlot(), RunStore(100))
    components = {c["id"]: c.get("props", {}).get("elem_id") for c in demo.config["components"]}
    wired = [
        [components[i] for i in dep["outputs"]]
        for dep in demo.config["dependencies"]
        if dep["outputs"] and components[dep["outputs"][0]] == "model-status"
    ]
    assert wired and all(names[:4] == ["model-status", "layer-range", "head-range", "video-input"] for names in wired)
    assert len(handlers.model_status()) == 4
    assert len(handlers.page_load()) == max(len(names) for names in wired)
    handlers.load_model(str(tiny_model_dirs["llava"]))
    assert handlers.model_status()[3].visible is False  # LLaVA takes no video


def test_user_errors_are_one_log_line_not_a_traceback(handlers, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="ui.components")
    with pytest.raises(gr.Error) as raised:
        handlers.load_model("  ")  # a gr.Error of the handler's own
    assert raised.value.print_exception is False
    with pytest.raises(gr.Error) as raised:
        handlers.render("no-such-run", *_view())  # a project error, converted
    assert raised.value.print_exception is False
    lines = [r.getMessage() for r in caplog.records if r.name == "ui.components"]
    assert len(lines) == 2 and all(line.startswith("user error: ") and "\n" not in line for line in lines)


def test_a_start_up_failure_is_said_on_the_page(handlers, tmp_path):
    app.start_loading(AppConfig(model=str(tmp_path / "no-such-model"), outputs_dir=tmp_path), handlers.slot)
    assert handlers.slot.ready.wait(30)
    status = handlers.model_status()[0]
    assert "did not load" in status and "no-such-model" in status and "press Load" in status


def test_view_values_left_out_take_the_pages_own_defaults(handlers, tiny_model_dirs, image_file):
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    picture, caption, _ = handlers.render(run_id, 0)  # only the token, as an API call may
    _, layers, heads, _ = handlers.model_status()  # what the page starts with
    assert f"layers {layers.value[0]}–{layers.value[1]} · heads {heads.value[0]}–{heads.value[1]}" in caption
    page_picture, page_caption, _ = handlers.render(
        run_id,
        0,
        *layers.value,
        *heads.value,
        AppConfig.aggregation,
        AppConfig.normalization,
        AppConfig.colormap,
        AppConfig.alpha,
        AppConfig.view,
    )
    assert caption == page_caption and np.array_equal(np.asarray(picture), np.asarray(page_picture))


def test_layers_without_softmax_attention_are_labelled_never_mapped(handlers, tiny_model_dirs, image_file):
    """Qwen3.5: only its full-attention layers (1 and 3 here) are captured; every view says so."""
    handlers.load_model(str(tiny_model_dirs["qwen3_5"]))
    run_id = _generate(handlers, image_file)[0]
    run = handlers.store.get(run_id).run
    assert run.layer_indices == [1, 3] and handlers.slot.holder.num_layers == 4
    _, caption, _ = handlers.render(run_id, *_view(layer_lo=0, layer_hi=3))
    assert "softmax attention only in 1, 3" in caption and "of 8 maps" in caption
    matrix, _, gallery, _ = handlers.analysis(run_id, "share", *_view(layer_lo=0, layer_hi=3))
    assert matrix["layers"] == [1, 3] and [name for _, name in gallery][:2] == ["layer 1 · head 0", "layer 1 · head 1"]
    with pytest.raises(gr.Error, match="no layer with softmax attention"):
        handlers.render(run_id, *_view(layer_lo=2, layer_hi=2))


def test_a_ranges_file_sets_its_models_starting_ranges(tmp_path):
    from config import DEMO_MODEL_DIR, DEMO_RANGES
    from model_holder import ModelHolder
    from study.localization import RangeChoice, ranges_json, ranges_record

    def ranges_file(model: str, layers, heads):
        path = tmp_path / f"ranges-{len(list(tmp_path.iterdir()))}.json"
        path.write_text(ranges_json(ranges_record(model, RangeChoice(layers, heads, 0.9, 10), {}, {})))
        return str(path)

    slot = ModelSlot()
    slot.holder = ModelHolder.load(DEMO_MODEL_DIR, device="cpu", dtype="float32")

    def starting_ranges(*argv) -> tuple:
        h = app.Handlers(app.parse_args(list(argv)), slot, RunStore(100))
        _, layers, heads, _ = h.model_status()
        assert (tuple(layers.value), tuple(heads.value)) == h._default_ranges()  # the API's defaults too
        return tuple(layers.value), tuple(heads.value)

    assert starting_ranges("--ranges", ranges_file(str(DEMO_MODEL_DIR), (2, 3), (1, 2))) == ((2, 3), (1, 2))
    assert starting_ranges() == DEMO_RANGES
    assert starting_ranges("--ranges", ranges_file("other/model", (2, 3), (1, 2))) == DEMO_RANGES
    assert starting_ranges("--ranges", ranges_file(str(DEMO_MODEL_DIR), (2, 9), (0, 1))) == DEMO_RANGES  # too deep
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(SystemExit):
        app.parse_args(["--ranges", str(tmp_path / "broken.json")])


def _with_box(box: str, **changes) -> list:
    """The view values up to the target box: renormalize, sinks, relative, prompt token, system, method."""
    return [*_view(**changes), False, False, False, "", False, "attention", box]


def test_a_target_box_scores_the_map_and_is_outlined(handlers, tiny_model_dirs, image_file):
    from metrics import attention_ratio, otsu_iou, pointing_hit, target_mask
    from pictures.stored_run import raw_heatmap

    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    stored = handlers.store.get(run_id)
    plain, _, _ = handlers.render(run_id, *_view())
    picture, caption, _ = handlers.render(run_id, *_with_box("10, 20, 200, 150"))
    layout, heat = stored.run.vision, raw_heatmap(stored, handlers._settings(*_view()))
    region = target_mask(layout.image_size, [(10, 20, 200, 150)])
    hit = "hit" if pointing_hit(heat, layout, region) else "miss"
    assert f"Target box (10, 20)–(200, 150): pointing game {hit}" in caption
    assert f"attention ratio {attention_ratio(heat, layout, region):.2f}" in caption
    assert f"Otsu IoU {otsu_iou(heat, layout, region):.2f}" in caption
    changed = np.abs(np.asarray(picture, dtype=int) - np.asarray(plain, dtype=int)).sum(-1) > 0  # (H, W)
    zoom = picture.size[0] // 400
    assert changed[20 * zoom + 40, 10 * zoom] and changed[150 * zoom - 1, 100 * zoom]  # on the outline
    assert not changed[80 * zoom, 100 * zoom]  # not inside it

    # Two clicks with 'Clicks draw it' on: one corner, then the other; the picture is scored at once.
    def click(x, y):
        return gr.SelectData(None, {"index": [x * zoom, y * zoom], "value": None})

    corner, text, marked, *skipped = handlers.box_click(run_id, True, None, *_view(), evt=click(150, 100))
    assert corner == [150.0, 100.0] and all(isinstance(value, type(gr.skip())) for value in [text, *skipped])
    marked = np.asarray(marked, dtype=int)  # the first corner's cross, green on the picture
    assert marked[100 * zoom, 150 * zoom, 1] > 200 and marked[100 * zoom, 150 * zoom, 0] < 60
    assert (np.abs(marked - np.asarray(plain, dtype=int)).sum(-1) > 0).sum() < 1000  # only the cross
    corner, text, picture, caption, _ = handlers.box_click(run_id, True, corner, *_view(), evt=click(50, 60))
    assert corner is None and text == "50, 60, 150, 100" and "Target box (50, 60)–(150, 100)" in caption
    assert handlers.region_click(run_id, [], "overlay", click(5, 5), False)[0] == gr.skip()  # region tool off
    assert handlers.render_region(run_id, [[0, 0]], False, *_view()) == gr.skip()
    with pytest.raises(gr.Error, match="not four numbers"):
        handlers.render(run_id, *_with_box("left, top"))
    _, caption, _ = handlers.render(run_id, *_with_box("500, 500, 600, 600"))
    assert "holds no pixel of the image" in caption
    for empty in ("5, 5, 5, 5", "5, 5, 5.4, 9"):
        with pytest.raises(gr.Error, match="is empty"):
            handlers.render(run_id, *_with_box(empty))
    for hostile in ("nan, 0, 5, 5", "0, 0, 1e308, 5"):
        with pytest.raises(gr.Error, match="numbers within the image"):
            handlers.render(run_id, *_with_box(hostile))
    with pytest.raises(gr.Error, match="empty"):  # two clicks on one spot
        handlers.box_click(run_id, True, [50.0, 60.0], *_view(), evt=click(50, 60))
    for index in (["a", 3], [float("nan"), 3], None):  # what a raw client could send
        with pytest.raises(gr.Error, match="no position"):
            handlers.region_click(run_id, [], "overlay", gr.SelectData(None, {"index": index, "value": None}))


@pytest.mark.parametrize("family", ["internvl", "llava_onevision", "smolvlm"])
def test_video_in_the_app_for_the_families_beyond_qwen(handlers, tiny_model_dirs, tmp_path, family):
    handlers.load_model(str(tiny_model_dirs[family]))
    assert handlers.model_status()[3].visible is True  # the video upload is offered
    clip = _clip(tmp_path / "clip.avi", 4, 50)
    *_, last = handlers.generate(None, "What happens?", 2, False, 0.7, 0.9, 0, 0, *_view(), None, str(clip))
    run_id, _, _, _, picture, caption, *_ = last
    run = handlers.store.get(run_id).run
    assert run.vision.num_frames == 4 and len(handlers.store.get(run_id).images) == 4  # one frame per step
    assert "4 time steps of the video on one scale" in caption and "consecutive frames" not in caption
    assert picture.size[0] > 4 * 100


def test_cells_are_crisp_blocks_unless_smoothed_and_the_picture_has_its_colour_bar(
    handlers, tiny_model_dirs, image_file
):
    handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_id = _generate(handlers, image_file)[0]
    stored = handlers.store.get(run_id)
    crisp, _, _ = handlers.render(run_id, *_with_box("", view="heatmap"))
    smooth, _, _ = handlers.render(run_id, *_with_box("", view="heatmap"), True)
    zoom = crisp.size[0] // 400
    assert crisp.size == smooth.size and crisp.size[1] > 300 * zoom  # the colour bar's strip under the map
    row, col = stored.run.vision.grid_hw[0] // 2, stored.run.vision.grid_hw[1] // 2
    x0, y0, x1, y1 = (int(v) * zoom for v in stored.run.vision.cell_box_xyxy(row, col))
    block = lambda picture: np.asarray(picture, dtype=int)[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2]  # noqa: E731
    assert np.ptp(block(crisp), axis=(0, 1)).max() == 0  # one flat colour in the cell
    assert np.ptp(block(smooth), axis=(0, 1)).max() > 0  # blended with its neighbours
