"""The whole workflow in a real browser: Debian's chromium driven by playwright.

Starts `python app.py` on a tiny model in a subprocess, uploads an image, generates, picks a
token, moves the layer range and checks that the picture changes. Saves a screenshot to
outputs/browser-test*.png; the README's pictures come from scripts/screenshots.py.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

from config import DEMO_RANGES
from conftest import REPO, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt install chromium)")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def _scene(path, flip: bool = False) -> str:
    image = Image.new("RGB", (640, 480), (235, 235, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((380, 90, 560, 270), fill=(220, 30, 30))
    draw.rectangle((80, 260, 240, 420), fill=(30, 60, 220))
    (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image).save(path)
    return str(path)


def _serve(tmp_path, model_args: list[str]):
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), *model_args, "--port", str(port), "--device", "cpu"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None, (tmp_path / "app.log").read_text()
            time.sleep(0.5)
    return url, proc


@pytest.fixture
def served_app(tiny_model_dirs, tmp_path):
    url, proc = _serve(tmp_path, ["--model", str(tiny_model_dirs["qwen2_5_vl"])])
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def served_default(tmp_path):
    url, proc = _serve(tmp_path, [])  # no --model: the CPU default
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.mark.skipif(not (REPO / "demo_model" / "config.json").exists(), reason="the demo model is not present")
def test_default_start_serves_the_demo_model_with_examples(served_default):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(served_default)
        expect(page.locator("#model-status")).to_contain_text("demo_model", timeout=60_000)
        expect(page.locator("#layer-range-handle-lo")).to_have_attribute(
            "aria-valuenow", str(DEMO_RANGES[0][0]), timeout=10_000
        )
        page.get_by_text("What color is the circle?").first.click()  # an example row
        expect(page.locator("#prompt textarea")).to_have_value("What color is the circle?", timeout=10_000)
        page.locator("#generate-btn").click()
        expect(page.locator("#caption")).to_contain_text("Token 0", timeout=60_000)
        (layer_lo, layer_hi), (head_lo, head_hi) = DEMO_RANGES
        expect(page.locator("#caption")).to_contain_text(f"layers {layer_lo}–{layer_hi} · heads {head_lo}–{head_hi}")
        expect(page.locator("#overlay img")).to_be_visible(timeout=20_000)
        expect(page.locator("#share-plot canvas, #share-plot svg").first).to_be_visible(timeout=20_000)
        page.wait_for_timeout(500)
        (REPO / "outputs").mkdir(exist_ok=True)
        page.screenshot(path=str(REPO / "outputs" / "browser-test-demo.png"), full_page=True)

        page.get_by_role("tab", name="Verify").click()  # verify the trained model's map
        page.locator("#verify-btn").click()
        expect(page.locator("#verify-note")).to_contain_text("Deletion AUC", timeout=60_000)
        page.wait_for_timeout(500)
        page.locator("#verify-plot").screenshot(path=str(REPO / "outputs" / "browser-test-demo-verify.png"))
        browser.close()


def _generate_in_page(browser, url: str, image_path: str, prompt: str):
    """A new page on the app, with a model loaded, the image uploaded and the first token drawn."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1250})
    page.goto(url)
    expect(page.locator("#model-status")).to_contain_text("Loaded", timeout=60_000)
    page.locator("#image-input input[type=file]").set_input_files(image_path)
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#generate-btn").click()
    expect(page.locator("#caption")).to_contain_text("Token 0", timeout=60_000)
    return page


def _on_image(page, fx: float, fy: float, image_width: int = 640) -> tuple[float, float]:
    """Screen coordinates of the point at fractions (fx, fy) of the image itself on the picture, above the
    colour bar's strip (`image_width`: the uploaded image's width in pixels)."""
    from visualization import colorbar_strip

    bounds = page.locator("#overlay img").bounding_box()
    natural_w, natural_h = page.evaluate(
        "(() => { const i = document.querySelector('#overlay img'); return [i.naturalWidth, i.naturalHeight]; })()"
    )
    zoom = natural_w / image_width
    content = (natural_h - colorbar_strip(image_width) * zoom) / natural_h
    return bounds["x"] + fx * bounds["width"], bounds["y"] + fy * content * bounds["height"]


