"""One user cannot slow down, starve or break the server for others, and nothing they send renders as markup."""

import dataclasses
import json
import shutil
import threading
import time

import gradio as gr
import numpy as np
import pytest
from PIL import Image

import app
from attention_extractor import capture_attention
from config import AppConfig
from conftest import noise_image
from errors import CaptureError, ImageLoadError, InputError, ModelLoadError
from exports import prune_outputs
from model_holder import ModelHolder
from pictures.views import as_text
from pipeline import ModelSlot, RunStore
from ui.handlers import Handlers
from utils import load_image
from visualization import colorbar_strip


def test_the_pixel_budget_is_clamped_to_the_processor_and_the_cap(load_holder):
    holder = load_holder("qwen2_vl")
    image = noise_image(320, 240)
    default = holder.build_inputs(image, "Hi")["image_grid_thw"][0].prod()
    huge = holder.build_inputs(image, "Hi", min_pixels=60_000_000)["image_grid_thw"][0]
    longest = holder.processor.image_processor.size["longest_edge"]
    assert int(huge.prod()) * 14 * 14 <= longest  # not 60 megapixels
    capped = dataclasses.replace(holder, max_pixels_cap=56 * 56)  # its fields only, not what tests patched on it
    small = capped.build_inputs(image, "Hi", max_pixels=10**9)["image_grid_thw"][0]
    assert int(small.prod()) * 14 * 14 <= 56 * 56 < int(default) * 14 * 14
    for bad in (float("nan"), -5, 2.5):
        with pytest.raises(ValueError, match="whole number of pixels"):
            holder.build_inputs(image, "Hi", max_pixels=bad)


def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)  # ~100 KB on disk, 900 megapixels
    with pytest.raises(ImageLoadError, match="megapixels"):
        load_image(bomb)
    wide = tmp_path / "wide.png"
    Image.new("1", (400, 300)).save(wide)
    with pytest.raises(ImageLoadError, match="at most 0 megapixels|decodes at most"):
        load_image(wide, max_pixels=100_000)
    assert load_image(wide).size == (400, 300)


def _broken_copy(src, dst, how: str):
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    if how == "no weights":
        weights.unlink()
    elif how == "pickle only":
        weights.rename(dst / "pytorch_model.bin")
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "no processor":
        for name in (
            "preprocessor_config.json",
            "processor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "chat_template.jinja",
            "chat_template.json",
            "video_preprocessor_config.json",
        ):
            (dst / name).unlink(missing_ok=True)
    elif how in ("other config", "huge config"):
        config = json.loads((dst / "config.json").read_text())
        text = config["text_config"]
        if how == "other config":
            text["intermediate_size"] = text["intermediate_size"] * 2  # shapes no longer match
        else:
            text.update(
                hidden_size=8192,
                num_hidden_layers=80,
                intermediate_size=29568,
                num_attention_heads=64,
                layer_types=["full_attention"] * 80,
            )
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    "how", ["no weights", "pickle only", "truncated", "no processor", "other config", "huge config"]
)
def test_a_failed_load_keeps_the_current_model(tiny_model_dirs, load_holder, tmp_path, how):
    slot = ModelSlot()
    slot.holder = current = load_holder("qwen2_vl")
    broken = _broken_copy(tiny_model_dirs["qwen2_vl"], tmp_path / "broken", how)
    with pytest.raises(ModelLoadError) as caught:
        slot.load(str(broken), device="cpu", dtype="float32")
    assert slot.holder is current  # everyone still has a model
    message = str(caught.value)
    assert "Traceback" not in message and len(message) < 600
    if how == "pickle only":
        assert "pickle" in message
    if how == "huge config":
        assert "declares" in message  # refused before allocating


def test_recordings_do_not_nest(load_holder):
    holder = load_holder("qwen2_vl")
    with capture_attention(holder.model):
        with pytest.raises(CaptureError, match="do not nest"):
            with capture_attention(holder.model):
                pass
    with capture_attention(holder.model):  # and the first one was released
        pass


@pytest.mark.parametrize(
    "argv,field,expected",
    [
        ([], "allow_model_loading", True),
        (["--share"], "allow_model_loading", False),
        (["--host", "0.0.0.0"], "allow_model_loading", False),
        (["--host", "0.0.0.0", "--allow-model-loading"], "allow_model_loading", True),
        (["--max-pixels-cap", "1000000"], "max_pixels_cap", 1_000_000),
    ],
)
def test_the_operator_decides_who_may_load_models(argv, field, expected):
    assert getattr(app.parse_args(argv), field) == expected


