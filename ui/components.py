"""Gradio pieces the app uses: a two-handle range slider, the layer × head heatmap, a bounded image
upload, the login back-off, and `user_errors`, which turns the project's errors into messages."""

from __future__ import annotations

import contextvars
import functools
import hmac
import html
import http.cookies
import inspect
import logging
import math
import os
import time
import types
from collections import OrderedDict

import gradio as gr

from errors import UserError

logger = logging.getLogger(__name__)

_RANGE_HTML = """
<div class="rs" aria-label="${label}">
  <div class="rs-head"><span class="rs-label">${label}</span>
    <span class="rs-text">${value[0] === value[1] ? value[0] : value[0] + '–' + value[1]}</span>
    <span class="rs-of">of 0–${maximum}</span></div>
  <div class="rs-track">
    <div class="rs-fill" style="left:${100 * value[0] / Math.max(maximum, 1)}%;
         width:${100 * (value[1] - value[0]) / Math.max(maximum, 1)}%"></div>
    <div class="rs-handle" role="slider" tabindex="0" data-which="0" id="${handle}-lo"
         aria-label="${label} from" aria-valuemin="0" aria-valuemax="${maximum}" aria-valuenow="${value[0]}"
         style="left:${100 * value[0] / Math.max(maximum, 1)}%"></div>
    <div class="rs-handle" role="slider" tabindex="0" data-which="1" id="${handle}-hi"
         aria-label="${label} to" aria-valuemin="0" aria-valuemax="${maximum}" aria-valuenow="${value[1]}"
         style="left:${100 * value[1] / Math.max(maximum, 1)}%"></div>
  </div>
</div>
"""

_RANGE_CSS = """
.rs { padding: 6px 10px 10px; user-select: none; }
.rs-head { display: flex; gap: 8px; align-items: baseline; font-size: 0.9em; margin-bottom: 10px; }
.rs-label { font-weight: 600; }
.rs-text { font-variant-numeric: tabular-nums; }
.rs-of { color: var(--body-text-color-subdued); margin-left: auto; }
.rs-track { position: relative; height: 6px; margin: 0 9px; border-radius: 3px; cursor: pointer;
            background: var(--neutral-200); }
.rs-fill { position: absolute; top: 0; height: 100%; border-radius: 3px; background: var(--color-accent); }
.rs-handle { position: absolute; top: 50%; width: 18px; height: 18px; margin: -9px 0 0 -9px; border-radius: 50%;
             background: white; border: 2px solid var(--color-accent); box-sizing: border-box; cursor: grab;
             touch-action: none; }
.rs-handle:focus-visible { outline: 3px solid var(--color-accent-soft); outline-offset: 1px; }
"""

# Dragging moves the handle at once and commits the value as it changes; keys: arrows ±1, Page ±10%,
# Home / End. A handle pushed past the other takes it along. Setting props.value fires `.change`.
_RANGE_JS = """
const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
let focusWhich = null;
function commit(which, v) {
  const max = Number(props.maximum);
  let [lo, hi] = props.value.map(Number);
  v = clamp(Math.round(v), 0, max);
  if (which === 0) { lo = v; hi = Math.max(hi, lo); } else { hi = v; lo = Math.min(lo, hi); }
  if (lo !== Number(props.value[0]) || hi !== Number(props.value[1])) {
    focusWhich = which;
    props.value = [lo, hi];
    requestAnimationFrame(() => {
      const handle = element.querySelector('.rs-handle[data-which="' + focusWhich + '"]');
      if (handle && document.activeElement !== handle && focusWhich !== null) handle.focus();
    });
  }
}
function valueAt(clientX) {
  const rect = element.querySelector('.rs-track').getBoundingClientRect();
  return (clientX - rect.left) / Math.max(rect.width, 1) * Number(props.maximum);
}
let dragging = null;
element.addEventListener('pointerdown', (e) => {
  const track = e.target.closest('.rs-track');
  if (!track) return;
  const handle = e.target.closest('.rs-handle');
  const v = valueAt(e.clientX);
  const [lo, hi] = props.value.map(Number);
  dragging = handle ? Number(handle.dataset.which) : (Math.abs(v - lo) <= Math.abs(v - hi) ? 0 : 1);
  element.setPointerCapture && element.setPointerCapture(e.pointerId);
  commit(dragging, v);
  e.preventDefault();
});
element.addEventListener('pointermove', (e) => { if (dragging !== null) commit(dragging, valueAt(e.clientX)); });
const stop = () => { dragging = null; };
element.addEventListener('pointerup', stop);
element.addEventListener('pointercancel', stop);
element.addEventListener('keydown', (e) => {
  const handle = e.target.closest('.rs-handle');
  if (!handle) return;
  const which = Number(handle.dataset.which), max = Number(props.maximum);
  const now = Number(props.value[which]), page = Math.max(1, Math.round(max / 10));
  const moves = {ArrowLeft: now - 1, ArrowDown: now - 1, ArrowRight: now + 1, ArrowUp: now + 1,
                 PageDown: now - page, PageUp: now + page, Home: 0, End: max};
  if (!(e.key in moves)) return;
  e.preventDefault();
  commit(which, moves[e.key]);
});
"""