def _picture_src(page) -> str:
    return page.locator("#overlay img").get_attribute("src") or ""


def test_upload_generate_pick_token_and_move_layer_range(served_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "What color is the circle?")
        first = _picture_src(page)
        assert first

        page.locator("#token-chips label").nth(1).click()  # a token chip picks token 1
        expect(page.locator("#caption")).to_contain_text("Token 1", timeout=20_000)
        expect(page.locator("#token-dropdown input")).to_have_value(re.compile(r"^1: "), timeout=5_000)
        token1 = _picture_src(page)

        assert page.locator("#layer-range [role=slider], #head-range [role=slider]").count() == 4
        upper = page.locator("#layer-range-handle-hi")
        upper.focus()
        upper.press("Home")  # pushes the lower one: layers 0..0
        expect(page.locator("#caption")).to_contain_text("layers 0 ·", timeout=20_000)
        expect(page.locator("#caption")).to_contain_text("Token 1")
        page.wait_for_function(
            "(old) => document.querySelector('#overlay img').src !== old", arg=token1, timeout=20_000
        )
        assert _picture_src(page) not in (first, token1)

        upper.press("End")  # back to all layers
        expect(page.locator("#caption")).to_contain_text("layers 0–", timeout=20_000)
        lower = page.locator("#head-range-handle-lo")  # arrow keys move one head
        lower.focus()
        lower.press("ArrowRight")
        expect(page.locator("#caption")).to_contain_text("heads 1–3", timeout=20_000)
        expect(lower).to_be_focused()  # keeps focus for the next key
        lower.press("ArrowLeft")
        expect(page.locator("#caption")).to_contain_text("heads 0–3", timeout=20_000)
        (REPO / "outputs").mkdir(exist_ok=True)  # docs/screenshot.png is a copy
        page.screenshot(path=str(REPO / "outputs" / "browser-test.png"), full_page=True)

        page.locator("#analysis-btn").click()  # the first analysis tab
        expect(page.locator("#text-attention")).to_contain_text("[image:", timeout=20_000)
        cells = page.locator("#head-matrix .mx-cell")
        expect(cells.first).to_be_visible(timeout=20_000)
        assert cells.count() == 3 * 4  # 3 layers × 4 heads
        assert "layer 0 · head 0 · share" in cells.first.get_attribute("title")  # the value on hover
        cells.last.scroll_into_view_if_needed()
        cells.last.click()  # the last layer and head
        expect(page.locator("#caption")).to_contain_text("heads 3 ·", timeout=20_000)
        expect(page.locator("#caption")).to_contain_text("layers 2 ·")
        expect(page.locator("#head-range-handle-lo")).to_have_attribute("aria-valuenow", "3")
        page.locator("#analysis").screenshot(path=str(REPO / "outputs" / "browser-test-analysis.png"))
        page.get_by_role("tab", name="Per-head gallery").click()
        expect(page.locator("#head-gallery img").first).to_be_visible(timeout=20_000)

        page.get_by_role("tab", name="Verify").click()
        page.locator("#verify-btn").click()  # faithfulness check
        expect(page.locator("#verify-note")).to_contain_text("Deletion AUC", timeout=60_000)
        page.wait_for_timeout(500)
        page.locator("#verify-plot").screenshot(path=str(REPO / "outputs" / "browser-test-verify.png"))

        page.get_by_test_id("rollout-radio-label").click()  # computed on demand, all tokens
        expect(page.locator("#caption")).to_contain_text("attention rollout", timeout=60_000)
        page.locator("#overlay").screenshot(path=str(REPO / "outputs" / "browser-test-rollout.png"))
        page.get_by_test_id("attention-radio-label").click()

        page.get_by_role("tab", name="Region → text").click()
        page.locator("#region-mode input").check()
        page.locator("#overlay img").click(position={"x": 20, "y": 20})  # image → text: pick a cell
        expect(page.locator("#region-note")).to_contain_text("1 cell selected", timeout=20_000)
        page.locator("#region-plot").screenshot(path=str(REPO / "outputs" / "browser-test-region.png"))

        page.get_by_text("More display options").click()
        page.locator("#mask-sinks input").check()  # sinks and baselines
        expect(page.locator("#caption")).to_contain_text("sink cells masked", timeout=20_000)
        page.locator("#mask-sinks input").uncheck()

        page.locator("#prompt-token-dropdown input").click()  # a prompt word's own map
        page.get_by_role("option").first.click()
        expect(page.locator("#caption")).to_contain_text("Prompt token", timeout=20_000)
        page.locator("#overlay").screenshot(path=str(REPO / "outputs" / "browser-test-prompt-token.png"))
        page.locator("#token-chips label").nth(1).click()  # the chip picked before it
        expect(page.locator("#caption")).to_contain_text("Token 1", timeout=20_000)

        page.get_by_text("More images, or a video").click()  # several images in one prompt
        page.locator("#extra-images input[type=file]").set_input_files(_scene(tmp_path / "second.png", flip=True))
        page.wait_for_timeout(1000)
        page.locator("#generate-btn").click()
        expect(page.locator("#caption")).to_contain_text("2 images on one scale", timeout=60_000)
        page.locator("#overlay").screenshot(path=str(REPO / "outputs" / "browser-test-images.png"))
        # The new result cleared the views of the old one: no stale verify curve, region or matrix.
        expect(page.locator("#region-note")).to_contain_text("Clicks pick region cells", timeout=10_000)
        page.get_by_role("tab", name="Verify").click()
        expect(page.locator("#verify-note")).not_to_contain_text("Deletion AUC", timeout=10_000)
        browser.close()


