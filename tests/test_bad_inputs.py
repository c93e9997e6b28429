"""The bad-input matrix: awkward files, prompts, models and views, through the Python API and the app's API."""

import io

import numpy as np
import pytest
from PIL import Image

import app
from config import AppConfig
from conftest import free_port
from errors import ImageLoadError
from pictures.views import SCREEN_MAX_ZOOM
from pipeline import ModelSlot, RunStore
from visualization import colorbar_strip, overlay


def _noise(width, height, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_awkward_images(folder) -> dict[str, tuple[str, tuple[int, int]]]:
    """name -> (path, the (W, H) the image is displayed at)."""
    files = {}

    def add(name, image, size=None, **save):
        path = folder / name
        image.save(path, **save)
        files[name] = (str(path), size or image.size)

    add("cmyk.jpg", Image.fromarray(_noise(120, 80)).convert("CMYK"))
    add("deep16.png", Image.fromarray((np.arange(96 * 64).reshape(64, 96) * 10).astype(np.uint16)))
    rgba = Image.fromarray(_noise(90, 60)).convert("RGBA")
    rgba.putalpha(128)
    add("rgba.png", rgba)
    add("palette.png", Image.fromarray(_noise(70, 70)).convert("P"))
    frames = [Image.fromarray(_noise(64, 48, seed)) for seed in range(3)]
    path = folder / "animated.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    files["animated.gif"] = (str(path), (64, 48))
    rotated = Image.fromarray(_noise(160, 90))
    exif = rotated.getexif()
    exif[0x0112] = 6  # displayed rotated by 90°
    add("exif_rotated.jpg", rotated, size=(90, 160), exif=exif)
    add("one_pixel.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    add("strip_20000x100.png", Image.new("RGB", (20000, 100), (10, 200, 10)))
    add("photo_12000x9000.jpg", Image.new("RGB", (12000, 9000), (120, 130, 140)), quality=50)
    return files


@pytest.fixture(scope="module")
def awkward_images(tmp_path_factory):
    return _write_awkward_images(tmp_path_factory.mktemp("awkward"))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_awkward_images_work_through_the_python_api(load_holder, awkward_images, family):
    holder = load_holder(family)
    for name, (path, displayed) in awkward_images.items():
        run = holder.generate(path, "What is this?", max_new_tokens=2)
        assert run.vision.image_size == displayed, name  # the map follows what is displayed
        grid_h, grid_w = run.vision.grid_hw
        assert len(run.vision.token_positions) == grid_h * grid_w
        if max(displayed) <= 2000:
            picture = overlay(Image.open(path), np.ones(run.vision.grid_hw), run.vision.image_box_xyxy)
            assert picture.size == Image.open(path).size or name == "exif_rotated.jpg"


def test_sixteen_bit_image_is_not_blank(load_holder, awkward_images):
    from utils import load_image

    pixels = np.asarray(load_image(awkward_images["deep16.png"][0]))
    assert pixels.std() > 10  # not clipped to one colour


def test_qwen_respects_the_pixel_budget(load_holder, awkward_images):
    holder = load_holder("qwen2_vl")
    budget = holder.processor.image_processor.size["longest_edge"]
    run = holder.generate(awkward_images["photo_12000x9000.jpg"][0], "Hi", max_new_tokens=1)
    cell = holder.model.config.vision_config.patch_size * holder.model.config.vision_config.spatial_merge_size
    assert run.vision.grid_hw[0] * run.vision.grid_hw[1] * cell * cell <= budget


def test_not_an_image_and_truncated_png(load_holder, tmp_path):
    holder = load_holder("qwen2_vl")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    buffer = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for path in (text, truncated):
        with pytest.raises(ImageLoadError, match="Could not read the image"):
            holder.generate(path, "Hi", max_new_tokens=1)


def test_extreme_aspect_ratio_gets_a_clear_message(load_holder):
    holder = load_holder("qwen2_vl")
    with pytest.raises(ValueError, match="less extreme aspect ratio"):
        holder.generate(Image.new("RGB", (30000, 50)), "Hi", max_new_tokens=1)


def test_very_long_prompt_runs_or_is_refused_clearly(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    run = holder.generate(dummy_image, "describe " * 2222, max_new_tokens=1)  # 20 000 characters
    assert len(run.prompt_ids) > 2000
    holder.model.config.get_text_config().max_position_embeddings, saved = (
        512,
        holder.model.config.get_text_config().max_position_embeddings,
    )
    try:
        with pytest.raises(ValueError, match=r"exceeds the model's context of 512\..* Shorten the prompt"):
            holder.generate(dummy_image, "describe " * 2222, max_new_tokens=1)
    finally:
        holder.model.config.get_text_config().max_position_embeddings = saved


VIEW = [0, 0, 2, 0, 3, "mean", "minmax", "jet", 0.5, "overlay", False]


def test_bad_inputs_through_the_app_api(tiny_model_dirs, awkward_images, tmp_path):
    from gradio_client import Client, handle_file

    cfg = AppConfig(outputs_dir=tmp_path / "outputs", max_prompt_chars=8000)
    demo = app.build_ui(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))
    demo.queue()
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)

        def generate(path, prompt="What is this?", view=VIEW):
            return client.predict(handle_file(path), prompt, 2, False, 0.7, 0.9, 0, 0, *view, api_name="/generate")

        with pytest.raises(Exception, match="No model is loaded"):
            generate(awkward_images["rgba.png"][0], view=[0, 0, 1, 0, 1, *VIEW[5:]])
        with pytest.raises(Exception, match="HF_HUB_OFFLINE"):
            client.predict("nobody-here/missing-model", api_name="/load_model")
        client.predict(str(tiny_model_dirs["qwen2_vl"]), api_name="/load_model")
        for name, (path, displayed) in awkward_images.items():
            if name.startswith("photo_"):
                continue  # covered by the Python API test
            answer, dropdown, chips, picture, caption, plot, *_ = generate(path)
            assert "Token 0" in caption, name
            factor = min(1.0, 2048 / max(displayed))  # drawn on a bounded display copy
            shown = tuple(max(1, round(v * factor)) for v in displayed)
            zoom = max(1, min(SCREEN_MAX_ZOOM, 640 // max(shown)))  # small images enlarged on screen, at most 8x
            with_bar = (shown[0], shown[1] + colorbar_strip(shown[0]))  # the colour bar's strip under the map
            assert Image.open(picture).size == tuple(zoom * v for v in with_bar), name
        not_image = tmp_path / "notes.png"
        not_image.write_text("not an image")
        with pytest.raises(Exception, match="Could not read"):
            generate(str(not_image))
        with pytest.raises(Exception, match="prompt is empty"):
            generate(awkward_images["rgba.png"][0], prompt="   ")
        with pytest.raises(Exception, match="accepts up to 8000"):
            generate(awkward_images["rgba.png"][0], prompt="x" * 20000)
        for bad_view, match in [
            ((99,), "out of range"),
            ((0, 2, 1), "inverted"),
            ((0, 0, 2, 0, 3, "median"), "aggregation|not in the list"),
            ((0, 0, 2, 0, 3, "mean", "minmax", "sparkles"), "colormap|not in the list"),
        ]:
            with pytest.raises(Exception, match=match):
                client.predict(*bad_view, *VIEW[len(bad_view) :], api_name="/render")
        assert "Token 0" in client.predict(*VIEW, api_name="/render")[1]  # still serving
    finally:
        demo.close()