_MATRIX_HTML = """
${value && value.cells ? `
<div class="mx">
  <div class="mx-title">${value.title}</div>
  <div class="mx-grid" style="grid-template-columns: 2.6em repeat(${value.heads.length}, minmax(6px, 44px));">
    <div class="mx-corner">L \\ H</div>
    ${value.heads.map((h) => `<div class="mx-col">${h}</div>`).join('')}
    ${value.cells.map((row, i) => `<div class="mx-row">${value.layers[i]}</div>` + row.map((cell, j) =>
      `<div class="mx-cell" role="button" tabindex="-1" style="background:${cell[1]}"
            title="layer ${value.layers[i]} · head ${value.heads[j]} · ${value.metric} ${cell[0]}"
            data-layer="${value.layers[i]}" data-head="${value.heads[j]}"></div>`).join('')).join('')}
  </div>
  <div class="mx-scale"><span>${value.lo}</span>
    <div class="mx-bar" style="background: linear-gradient(to right, ${value.bar.join(', ')});"></div>
    <span>${value.hi}</span></div>
</div>` : `<div class="mx-empty">Press "Show analysis" to see every selected layer and head.</div>`}
"""

_MATRIX_CSS = """
.mx { padding: 6px; font-size: 0.8em; }
.mx-title { font-weight: 600; margin-bottom: 6px; }
.mx-grid { display: grid; gap: 1px; align-items: center; }
.mx-col, .mx-row, .mx-corner { color: var(--body-text-color-subdued); text-align: center; font-size: 0.85em; }
.mx-cell { aspect-ratio: 1; min-height: 6px; cursor: pointer; }
.mx-cell:hover { outline: 2px solid var(--body-text-color); outline-offset: -1px; }
.mx-scale { display: flex; gap: 6px; align-items: center; margin-top: 8px; }
.mx-bar { flex: 1; height: 10px; border-radius: 2px; }
.mx-empty { color: var(--body-text-color-subdued); padding: 12px; }
"""

# A click on a cell records it as `picked`; the `.change` that follows selects that layer and head.
_MATRIX_JS = """
element.addEventListener('click', (e) => {
  const cell = e.target.closest('.mx-cell');
  if (!cell || !props.value) return;
  props.value = {...props.value, picked: [Number(cell.dataset.layer), Number(cell.dataset.head)]};
});
"""


def matrix_heatmap(label: str, elem_id: str) -> gr.HTML:
    """An interactive layer × head heatmap: rows are layers, columns heads (0-based labels), a colour
    scale, each cell's value on hover, and a click that records `{"picked": [layer, head]}` in its
    value (then `.change` fires). Its value is `views.matrix_view(...)`, or None for empty."""
    return gr.HTML(
        value=None,
        html_template=_MATRIX_HTML,
        css_template=_MATRIX_CSS,
        js_on_load=_MATRIX_JS,
        elem_id=elem_id,
        label=label,
        apply_default_css=False,
    )


