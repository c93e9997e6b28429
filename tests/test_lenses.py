"""Logit lens: layer indexing, the final norm applied once, and a safe self-contained page."""

import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from conftest import noise_image
from families import vision_layout
from methods.lens import logit_lens
from pictures.report import lens_html
from records import LogitLens


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "qwen3_vl", "glm4v", "gemma3", "mistral3"])
def test_lens_layers_match_the_model(load_holder, family):
    holder = load_holder(family)
    image = noise_image(150, 100)
    lens = logit_lens(holder, image, "What is this?", top_k=3, track_ids=[5, 7])
    inputs = holder.build_inputs(image, "What is this?")
    layout = vision_layout(holder.family, holder.model.config, holder.processor, inputs, image.size)
    positions = torch.from_numpy(layout.token_positions)
    with torch.no_grad():
        out = holder.model(**inputs, output_hidden_states=True)
    assert lens.top_ids.shape == (holder.num_layers, len(positions), 3) == lens.top_probs.shape
    # The last layer is exactly the model's own prediction: the final norm is applied once, not twice.
    final = torch.softmax(out.logits[0, positions].float(), -1).topk(3, dim=-1)
    np.testing.assert_array_equal(lens.top_ids[-1], final.indices.numpy())
    np.testing.assert_allclose(lens.top_probs[-1], final.values.numpy(), rtol=1e-4, atol=1e-6)
    # Layer 0 is the first decoder layer's output (hidden_states[0] is the embedding, not a layer).
    lm = holder.model.model.language_model
    first = torch.softmax(holder.model.lm_head(lm.norm(out.hidden_states[1][0, positions])).float(), -1)
    np.testing.assert_array_equal(lens.top_ids[0], first.topk(3, dim=-1).indices.numpy())
    assert (lens.top_probs[:, :, 0] >= lens.top_probs[:, :, 1]).all()
    final_all = torch.softmax(out.logits[0, positions].float(), -1)
    np.testing.assert_allclose(lens.tracked[-1], final_all[:, [5, 7]].numpy(), rtol=1e-4, atol=1e-7)
    assert lens.token_map(1).shape == layout.grid_hw
    assert set(lens.most_confident_layer()) <= set(range(holder.num_layers))


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]


def _nasty_lens() -> LogitLens:
    tokens = [[["</script><img src=x onerror=alert(1)>", "<s>", "&amp;"], [" ", '"q"', "<image>"]]]
    return LogitLens(
        [0],
        np.zeros((1, 2, 3), dtype=np.int64),
        np.full((1, 2, 3), 0.3, dtype=np.float32),
        tokens,
        (1, 2),
        (0.0, 0.0, 64.0, 32.0),
    )


def test_lens_page_is_self_contained_and_escapes_tokens(tmp_path):
    from PIL import Image

    page = lens_html(_nasty_lens(), Image.new("RGB", (64, 32), "white"))
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    parser = _Elements()
    parser.feed(page)
    assert "img" in parser.tags and parser.tags.count("img") == 1  # only the picture itself
    assert parser.tags.count("script") == 2 and "onerror" not in parser.attrs
    assert "</script><img" not in page


def _open_offline(pw, path):
    """Debian's chromium, headless and offline, with a page on the saved file `path`."""
    browser = pw.chromium.launch(
        executable_path="/usr/bin/chromium",
        args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    )
    page = browser.new_page()
    page.goto(path.as_uri())
    return browser, page


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs Debian's chromium")
def test_lens_page_works_offline_in_a_browser(tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    path = tmp_path / "lens.html"
    path.write_text(lens_html(_nasty_lens(), Image.new("RGB", (64, 32), "white"), mask_blank=False))
    with sync_playwright() as pw:
        browser, page = _open_offline(pw, path)
        cells = page.locator(".c")
        assert cells.nth(0).text_content() == "</script><img src=x onerror=alert(1)>"  # shown as text
        cells.nth(1).hover()
        assert '"<image>"' in page.locator("#tip").text_content()
        browser.close()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
def test_the_lens_method_maps_each_tokens_probability_from_the_hidden_states(load_holder, family):
    """The registry's `lens` map of step t: each patch's p(generated token t), averaged over the layers,
    recomputed here from the model's own hidden states through the final norm and the output head."""
    from families import decoder_layers, final_norm
    from methods import MapRequest, compute_maps

    holder = load_holder(family)
    run = holder.generate(noise_image(150, 100), "What is this?", max_new_tokens=3, min_new_tokens=3)
    maps = compute_maps("lens", MapRequest(holder, run, [0, 2], (0, 0), (0, 0)))
    inputs = holder.replay_inputs(run, 0)
    positions = torch.from_numpy(run.vision.token_positions)
    with torch.no_grad():
        states = holder.model(**inputs, output_hidden_states=True).hidden_states[1:]  # one per decoder layer
        norm, head = final_norm(holder.model), holder.model.get_output_embeddings()
        probs = torch.stack(
            [torch.softmax(head(norm(h[0, positions])).float(), -1) for h in states[:-1]]
            + [torch.softmax(head(states[-1][0, positions]).float(), -1)]
        )  # (L, n, V)
    assert len(states) == len(decoder_layers(holder.model)) and len(maps) == 2
    for heat, step in zip(maps, [0, 2], strict=True):
        expected = probs[:, :, run.generated_ids[step]].mean(0).reshape(run.vision.grid_hw).numpy()
        assert heat.shape == tuple(run.vision.grid_hw)
        np.testing.assert_allclose(heat, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs Debian's chromium")
def test_hide_blank_and_special_tokens_hides_both_in_a_browser(tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    tokens = [[["<|im_end|>", "a"], ["   ", "b"], ["cat", "c"]]]
    lens = LogitLens(
        [0],
        np.zeros((1, 3, 2), dtype=np.int64),
        np.full((1, 3, 2), 0.4, dtype=np.float32),
        tokens,
        (1, 3),
        (0, 0, 96, 32),
    )
    path = tmp_path / "lens.html"
    path.write_text(lens_html(lens, Image.new("RGB", (96, 32), "white"), special_tokens=("<|im_end|>", "<s>")))
    with sync_playwright() as pw:
        browser, page = _open_offline(pw, path)
        hidden = [page.locator(".c").nth(j).evaluate("e => e.classList.contains('m')") for j in range(3)]
        assert hidden == [True, True, False]  # the special and the blank token hidden, the word shown
        page.locator("#mask").uncheck()
        assert not any(page.locator(".c").nth(j).evaluate("e => e.classList.contains('m')") for j in range(3))
        browser.close()
