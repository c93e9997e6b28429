"""Bad input is refused early with a message that says what to do."""

import io

import numpy as np
import pytest
from PIL import Image

from errors import ImageLoadError, ModelLoadError, UnsupportedModelError
from model_holder import ModelHolder
from utils import load_image


def test_unsupported_model_type_names_the_supported_families(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported.*Qwen2-VL.*Qwen2.5-VL.*LLaVA-1.5"):
        ModelHolder.load(tmp_path, device="cpu")


def test_cross_attention_models_are_refused_with_the_reason(tmp_path):
    from transformers import MllamaConfig

    MllamaConfig().save_pretrained(tmp_path)
    with pytest.raises(
        UnsupportedModelError,
        match=r"'mllama' is not supported\. Llama 3\.2 Vision reads the image "
        r"through cross-attention.*InternVL.*SmolVLM",
    ):
        ModelHolder.load(tmp_path, device="cpu")


def test_missing_model_mentions_offline_mode_and_local_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE.*local folder"):
        ModelHolder.load("nobody-here/no-such-model", device="cpu")
    with pytest.raises(ModelLoadError, match="No local folder"):
        ModelHolder.load(str(tmp_path / "no-such-model"), device="cpu")


def test_cuda_without_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no GPU"):
        ModelHolder.load("anything", device="cuda")


def test_missing_image_and_empty_prompt(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    with pytest.raises(ImageLoadError, match="No image"):
        holder.generate(None, "What is this?")
    for prompt in ["", "   \n"]:
        with pytest.raises(ValueError, match="prompt is empty"):
            holder.generate(dummy_image, prompt)


def test_unreadable_and_truncated_files(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(not_image)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[:400])
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.jpg")


def test_awkward_images_become_upright_8bit_rgb(tmp_path):
    deep = Image.fromarray((np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16))
    rgb = load_image(deep)
    assert rgb.mode == "RGB" and 0 < np.asarray(rgb).mean() < 255  # not clipped to white
    transparent = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)  # alpha flattened onto white
    rotated = Image.new("RGB", (40, 20), "red")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° when displayed
    path = tmp_path / "rotated.jpg"
    rotated.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_capture_too_large_is_refused_up_front_with_a_suggestion(load_holder, dummy_image):
    from errors import CaptureTooLargeError

    holder = load_holder("qwen2_vl")
    with pytest.raises(CaptureTooLargeError, match="give fewer or smaller images, or lower the image"):
        holder.generate(dummy_image, "Hi", max_new_tokens=50, max_capture_mb=0.001)
    from attention_extractor import estimate_capture_bytes

    for store in ("rows", "qk"):  # the estimate is exactly what each store keeps
        run = holder.generate(dummy_image, "Hi", max_new_tokens=4, min_new_tokens=4, max_capture_mb=1, store=store)
        assert run.attention.kind == store
        assert run.nbytes == estimate_capture_bytes(
            holder.model, holder.num_layers, len(run.prompt_ids), 4, len(run.prompt_positions), store
        )