@pytest.mark.parametrize("argv", [["--session-cache-mb", "0"], ["--session-cache-mb", "-5"], ["--max-pixels-cap", "0"]])
def test_nonsense_limits_are_refused_at_start(argv):
    with pytest.raises(SystemExit):
        app.parse_args(argv)


def test_loading_when_turned_off_says_why(tiny_model_dirs, tmp_path):
    handlers = Handlers(AppConfig(outputs_dir=tmp_path, allow_model_loading=False), ModelSlot(), RunStore(64))
    with pytest.raises(gr.Error, match="turned off on this server"):
        handlers.load_model(str(tiny_model_dirs["qwen2_vl"]))
    assert handlers.slot.holder is None


def test_page_loads_never_wait_for_the_start_up_model(tmp_path):
    slot = ModelSlot()
    slot.ready.clear()  # a start-up load is running
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(64))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(handlers.page_load())) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert len(answers) == 40 and all("Loading the start-up model" in a[0] for a in answers)
    assert all(a[-1].active for a in answers)  # each page asks again later
    slot.ready.set()
    assert not handlers.page_load()[-1].active


def test_nothing_from_a_tokenizer_or_a_user_renders_as_markup(load_holder, tmp_path):
    assert (
        as_text("</s> <img src=x onerror=alert(1)> **b** [l](http://x)")
        == r"&lt;/s&gt; &lt;img src=x onerror=alert(1)&gt; \*\*b\*\* \[l\](http:" + "\u2060//x)"
    )
    assert "://" not in as_text("see https://evil.example or www.evil.example, mail me@evil.example")
    assert "www." not in as_text("www.evil.example") and "@e" not in as_text("me@evil.example")
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), ModelSlot(), RunStore(64))
    with pytest.raises(gr.Error) as caught:
        handlers.load_model("<img src=http://example.com/x.png>")
    assert "<img" not in caught.value.message and "&lt;img" in caught.value.message
    holder = load_holder("llava")
    slot = ModelSlot()
    slot.holder = holder
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(64))
    *_, last = handlers.generate(str(_png(tmp_path)), "Hi", 2, False, 0.7, 0.9, 0, 0, None, None)
    run = handlers.store.get(last[0]).run
    run.generated_tokens[0] = "<b>bold</b>"
    caption = handlers.render(last[0])[1]
    assert "<b>" not in caption and "&lt;b&gt;bold&lt;/b&gt;" in caption


def _png(folder):
    path = folder / "in.png"
    noise_image(80, 60).save(path)
    return path


def test_outputs_stay_under_their_budget_oldest_first(tmp_path):
    for k in range(6):
        path = tmp_path / f"run-{k}" / "attention.safetensors" if k % 2 else tmp_path / f"picture-{k}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 400_000)
        stamp = time.time() - 1000 + k  # older than the grace period of a file being written or fetched
        import os

        os.utime(path, (stamp, stamp))
    newest = tmp_path / "picture-4.png"
    assert prune_outputs(tmp_path, max_mb=1.0, keep=[newest]) == 4
    left = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["attention.safetensors", "picture-4.png"] and not (tmp_path / "run-1").exists()
    assert np.isclose(sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()), 800_000)
    (tmp_path / "just-written.gif").write_bytes(b"x" * 400_000)  # another user's export, seconds old
    assert prune_outputs(tmp_path, max_mb=0.1, keep=[newest]) == 1  # the old one goes, the young one stays
    assert (tmp_path / "just-written.gif").exists()


def test_login_backs_off_after_wrong_passwords():
    from ui.components import LoginGuard

    now = [0.0]
    guard = LoginGuard("ada", "secret", clock=lambda: now[0])
    assert guard("ada", "secret")
    results = [guard("ada", f"guess{k}") for k in range(200)]  # 200 guesses at once
    assert not any(results)
    assert guard.failures() == 5  # only 5 were even checked
    assert not guard("ada", "secret")  # locked, even for the right one
    now[0] += 1.5
    assert guard("ada", "secret") and guard.failures() == 0  # the window passed; reset


