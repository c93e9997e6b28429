"""Gradio pieces the layout in `app.py` uses: a bounded image upload and the login back-off."""

from __future__ import annotations

import hmac
import os
import time
import types

import gradio as gr


def image_upload(max_bytes: int | None, **kwargs) -> gr.Image:
    """A `gr.Image(type="filepath")` that passes the uploaded file through untouched (our loader
    handles EXIF, 16-bit, alpha and frames), turns an unreadable upload into a message instead of a
    stack trace, and holds every image to `max_bytes`, also one sent inline as a `data:` URL (which
    does not go through the upload route and its cap).

    The check is attached to the instance, so the component stays a plain `gr.Image`.
    """
    image = gr.Image(type="filepath", **kwargs)
    plain = image.preprocess

    def preprocess(self, payload):
        path = getattr(payload, "path", None)
        if max_bytes and path and os.path.isfile(path) and os.path.getsize(path) > max_bytes:
            raise gr.Error(f"The image is {os.path.getsize(path) / 2**20:.0f} MB; this server accepts up to "
                           f"{max_bytes / 2**20:.0f} MB. Upload a smaller file.")
        try:
            return plain(payload)
        except (OSError, ValueError, SyntaxError) as err:
            raise gr.Error(f"Could not read the uploaded file as an image ({err}). Upload a PNG, JPEG, WebP, "
                           "GIF or BMP file.") from err
    image.preprocess = types.MethodType(preprocess, image)
    return image


def upload_bytes(size: str) -> int:
    """'50mb' → bytes (kb, mb, gb; 1024-based, as Gradio reads `max_file_size`)."""
    number, unit = size.strip().lower()[:-2], size.strip().lower()[-2:]
    return int(float(number) * {"kb": 2**10, "mb": 2**20, "gb": 2**30}[unit])


class LoginGuard:
    """The `--auth` check with a back-off: after 5 wrong attempts in a row, every attempt is refused
    for a window that doubles with each further wrong one (1 s, 2 s, … up to 5 minutes); the right
    user and password reset it. Nothing sleeps, so guessing never ties up the server."""

    def __init__(self, user: str, password: str, clock=time.monotonic):
        self.user, self.password, self.clock = user, password, clock
        self.failures, self.locked_until = 0, 0.0

    def __call__(self, user: str, password: str) -> bool:
        now = self.clock()
        if now < self.locked_until:
            return False
        if hmac.compare_digest(str(user).encode(), self.user.encode()) & \
                hmac.compare_digest(str(password).encode(), self.password.encode()):
            self.failures = 0
            return True
        self.failures += 1
        if self.failures >= 5:
            self.locked_until = now + min(300.0, 2.0 ** (self.failures - 5))
        return False
