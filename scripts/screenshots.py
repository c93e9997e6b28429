"""Regenerate the README's pictures in docs/ from the demo model, in a real browser.

Starts `python app.py` (the bundled demo model, CPU) on a free port, drives Debian's chromium with
playwright through the main flows and saves each view. About a minute on 2 cores.

    python scripts/screenshots.py            # writes docs/screenshot.png and docs/view-*.png
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(folder: Path) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    log = open(folder / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--port", str(port), "--device", "cpu"],
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    for _ in range(180):
        try:
            urllib.request.urlopen(url, timeout=2)
            return url, proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit((folder / "app.log").read_text()) from None
            time.sleep(0.5)
    raise SystemExit("the app did not start within 90 s")


def main() -> None:
    from playwright.sync_api import expect, sync_playwright

    examples = json.loads((REPO / "examples" / "examples.json").read_text())
    image, question, _ = examples[0]
    with tempfile.TemporaryDirectory() as tmp:
        url, proc = _serve(Path(tmp))
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(url)
                expect(page.locator("#model-status")).to_contain_text("demo_model", timeout=90_000)
                page.locator("#image-input input[type=file]").set_input_files(str(REPO / "examples" / image))
                page.locator("#prompt textarea").fill(question)
                page.locator("#generate-btn").click()
                expect(page.locator("#caption")).to_contain_text("Token 0", timeout=90_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(DOCS / "screenshot.png"))

                page.locator("#prompt-token-dropdown input").click()
                page.get_by_role("option").first.click()
                expect(page.locator("#caption")).to_contain_text("Prompt token", timeout=30_000)
                page.wait_for_timeout(1000)
                page.locator("#overlay").screenshot(path=str(DOCS / "view-prompt-token.png"))
                page.locator("#token-chips label").first.click()  # back to the answer's token
                expect(page.locator("#caption")).to_contain_text("Token 0", timeout=30_000)

                page.locator("#analysis-btn").click()
                expect(page.locator("#head-matrix .mx-cell").first).to_be_visible(timeout=30_000)
                page.wait_for_timeout(800)
                page.locator("#analysis").screenshot(path=str(DOCS / "view-analysis.png"))

                page.get_by_role("tab", name="Verify").click()
                page.locator("#verify-btn").click()
                expect(page.locator("#verify-note")).to_contain_text("Deletion AUC", timeout=90_000)
                page.wait_for_timeout(1500)
                page.locator("#analysis").screenshot(path=str(DOCS / "view-verify.png"))

                page.get_by_role("tab", name="Region → text").click()
                page.locator("#region-mode input").check()
                box = page.locator("#overlay img").bounding_box()
                page.locator("#overlay img").click(position={"x": box["width"] * 0.3, "y": box["height"] * 0.3})
                expect(page.locator("#region-note")).to_contain_text("selected", timeout=30_000)
                page.wait_for_timeout(1500)
                page.locator("#analysis").screenshot(path=str(DOCS / "view-region.png"))

                page.get_by_role("tab", name="Logit lens").click()
                page.locator("#lens-btn").click()
                expect(page.locator("#logit-lens iframe, #logit-lens *").first).to_be_visible(timeout=90_000)
                page.wait_for_timeout(2000)
                page.locator("#analysis").screenshot(path=str(DOCS / "view-lens.png"))

                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    print("wrote", ", ".join(sorted(p.name for p in DOCS.glob("*.png"))))


if __name__ == "__main__":
    main()
