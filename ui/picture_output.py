"""The picture output: an `gr.Image` whose pictures fit the display budget and reach Gradio's cache atomically.

It lives in a module of its own because Gradio writes a type stub (`.pyi`) beside the module of every
component class it meets; this one's stub stays small (and git ignores it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr
from gradio import processing_utils
from PIL import Image

from visualization import fit_within


class PictureOutput(gr.Image):
    """An output `gr.Image` whose pictures always fit the display budget (`visualization.fit_within`) and
    reach Gradio's cache safely under concurrency: each is written once under a temporary name and renamed
    into place (Gradio would rewrite an identical picture's file in place while another request serves it).
    A picture already cached is reused as is. A subclass, not a patched instance, so the per-session copies
    Gradio makes of a component keep it; the browser shows an ordinary image (`is_template`)."""

    is_template = True

    def postprocess(self, value):
        if isinstance(value, Image.Image):
            value = _cached_picture(fit_within(value), self.GRADIO_CACHE, self.format or "png")
        return super().postprocess(value)


def picture_output(**kwargs) -> PictureOutput:
    """A `PictureOutput` for PIL pictures, not editable."""
    return PictureOutput(type="pil", interactive=False, **kwargs)


def _cached_picture(picture: Image.Image, cache_dir: str, fmt: str) -> str:
    """The picture's file in Gradio's cache, at the path Gradio itself gives those bytes, written atomically."""
    data = processing_utils.encode_pil_to_bytes(picture, fmt)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    path = folder / f"image.{fmt}"
    folder.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.utime(path)  # handed out again: young again for the cache's cleaning
        return str(path)
    fd, staging = tempfile.mkstemp(dir=folder, prefix=".image.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(staging, path)  # readers see the old file or the whole new one, never a part
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(path)