def range_slider(label: str, elem_id: str, maximum: int, value: tuple[int, int] = (0, 0)) -> gr.HTML:
    """One inclusive integer range [lo, hi] in 0..maximum with two handles (`role="slider"`, ids
    `{elem_id}-handle-lo` and `{elem_id}-handle-hi`): drag them, click the track, or focus one and use
    the arrow keys, Page Up / Down, Home and End. Its value is `[lo, hi]`; it fires `.change` as it moves.
    Update it with `gr.HTML(value=[lo, hi], maximum=m)`."""
    return gr.HTML(
        value=list(value),
        html_template=_RANGE_HTML,
        css_template=_RANGE_CSS,
        js_on_load=_RANGE_JS,
        elem_id=elem_id,
        label=label,
        maximum=int(maximum),
        handle=f"{elem_id}-handle",
        apply_default_css=False,
    )


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
            raise gr.Error(
                f"The image is {os.path.getsize(path) / 2**20:.0f} MB; this server accepts up to "
                f"{max_bytes / 2**20:.0f} MB. Upload a smaller file."
            )
        try:
            return plain(payload)
        except (OSError, ValueError, SyntaxError) as err:
            raise gr.Error(
                f"Could not read the uploaded file as an image ({err}). Upload a PNG, JPEG, WebP, GIF or BMP file."
            ) from err

    image.preprocess = types.MethodType(preprocess, image)
    return image


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is refused (413) before any of it is parsed, so an
    image sent inline in a JSON payload (a `data:` URL, which skips the upload route and its cap) is held to
    the upload cap before it is decoded. Uploads themselves (`…/upload`) are capped by Gradio."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if int(length or 0) > self.max_bytes:
            return await self._refuse(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a body sent without its length, grown past the cap
                raise ValueError(f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, counted, send)

    async def _refuse(self, send) -> None:
        message = (
            f"The request is larger than this server accepts ({self.max_bytes / 2**20:.0f} MB). Send a smaller "
            "image, or upload the file instead of sending it inline."
        )
        await _respond(send, 413, message.encode(), b"text/plain; charset=utf-8")


async def _respond(send, status: int, body: bytes, content_type: bytes) -> None:
    """Answer an ASGI request from a middleware, without passing it on."""
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def session_of(request) -> str | None:
    """The browser session (or API client) a request comes from; None outside a server."""
    return getattr(request, "session_hash", None)


def inline_body_limit(max_upload: str) -> int:
    """The largest request body that can carry one upload-sized image inline: base64 grows it by 4/3, and
    the rest of the payload (other values, JSON) gets 1 MB."""
    return upload_bytes(max_upload) * 4 // 3 + 2**20


def upload_bytes(size: str) -> int:
    """'50mb' → bytes (kb, mb, gb; 1024-based, as Gradio reads `max_file_size`)."""
    number, unit = size.strip().lower()[:-2], size.strip().lower()[-2:]
    return int(float(number) * {"kb": 2**10, "mb": 2**20, "gb": 2**30}[unit])


# The address of the client whose request is being handled (set by `ClientAddress`), for the login back-off.
CLIENT_ADDRESS: contextvars.ContextVar[str] = contextvars.ContextVar("client_address", default="unknown")


class ClientAddress:
    """ASGI middleware: records the client's address for the request it passes on (`CLIENT_ADDRESS`). Behind
    a proxy on this machine (the share link's relay) the proxy's X-Forwarded-For names the client; a header
    from anyone else is ignored, so no one outside can pose as another address."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = (scope.get("client") or ("unknown", 0))[0]
            forwarded = dict(scope.get("headers", [])).get(b"x-forwarded-for", b"")
            if host in ("127.0.0.1", "::1") and forwarded:
                host = forwarded.decode("latin-1").split(",")[0].strip()[:64] or host
            token = CLIENT_ADDRESS.set(host)
            try:
                return await self.app(scope, receive, send)
            finally:
                CLIENT_ADDRESS.reset(token)
        return await self.app(scope, receive, send)


class RequireLogin:
    """ASGI middleware, with `--auth`: the routes that act on a job or a file (cancel, reset, streams,
    heartbeats, uploads, files, the queue, the API and its description) answer 401 to a request without the
    session's login cookie, whether or not Gradio checks that route itself."""

    GUARDED = (
        "/cancel",
        "/reset",
        "/stream/",
        "/heartbeat/",
        "/upload",
        "/file=",
        "/info",
        "/queue/",
        "/call/",
        "/run/",
    )

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self._guarded(scope["path"]) and not self._logged_in(scope):
            return await _respond(send, 401, b'{"detail": "Not authenticated: log in first."}', b"application/json")
        return await self.app(scope, receive, send)

    def _guarded(self, path: str) -> bool:
        rest = path.split("/gradio_api", 1)[1] if "/gradio_api" in path else ""
        return any(rest.startswith(prefix) for prefix in self.GUARDED)

    @staticmethod
    def _logged_in(scope) -> bool:
        app = scope.get("app")
        tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
        if tokens is None or getattr(app, "auth", None) is None:
            return True  # no login configured: nothing to check
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(dict(scope.get("headers", [])).get(b"cookie", b"").decode("latin-1"))
        except http.cookies.CookieError:
            return False
        names = (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}")
        return any(name in jar and jar[name].value in tokens for name in names)


class LoginGuard:
    """The `--auth` check with a back-off per client address and user name: after 5 wrong attempts in a row
    from one address for one name, that pair is refused for a window that doubles with each further wrong
    one (1 s, 2 s, … up to 5 minutes); the right password resets it. Someone guessing from elsewhere never
    locks the real user out, and nothing sleeps, so guessing never ties up the server. At most `max_pairs`
    pairs are remembered (the least recently seen are forgotten)."""

    def __init__(self, user: str, password: str, clock=time.monotonic, max_pairs: int = 10_000):
        self.user, self.password, self.clock, self.max_pairs = user, password, clock, max_pairs
        self._pairs: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()  # -> (failures, locked until)

    def failures(self, client: str | None = None, user: str | None = None) -> int:
        """Wrong attempts in a row from `client` (default: the current request's) for `user` (default: ours)."""
        return self._pairs.get((client or CLIENT_ADDRESS.get(), user or self.user), (0, 0.0))[0]

    def __call__(self, user: str, password: str) -> bool:
        key, now = (CLIENT_ADDRESS.get(), str(user)[:256]), self.clock()
        # Gradio calls this on its event loop, one login at a time: no lock needed.
        failures, locked_until = self._pairs.get(key, (0, 0.0))
        if now < locked_until:
            return False
        if hmac.compare_digest(str(user).encode(), self.user.encode()) & hmac.compare_digest(
            str(password).encode(), self.password.encode()
        ):
            self._pairs.pop(key, None)
            return True
        failures += 1
        self._pairs[key] = (failures, now + min(300.0, 2.0 ** (failures - 5)) if failures >= 5 else 0.0)
        self._pairs.move_to_end(key)
        while len(self._pairs) > self.max_pairs:
            self._pairs.popitem(last=False)
        return False


INTERNAL_ERROR = (
    "An internal error stopped this action; the server keeps running. Try again, and report it "
    "(with the server's log) if it repeats."
)
OUT_OF_MEMORY = (
    "The server ran out of memory for this request; it keeps running. Ask for less: fewer or smaller "
    "images, a lower max pixels, fewer new tokens, or narrower layer and head ranges."
)


def _as_message(err: BaseException) -> gr.Error:
    """What the page shows for an error. A `UserError` (or a handler's own `gr.Error`) is its message, logged
    as one line: nothing broke. Running out of memory says what to lower. Anything else is a bug: logged
    with its traceback, and shown as an internal error, without its text."""
    if isinstance(err, gr.Error):
        message = err
    elif isinstance(err, UserError):
        message = gr.Error(html.escape(str(err), quote=False))
    elif isinstance(err, MemoryError):
        logger.warning("out of memory: %s", err)
        message = gr.Error(OUT_OF_MEMORY)
    else:
        logger.error("internal error", exc_info=(type(err), err, err.__traceback__))
        message = gr.Error(INTERNAL_ERROR)
    message.print_exception = False
    if isinstance(err, (gr.Error, UserError)):
        logger.info("user error: %s", message.message)
    return message


def user_errors(handler):
    """Turn every error of a handler into a message on the page (the app keeps serving): the project's
    user errors as what they say, everything else as an internal error with its traceback in the log.
    Works for plain and streaming (generator) handlers alike."""
    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def stream(*args, **kwargs):
            try:
                yield from handler(*args, **kwargs)
            except Exception as err:
                raise _as_message(err) from (err.__cause__ if isinstance(err, gr.Error) else err)

        return stream

    @functools.wraps(handler)
    def call(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except Exception as err:
            raise _as_message(err) from (err.__cause__ if isinstance(err, gr.Error) else err)

    return call


def _typed(value, limit: int = 40) -> str:
    """What a user typed, quoted for a message: cut to `limit` characters and shown literally (a toast
    renders HTML)."""
    return html.escape(repr(str(value)[:limit] if isinstance(value, str) else value), quote=False)


def parse_box(text) -> tuple[float, float, float, float] | None:
    """A target box typed or drawn as "x0, y0, x1, y1" (image pixels; spaces or commas), or None if empty."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).replace(",", " ").replace("(", " ").replace(")", " ").split()
    try:
        x0, y0, x1, y1 = (float(part) for part in parts)
    except ValueError:
        raise gr.Error(
            f"The target box {_typed(text)} is not four numbers; write x0, y0, x1, y1 in image "
            "pixels (left, top, right, bottom), or click two corners on the picture."
        ) from None
    if not all(math.isfinite(v) and abs(v) <= 1e6 for v in (x0, y0, x1, y1)):
        raise gr.Error("The target box needs numbers within the image: x0, y0, x1, y1 in image pixels.")
    box = min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise gr.Error(
            f"The target box {_typed(text)} is empty (under one pixel wide or tall); give two "
            "opposite corners, at least a pixel apart."
        )
    return box


def whole_number(value, name: str, minimum: int = 0) -> int:
    """A control's number as an int, refusing booleans, fractions, NaN, infinity and values under
    `minimum`, with a message that names the control."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a whole number, got {_typed(value)}.") from None
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number) or number < minimum:
        raise gr.Error(f"{name} must be a whole number of at least {minimum}, got {_typed(value)}.")
    return int(number)