def test_map_tokens_and_ranges_fit_one_laptop_screen(served_app, tmp_path):
    """At 1280×720 the map, the token strip and both range controls are on screen together; exports are
    listed by name; a failed load changes nothing on the page."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "What color is the circle?")
        page.set_viewport_size({"width": 1280, "height": 720})
        page.evaluate("window.scrollTo(0, 0)")
        page.wait_for_timeout(500)
        page.screenshot(path=str(REPO / "outputs" / "browser-test-1280x720.png"))
        for selector in ("#overlay img", "#token-chips", "#layer-range", "#head-range"):
            box = page.locator(selector).first.bounding_box()
            assert box is not None, selector
            assert box["y"] >= 0 and box["y"] + box["height"] <= 720, (selector, box)
            assert box["x"] >= 0 and box["x"] + box["width"] <= 1280, (selector, box)

        for button in ("#png-btn", "#gif-btn", "#export-btn"):  # no label cut off at 1280 px
            assert page.locator(button).evaluate("b => b.scrollWidth <= b.clientWidth + 1"), button
        page.locator("#export-btn").click()  # every file, named for what it is
        expect(page.locator("#downloads")).to_contain_text("-attention .safetensors", timeout=20_000)
        expect(page.locator("#downloads")).to_contain_text("-metadata .json")
        page.locator("#gif-btn").click()
        expect(page.locator("#downloads")).to_contain_text("attention-animation", timeout=30_000)

        page.locator("#model-id input").fill("/no/such/model-folder")  # a failed load changes nothing
        page.locator("#load-btn").click()
        expect(page.locator(".toast-body").first).to_contain_text("local folder", timeout=20_000)
        expect(page.locator("#model-id input")).not_to_have_value("/no/such/model-folder", timeout=10_000)
        expect(page.locator("#model-status")).to_contain_text("Loaded")
        assert page.locator("#model-status .error, #layer-range .error, #head-range .error").count() == 0
        page.screenshot(path=str(REPO / "outputs" / "browser-test-failed-load.png"))
        browser.close()


def _clip(path) -> str:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 4, (224, 168))
    for k in range(8):
        frame = np.full((168, 224, 3), 230, dtype=np.uint8)
        cv2.circle(frame, (30 + 22 * k, 84), 20, (40, 40, 220), -1)  # a red ball moving right (BGR)
        writer.write(frame)
    writer.release()
    return str(path)


def test_video_and_baseline_views(served_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "Where is the ball?")
        page.get_by_text("More display options").click()
        page.locator("#relative input").check()  # a generic-prompt pass, cached
        expect(page.locator("#caption")).to_contain_text("divided by the generic-prompt map", timeout=60_000)
        page.locator("#exclude-system input").check()
        expect(page.locator("#caption")).to_contain_text("without BOS and the system prompt", timeout=20_000)
        (REPO / "outputs").mkdir(exist_ok=True)
        page.locator("#overlay").screenshot(path=str(REPO / "outputs" / "browser-test-relative.png"))

        page.goto(served_app)  # a fresh session, a video only
        expect(page.locator("#model-status")).to_contain_text("Loaded", timeout=60_000)
        page.locator("#prompt textarea").fill("Where does the ball go?")
        page.get_by_text("More images, or a video").click()
        page.locator("#video-input input[type=file]").set_input_files(_clip(tmp_path / "ball.mp4"))
        # an mp4v clip, which the browser cannot play: the page previews a WebM copy of it
        expect(page.locator("#video-input video")).to_have_attribute(
            "src", re.compile(r"preview\.webm"), timeout=30_000
        )
        expect(page.locator("#video-input")).not_to_contain_text("not playable")
        page.wait_for_timeout(1000)
        page.locator("#generate-btn").click()
        expect(page.locator("#caption")).to_contain_text("time steps of the video on one scale", timeout=60_000)
        page.locator("#overlay").screenshot(path=str(REPO / "outputs" / "browser-test-video.png"))
        browser.close()


def test_markup_from_users_and_tokenizers_is_shown_literally(served_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    prompt = 'Is <img src="x" id="evil"> a <b id="bold">cat</b>?'
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), prompt)
        page.locator("#prompt-token-dropdown input").click()  # the prompt's own tokens
        options = page.get_by_role("option")
        expect(options.first).to_be_visible(timeout=10_000)
        tagged = [k for k in range(options.count()) if "<" in options.nth(k).inner_text()]
        assert tagged, [options.nth(k).inner_text() for k in range(options.count())]
        options.nth(tagged[0]).click()
        expect(page.locator("#caption")).to_contain_text("Prompt token", timeout=20_000)
        expect(page.locator("#caption")).to_contain_text("<")  # the text itself, literally
        page.locator("#model-id input").fill('<img src="x" id="evil2"><a id="link" href="http://example.com">x</a>')
        page.locator("#load-btn").click()
        expect(page.get_by_text("Could not load").first).to_be_visible(timeout=20_000)
        for selector in ("#evil", "#bold", "#evil2", "#link"):  # nothing became markup
            assert page.locator(selector).count() == 0, selector
        expect(page.locator("#model-status")).to_contain_text("Loaded")  # the model is still there
        browser.close()


def test_a_target_box_typed_or_drawn_scores_the_map(served_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "Where is the circle?")
        caption = page.locator("#caption")
        box = page.locator("#target-box textarea, #target-box input").first
        box.fill("380, 90, 560, 270")  # the red circle
        box.press("Enter")
        expect(caption).to_contain_text("Target box (380, 90)–(560, 270): pointing game", timeout=20_000)
        expect(caption).to_contain_text("Otsu IoU")
        page.locator("#box-mode input").check()  # now clicks draw the box
        for fx, fy in ((0.125, 0.5), (0.375, 0.875)):  # the blue square's corners
            page.mouse.click(*_on_image(page, fx, fy))
            page.wait_for_timeout(700)
        expect(box).to_have_value(re.compile(r"^(7\d|8\d), (23\d|24\d), (23\d|24\d), (41\d|42\d)$"), timeout=20_000)
        expect(caption).to_contain_text("Target box (", timeout=20_000)
        assert "(380, 90)" not in caption.inner_text()
        page.screenshot(path=str(REPO / "outputs" / "browser-test-target.png"), full_page=True)
        browser.close()


def test_does_it_matter_knocks_out_the_box_and_sweeps_the_layers(served_app, tmp_path):
    """Beside the map: knock the typed box out of the token's attention, read the probability before and
    after with its random control, then sweep the layers and see the plot with the control's band."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "Where is the circle?")
        box = page.locator("#target-box textarea, #target-box input").first
        box.fill("380, 90, 560, 270")
        box.press("Enter")
        expect(page.locator("#caption")).to_contain_text("Target box (380, 90)–(560, 270)", timeout=20_000)
        note = page.locator("#ko-note")
        page.locator("#ko-btn").click()
        expect(note).to_contain_text("the target box's", timeout=60_000)
        expect(note).to_contain_text("→")
        expect(note).to_contain_text("random regions of that size elsewhere")
        page.locator("#ko-target").get_by_text("the map's top k cells").click()
        page.locator("#ko-btn").click()
        expect(note).to_contain_text("the map's top 8 cells", timeout=60_000)
        page.locator("#ko-window input").fill("1")
        page.locator("#ko-sweep-btn").click()
        expect(note).to_contain_text("lowers its probability most", timeout=60_000)
        plot = page.locator("#ko-plot .js-plotly-plot, #ko-plot .plot-container").first
        expect(plot).to_be_visible(timeout=30_000)
        expect(page.locator("#ko-plot")).to_contain_text("box → token", timeout=10_000)
        expect(page.locator("#ko-plot")).to_contain_text("random regions")
        page.locator("#knockout").screenshot(path=str(REPO / "outputs" / "browser-test-knockout.png"))
        browser.close()


