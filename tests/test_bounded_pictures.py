"""Every picture sent to the browser fits the display budget however many images or views it holds, and
renders are safe when many sessions draw at once."""

import io
import threading

import numpy as np
import pytest
from PIL import Image

import app
from config import AppConfig
from conftest import free_port, noise_image
from exports import save_picture
from pipeline import ModelSlot, RunStore
from ui.handlers import Handlers
from ui.picture_output import PictureOutput, _cached_picture, picture_output
from visualization import DISPLAY_MAX_PIXELS, DISPLAY_MAX_SIDE, DOWNLOAD_MAX_SIDE, tiled

VIEW = [0, 0, 2, 0, 3, "mean", "minmax", "jet", 0.5, "overlay", False]
AWKWARD = [(4000, 40), (3000, 2000), (40, 3000)]  # a strip, a photo, a pole


def _fits(picture: Image.Image) -> bool:
    return max(picture.size) <= DISPLAY_MAX_SIDE and picture.size[0] * picture.size[1] <= DISPLAY_MAX_PIXELS


@pytest.fixture
def awkward_files(tmp_path):
    paths = []
    for i, size in enumerate(AWKWARD):
        paths.append(str(tmp_path / f"awkward{i}.png"))
        noise_image(*size, seed=i).save(paths[-1])
    return paths


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "internvl"])
def test_several_awkward_images_give_a_picture_within_the_budget(tiny_model_dirs, tmp_path, awkward_files, family):
    slot = ModelSlot()
    slot.load(str(tiny_model_dirs[family]), "cpu", "float32")
    handlers = Handlers(AppConfig(outputs_dir=tmp_path / "outputs"), slot, RunStore(512))
    *_, last = handlers.generate(awkward_files[0], "Hi", 2, False, 0.7, 0.9, 0, 0, *VIEW, awkward_files[1:], None)
    for view in ("overlay", "heatmap", "side_by_side"):
        picture, caption, _ = handlers.render(last[0], *VIEW[:9], view, False)
        assert _fits(picture), (view, picture.size)
        assert min(picture.size) >= 200  # still a picture, not a sliver
    one, *_ = handlers.generate(awkward_files[0], "Hi", 2, False, 0.7, 0.9, 0, 0, *VIEW, None, None)
    *_, single = handlers.generate(awkward_files[0], "Hi", 2, False, 0.7, 0.9, 0, 0, *VIEW, None, None)
    assert _fits(single[4])
    saved = Image.open(save_picture(noise_image(9000, 300), tmp_path, 0))
    assert max(saved.size) == DOWNLOAD_MAX_SIDE  # a download is bounded too, aspect kept
    assert abs(saved.size[0] / saved.size[1] - 30) < 0.2


def test_the_picture_component_holds_every_picture_to_the_budget(tmp_path):
    component = picture_output(format="png")
    component.GRADIO_CACHE = str(tmp_path)
    data = component.postprocess(Image.new("RGB", (20000, 500), (10, 20, 30)))
    shown = Image.open(data.path)
    assert shown.size == (DISPLAY_MAX_SIDE, 102) and _fits(shown)
    # Gradio copies a component per session as `block.__class__(**constructor_args)`: the copy keeps the budget
    copy = type(component)(**component.constructor_args)
    assert isinstance(copy, PictureOutput) and copy.get_block_name() == "image"


def test_rows_of_views_keep_the_first_picture_in_place():
    first = Image.new("RGB", (300, 200), (255, 0, 0))
    rest = [Image.new("RGB", (250, 100), (0, 0, 255))] * 5
    sheet = tiled([first, *rest], max_width=900)
    assert sheet.size[0] <= 900 and sheet.size[1] > 200  # wrapped below
    assert sheet.getpixel((10, 10)) == (255, 0, 0) and sheet.getpixel((299, 199)) == (255, 0, 0)


def test_a_reader_never_sees_a_partly_written_picture(tmp_path):
    """Eight sessions drawing the same picture at once while a ninth fetches it: each fetch decodes in full."""
    picture = noise_image(900, 700)
    path = _cached_picture(picture, str(tmp_path), "png")
    stop, failures, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                data = open(path, "rb").read()
                Image.open(io.BytesIO(data)).load()
                reads[0] += 1
            except Exception as err:  # a truncated or empty file
                failures.append(repr(err))

    def writer():
        for _ in range(20):
            assert _cached_picture(picture, str(tmp_path), "png") == path

    watching = threading.Thread(target=reader)
    watching.start()
    writers = [threading.Thread(target=writer) for _ in range(8)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    watching.join()
    assert failures == [] and reads[0] > 0
    assert not [p for p in tmp_path.rglob(".image.*")]  # no staging file left behind


def test_eight_sessions_render_awkward_runs_at_once(tiny_model_dirs, tmp_path, awkward_files):
    from gradio_client import Client, handle_file

    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["llava_next"]), "cpu", "float32")
    demo = app.build_ui(AppConfig(outputs_dir=tmp_path / "outputs"), slot, RunStore(1024))
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    url, failures, shown = f"http://127.0.0.1:{port}/", [], []
    try:

        def session(idx: int):
            client = Client(url, verbose=False, download_files=str(tmp_path / f"s{idx}"))
            image = handle_file(awkward_files[idx % 3])
            try:
                client.predict(image, "Hi", 3, False, 0.7, 0.9, 0, 0, 0, api_name="/generate")
                for step in range(3):
                    picture, *_ = client.predict(step, 0, 1, 0, 3, api_name="/render")
                    with Image.open(picture) as opened:
                        opened.load()
                        shown.append((idx % 3, opened.mode, opened.size))
            except Exception as err:
                failures.append(repr(err))

        threads = [threading.Thread(target=session, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert failures == []
        assert len(shown) == 24 and all(mode == "RGB" and max(size) <= DISPLAY_MAX_SIDE for _, mode, size in shown)
        assert len({(image, size) for image, _, size in shown}) == 3  # each image: one picture size
    finally:
        demo.close()


def test_a_render_never_mutates_the_shared_display_copy(load_holder, tmp_path, awkward_files):
    slot = ModelSlot()
    slot.holder = load_holder("llava_next")
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(256))
    *_, last = handlers.generate(awkward_files[1], "Hi", 2, False, 0.7, 0.9, 0, 0, *VIEW, None, None)
    stored = handlers.store.get(last[0])
    before = np.asarray(stored.display(0)[0]).copy()
    for alpha in (0.0, 0.5, 1.0):
        handlers.render(last[0], *VIEW[:8], alpha, "overlay", True)
    assert np.array_equal(np.asarray(stored.display(0)[0]), before)


def test_a_one_pixel_image_is_enlarged_within_the_budget(load_holder, tmp_path):
    """A 1x1 image used to be zoomed 640 times on screen, with the labels and colour bar of its parts:
    a 222080x43520 picture (27 GB) that ended the server."""
    from ui.controls import ViewControls, defaults

    slot = ModelSlot()
    slot.holder = load_holder("qwen2_vl")
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(256))
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(path)
    *_, last = handlers.generate(str(path), "What is this?", 2, False, 0.7, 0.9, 0, 0, *VIEW, None, None)
    values = defaults(ViewControls)
    for changes in ({"method": "tam", "parts": True}, {"view": "side_by_side"}, {}):
        picture, *_ = handlers.render(last[0], *{**values, "layer_hi": 2, "head_hi": 3, **changes}.values())
        assert _fits(picture), (changes, picture.size)
