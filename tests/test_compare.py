"""Two runs side by side: token matching, maps on the image's pixels, and the comparison through the API,
the app's handlers, gradio_client and a real browser, for two prompts, two images and two models."""

import os

import numpy as np
import pytest

import app
from config import AppConfig
from conftest import free_port, noise_image
from errors import InputError
from pictures.compare import compare_runs, matched_step, pixel_density
from pictures.stored_run import StoredRun
from pipeline import ModelSlot, RunStore
from records import VisionLayout

VIEW = dict(token=0, layer_lo=0, layer_hi=2, head_lo=0, head_hi=3)


def test_a_maps_mass_lands_on_its_cells_pixels_and_sums_to_one_over_what_was_seen():
    layout = VisionLayout(np.arange(6), (2, 3), (300, 200), (0.0, 20.0, 300.0, 180.0), (160, 240))
    heat = np.zeros((2, 3), np.float32)
    heat[1, 2] = 3.0
    heat[0, 0] = 1.0
    density = pixel_density(layout, heat, (150, 100))
    seen = np.isfinite(density)
    assert not seen[:10].any() and not seen[-10:].any() and seen[10:90].all()  # the box's top and bottom cut
    assert np.isclose(np.nansum(density), 1.0)
    assert np.isclose(np.nansum(density[50:90, 100:]), 0.75) and np.isclose(np.nansum(density[10:50, :50]), 0.25)
    assert np.nansum(density[10:50, 50:]) == 0.0


def test_tokens_are_matched_by_position_or_by_the_nearest_same_text(load_holder, dummy_image):
    holder = load_holder("qwen2_5_vl")
    a = holder.generate(dummy_image, "What is this?", max_new_tokens=4, min_new_tokens=4)
    b = holder.generate(dummy_image, "What is that?", max_new_tokens=3, min_new_tokens=3)
    assert matched_step(a, b, 2, "position") == 2
    with pytest.raises(InputError, match="has no token 3"):
        matched_step(a, b, 3, "position")
    a.generated_tokens[:] = ["red", " circle", " is", " red"]
    b = holder.generate(dummy_image, "What is that?", max_new_tokens=4, min_new_tokens=4)
    b.generated_tokens[:] = ["x", " red", " a", "red"]
    assert matched_step(a, b, 0, "text") == 1 and matched_step(a, b, 3, "text") == 3  # the nearest same text
    with pytest.raises(InputError, match="not in run B's answer"):
        matched_step(a, b, 1, "text")
    with pytest.raises(InputError, match="Unknown match"):
        matched_step(a, b, 0, "meaning")


def test_two_prompts_and_two_images_through_the_api(load_holder):
    holder = load_holder("qwen2_5_vl")
    image, other = noise_image(160, 120, seed=1), noise_image(160, 120, seed=2)
    a = holder.generate(image, "What is this?", max_new_tokens=3, min_new_tokens=3)
    b = holder.generate(image, "Describe the picture.", max_new_tokens=3, min_new_tokens=3)
    found = compare_runs(a, b, 1, layers=(1, 2), heads=(0, 1))
    assert found.what == "two prompts" and found.step_b == 1
    assert np.allclose(found.density_a[np.isfinite(found.density_a)].sum(), 1.0)
    assert np.allclose(found.difference, found.density_a - found.density_b, equal_nan=True)
    assert found.layers_a == [1, 2] and found.shares_a.shape == (2,)
    stored_a = StoredRun(a)
    expected = stored_a.shares[1][1:3, 0:2].mean(axis=1)
    assert np.allclose(found.shares_a, expected)
    assert found.picture.size[0] > 3 * 100 and "two prompts" in found.caption
    assert found._repr_png_().startswith(b"\x89PNG") and "<svg" in found._repr_html_()

    c = holder.generate(other, "What is this?", max_new_tokens=3, min_new_tokens=3)
    images = compare_runs(a, c, 0)
    assert images.what == "two images" and np.abs(np.nan_to_num(images.difference)).max() > 0
    same = compare_runs(a, a, 0)
    assert np.nanmax(np.abs(same.difference)) == 0.0  # a run against itself differs nowhere

    small = holder.generate(noise_image(100, 120, seed=2), "What is this?", max_new_tokens=2, min_new_tokens=2)
    with pytest.raises(InputError, match="different sizes"):
        compare_runs(a, small, 0)