def test_two_methods_picked_quickly_then_a_token_show_the_last_method(served_app, tmp_path):
    """A second method picked while the first computes is not dropped: the picture and caption follow the
    radio, and a token picked next is drawn with that method."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "What color is the circle?")
        caption = page.locator("#caption")
        methods = page.locator("#method")
        methods.get_by_label("gradient", exact=True).check()
        page.wait_for_timeout(150)
        methods.get_by_label("vit", exact=True).check()
        expect(caption).to_contain_text("vision encoder", timeout=60_000)
        page.wait_for_timeout(1500)  # nothing later may draw the first method over it
        expect(caption).to_contain_text("vision encoder")
        expect(methods.get_by_label("vit", exact=True)).to_be_checked()
        page.locator("#token-chips label").nth(1).click()
        expect(caption).to_contain_text("Token 1", timeout=30_000)
        expect(caption).to_contain_text("vision encoder")
        assert page.locator(".toast-body").count() == 0
        browser.close()


def test_clicks_pick_cells_only_with_the_region_tool_and_the_box_tool_marks_its_corner(served_app, tmp_path):
    """At 1280×720: a click with no tool ticked changes nothing; the region tool picks a cell; the box tool
    (next to the map, so ticking it keeps the map on screen) marks the first corner at once."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "Where is the circle?")
        page.set_viewport_size({"width": 1280, "height": 720})
        page.get_by_role("tab", name="Region → text").click()  # its note shows what the clicks picked
        image = page.locator("#overlay img")
        image.scroll_into_view_if_needed()
        note = page.locator("#region-note")
        before = _picture_src(page)
        page.mouse.click(*_on_image(page, 0.7, 0.3))
        page.wait_for_timeout(1500)
        assert _picture_src(page) == before  # no tool: no outline, no region
        expect(note).to_contain_text("Tick 'Clicks pick region cells'")
        page.locator("#region-mode input").check()
        page.mouse.click(*_on_image(page, 0.7, 0.3))
        expect(note).to_contain_text("1 cell", timeout=20_000)
        page.wait_for_function(f"document.querySelector('#overlay img').src !== {before!r}", timeout=20_000)
        outlined = _picture_src(page)  # the picked cell outlined
        page.locator("#box-mode input").check()
        expect(page.locator("#region-mode input")).not_to_be_checked()  # one tool at a time
        shown = image.bounding_box()
        assert shown["y"] >= 0 and shown["y"] + 40 <= 720, shown  # ticking kept the map on screen
        page.mouse.click(*_on_image(page, 0.2, 0.6))
        page.wait_for_function(f"document.querySelector('#overlay img').src !== {outlined!r}", timeout=20_000)
        page.mouse.click(*_on_image(page, 0.4, 0.9))
        expect(page.locator("#caption")).to_contain_text("Target box (", timeout=20_000)
        browser.close()


