"""Writing results to files, fairly: the export lane (a bounded pool beside the renders), the raw attention,
pictures, animations, ZIPs and pages, each in a fresh uniquely named file, and the cleaning of the folders
they land in (on a timer and on a budget, never what is still being written)."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from PIL import Image
from safetensors.torch import save_file

from errors import InputError
from pictures.gallery import gallery_zip
from pictures.stored_run import StoredRun
from visualization import DOWNLOAD_MAX_PIXELS, DOWNLOAD_MAX_SIDE, fit_within

logger = logging.getLogger(__name__)


class ExportLane:
    """Exports (animations, ZIPs, raw attention, pictures) in a bounded pool of their own, beside the renders:
    at most `workers` are written at once, each session one at a time, and each yields between its chunks
    (frames, tiles, tokens) while a render is being drawn, so a long export never makes another user wait.
    It starts no threads: each export runs in the thread that asked for it."""

    def __init__(self, workers: int = 2, max_yield_s: float = 0.5):
        self._slots = threading.BoundedSemaphore(workers)
        self._sessions: set[str] = set()
        self._lock = threading.Lock()
        self._foreground = 0  # renders being drawn now
        self.max_yield_s = max_yield_s  # longest one chunk waits for renders, so an export always moves on

    @contextmanager
    def export(self, session: str | None):
        """Hold a place in the pool for one export of `session`; a second one while the first is written is
        refused (its user is told to wait), never queued behind it."""
        with self._lock:
            if session is not None and session in self._sessions:
                raise InputError(
                    "One of your exports is still being written; wait for it to appear under Downloads, then ask again."
                )
            if session is not None:
                self._sessions.add(session)
        try:
            with self._slots:
                yield self
        finally:
            with self._lock:
                self._sessions.discard(session)

    @contextmanager
    def foreground(self):
        """Mark a render in progress: exports yield to it between their chunks."""
        with self._lock:
            self._foreground += 1
        try:
            yield
        finally:
            with self._lock:
                self._foreground -= 1

    def pause(self) -> None:
        """Between two chunks of an export: wait while renders are drawn (at most `max_yield_s`)."""
        deadline = time.monotonic() + self.max_yield_s
        while self._foreground > 0 and time.monotonic() < deadline:
            time.sleep(0.005)

    def paced(self, items):
        """`items`, pausing before each one (see `pause`)."""
        for item in items:
            self.pause()
            yield item


def export_run(stored: StoredRun, out_dir: Path, pace=lambda steps: steps) -> tuple[Path, Path]:
    """Write the raw captured attention (safetensors) and its metadata (JSON) to a new folder.

    Tensor `step_{t}` has shape (num_layers, num_heads, len(prompt_ids) + t), float16.
    pace: wraps the loop over tokens (`ExportLane.paced`, to yield between them).
    """
    run = stored.run
    folder = Path(out_dir) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True, exist_ok=False)  # never overwrite anyone's files
    tensors_path = folder / f"{folder.name}-attention.safetensors"  # names that say what and which run
    meta_path = folder / f"{folder.name}-metadata.json"
    tensors = {f"step_{t}": run.step_attention(t).contiguous() for t in pace(range(run.num_steps))}
    prompt_rows = run.prompt_rows
    if prompt_rows is not None:
        tensors["prompt_rows"] = prompt_rows.contiguous()
    save_file(tensors, str(tensors_path))
    meta = {
        "model_id": run.model_id,
        "family": run.family,
        "prompt_ids": run.prompt_ids,
        "prompt_tokens": run.prompt_tokens,
        "prompt_positions": run.prompt_positions,
        "generated_ids": run.generated_ids,
        "generated_tokens": run.generated_tokens,
        "layer_indices": run.layer_indices,
        "num_heads": run.num_heads,
        "visions": [layout.to_dict() for layout in run.visions],
        "settings": run.settings.to_dict(),
        "store": getattr(run.attention, "placement", "float16 rows on the host"),
        "tensors": "step_{t}: float16 (num_layers, num_heads, len(prompt_ids) + t), softmax row of the "
        "query that produced generated token t; prompt_rows: float16 (num_layers, num_heads, "
        "len(prompt_positions), len(prompt_ids)), row i for prompt position prompt_positions[i]; "
        "indices 0-based",
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return tensors_path, meta_path


GRACE_S = 300.0  # a file this young may still be written, or not yet fetched by the user who asked for it


def clean_folder(
    folder: Path,
    max_mb: float | None = None,
    max_age_s: float | None = None,
    keep: Iterable[Path] = (),
    grace_s: float = GRACE_S,
    now: float | None = None,
) -> int:
    """Delete files under `folder` last written (or handed out) more than `max_age_s` ago, then the oldest
    until it holds at most `max_mb`; never a file younger than `grace_s` (or `max_age_s`, if shorter) nor
    one in `keep`. Folders left empty go too. Returns how many files were deleted."""
    folder, now = Path(folder), time.time() if now is None else now
    keep = {Path(path).resolve() for path in keep}
    files = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.name.startswith("."):
                stat = path.stat()
                files.append((stat.st_mtime, stat.st_size, path))
        except OSError:  # removed meanwhile
            continue
    files.sort(key=lambda entry: entry[0])
    total, deleted = sum(size for _, size, _ in files), 0
    for mtime, size, path in files:
        old = max_age_s is not None and now - mtime > max_age_s
        over = max_mb is not None and total > max_mb * 2**20
        young = now - mtime < (grace_s if max_age_s is None else min(grace_s, max_age_s))
        if not (old or over) or young or path.resolve() in keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total, deleted = total - size, deleted + 1
        _remove_empty_parents(path.parent, folder)
    if deleted:
        logger.info("removed %d old files from %s", deleted, folder)
    return deleted


def _remove_empty_parents(path: Path, root: Path) -> None:
    while path != root and root in path.parents:
        try:
            path.rmdir()  # only when empty
        except OSError:
            return
        path = path.parent


def prune_outputs(out_dir: Path, max_mb: float, keep: list[Path] = (), grace_s: float = GRACE_S) -> int:
    """Keep `out_dir` under `max_mb`, oldest files first; never the files in `keep` (just written for a
    user) nor any younger than `grace_s` (another user's export being written or fetched)."""
    return clean_folder(out_dir, max_mb=max_mb, keep=keep, grace_s=grace_s)


class Janitor:
    """Cleans folders on a timer: every `every_s`, each (folder, max_mb, max_age_s) with `clean_folder`."""

    def __init__(self, jobs: list[tuple[Path, float | None, float | None]], every_s: float):
        self.jobs, self.every_s = jobs, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="janitor")

    def start(self) -> Janitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            for folder, max_mb, max_age_s in self.jobs:
                try:
                    clean_folder(folder, max_mb=max_mb, max_age_s=max_age_s)
                except Exception:  # a cleaning that fails is retried next time; the server keeps serving
                    logger.exception("could not clean %s", folder)