def test_a_guesser_elsewhere_never_locks_the_real_user_out():
    from ui.components import CLIENT_ADDRESS, LoginGuard

    now = [0.0]
    guard = LoginGuard("ada", "secret", clock=lambda: now[0])

    def attempt(address: str, user: str, password: str) -> bool:
        token = CLIENT_ADDRESS.set(address)
        try:
            return guard(user, password)
        finally:
            CLIENT_ADDRESS.reset(token)

    logins = 0
    for second in range(22):  # four wrong passwords a second from the attacker, one right login from ada
        now[0] = float(second)
        assert not any(attempt("203.0.113.9", "ada", f"guess{second}-{k}") for k in range(4))
        logins += attempt("198.51.100.7", "ada", "secret")
    assert logins == 22  # every one of the real user's logins went through
    assert guard.failures("203.0.113.9", "ada") > 5 and not attempt("203.0.113.9", "ada", "secret")  # locked
    assert attempt("203.0.113.9", "bob", "nope") is False and guard.failures("203.0.113.9", "bob") == 1


def test_inline_images_obey_the_upload_cap(tmp_path):
    from gradio.data_classes import FileData

    from ui.components import image_upload, upload_bytes

    assert upload_bytes("50mb") == 50 * 2**20 and upload_bytes("1kb") == 1024
    big = tmp_path / "big.png"
    noise_image(600, 600).save(big)  # ~1 MB of noise
    upload = image_upload(100_000)
    assert type(upload) is gr.Image  # a plain component: no stub file
    with pytest.raises(gr.Error, match="accepts up to"):
        upload.preprocess(FileData(path=str(big)))
    small = tmp_path / "small.png"
    noise_image(20, 20).save(small)
    assert upload.preprocess(FileData(path=str(small)))


def test_pictures_are_drawn_from_a_bounded_display_copy(load_holder, tmp_path):
    holder = load_holder("qwen2_vl")
    slot = ModelSlot()
    slot.holder = holder
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(512))
    path = tmp_path / "large.png"
    noise_image(4000, 3000).save(path)
    *_, last = handlers.generate(str(path), "Hi", 2, False, 0.7, 0.9, 0, 0, None, None)
    stored = handlers.store.get(last[0])
    assert last[4].size == (2048, 1536 + colorbar_strip(2048))  # the picture (and its colour bar), not 4000x3000
    assert stored.image.size == (4000, 3000)  # model passes keep the original
    grid_h, grid_w = stored.run.vision.grid_hw

    class Click:  # the last cell, clicked on the picture
        index = (2047, 1535)

    region, *_ = handlers.region_click(last[0], [], "overlay", Click())
    assert region == [[grid_h - 1, grid_w - 1]]


def test_the_recorder_refuses_batches(load_holder, dummy_image):
    holder = load_holder("qwen2_vl")
    inputs = holder.on_model(holder.build_inputs(dummy_image, "Hi"))
    doubled = {
        key: value.repeat(2, *[1] * (value.dim() - 1))
        if key in ("input_ids", "attention_mask", "mm_token_type_ids")
        else value
        for key, value in inputs.items()
    }
    doubled["pixel_values"] = inputs["pixel_values"].repeat(2, 1)
    doubled["image_grid_thw"] = inputs["image_grid_thw"].repeat(2, 1)
    import torch

    with torch.inference_mode(), capture_attention(holder.model) as recorder:
        out = holder.model.generate(**doubled, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    with pytest.raises(CaptureError, match="batch of one"):
        recorder.finish(inputs["input_ids"].shape[1], out.shape[1] - inputs["input_ids"].shape[1], {})


@pytest.mark.parametrize(
    "argv,warned",
    [
        ([], []),
        (["--host", "0.0.0.0"], ["--host 0.0.0.0"]),
        (["--share"], ["--share"]),
        (["--host", "0.0.0.0", "--auth", "a:b"], []),
    ],
)
def test_an_exposed_server_without_auth_is_warned_about(argv, warned):
    warnings = app.exposure_warnings(app.parse_args(argv))
    assert [w.split(" without")[0] for w in warnings] == warned


def test_an_unexpected_failure_in_generation_is_said_plainly(load_holder, tmp_path, monkeypatch):
    holder = load_holder("qwen2_vl")
    slot = ModelSlot()
    slot.holder = holder
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(64))

    def broken(*args, **kwargs):
        raise RuntimeError("<kernel> exploded")

    monkeypatch.setattr(holder, "generate", broken)
    with pytest.raises(gr.Error, match="Generation failed: &lt;kernel&gt; exploded"):
        list(handlers.generate(str(_png(tmp_path)), "Hi", 2, False, 0.7, 0.9, 0, 0, None, None))
    monkeypatch.undo()
    *_, last = handlers.generate(str(_png(tmp_path)), "Hi", 2, False, 0.7, 0.9, 0, 0, None, None)
    assert handlers.store.get(last[0]).run.num_steps >= 1  # the next request works


