"""A request's images are checked from their headers, before any is decoded: their number, their pixels
together, and the prompt length the family's own resize rule gives them."""

import struct
import zlib

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from config import DEMO_MODEL_DIR, AppConfig
from conftest import noise_image
from errors import InputError
from model_holder import MediaLimits
from pipeline import ModelSlot, RunStore
from testing.tiny_models import FAMILIES
from ui.handlers import Handlers
from utils import image_header_size, video_header

SIZES = [(37, 29), (200, 120), (640, 480), (90, 700), (1000, 1000), (3000, 40)]


def header_only_png(path, width: int, height: int):
    """A PNG whose header says width x height and which holds no pixel data: opening it works, decoding
    it fails, so a check that passes on it never decoded it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prompt_length_is_known_from_the_image_sizes_alone(load_holder, family):
    holder = load_holder(family)
    for width, height in SIZES:
        for budget in (None, 100 * 100):
            images = [Image.new("RGB", (width, height), (90, 40, 20))] * 2
            try:
                inputs = holder.build_inputs(images, "Where is it?", None, budget)
            except InputError:  # an aspect ratio this family's processor refuses
                continue
            predicted, counts = holder.predicted_length([(width, height)] * 2, "Where is it?", None, budget)
            assert predicted == inputs["input_ids"].shape[1], (width, height, budget)
            assert len(counts) == 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_a_videos_tokens_are_known_from_its_header(load_holder, family):
    holder = load_holder(family)
    frames = [noise_image(96, 64, seed=i) for i in range(4)]
    inputs = holder.build_inputs(None, "What happens?", video=frames)
    _, counts = holder.predicted_length([], "What happens?", video=(4, (96, 64)))
    assert counts == [int((inputs["input_ids"] == holder.model.config.video_token_id).sum())]


def test_headers_give_the_upright_size_without_decoding(tmp_path):
    path = header_only_png(tmp_path / "big.png", 4000, 3000)
    assert image_header_size(path) == (4000, 3000)
    with pytest.raises(Exception):  # noqa: B017 - there are no pixels to decode
        Image.open(path).load()
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn
    noise_image(60, 40).save(rotated, exif=exif)
    assert image_header_size(rotated) == (40, 60)
    assert video_header([noise_image(30, 20)] * 5) == (4, (30, 20))


@pytest.fixture
def loaded(load_holder, tmp_path):
    slot = ModelSlot()
    slot.holder = load_holder("qwen2_vl")
    return slot, Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(256))


def _generate(handlers, paths):
    return list(handlers.generate(str(paths[0]), "Hi", 2, False, 0.7, 0.9, 0, 0, [str(p) for p in paths[1:]], None))


def test_too_many_images_are_refused_before_any_is_decoded(loaded, tmp_path):
    slot, handlers = loaded
    paths = [header_only_png(tmp_path / f"{i}.png", 4000, 4000) for i in range(16)]
    with pytest.raises(gr.Error, match="16 images; this server takes at most 8"):
        _generate(handlers, paths)
    with pytest.raises(InputError, match="at most 8"):
        slot.holder.generate(paths, "Hi", max_new_tokens=2)


def test_images_too_long_for_the_context_are_refused_with_each_size(tmp_path):
    slot = ModelSlot()
    slot.load(str(DEMO_MODEL_DIR), "cpu", "float32")
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(256))
    paths = [header_only_png(tmp_path / f"{i}.png", 4000, 4000) for i in range(6)]
    with pytest.raises(gr.Error) as caught:  # a decode would fail: these files hold no pixels
        _generate(handlers, paths)
    message = caught.value.message
    assert "exceeds the model's context of 512" in message
    assert "image 6: 4000x4000 px, " in message and "give fewer or smaller images" in message
    with pytest.raises(InputError, match="Image 1: 4000x4000 px"):
        slot.holder.generate(paths[:4], "Hi", max_new_tokens=2)


def test_the_pixels_of_all_images_together_are_bounded(loaded, tmp_path):
    slot, _ = loaded
    paths = [header_only_png(tmp_path / f"{i}.png", 6000, 6000) for i in range(3)]
    limits = MediaLimits(max_images=8, max_total_pixels=100_000_000)
    with pytest.raises(InputError, match=r"6000x6000, 6000x6000, 6000x6000\) hold 108 megapixels"):
        slot.holder.generate(paths, "Hi", max_new_tokens=2, limits=limits)


def test_images_within_the_limits_still_generate(loaded, tmp_path):
    _, handlers = loaded
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"ok{i}.png")
        Image.fromarray(np.full((40 + 8 * i, 60, 3), 40 * i, np.uint8)).save(paths[-1])
    *_, last = _generate(handlers, paths)
    assert len(handlers.store.get(last[0]).run.visions) == 3


def test_a_video_its_header_does_not_describe_is_left_to_the_reader(load_holder, tmp_path):
    holder = load_holder("qwen2_vl")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert video_header(str(broken)) == (0, (0, 0))
    holder.check_media([], "Hi", 2, video=(0, (0, 0)))  # no verdict from an empty header
    with pytest.raises(Exception, match="at least two frames"):
        holder.generate(None, "Hi", max_new_tokens=2, video=str(broken))


def test_a_video_the_browser_cannot_play_gets_a_webm_preview(tmp_path):
    import cv2

    from utils import playable_preview

    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 5, (1280, 720))
    for k in range(12):
        writer.write(np.full((720, 1280, 3), 20 * k, np.uint8))
    writer.release()
    preview = playable_preview(clip, tmp_path, max_side=480, max_frames=10)
    read = cv2.VideoCapture(str(preview))
    code = int(read.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode("latin-1").lower()
    size = int(read.get(cv2.CAP_PROP_FRAME_WIDTH)), int(read.get(cv2.CAP_PROP_FRAME_HEIGHT))
    frames = 0
    while read.read()[0]:
        frames += 1
    read.release()
    assert preview.suffix == ".webm" and code in ("vp80", "vp08") and size == (480, 270) and frames == 10
    assert playable_preview(preview, tmp_path) is None  # a browser plays VP8 as it is
    assert playable_preview(tmp_path / "missing.mp4", tmp_path) is None