def test_two_models_of_different_families_and_grids(load_holder):
    """A Qwen and a LLaVA checkpoint on one image: different grids, different depths; LLaVA's centre crop
    leaves pixels it never saw, which have no difference."""
    image = noise_image(200, 120, seed=4)
    qwen, llava = load_holder("qwen2_5_vl"), load_holder("llava")
    a = qwen.generate(image, "What is this?", max_new_tokens=2, min_new_tokens=2)
    b = llava.generate(image, "What is this?", max_new_tokens=2, min_new_tokens=2)
    found = compare_runs(a, b, 0, step_in="b")
    assert found.what == "two models" and found.heat_a.shape != found.heat_b.shape
    assert np.isfinite(found.density_a).all()  # Qwen sees the whole image
    unseen = ~np.isfinite(found.density_b)
    assert unseen.any() and unseen[:, 0].all()  # the left and right strips outside LLaVA's square crop
    assert np.isnan(found.difference[unseen]).all() and np.isfinite(found.difference[~unseen]).all()
    assert len(found.shares_b) == b.num_layers


def _generate(h, image_file, prompt="What is this?"):
    values = list(VIEW.values()) + ["mean", "minmax", "jet", 0.5, "overlay", False]
    *_, last = h.generate(image_file, prompt, 3, False, 0.7, 0.9, 0, 0, *values, None, None)
    return last[0]


def test_the_app_compares_a_kept_result_with_the_current_one_for_two_models(tiny_model_dirs, tmp_path):
    path = tmp_path / "photo.png"
    noise_image(200, 150, seed=5).save(path)
    cfg = AppConfig(outputs_dir=tmp_path / "outputs", max_new_tokens=3)
    h = app.Handlers(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))
    view = list(VIEW.values()) + ["mean", "minmax", "jet", 0.5, "overlay", False]
    assert h.compare(None, None, "position", *view)[2].startswith("No result is kept as A")
    h.load_model(str(tiny_model_dirs["qwen2_vl"]))
    run_a = _generate(h, str(path))
    kept, note, shown = h.compare_keep(run_a)
    assert kept == run_a and "qwen" in note.lower() and shown is False
    h.load_model(str(tiny_model_dirs["llava"]))  # the first result is kept while another model is loaded
    run_b = _generate(h, str(path))
    picture, table, note, shown = h.compare(run_b, run_a, "position", *view)
    assert shown is True and picture.size[0] > 300 and "two models" in note
    assert set(table["run"]) == {f"A: {h.store.get(run_a).run.model_id}", f"B: {h.store.get(run_b).run.model_id}"}
    assert len(h.store) == 2 and h.store.total_bytes == h.store.get(run_a).nbytes + h.store.get(run_b).nbytes
    follow = h.compare_follow(run_b, run_a, "position", True, *view)
    assert follow[2] == note
    import gradio as gr

    with pytest.raises(gr.Error, match="has no token 9|not in run B|not in this answer|out of range"):
        h.compare(run_b, run_a, "position", 9, *view[1:])


def test_the_comparison_follows_a_new_result_the_token_and_the_ranges(tmp_path):
    cfg = AppConfig(outputs_dir=tmp_path / "outputs")
    demo = app.build_ui(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))
    config = demo.get_config_file()
    ids = {getattr(block, "elem_id", None): block._id for block in demo.blocks.values()}
    picture = ids["compare-picture"]
    follow = [dep for dep in config["dependencies"] if picture in dep["outputs"] and dep.get("api_name") != "compare"]
    assert len(follow) == 1
    triggers = {tuple(target) for target in follow[0]["targets"]}
    run_id = follow[0]["inputs"][0]  # the session's result id: a new result is a change of it
    assert (run_id, "change") in triggers and (ids["token-dropdown"], "change") in triggers