def _fresh_path(out_dir: Path, stem: str, suffix: str) -> Path:
    """A new, uniquely named file path in `out_dir` (created if needed), so no one's file is overwritten."""
    path = Path(out_dir) / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_picture(picture: Image.Image, out_dir: Path, step_idx: int) -> Path:
    """The current picture as a PNG in a fresh, uniquely named file, within the download budget."""
    path = _fresh_path(out_dir, f"attention-token{step_idx}", ".png")
    fit_within(picture, DOWNLOAD_MAX_SIDE, DOWNLOAD_MAX_PIXELS).save(path, format="PNG")
    return path


def save_animation(frames, out_dir: Path, seconds_per_frame: float = 0.6) -> Path:
    """An animated GIF of `frames` (PIL images, e.g. `views.animation_frames`), looping, in a fresh file.
    The frames are written as they come, so a long answer is never held as pictures all at once."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise InputError("There is nothing to animate: this run generated no tokens.")
    path = _fresh_path(out_dir, "attention-animation", ".gif")
    first.save(
        path,
        format="GIF",
        save_all=True,
        append_images=frames,
        duration=int(seconds_per_frame * 1000),
        loop=0,
        optimize=False,
    )
    return path


def save_gallery_zip(tiles: Iterable[tuple[str, Image.Image]], out_dir: Path, step_idx: int) -> Path:
    """The per-head gallery as a ZIP of `S{step}_L{layer}_H{head}.png` in a fresh, uniquely named file."""
    path = _fresh_path(out_dir, f"heads-token{step_idx}", ".zip")
    path.write_bytes(gallery_zip(tiles))
    return path


def save_page(page: str, out_dir: Path, stem: str) -> Path:
    """A self-contained HTML page in a fresh, uniquely named file."""
    path = _fresh_path(out_dir, stem, ".html")
    path.write_text(page, encoding="utf-8")
    return path