def test_a_handlers_own_message_reaches_the_user_unchanged(tmp_path):
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), ModelSlot(), RunStore(64))
    with pytest.raises(gr.Error) as caught:
        list(handlers.generate(None, "  ", 2, False, 0.7, 0.9, 0, 0, None, None))
    assert caught.value.message == "The prompt is empty. Type a question or instruction about the image."


def test_a_busy_port_names_the_port_option():
    import socket

    import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"--port {port + 1}"):
            app.main(["--port", str(port), "--model", "unused"])


def test_gradios_cache_is_cleaned_on_the_configured_schedule(tmp_path):
    import app
    from pipeline import ModelSlot, RunStore

    cfg = AppConfig(outputs_dir=tmp_path, cache_max_age_s=1234)
    demo = app.build_ui(cfg, ModelSlot(), RunStore(64))
    assert demo.delete_cache == (1234, 1234)  # every 1234 s, files older than 1234 s


@pytest.mark.parametrize(
    "field, values", [("max_new_tokens", (2.5, float("nan"), 0)), ("max_pixels", (1000.5, float("inf"), -5))]
)
def test_the_apps_numbers_are_whole_or_refused(tiny_model_dirs, tmp_path, field, values):
    slot = ModelSlot()
    slot.load(str(tiny_model_dirs["qwen2_vl"]), "cpu", "float32")
    handlers = Handlers(AppConfig(outputs_dir=tmp_path), slot, RunStore(64))
    image = tmp_path / "in.png"
    noise_image(60, 40).save(image)
    view = [0, 0, 2, 0, 3, "mean", "minmax", "jet", 0.5, "overlay", False]
    for value in values:
        args = dict(max_new_tokens=2, max_pixels=0) | {field: value}
        with pytest.raises(gr.Error, match="whole number"):
            list(
                handlers.generate(
                    str(image), "Hi", args["max_new_tokens"], False, 0.7, 0.9, 0, args["max_pixels"], *view, None, None
                )
            )


@pytest.mark.parametrize(
    "text, field",
    [
        ('{"model": "m", "layers": [0, Infinity], "heads": [0, 1]}', "not valid JSON"),
        ('{"model": "m", "layers": [0.5, 2], "heads": [0, 1]}', "'layers' must be"),
        ('{"model": "m", "layers": [true, 2], "heads": [0, 1]}', "'layers' must be"),
        ('{"model": "m", "layers": [0, 2], "heads": ["0", "1"]}', "'heads' must be"),
        ('{"model": "m", "layers": [0, 2], "heads": [0, 1, 2]}', "'heads' must be"),
        ('{"model": "", "layers": [0, 2], "heads": [0, 1]}', "'model' must be"),
        ("[1, 2]", "not an object"),
        ("DEEP", "not a small JSON object"),
        ('{"model": "m", "layers": [0, 2], "heads": [0, NaN]}', "not valid JSON"),
    ],
)
def test_a_ranges_file_is_held_to_its_schema(tmp_path, text, field):
    from config import ModelRanges

    path = tmp_path / "ranges.json"
    path.write_text("[" * 100_000 + "]" * 100_000 if text == "DEEP" else text)
    with pytest.raises(InputError, match=field):
        ModelRanges.read(path)
    with pytest.raises(SystemExit):  # the command line says so, with no traceback
        app.parse_args(["--ranges", str(path)])


def test_a_refused_load_never_holds_the_model_for_others(tiny_model_dirs, monkeypatch):
    slot = ModelSlot()
    started, release = threading.Event(), threading.Event()

    def slow_refusal(*args, **kwargs):  # a checkpoint whose config takes long to check, then is refused
        started.set()
        release.wait(10)
        raise ModelLoadError("declares 20000 layers")

    monkeypatch.setattr(ModelHolder, "load", slow_refusal)
    loading = threading.Thread(target=lambda: pytest.raises(ModelLoadError, slot.load, "huge"))
    loading.start()
    started.wait(10)
    assert slot.lock.acquire(timeout=1)  # a generation could run meanwhile
    slot.lock.release()
    release.set()
    loading.join(10)


def test_what_a_user_typed_is_literal_in_its_own_message():
    from ui.components import parse_box, whole_number

    with pytest.raises(gr.Error) as caught:
        parse_box("<img src=x onerror=alert(1)>")
    assert "<img" not in caught.value.message and "&lt;img" in caught.value.message
    with pytest.raises(gr.Error) as caught:
        whole_number("<b>5</b>", "Max new tokens")
    assert "<b>" not in caught.value.message