def test_compare_through_gradio_client_for_two_prompts(tiny_model_dirs, tmp_path):
    from gradio_client import Client, handle_file

    path = tmp_path / "photo.png"
    noise_image(160, 120, seed=6).save(path)
    cfg = AppConfig(outputs_dir=tmp_path / "outputs")
    demo = app.build_ui(cfg, ModelSlot(), RunStore(cfg.session_cache_mb))
    demo.queue()
    port = free_port()
    demo.launch(server_port=port, prevent_thread_lock=True, ssr_mode=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict(str(tiny_model_dirs["qwen2_5_vl"]), api_name="/load_model")
        client.predict(handle_file(str(path)), "What is this?", 3, api_name="/generate")
        note = client.predict(api_name="/compare_keep")
        assert "A:" in str(note)
        client.predict(handle_file(str(path)), "Describe it.", 3, api_name="/generate")
        picture, plot, note = client.predict(match="position", token=1, api_name="/compare")
        assert os.path.exists(picture) and "two prompts" in note and "token 1" in note
    finally:
        demo.close()


@pytest.fixture
def served_two_models(tiny_model_dirs, tmp_path):
    from test_browser import _serve

    url, proc = _serve(tmp_path, ["--model", str(tiny_model_dirs["qwen2_5_vl"])])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def _compared(page, expected: str, timeout_s: float = 60.0) -> str:
    """Press 'Compare with A' until the note names `expected` (B's generation may still be finishing)."""
    import time

    deadline = time.time() + timeout_s
    note = page.locator("#compare-note")
    while time.time() < deadline:
        page.locator("#compare-btn").click()
        try:
            page.wait_for_function(
                "(text) => document.querySelector('#compare-note').innerText.includes(text)", arg=expected, timeout=3000
            )
            return note.inner_text()
        except Exception:  # playwright's timeout: not yet
            continue
    raise AssertionError(f"the comparison never said {expected!r}: {note.inner_text()!r}")


def test_a_real_browser_compares_two_prompts_two_images_and_two_models(served_two_models, tiny_model_dirs, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from test_browser import CHROMIUM, LAUNCH_ARGS, _generate_in_page, _scene

    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (apt install chromium)")
    scene, flipped = _scene(tmp_path / "scene.png"), _scene(tmp_path / "flipped.png", flip=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_two_models, scene, "What is this?")
        problems = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.get_by_role("tab", name="Compare two runs").click()
        page.locator("#compare-btn").click()
        expect(page.locator("#compare-note")).to_contain_text("No result is kept as A", timeout=20_000)
        page.locator("#compare-keep").click()
        expect(page.locator("#compare-note")).to_contain_text("A:", timeout=20_000)

        page.locator("#prompt textarea").fill("Describe the picture.")  # two prompts
        page.locator("#generate-btn").click()
        assert "token 0" in _compared(page, "two prompts")
        expect(page.locator("#compare-picture img")).to_be_visible(timeout=20_000)
        expect(page.locator("#compare-plot")).to_be_visible()
        page.screenshot(path=str(tmp_path / "compare-prompts.png"), full_page=True)

        page.locator("#image-input input[type=file]").set_input_files(flipped)  # two images of one size
        page.locator("#prompt textarea").fill("What is this?")
        page.locator("#generate-btn").click()
        _compared(page, "two images")

        page.locator("#image-input input[type=file]").set_input_files(scene)  # two models, one after the other
        page.locator("#model-id input").fill(str(tiny_model_dirs["llava"]))
        page.locator("#model-id input").press("Enter")
        page.locator("#load-btn").click()
        expect(page.locator("#model-status")).to_contain_text("LLaVA", timeout=60_000)
        page.locator("#generate-btn").click()
        _compared(page, "two models")
        browser.close()
    assert not problems, problems