def test_the_analysis_keeps_its_whole_matrix_and_follows_the_token(served_app, tmp_path):
    """A matrix click narrows the map's ranges, yet the matrix stays every layer × head (also after a
    metric switch), and once shown the analysis follows the picked token (the gallery with it)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "What color is the circle?")
        page.locator("#analysis-btn").click()
        cells = page.locator("#head-matrix .mx-cell")
        expect(cells.first).to_be_visible(timeout=20_000)
        whole = cells.count()
        cells.last.scroll_into_view_if_needed()
        cells.last.click()  # one layer and one head for the map
        expect(page.locator("#caption")).to_contain_text("heads 3 ·", timeout=20_000)
        page.locator("#matrix-metric").get_by_label("entropy").check()
        expect(page.locator("#analysis-note")).to_contain_text("heads 3–3", timeout=20_000)
        page.wait_for_timeout(800)
        assert cells.count() == whole  # not shrunk to 1 × 1
        page.locator("#token-chips label").nth(1).click()
        expect(page.locator("#analysis-note")).to_contain_text("Token 1", timeout=20_000)
        page.get_by_role("tab", name="Per-head gallery").click()
        expect(page.locator("#head-gallery img").first).to_be_visible(timeout=20_000)
        page.locator("#head-range-handle-lo").focus()
        page.keyboard.press("Home")  # every head again: a full gallery row
        expect(page.locator("#head-gallery img")).to_have_count(4, timeout=20_000)
        for label in page.locator("#head-gallery .caption-label").all():  # whole captions, none cut off
            assert label.evaluate("e => e.scrollWidth <= e.clientWidth + 1"), label.inner_text()
        browser.close()


def test_shift_click_combines_tokens_and_a_plain_click_picks_one_again(served_app, tmp_path):
    """Shift-clicking chips combines their maps (the caption names them); TAM with its α is drawn for the
    combination; a plain click goes back to one token."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = _generate_in_page(browser, served_app, _scene(tmp_path / "scene.png"), "What color is the circle?")
        caption = page.locator("#caption")
        chips = page.locator("#token-chips label")
        chips.nth(2).click(modifiers=["Shift"])
        expect(page.locator("#token-steps textarea")).to_have_value("0, 2", timeout=10_000)
        expect(caption).to_contain_text("Tokens 0, 2 ", timeout=30_000)
        expect(caption).to_contain_text("(sum of their maps)")
        expect(chips.nth(2)).to_have_class(re.compile("combined"))
        page.locator("#combine").get_by_label("max", exact=True).check()
        expect(caption).to_contain_text("(max of their maps)", timeout=30_000)
        chips.nth(1).click(modifiers=["Shift"])
        expect(caption).to_contain_text("Tokens 0, 1, 2 ", timeout=30_000)
        chips.nth(3).click()  # a plain click: one token again
        expect(caption).to_contain_text("Token 3 ", timeout=30_000)
        expect(page.locator("#token-steps textarea")).to_have_value("")
        expect(chips.nth(2)).not_to_have_class(re.compile("combined"))
        page.locator("#method").get_by_label("tam", exact=True).check()
        expect(caption).to_contain_text("context removed: α = ", timeout=60_000)
        page.locator("#token-steps textarea").fill("1-2")
        page.locator("#token-steps textarea").press("Enter")
        expect(caption).to_contain_text("Tokens 1, 2 ", timeout=30_000)
        expect(caption).to_contain_text("Token Activation Map")
        assert page.locator(".toast-body").count() == 0
        browser.close()
