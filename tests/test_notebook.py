"""A run in a notebook: the summary, `run.show`, `run.explore` (the ipywidgets panel and the self-contained
HTML view, the latter in chromium), and the example notebook executed end to end by a real kernel."""

import os
import re

import numpy as np
import pytest

from attention_processor import token_heatmap
from conftest import REPO, noise_image
from errors import InputError
from notebook.explorer import Explorer, ExplorerPage
from pictures.stored_run import StoredRun, ViewSettings
from pictures.views import plain_text, render


@pytest.fixture(scope="module")
def run(load_holder):
    holder = load_holder("qwen2_5_vl")
    return holder.generate(noise_image(160, 120, seed=7), "Is <b>this</b> & that?", max_new_tokens=4, min_new_tokens=4)


def test_display_of_a_run_is_an_escaped_summary(run):
    page = run._repr_html_()
    assert "<b>this</b>" not in page and "&lt;b&gt;this&lt;/b&gt;" in page
    summary = run.summary()
    assert summary["Tokens"].startswith("4 generated") and f"{run.num_heads} per layer" == summary["Heads"]
    assert f"{run.nbytes / 2**20:.1f} MB" in summary["Attention kept"]


def test_show_is_the_apps_picture_and_caption_inline(run, load_holder):
    shown = run.show(step_idx=2, layers=(1, 2), heads=(0, 1), colormap="viridis")
    settings = ViewSettings(step_idx=2, layers=(1, 2), heads=(0, 1), colormap="viridis")
    picture, caption = render(StoredRun(run), settings)
    assert shown.caption == plain_text(caption) and "Token 2" in shown.caption
    assert np.array_equal(np.asarray(shown.picture), np.asarray(picture))
    assert shown._repr_png_().startswith(b"\x89PNG") and "<figcaption>" in shown._repr_html_()
    for bad, message in (
        (dict(step_idx=9), "out of range"),
        (dict(nonsense=1), "Unknown view setting"),
        (dict(method="rollout"), "pass holder="),
    ):
        with pytest.raises(InputError, match=message):
            run.show(**bad)
    rollout = run.show(0, method="rollout", holder=load_holder("qwen2_5_vl"))
    assert "rollout" in rollout.caption


def test_the_html_view_holds_exactly_the_maps_the_app_draws(run):
    page = run.explore(widgets=False)
    assert isinstance(page, ExplorerPage) and page.keep_heads
    assert page.maps.shape == (run.num_steps, run.num_layers, run.num_heads, run.vision.token_positions.size)
    for step, layers, heads in ((0, (0, 2), (0, 3)), (3, (1, 1), (2, 3))):
        mean = page.maps[step, layers[0] : layers[1] + 1, heads[0] : heads[1] + 1].mean(axis=(0, 1))
        expected = token_heatmap(run, step, layers, heads).reshape(-1)
        assert np.allclose(mean, expected, atol=1e-4)
    averaged = ExplorerPage(run, budget=page.maps.size // 2)
    assert not averaged.keep_heads and averaged.maps.shape[2] == 1
    assert "averaged" in averaged.html
    with pytest.raises(InputError, match="ipywidgets"):
        ExplorerPage(run, budget=10)


def test_the_html_view_works_offline_in_chromium(run, tmp_path):
    from playwright.sync_api import sync_playwright

    from test_browser import CHROMIUM, LAUNCH_ARGS

    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (apt install chromium)")
    path = run.explore(widgets=False).save(tmp_path / "explorer.html")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page()
        problems, requests = [], []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: requests.append(request.url))
        page.goto(f"file://{path}")
        caption = page.locator(".caption")
        page.wait_for_function("document.querySelector('.caption').textContent.length > 0")
        assert caption.text_content().startswith("Token 0") and "mean of 12 maps" in caption.text_content()
        page.locator("button.chip").nth(3).click()
        page.locator("input.layer-lo").fill("1")
        page.locator("input.layer-hi").fill("1")
        page.locator("input.head-lo").fill("2")
        text = caption.text_content()
        assert text.startswith("Token 3") and "layers 1–1" in text and "heads 2–3" in text and "mean of 2 maps" in text
        heat = token_heatmap(run, 3, (1, 1), (2, 3))
        low, high = (float(v) for v in re.search(r"\(([-\d.e]+) to ([-\d.e]+)\)", text).groups())
        assert np.isclose(low, heat.min(), rtol=5e-3) and np.isclose(high, heat.max(), rtol=5e-3)  # the page's math
        assert page.locator("button.chip[aria-pressed=true]").count() == 1
        browser.close()
    assert not problems, problems
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def test_the_widget_panel_redraws_in_the_kernel(run, load_holder):
    pytest.importorskip("ipywidgets")
    panel = run.explore(holder=load_holder("qwen2_5_vl"))
    assert isinstance(panel, Explorer) and panel.caption.value.startswith("Token 0")
    first = bytes(panel.image.value)
    panel.token.value = 2
    panel.layers.value = (1, 2)
    assert panel.caption.value.startswith("Token 2") and "layers 1–2" in panel.caption.value
    assert bytes(panel.image.value) != first and bytes(panel.image.value).startswith(b"\x89PNG")
    panel.method.value = "rollout"
    assert "rollout" in panel.caption.value
    panel.method.value = "attention"
    panel.heads.value = (3, 3)
    assert "heads 3–3" in panel.caption.value or "heads 3 " in panel.caption.value
    assert "application/vnd.jupyter.widget-view+json" in panel._repr_mimebundle_()


@pytest.mark.skipif(not (REPO / "demo_model" / "config.json").exists(), reason="the demo model is not present")
def test_the_example_notebook_runs_end_to_end_and_shows_maps_inline():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "examples" / "explore_a_run.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "examples")}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    shown = [output["data"] for output in outputs if "data" in output]
    summary = next(data for data in shown if "AttentionRun" in data.get("text/html", ""))
    assert "demo_model" in summary["text/html"]
    pictures = [data for data in shown if "image/png" in data]
    assert len(pictures) >= 3  # two maps and the comparison
    assert any("vlm-explorer" in data.get("text/html", "") for data in shown)
    assert any("two prompts" in data.get("text/html", "") for data in shown)
