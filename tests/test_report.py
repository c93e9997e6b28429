"""The HTML report: self-contained, one map per token, every string escaped, and it works offline
in Debian's chromium (clicking a token chip switches the picture)."""

import json
import os
import re
import shutil
from dataclasses import replace
from html.parser import HTMLParser

import pytest

from conftest import noise_image
from pictures.report import script_json, share_svg, visible_token, write_report
from pictures.stored_run import StoredRun

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
NASTY = [
    "<s>",
    "<image>",
    "</script><script>alert(1)</script>",
    '"quotes"',
    "&amp;",
    "<img src=x onerror=alert(2)>",
    "\n",
    "</SCRIPT >",
]
ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "h1",
    "h2",
    "small",
    "dl",
    "dt",
    "dd",
    "div",
    "p",
    "button",
    "span",
    "figure",
    "img",
    "figcaption",
    "svg",
    "line",
    "text",
    "g",
    "rect",
    "script",
    "table",
    "tr",
    "th",
    "td",
}


class _Page(HTMLParser):
    """Collects tags, attributes, script bodies and the text of each token chip."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self.chips, self.imgs = [], [], [], []
        self._in_script = self._in_chip = self._in_number = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._in_script = tag == "script"
        if tag == "img":
            self.imgs.append(attrs)
        if tag == "button" and "chip" in attrs.get("class", ""):
            self._in_chip = True
            self.chips.append("")
        self._in_number = tag == "span" and self._in_chip

    def handle_endtag(self, tag):
        self._in_script = False
        self._in_number = False
        if tag == "button":
            self._in_chip = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)
        elif self._in_chip and not self._in_number:
            self.chips[-1] += data


@pytest.fixture(scope="module")
def nasty_run(load_holder):
    holder = load_holder("qwen2_5_vl")
    image = noise_image(150, 100, seed=3)
    run = holder.generate(
        image,
        'Is <b>this</b> "safe" & </script>?',
        max_new_tokens=len(NASTY),
        min_new_tokens=len(NASTY),
        suppress_tokens=[holder.model.config.image_token_id],
    )
    return replace(run, generated_tokens=list(NASTY)), image


@pytest.fixture(scope="module")
def report(nasty_run, tmp_path_factory):
    run, image = nasty_run
    path = write_report(run, image, tmp_path_factory.mktemp("report") / "sub" / "report.html", layers=(1, 2))
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return path, page


def test_self_contained(report):
    path, page = report
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    for tag, attrs in page.tags:
        assert "href" not in attrs and tag != "link"
        if tag == "script":
            assert "src" not in attrs
        if "src" in attrs:
            assert attrs["src"].startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))


def test_one_image_per_token_and_only_the_first_shown(report, nasty_run):
    _, page = report
    assert len(page.imgs) == len(NASTY) == nasty_run[0].num_steps
    figures = [attrs for tag, attrs in page.tags if tag == "figure"]
    assert ["hidden" in attrs for attrs in figures] == [False] + [True] * (len(NASTY) - 1)
    bars = [attrs for tag, attrs in page.tags if tag == "g"]
    assert [attrs["data-step"] for attrs in bars] == [str(t) for t in range(len(NASTY))]


def test_token_strings_are_escaped_not_injected(report):
    path, page = report
    tags = {tag for tag, _ in page.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    assert [tag for tag, _ in page.tags].count("script") == 2
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)
    assert page.chips == [visible_token(token) for token in NASTY]  # shown as text, exactly
    data = json.loads(page.scripts[0])
    assert data["tokens"] == NASTY and data["prompt"] == 'Is <b>this</b> "safe" & </script>?'
    assert "</script><script>" not in path.read_text(encoding="utf-8")


def test_script_json_cannot_close_the_script():
    text = script_json({"t": "</script><!-- & \u2028"})
    assert not set("<>&\u2028") & set(text)
    assert json.loads(text) == {"t": "</script><!-- & \u2028"}


def test_share_svg_bars():
    svg = share_svg([0.0, 0.5, 1.0], ["a", "<b>", "c"], selected=1)
    assert svg.count('class="bar"') == 2 and svg.count('class="bar sel"') == 1
    assert "&lt;b&gt;" in svg and "<b>" not in svg
    assert 'height="60.0"' in svg and 'height="120.0"' in svg  # bars proportional to the share


def test_stored_run_png_shared_scale_and_bad_arguments(nasty_run, tmp_path):
    run, image = nasty_run
    path = write_report(
        StoredRun(run, images=[image]),
        None,
        tmp_path / "r.html",
        normalization="shared",
        image_format="png",
        reduce="max",
        max_side=None,
    )
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert all(attrs["src"].startswith("data:image/png;base64,") for attrs in page.imgs)
    with pytest.raises(ValueError, match="pass the image the run was generated from"):
        write_report(run, noise_image(20, 20), tmp_path / "x.html")
    assert run.images and write_report(run, None, tmp_path / "own.html").exists()  # the run's own image
    with pytest.raises(ValueError, match="needs the image"):
        write_report(replace(run, images=[]), None, tmp_path / "x.html")
    with pytest.raises(ValueError, match="image_format"):
        write_report(run, image, tmp_path / "x.html", image_format="gif")
    with pytest.raises(ValueError, match="normalisation"):
        write_report(run, image, tmp_path / "x.html", normalization="zscore")
    with pytest.raises(ValueError, match="outside what was captured"):
        write_report(run, image, tmp_path / "x.html", layers=(0, 7))
    assert not (tmp_path / "x.html").exists()


def _shown_src(page) -> str:
    return page.locator("#frames figure:not([hidden]) img").get_attribute("src")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt install chromium)")
def test_opens_offline_in_chromium_and_chips_switch_the_map(report):
    from playwright.sync_api import expect, sync_playwright

    path, _ = report
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page()
        requests, problems = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("dialog", lambda dialog: (problems.append("dialog " + dialog.message), dialog.dismiss()))
        page.goto(path.as_uri())
        expect(page.locator("#status")).to_contain_text("Token 0 of 8")
        first = _shown_src(page)
        page.locator("#tokens .chip").nth(2).click()
        assert _shown_src(page) != first
        assert _shown_src(page) == page.locator("#frames figure").nth(2).locator("img").get_attribute("src")
        expect(page.locator("#tokens .chip").nth(2)).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#share-plot .bar.sel")).to_have_attribute("data-step", "2")
        assert NASTY[2] in page.locator("#status").text_content()  # the raw token, shown as text
        assert page.locator("#frames figure:not([hidden])").count() == 1
        page.keyboard.press("ArrowRight")
        expect(page.locator("#tokens .chip").nth(3)).to_have_attribute("aria-pressed", "true")
        page.locator("#share-plot .bar").nth(5).click()
        expect(page.locator("#status")).to_contain_text("Token 5 of 8")
        assert page.locator("#tokens .chip").nth(1).inner_text() == "1" + NASTY[1]
        browser.close()
    assert not problems, problems
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def _pdf_counts(pdf: bytes) -> tuple[int, int]:
    """(pages, embedded raster images) of a PDF as chromium writes it (uncompressed object dictionaries)."""
    pages = len(re.findall(rb"/Type\s*/Page(?![s\w])", pdf))
    images = len(re.findall(rb"/Subtype\s*/Image\b", pdf))
    return pages, images


def test_prints_to_a_pdf_with_every_tokens_map_and_the_share_table(report):
    """In print, every token's figure is shown with its caption (on screen only the picked one), the chips
    and the button are hidden and the share table appears; chromium's headless print writes a PDF that
    holds one raster picture per token over several pages."""
    from playwright.sync_api import sync_playwright

    path, page_html = report
    steps = len(page_html.imgs)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        page = browser.new_page()
        page.goto(path.as_uri())
        assert page.locator("#frames figure:visible").count() == 1 and page.locator("#share-table").is_hidden()
        page.emulate_media(media="print")
        assert page.locator("#frames figure:visible").count() == steps
        assert page.locator("#frames figcaption:visible").count() == steps
        assert page.locator("#tokens").is_hidden() and page.locator("#print").is_hidden()
        assert page.locator("#share-table tr").count() == steps + 1
        assert page.locator("#share-table").is_visible()
        for step in (0, 2, 5):  # captions read as the token is, not Markdown- or HTML-escaped twice
            assert repr(NASTY[step]) in page.locator("#frames figcaption").nth(step).text_content()
        pdf = page.pdf(format="A4", print_background=True)
        browser.close()
    assert pdf.startswith(b"%PDF")
    pages, images = _pdf_counts(pdf)
    assert images >= steps, (pages, images)
    assert pages >= 2, (pages, images)