MAX_COMBINED = 64  # tokens one combined map may name (each is a map of its own to compute)


def parse_steps(value, name: str = "Tokens") -> tuple[int, ...]:
    """Generated-token indices from a control or an API value: an index, a list of them, or text such as
    "3, 4" or "3-5" (ranges inclusive). Sorted, each once; empty for None or "". The range of the answer
    is checked where the run is known."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, list | tuple):
        steps = [whole_number(v, name) for v in value]
    elif isinstance(value, str):
        steps = []
        for piece in value.replace("–", "-").split(","):
            piece = piece.strip()
            if not piece:
                continue
            lo, dash, hi = piece.partition("-")
            if dash:
                first, last = whole_number(lo.strip(), name), whole_number(hi.strip(), name)
                if last < first or last - first >= MAX_COMBINED:
                    raise gr.Error(f"{name}: the range {_typed(piece)} must run upwards, over at most {MAX_COMBINED}.")
                steps += range(first, last + 1)
            else:
                steps.append(whole_number(piece, name))
    else:
        steps = [whole_number(value, name)]
    if len(set(steps)) > MAX_COMBINED:
        raise gr.Error(f"{name}: at most {MAX_COMBINED} tokens at once, got {len(set(steps))}.")
    return tuple(sorted(set(steps)))
